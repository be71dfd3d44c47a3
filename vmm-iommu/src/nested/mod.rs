//! Guest stage-1 table formats and their walkers (being written).

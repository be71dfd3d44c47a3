//! The guest-physical memory map the state checks requests against: guest
//! RAM (ATTACH_TABLE pointers must lie in it) and the MMIO windows the VMM
//! serves as DMA targets (`MAP_F_MMIO` mappings must lie in them), both
//! changing while the guest runs.
//!
//! Only the rules live here: which ranges may be added or removed. The
//! host memory behind them and the backends that map it are the vIOMMU's
//! ([`crate::viommu`]); nothing here touches either.

use super::IommuState;
use crate::backend::{BackendError, MmioWindow};

/// Why a change to guest RAM or to the MMIO windows was refused. Nothing
/// changed: not the vIOMMU state, not any backend.
#[derive(Debug, thiserror::Error)]
pub enum MemoryMapError {
    /// A range of no bytes.
    #[error("{what} at {start:#x} is empty")]
    Empty {
        /// `"RAM"` or `"MMIO window"`.
        what: &'static str,
        /// Its first address.
        start: u64,
    },
    /// A range that runs past 2^64.
    #[error("{what} at {start:#x} of {len:#x} bytes wraps past 2^64")]
    Wraps {
        /// `"RAM"` or `"MMIO window"`.
        what: &'static str,
        /// Its first address.
        start: u64,
        /// Its length.
        len: u64,
    },
    /// A new range overlaps RAM or a window already there.
    #[error("{what} [{start:#x}, {end:#x}] overlaps {other} [{other_start:#x}, {other_end:#x}]")]
    Overlaps {
        /// `"RAM"` or `"MMIO window"`: what was being added.
        what: &'static str,
        /// Its first address.
        start: u64,
        /// Its last address.
        end: u64,
        /// `"RAM"` or `"MMIO window"`: what is already there.
        other: &'static str,
        /// The existing range's first address.
        other_start: u64,
        /// The existing range's last address.
        other_end: u64,
    },
    /// An unplug that is not whole RAM ranges as they were declared (at
    /// construction or by hot-plug; adjacent ones may go together).
    #[error(
        "RAM [{start:#x}, {end:#x}] is not made of whole RAM ranges as they were added \
         (unplug what was plugged)"
    )]
    NotWholeRam {
        /// First address asked.
        start: u64,
        /// Last address asked.
        end: u64,
    },
    /// A window to withdraw that was never registered.
    #[error("no MMIO window is registered at [{start:#x}, {end:#x}]")]
    NoWindow {
        /// First address asked.
        start: u64,
        /// Last address asked.
        end: u64,
    },
    /// The guest memory object does not hold the range (for a plug, the
    /// memory after it; for an unplug, the memory before it).
    #[error("guest memory does not hold every byte of [{start:#x}, {end:#x}]")]
    NotInMemory {
        /// First address of the range.
        start: u64,
        /// Last address of the range.
        end: u64,
    },
    /// A guest memory region without a host mapping: nothing to pin.
    #[error("guest memory region at {gpa:#x} has no host mapping")]
    NoHostAddress {
        /// Where the region starts.
        gpa: u64,
    },
    /// A backend refused or failed; what earlier backends did is undone.
    #[error("backend {backend}: {source}")]
    Backend {
        /// The backend's name.
        backend: String,
        /// What it said.
        #[source]
        source: BackendError,
    },
}

/// Inclusive `[start, start + len - 1]`, refusing an empty or wrapping
/// range.
pub(crate) fn inclusive(what: &'static str, start: u64, len: u64) -> Result<u64, MemoryMapError> {
    let Some(span) = len.checked_sub(1) else {
        return Err(MemoryMapError::Empty { what, start });
    };
    start
        .checked_add(span)
        .ok_or(MemoryMapError::Wraps { what, start, len })
}

/// `units` (sorted, disjoint) with adjacent ranges joined: the form the
/// in-RAM checks read.
pub(crate) fn merge_adjacent(units: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut merged: Vec<(u64, u64)> = Vec::with_capacity(units.len());
    for &(s, e) in units {
        match merged.last_mut() {
            Some(last) if last.1.checked_add(1) == Some(s) => last.1 = e,
            _ => merged.push((s, e)),
        }
    }
    merged
}

/// Whether every byte of `[start, end]` lies in the sorted, disjoint
/// `windows` (adjacent windows together cover their union).
pub(crate) fn windows_cover(windows: &[MmioWindow], start: u64, end: u64) -> bool {
    let idx = windows.partition_point(|w| w.last() < start);
    let mut at = start;
    for w in &windows[idx..] {
        if w.gpa > at {
            return false;
        }
        if w.last() >= end {
            return true;
        }
        // `w.last() < end`, so the next byte exists.
        at = w.last() + 1;
    }
    false
}

/// The first of the sorted, disjoint `ranges` overlapping `[start, end]`.
fn first_overlap(ranges: &[(u64, u64)], start: u64, end: u64) -> Option<(u64, u64)> {
    let idx = ranges.partition_point(|r| r.1 < start);
    ranges.get(idx).copied().filter(|r| r.0 <= end)
}

fn windows_as_ranges(windows: &[MmioWindow]) -> Vec<(u64, u64)> {
    windows.iter().map(|w| (w.gpa, w.last())).collect()
}

impl IommuState {
    /// Guest RAM: sorted, merged, inclusive `[start, end]` ranges.
    pub fn ram(&self) -> &[(u64, u64)] {
        &self.ram
    }

    /// Guest RAM as the VMM declared it, range by range (what an unplug
    /// takes whole): sorted, disjoint, inclusive.
    pub fn ram_units(&self) -> &[(u64, u64)] {
        &self.ram_units
    }

    /// The MMIO windows `MAP_F_MMIO` mappings may point into, sorted.
    pub fn mmio_windows(&self) -> &[MmioWindow] {
        &self.mmio_windows
    }

    /// Refuses `[start, end]` if it overlaps RAM or a window.
    fn check_free(&self, what: &'static str, start: u64, end: u64) -> Result<(), MemoryMapError> {
        let taken = [
            ("RAM", first_overlap(&self.ram_units, start, end)),
            (
                "MMIO window",
                first_overlap(&windows_as_ranges(&self.mmio_windows), start, end),
            ),
        ];
        for (other, hit) in taken {
            if let Some((other_start, other_end)) = hit {
                return Err(MemoryMapError::Overlaps {
                    what,
                    start,
                    end,
                    other,
                    other_start,
                    other_end,
                });
            }
        }
        Ok(())
    }

    /// Makes `[start, end]` guest RAM (memory hot-plug): a new range of
    /// its own, which may touch others but not overlap RAM or a window.
    /// ATTACH_TABLE pointers into it are accepted from now on.
    pub fn add_ram(&mut self, start: u64, end: u64) -> Result<(), MemoryMapError> {
        if end < start {
            return Err(MemoryMapError::Empty { what: "RAM", start });
        }
        self.check_free("RAM", start, end)?;
        let idx = self.ram_units.partition_point(|r| r.0 < start);
        self.ram_units.insert(idx, (start, end));
        self.ram = merge_adjacent(&self.ram_units);
        Ok(())
    }

    /// Makes `[start, end]` no longer guest RAM (memory hot-unplug). It
    /// must be whole ranges as they were declared, one or several
    /// adjacent ones, so that every backend unpins whole regions. Bound
    /// tables and mappings into it stay: their walks and DMA fault from
    /// now on.
    pub fn remove_ram(&mut self, start: u64, end: u64) -> Result<(), MemoryMapError> {
        let refused = MemoryMapError::NotWholeRam { start, end };
        let first = self.ram_units.partition_point(|r| r.0 < start);
        let mut last = first;
        let mut at = start;
        loop {
            match self.ram_units.get(last) {
                Some(&(s, e)) if s == at && e <= end => {
                    if e == end {
                        break;
                    }
                    // `e < end`, so the next byte exists.
                    at = e + 1;
                    last += 1;
                }
                _ => return Err(refused),
            }
        }
        self.ram_units.drain(first..=last);
        self.ram = merge_adjacent(&self.ram_units);
        Ok(())
    }

    /// Puts back RAM ranges taken from [`Self::ram_units`] before a change
    /// that a backend then refused.
    pub(crate) fn set_ram_units(&mut self, units: Vec<(u64, u64)>) {
        self.ram = merge_adjacent(&units);
        self.ram_units = units;
    }

    /// Registers `w` as an MMIO window `MAP_F_MMIO` mappings may point
    /// into. It may touch others but not overlap RAM or a window.
    pub fn add_mmio_window(&mut self, w: MmioWindow) -> Result<(), MemoryMapError> {
        let end = inclusive("MMIO window", w.gpa, w.len)?;
        self.check_free("MMIO window", w.gpa, end)?;
        let idx = self.mmio_windows.partition_point(|x| x.gpa < w.gpa);
        self.mmio_windows.insert(idx, w);
        Ok(())
    }

    /// Withdraws the window registered at exactly `[start, end]` and
    /// returns it. MMIO mappings into it stay in the guest's view; a MAP
    /// into it is refused from now on.
    pub fn remove_mmio_window(
        &mut self,
        start: u64,
        end: u64,
    ) -> Result<MmioWindow, MemoryMapError> {
        let idx = self
            .mmio_windows
            .iter()
            .position(|w| w.gpa == start && w.last() == end)
            .ok_or(MemoryMapError::NoWindow { start, end })?;
        Ok(self.mmio_windows.remove(idx))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::IommuConfig;

    const GIB: u64 = 1 << 30;

    fn state() -> IommuState {
        // Two ranges around an MMIO gap, the low one declared in two parts.
        IommuState::new(
            &IommuConfig::default(),
            &[8],
            &[(0, GIB - 1), (GIB, 2 * GIB - 1), (4 * GIB, 5 * GIB - 1)],
        )
    }

    fn window(gpa: u64, len: u64) -> MmioWindow {
        MmioWindow {
            gpa,
            len,
            hva: None,
        }
    }

    #[test]
    fn adjacent_ranges_stay_units_but_merge_for_the_checks() {
        let st = state();
        assert_eq!(st.ram_units().len(), 3);
        assert_eq!(st.ram(), [(0, 2 * GIB - 1), (4 * GIB, 5 * GIB - 1)]);
    }

    #[test]
    fn added_ram_is_ram_and_merges_with_its_neighbours() {
        let mut st = state();
        st.add_ram(2 * GIB, 3 * GIB - 1).unwrap();
        assert_eq!(st.ram(), [(0, 3 * GIB - 1), (4 * GIB, 5 * GIB - 1)]);
        assert_eq!(st.ram_units().len(), 4);
    }

    #[test]
    fn ram_overlapping_ram_or_a_window_is_refused_and_nothing_changes() {
        let mut st = state();
        st.add_mmio_window(window(3 * GIB, 0x1000)).unwrap();
        let before = st.ram().to_vec();
        assert!(matches!(
            st.add_ram(GIB + 0x1000, 3 * GIB - 1),
            Err(MemoryMapError::Overlaps { other: "RAM", other_start, .. }) if other_start == GIB
        ));
        assert!(matches!(
            st.add_ram(2 * GIB, 3 * GIB),
            Err(MemoryMapError::Overlaps {
                other: "MMIO window",
                ..
            })
        ));
        assert!(matches!(
            st.add_ram(5, 4),
            Err(MemoryMapError::Empty { .. })
        ));
        assert_eq!(st.ram(), &before[..]);
    }

    #[test]
    fn removal_takes_whole_units_only() {
        let mut st = state();
        // Part of a unit, and a span running past the units, are refused.
        for (s, e) in [
            (0, GIB / 2 - 1),
            (GIB / 2, GIB - 1),
            (GIB, 3 * GIB - 1),
            (3 * GIB, 4 * GIB - 1),
        ] {
            assert!(
                matches!(st.remove_ram(s, e), Err(MemoryMapError::NotWholeRam { .. })),
                "{s:#x}..{e:#x}"
            );
        }
        assert_eq!(st.ram_units().len(), 3);
        // Two adjacent units at once.
        st.remove_ram(0, 2 * GIB - 1).unwrap();
        assert_eq!(st.ram(), [(4 * GIB, 5 * GIB - 1)]);
        st.remove_ram(4 * GIB, 5 * GIB - 1).unwrap();
        assert!(st.ram().is_empty());
        assert!(st.remove_ram(0, 0).is_err());
    }

    #[test]
    fn windows_cover_their_union_and_nothing_else() {
        let mut st = state();
        st.add_mmio_window(window(0xd000_0000, 0x1000)).unwrap();
        st.add_mmio_window(window(0xd000_1000, 0x1000)).unwrap();
        st.add_mmio_window(window(0xd000_4000, 0x1000)).unwrap();
        let w = st.mmio_windows();
        assert!(windows_cover(w, 0xd000_0000, 0xd000_1fff));
        assert!(windows_cover(w, 0xd000_0800, 0xd000_1800));
        assert!(windows_cover(w, 0xd000_4000, 0xd000_4fff));
        assert!(!windows_cover(w, 0xd000_0000, 0xd000_2fff));
        assert!(!windows_cover(w, 0xcfff_f000, 0xd000_0fff));
        assert!(!windows_cover(w, 0xd000_3000, 0xd000_4fff));
        assert!(!windows_cover(&[], 0, 0));
        assert!(windows_cover(
            &[window(u64::MAX - 0xfff, 0x1000)],
            u64::MAX - 0xff,
            u64::MAX
        ));
    }

    #[test]
    fn windows_are_refused_over_ram_other_windows_or_wrapping() {
        let mut st = state();
        st.add_mmio_window(window(3 * GIB, 0x2000)).unwrap();
        for w in [
            window(3 * GIB + 0x1000, 0x1000),
            window(2 * GIB - 0x1000, 0x2000),
        ] {
            assert!(matches!(
                st.add_mmio_window(w),
                Err(MemoryMapError::Overlaps { .. })
            ));
        }
        assert!(matches!(
            st.add_mmio_window(window(3 * GIB, 0)),
            Err(MemoryMapError::Empty { .. })
        ));
        assert!(matches!(
            st.add_mmio_window(window(u64::MAX, 2)),
            Err(MemoryMapError::Wraps { .. })
        ));
        assert_eq!(st.mmio_windows().len(), 1);
    }

    #[test]
    fn a_window_is_withdrawn_only_exactly() {
        let mut st = state();
        st.add_mmio_window(window(3 * GIB, 0x2000)).unwrap();
        assert!(matches!(
            st.remove_mmio_window(3 * GIB, 3 * GIB + 0xfff),
            Err(MemoryMapError::NoWindow { .. })
        ));
        let w = st.remove_mmio_window(3 * GIB, 3 * GIB + 0x1fff).unwrap();
        assert_eq!(w.len, 0x2000);
        assert!(st.mmio_windows().is_empty());
    }

    #[test]
    fn inclusive_refuses_empty_and_wrapping_ranges() {
        assert_eq!(inclusive("RAM", 0x1000, 0x1000).unwrap(), 0x1fff);
        assert_eq!(inclusive("RAM", u64::MAX, 1).unwrap(), u64::MAX);
        assert!(matches!(
            inclusive("RAM", 0, 0),
            Err(MemoryMapError::Empty { .. })
        ));
        assert!(matches!(
            inclusive("RAM", u64::MAX, 2),
            Err(MemoryMapError::Wraps { .. })
        ));
    }
}

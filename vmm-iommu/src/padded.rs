//! A value alone on its cache lines.
//!
//! The counters translators read on every access (the topology and
//! generation of the vIOMMU, an index's generation and sequence) are
//! written by the thread applying requests. Sharing a line with the state
//! lock, or with each other, would make every request's lock and unlock
//! evict the line the translators on other cores keep reading; alone, a
//! line moves only when its own counter does.

use std::ops::Deref;

/// `T` aligned (and so padded) to 128 bytes: two cache lines, as x86's
/// adjacent-line prefetcher pairs them.
#[derive(Debug, Default)]
#[repr(align(128))]
pub(crate) struct Padded<T>(pub(crate) T);

impl<T> Deref for Padded<T> {
    type Target = T;

    #[inline(always)]
    fn deref(&self) -> &T {
        &self.0
    }
}

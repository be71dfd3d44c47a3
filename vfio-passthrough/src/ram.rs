//! Guest RAM as the backends see it: a sorted list of regions (guest
//! physical range and the host virtual address backing it) and checked
//! reads of guest tables.
//!
//! It owns address arithmetic only; it never maps or pins anything. The
//! region list starts as the memory the backend is built over, and
//! changes whole with RAM hot-plug ([`GuestRam::with_added`],
//! [`GuestRam::with_removed`]): a backend swaps its [`SharedRam`] once
//! its host mappings follow.

use std::sync::{Arc, RwLock};

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use vmm_iommu::backend::{BackendError, HostRange, RamChange};

/// One guest RAM region.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RamRegion {
    /// First guest-physical address.
    pub gpa: u64,
    /// Length in bytes, at least one.
    pub len: u64,
    /// Host virtual address of `gpa`.
    pub hva: u64,
}

impl RamRegion {
    /// The last guest-physical address of the region.
    pub fn last(&self) -> u64 {
        self.gpa.saturating_add(self.len - 1)
    }
}

/// Sorts regions and checks that they neither overlap nor wrap.
pub fn check_regions(mut regions: Vec<RamRegion>) -> Result<Vec<RamRegion>, BackendError> {
    regions.sort_by_key(|r| r.gpa);
    let mut prev_last: Option<u64> = None;
    for r in &regions {
        if r.len == 0 {
            return Err(BackendError::Invalid(format!(
                "RAM region at {:#x} is empty",
                r.gpa
            )));
        }
        if r.gpa.checked_add(r.len - 1).is_none() || r.hva.checked_add(r.len - 1).is_none() {
            return Err(BackendError::Invalid(format!(
                "RAM region at {:#x} (+{:#x}) wraps",
                r.gpa, r.len
            )));
        }
        if prev_last.is_some_and(|p| r.gpa <= p) {
            return Err(BackendError::Invalid(format!(
                "RAM region at {:#x} overlaps the one before",
                r.gpa
            )));
        }
        prev_last = Some(r.last());
    }
    Ok(regions)
}

/// The index of the region holding `gpa`.
pub fn region_index(regions: &[RamRegion], gpa: u64) -> Option<usize> {
    let i = regions.partition_point(|r| r.gpa <= gpa);
    let i = i.checked_sub(1)?;
    (gpa <= regions[i].last()).then_some(i)
}

/// Whether every byte of `[gpa, gpa + len)` is guest RAM (possibly over
/// several adjacent regions). `len == 0` is never RAM.
pub fn covers(regions: &[RamRegion], gpa: u64, len: u64) -> bool {
    let Some(last) = len.checked_sub(1).and_then(|l| gpa.checked_add(l)) else {
        return false;
    };
    let Some(mut i) = region_index(regions, gpa) else {
        return false;
    };
    loop {
        let r = &regions[i];
        if last <= r.last() {
            return true;
        }
        // The next byte after this region must start the next region.
        let next = r.last() + 1;
        match regions.get(i + 1) {
            Some(n) if n.gpa == next => i += 1,
            _ => return false,
        }
    }
}

/// Guest RAM: the region list and a reader for guest tables.
#[derive(Clone, Debug)]
pub struct GuestRam {
    mem: GuestMemoryMmap,
    regions: Vec<RamRegion>,
}

impl GuestRam {
    /// Takes the regions of `mem` (which the VMM keeps mapped for the
    /// lifetime of the backend).
    pub fn new(mem: GuestMemoryMmap) -> Result<Self, BackendError> {
        let mut regions = Vec::new();
        for r in mem.iter() {
            let hva = r
                .get_host_address(vm_memory::MemoryRegionAddress(0))
                .map_err(|e| {
                    BackendError::Invalid(format!("RAM region without host mapping: {e}"))
                })?;
            regions.push(RamRegion {
                gpa: r.start_addr().0,
                len: r.len(),
                hva: hva as u64,
            });
        }
        let regions = check_regions(regions)?;
        Ok(GuestRam { mem, regions })
    }

    /// The regions, sorted by guest-physical address.
    pub fn regions(&self) -> &[RamRegion] {
        &self.regions
    }

    /// Guest memory, for reading guest tables with the software IOMMU's
    /// decoders (which take a `vmm_iommu::nested::TableMemory`).
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// Whether `[gpa, gpa + len)` is all guest RAM.
    pub fn covers(&self, gpa: u64, len: u64) -> bool {
        covers(&self.regions, gpa, len)
    }

    /// Reads guest memory for a table walk; RANGE if any byte is not RAM
    /// (`what` names the table in the error).
    pub fn read(&self, gpa: u64, buf: &mut [u8], what: &str) -> Result<(), BackendError> {
        if !self.covers(gpa, buf.len() as u64) {
            return Err(BackendError::Range(format!(
                "{what} at {gpa:#x} (+{:#x}) is outside guest RAM",
                buf.len()
            )));
        }
        self.mem
            .read_slice(buf, GuestAddress(gpa))
            .map_err(|e| BackendError::Range(format!("{what} at {gpa:#x}: {e}")))
    }

    /// Reads a little-endian `u64` of a guest table.
    pub fn read_u64(&self, gpa: u64, what: &str) -> Result<u64, BackendError> {
        let mut b = [0u8; 8];
        self.read(gpa, &mut b, what)?;
        Ok(u64::from_le_bytes(b))
    }

    /// This RAM with the plugged `host` ranges added, guest tables read
    /// from `mem`. INVALID if one is empty, wraps or overlaps RAM.
    pub fn with_added(
        &self,
        host: &[HostRange],
        mem: GuestMemoryMmap,
    ) -> Result<Self, BackendError> {
        let mut regions = self.regions.clone();
        regions.extend(host.iter().map(|h| RamRegion {
            gpa: h.gpa,
            len: h.len,
            hva: h.hva,
        }));
        Ok(GuestRam {
            mem,
            regions: check_regions(regions)?,
        })
    }

    /// This RAM without `[start, end]`, guest tables read from `mem`. The
    /// range must be whole regions ([`Self::regions_in`]): a VFIO mapping
    /// cannot be split, so a region goes as it came. INVALID otherwise.
    pub fn with_removed(
        &self,
        start: u64,
        end: u64,
        mem: GuestMemoryMmap,
    ) -> Result<Self, BackendError> {
        let gone = self.regions_in(start, end)?.len();
        let first = self.regions.partition_point(|r| r.gpa < start);
        let mut regions = self.regions.clone();
        regions.drain(first..first + gone);
        Ok(GuestRam { mem, regions })
    }

    /// The regions that make up exactly `[start, end]`, adjacent, in
    /// order. INVALID if the range is not whole regions.
    pub fn regions_in(&self, start: u64, end: u64) -> Result<&[RamRegion], BackendError> {
        let first = self.regions.partition_point(|r| r.gpa < start);
        let mut at = start;
        for (n, r) in self.regions[first..].iter().enumerate() {
            if r.gpa != at || r.last() > end {
                break;
            }
            if r.last() == end {
                return Ok(&self.regions[first..=first + n]);
            }
            // `r.last() < end`, so the next byte exists.
            at = r.last() + 1;
        }
        Err(BackendError::Invalid(format!(
            "guest RAM [{start:#x}, {end:#x}] is not whole RAM regions of this backend"
        )))
    }
}

/// The guest memory a RAM change hands over, as the VFIO backends' memory
/// type. INVALID for any other type, before anything changes.
pub fn memory_of(change: &RamChange<'_>) -> Result<GuestMemoryMmap, BackendError> {
    change
        .memory
        .downcast_ref::<GuestMemoryMmap>()
        .cloned()
        .ok_or_else(|| {
            BackendError::Invalid(format!(
                "guest memory of RAM [{:#x}, {:#x}] is not a vm_memory::GuestMemoryMmap",
                change.start, change.end
            ))
        })
}

/// A backend's guest RAM, replaced whole when RAM is plugged or unplugged:
/// a call works on the one it took at its start.
#[derive(Debug)]
pub struct SharedRam(RwLock<Arc<GuestRam>>);

impl SharedRam {
    /// Shares `ram`.
    pub fn new(ram: GuestRam) -> Self {
        SharedRam(RwLock::new(Arc::new(ram)))
    }

    /// The RAM now.
    pub fn get(&self) -> Arc<GuestRam> {
        // Replacing is one assignment: a poisoned lock holds a whole RAM.
        Arc::clone(&self.0.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// Replaces the RAM.
    pub fn set(&self, ram: GuestRam) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(ram);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn two() -> Vec<RamRegion> {
        vec![
            RamRegion {
                gpa: 0,
                len: 0x1000,
                hva: 0x7000_0000,
            },
            RamRegion {
                gpa: 0x1000,
                len: 0x2000,
                hva: 0x9000_0000,
            },
            RamRegion {
                gpa: 0x10_0000,
                len: 0x1000,
                hva: 0xa000_0000,
            },
        ]
    }

    #[test]
    fn covers_follows_adjacent_regions_and_stops_at_holes() {
        let r = two();
        assert!(covers(&r, 0, 0x3000));
        assert!(covers(&r, 0xfff, 2));
        assert!(!covers(&r, 0x2000, 0x2000));
        assert!(!covers(&r, 0x10_0000, 0x1001));
        assert!(!covers(&r, 0x10_0000, 0));
        assert!(!covers(&r, u64::MAX, 2));
    }

    #[test]
    fn overlapping_or_wrapping_regions_are_refused() {
        let mut r = two();
        r.push(RamRegion {
            gpa: 0x800,
            len: 0x1000,
            hva: 0,
        });
        assert!(matches!(check_regions(r), Err(BackendError::Invalid(_))));
        let r = vec![RamRegion {
            gpa: u64::MAX,
            len: 2,
            hva: 0,
        }];
        assert!(matches!(check_regions(r), Err(BackendError::Invalid(_))));
    }

    #[test]
    fn reads_outside_ram_are_range_errors() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x2000)]).unwrap();
        let ram = GuestRam::new(mem).unwrap();
        let mut b = [0u8; 16];
        assert!(ram.read(0x1ff8, &mut b, "table").is_err());
        assert!(ram.read(0x1ff0, &mut b, "table").is_ok());
        assert_eq!(ram.regions().len(), 1);
    }

    #[test]
    fn plugged_ranges_join_and_whole_regions_leave() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x2000)]).unwrap();
        let ram = GuestRam::new(mem.clone()).unwrap();
        let plugged = [
            HostRange {
                gpa: 0x1_0000,
                len: 0x1000,
                hva: 0x7000_0000,
            },
            HostRange {
                gpa: 0x1_1000,
                len: 0x1000,
                hva: 0x9000_0000,
            },
        ];
        let more = ram.with_added(&plugged, mem.clone()).unwrap();
        assert_eq!(more.regions().len(), 3);
        assert!(more.covers(0x1_0000, 0x2000));
        // Overlapping RAM is refused.
        assert!(matches!(
            more.with_added(&plugged[..1], mem.clone()),
            Err(BackendError::Invalid(_))
        ));
        // Part of a region, or past the regions, is refused.
        for (s, e) in [
            (0x1_0000, 0x1_07ff),
            (0x1_0000, 0x1_2fff),
            (0x8000, 0x1_0fff),
        ] {
            assert!(more.with_removed(s, e, mem.clone()).is_err(), "{s:#x}");
        }
        let less = more.with_removed(0x1_0000, 0x1_1fff, mem.clone()).unwrap();
        assert_eq!(less.regions(), ram.regions());
        assert_eq!(
            more.regions_in(0x1_1000, 0x1_1fff).unwrap()[0].hva,
            0x9000_0000
        );
    }
}

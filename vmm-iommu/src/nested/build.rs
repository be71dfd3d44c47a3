//! Table builders: write the structures a guest driver would write — VT-d
//! PASID directories and tables with IA-32e page tables, SMMUv3 linear and
//! 2-level CD tables with AArch64 page tables — into any
//! `vm_memory::GuestMemory`, from a bump allocator of guest-physical pages.
//!
//! For tests, benchmarks and demos of the software IOMMU: building a guest's
//! tables from the host side, then changing or clearing single entries in
//! place (to exercise stale caches and invalidation) without a guest
//! kernel. The builders keep no shadow state: every edit reads the tables
//! from guest memory, so a test may mix builder calls with raw writes.
//! Entries are written with single aligned 64-bit stores (release), as a
//! guest CPU would, so a concurrent walker sees an old or a new entry,
//! never a torn one; multi-word structures (PASID entries, CDs) are written
//! word by word, last word first, and readers must be quiesced or tolerate
//! that as they would with a real guest.

use std::sync::atomic::Ordering;

use vm_memory::{Bytes, GuestAddress, GuestMemory};

use super::arm::{self, Granule};
use super::fault::WalkFault;
use super::smmuv3::{self, CdTable, ContextDescriptor, S1Dss, S1Fmt};
use super::vtd::{self, PasidTable, VtdPasidEntry};
use super::x86::{self, Flags};
use super::Perm;

/// Why a builder could not do what it was asked.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BuildError {
    /// The allocator has no room left.
    #[error(
        "allocator exhausted: {size:#x} bytes aligned to {align:#x} do not fit below {end:#x}"
    )]
    OutOfSpace {
        /// Bytes requested.
        size: u64,
        /// Alignment requested.
        align: u64,
        /// End of the allocator's range.
        end: u64,
    },
    /// Guest memory at `gpa` could not be read or written.
    #[error("guest memory at {gpa:#x} is not accessible RAM")]
    Memory {
        /// The address.
        gpa: u64,
    },
    /// An argument the format cannot express (misaligned address, page
    /// size the granule lacks, PASID out of range, ...).
    #[error("invalid argument: {0}")]
    Invalid(&'static str),
    /// The address is already mapped at `level` (a leaf, or a table where
    /// a block was asked for).
    #[error("{va:#x} is already mapped at level {level}")]
    Conflict {
        /// The input address.
        va: u64,
        /// The level of the entry in the way.
        level: u8,
    },
    /// No table leads to `level` for the address.
    #[error("no table maps {va:#x} down to level {level}")]
    NoTable {
        /// The input address.
        va: u64,
        /// The level asked for.
        level: u8,
    },
    /// The walker's configuration refused the parameters.
    #[error("configuration refused: {0}")]
    Config(WalkFault),
}

/// A bump allocator of zeroed guest-physical memory for tables, and the
/// guest memory it writes to.
#[derive(Debug)]
pub struct TableAlloc<'m, M: GuestMemory + ?Sized> {
    mem: &'m M,
    next: u64,
    end: u64,
}

impl<'m, M: GuestMemory + ?Sized> TableAlloc<'m, M> {
    /// Allocates from `[start, end)` of `mem`.
    pub fn new(mem: &'m M, start: u64, end: u64) -> Self {
        TableAlloc {
            mem,
            next: start,
            end,
        }
    }

    /// The guest memory.
    pub fn mem(&self) -> &'m M {
        self.mem
    }

    /// The first address not yet allocated.
    pub fn next_free(&self) -> u64 {
        self.next
    }

    /// Allocates `size` bytes aligned to `align` (a power of two) and
    /// zeroes them.
    pub fn alloc(&mut self, size: u64, align: u64) -> Result<u64, BuildError> {
        if !align.is_power_of_two() || size == 0 {
            return Err(BuildError::Invalid(
                "allocation size 0 or alignment not a power of two",
            ));
        }
        let full = BuildError::OutOfSpace {
            size,
            align,
            end: self.end,
        };
        let base = self.next.checked_add(align - 1).ok_or(full)? & !(align - 1);
        let end = base.checked_add(size).ok_or(full)?;
        if end > self.end {
            return Err(full);
        }
        self.zero(base, size)?;
        self.next = end;
        Ok(base)
    }

    /// Writes `len` zero bytes at `gpa`.
    pub fn zero(&self, gpa: u64, len: u64) -> Result<(), BuildError> {
        static ZEROES: [u8; 4096] = [0; 4096];
        let mut done = 0u64;
        while done < len {
            let chunk = (len - done).min(ZEROES.len() as u64);
            let at = gpa.checked_add(done).ok_or(BuildError::Memory { gpa })?;
            // chunk ≤ 4096.
            let bytes = ZEROES
                .get(..chunk as usize)
                .ok_or(BuildError::Memory { gpa: at })?;
            self.mem
                .write_slice(bytes, GuestAddress(at))
                .map_err(|_| BuildError::Memory { gpa: at })?;
            done += chunk;
        }
        Ok(())
    }

    /// Writes the little-endian `value` at `gpa`, as one atomic store when
    /// aligned.
    pub fn write_u64(&self, gpa: u64, value: u64) -> Result<(), BuildError> {
        let err = BuildError::Memory { gpa };
        if gpa & 7 == 0 {
            return self
                .mem
                .store(value.to_le(), GuestAddress(gpa), Ordering::Release)
                .map_err(|_| err);
        }
        self.mem
            .write_slice(&value.to_le_bytes(), GuestAddress(gpa))
            .map_err(|_| err)
    }

    /// Reads the little-endian u64 at `gpa`.
    pub fn read_u64(&self, gpa: u64) -> Result<u64, BuildError> {
        let mut b = [0u8; 8];
        self.mem
            .read_slice(&mut b, GuestAddress(gpa))
            .map_err(|_| BuildError::Memory { gpa })?;
        Ok(u64::from_le_bytes(b))
    }

    /// Writes `words` at `gpa`, last word first (so that the word holding
    /// a valid/present bit, first in every format here, is written last).
    pub fn write_words(&self, gpa: u64, words: &[u64]) -> Result<(), BuildError> {
        for (i, w) in words.iter().enumerate().rev() {
            let off = (i as u64)
                .checked_mul(8)
                .ok_or(BuildError::Memory { gpa })?;
            let at = gpa.checked_add(off).ok_or(BuildError::Memory { gpa })?;
            self.write_u64(at, *w)?;
        }
        Ok(())
    }
}

/// Builds IA-32e (VT-d first-stage / direct x86-64) page tables.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct X86TableBuilder {
    config: x86::Config,
}

impl X86TableBuilder {
    /// An empty 4- or 5-level table.
    pub fn new<M: GuestMemory + ?Sized>(
        alloc: &mut TableAlloc<'_, M>,
        levels: u8,
    ) -> Result<Self, BuildError> {
        if levels != 4 && levels != 5 {
            return Err(BuildError::Invalid("IA-32e paging has 4 or 5 levels"));
        }
        let root = alloc.alloc(4096, 4096)?;
        let config = x86::Config::new(root, levels).map_err(BuildError::Config)?;
        Ok(X86TableBuilder { config })
    }

    /// Guest-physical address of the PML4/PML5 table.
    pub fn root(&self) -> u64 {
        self.config.root()
    }

    /// Paging depth.
    pub fn levels(&self) -> u8 {
        self.config.levels()
    }

    /// The direct regime over these tables (default flags, no DID).
    pub fn config(&self) -> x86::Config {
        self.config
    }

    /// Maps the `1 << page_log2` bytes at `va` (12, 21 or 30) to `pa` with
    /// `perm`, as Linux writes first-stage leaves ([`x86::leaf_flags`]).
    pub fn map<M: GuestMemory + ?Sized>(
        &self,
        alloc: &mut TableAlloc<'_, M>,
        va: u64,
        pa: u64,
        page_log2: u8,
        perm: Perm,
    ) -> Result<(), BuildError> {
        self.map_raw(alloc, va, pa, page_log2, x86::leaf_flags(perm))
    }

    /// Maps like [`map`](Self::map) with the leaf's non-address bits given
    /// as `flags` (P included or not, as the caller wants; PS is added for
    /// 2 MiB/1 GiB pages). Intermediate tables are created with
    /// [`x86::TABLE_FLAGS`]. Refuses to replace a present entry.
    pub fn map_raw<M: GuestMemory + ?Sized>(
        &self,
        alloc: &mut TableAlloc<'_, M>,
        va: u64,
        pa: u64,
        page_log2: u8,
        flags: u64,
    ) -> Result<(), BuildError> {
        let leaf_level = match page_log2 {
            12 => 1u8,
            21 => 2,
            30 => 3,
            _ => {
                return Err(BuildError::Invalid(
                    "IA-32e page sizes are 4 KiB, 2 MiB and 1 GiB",
                ))
            }
        };
        let mask = (1u64 << page_log2) - 1;
        if va & mask != 0 || pa & mask != 0 {
            return Err(BuildError::Invalid("address not aligned to the page size"));
        }
        if pa & !x86::PTE_ADDR_MASK != 0 {
            return Err(BuildError::Invalid("physical address above 52 bits"));
        }
        self.check_canonical(va)?;
        let mut table = self.root();
        for level in (leaf_level + 1..=self.levels()).rev() {
            let gpa = x86_entry(table, va, level);
            let e = alloc.read_u64(gpa)?;
            if e & x86::PTE_P == 0 {
                let next = alloc.alloc(4096, 4096)?;
                alloc.write_u64(gpa, next | x86::TABLE_FLAGS)?;
                table = next;
            } else if level <= 3 && e & x86::PTE_PS != 0 {
                return Err(BuildError::Conflict { va, level });
            } else {
                table = e & x86::PTE_ADDR_MASK;
            }
        }
        let gpa = x86_entry(table, va, leaf_level);
        if alloc.read_u64(gpa)? & x86::PTE_P != 0 {
            return Err(BuildError::Conflict {
                va,
                level: leaf_level,
            });
        }
        let ps = if leaf_level > 1 { x86::PTE_PS } else { 0 };
        alloc.write_u64(gpa, pa | flags | ps)
    }

    fn check_canonical(&self, va: u64) -> Result<(), BuildError> {
        let sign = (va as i64) >> (self.config.va_bits() - 1);
        if sign != 0 && sign != -1 {
            return Err(BuildError::Invalid("input address not canonical"));
        }
        Ok(())
    }

    /// Guest-physical address of the entry at `level` (levels..=1) on the
    /// path of `va`, following the tables as they are in guest memory.
    pub fn entry_gpa<M: GuestMemory + ?Sized>(
        &self,
        alloc: &TableAlloc<'_, M>,
        va: u64,
        level: u8,
    ) -> Result<u64, BuildError> {
        if level == 0 || level > self.levels() {
            return Err(BuildError::Invalid("no such IA-32e level"));
        }
        let mut table = self.root();
        for l in (level + 1..=self.levels()).rev() {
            let e = alloc.read_u64(x86_entry(table, va, l))?;
            if e & x86::PTE_P == 0 || (l <= 3 && e & x86::PTE_PS != 0) {
                return Err(BuildError::NoTable { va, level });
            }
            table = e & x86::PTE_ADDR_MASK;
        }
        Ok(x86_entry(table, va, level))
    }

    /// Overwrites the entry at `level` on the path of `va` with `value`.
    pub fn set_entry<M: GuestMemory + ?Sized>(
        &self,
        alloc: &TableAlloc<'_, M>,
        va: u64,
        level: u8,
        value: u64,
    ) -> Result<(), BuildError> {
        alloc.write_u64(self.entry_gpa(alloc, va, level)?, value)
    }

    /// Clears the entry at `level` on the path of `va` (not present).
    pub fn clear_entry<M: GuestMemory + ?Sized>(
        &self,
        alloc: &TableAlloc<'_, M>,
        va: u64,
        level: u8,
    ) -> Result<(), BuildError> {
        self.set_entry(alloc, va, level, 0)
    }
}

fn x86_entry(table: u64, va: u64, level: u8) -> u64 {
    let shift = 12 + 9 * u32::from(level - 1);
    (table & x86::PTE_ADDR_MASK) | (((va >> shift) & 0x1ff) << 3)
}

/// Builds AArch64 stage-1 (TTB0) page tables.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ArmTableBuilder {
    config: arm::Config,
}

impl ArmTableBuilder {
    /// An empty table for `granule` and input size `64 - t0sz`.
    pub fn new<M: GuestMemory + ?Sized>(
        alloc: &mut TableAlloc<'_, M>,
        granule: Granule,
        t0sz: u8,
    ) -> Result<Self, BuildError> {
        // Validate first, then allocate: the start table is at most one
        // granule and is allocated as one.
        arm::Config::new(0, granule, t0sz).map_err(BuildError::Config)?;
        let size = 1u64 << granule.shift();
        let root = alloc.alloc(size, size)?;
        let config = arm::Config::new(root, granule, t0sz).map_err(BuildError::Config)?;
        Ok(ArmTableBuilder { config })
    }

    /// Guest-physical address of the start-level table (TTB0).
    pub fn root(&self) -> u64 {
        self.config.ttb0()
    }

    /// The regime over these tables (defaults of [`arm::Config::new`]).
    pub fn config(&self) -> arm::Config {
        self.config
    }

    /// Maps the `1 << page_log2` bytes at `va` to `pa` with `perm`, as
    /// Linux's io-pgtable-arm writes a stage-1 leaf ([`arm::leaf_attrs`]).
    /// Page sizes: 4 KiB granule 12, 21, 30; 16 KiB 14, 25; 64 KiB 16, 29.
    pub fn map<M: GuestMemory + ?Sized>(
        &self,
        alloc: &mut TableAlloc<'_, M>,
        va: u64,
        pa: u64,
        page_log2: u8,
        perm: Perm,
    ) -> Result<(), BuildError> {
        self.map_raw(alloc, va, pa, page_log2, arm::leaf_attrs(perm))
    }

    /// Maps like [`map`](Self::map) with the leaf's attribute bits given as
    /// `attrs` (everything but the address and the descriptor type, which
    /// are added). Refuses to replace a valid entry.
    pub fn map_raw<M: GuestMemory + ?Sized>(
        &self,
        alloc: &mut TableAlloc<'_, M>,
        va: u64,
        pa: u64,
        page_log2: u8,
        attrs: u64,
    ) -> Result<(), BuildError> {
        let leaf_level = self.leaf_level(page_log2)?;
        let mask = (1u64 << page_log2) - 1;
        if va & mask != 0 || pa & mask != 0 {
            return Err(BuildError::Invalid("address not aligned to the page size"));
        }
        if pa & !arm::DESC_ADDR_MASK != 0 {
            return Err(BuildError::Invalid("physical address above 48 bits"));
        }
        if va >> self.config.ia_bits() != 0 {
            return Err(BuildError::Invalid("input address beyond T0SZ"));
        }
        let granule = 1u64 << self.config.granule().shift();
        let mut table = self.root();
        for level in self.config.start_level()..leaf_level {
            let gpa = self.arm_entry(table, va, level);
            let e = alloc.read_u64(gpa)?;
            if e & arm::DESC_VALID == 0 {
                let next = alloc.alloc(granule, granule)?;
                alloc.write_u64(gpa, next | arm::DESC_TYPE_TABLE)?;
                table = next;
            } else if e & 0b11 != arm::DESC_TYPE_TABLE {
                return Err(BuildError::Conflict { va, level });
            } else {
                table = e & arm::DESC_ADDR_MASK & !(granule - 1);
            }
        }
        let gpa = self.arm_entry(table, va, leaf_level);
        if alloc.read_u64(gpa)? & arm::DESC_VALID != 0 {
            return Err(BuildError::Conflict {
                va,
                level: leaf_level,
            });
        }
        let ty = if leaf_level == 3 {
            arm::DESC_TYPE_TABLE
        } else {
            arm::DESC_TYPE_BLOCK
        };
        alloc.write_u64(gpa, pa | (attrs & !0b11) | ty)
    }

    fn leaf_level(&self, page_log2: u8) -> Result<u8, BuildError> {
        let g = self.config.granule();
        let level = match (g, page_log2) {
            (Granule::K4, 12) | (Granule::K16, 14) | (Granule::K64, 16) => 3,
            (Granule::K4, 21) | (Granule::K16, 25) | (Granule::K64, 29) => 2,
            (Granule::K4, 30) => 1,
            _ => {
                return Err(BuildError::Invalid(
                    "page size not a page or block of the granule",
                ))
            }
        };
        if level < self.config.start_level() {
            return Err(BuildError::Invalid(
                "block larger than the start level allows",
            ));
        }
        Ok(level)
    }

    fn arm_entry(&self, table: u64, va: u64, level: u8) -> u64 {
        let c = &self.config;
        let g = c.granule();
        let shift = g.shift() + u32::from(3 - level) * g.stride();
        let bits = if level == c.start_level() {
            u32::from(c.ia_bits()) - shift
        } else {
            g.stride()
        };
        (table & !((1u64 << g.shift()) - 1)) | (((va >> shift) & ((1u64 << bits) - 1)) << 3)
    }

    /// Guest-physical address of the descriptor at `level` (start level..=3)
    /// on the path of `va`, following the tables as they are in guest memory.
    pub fn entry_gpa<M: GuestMemory + ?Sized>(
        &self,
        alloc: &TableAlloc<'_, M>,
        va: u64,
        level: u8,
    ) -> Result<u64, BuildError> {
        if level < self.config.start_level() || level > 3 {
            return Err(BuildError::Invalid("no such level in this regime"));
        }
        let granule = 1u64 << self.config.granule().shift();
        let mut table = self.root();
        for l in self.config.start_level()..level {
            let e = alloc.read_u64(self.arm_entry(table, va, l))?;
            if e & 0b11 != arm::DESC_TYPE_TABLE {
                return Err(BuildError::NoTable { va, level });
            }
            table = e & arm::DESC_ADDR_MASK & !(granule - 1);
        }
        Ok(self.arm_entry(table, va, level))
    }

    /// Overwrites the descriptor at `level` on the path of `va` with `value`.
    pub fn set_entry<M: GuestMemory + ?Sized>(
        &self,
        alloc: &TableAlloc<'_, M>,
        va: u64,
        level: u8,
        value: u64,
    ) -> Result<(), BuildError> {
        alloc.write_u64(self.entry_gpa(alloc, va, level)?, value)
    }

    /// Invalidates the descriptor at `level` on the path of `va`.
    pub fn clear_entry<M: GuestMemory + ?Sized>(
        &self,
        alloc: &TableAlloc<'_, M>,
        va: u64,
        level: u8,
    ) -> Result<(), BuildError> {
        self.set_entry(alloc, va, level, 0)
    }
}

/// Clears the 64-byte PASID entry or CD at `slot` (nothing to do when its
/// table does not exist). The valid/present bit, in the first word, goes
/// first, so the entry stops being used before the rest of it changes.
fn clear_64_byte_entry<M: GuestMemory + ?Sized>(
    alloc: &TableAlloc<'_, M>,
    slot: Result<u64, BuildError>,
) -> Result<(), BuildError> {
    match slot {
        Ok(gpa) => {
            alloc.write_u64(gpa, 0)?;
            alloc.write_words(gpa, &[0; 8])
        }
        Err(BuildError::NoTable { .. }) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Builds a VT-d scalable-mode PASID directory and the PASID tables under
/// it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VtdPasidTableBuilder {
    table: PasidTable,
}

impl VtdPasidTableBuilder {
    /// An empty directory for PASIDs below `1 << pasid_bits` (1..=20).
    pub fn new<M: GuestMemory + ?Sized>(
        alloc: &mut TableAlloc<'_, M>,
        pasid_bits: u8,
    ) -> Result<Self, BuildError> {
        PasidTable::new(0, pasid_bits).map_err(BuildError::Config)?;
        let entries = 1u64 << pasid_bits.saturating_sub(vtd::PASID_TABLE_SHIFT as u8);
        let size = (entries * vtd::DIR_ENTRY_SIZE).max(4096);
        let dir = alloc.alloc(size, 4096)?;
        let table = PasidTable::new(dir, pasid_bits).map_err(BuildError::Config)?;
        Ok(VtdPasidTableBuilder { table })
    }

    /// Guest-physical address of the directory.
    pub fn dir_ptr(&self) -> u64 {
        self.table.dir_ptr()
    }

    /// The directory as the walker sees it.
    pub fn table(&self) -> PasidTable {
        self.table
    }

    /// Guest-physical address of `pasid`'s entry, creating its PASID table
    /// (and directory entry) if there is none.
    pub fn entry_slot<M: GuestMemory + ?Sized>(
        &self,
        alloc: &mut TableAlloc<'_, M>,
        pasid: u32,
    ) -> Result<u64, BuildError> {
        let dgpa = self
            .table
            .dir_entry_gpa(pasid)
            .map_err(|_| BuildError::Invalid("PASID outside the directory"))?;
        let pde = alloc.read_u64(dgpa)?;
        let table = if pde & vtd::PDE_P != 0 {
            pde & vtd::PDE_TABLE_MASK
        } else {
            let t = alloc.alloc(vtd::PASID_TABLE_ENTRIES * vtd::PASID_ENTRY_SIZE, 4096)?;
            alloc.write_u64(dgpa, t | vtd::PDE_P)?;
            t
        };
        let index = u64::from(pasid) & (vtd::PASID_TABLE_ENTRIES - 1);
        // The PASID table is 4 KiB aligned and index * 64 < 4 KiB.
        Ok(table | (index * vtd::PASID_ENTRY_SIZE))
    }

    /// Guest-physical address of `pasid`'s entry, if its PASID table exists.
    pub fn entry_gpa<M: GuestMemory + ?Sized>(
        &self,
        alloc: &TableAlloc<'_, M>,
        pasid: u32,
    ) -> Result<u64, BuildError> {
        let dgpa = self
            .table
            .dir_entry_gpa(pasid)
            .map_err(|_| BuildError::Invalid("PASID outside the directory"))?;
        let pde = alloc.read_u64(dgpa)?;
        if pde & vtd::PDE_P == 0 {
            return Err(BuildError::NoTable {
                va: u64::from(pasid),
                level: 0,
            });
        }
        let index = u64::from(pasid) & (vtd::PASID_TABLE_ENTRIES - 1);
        Ok((pde & vtd::PDE_TABLE_MASK) | (index * vtd::PASID_ENTRY_SIZE))
    }

    /// Writes `entry` as `pasid`'s PASID entry.
    pub fn set_entry<M: GuestMemory + ?Sized>(
        &self,
        alloc: &mut TableAlloc<'_, M>,
        pasid: u32,
        entry: &VtdPasidEntry,
    ) -> Result<(), BuildError> {
        self.write_raw(alloc, pasid, &entry.encode())
    }

    /// Writes a present first-stage entry for `pasid`: tables at `fs_root`,
    /// `levels` deep, domain `did`, controls `flags`.
    pub fn set_first_stage<M: GuestMemory + ?Sized>(
        &self,
        alloc: &mut TableAlloc<'_, M>,
        pasid: u32,
        fs_root: u64,
        levels: u8,
        did: u16,
        flags: Flags,
    ) -> Result<(), BuildError> {
        if levels != 4 && levels != 5 {
            return Err(BuildError::Invalid("IA-32e paging has 4 or 5 levels"));
        }
        self.set_entry(
            alloc,
            pasid,
            &VtdPasidEntry::first_stage(fs_root, levels, did, flags),
        )
    }

    /// Writes the raw qwords of `pasid`'s entry.
    pub fn write_raw<M: GuestMemory + ?Sized>(
        &self,
        alloc: &mut TableAlloc<'_, M>,
        pasid: u32,
        words: &[u64; 8],
    ) -> Result<(), BuildError> {
        let gpa = self.entry_slot(alloc, pasid)?;
        alloc.write_words(gpa, words)
    }

    /// Clears `pasid`'s entry (not present); nothing to do if its PASID
    /// table does not exist.
    pub fn clear_entry<M: GuestMemory + ?Sized>(
        &self,
        alloc: &mut TableAlloc<'_, M>,
        pasid: u32,
    ) -> Result<(), BuildError> {
        clear_64_byte_entry(alloc, self.entry_gpa(alloc, pasid))
    }

    /// Overwrites the directory entry covering `pasid` with `value`.
    pub fn set_dir_entry<M: GuestMemory + ?Sized>(
        &self,
        alloc: &TableAlloc<'_, M>,
        pasid: u32,
        value: u64,
    ) -> Result<(), BuildError> {
        let dgpa = self
            .table
            .dir_entry_gpa(pasid)
            .map_err(|_| BuildError::Invalid("PASID outside the directory"))?;
        alloc.write_u64(dgpa, value)
    }
}

/// Builds an SMMUv3 CD table, linear or 2-level.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CdTableBuilder {
    table: CdTable,
}

impl CdTableBuilder {
    /// An empty linear table of `1 << s1cdmax` CDs (S1DSS = SSID0).
    pub fn linear<M: GuestMemory + ?Sized>(
        alloc: &mut TableAlloc<'_, M>,
        s1cdmax: u32,
    ) -> Result<Self, BuildError> {
        Self::create(alloc, S1Fmt::Linear, s1cdmax)
    }

    /// An empty 2-level table (`fmt` 4 KiB or 64 KiB leaves) for
    /// `1 << s1cdmax` CDs (S1DSS = SSID0); leaf tables are allocated as CDs
    /// are set.
    pub fn two_level<M: GuestMemory + ?Sized>(
        alloc: &mut TableAlloc<'_, M>,
        s1cdmax: u32,
        fmt: S1Fmt,
    ) -> Result<Self, BuildError> {
        if fmt == S1Fmt::Linear {
            return Err(BuildError::Invalid("two_level needs a 2-level S1Fmt"));
        }
        Self::create(alloc, fmt, s1cdmax)
    }

    fn create<M: GuestMemory + ?Sized>(
        alloc: &mut TableAlloc<'_, M>,
        fmt: S1Fmt,
        s1cdmax: u32,
    ) -> Result<Self, BuildError> {
        let dss = S1Dss::Ssid0.raw();
        // Validate, then size the top table as the walker will align it.
        CdTable::new(0, fmt.raw(), s1cdmax, dss).map_err(BuildError::Config)?;
        let size = match fmt.split() {
            _ if s1cdmax == 0 => smmuv3::CD_SIZE,
            None => smmuv3::CD_SIZE << s1cdmax,
            Some(split) => (smmuv3::L1CD_SIZE << s1cdmax.saturating_sub(split)).max(64),
        };
        let ptr = alloc.alloc(size, size.max(64))?;
        let table = CdTable::new(ptr, fmt.raw(), s1cdmax, dss).map_err(BuildError::Config)?;
        Ok(CdTableBuilder { table })
    }

    /// The same table with S1DSS = `dss`.
    pub fn with_s1dss(self, dss: S1Dss) -> Self {
        CdTableBuilder {
            table: self.table.with_s1dss(dss),
        }
    }

    /// The table as the walker sees it.
    pub fn table(&self) -> CdTable {
        self.table
    }

    /// Guest-physical address of CD `ssid`, creating its leaf table (and
    /// L1CD) if there is none.
    pub fn cd_slot<M: GuestMemory + ?Sized>(
        &self,
        alloc: &mut TableAlloc<'_, M>,
        ssid: u32,
    ) -> Result<u64, BuildError> {
        if u64::from(ssid) >> self.table.s1cdmax() != 0 {
            return Err(BuildError::Invalid("SubstreamID outside the CD table"));
        }
        let (Some(split), Some(l1)) = (self.table.fmt().split(), self.table.l1_gpa(ssid)) else {
            // The CD array is aligned to its size, which ssid * 64 is below.
            return Ok(self.table.ptr() | (u64::from(ssid) * smmuv3::CD_SIZE));
        };
        if self.table.s1cdmax() == 0 {
            return Ok(self.table.ptr());
        }
        let d = alloc.read_u64(l1)?;
        let l2 = if d & smmuv3::L1CD_V != 0 {
            d & smmuv3::L1CD_L2PTR_MASK
        } else {
            let size = smmuv3::CD_SIZE << split;
            let l2 = alloc.alloc(size, size)?;
            alloc.write_u64(l1, l2 | smmuv3::L1CD_V)?;
            l2
        };
        let index = u64::from(ssid) & ((1u64 << split) - 1);
        // The leaf table is aligned to its size, which index * 64 is below.
        Ok(l2 | (index * smmuv3::CD_SIZE))
    }

    /// Guest-physical address of CD `ssid`, if its leaf table exists.
    pub fn cd_gpa<M: GuestMemory + ?Sized>(
        &self,
        alloc: &TableAlloc<'_, M>,
        ssid: u32,
    ) -> Result<u64, BuildError> {
        self.table
            .cd_gpa(alloc.mem(), ssid)
            .map_err(|_| BuildError::NoTable {
                va: u64::from(ssid),
                level: 0,
            })
    }

    /// Writes `cd` as CD `ssid`.
    pub fn set_cd<M: GuestMemory + ?Sized>(
        &self,
        alloc: &mut TableAlloc<'_, M>,
        ssid: u32,
        cd: &ContextDescriptor,
    ) -> Result<(), BuildError> {
        self.write_raw_cd(alloc, ssid, &cd.encode())
    }

    /// Writes a valid CD `ssid` for the TTB0 tables at `ttb0`.
    #[allow(clippy::too_many_arguments)]
    pub fn set_ttb0<M: GuestMemory + ?Sized>(
        &self,
        alloc: &mut TableAlloc<'_, M>,
        ssid: u32,
        ttb0: u64,
        t0sz: u8,
        tg0: u8,
        asid: u16,
        mair: u64,
    ) -> Result<(), BuildError> {
        self.set_cd(
            alloc,
            ssid,
            &ContextDescriptor::new(ttb0, t0sz, tg0, asid, mair),
        )
    }

    /// Writes the raw dwords of CD `ssid`.
    pub fn write_raw_cd<M: GuestMemory + ?Sized>(
        &self,
        alloc: &mut TableAlloc<'_, M>,
        ssid: u32,
        words: &[u64; 8],
    ) -> Result<(), BuildError> {
        let gpa = self.cd_slot(alloc, ssid)?;
        alloc.write_words(gpa, words)
    }

    /// Clears CD `ssid` (V = 0); nothing to do if its leaf table does not
    /// exist.
    pub fn clear_cd<M: GuestMemory + ?Sized>(
        &self,
        alloc: &mut TableAlloc<'_, M>,
        ssid: u32,
    ) -> Result<(), BuildError> {
        clear_64_byte_entry(alloc, self.cd_gpa(alloc, ssid))
    }

    /// Overwrites the L1CD covering `ssid` with `value` (2-level tables).
    pub fn set_l1<M: GuestMemory + ?Sized>(
        &self,
        alloc: &TableAlloc<'_, M>,
        ssid: u32,
        value: u64,
    ) -> Result<(), BuildError> {
        let l1 = self
            .table
            .l1_gpa(ssid)
            .ok_or(BuildError::Invalid("linear tables have no L1CD"))?;
        alloc.write_u64(l1, value)
    }
}

#[cfg(test)]
mod tests {
    use vm_memory::GuestMemoryMmap;

    use super::*;
    use crate::nested::{Stage1, WalkFaultKind};

    fn mem() -> GuestMemoryMmap<()> {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap()
    }

    #[test]
    fn alloc_aligns_zeroes_and_runs_out() {
        let m = mem();
        m.write_slice(&[0xff; 0x3000], GuestAddress(0x1000))
            .unwrap();
        let mut a = TableAlloc::new(&m, 0x1008, 0x4000);
        let p = a.alloc(0x1000, 0x1000).unwrap();
        assert_eq!(p, 0x2000);
        assert_eq!(a.read_u64(0x2ff8).unwrap(), 0);
        assert_eq!(a.read_u64(0x1ff8).unwrap(), u64::MAX); // skipped, untouched
        assert_eq!(a.alloc(0x40, 0x40).unwrap(), 0x3000);
        assert!(matches!(
            a.alloc(0x1000, 0x1000),
            Err(BuildError::OutOfSpace { .. })
        ));
        assert!(matches!(a.alloc(0x10, 3), Err(BuildError::Invalid(_))));
        let mut wrap = TableAlloc::new(&m, u64::MAX - 8, u64::MAX);
        assert!(matches!(
            wrap.alloc(0x10, 0x10),
            Err(BuildError::OutOfSpace { .. })
        ));
    }

    #[test]
    fn alloc_outside_ram_is_a_memory_error() {
        let m = mem();
        let mut a = TableAlloc::new(&m, 4 << 20, 8 << 20);
        assert_eq!(
            a.alloc(0x1000, 0x1000),
            Err(BuildError::Memory { gpa: 4 << 20 })
        );
    }

    #[test]
    fn x86_map_refuses_overlaps_and_bad_arguments() {
        let m = mem();
        let mut a = TableAlloc::new(&m, 0x10_0000, 4 << 20);
        let b = X86TableBuilder::new(&mut a, 4).unwrap();
        b.map(&mut a, 0x20_0000, 0x20_0000, 21, Perm::ALL).unwrap();
        assert_eq!(
            b.map(&mut a, 0x20_1000, 0x1000, 12, Perm::ALL),
            Err(BuildError::Conflict {
                va: 0x20_1000,
                level: 2
            })
        );
        assert_eq!(
            b.map(&mut a, 0x20_0000, 0x1000, 21, Perm::ALL),
            Err(BuildError::Invalid("address not aligned to the page size"))
        );
        assert!(b.map(&mut a, 0x1000, 0x1000, 13, Perm::ALL).is_err());
        assert!(b.map(&mut a, 0x8000_0000_0000, 0, 12, Perm::ALL).is_err());
        assert!(X86TableBuilder::new(&mut a, 3).is_err());
    }

    #[test]
    fn x86_clear_entry_makes_the_walk_fault_at_that_level() {
        let m = mem();
        let mut a = TableAlloc::new(&m, 0x10_0000, 4 << 20);
        let b = X86TableBuilder::new(&mut a, 4).unwrap();
        b.map(&mut a, 0x5000, 0x9000, 12, Perm::ALL).unwrap();
        b.clear_entry(&a, 0x5000, 2).unwrap();
        let s1 = Stage1::X86(b.config());
        assert_eq!(s1.walk_from_root(&m, 0x5000).unwrap_err().level, Some(2));
        assert!(matches!(
            b.entry_gpa(&a, 0x5000, 1),
            Err(BuildError::NoTable { .. })
        ));
    }

    #[test]
    fn arm_map_refuses_what_the_granule_cannot_map() {
        let m = mem();
        let mut a = TableAlloc::new(&m, 0x10_0000, 4 << 20);
        let b = ArmTableBuilder::new(&mut a, Granule::K4, 34).unwrap(); // start level 2
        assert!(b.map(&mut a, 0, 0, 30, Perm::ALL).is_err()); // 1 GiB above the start level
        assert!(b.map(&mut a, 0, 0, 16, Perm::ALL).is_err()); // not a 4 KiB size
        assert!(b.map(&mut a, 1 << 30, 0, 12, Perm::ALL).is_err()); // beyond T0SZ
        b.map(&mut a, 0x20_0000, 0x20_0000, 21, Perm::ALL).unwrap();
        assert_eq!(
            b.map(&mut a, 0x20_0000, 0x20_0000, 12, Perm::ALL),
            Err(BuildError::Conflict {
                va: 0x20_0000,
                level: 2
            })
        );
        assert!(ArmTableBuilder::new(&mut a, Granule::K64, 48).is_err());
    }

    #[test]
    fn arm_set_entry_edits_in_place() {
        let m = mem();
        let mut a = TableAlloc::new(&m, 0x10_0000, 4 << 20);
        let b = ArmTableBuilder::new(&mut a, Granule::K4, 25).unwrap();
        b.map(&mut a, 0x3000, 0x4000, 12, Perm::ALL).unwrap();
        let s1 = Stage1::Arm(b.config());
        assert_eq!(s1.walk_from_root(&m, 0x3000).unwrap().pa_base, 0x4000);
        b.set_entry(
            &a,
            0x3000,
            3,
            0x8000 | arm::leaf_attrs(Perm::ALL) | arm::DESC_TYPE_TABLE,
        )
        .unwrap();
        assert_eq!(s1.walk_from_root(&m, 0x3000).unwrap().pa_base, 0x8000);
        b.clear_entry(&a, 0x3000, 3).unwrap();
        assert_eq!(
            s1.walk_from_root(&m, 0x3000).unwrap_err().kind,
            WalkFaultKind::NotPresent
        );
    }

    #[test]
    fn pasid_directory_is_sized_by_pasid_bits() {
        let m = mem();
        let mut a = TableAlloc::new(&m, 0x10_0000, 4 << 20);
        let start = a.next_free();
        let t = VtdPasidTableBuilder::new(&mut a, 20).unwrap();
        assert_eq!(t.dir_ptr(), start);
        assert_eq!(a.next_free(), start + (1 << 14) * 8);
        let small = VtdPasidTableBuilder::new(&mut a, 4).unwrap();
        assert_eq!(a.next_free(), small.dir_ptr() + 4096);
        assert!(small
            .set_first_stage(&mut a, 16, 0x1000, 4, 1, Flags::default())
            .is_err());
        assert!(VtdPasidTableBuilder::new(&mut a, 21).is_err());
    }

    #[test]
    fn pasid_entries_share_their_pasid_table() {
        let m = mem();
        let mut a = TableAlloc::new(&m, 0x10_0000, 4 << 20);
        let t = VtdPasidTableBuilder::new(&mut a, 20).unwrap();
        t.set_first_stage(&mut a, 0x40, 0x1000, 4, 1, Flags::default())
            .unwrap();
        t.set_first_stage(&mut a, 0x7f, 0x2000, 4, 2, Flags::default())
            .unwrap();
        let g40 = t.entry_gpa(&a, 0x40).unwrap();
        let g7f = t.entry_gpa(&a, 0x7f).unwrap();
        assert_eq!(g7f - g40, 0x3f * 64);
        t.clear_entry(&mut a, 0x7f).unwrap();
        assert!(t.table().entry(&m, 0x40).is_ok());
        assert!(t.table().entry(&m, 0x7f).is_err());
        t.clear_entry(&mut a, 0x1_0000).unwrap(); // no table there: nothing to do
    }

    #[test]
    fn cd_builder_allocates_leaf_tables_on_demand() {
        let m = mem();
        let mut a = TableAlloc::new(&m, 0x10_0000, 4 << 20);
        let t = CdTableBuilder::two_level(&mut a, 8, S1Fmt::TwoLevel4K).unwrap();
        assert!(matches!(
            t.cd_gpa(&a, 0x81),
            Err(BuildError::NoTable { .. })
        ));
        t.set_ttb0(&mut a, 0x81, 0x5000, 16, smmuv3::TG0_4K, 3, 0)
            .unwrap();
        let gpa = t.cd_gpa(&a, 0x81).unwrap();
        assert_eq!(gpa & 0xfff, 64);
        t.set_l1(&a, 0x81, 0).unwrap();
        assert_eq!(
            t.table().resolve(&m, Some(0x81)).unwrap_err().kind,
            WalkFaultKind::CdL1Invalid { ssid: 0x81 }
        );
        assert!(CdTableBuilder::two_level(&mut a, 8, S1Fmt::Linear).is_err());
        assert!(CdTableBuilder::linear(&mut a, 21).is_err());
    }
}

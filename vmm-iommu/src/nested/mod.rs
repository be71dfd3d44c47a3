//! Guest stage-1 table formats and their walkers.
//!
//! The guest owns stage 1: an Intel VT-d scalable-mode PASID directory and
//! PASID table with IA-32e first-stage page tables under each entry
//! ([`vtd`], [`x86`]), or an Arm SMMUv3 Context Descriptor table with
//! AArch64 stage-1 tables under each CD ([`smmuv3`], [`arm`]). Stage 2 is the
//! identity here, so every pointer these structures hold is a guest-physical
//! address and is read as such.
//!
//! What this module owns: decoding those structures bit by bit, and walking
//! the page tables for one input address, as pure functions over a
//! [`TableMemory`]. What it must never do: write guest memory (the emulated
//! IOMMU observes the guest's tables, it does not maintain them; see the A/D
//! notes in [`x86`] and [`arm`]), panic on any table content, loop (every
//! walk reads at most [`MAX_WALK_READS`] entries), or allocate on the walk
//! path. [`build`] is the one exception to "never writes": it builds tables
//! on behalf of a guest, for tests, benchmarks and demos.
//!
//! One walk API serves both families ([`Stage1`]): a walk starts at
//! [`Stage1::root`] or at a [`WalkStart`] a paging-structure cache kept from
//! an earlier walk's [`TableStep`], and [`Stage1::check`] applies the
//! regime's permission rules to the [`Leaf`] it found. Faults are
//! [`WalkFault`]s, which know whether they may become a page request and
//! which virtio-iommu fault reason they map to.

pub mod arm;
pub mod build;
pub mod fault;
pub mod memory;
pub mod smmuv3;
pub mod vtd;
pub mod x86;

pub use fault::{Denied, FaultClass, Unsupported, WalkFault, WalkFaultKind};
pub use memory::TableMemory;

/// Output address size of the software nested IOMMU: what it advertises
/// in PROBE (OUTPUT_SIZE) and what every walker accepts. IA-32e / VT-d
/// first-stage entries reserve only bits 51:`OUTPUT_BITS` (none); AArch64
/// reaches it with the 64 KiB granule (FEAT_LPA), 48 bits otherwise.
pub const OUTPUT_BITS: u8 = 52;

/// Most page-table entries one walk reads: 5-level IA-32e paging. A walk
/// never revisits a level, so a guest cannot make one walk longer than this
/// however it links its tables (loops included).
pub const MAX_WALK_READS: usize = 5;

/// Permissions a translation grants, accumulated over every level of the
/// walk (an upper-level entry can only take permissions away).
///
/// `read` is always `true` for a leaf: neither IA-32e nor AArch64 stage-1
/// tables can describe a present mapping that a privileged request cannot
/// read. The privileged-execute and unprivileged-execute rights are kept
/// apart because AArch64 has separate PXN and UXN bits; for IA-32e they are
/// equal (XD).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Perm {
    /// Privileged reads.
    pub read: bool,
    /// Writes: IA-32e R/W set at every level; AArch64 `AP[2]` clear and no
    /// `APTable[1]` above.
    pub write: bool,
    /// Privileged instruction fetches are not disabled by the tables:
    /// IA-32e XD clear at every level; AArch64 PXN and PXNTable clear.
    pub exec: bool,
    /// Unprivileged (user) data access: IA-32e U/S set at every level;
    /// AArch64 `AP[1]` set and no `APTable[0]` above (which does not
    /// govern AArch64 unprivileged execute: `user_exec` does).
    pub user: bool,
    /// Unprivileged instruction fetches are not disabled by the tables:
    /// IA-32e XD clear at every level; AArch64 UXN and UXNTable clear.
    pub user_exec: bool,
}

impl Perm {
    /// Every permission: the state a walk starts with at the root.
    pub const ALL: Perm = Perm {
        read: true,
        write: true,
        exec: true,
        user: true,
        user_exec: true,
    };

    /// Readable and writable by privileged and unprivileged requests, not
    /// executable: what a DMA buffer mapping usually is.
    pub const RW_USER: Perm = Perm {
        read: true,
        write: true,
        exec: false,
        user: true,
        user_exec: false,
    };

    /// Read-only for privileged and unprivileged requests, not executable.
    pub const RO_USER: Perm = Perm {
        read: true,
        write: false,
        exec: false,
        user: true,
        user_exec: false,
    };

    /// The permissions both `self` and `other` grant.
    #[inline]
    pub const fn intersect(self, other: Perm) -> Perm {
        Perm {
            read: self.read && other.read,
            write: self.write && other.write,
            exec: self.exec && other.exec,
            user: self.user && other.user,
            user_exec: self.user_exec && other.user_exec,
        }
    }
}

/// One DMA access to check against a translation. Every access reads or
/// writes; `exec` marks an instruction fetch (a PCIe Execute-Requested
/// request, an SMMU InD transaction).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Access {
    /// A write (otherwise a read).
    pub write: bool,
    /// An instruction fetch.
    pub exec: bool,
    /// A privileged (supervisor / EL1) request.
    pub privileged: bool,
}

impl Access {
    /// An unprivileged read.
    pub const READ: Access = Access {
        write: false,
        exec: false,
        privileged: false,
    };
    /// An unprivileged write.
    pub const WRITE: Access = Access {
        write: true,
        exec: false,
        privileged: false,
    };
}

/// Where a walk starts: the root of a regime, or a point an earlier walk
/// reported through [`TableStep::next`] (a paging-structure cache entry).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct WalkStart {
    /// Guest-physical address of the table to read next.
    pub table: u64,
    /// Level of that table, in the format's own numbering: IA-32e counts
    /// down from 5 (PML5) or 4 (PML4) to 1 (page table); AArch64 counts up
    /// from the start level to 3.
    pub level: u8,
    /// Permissions the levels above have left.
    pub perm: Perm,
}

/// A non-leaf entry a walk read, reported so that a paging-structure cache
/// can remember where the walk went on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TableStep {
    /// Level of the entry read (the format's numbering, as in
    /// [`WalkStart::level`]).
    pub level: u8,
    /// `va >> va_shift`: the input-address bits that selected this path. Any
    /// input address with the same prefix goes through the same entry.
    pub va_prefix: u64,
    /// Log2 of the input range the entry covers.
    pub va_shift: u8,
    /// Where a walk for any address under this prefix resumes.
    pub next: WalkStart,
}

/// The translation a walk ends with: a page or block mapping.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Leaf {
    /// First input address the mapping covers (aligned to the page size).
    pub va_base: u64,
    /// Log2 of the page or block size.
    pub page_log2: u8,
    /// Guest-physical address `va_base` maps to (aligned to the page size).
    pub pa_base: u64,
    /// Permissions accumulated over the whole walk.
    pub perm: Perm,
}

impl Leaf {
    /// Bytes the mapping covers.
    #[inline]
    pub fn page_size(&self) -> u64 {
        1u64.checked_shl(u32::from(self.page_log2)).unwrap_or(0)
    }

    /// Whether `va` falls inside this mapping.
    #[inline]
    pub fn contains(&self, va: u64) -> bool {
        let shift = u32::from(self.page_log2);
        va.checked_shr(shift) == self.va_base.checked_shr(shift)
    }

    /// The guest-physical address of `va`, if this mapping covers it.
    #[inline]
    pub fn translate(&self, va: u64) -> Option<u64> {
        if !self.contains(va) {
            return None;
        }
        let offset = va.checked_sub(self.va_base)?;
        self.pa_base.checked_add(offset)
    }
}

/// The stage-1 translation regime of one (endpoint, PASID): which table
/// format, where its root is, and the controls the guest set for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage1 {
    /// IA-32e paging (VT-d first stage, or the direct x86-64 format).
    X86(x86::Config),
    /// AArch64 stage-1 translation (an SMMUv3 CD, or the direct Arm LPAE
    /// format).
    Arm(arm::Config),
}

impl Stage1 {
    /// Where a walk from the top of the tables starts.
    #[inline]
    pub fn root(&self) -> WalkStart {
        match self {
            Stage1::X86(c) => c.root_start(),
            Stage1::Arm(c) => c.root_start(),
        }
    }

    /// Walks from `start` (the [`root`](Self::root) or a resume point a
    /// paging-structure cache kept) to the leaf for `va`, calling `on_table`
    /// for every table entry it reads on the way. Reads at most
    /// [`MAX_WALK_READS`] entries and never writes.
    #[inline]
    pub fn walk<M: TableMemory + ?Sized>(
        &self,
        mem: &M,
        va: u64,
        start: WalkStart,
        on_table: &mut dyn FnMut(&TableStep),
    ) -> Result<Leaf, WalkFault> {
        match self {
            Stage1::X86(c) => c.walk(mem, va, start, on_table),
            Stage1::Arm(c) => c.walk(mem, va, start, on_table),
        }
    }

    /// Walks from the root without reporting table steps.
    #[inline]
    pub fn walk_from_root<M: TableMemory + ?Sized>(
        &self,
        mem: &M,
        va: u64,
    ) -> Result<Leaf, WalkFault> {
        self.walk(mem, va, self.root(), &mut |_| {})
    }

    /// Whether `leaf` permits `access` under this regime's rules: for VT-d
    /// the U/S, R/W and XD bits with SRE, WPE, ERE and SMEP; for Arm `AP[2:1]`,
    /// UXN/PXN and their table variants with PAN and WXN.
    #[inline]
    pub fn check(&self, leaf: &Leaf, access: Access) -> Result<(), WalkFault> {
        match self {
            Stage1::X86(c) => c.check(&leaf.perm, access),
            Stage1::Arm(c) => c.check(&leaf.perm, access),
        }
    }

    /// Walks from the root and checks `access`: a whole translation.
    pub fn translate<M: TableMemory + ?Sized>(
        &self,
        mem: &M,
        va: u64,
        access: Access,
    ) -> Result<Leaf, WalkFault> {
        let leaf = self.walk_from_root(mem, va)?;
        self.check(&leaf, access)?;
        Ok(leaf)
    }

    /// The ARCHID the guest uses to name this regime in invalidations: the
    /// VT-d domain ID of a PASID entry, or the Arm ASID. `None` for the
    /// direct x86-64 format, which has no tag.
    #[inline]
    pub fn archid(&self) -> Option<u64> {
        match self {
            Stage1::X86(c) => c.did().map(u64::from),
            Stage1::Arm(c) => Some(u64::from(c.asid())),
        }
    }

    /// The address the walk actually translates for `va`: with Arm top-byte
    /// ignore (TBI0) the tag byte is cleared, otherwise `va` itself. An
    /// IOTLB should key on this, since [`Leaf::va_base`] and
    /// [`TableStep::va_prefix`] are expressed in it.
    #[inline]
    pub fn untag(&self, va: u64) -> u64 {
        match self {
            Stage1::X86(_) => va,
            Stage1::Arm(c) => c.untag(va),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use proptest::prelude::*;
    use vm_memory::{GuestAddress, GuestMemoryMmap};

    use super::build::{ArmTableBuilder, CdTableBuilder, TableAlloc, X86TableBuilder};
    use super::*;

    /// Counts the entries a walk reads.
    struct Counting<'a, M: TableMemory + ?Sized> {
        inner: &'a M,
        reads: Cell<usize>,
    }

    impl<M: TableMemory + ?Sized> TableMemory for Counting<'_, M> {
        fn read_u64(&self, gpa: u64) -> Option<u64> {
            self.reads.set(self.reads.get() + 1);
            self.inner.read_u64(gpa)
        }
        fn read_bytes(&self, gpa: u64, buf: &mut [u8]) -> Option<()> {
            self.reads.set(self.reads.get() + 1);
            self.inner.read_bytes(gpa, buf)
        }
    }

    /// Guest memory whose every 8-byte word is random: a function of the
    /// seed and the address. `bias` steers the address bits of some words
    /// into "RAM" (below `ram`) so that walks go deep instead of stopping at
    /// the first pointer; addresses at or above `ram` are outside RAM.
    struct RandomMem {
        seed: u64,
        ram: u64,
        bias: u8,
    }

    fn splitmix(mut z: u64) -> u64 {
        z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    impl TableMemory for RandomMem {
        fn read_u64(&self, gpa: u64) -> Option<u64> {
            if gpa >= self.ram || gpa.checked_add(8)? > self.ram {
                return None;
            }
            let v = splitmix(self.seed ^ (gpa & !7));
            if (v & 0xff) < u64::from(self.bias) {
                // Keep the attribute bits, point the address into RAM.
                let addr_bits = 0x000f_ffff_ffff_f000u64;
                Some((v & !addr_bits) | (v & addr_bits & (self.ram - 1) & !0xfff))
            } else {
                Some(v)
            }
        }
        fn read_bytes(&self, gpa: u64, buf: &mut [u8]) -> Option<()> {
            for (i, chunk) in buf.chunks_mut(8).enumerate() {
                let off = u64::try_from(i).ok()?.checked_mul(8)?;
                let w = self.read_u64(gpa.checked_add(off)?)?.to_le_bytes();
                chunk.copy_from_slice(w.get(..chunk.len())?);
            }
            Some(())
        }
    }

    fn stage1_candidates(root: u64, sel: u8, t0sz: u8, flags: u8) -> Vec<Stage1> {
        let mut out = Vec::new();
        for levels in [4u8, 5] {
            if let Ok(c) = x86::Config::new(root, levels) {
                out.push(Stage1::X86(c.with_flags(x86::Flags {
                    sre: flags & 1 != 0,
                    wpe: flags & 2 != 0,
                    ere: flags & 4 != 0,
                    smep: flags & 8 != 0,
                })));
            }
        }
        let granule = match sel % 3 {
            0 => arm::Granule::K4,
            1 => arm::Granule::K16,
            _ => arm::Granule::K64,
        };
        if let Ok(c) = arm::Config::new(root, granule, t0sz) {
            out.push(Stage1::Arm(
                c.with_affd(flags & 1 != 0)
                    .with_tbi0(flags & 2 != 0)
                    .with_pan(flags & 4 != 0)
                    .with_wxn(flags & 8 != 0)
                    .with_epd1(flags & 16 != 0)
                    .with_ips(flags >> 5),
            ));
        }
        out
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// Random table contents never make a walker panic, loop, or read
        /// more than five entries, from the root or from any step it reported.
        #[test]
        fn random_tables_never_panic_and_read_at_most_five_entries(
            seed in any::<u64>(),
            root in any::<u64>(),
            va in any::<u64>(),
            bias in any::<u8>(),
            sel in any::<u8>(),
            t0sz in 0u8..64,
            flags in any::<u8>(),
            access in any::<(bool, bool, bool)>(),
            start_level in any::<u8>(),
        ) {
            let mem = RandomMem { seed, ram: 1 << 24, bias };
            let counting = Counting { inner: &mem, reads: Cell::new(0) };
            let root_in_ram = root & ((1 << 24) - 1);
            for s1 in stage1_candidates(root_in_ram, sel, t0sz, flags) {
                let mut steps = Vec::new();
                counting.reads.set(0);
                let res = s1.walk(&counting, va, s1.root(), &mut |s| steps.push(*s));
                prop_assert!(counting.reads.get() <= MAX_WALK_READS);
                if let Ok(leaf) = res {
                    let _ = s1.check(&leaf, Access { write: access.0, exec: access.1, privileged: access.2 });
                    prop_assert!(leaf.contains(s1.untag(va)));
                }
                for step in &steps {
                    counting.reads.set(0);
                    let again = s1.walk(&counting, va, step.next, &mut |_| {});
                    prop_assert!(counting.reads.get() <= MAX_WALK_READS);
                    // Memory does not change, so a resumed walk ends the same way.
                    prop_assert_eq!(again, res);
                }
                // An arbitrary resume point is either refused or walked within bounds.
                counting.reads.set(0);
                let bogus = WalkStart { table: root, level: start_level, perm: Perm::ALL };
                let _ = s1.walk(&counting, va, bogus, &mut |_| {});
                prop_assert!(counting.reads.get() <= MAX_WALK_READS);
            }
        }

        /// Random PASID directories/tables and CD tables never panic and read
        /// a bounded number of structures.
        #[test]
        fn random_pasid_and_cd_tables_never_panic(
            seed in any::<u64>(),
            ptr in any::<u64>(),
            bias in any::<u8>(),
            pasid_bits in any::<u8>(),
            pasid in any::<u32>(),
            s1fmt in any::<u8>(),
            s1cdmax in any::<u32>(),
            s1dss in any::<u8>(),
            ssid in proptest::option::of(any::<u32>()),
        ) {
            let mem = RandomMem { seed, ram: 1 << 24, bias };
            let counting = Counting { inner: &mem, reads: Cell::new(0) };
            let ptr = ptr & ((1 << 25) - 1);
            if let Ok(t) = vtd::PasidTable::new(ptr, pasid_bits) {
                let _ = t.stage1(&counting, pasid);
                prop_assert!(counting.reads.get() <= 2);
            }
            counting.reads.set(0);
            if let Ok(t) = smmuv3::CdTable::new(ptr, s1fmt, s1cdmax, s1dss) {
                let _ = t.resolve(&counting, ssid);
                prop_assert!(counting.reads.get() <= 2);
            }
        }

        /// On tables built with random mappings, a walk resumed from any
        /// reported step finds the same leaf as the full walk, and the leaf
        /// translates the address as mapped.
        #[test]
        fn resume_from_any_step_matches_full_walk(
            pages in proptest::collection::vec((0u64..1 << 20, 0u64..1 << 16, 0u8..3), 1..24),
            arm in any::<bool>(),
            five in any::<bool>(),
        ) {
            let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
            let mut alloc = TableAlloc::new(&mem, 0x10_0000, 16 << 20);
            let sizes = [12u8, 21, 30];
            let mut mapped = Vec::new();
            let s1 = if arm {
                let b = ArmTableBuilder::new(&mut alloc, arm::Granule::K4, 16).unwrap();
                for &(vpn, ppn, sz) in &pages {
                    let log2 = sizes[usize::from(sz)];
                    let va = (vpn << 12) & !((1u64 << log2) - 1);
                    let pa = (ppn << 12) & !((1u64 << log2) - 1);
                    if b.map(&mut alloc, va, pa, log2, Perm::RW_USER).is_ok() {
                        mapped.push((va, pa, log2));
                    }
                }
                Stage1::Arm(b.config())
            } else {
                let b = X86TableBuilder::new(&mut alloc, if five { 5 } else { 4 }).unwrap();
                for &(vpn, ppn, sz) in &pages {
                    let log2 = sizes[usize::from(sz)];
                    let va = (vpn << 12) & !((1u64 << log2) - 1);
                    let pa = (ppn << 12) & !((1u64 << log2) - 1);
                    if b.map(&mut alloc, va, pa, log2, Perm::RW_USER).is_ok() {
                        mapped.push((va, pa, log2));
                    }
                }
                Stage1::X86(b.config())
            };
            for (va, pa, log2) in mapped {
                let probe = va + ((1u64 << log2) - 1) / 3;
                let mut steps = Vec::new();
                let leaf = s1.walk(&mem, probe, s1.root(), &mut |s| steps.push(*s)).unwrap();
                prop_assert_eq!(leaf.translate(probe), Some(pa + (probe - va)));
                prop_assert_eq!(leaf.page_log2, log2);
                for step in steps {
                    prop_assert_eq!(step.va_prefix, probe >> step.va_shift);
                    prop_assert_eq!(s1.walk(&mem, probe, step.next, &mut |_| {}), Ok(leaf));
                }
            }
        }
    }

    #[test]
    fn stage1_archid_is_did_for_vtd_asid_for_arm_none_for_direct_x86() {
        let x = x86::Config::new(0x1000, 4).unwrap();
        assert_eq!(Stage1::X86(x).archid(), None);
        assert_eq!(Stage1::X86(x.with_did(7)).archid(), Some(7));
        let a = arm::Config::new(0x1000, arm::Granule::K4, 16)
            .unwrap()
            .with_asid(42);
        assert_eq!(Stage1::Arm(a).archid(), Some(42));
    }

    #[test]
    fn translate_walks_and_checks() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
        let mut alloc = TableAlloc::new(&mem, 0x10_0000, 4 << 20);
        let b = X86TableBuilder::new(&mut alloc, 4).unwrap();
        b.map(&mut alloc, 0x4000, 0x8000, 12, Perm::RO_USER)
            .unwrap();
        let s1 = Stage1::X86(b.config());
        let leaf = s1.translate(&mem, 0x4123, Access::READ).unwrap();
        assert_eq!(leaf.translate(0x4123), Some(0x8123));
        let err = s1.translate(&mem, 0x4123, Access::WRITE).unwrap_err();
        assert_eq!(err.kind, WalkFaultKind::Permission(Denied::Write));
    }

    #[test]
    fn leaf_contains_and_translate_respect_page_bounds() {
        let leaf = Leaf {
            va_base: 0x20_0000,
            page_log2: 21,
            pa_base: 0x4000_0000,
            perm: Perm::ALL,
        };
        assert!(leaf.contains(0x20_0000));
        assert!(leaf.contains(0x3f_ffff));
        assert!(!leaf.contains(0x40_0000));
        assert!(!leaf.contains(0x1f_ffff));
        assert_eq!(leaf.translate(0x20_1234), Some(0x4000_1234));
        assert_eq!(leaf.translate(0x40_0000), None);
        assert_eq!(leaf.page_size(), 0x20_0000);
    }

    #[test]
    fn cd_resolution_feeds_the_shared_walk() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
        let mut alloc = TableAlloc::new(&mem, 0x10_0000, 4 << 20);
        let pt = ArmTableBuilder::new(&mut alloc, arm::Granule::K4, 25).unwrap();
        pt.map(&mut alloc, 0x1000, 0x3000, 12, Perm::RW_USER)
            .unwrap();
        let cds = CdTableBuilder::linear(&mut alloc, 2).unwrap();
        let cd = smmuv3::ContextDescriptor::new(pt.root(), 25, smmuv3::TG0_4K, 9, 0);
        cds.set_cd(&mut alloc, 1, &cd).unwrap();
        let s1 = match cds.table().resolve(&mem, Some(1)).unwrap() {
            smmuv3::CdResolution::Translate { stage1, .. } => stage1,
            smmuv3::CdResolution::Bypass => panic!("expected a translation"),
        };
        assert_eq!(s1.archid(), Some(9));
        let leaf = s1.translate(&mem, 0x1010, Access::WRITE).unwrap();
        assert_eq!(leaf.translate(0x1010), Some(0x3010));
    }
}

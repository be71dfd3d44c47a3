//! IA-32e paging as the VT-d first stage uses it (4- and 5-level, 4 KiB,
//! 2 MiB and 1 GiB pages), for PASID traffic under a scalable-mode PASID
//! entry ([`crate::nested::vtd`]) and for non-PASID traffic through the
//! direct x86-64 table format (root pointer + depth).
//!
//! Bit positions follow the Intel SDM vol. 3 §4.5 (IA-32e paging) and the
//! VT-d spec §9.9 (first-stage paging entries), cross-checked against Linux
//! (`arch/x86/include/asm/pgtable_types.h`, `drivers/iommu/intel/iommu.h`)
//! and QEMU (`hw/i386/intel_iommu_internal.h`: `VTD_FS_*`,
//! `VTD_FPTE_*_RSVD_MASK`).
//!
//! Accessed/dirty flags: VT-d hardware sets A (and D on writes) in
//! first-stage entries as it walks. This emulated IOMMU never writes the
//! guest's tables, so it sets neither: a walk is a pure read of guest
//! memory, it cannot race the guest's own updates of an entry (an atomic
//! read-modify-write on memory the vCPUs write concurrently), and the
//! stale-cache behaviour the software IOMMU models stays deterministic.
//! Guests lose nothing for DMA mappings: Linux pre-sets A on every
//! first-stage leaf and D on writable ones (`DMA_FL_PTE_ACCESS`,
//! `DMA_FL_PTE_DIRTY`) exactly because it does not rely on the IOMMU doing
//! it. What is lost is page aging / dirty tracking of CPU tables shared for
//! SVA. EAFE (extended accessed flag) is accepted and likewise never set.
//!
//! Reserved bits are checked on present entries as the SDM lists them:
//! address bits at or above the output width, PS in PML5E/PML4E, and the
//! low address bits of 2 MiB/1 GiB pages (bits 20:13 / 29:13; bit 12 is
//! PAT). Bits 62:52 are ignored (protection keys are not used by VT-d);
//! bit 63 is XD.

use super::fault::{Denied, Unsupported, WalkFault, WalkFaultKind};
use super::memory::TableMemory;
use super::{Access, Leaf, Perm, TableStep, WalkStart};

/// Present.
// SDM 4.5 / pgtable_types.h: _PAGE_BIT_PRESENT 0; QEMU VTD_FS_P
pub const PTE_P: u64 = 1 << 0;
/// Read/write.
// pgtable_types.h: _PAGE_BIT_RW 1; QEMU VTD_FS_RW (1 << 1)
pub const PTE_RW: u64 = 1 << 1;
/// User/supervisor.
// pgtable_types.h: _PAGE_BIT_USER 2; QEMU VTD_FS_US (1 << 2); Linux DMA_FL_PTE_US BIT(2)
pub const PTE_US: u64 = 1 << 2;
/// Page-level write-through.
// pgtable_types.h: _PAGE_BIT_PWT 3
pub const PTE_PWT: u64 = 1 << 3;
/// Page-level cache disable.
// pgtable_types.h: _PAGE_BIT_PCD 4
pub const PTE_PCD: u64 = 1 << 4;
/// Accessed.
// pgtable_types.h: _PAGE_BIT_ACCESSED 5; QEMU VTD_FS_A (1 << 5); Linux DMA_FL_PTE_ACCESS BIT(5)
pub const PTE_A: u64 = 1 << 5;
/// Dirty (leaves).
// pgtable_types.h: _PAGE_BIT_DIRTY 6; QEMU VTD_FS_D (1 << 6); Linux DMA_FL_PTE_DIRTY BIT(6)
pub const PTE_D: u64 = 1 << 6;
/// Page size in PDPTE/PDE; PAT in a 4 KiB PTE; reserved in PML4E/PML5E.
// pgtable_types.h: _PAGE_BIT_PSE 7; QEMU VTD_FL_PT_PAGE_SIZE_MASK (1 << 7), VTD_FPTE_PAGE_L4_RSVD_MASK 0x80
pub const PTE_PS: u64 = 1 << 7;
/// Execute disable.
// pgtable_types.h: _PAGE_BIT_NX 63; Linux (until 6.11) DMA_FL_PTE_XD BIT_ULL(63)
pub const PTE_XD: u64 = 1 << 63;
/// Address bits of a table pointer or 4 KiB page: 51:12 (SDM 4.5, MAXPHYADDR ≤ 52).
// SDM 4.5 Tables 4-15..4-19: address bits (M-1):12, M = MAXPHYADDR ≤ 52; QEMU VTD_FS_UPPER_IGNORED 0xfff0000000000000
pub const PTE_ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;
/// Low address bits of a 2 MiB page that must be zero: 20:13.
// QEMU VTD_FPTE_LPAGE_L2_RSVD_MASK 0x1fe000
pub const PDE_2M_RSVD: u64 = 0x001f_e000;
/// Low address bits of a 1 GiB page that must be zero: 29:13.
// QEMU VTD_FPTE_LPAGE_L3_RSVD_MASK 0x3fffe000
pub const PDPTE_1G_RSVD: u64 = 0x3fff_e000;

/// Output address width a [`Config`] assumes unless told otherwise: the
/// software IOMMU's own ([`super::OUTPUT_BITS`], 52), which PROBE
/// advertises as OUTPUT_SIZE. The SDM (4.5, MAXPHYADDR) and VT-d (9.9,
/// HAW) reserve address bits 51:width only, so with 52 no address bit is
/// reserved.
pub const DEFAULT_OUTPUT_BITS: u8 = super::OUTPUT_BITS;

/// Bits each level translates.
const LEVEL_BITS: u32 = 9;
const PAGE_SHIFT: u32 = 12;

/// Controls a VT-d scalable-mode PASID entry (or the direct format) sets for
/// the first stage.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Flags {
    /// Supervisor Request Enable: privileged requests are allowed (SRE = 0
    /// refuses them).
    pub sre: bool,
    /// Write Protect Enable: privileged writes honour R/W (WPE = 0 lets
    /// supervisor requests write read-only pages, like CR0.WP = 0).
    pub wpe: bool,
    /// Execute Requests Enable (VT-d 3.x): execute requests are allowed
    /// (ERE = 0 refuses them). VT-d 4.x removed execute requests; a guest
    /// that never sets ERE never gets an instruction fetch through.
    pub ere: bool,
    /// Supervisor Mode Execute Prevention: privileged instruction fetches
    /// from user pages are refused.
    pub smep: bool,
}

impl Default for Flags {
    /// The direct x86-64 format's controls: privileged requests allowed,
    /// R/W honoured for them, execute requests allowed (XD still applies),
    /// no SMEP.
    fn default() -> Self {
        Flags {
            sre: true,
            wpe: true,
            ere: true,
            smep: false,
        }
    }
}

/// One IA-32e translation regime: root, depth, output width, controls and
/// the domain ID that tags it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Config {
    root: u64,
    levels: u8,
    output_bits: u8,
    flags: Flags,
    did: Option<u16>,
    /// Address bits at or above `output_bits` within 51:12, reserved in
    /// every entry.
    addr_rsvd: u64,
}

impl Config {
    /// A regime rooted at the PML4 (`levels` = 4) or PML5 (`levels` = 5)
    /// table at `root` (low 12 bits ignored), with [`DEFAULT_OUTPUT_BITS`],
    /// [`Flags::default`] and no domain ID.
    pub fn new(root: u64, levels: u8) -> Result<Self, WalkFault> {
        if levels != 4 && levels != 5 {
            return Err(WalkFault::new(WalkFaultKind::UnsupportedConfig(
                Unsupported::Levels(levels),
            )));
        }
        Ok(Config {
            root: root & !0xfff,
            levels,
            output_bits: DEFAULT_OUTPUT_BITS,
            flags: Flags::default(),
            did: None,
            addr_rsvd: addr_rsvd_mask(DEFAULT_OUTPUT_BITS),
        })
    }

    /// The same regime with other controls.
    pub fn with_flags(mut self, flags: Flags) -> Self {
        self.flags = flags;
        self
    }

    /// The same regime tagged with a VT-d domain ID (its ARCHID).
    pub fn with_did(mut self, did: u16) -> Self {
        self.did = Some(did);
        self
    }

    /// The same regime with an output address width of `bits` (32..=52):
    /// address bits at or above it are reserved in every entry.
    pub fn with_output_bits(mut self, bits: u8) -> Result<Self, WalkFault> {
        if !(32..=52).contains(&bits) {
            return Err(WalkFault::new(WalkFaultKind::UnsupportedConfig(
                Unsupported::OutputBits(bits),
            )));
        }
        self.output_bits = bits;
        self.addr_rsvd = addr_rsvd_mask(bits);
        Ok(self)
    }

    /// Guest-physical address of the top-level table.
    pub fn root(&self) -> u64 {
        self.root
    }

    /// Paging depth, 4 or 5.
    pub fn levels(&self) -> u8 {
        self.levels
    }

    /// Input address width: 48 (4-level) or 57 (5-level).
    pub fn va_bits(&self) -> u8 {
        if self.levels == 5 {
            57
        } else {
            48
        }
    }

    /// Output address width.
    pub fn output_bits(&self) -> u8 {
        self.output_bits
    }

    /// The controls.
    pub fn flags(&self) -> Flags {
        self.flags
    }

    /// The VT-d domain ID, if the regime comes from a PASID entry.
    pub fn did(&self) -> Option<u16> {
        self.did
    }

    /// Where a walk from the top starts.
    #[inline]
    pub fn root_start(&self) -> WalkStart {
        WalkStart {
            table: self.root,
            level: self.levels,
            perm: Perm::ALL,
        }
    }

    /// Walks from `start` to the leaf mapping `va`. See [`super::Stage1::walk`].
    pub fn walk<M: TableMemory + ?Sized>(
        &self,
        mem: &M,
        va: u64,
        start: WalkStart,
        on_table: &mut dyn FnMut(&TableStep),
    ) -> Result<Leaf, WalkFault> {
        // SDM 4.5: "linear addresses ... must be canonical"; VT-d 3.6: a
        // non-canonical input address to first-stage translation faults.
        let sign_shift = u32::from(self.va_bits()) - 1;
        let sign = (va as i64) >> sign_shift;
        if sign != 0 && sign != -1 {
            return Err(WalkFault::new(WalkFaultKind::NonCanonical { va }));
        }
        if start.level == 0 || start.level > self.levels {
            return Err(WalkFault::new(WalkFaultKind::InvalidStart));
        }
        // Only the low 12 bits are dropped: a root or cached pointer with
        // bits above 51 is read as it is, and faults as outside RAM.
        let mut table = start.table & !0xfff;
        // Permissions accumulate as entry bits: R/W and U/S ANDed over the
        // levels, XD ORed; a `Perm` is only built where one is handed out.
        let mut and_bits = perm_to_and_bits(start.perm);
        let mut xd = if start.perm.exec { 0 } else { PTE_XD };
        // Bounded: one entry per level, from start.level (≤ 5) down to 1.
        for level in (1..=start.level).rev() {
            let shift = PAGE_SHIFT + LEVEL_BITS * u32::from(level - 1);
            let index = (va >> shift) & 0x1ff;
            // `table` is 4 KiB-aligned, so this cannot carry into its bits.
            let gpa = table | (index << 3);
            let Some(pte) = mem.read_u64(gpa) else {
                return Err(WalkFault::at(WalkFaultKind::TableOutsideRam { gpa }, level));
            };
            if pte & PTE_P == 0 {
                return Err(WalkFault::at(WalkFaultKind::NotPresent, level));
            }
            let is_leaf = level == 1 || (level <= 3 && pte & PTE_PS != 0);
            let rsvd = pte & self.reserved_mask(level, is_leaf);
            if rsvd != 0 {
                return Err(WalkFault::at(
                    WalkFaultKind::ReservedBits { bits: rsvd },
                    level,
                ));
            }
            and_bits &= pte;
            xd |= pte & PTE_XD;
            if is_leaf {
                let page_mask = (1u64 << shift) - 1;
                return Ok(Leaf {
                    va_base: va & !page_mask,
                    // shift ≤ 30 at a leaf; fits in u8.
                    page_log2: shift as u8,
                    pa_base: pte & PTE_ADDR_MASK & !page_mask,
                    perm: bits_to_perm(and_bits, xd),
                });
            }
            let next = WalkStart {
                table: pte & PTE_ADDR_MASK,
                level: level - 1,
                perm: bits_to_perm(and_bits, xd),
            };
            on_table(&TableStep {
                level,
                va_prefix: va >> shift,
                va_shift: shift as u8,
                next,
            });
            table = next.table;
        }
        // Unreachable: level 1 always returns above. Kept as a fault rather
        // than a panic.
        Err(WalkFault::new(WalkFaultKind::InvalidStart))
    }

    /// Reserved bits of a present entry at `level`.
    #[inline]
    fn reserved_mask(&self, level: u8, is_leaf: bool) -> u64 {
        let mut mask = self.addr_rsvd;
        match (level, is_leaf) {
            // SDM Table 4-14/4-15: PS is reserved (must be 0) in PML5E and
            // PML4E. QEMU: VTD_FPTE_PAGE_L4_RSVD_MASK includes 0x80.
            (4 | 5, _) => mask |= PTE_PS,
            // SDM Table 4-16: PDPTE mapping a 1 GiB page, bits 29:13.
            (3, true) => mask |= PDPTE_1G_RSVD,
            // SDM Table 4-18: PDE mapping a 2 MiB page, bits 20:13.
            (2, true) => mask |= PDE_2M_RSVD,
            _ => {}
        }
        mask
    }

    /// Whether `perm` permits `access` under the first-stage rules (VT-d
    /// §3.6.1 "Access Rights"):
    /// - privileged: refused when SRE = 0; writes need R/W when WPE = 1;
    ///   instruction fetches need ERE, XD clear, and (SMEP) a supervisor page;
    /// - unprivileged: need U/S at every level; writes need R/W; instruction
    ///   fetches need ERE and XD clear.
    pub fn check(&self, perm: &Perm, access: Access) -> Result<(), WalkFault> {
        let deny = |d| Err(WalkFault::new(WalkFaultKind::Permission(d)));
        if access.privileged {
            if !self.flags.sre {
                return deny(Denied::SupervisorRequest);
            }
            if access.write && self.flags.wpe && !perm.write {
                return deny(Denied::Write);
            }
            if access.exec {
                if !self.flags.ere {
                    return deny(Denied::ExecuteRequest);
                }
                if !perm.exec || (self.flags.smep && perm.user) {
                    return deny(Denied::Execute);
                }
            }
        } else {
            if !perm.user {
                return deny(Denied::User);
            }
            if access.write && !perm.write {
                return deny(Denied::Write);
            }
            if access.exec {
                if !self.flags.ere {
                    return deny(Denied::ExecuteRequest);
                }
                if !perm.user_exec {
                    return deny(Denied::Execute);
                }
            }
        }
        Ok(())
    }
}

/// Bits 51:`bits` of an entry: address bits beyond the output width.
const fn addr_rsvd_mask(bits: u8) -> u64 {
    // bits ∈ 32..=52 (checked by the callers), so the shift is in range.
    PTE_ADDR_MASK & !((1u64 << bits) - 1)
}

/// The R/W and U/S bits a walk starting with `perm` has left.
#[inline]
fn perm_to_and_bits(perm: Perm) -> u64 {
    (if perm.write { PTE_RW } else { 0 }) | (if perm.user { PTE_US } else { 0 })
}

/// The permissions accumulated entry bits grant: R/W and U/S set at every
/// level (`and_bits`), XD set at none (`xd`).
#[inline]
fn bits_to_perm(and_bits: u64, xd: u64) -> Perm {
    let exec = xd == 0;
    Perm {
        read: true,
        write: and_bits & PTE_RW != 0,
        exec,
        user: and_bits & PTE_US != 0,
        user_exec: exec,
    }
}

/// Leaf flags for `perm` as a guest driver would write them: P, A, and D on
/// writable pages (Linux sets A/D itself: `DMA_FL_PTE_ACCESS`,
/// `DMA_FL_PTE_DIRTY`), R/W for `write`, U/S for `user`, XD unless `exec`.
/// `perm.read` cannot be expressed and is ignored.
pub fn leaf_flags(perm: Perm) -> u64 {
    let mut f = PTE_P | PTE_A;
    if perm.write {
        f |= PTE_RW | PTE_D;
    }
    if perm.user {
        f |= PTE_US;
    }
    if !perm.exec {
        f |= PTE_XD;
    }
    f
}

/// Flags of a non-leaf entry that takes no permission away.
pub const TABLE_FLAGS: u64 = PTE_P | PTE_RW | PTE_US | PTE_A;

#[cfg(test)]
mod tests {
    use vm_memory::{GuestAddress, GuestMemoryMmap};

    use super::*;
    use crate::nested::build::{TableAlloc, X86TableBuilder};

    const RAM: u64 = 8 << 20;

    fn mem() -> GuestMemoryMmap<()> {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), RAM as usize)]).unwrap()
    }

    fn setup(
        mem: &GuestMemoryMmap<()>,
        levels: u8,
    ) -> (TableAlloc<'_, GuestMemoryMmap<()>>, X86TableBuilder) {
        let mut alloc = TableAlloc::new(mem, 0x10_0000, RAM);
        let b = X86TableBuilder::new(&mut alloc, levels).unwrap();
        (alloc, b)
    }

    fn walk(c: &Config, mem: &GuestMemoryMmap<()>, va: u64) -> Result<Leaf, WalkFault> {
        c.walk(mem, va, c.root_start(), &mut |_| {})
    }

    #[test]
    fn four_level_4k_page_translates() {
        let m = mem();
        let (mut a, b) = setup(&m, 4);
        b.map(&mut a, 0x7f12_3456_7000, 0x3000, 12, Perm::RW_USER)
            .unwrap();
        let leaf = walk(&b.config(), &m, 0x7f12_3456_7abc).unwrap();
        assert_eq!(leaf.va_base, 0x7f12_3456_7000);
        assert_eq!(leaf.pa_base, 0x3000);
        assert_eq!(leaf.page_log2, 12);
        assert_eq!(leaf.translate(0x7f12_3456_7abc), Some(0x3abc));
        assert!(leaf.perm.write && leaf.perm.user && !leaf.perm.exec);
    }

    #[test]
    fn four_level_2m_page_translates() {
        let m = mem();
        let (mut a, b) = setup(&m, 4);
        b.map(&mut a, 0x4020_0000, 0x60_0000, 21, Perm::RW_USER)
            .unwrap();
        let leaf = walk(&b.config(), &m, 0x4021_2345).unwrap();
        assert_eq!(leaf.page_log2, 21);
        assert_eq!(leaf.translate(0x4021_2345), Some(0x61_2345));
    }

    #[test]
    fn four_level_1g_page_translates() {
        let m = mem();
        let (mut a, b) = setup(&m, 4);
        b.map(&mut a, 0x80_4000_0000, 0x4000_0000, 30, Perm::RW_USER)
            .unwrap();
        let leaf = walk(&b.config(), &m, 0x80_7fff_fff0).unwrap();
        assert_eq!(leaf.page_log2, 30);
        assert_eq!(leaf.pa_base, 0x4000_0000);
        assert_eq!(leaf.translate(0x80_7fff_fff0), Some(0x7fff_fff0));
    }

    #[test]
    fn five_level_4k_page_above_48_bits_translates() {
        let m = mem();
        let (mut a, b) = setup(&m, 5);
        let va = 0x00ab_cdef_1234_5000;
        b.map(&mut a, va, 0x5000, 12, Perm::RW_USER).unwrap();
        let c = b.config();
        assert_eq!(c.va_bits(), 57);
        let leaf = walk(&c, &m, va + 8).unwrap();
        assert_eq!(leaf.translate(va + 8), Some(0x5008));
    }

    #[test]
    fn five_level_2m_and_1g_pages_translate() {
        let m = mem();
        let (mut a, b) = setup(&m, 5);
        b.map(&mut a, 0x00f0_0000_0020_0000, 0x20_0000, 21, Perm::RW_USER)
            .unwrap();
        b.map(
            &mut a,
            0x00f0_0000_4000_0000,
            0x4000_0000,
            30,
            Perm::RW_USER,
        )
        .unwrap();
        let c = b.config();
        assert_eq!(walk(&c, &m, 0x00f0_0000_0020_0010).unwrap().page_log2, 21);
        assert_eq!(walk(&c, &m, 0x00f0_0000_4000_0010).unwrap().page_log2, 30);
    }

    #[test]
    fn negative_canonical_address_translates() {
        let m = mem();
        let (mut a, b) = setup(&m, 4);
        let va = 0xffff_8000_0000_1000;
        b.map(&mut a, va, 0x9000, 12, Perm::RW_USER).unwrap();
        assert_eq!(walk(&b.config(), &m, va).unwrap().pa_base, 0x9000);
    }

    #[test]
    fn not_present_at_each_level_reports_the_level() {
        let m = mem();
        let (mut a, b) = setup(&m, 4);
        let va = 0x1234_5678_9000;
        b.map(&mut a, va, 0x1000, 12, Perm::RW_USER).unwrap();
        let c = b.config();
        for level in 1..=4u8 {
            let gpa = b.entry_gpa(&a, va, level).unwrap();
            let saved = a.read_u64(gpa).unwrap();
            a.write_u64(gpa, saved & !PTE_P).unwrap();
            let err = walk(&c, &m, va).unwrap_err();
            assert_eq!(err, WalkFault::at(WalkFaultKind::NotPresent, level));
            assert!(err.page_request_eligible());
            a.write_u64(gpa, saved).unwrap();
        }
        assert!(walk(&c, &m, va).is_ok());
    }

    #[test]
    fn ps_in_pml4e_is_reserved() {
        let m = mem();
        let (mut a, b) = setup(&m, 4);
        b.map(&mut a, 0x1000, 0x1000, 12, Perm::RW_USER).unwrap();
        let gpa = b.entry_gpa(&a, 0x1000, 4).unwrap();
        let e = a.read_u64(gpa).unwrap();
        a.write_u64(gpa, e | PTE_PS).unwrap();
        assert_eq!(
            walk(&b.config(), &m, 0x1000),
            Err(WalkFault::at(
                WalkFaultKind::ReservedBits { bits: PTE_PS },
                4
            ))
        );
    }

    #[test]
    fn ps_in_pml5e_is_reserved() {
        let m = mem();
        let (mut a, b) = setup(&m, 5);
        b.map(&mut a, 0x1000, 0x1000, 12, Perm::RW_USER).unwrap();
        let gpa = b.entry_gpa(&a, 0x1000, 5).unwrap();
        let e = a.read_u64(gpa).unwrap();
        a.write_u64(gpa, e | PTE_PS).unwrap();
        assert_eq!(
            walk(&b.config(), &m, 0x1000),
            Err(WalkFault::at(
                WalkFaultKind::ReservedBits { bits: PTE_PS },
                5
            ))
        );
    }

    #[test]
    fn address_bits_above_the_output_width_are_reserved() {
        let m = mem();
        let (mut a, b) = setup(&m, 4);
        b.map(&mut a, 0x1000, 0x1000, 12, Perm::RW_USER).unwrap();
        let c = b.config().with_output_bits(39).unwrap();
        let gpa = b.entry_gpa(&a, 0x1000, 1).unwrap();
        let e = a.read_u64(gpa).unwrap();
        a.write_u64(gpa, e | (1 << 40)).unwrap();
        assert_eq!(
            walk(&c, &m, 0x1000),
            Err(WalkFault::at(
                WalkFaultKind::ReservedBits { bits: 1 << 40 },
                1
            ))
        );
        // Within a 48-bit width the same bit is an address (outside RAM is
        // only a problem for tables, not for the page itself).
        assert_eq!(
            walk(&b.config(), &m, 0x1000).unwrap().pa_base,
            0x100_0000_1000
        );
    }

    #[test]
    fn table_pointer_above_the_output_width_is_reserved() {
        let m = mem();
        let (mut a, b) = setup(&m, 4);
        b.map(&mut a, 0x1000, 0x1000, 12, Perm::RW_USER).unwrap();
        let gpa = b.entry_gpa(&a, 0x1000, 3).unwrap();
        let e = a.read_u64(gpa).unwrap();
        a.write_u64(gpa, e | (1 << 51)).unwrap();
        let c48 = b.config().with_output_bits(48).unwrap();
        assert_eq!(
            walk(&c48, &m, 0x1000),
            Err(WalkFault::at(
                WalkFaultKind::ReservedBits { bits: 1 << 51 },
                3
            ))
        );
    }

    #[test]
    fn issue10_first_stage_output_bits_51_48_are_addresses_at_the_advertised_output_size() {
        // SDM 4.5 / VT-d 9.9: only address bits 51:HAW are reserved. The
        // software IOMMU advertises OUTPUT_SIZE 52, so none are: a leaf
        // with bits 51:48 set translates, through the direct format and a
        // PASID entry alike. Entries hand-encoded from the SDM: P bit 0,
        // R/W 1, U/S 2, A 5, D 6; address bits 51:12.
        use vm_memory::Bytes;
        assert_eq!(DEFAULT_OUTPUT_BITS, crate::nested::OUTPUT_BITS);
        assert_eq!(crate::nested::OUTPUT_BITS, 52);
        let m = mem();
        let flags = 0b110_0111u64;
        let pa = 0x000f_8000_0000_3000u64;
        for (gpa, v) in [
            (0x1_0000u64, 0x1_1000 | flags),
            (0x1_1000, 0x1_2000 | flags),
            (0x1_2000, 0x1_3000 | flags),
            (0x1_3000 + 8, pa | flags),
        ] {
            m.write_obj(v, GuestAddress(gpa)).unwrap();
        }
        let c = Config::new(0x1_0000, 4).unwrap();
        assert_eq!(c.output_bits(), 52);
        let leaf = walk(&c, &m, 0x1123).unwrap();
        assert_eq!(leaf.translate(0x1123), Some(0x000f_8000_0000_3123));
        let vtd = crate::nested::vtd::VtdPasidEntry::first_stage(0x1_0000, 4, 7, Flags::default());
        let s1 = vtd.stage1().unwrap();
        assert_eq!(s1.walk_from_root(&m, 0x1123), Ok(leaf));
        // A narrower host width still reserves them.
        assert!(matches!(
            walk(&c.with_output_bits(48).unwrap(), &m, 0x1123),
            Err(WalkFault {
                kind: WalkFaultKind::ReservedBits { .. },
                level: Some(1)
            })
        ));
    }

    #[test]
    fn low_address_bits_of_large_pages_are_reserved() {
        let m = mem();
        let (mut a, b) = setup(&m, 4);
        b.map(&mut a, 0x20_0000, 0x20_0000, 21, Perm::RW_USER)
            .unwrap();
        b.map(&mut a, 0x4000_0000, 0x4000_0000, 30, Perm::RW_USER)
            .unwrap();
        let c = b.config();
        let pde = b.entry_gpa(&a, 0x20_0000, 2).unwrap();
        let e = a.read_u64(pde).unwrap();
        a.write_u64(pde, e | (1 << 13)).unwrap();
        assert_eq!(
            walk(&c, &m, 0x20_0000),
            Err(WalkFault::at(
                WalkFaultKind::ReservedBits { bits: 1 << 13 },
                2
            ))
        );
        let pdpte = b.entry_gpa(&a, 0x4000_0000, 3).unwrap();
        let e = a.read_u64(pdpte).unwrap();
        a.write_u64(pdpte, e | (1 << 29)).unwrap();
        assert_eq!(
            walk(&c, &m, 0x4000_0000),
            Err(WalkFault::at(
                WalkFaultKind::ReservedBits { bits: 1 << 29 },
                3
            ))
        );
    }

    #[test]
    fn pat_bit_of_large_pages_and_4k_pat_are_not_reserved() {
        let m = mem();
        let (mut a, b) = setup(&m, 4);
        b.map(&mut a, 0x20_0000, 0x20_0000, 21, Perm::RW_USER)
            .unwrap();
        b.map(&mut a, 0x1000, 0x1000, 12, Perm::RW_USER).unwrap();
        let pde = b.entry_gpa(&a, 0x20_0000, 2).unwrap();
        let e = a.read_u64(pde).unwrap();
        a.write_u64(pde, e | (1 << 12)).unwrap(); // PAT of a 2 MiB page
        let pte = b.entry_gpa(&a, 0x1000, 1).unwrap();
        let e = a.read_u64(pte).unwrap();
        a.write_u64(pte, e | PTE_PS | (0x7ff << 52)).unwrap(); // PAT, ignored bits
        let c = b.config();
        assert_eq!(walk(&c, &m, 0x20_0000).unwrap().pa_base, 0x20_0000);
        assert_eq!(walk(&c, &m, 0x1000).unwrap().pa_base, 0x1000);
    }

    #[test]
    fn non_canonical_address_faults_before_any_read() {
        let m = mem();
        let (_a, b) = setup(&m, 4);
        let c = b.config();
        for va in [
            0x0000_8000_0000_0000u64,
            0xfff0_0000_0000_0000,
            0x8000_0000_0000_0000,
        ] {
            assert_eq!(
                walk(&c, &m, va),
                Err(WalkFault::new(WalkFaultKind::NonCanonical { va }))
            );
        }
        let (_a5, b5) = setup(&m, 5);
        let va = 0x0100_0000_0000_0000u64;
        assert_eq!(
            walk(&b5.config(), &m, va),
            Err(WalkFault::new(WalkFaultKind::NonCanonical { va }))
        );
        // Canonical for 5 levels, not for 4.
        assert!(matches!(
            walk(&b5.config(), &m, 0x00ff_0000_0000_0000),
            Err(WalkFault {
                kind: WalkFaultKind::NotPresent,
                ..
            })
        ));
    }

    #[test]
    fn table_pointer_outside_ram_faults_with_the_address() {
        let m = mem();
        let (mut a, b) = setup(&m, 4);
        b.map(&mut a, 0x1000, 0x1000, 12, Perm::RW_USER).unwrap();
        let gpa = b.entry_gpa(&a, 0x1000, 2).unwrap();
        a.write_u64(gpa, 0x40_0000_0000 | TABLE_FLAGS).unwrap();
        assert_eq!(
            walk(&b.config(), &m, 0x1000),
            Err(WalkFault::at(
                WalkFaultKind::TableOutsideRam {
                    gpa: 0x40_0000_0008
                },
                1
            ))
        );
        let root_outside = Config::new(1 << 40, 4).unwrap();
        assert_eq!(
            walk(&root_outside, &m, 0),
            Err(WalkFault::at(
                WalkFaultKind::TableOutsideRam { gpa: 1 << 40 },
                4
            ))
        );
    }

    #[test]
    fn permissions_accumulate_over_levels() {
        let m = mem();
        let (mut a, b) = setup(&m, 4);
        b.map(&mut a, 0x1000, 0x1000, 12, Perm::ALL).unwrap();
        let gpa = b.entry_gpa(&a, 0x1000, 3).unwrap();
        let e = a.read_u64(gpa).unwrap();
        a.write_u64(gpa, (e & !PTE_RW & !PTE_US) | PTE_XD).unwrap();
        let leaf = walk(&b.config(), &m, 0x1000).unwrap();
        assert_eq!(
            leaf.perm,
            Perm {
                read: true,
                write: false,
                exec: false,
                user: false,
                user_exec: false
            }
        );
    }

    fn check(flags: Flags, perm: Perm, access: Access) -> Result<(), Denied> {
        Config::new(0, 4)
            .unwrap()
            .with_flags(flags)
            .check(&perm, access)
            .map_err(|f| match f.kind {
                WalkFaultKind::Permission(d) => d,
                other => panic!("unexpected {other:?}"),
            })
    }

    const SUP: Access = Access {
        write: false,
        exec: false,
        privileged: true,
    };
    const SUP_W: Access = Access {
        write: true,
        exec: false,
        privileged: true,
    };
    const SUP_X: Access = Access {
        write: false,
        exec: true,
        privileged: true,
    };
    const USR_X: Access = Access {
        write: false,
        exec: true,
        privileged: false,
    };
    const SUPERVISOR_RW: Perm = Perm {
        read: true,
        write: true,
        exec: true,
        user: false,
        user_exec: true,
    };

    #[test]
    fn user_request_to_supervisor_page_is_denied() {
        assert_eq!(
            check(Flags::default(), SUPERVISOR_RW, Access::READ),
            Err(Denied::User)
        );
        assert_eq!(check(Flags::default(), SUPERVISOR_RW, SUP), Ok(()));
    }

    #[test]
    fn user_write_to_read_only_page_is_denied() {
        assert_eq!(check(Flags::default(), Perm::RO_USER, Access::READ), Ok(()));
        assert_eq!(
            check(Flags::default(), Perm::RO_USER, Access::WRITE),
            Err(Denied::Write)
        );
    }

    #[test]
    fn supervisor_write_to_read_only_page_follows_wpe() {
        let wpe = Flags {
            wpe: true,
            ..Flags::default()
        };
        let no_wpe = Flags {
            wpe: false,
            ..Flags::default()
        };
        assert_eq!(check(wpe, Perm::RO_USER, SUP_W), Err(Denied::Write));
        assert_eq!(check(no_wpe, Perm::RO_USER, SUP_W), Ok(()));
    }

    #[test]
    fn supervisor_request_needs_sre() {
        let no_sre = Flags {
            sre: false,
            ..Flags::default()
        };
        assert_eq!(
            check(no_sre, Perm::ALL, SUP),
            Err(Denied::SupervisorRequest)
        );
        assert_eq!(check(no_sre, Perm::ALL, Access::READ), Ok(()));
    }

    #[test]
    fn execute_needs_ere_and_xd_clear() {
        let no_ere = Flags {
            ere: false,
            ..Flags::default()
        };
        assert_eq!(check(no_ere, Perm::ALL, USR_X), Err(Denied::ExecuteRequest));
        assert_eq!(check(no_ere, Perm::ALL, SUP_X), Err(Denied::ExecuteRequest));
        assert_eq!(check(Flags::default(), Perm::ALL, USR_X), Ok(()));
        assert_eq!(
            check(Flags::default(), Perm::RW_USER, USR_X),
            Err(Denied::Execute)
        );
        assert_eq!(
            check(Flags::default(), Perm::RW_USER, SUP_X),
            Err(Denied::Execute)
        );
    }

    #[test]
    fn smep_refuses_supervisor_fetch_from_user_page() {
        let smep = Flags {
            smep: true,
            ..Flags::default()
        };
        assert_eq!(check(smep, Perm::ALL, SUP_X), Err(Denied::Execute));
        assert_eq!(check(smep, SUPERVISOR_RW, SUP_X), Ok(()));
        assert_eq!(check(smep, Perm::ALL, USR_X), Ok(()));
    }

    #[test]
    fn walk_reports_every_table_step_and_resumes_from_each() {
        let m = mem();
        let (mut a, b) = setup(&m, 5);
        let va = 0x0012_3456_789a_b000;
        b.map(&mut a, va, 0x7000, 12, Perm::RW_USER).unwrap();
        let c = b.config();
        let mut steps = Vec::new();
        let full = c
            .walk(&m, va, c.root_start(), &mut |s| steps.push(*s))
            .unwrap();
        assert_eq!(steps.len(), 4);
        let levels: Vec<u8> = steps.iter().map(|s| s.level).collect();
        assert_eq!(levels, [5, 4, 3, 2]);
        let shifts: Vec<u8> = steps.iter().map(|s| s.va_shift).collect();
        assert_eq!(shifts, [48, 39, 30, 21]);
        for s in &steps {
            assert_eq!(s.va_prefix, va >> s.va_shift);
            assert_eq!(s.next.level, s.level - 1);
            let mut inner = 0;
            let resumed = c.walk(&m, va, s.next, &mut |_| inner += 1).unwrap();
            assert_eq!(resumed, full);
            assert_eq!(inner, usize::from(s.next.level) - 1);
        }
    }

    #[test]
    fn resume_point_keeps_upper_level_permissions() {
        let m = mem();
        let (mut a, b) = setup(&m, 4);
        b.map(&mut a, 0x1000, 0x1000, 12, Perm::RW_USER).unwrap();
        let gpa = b.entry_gpa(&a, 0x1000, 4).unwrap();
        let e = a.read_u64(gpa).unwrap();
        a.write_u64(gpa, e & !PTE_RW).unwrap();
        let c = b.config();
        let mut steps = Vec::new();
        c.walk(&m, 0x1000, c.root_start(), &mut |s| steps.push(*s))
            .unwrap();
        let last = steps.last().unwrap();
        assert!(!last.next.perm.write);
        assert!(
            !c.walk(&m, 0x1000, last.next, &mut |_| {})
                .unwrap()
                .perm
                .write
        );
    }

    #[test]
    fn resume_at_a_level_the_regime_lacks_is_refused() {
        let m = mem();
        let (_a, b) = setup(&m, 4);
        let c = b.config();
        for level in [0u8, 5, 6, 255] {
            let start = WalkStart {
                table: c.root(),
                level,
                perm: Perm::ALL,
            };
            assert_eq!(
                c.walk(&m, 0, start, &mut |_| {}),
                Err(WalkFault::new(WalkFaultKind::InvalidStart))
            );
        }
    }

    #[test]
    fn config_refuses_unsupported_depths_and_widths() {
        for levels in [0u8, 2, 3, 6] {
            assert_eq!(
                Config::new(0, levels),
                Err(WalkFault::new(WalkFaultKind::UnsupportedConfig(
                    Unsupported::Levels(levels)
                )))
            );
        }
        let c = Config::new(0, 4).unwrap();
        assert!(c.with_output_bits(31).is_err());
        assert!(c.with_output_bits(53).is_err());
        assert_eq!(c.with_output_bits(52).unwrap().output_bits(), 52);
    }

    #[test]
    fn leaf_flags_match_linux_first_level_mappings() {
        assert_eq!(
            leaf_flags(Perm::RW_USER),
            PTE_P | PTE_A | PTE_RW | PTE_D | PTE_US | PTE_XD
        );
        assert_eq!(leaf_flags(Perm::RO_USER), PTE_P | PTE_A | PTE_US | PTE_XD);
        assert_eq!(
            leaf_flags(Perm::ALL),
            PTE_P | PTE_A | PTE_RW | PTE_D | PTE_US
        );
    }
}

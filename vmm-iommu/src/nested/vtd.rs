//! Intel VT-d scalable-mode PASID structures: the PASID directory and the
//! PASID tables under it, and the 64-byte scalable-mode PASID entry that
//! names a first-stage (IA-32e) table, its paging mode, domain ID and
//! access controls.
//!
//! Lookup (VT-d spec §3.4.3, Linux `drivers/iommu/intel/pasid.h`):
//! `PASID[19:6]` indexes the directory of 8-byte entries, whose bits 63:12
//! point at a 4 KiB PASID table; `PASID[5:0]` indexes that table's 64-byte
//! entries. The directory holds `1 << (pasid_bits - 6)` entries (at least
//! one); a PASID at or above `1 << pasid_bits` is refused before any read.
//!
//! Only first-stage translation (PGTT = 0b001) is accepted: stage 2 is the
//! identity in this device, so second-stage-only and nested entries have
//! nothing to translate with, and pass-through is not something a guest of
//! the nested extension may ask for per PASID. They fault as
//! [`Unsupported::Pgtt`].
//!
//! Bit positions are from the VT-d spec's "Scalable-Mode PASID Table Entry"
//! (§9.6), as Linux `pasid.h` programs them and QEMU
//! `hw/i386/intel_iommu_internal.h` decodes them.
//!
//! **One decoder for every backend.** [`decode_dir_entry`] and
//! [`VtdPasidEntry::validate`] (or [`VtdPasidEntry::validate_bytes`]) are the
//! only readers of these structures: the software IOMMU walks through them,
//! and a backend that shadows the guest's table into a host IOMMU (the vfio
//! iommufd backend) decodes each entry with them too, so the same guest
//! table gets the same verdict — accepted, not present, reserved bits set
//! (a [`FaultClass::Reserved`](super::fault::FaultClass::Reserved)), or a
//! translation type or paging mode this device does not implement
//! ([`FaultClass::Unsupported`](super::fault::FaultClass::Unsupported)) —
//! wherever it is bound. What a backend adds on top is only what its host
//! lacks (a 5-level table on a unit without FL5LP, say).

use super::fault::{Unsupported, WalkFault, WalkFaultKind};
use super::memory::TableMemory;
use super::x86::{self, Flags};
use super::Stage1;

/// Bytes in a PASID directory entry.
// pasid.h: struct pasid_dir_entry { u64 val; }
pub const DIR_ENTRY_SIZE: u64 = 8;
/// Bytes in a scalable-mode PASID entry.
// pasid.h: struct pasid_entry { u64 val[8]; }
pub const PASID_ENTRY_SIZE: u64 = 64;
/// PASID bits a PASID table resolves.
// pasid.h: PASID_PDE_SHIFT 6
pub const PASID_TABLE_SHIFT: u32 = 6;
/// Entries in a PASID table.
// pasid.h: PASID_TBL_ENTRIES BIT(PASID_PDE_SHIFT)
pub const PASID_TABLE_ENTRIES: u64 = 1 << PASID_TABLE_SHIFT;
/// Widest PASID.
// pasid.h: MAX_NR_PASID_BITS 20
pub const MAX_PASID_BITS: u8 = 20;

/// Directory entry: present.
// pasid.h: PASID_PTE_PRESENT 1 (pasid_pde_is_present)
pub const PDE_P: u64 = 1 << 0;
/// Directory entry: fault processing disable.
// pasid.h: PASID_PTE_FPD 2
pub const PDE_FPD: u64 = 1 << 1;
/// Directory entry: PASID table pointer, bits 63:12.
// pasid.h: PDE_PFN_MASK PAGE_MASK
pub const PDE_TABLE_MASK: u64 = !0xfff;
/// Directory entry: reserved bits 11:2 (VT-d §9.5).
// VT-d §9.5 Scalable-Mode PASID Directory Entry: P 0, FPD 1, bits 11:2 reserved, SMPTBLPTR 63:12
pub const PDE_RSVD: u64 = 0xffc;

/// qword 0 bit 0: present.
// pasid.h: pasid_set_present val[0] bit 0; QEMU VTD_PASID_ENTRY_P
pub const PE0_P: u64 = 1 << 0;
/// qword 0 bit 1: fault processing disable.
// pasid.h: PASID_PTE_FPD; QEMU VTD_PASID_ENTRY_FPD (1 << 1)
pub const PE0_FPD: u64 = 1 << 1;
/// qword 0 bits 8:6: PASID granular translation type.
// pasid.h: pasid_set_translation_type GENMASK_ULL(8, 6); QEMU VTD_SM_PASID_ENTRY_PGTT (7 << 6)
pub const PE0_PGTT_SHIFT: u32 = 6;
/// qword 0 bits 11:10: reserved (bits 4:2 AW, 5 SSEE, 9 SSADE and 63:12
/// SSPTPTR only matter for second-stage PGTTs and are ignored here).
// VT-d §9.6 Scalable-Mode PASID Table Entry: bits 11:10 reserved (after SSADE 9, before SSPTPTR 63:12)
pub const PE0_RSVD: u64 = 0xc00;
/// PGTT: first-stage only.
// pasid.h: PASID_ENTRY_PGTT_FL_ONLY 1
pub const PGTT_FIRST_STAGE: u8 = 1;
/// PGTT: second-stage only.
// pasid.h: PASID_ENTRY_PGTT_SL_ONLY 2
pub const PGTT_SECOND_STAGE: u8 = 2;
/// PGTT: nested.
// pasid.h: PASID_ENTRY_PGTT_NESTED 3
pub const PGTT_NESTED: u8 = 3;
/// PGTT: pass-through.
// pasid.h: PASID_ENTRY_PGTT_PT 4
pub const PGTT_PASS_THROUGH: u8 = 4;

/// qword 1 bits 15:0: domain ID.
// pasid.h: pasid_set_domain_id val[1] GENMASK_ULL(15, 0); QEMU VTD_SM_PASID_ENTRY_DID
pub const PE1_DID_MASK: u64 = 0xffff;
/// qword 1 bits 22:16 (entry bits 86:80): reserved.
// VT-d §9.6: bits 86:80 reserved (DID 79:64, PWSNP 87, PGSNP 88)
pub const PE1_RSVD: u64 = 0x007f_0000;
/// qword 1 bit 23 (entry bit 87): page-walk snoop.
// pasid.h: pasid_set_page_snoop val[1] bit 23
pub const PE1_PWSNP: u64 = 1 << 23;
/// qword 1 bit 24 (entry bit 88): page snoop.
// pasid.h: pasid_set_pgsnp val[1] bit 24
pub const PE1_PGSNP: u64 = 1 << 24;

/// qword 2 bit 0 (entry bit 128): supervisor request enable.
// pasid.h: pasid_set_sre val[2] bit 0; QEMU VTD_SM_PASID_ENTRY_SRE_BIT
pub const PE2_SRE: u64 = 1 << 0;
/// qword 2 bit 1 (entry bit 129): execute requests enable (VT-d 3.x; VT-d
/// 4.x removed execute requests).
// VT-d 3.x §9.6: bit 129 ERE (between SRE 128 and FSPM 131:130)
pub const PE2_ERE: u64 = 1 << 1;
/// qword 2 bits 3:2 (entry bits 131:130): first-stage paging mode, 0 =
/// 4-level, 1 = 5-level.
// pasid.h: pasid_set_flpm GENMASK_ULL(3, 2); QEMU VTD_SM_PASID_ENTRY_FSPM extract64(val[2], 2, 2)
pub const PE2_FSPM_SHIFT: u32 = 2;
/// qword 2 bit 4 (entry bit 132): write protect enable.
// pasid.h: pasid_set_wpe val[2] bit 4; QEMU VTD_SM_PASID_ENTRY_WPE_BIT
pub const PE2_WPE: u64 = 1 << 4;
/// qword 2 bit 5 (entry bit 133): no-execute enable. Deprecated with execute
/// requests; accepted and ignored (XD is always honoured here).
// Linux (until 6.11) pasid_set_nxe val[2] bit 5
pub const PE2_NXE: u64 = 1 << 5;
/// qword 2 bit 6 (entry bit 134): supervisor mode execute prevention (VT-d 3.x).
// VT-d 3.x §9.6: bit 134 SMEP (after NXE 133, before EAFE 135)
pub const PE2_SMEP: u64 = 1 << 6;
/// qword 2 bit 7 (entry bit 135): extended accessed flag enable.
// pasid.h: pasid_set_eafe val[2] bit 7; QEMU VTD_SM_PASID_ENTRY_EAFE_BIT
pub const PE2_EAFE: u64 = 1 << 7;
/// qword 2 bits 11:8 (entry bits 139:136): reserved.
// VT-d §9.6: bits 139:136 reserved (after EAFE 135, before FSPTPTR 191:140)
pub const PE2_RSVD: u64 = 0xf00;
/// qword 2 bits 63:12 (entry bits 191:140): first-stage page-table pointer.
// pasid.h: pasid_set_flptr val[2] VTD_PAGE_MASK; QEMU VTD_SM_PASID_ENTRY_FSPTPTR (~0xfff)
pub const PE2_FSPTPTR_MASK: u64 = !0xfff;
/// FSPTPTR bits above the 52-bit address space: reserved.
// VT-d §9.6: FSPTPTR bits above the host address width are reserved; this device's is at most 52
pub const PE2_FSPTPTR_RSVD: u64 = 0xfff0_0000_0000_0000;

/// A decoded scalable-mode PASID entry.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct VtdPasidEntry {
    /// P: the entry is present.
    pub present: bool,
    /// FPD: faults through this entry are not reported.
    pub fpd: bool,
    /// PGTT, 3 bits.
    pub pgtt: u8,
    /// DID: the domain ID tagging this entry's translations (its ARCHID).
    pub did: u16,
    /// PWSNP: page walks snoop.
    pub pwsnp: bool,
    /// PGSNP: page accesses snoop.
    pub pgsnp: bool,
    /// SRE: supervisor requests enabled.
    pub sre: bool,
    /// ERE: execute requests enabled (VT-d 3.x).
    pub ere: bool,
    /// FSPM, 2 bits: 0 = 4-level, 1 = 5-level.
    pub fspm: u8,
    /// WPE: supervisor writes honour R/W.
    pub wpe: bool,
    /// NXE (deprecated; XD is honoured regardless).
    pub nxe: bool,
    /// SMEP (VT-d 3.x).
    pub smep: bool,
    /// EAFE: extended accessed flag enabled (never set by this device).
    pub eafe: bool,
    /// FSPTPTR: guest-physical address of the first-stage root (4 KiB aligned).
    pub fsptptr: u64,
}

impl VtdPasidEntry {
    /// A present first-stage entry for the table at `fs_root`.
    pub fn first_stage(fs_root: u64, levels: u8, did: u16, flags: Flags) -> Self {
        VtdPasidEntry {
            present: true,
            pgtt: PGTT_FIRST_STAGE,
            did,
            fspm: if levels == 5 { 1 } else { 0 },
            sre: flags.sre,
            wpe: flags.wpe,
            ere: flags.ere,
            smep: flags.smep,
            fsptptr: fs_root & PE2_FSPTPTR_MASK,
            ..VtdPasidEntry::default()
        }
    }

    /// Decodes the eight little-endian qwords of an entry (no validation:
    /// see [`validate`](Self::validate)).
    pub fn decode(words: &[u64; 8]) -> Self {
        let [w0, w1, w2, ..] = *words;
        VtdPasidEntry {
            present: w0 & PE0_P != 0,
            fpd: w0 & PE0_FPD != 0,
            pgtt: ((w0 >> PE0_PGTT_SHIFT) & 7) as u8,
            did: (w1 & PE1_DID_MASK) as u16,
            pwsnp: w1 & PE1_PWSNP != 0,
            pgsnp: w1 & PE1_PGSNP != 0,
            sre: w2 & PE2_SRE != 0,
            ere: w2 & PE2_ERE != 0,
            fspm: ((w2 >> PE2_FSPM_SHIFT) & 3) as u8,
            wpe: w2 & PE2_WPE != 0,
            nxe: w2 & PE2_NXE != 0,
            smep: w2 & PE2_SMEP != 0,
            eafe: w2 & PE2_EAFE != 0,
            fsptptr: w2 & PE2_FSPTPTR_MASK,
        }
    }

    /// Encodes the entry as eight qwords (fields this type does not model
    /// are zero).
    pub fn encode(&self) -> [u64; 8] {
        let bit = |b: bool, v: u64| if b { v } else { 0 };
        let w0 = bit(self.present, PE0_P)
            | bit(self.fpd, PE0_FPD)
            | (u64::from(self.pgtt & 7) << PE0_PGTT_SHIFT);
        let w1 = u64::from(self.did) | bit(self.pwsnp, PE1_PWSNP) | bit(self.pgsnp, PE1_PGSNP);
        let w2 = bit(self.sre, PE2_SRE)
            | bit(self.ere, PE2_ERE)
            | (u64::from(self.fspm & 3) << PE2_FSPM_SHIFT)
            | bit(self.wpe, PE2_WPE)
            | bit(self.nxe, PE2_NXE)
            | bit(self.smep, PE2_SMEP)
            | bit(self.eafe, PE2_EAFE)
            | (self.fsptptr & PE2_FSPTPTR_MASK);
        [w0, w1, w2, 0, 0, 0, 0, 0]
    }

    /// Checks the 64 bytes of an entry as they sit in guest memory
    /// (little-endian qwords): [`validate`](Self::validate) of
    /// [`entry_words`]`(bytes)`.
    pub fn validate_bytes(pasid: u32, bytes: &[u8; 64]) -> Result<Self, WalkFault> {
        Self::validate(pasid, &entry_words(bytes))
    }

    /// Checks a raw entry for PASID `pasid`: present, no reserved bit set,
    /// first-stage PGTT, 4- or 5-level FSPM. The order of the checks is the
    /// verdict every backend gives: not present first (a non-present entry
    /// may hold anything), then reserved bits, then PGTT, then FSPM.
    pub fn validate(pasid: u32, words: &[u64; 8]) -> Result<Self, WalkFault> {
        let e = Self::decode(words);
        if !e.present {
            return Err(WalkFault::new(WalkFaultKind::PasidEntryNotPresent {
                pasid,
            }));
        }
        let rsvd = [
            words[0] & PE0_RSVD,
            words[1] & PE1_RSVD,
            words[2] & (PE2_RSVD | PE2_FSPTPTR_RSVD),
            // qwords 3..=7 (entry bits 511:192) are reserved.
            words[3],
            words[4],
            words[5],
            words[6],
            words[7],
        ];
        for (qword, bits) in (0u8..).zip(rsvd) {
            if bits != 0 {
                return Err(WalkFault::new(WalkFaultKind::PasidEntryReserved {
                    pasid,
                    qword,
                    bits,
                }));
            }
        }
        if e.pgtt != PGTT_FIRST_STAGE {
            return Err(WalkFault::new(WalkFaultKind::UnsupportedPasidEntry {
                pasid,
                what: Unsupported::Pgtt(e.pgtt),
            }));
        }
        if e.fspm > 1 {
            return Err(WalkFault::new(WalkFaultKind::UnsupportedPasidEntry {
                pasid,
                what: Unsupported::PagingMode(e.fspm),
            }));
        }
        Ok(e)
    }

    /// First-stage paging depth: 4 or 5.
    pub fn levels(&self) -> u8 {
        if self.fspm == 1 {
            5
        } else {
            4
        }
    }

    /// The first-stage regime this entry selects, tagged with its DID.
    pub fn stage1(&self) -> Result<Stage1, WalkFault> {
        let c = x86::Config::new(self.fsptptr, self.levels())?
            .with_did(self.did)
            .with_flags(Flags {
                sre: self.sre,
                wpe: self.wpe,
                ere: self.ere,
                smep: self.smep,
            });
        Ok(Stage1::X86(c))
    }
}

/// The eight little-endian qwords of a 64-byte PASID entry.
pub fn entry_words(bytes: &[u8; 64]) -> [u64; 8] {
    let mut words = [0u64; 8];
    for (w, chunk) in words.iter_mut().zip(bytes.chunks_exact(8)) {
        let mut b = [0u8; 8];
        b.copy_from_slice(chunk);
        *w = u64::from_le_bytes(b);
    }
    words
}

/// Decodes the PASID directory entry `pde` that covers `pasid`: the
/// guest-physical address of its PASID table, or the fault every backend
/// gives it — [`WalkFaultKind::PasidDirNotPresent`] for P = 0 (whatever
/// the other bits hold), [`WalkFaultKind::PasidDirReserved`] for bits 11:2.
pub fn decode_dir_entry(pasid: u32, pde: u64) -> Result<u64, WalkFault> {
    if pde & PDE_P == 0 {
        return Err(WalkFault::new(WalkFaultKind::PasidDirNotPresent { pasid }));
    }
    if pde & PDE_RSVD != 0 {
        return Err(WalkFault::new(WalkFaultKind::PasidDirReserved {
            pasid,
            bits: pde & PDE_RSVD,
        }));
    }
    Ok(pde & PDE_TABLE_MASK)
}

/// A scalable-mode PASID directory as an ATTACH_TABLE (PSTF_INTEL_VTD)
/// binds it: pointer and PASID width.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PasidTable {
    dir: u64,
    pasid_bits: u8,
}

impl PasidTable {
    /// The directory at `dir_ptr` (low 12 bits ignored) for PASIDs below
    /// `1 << pasid_bits` (1..=20).
    pub fn new(dir_ptr: u64, pasid_bits: u8) -> Result<Self, WalkFault> {
        if pasid_bits == 0 || pasid_bits > MAX_PASID_BITS {
            return Err(WalkFault::new(WalkFaultKind::UnsupportedConfig(
                Unsupported::PasidBits(pasid_bits),
            )));
        }
        Ok(PasidTable {
            dir: dir_ptr & !0xfff,
            pasid_bits,
        })
    }

    /// Guest-physical address of the directory.
    pub fn dir_ptr(&self) -> u64 {
        self.dir
    }

    /// PASID width.
    pub fn pasid_bits(&self) -> u8 {
        self.pasid_bits
    }

    /// Guest-physical address of the directory entry for `pasid`.
    pub fn dir_entry_gpa(&self, pasid: u32) -> Result<u64, WalkFault> {
        self.check_range(pasid)?;
        let index = u64::from(pasid >> PASID_TABLE_SHIFT);
        // index < 2^14 and dir < 2^64 - 2^12: a wrap means outside RAM.
        self.dir
            .checked_add(index * DIR_ENTRY_SIZE)
            .ok_or(WalkFault::new(WalkFaultKind::TableOutsideRam {
                gpa: self.dir,
            }))
    }

    fn check_range(&self, pasid: u32) -> Result<(), WalkFault> {
        if u64::from(pasid) >> self.pasid_bits != 0 {
            return Err(WalkFault::new(WalkFaultKind::PasidOutOfRange { pasid }));
        }
        Ok(())
    }

    /// Guest-physical address of the PASID entry for `pasid`, read through
    /// its directory entry.
    pub fn entry_gpa<M: TableMemory + ?Sized>(
        &self,
        mem: &M,
        pasid: u32,
    ) -> Result<u64, WalkFault> {
        let gpa = self.dir_entry_gpa(pasid)?;
        let pde = mem
            .read_u64(gpa)
            .ok_or(WalkFault::new(WalkFaultKind::TableOutsideRam { gpa }))?;
        let table = decode_dir_entry(pasid, pde)?;
        let index = u64::from(pasid) & (PASID_TABLE_ENTRIES - 1);
        // The table is 4 KiB aligned and index * 64 < 4 KiB: no carry.
        Ok(table | (index * PASID_ENTRY_SIZE))
    }

    /// Reads, checks and decodes the PASID entry for `pasid`.
    pub fn entry<M: TableMemory + ?Sized>(
        &self,
        mem: &M,
        pasid: u32,
    ) -> Result<VtdPasidEntry, WalkFault> {
        let gpa = self.entry_gpa(mem, pasid)?;
        let mut bytes = [0u8; PASID_ENTRY_SIZE as usize];
        mem.read_bytes(gpa, &mut bytes)
            .ok_or(WalkFault::new(WalkFaultKind::TableOutsideRam { gpa }))?;
        VtdPasidEntry::validate_bytes(pasid, &bytes)
    }

    /// The first-stage regime of `pasid`.
    pub fn stage1<M: TableMemory + ?Sized>(
        &self,
        mem: &M,
        pasid: u32,
    ) -> Result<Stage1, WalkFault> {
        self.entry(mem, pasid)?.stage1()
    }
}

/// Reads the scalable-mode PASID entry of `pasid` from the directory at
/// `pasid_dir_ptr` for a `pasid_bits`-wide PASID space.
pub fn pasid_entry<M: TableMemory + ?Sized>(
    mem: &M,
    pasid_dir_ptr: u64,
    pasid_bits: u8,
    pasid: u32,
) -> Result<VtdPasidEntry, WalkFault> {
    PasidTable::new(pasid_dir_ptr, pasid_bits)?.entry(mem, pasid)
}

#[cfg(test)]
mod tests {
    use vm_memory::{GuestAddress, GuestMemoryMmap};

    use super::*;
    use crate::nested::build::{TableAlloc, VtdPasidTableBuilder, X86TableBuilder};
    use crate::nested::{Access, Perm};

    const RAM: u64 = 8 << 20;

    fn mem() -> GuestMemoryMmap<()> {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), RAM as usize)]).unwrap()
    }

    fn fault(kind: WalkFaultKind) -> Result<VtdPasidEntry, WalkFault> {
        Err(WalkFault::new(kind))
    }

    #[test]
    fn entry_decodes_every_field() {
        let m = mem();
        let mut a = TableAlloc::new(&m, 0x10_0000, RAM);
        let t = VtdPasidTableBuilder::new(&mut a, 20).unwrap();
        let e = VtdPasidEntry {
            present: true,
            fpd: true,
            pgtt: PGTT_FIRST_STAGE,
            did: 0xbeef,
            pwsnp: true,
            pgsnp: true,
            sre: true,
            ere: true,
            fspm: 1,
            wpe: true,
            nxe: true,
            smep: true,
            eafe: true,
            fsptptr: 0x7_6543_2000,
        };
        t.set_entry(&mut a, 0x12345, &e).unwrap();
        assert_eq!(t.table().entry(&m, 0x12345), Ok(e));
        assert_eq!(pasid_entry(&m, t.dir_ptr(), 20, 0x12345), Ok(e));
    }

    #[test]
    fn issue11_directory_entry_decoder_checks_present_before_reserved_bits() {
        // VT-d §9.5: P bit 0, FPD bit 1, bits 11:2 reserved, table 63:12.
        assert_eq!(decode_dir_entry(7, 0x5000 | 1), Ok(0x5000));
        assert_eq!(decode_dir_entry(7, 0x5000 | 0b11), Ok(0x5000));
        assert_eq!(
            decode_dir_entry(7, 0x5000 | 1 << 11 | 1),
            Err(WalkFault::new(WalkFaultKind::PasidDirReserved {
                pasid: 7,
                bits: 1 << 11
            }))
        );
        assert_eq!(
            decode_dir_entry(7, 0x5000 | 0xffc),
            Err(WalkFault::new(WalkFaultKind::PasidDirNotPresent {
                pasid: 7
            }))
        );
    }

    #[test]
    fn issue11_validate_bytes_reads_little_endian_qwords() {
        // Hand-encoded bytes: qword 0 = P | PGTT 1 (0x41), qword 1 = DID
        // 0x1234, qword 2 = FSPTPTR 0x7000 | FSPM 1 (bit 2).
        let mut b = [0u8; 64];
        b[0] = 0x41;
        b[8] = 0x34;
        b[9] = 0x12;
        b[16] = 0x04;
        b[17] = 0x70;
        let e = VtdPasidEntry::validate_bytes(3, &b).unwrap();
        assert_eq!((e.did, e.fsptptr, e.levels()), (0x1234, 0x7000, 5));
        b[63] = 0x80;
        assert_eq!(
            VtdPasidEntry::validate_bytes(3, &b),
            fault(WalkFaultKind::PasidEntryReserved {
                pasid: 3,
                qword: 7,
                bits: 1 << 63
            })
        );
    }

    #[test]
    fn encode_matches_linux_bit_positions() {
        let e = VtdPasidEntry::first_stage(
            0x1234_5000,
            5,
            7,
            Flags {
                sre: true,
                wpe: true,
                ere: false,
                smep: false,
            },
        );
        let w = e.encode();
        // pasid_set_present | pasid_set_translation_type(FL_ONLY << 6)
        assert_eq!(w[0], 1 | (1 << 6));
        // pasid_set_domain_id
        assert_eq!(w[1], 7);
        // pasid_set_sre | pasid_set_flpm(1 << 2) | pasid_set_wpe | pasid_set_flptr
        assert_eq!(w[2], 1 | (1 << 2) | (1 << 4) | 0x1234_5000);
        assert_eq!(VtdPasidEntry::decode(&w), e);
    }

    #[test]
    fn pasid_beyond_pasid_bits_is_refused_before_reading() {
        let m = mem();
        let t = PasidTable::new(1 << 40, 8).unwrap(); // outside RAM: never read
        assert_eq!(
            t.entry(&m, 256),
            fault(WalkFaultKind::PasidOutOfRange { pasid: 256 })
        );
        assert_eq!(
            t.entry(&m, u32::MAX),
            fault(WalkFaultKind::PasidOutOfRange { pasid: u32::MAX })
        );
    }

    #[test]
    fn pasid_width_outside_1_to_20_is_unsupported() {
        for bits in [0u8, 21, 255] {
            assert_eq!(
                PasidTable::new(0, bits),
                Err(WalkFault::new(WalkFaultKind::UnsupportedConfig(
                    Unsupported::PasidBits(bits)
                )))
            );
        }
    }

    #[test]
    fn directory_entry_not_present_faults() {
        let m = mem();
        let mut a = TableAlloc::new(&m, 0x10_0000, RAM);
        let t = VtdPasidTableBuilder::new(&mut a, 20).unwrap();
        assert_eq!(
            t.table().entry(&m, 0x40),
            fault(WalkFaultKind::PasidDirNotPresent { pasid: 0x40 })
        );
    }

    #[test]
    fn directory_entry_reserved_bits_fault() {
        let m = mem();
        let mut a = TableAlloc::new(&m, 0x10_0000, RAM);
        let t = VtdPasidTableBuilder::new(&mut a, 20).unwrap();
        t.set_entry(
            &mut a,
            0x41,
            &VtdPasidEntry::first_stage(0x1000, 4, 1, Flags::default()),
        )
        .unwrap();
        let gpa = t.table().dir_entry_gpa(0x41).unwrap();
        let pde = a.read_u64(gpa).unwrap();
        a.write_u64(gpa, pde | 0x10).unwrap();
        assert_eq!(
            t.table().entry(&m, 0x41),
            fault(WalkFaultKind::PasidDirReserved {
                pasid: 0x41,
                bits: 0x10
            })
        );
    }

    #[test]
    fn directory_outside_ram_faults_with_the_address() {
        let m = mem();
        let t = PasidTable::new(RAM, 20).unwrap();
        assert_eq!(
            t.entry(&m, 0x80),
            fault(WalkFaultKind::TableOutsideRam { gpa: RAM + 16 })
        );
        let wrap = PasidTable::new(u64::MAX, 20).unwrap();
        assert!(matches!(
            wrap.entry(&m, 0xfffff),
            Err(WalkFault {
                kind: WalkFaultKind::TableOutsideRam { .. },
                level: None
            })
        ));
    }

    #[test]
    fn pasid_table_outside_ram_faults_with_the_address() {
        let m = mem();
        let mut a = TableAlloc::new(&m, 0x10_0000, RAM);
        let t = VtdPasidTableBuilder::new(&mut a, 20).unwrap();
        let gpa = t.table().dir_entry_gpa(0).unwrap();
        a.write_u64(gpa, (1 << 40) | PDE_P).unwrap();
        assert_eq!(
            t.table().entry(&m, 3),
            fault(WalkFaultKind::TableOutsideRam {
                gpa: (1 << 40) + 3 * 64
            })
        );
    }

    #[test]
    fn entry_not_present_faults() {
        let m = mem();
        let mut a = TableAlloc::new(&m, 0x10_0000, RAM);
        let t = VtdPasidTableBuilder::new(&mut a, 20).unwrap();
        t.set_entry(
            &mut a,
            5,
            &VtdPasidEntry::first_stage(0x1000, 4, 1, Flags::default()),
        )
        .unwrap();
        t.clear_entry(&mut a, 5).unwrap();
        assert_eq!(
            t.table().entry(&m, 5),
            fault(WalkFaultKind::PasidEntryNotPresent { pasid: 5 })
        );
        // The neighbour in the same table was never written.
        assert_eq!(
            t.table().entry(&m, 6),
            fault(WalkFaultKind::PasidEntryNotPresent { pasid: 6 })
        );
    }

    #[test]
    fn entry_reserved_bits_fault_per_qword() {
        let m = mem();
        let mut a = TableAlloc::new(&m, 0x10_0000, RAM);
        let t = VtdPasidTableBuilder::new(&mut a, 20).unwrap();
        let good = VtdPasidEntry::first_stage(0x1000, 4, 1, Flags::default()).encode();
        let cases: [(usize, u64); 6] = [
            (0, 1 << 10),
            (1, 1 << 16),
            (2, 1 << 8),
            (2, 1 << 60),
            (3, 1),
            (7, 1 << 63),
        ];
        for (qword, bit) in cases {
            let mut w = good;
            w[qword] |= bit;
            t.write_raw(&mut a, 9, &w).unwrap();
            assert_eq!(
                t.table().entry(&m, 9),
                fault(WalkFaultKind::PasidEntryReserved {
                    pasid: 9,
                    qword: qword as u8,
                    bits: bit
                }),
                "qword {qword} bit {bit:#x}"
            );
        }
    }

    #[test]
    fn pgtt_other_than_first_stage_is_unsupported() {
        let m = mem();
        let mut a = TableAlloc::new(&m, 0x10_0000, RAM);
        let t = VtdPasidTableBuilder::new(&mut a, 20).unwrap();
        for pgtt in [0u8, PGTT_SECOND_STAGE, PGTT_NESTED, PGTT_PASS_THROUGH, 5, 7] {
            let mut e = VtdPasidEntry::first_stage(0x1000, 4, 1, Flags::default());
            e.pgtt = pgtt;
            t.set_entry(&mut a, 1, &e).unwrap();
            let err = t.table().entry(&m, 1).unwrap_err();
            assert_eq!(
                err.kind,
                WalkFaultKind::UnsupportedPasidEntry {
                    pasid: 1,
                    what: Unsupported::Pgtt(pgtt)
                }
            );
            assert!(err.to_string().contains("unsupported PGTT"), "{err}");
        }
    }

    #[test]
    fn reserved_paging_modes_are_unsupported() {
        let m = mem();
        let mut a = TableAlloc::new(&m, 0x10_0000, RAM);
        let t = VtdPasidTableBuilder::new(&mut a, 20).unwrap();
        for fspm in [2u8, 3] {
            let mut e = VtdPasidEntry::first_stage(0x1000, 4, 1, Flags::default());
            e.fspm = fspm;
            t.set_entry(&mut a, 2, &e).unwrap();
            assert_eq!(
                t.table().entry(&m, 2),
                fault(WalkFaultKind::UnsupportedPasidEntry {
                    pasid: 2,
                    what: Unsupported::PagingMode(fspm)
                })
            );
        }
    }

    #[test]
    fn first_stage_walks_through_the_entry_with_4_and_5_levels() {
        let m = mem();
        let mut a = TableAlloc::new(&m, 0x10_0000, RAM);
        let t = VtdPasidTableBuilder::new(&mut a, 20).unwrap();
        for (pasid, levels) in [(0x1u32, 4u8), (0xf_ffff, 5)] {
            let pt = X86TableBuilder::new(&mut a, levels).unwrap();
            pt.map(
                &mut a,
                0x7000,
                0x2000 * u64::from(levels),
                12,
                Perm::RW_USER,
            )
            .unwrap();
            let flags = Flags {
                sre: true,
                wpe: true,
                ere: false,
                smep: false,
            };
            t.set_first_stage(&mut a, pasid, pt.root(), levels, 0x33, flags)
                .unwrap();
            let s1 = t.table().stage1(&m, pasid).unwrap();
            assert_eq!(s1.archid(), Some(0x33));
            match s1 {
                Stage1::X86(c) => {
                    assert_eq!(c.levels(), levels);
                    assert_eq!(c.flags(), flags);
                }
                Stage1::Arm(_) => panic!("expected IA-32e"),
            }
            let leaf = s1.translate(&m, 0x7010, Access::WRITE).unwrap();
            assert_eq!(
                leaf.translate(0x7010),
                Some(0x2000 * u64::from(levels) + 0x10)
            );
        }
    }
}

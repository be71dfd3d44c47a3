//! A reference for what a guest's VT-d tables grant, written from the
//! specs and nothing else: it shares no code with `vmm_iommu::nested`
//! (no constant, no decoder, no builder), so a test that compares the
//! software IOMMU with it compares two readings of the spec.
//!
//! - VT-d 4.1 §9.5 scalable-mode PASID directory entry: P bit 0, FPD
//!   bit 1, bits 11:2 reserved, PASID table pointer 63:12; indexed by
//!   `PASID[19:6]`, 8 bytes an entry.
//! - VT-d §9.6 scalable-mode PASID table entry, 64 bytes, indexed by
//!   `PASID[5:0]`: qword 0 P bit 0, PGTT bits 8:6 (001b first stage only),
//!   bits 11:10 reserved; qword 1 DID 15:0, bits 22:16 reserved; qword 2
//!   FSPM bits 3:2 (0 4-level, 1 5-level), bits 11:8 reserved, FSPTPTR
//!   63:12 with bits above the 52-bit address width reserved; qwords 3-7
//!   reserved.
//! - Intel SDM vol. 3A §4.5 IA-32e (4- and 5-level) paging: P bit 0, R/W
//!   bit 1, U/S bit 2, PS bit 7 (reserved in PML5E/PML4E; a 1 GiB page in
//!   a PDPTE, 2 MiB in a PDE, whose address bits 29:13 / 20:13 are then
//!   reserved), address 51:12, XD bit 63; an unprivileged access needs U/S
//!   at every level, a write R/W at every level; the input address must be
//!   canonical (bits 63:48, or 63:57 with 5 levels, equal to bit 47/56).
//!
//! - SMMUv3 §5.4 Context Descriptor (linear CD table, 64 bytes a CD):
//!   dword 0 T0SZ 5:0, TG0 7:6 (0b00 4 KiB), EPD0 14, ENDI 15, V 31, IPS
//!   34:32, AFFD 35, AA64 41, HD 42, HA 43, ASID 63:48; dword 1 (CD bits
//!   127:64) TTB0 51:4 at bits 51:4, with E0PD0 (66) and HAFT (67) RES0
//!   on an SMMU without E0PD and HTTU, bits 119:116 and 121:120 RES0, PnCH
//!   (122) RES0 without THE and EPAN (123) taken as RES0 (no FEAT_EPAN):
//!   set, the CD is refused. This device implements no HTTU, so HA / HD =
//!   1 is ILLEGAL.
//! - Arm ARM D8 VMSAv8-64 stage 1, 4 KiB granule, 48-bit output: bits 1:0
//!   0b11 table (levels 0-2) or page (level 3), 0b01 block (levels 1, 2;
//!   reserved at level 3), 0bx0 invalid; output / next-table address 47:12
//!   (bits 49:48 above a 48-bit output size are an address-size fault);
//!   AP[1] bit 6 EL0 access, AP[2] bit 7 read-only, AF bit 10 (0 faults
//!   unless CD.AFFD), APTable bits 62:61 (bit 61 no EL0 below, bit 62 no
//!   write below). The input address must be below 2^(64 - T0SZ).
//!
//! Only unprivileged reads and writes are modelled (supervisor requests,
//! SRE/WPE/SMEP, PAN, WXN and execute requests are not), which is what the
//! tests ask.

#![allow(dead_code)]

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// The guest-physical address `va` translates to for an unprivileged read
/// (or write), or `None` if the tables refuse it.
pub fn vtd_translate(
    mem: &GuestMemoryMmap,
    dir: u64,
    pasid_bits: u8,
    pasid: u32,
    va: u64,
    write: bool,
) -> Option<u64> {
    if pasid_bits == 0 || pasid_bits > 20 || u64::from(pasid) >> pasid_bits != 0 {
        return None;
    }
    let dir = dir & !0xfff;
    let pde = read(mem, dir.checked_add(u64::from(pasid >> 6) * 8)?)?;
    if pde & 1 == 0 || pde & 0xffc != 0 {
        return None;
    }
    let pe = (pde & !0xfff) + u64::from(pasid & 63) * 64;
    let mut q = [0u64; 8];
    for (i, w) in q.iter_mut().enumerate() {
        *w = read(mem, pe + i as u64 * 8)?;
    }
    if q[0] & 1 == 0 {
        return None;
    }
    let reserved = q[0] & 0xc00 != 0
        || q[1] & 0x7f_0000 != 0
        || q[2] & 0xf00 != 0
        || q[2] >> 52 != 0
        || q[3..].iter().any(|&w| w != 0);
    if reserved || (q[0] >> 6) & 7 != 1 {
        return None;
    }
    let levels = match (q[2] >> 2) & 3 {
        0 => 4,
        1 => 5,
        _ => return None,
    };
    ia32e_translate(mem, q[2] & 0x000f_ffff_ffff_f000, levels, va, write)
}

/// IA-32e paging from `root` with `levels` (4 or 5), unprivileged.
pub fn ia32e_translate(
    mem: &GuestMemoryMmap,
    root: u64,
    levels: u32,
    va: u64,
    write: bool,
) -> Option<u64> {
    let top_bit = 12 + 9 * levels - 1; // 47 or 56
    let high = (va as i64) >> top_bit;
    if high != 0 && high != -1 {
        return None; // not canonical
    }
    let mut table = root;
    let (mut rw, mut us) = (true, true);
    for level in (1..=levels).rev() {
        let shift = 12 + 9 * (level - 1);
        let e = read(mem, table + ((va >> shift) & 511) * 8)?;
        if e & 1 == 0 {
            return None;
        }
        rw &= e & 2 != 0;
        us &= e & 4 != 0;
        let addr = e & 0x000f_ffff_ffff_f000;
        let ps = e & 0x80 != 0;
        let leaf = match level {
            1 => true,
            2 | 3 => ps,
            _ if ps => return None, // PS reserved in PML4E / PML5E
            _ => false,
        };
        if leaf {
            if level > 1 {
                // Large page: bits shift-1..13 reserved (bit 12 is PAT).
                let rsvd = ((1u64 << shift) - 1) & !0x1fff;
                if e & rsvd != 0 {
                    return None;
                }
            }
            if !us || (write && !rw) {
                return None;
            }
            let base = addr & !((1u64 << shift) - 1);
            return Some(base | (va & ((1u64 << shift) - 1)));
        }
        table = addr;
    }
    None
}

/// The guest-physical address `va` translates to for an unprivileged read
/// (or write) by SubstreamID `ssid` through the linear CD table at `cdt`
/// (CD fields as listed above; T0SZ 16..=39 with the 4 KiB granule, other
/// granules refused), or `None`.
pub fn smmu_translate(
    mem: &GuestMemoryMmap,
    cdt: u64,
    ssid: u32,
    va: u64,
    write: bool,
) -> Option<u64> {
    let cd = cdt.checked_add(u64::from(ssid) * 64)?;
    let d0 = read(mem, cd)?;
    let d1 = read(mem, cd + 8)?;
    if d1 & (0b11 << 2 | 0xff << 52) != 0 {
        return None; // dword 1 RES0 bits (CD bits 67:66, 123:116)
    }
    let bit = |n: u32| d0 >> n & 1 != 0;
    if !bit(31) || !bit(41) || bit(15) || bit(14) || bit(42) || bit(43) {
        return None; // V = 0, AArch32, big-endian, EPD0, HTTU
    }
    if (d0 >> 6) & 3 != 0 {
        return None; // only the 4 KiB granule is modelled
    }
    let t0sz = (d0 & 0x3f) as u32;
    if !(16..=39).contains(&t0sz) {
        return None;
    }
    let oa_bits: u32 = match (d0 >> 32) & 7 {
        0 => 32,
        1 => 36,
        2 => 40,
        3 => 42,
        4 => 44,
        _ => 48,
    };
    let ia = 64 - t0sz;
    if va >> ia != 0 {
        return None;
    }
    let affd = bit(35);
    // Levels: each resolves 9 bits above the 12-bit page offset.
    let levels = (ia - 12).div_ceil(9);
    let start = 4 - levels;
    let top_bits = ia - 12 - 9 * (levels - 1);
    let top_size = 8u64 << top_bits;
    let mut table = d1 & 0x000f_ffff_ffff_fff0 & !(top_size.max(64) - 1);
    if table >> oa_bits != 0 {
        return None;
    }
    let (mut el0, mut rw) = (true, true);
    for level in start..=3 {
        let shift = 12 + 9 * (3 - level);
        let mask = if level == start {
            (1u64 << top_bits) - 1
        } else {
            511
        };
        let d = read(mem, table + ((va >> shift) & mask) * 8)?;
        if d & 1 == 0 {
            return None;
        }
        let is_table = d & 2 != 0 && level < 3;
        let is_page = d & 2 != 0 && level == 3;
        let is_block = d & 2 == 0 && (level == 1 || level == 2);
        let addr = d & 0x0003_ffff_ffff_f000;
        if addr >> oa_bits != 0 {
            return None; // address-size fault
        }
        if is_table {
            el0 &= d >> 61 & 1 == 0;
            rw &= d >> 62 & 1 == 0;
            table = addr;
            continue;
        }
        if !is_page && !is_block {
            return None;
        }
        el0 &= d >> 6 & 1 != 0;
        rw &= d >> 7 & 1 == 0;
        if d >> 10 & 1 == 0 && !affd {
            return None; // access flag
        }
        if !el0 || (write && !rw) {
            return None;
        }
        let base = addr & !((1u64 << shift) - 1);
        return Some(base | (va & ((1u64 << shift) - 1)));
    }
    None
}

fn read(mem: &GuestMemoryMmap, gpa: u64) -> Option<u64> {
    mem.read_obj::<u64>(GuestAddress(gpa))
        .ok()
        .map(u64::from_le)
}

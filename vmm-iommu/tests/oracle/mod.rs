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
//! Only unprivileged reads and writes are modelled (supervisor requests,
//! SRE/WPE/SMEP and execute requests are not), which is what the tests ask.

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

fn read(mem: &GuestMemoryMmap, gpa: u64) -> Option<u64> {
    mem.read_obj::<u64>(GuestAddress(gpa))
        .ok()
        .map(u64::from_le)
}

//! Dirty tracking of assigned devices' DMA, for live migration: the pure
//! parts. Builders of the uAPI arguments (`IOMMU_HWPT_SET_DIRTY_TRACKING`,
//! `IOMMU_HWPT_GET_DIRTY_BITMAP`, `VFIO_IOMMU_DIRTY_PAGES`), the parser of
//! type1's migration capability, and the conversion of the kernel's
//! bitmaps (one bit per IOVA page) into guest-physical pages
//! ([`DirtyPages`]), which the VMM marks in its own bitmap of guest memory
//! ([`DirtyPages::mark`]) beside what `vmm_iommu::dirty` gives for
//! emulated devices.
//!
//! The backends' calls are `IommufdBackend::{start,stop}_dirty_tracking`
//! and `take_dirty_pages` (on the stage-2 nest parent HWPTs, whose IOVA is
//! the guest-physical address), and the same on `Type1Backend` (per
//! container, where the host offers the migration capability; IOVA pages
//! are turned into guest-physical pages through what the container maps).
//!
//! Pointer fields stay zero, as everywhere in this crate: the host
//! implementation fills them from the bitmap slice it is given.

use std::mem::size_of;

use iommufd_bindings::iommufd::{
    iommu_hwpt_get_dirty_bitmap, iommu_hwpt_set_dirty_tracking,
    iommufd_hw_capabilities_IOMMU_HW_CAP_DIRTY_TRACKING,
    iommufd_hwpt_set_dirty_tracking_flags_IOMMU_HWPT_DIRTY_TRACKING_ENABLE,
};
use vfio_bindings::bindings::vfio::{
    VFIO_IOMMU_DIRTY_PAGES_FLAG_GET_BITMAP, VFIO_IOMMU_DIRTY_PAGES_FLAG_START,
    VFIO_IOMMU_DIRTY_PAGES_FLAG_STOP, VFIO_IOMMU_TYPE1_INFO_CAP_MIGRATION,
};
use vm_memory::bitmap::{AtomicBitmap, Bitmap};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_iommu::backend::EndpointId;

use crate::dma::DmaPiece;
use crate::host::{le16, le32, le64};
use crate::ram::RamRegion;

/// The page size dirty bitmaps are read in: the host's base page, the
/// granule every mapping of this crate is made of.
pub const DIRTY_PAGE: u64 = 4096;

/// Largest range read in one bitmap call, so the bitmap the VMM allocates
/// stays bounded (64 GiB of 4 KiB pages: a 2 MiB bitmap) whatever the
/// guest maps; larger ranges are read in pieces.
pub const MAX_BITMAP_RANGE: u64 = 64 << 30;

/// Size of `VFIO_IOMMU_DIRTY_PAGES`'s argument for START and STOP: the
/// `vfio_iommu_type1_dirty_bitmap` header alone.
pub const TYPE1_DIRTY_HDR: usize = 8;
/// Size of its argument for GET_BITMAP: the header and a
/// `vfio_iommu_type1_dirty_bitmap_get` (iova, size, then a `vfio_bitmap`:
/// pgsize, size, data).
pub const TYPE1_DIRTY_GET: usize = TYPE1_DIRTY_HDR + 40;
/// Offset of the bitmap pointer (`vfio_bitmap.data`) in that argument.
pub const TYPE1_DIRTY_DATA_AT: usize = TYPE1_DIRTY_HDR + 32;

/// `IOMMU_HWPT_SET_DIRTY_TRACKING` of `hwpt_id`, on or off.
pub fn set_dirty_tracking(hwpt_id: u32, enable: bool) -> iommu_hwpt_set_dirty_tracking {
    iommu_hwpt_set_dirty_tracking {
        size: size_of::<iommu_hwpt_set_dirty_tracking>() as u32,
        flags: if enable {
            iommufd_hwpt_set_dirty_tracking_flags_IOMMU_HWPT_DIRTY_TRACKING_ENABLE
        } else {
            0
        },
        hwpt_id,
        __reserved: 0,
    }
}

/// `IOMMU_HWPT_GET_DIRTY_BITMAP` of `length` bytes of `hwpt_id` from
/// `iova`, one bit per [`DIRTY_PAGE`], clearing what it reads.
pub fn get_dirty_bitmap(hwpt_id: u32, iova: u64, length: u64) -> iommu_hwpt_get_dirty_bitmap {
    iommu_hwpt_get_dirty_bitmap {
        size: size_of::<iommu_hwpt_get_dirty_bitmap>() as u32,
        hwpt_id,
        flags: 0,
        __reserved: 0,
        iova,
        length,
        page_size: DIRTY_PAGE,
        data: 0,
    }
}

/// `VFIO_IOMMU_DIRTY_PAGES` START (`start`) or STOP.
pub fn type1_dirty_toggle(start: bool) -> [u8; TYPE1_DIRTY_HDR] {
    let flags = if start {
        VFIO_IOMMU_DIRTY_PAGES_FLAG_START
    } else {
        VFIO_IOMMU_DIRTY_PAGES_FLAG_STOP
    };
    let mut b = [0u8; TYPE1_DIRTY_HDR];
    b[0..4].copy_from_slice(&(TYPE1_DIRTY_HDR as u32).to_le_bytes());
    b[4..8].copy_from_slice(&flags.to_le_bytes());
    b
}

/// `VFIO_IOMMU_DIRTY_PAGES` GET_BITMAP of `size` bytes from `iova` (one
/// whole container mapping, as the kernel requires), in `pgsize` pages,
/// into a bitmap of [`bitmap_words`] `u64`s.
pub fn type1_dirty_get(iova: u64, size: u64, pgsize: u64) -> [u8; TYPE1_DIRTY_GET] {
    let mut b = [0u8; TYPE1_DIRTY_GET];
    b[0..4].copy_from_slice(&(TYPE1_DIRTY_GET as u32).to_le_bytes());
    b[4..8].copy_from_slice(&VFIO_IOMMU_DIRTY_PAGES_FLAG_GET_BITMAP.to_le_bytes());
    b[8..16].copy_from_slice(&iova.to_le_bytes());
    b[16..24].copy_from_slice(&size.to_le_bytes());
    b[24..32].copy_from_slice(&pgsize.to_le_bytes());
    let bytes = bitmap_words(size, pgsize) as u64 * 8;
    b[32..40].copy_from_slice(&bytes.to_le_bytes());
    // b[40..48]: the bitmap pointer, filled by the host.
    b
}

/// The `u64` words of a bitmap of one bit per `page` over `len` bytes.
pub fn bitmap_words(len: u64, page: u64) -> usize {
    let pages = len.div_ceil(page.max(1));
    usize::try_from(pages.div_ceil(64)).unwrap_or(usize::MAX)
}

/// Whether the device's IOMMU can track dirty pages
/// (`IOMMU_GET_HW_INFO`'s `out_capabilities`).
pub fn hw_dirty_capable(out_capabilities: u64) -> bool {
    out_capabilities & u64::from(iommufd_hw_capabilities_IOMMU_HW_CAP_DIRTY_TRACKING) != 0
}

/// Type1's migration capability (`vfio_iommu_type1_info_cap_migration`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Type1Migration {
    /// Page sizes a dirty bitmap can be read in.
    pub pgsize_bitmap: u64,
    /// Largest bitmap, in bytes, one GET_BITMAP fills.
    pub max_bitmap_size: u64,
}

impl Type1Migration {
    /// The page size bitmaps are read in: the smallest the kernel offers,
    /// which it requires (vfio_iommu_type1.c: "pgsize must be the
    /// smallest supported").
    pub fn pgsize(&self) -> u64 {
        self.pgsize_bitmap & self.pgsize_bitmap.wrapping_neg()
    }
}

/// At most this many capabilities are followed (the chain is the
/// kernel's; a loop in it must still end).
const MAX_CAPS: usize = 64;

/// The migration capability in a `VFIO_IOMMU_GET_INFO` answer, if the
/// kernel offers one (`None` also for a chain that leaves the buffer or
/// loops: no dirty tracking rather than a guess).
pub fn parse_type1_migration(buf: &[u8]) -> Option<Type1Migration> {
    // vfio_iommu_type1_info: argsz, flags, iova_pgsizes, cap_offset@16.
    let mut at = le32(buf, 16)? as usize;
    for _ in 0..MAX_CAPS {
        if at == 0 {
            return None;
        }
        // vfio_info_cap_header: id u16, version u16, next u32.
        let id = le16(buf, at)?;
        if u32::from(id) == VFIO_IOMMU_TYPE1_INFO_CAP_MIGRATION {
            // flags@8, pgsize_bitmap@16, max_dirty_bitmap_size@24.
            let pgsize_bitmap = le64(buf, at + 16)?;
            let max_bitmap_size = le64(buf, at + 24)?;
            if pgsize_bitmap == 0 {
                return None;
            }
            return Some(Type1Migration {
                pgsize_bitmap,
                max_bitmap_size,
            });
        }
        at = le32(buf, at + 4)? as usize;
    }
    None
}

/// The set bits of `bitmap` as the addresses of their pages: bit `i` is
/// the page at `base + i * page`; bits past `len` bytes are ignored (the
/// kernel owns the bitmap's last word only up to `len`).
pub fn bitmap_pages(bitmap: &[u64], base: u64, len: u64, page: u64) -> Vec<u64> {
    let pages = len.div_ceil(page.max(1));
    let mut out = Vec::new();
    for (w, &word) in bitmap.iter().enumerate() {
        let mut bits = word;
        while bits != 0 {
            let i = w as u64 * 64 + u64::from(bits.trailing_zeros());
            bits &= bits - 1;
            if i < pages {
                out.push(base + i * page);
            }
        }
    }
    out
}

/// The guest-physical pages ([`DIRTY_PAGE`]) behind the IOVA page at
/// `iova` of a container mapping `piece` (its host pages are guest RAM at
/// `regions`); a page the piece does not cover gives none.
pub fn piece_gpa_pages(regions: &[RamRegion], piece: &DmaPiece, iova: u64, page: u64) -> Vec<u64> {
    let mut out = Vec::new();
    let Some(off) = iova.checked_sub(piece.iova) else {
        return out;
    };
    if off >= piece.len {
        return out;
    }
    let len = page.min(piece.len - off);
    let Some(hva) = piece.hva.checked_add(off) else {
        return out;
    };
    let Some(r) = regions.iter().find(|r| hva >= r.hva && hva - r.hva < r.len) else {
        return out;
    };
    let first = r.gpa + (hva - r.hva);
    let last = first.saturating_add(len - 1);
    let mut p = first & !(DIRTY_PAGE - 1);
    while p <= last {
        out.push(p);
        match p.checked_add(DIRTY_PAGE) {
            Some(n) => p = n,
            None => break,
        }
    }
    out
}

/// What a backend's assigned devices wrote since the last call.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DirtyPages {
    /// Guest-physical addresses of the dirty [`DIRTY_PAGE`] pages,
    /// ascending, each once.
    pub pages: Vec<u64>,
    /// Endpoints whose DMA the host cannot track now (no dirty-capable
    /// IOMMU, no migration capability, or a mode whose page table is not
    /// a tracked one): the VMM must treat every page they may write as
    /// dirty (or not migrate them while they run).
    pub untracked: Vec<EndpointId>,
}

impl DirtyPages {
    /// Sorts and dedups `pages` and `untracked`.
    pub fn normalize(&mut self) {
        self.pages.sort_unstable();
        self.pages.dedup();
        self.untracked.sort_unstable();
        self.untracked.dedup();
    }

    /// Marks the pages in `mem`'s dirty bitmap (the VMM's, as
    /// `vmm_iommu::take_dirty_pages` reads it); pages outside guest
    /// memory are skipped. Returns how many were marked.
    pub fn mark(&self, mem: &GuestMemoryMmap<AtomicBitmap>) -> usize {
        let mut n = 0;
        for &gpa in &self.pages {
            let Some(r) = mem.find_region(GuestAddress(gpa)) else {
                continue;
            };
            let off = (gpa - r.start_addr().0) as usize;
            let len = (DIRTY_PAGE as usize).min(r.len() as usize - off);
            r.bitmap().mark_dirty(off, len);
            n += 1;
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::bytes_of;

    fn words32(v: &[u32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    #[test]
    fn set_dirty_tracking_layout() {
        // size@0 flags@4 hwpt_id@8 __reserved@12.
        assert_eq!(
            bytes_of(&set_dirty_tracking(7, true)),
            &words32(&[16, 1, 7, 0])[..]
        );
        assert_eq!(
            bytes_of(&set_dirty_tracking(7, false)),
            &words32(&[16, 0, 7, 0])[..]
        );
    }

    #[test]
    fn get_dirty_bitmap_layout() {
        // size@0 hwpt_id@4 flags@8 __reserved@12 iova@16 length@24
        // page_size@32 data@40.
        let a = get_dirty_bitmap(3, 0x1_0000_0000, 0x20_0000);
        let mut want = words32(&[48, 3, 0, 0]);
        for v in [0x1_0000_0000u64, 0x20_0000, 4096, 0] {
            want.extend_from_slice(&v.to_le_bytes());
        }
        assert_eq!(bytes_of(&a), &want[..]);
    }

    #[test]
    fn type1_dirty_pages_layouts() {
        assert_eq!(type1_dirty_toggle(true), [8, 0, 0, 0, 1, 0, 0, 0]);
        assert_eq!(type1_dirty_toggle(false), [8, 0, 0, 0, 2, 0, 0, 0]);
        // 65 pages: two words, 16 bytes of bitmap.
        let g = type1_dirty_get(0x1000_0000, 65 * 4096, 4096);
        let mut want = words32(&[48, 4]);
        for v in [0x1000_0000u64, 65 * 4096, 4096, 16, 0] {
            want.extend_from_slice(&v.to_le_bytes());
        }
        assert_eq!(&g[..], &want[..]);
    }

    #[test]
    fn bitmap_words_round_up() {
        assert_eq!(bitmap_words(4096, 4096), 1);
        assert_eq!(bitmap_words(64 * 4096, 4096), 1);
        assert_eq!(bitmap_words(64 * 4096 + 1, 4096), 2);
        assert_eq!(bitmap_words(MAX_BITMAP_RANGE, DIRTY_PAGE), 1 << 18);
    }

    #[test]
    fn bitmap_pages_ignores_bits_past_the_range() {
        let bm = [1u64 | 1 << 63, 1 | 1 << 1];
        let pages = bitmap_pages(&bm, 0x10_0000, 65 * 4096, 4096);
        assert_eq!(
            pages,
            [0x10_0000, 0x10_0000 + 63 * 4096, 0x10_0000 + 64 * 4096]
        );
    }

    #[test]
    fn migration_capability_is_found_after_the_iova_range_one() {
        // info (24) | IOVA range cap at 24 (next 56) | migration at 56.
        let mut b = vec![0u8; 88];
        b[16..20].copy_from_slice(&24u32.to_le_bytes());
        b[24..26].copy_from_slice(&1u16.to_le_bytes());
        b[28..32].copy_from_slice(&56u32.to_le_bytes());
        b[56..58].copy_from_slice(&2u16.to_le_bytes());
        b[72..80].copy_from_slice(&(1u64 << 12 | 1 << 21).to_le_bytes());
        b[80..88].copy_from_slice(&(256u64 << 20).to_le_bytes());
        let m = parse_type1_migration(&b).unwrap();
        assert_eq!(m.pgsize(), 4096);
        assert_eq!(m.max_bitmap_size, 256 << 20);
        // Without it, or with a chain that loops or leaves the buffer.
        b[28..32].copy_from_slice(&0u32.to_le_bytes());
        assert_eq!(parse_type1_migration(&b), None);
        b[28..32].copy_from_slice(&24u32.to_le_bytes());
        assert_eq!(parse_type1_migration(&b), None);
        b[28..32].copy_from_slice(&4000u32.to_le_bytes());
        assert_eq!(parse_type1_migration(&b), None);
    }

    #[test]
    fn piece_pages_follow_the_host_address_back_to_guest_ram() {
        let regions = [
            RamRegion {
                gpa: 0,
                hva: 0x7000_0000_0000,
                len: 0x10_0000,
            },
            RamRegion {
                gpa: 0x1_0000_0000,
                hva: 0x7100_0000_0000,
                len: 0x10_0000,
            },
        ];
        // IOVA 0x5000_0000 maps guest page 0x1_0000_3000.
        let piece = DmaPiece {
            iova: 0x5000_0000,
            hva: 0x7100_0000_3000,
            len: 0x2000,
            read: true,
            write: true,
        };
        assert_eq!(
            piece_gpa_pages(&regions, &piece, 0x5000_1000, 4096),
            [0x1_0000_4000]
        );
        assert!(piece_gpa_pages(&regions, &piece, 0x5000_2000, 4096).is_empty());
        assert!(piece_gpa_pages(&regions, &piece, 0x4fff_f000, 4096).is_empty());
    }

    #[test]
    fn mark_sets_the_guest_memory_bitmap() {
        let mem: GuestMemoryMmap<AtomicBitmap> =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let d = DirtyPages {
            pages: vec![0x3000, 0x20_0000],
            untracked: Vec::new(),
        };
        assert_eq!(d.mark(&mem), 1);
        assert_eq!(vmm_iommu::take_dirty_pages(&mem), [0x3000]);
    }
}

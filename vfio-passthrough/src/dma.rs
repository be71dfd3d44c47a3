//! MAP mode lowering: a virtio-iommu mapping (IOVA range onto guest
//! physical memory) becomes host DMA mappings of the host virtual
//! addresses behind that guest memory, one per guest RAM region it
//! crosses, as `vfio_iommu_type1_dma_map` or `iommu_ioas_map` arguments.
//!
//! Pure functions only. A range that leaves guest RAM is RANGE before
//! anything is built, so the kernel never sees a host address that is not
//! guest RAM.

use iommufd_bindings::iommufd::{
    iommu_ioas_map, iommu_ioas_unmap, iommufd_ioas_map_flags_IOMMU_IOAS_MAP_FIXED_IOVA,
    iommufd_ioas_map_flags_IOMMU_IOAS_MAP_READABLE,
    iommufd_ioas_map_flags_IOMMU_IOAS_MAP_WRITEABLE,
};
use vfio_bindings::bindings::vfio::{
    vfio_iommu_type1_dma_map, vfio_iommu_type1_dma_unmap, VFIO_DMA_MAP_FLAG_READ,
    VFIO_DMA_MAP_FLAG_WRITE,
};
use vmm_iommu::backend::BackendError;
use vmm_iommu::wire::{VIRTIO_IOMMU_MAP_F_MMIO, VIRTIO_IOMMU_MAP_F_READ, VIRTIO_IOMMU_MAP_F_WRITE};
use vmm_iommu::Mapping;

use crate::ram::{region_index, RamRegion};

/// One contiguous piece of a mapping: `len` bytes of IOVA from `iova`
/// onto host virtual memory from `hva`, with the mapping's access.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DmaPiece {
    /// First IOVA.
    pub iova: u64,
    /// Host virtual address of `iova`'s guest page.
    pub hva: u64,
    /// Length in bytes.
    pub len: u64,
    /// Device may read.
    pub read: bool,
    /// Device may write.
    pub write: bool,
}

/// Splits `len` bytes of guest-physical memory from `gpa`, seen at `iova`,
/// into per-region pieces. RANGE if any byte is not guest RAM or the
/// arithmetic wraps.
pub fn split_range(
    regions: &[RamRegion],
    iova: u64,
    gpa: u64,
    len: u64,
    read: bool,
    write: bool,
) -> Result<Vec<DmaPiece>, BackendError> {
    let out_of_ram = || {
        BackendError::Range(format!(
            "guest-physical range {gpa:#x} (+{len:#x}) is not all guest RAM"
        ))
    };
    if len == 0 || gpa.checked_add(len - 1).is_none() || iova.checked_add(len - 1).is_none() {
        return Err(out_of_ram());
    }
    let mut i = region_index(regions, gpa).ok_or_else(out_of_ram)?;
    let mut pieces = Vec::with_capacity(1);
    let (mut at, mut left, mut io) = (gpa, len, iova);
    loop {
        let r = &regions[i];
        // `at` lies in `r`: the piece runs to the region's end at most.
        let here = left.min(r.last() - at + 1);
        pieces.push(DmaPiece {
            iova: io,
            hva: r.hva + (at - r.gpa),
            len: here,
            read,
            write,
        });
        left -= here;
        if left == 0 {
            return Ok(pieces);
        }
        at += here;
        io += here;
        // The rest must continue in the next region, without a hole.
        match regions.get(i + 1) {
            Some(n) if n.gpa == at => i += 1,
            _ => return Err(out_of_ram()),
        }
    }
}

/// The pieces of a virtio-iommu memory mapping. UNSUPP for an MMIO
/// mapping: no guest RAM is behind it (the type1 backend lowers those with
/// [`mmio_pieces`]; this refusal is what the iommufd backend answers, see
/// the message). RANGE for a range that wraps. A memory mapping may name
/// guest-physical addresses that are not RAM (Linux's identity domains
/// map the whole input range one to one): only its RAM parts become host
/// maps, so the device's DMA to the rest faults in the host IOMMU, as an
/// emulated device's fails on the bus. A mapping that grants neither read
/// nor write has no pieces: the device may not access it, which is what
/// an absent mapping gives.
pub fn mapping_pieces(regions: &[RamRegion], m: &Mapping) -> Result<Vec<DmaPiece>, BackendError> {
    if m.flags & VIRTIO_IOMMU_MAP_F_MMIO != 0 {
        // Kernel fact: IOMMU_IOAS_MAP pins the user pages behind `user_va`
        // (GUP), and GUP refuses the VM_PFNMAP mapping a VFIO BAR mmap is;
        // an IOAS takes a BAR only as a dma-buf (VFIO_DEVICE_FEATURE_DMA_BUF,
        // then IOMMU_IOAS_MAP_FILE) on kernels that have that path.
        return Err(BackendError::Unsupported(format!(
            "MMIO mapping at IOVA {:#x}: IOMMU_IOAS_MAP pins host pages (GUP), which refuses \
             the VM_PFNMAP mmap of a device BAR; peer-to-peer DMA needs a dma-buf import \
             (VFIO_DEVICE_FEATURE_DMA_BUF + IOMMU_IOAS_MAP_FILE), which this backend does \
             not do: use the type1 backend for peer-to-peer",
            m.start
        )));
    }
    pieces_over(regions, m)
}

/// The pieces of a `VIRTIO_IOMMU_MAP_F_MMIO` mapping over the MMIO windows
/// the VMM registered with host memory behind them (the mmaps of VFIO
/// BARs, sorted, disjoint): `VFIO_IOMMU_MAP_DMA` of those host addresses
/// gives an assigned device peer-to-peer access, as QEMU and
/// cloud-hypervisor map BARs into a type1 container. The parts outside
/// such windows (windows without host memory, which only the VMM's bus
/// serves) have no pieces: the device's DMA there faults in the host
/// IOMMU. RANGE for a range that wraps.
pub fn mmio_pieces(windows: &[RamRegion], m: &Mapping) -> Result<Vec<DmaPiece>, BackendError> {
    pieces_over(windows, m)
}

/// One piece per overlap of the mapping's physical range with the sorted,
/// disjoint `regions`.
fn pieces_over(regions: &[RamRegion], m: &Mapping) -> Result<Vec<DmaPiece>, BackendError> {
    let wraps = || {
        BackendError::Range(format!(
            "mapping {:#x}..={:#x} at {:#x} is empty or wraps past 2^64",
            m.start, m.end, m.phys
        ))
    };
    let span = m.end.checked_sub(m.start).ok_or_else(wraps)?;
    let phys_last = m.phys.checked_add(span).ok_or_else(wraps)?;
    let read = m.flags & VIRTIO_IOMMU_MAP_F_READ != 0;
    let write = m.flags & VIRTIO_IOMMU_MAP_F_WRITE != 0;
    if !read && !write {
        return Ok(Vec::new());
    }
    Ok(regions
        .iter()
        .filter(|r| r.gpa <= phys_last && r.last() >= m.phys)
        .map(|r| {
            let lo = r.gpa.max(m.phys);
            let hi = r.last().min(phys_last);
            DmaPiece {
                iova: m.start + (lo - m.phys),
                hva: r.hva + (lo - r.gpa),
                len: hi - lo + 1,
                read,
                write,
            }
        })
        .collect())
}

/// The identity pieces of all guest RAM (IOVA = GPA), for a bypass domain.
pub fn identity_pieces(regions: &[RamRegion]) -> Vec<DmaPiece> {
    regions
        .iter()
        .map(|r| DmaPiece {
            iova: r.gpa,
            hva: r.hva,
            len: r.len,
            read: true,
            write: true,
        })
        .collect()
}

/// Checks that a piece is aligned on the host's smallest page
/// (`min_page`, a power of two): the kernel refuses others with EINVAL.
pub fn check_alignment(p: &DmaPiece, min_page: u64) -> Result<(), BackendError> {
    let mask = min_page.max(1) - 1;
    if (p.iova | p.hva | p.len) & mask != 0 {
        return Err(BackendError::Invalid(format!(
            "mapping piece IOVA {:#x} (+{:#x}) is not aligned on the host page size {min_page:#x}",
            p.iova, p.len
        )));
    }
    Ok(())
}

/// `VFIO_IOMMU_MAP_DMA` for a piece (include/uapi/linux/vfio.h:
/// `struct vfio_iommu_type1_dma_map { argsz, flags, vaddr, iova, size }`).
pub fn type1_map(p: &DmaPiece) -> vfio_iommu_type1_dma_map {
    let mut flags = 0;
    if p.read {
        flags |= VFIO_DMA_MAP_FLAG_READ;
    }
    if p.write {
        flags |= VFIO_DMA_MAP_FLAG_WRITE;
    }
    vfio_iommu_type1_dma_map {
        argsz: std::mem::size_of::<vfio_iommu_type1_dma_map>() as u32,
        flags,
        vaddr: p.hva,
        iova: p.iova,
        size: p.len,
    }
}

/// `VFIO_IOMMU_UNMAP_DMA` for a piece (no flags: no dirty bitmap, not
/// UNMAP_ALL, so the range must cover whole mappings, which a piece is).
pub fn type1_unmap(p: &DmaPiece) -> vfio_iommu_type1_dma_unmap {
    vfio_iommu_type1_dma_unmap {
        argsz: std::mem::size_of::<vfio_iommu_type1_dma_unmap>() as u32,
        flags: 0,
        iova: p.iova,
        size: p.len,
        ..Default::default()
    }
}

/// `IOMMU_IOAS_MAP` of a piece at its fixed IOVA (include/uapi/linux/iommufd.h).
pub fn ioas_map(ioas_id: u32, p: &DmaPiece) -> iommu_ioas_map {
    let mut flags = iommufd_ioas_map_flags_IOMMU_IOAS_MAP_FIXED_IOVA;
    if p.read {
        flags |= iommufd_ioas_map_flags_IOMMU_IOAS_MAP_READABLE;
    }
    if p.write {
        flags |= iommufd_ioas_map_flags_IOMMU_IOAS_MAP_WRITEABLE;
    }
    iommu_ioas_map {
        size: std::mem::size_of::<iommu_ioas_map>() as u32,
        flags,
        ioas_id,
        __reserved: 0,
        user_va: p.hva,
        length: p.len,
        iova: p.iova,
    }
}

/// `IOMMU_IOAS_UNMAP` of a piece.
pub fn ioas_unmap(ioas_id: u32, p: &DmaPiece) -> iommu_ioas_unmap {
    iommu_ioas_unmap {
        size: std::mem::size_of::<iommu_ioas_unmap>() as u32,
        ioas_id,
        iova: p.iova,
        length: p.len,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::bytes_of;
    use std::mem::{offset_of, size_of};

    fn ram() -> Vec<RamRegion> {
        vec![
            RamRegion {
                gpa: 0,
                len: 0x10_0000,
                hva: 0x7f00_0000_0000,
            },
            RamRegion {
                gpa: 0x10_0000,
                len: 0x10_0000,
                hva: 0x7f10_0000_0000,
            },
            RamRegion {
                gpa: 0x20_0000,
                len: 0x10_0000,
                hva: 0x7f20_0000_0000,
            },
            RamRegion {
                gpa: 0x1_0000_0000,
                len: 0x10_0000,
                hva: 0x7f30_0000_0000,
            },
        ]
    }

    fn rw(start: u64, end: u64, phys: u64) -> Mapping {
        Mapping {
            start,
            end,
            phys,
            flags: VIRTIO_IOMMU_MAP_F_READ | VIRTIO_IOMMU_MAP_F_WRITE,
        }
    }

    #[test]
    fn mapping_in_one_region_is_one_piece() {
        let p = mapping_pieces(&ram(), &rw(0x8000_0000, 0x8000_ffff, 0x4000)).unwrap();
        assert_eq!(
            p,
            vec![DmaPiece {
                iova: 0x8000_0000,
                hva: 0x7f00_0000_4000,
                len: 0x1_0000,
                read: true,
                write: true
            }]
        );
    }

    #[test]
    fn mapping_across_three_regions_is_three_pieces() {
        let p = mapping_pieces(&ram(), &rw(0x4000_0000, 0x4020_ffff, 0xf_0000)).unwrap();
        assert_eq!(p.len(), 3);
        assert_eq!(
            (p[0].iova, p[0].hva, p[0].len),
            (0x4000_0000, 0x7f00_000f_0000, 0x1_0000)
        );
        assert_eq!(
            (p[1].iova, p[1].hva, p[1].len),
            (0x4001_0000, 0x7f10_0000_0000, 0x10_0000)
        );
        assert_eq!(
            (p[2].iova, p[2].hva, p[2].len),
            (0x4011_0000, 0x7f20_0000_0000, 0x10_0000)
        );
    }

    #[test]
    fn mapping_beyond_ram_maps_only_its_ram_parts_and_a_wrap_is_range() {
        // Entirely outside RAM: nothing to pin.
        assert_eq!(
            mapping_pieces(&ram(), &rw(0, 0xfff, 0x30_0000)).unwrap(),
            vec![]
        );
        assert_eq!(
            mapping_pieces(&ram(), &rw(0, 0xfff, !0xfff)).unwrap(),
            vec![]
        );
        // Over a hole: the RAM page before it only.
        let p = mapping_pieces(&ram(), &rw(0, 0x10_0fff, 0x2f_f000)).unwrap();
        assert!(p.iter().all(|x| x.iova == 0 && x.len == 0x1000), "{p:?}");
        // The whole space one to one: every region, at IOVA = GPA.
        let p = mapping_pieces(&ram(), &rw(0, u64::MAX - 0xfff, 0)).unwrap();
        assert_eq!(p, identity_pieces(&ram()));
        // A wrap is RANGE.
        assert!(matches!(
            mapping_pieces(&ram(), &rw(0x1000, 0x2fff, u64::MAX - 0xfff)),
            Err(BackendError::Range(_))
        ));
    }

    #[test]
    fn mmio_mapping_has_no_ram_pieces() {
        let mut m = rw(0, 0xfff, 0);
        m.flags |= VIRTIO_IOMMU_MAP_F_MMIO;
        assert!(matches!(
            mapping_pieces(&ram(), &m),
            Err(BackendError::Unsupported(_))
        ));
    }

    #[test]
    fn mmio_mapping_pieces_are_the_window_host_addresses() {
        // Two adjacent BARs and one further away.
        let bars = [
            RamRegion {
                gpa: 0xe000_0000,
                len: 0x4000,
                hva: 0x7e00_0000_0000,
            },
            RamRegion {
                gpa: 0xe000_4000,
                len: 0x1000,
                hva: 0x7e10_0000_0000,
            },
            RamRegion {
                gpa: 0xe100_0000,
                len: 0x1000,
                hva: 0x7e20_0000_0000,
            },
        ];
        let mut m = rw(0x9000_0000, 0x9000_3fff, 0xe000_2000);
        m.flags |= VIRTIO_IOMMU_MAP_F_MMIO;
        let p = mmio_pieces(&bars, &m).unwrap();
        assert_eq!(
            p,
            [
                DmaPiece {
                    iova: 0x9000_0000,
                    hva: 0x7e00_0000_2000,
                    len: 0x2000,
                    read: true,
                    write: true
                },
                DmaPiece {
                    iova: 0x9000_2000,
                    hva: 0x7e10_0000_0000,
                    len: 0x1000,
                    read: true,
                    write: true
                }
            ]
        );
        // Write-only doorbell: one write piece.
        m.flags = VIRTIO_IOMMU_MAP_F_WRITE | VIRTIO_IOMMU_MAP_F_MMIO;
        m.phys = 0xe100_0000;
        m.end = 0x9000_0fff;
        let p = mmio_pieces(&bars, &m).unwrap();
        assert_eq!(p.len(), 1);
        assert!(p[0].write && !p[0].read);
        assert_eq!(type1_map(&p[0]).vaddr, 0x7e20_0000_0000);
        // No window with host memory there: nothing to map.
        m.phys = 0xd000_0000;
        assert_eq!(mmio_pieces(&bars, &m).unwrap(), vec![]);
    }

    #[test]
    fn mapping_without_access_has_no_pieces_but_is_still_checked() {
        let mut m = rw(0, 0xfff, 0);
        m.flags = 0;
        assert_eq!(mapping_pieces(&ram(), &m).unwrap(), vec![]);
        m.phys = u64::MAX - 0xfff;
        m.end = 0x1fff;
        assert!(mapping_pieces(&ram(), &m).is_err());
    }

    #[test]
    fn read_write_flags_become_vfio_dma_map_flags() {
        let mut m = rw(0x1000, 0x1fff, 0x1000);
        m.flags = VIRTIO_IOMMU_MAP_F_READ;
        let a = type1_map(&mapping_pieces(&ram(), &m).unwrap()[0]);
        assert_eq!(a.flags, VFIO_DMA_MAP_FLAG_READ);
        m.flags = VIRTIO_IOMMU_MAP_F_WRITE;
        let a = type1_map(&mapping_pieces(&ram(), &m).unwrap()[0]);
        assert_eq!(a.flags, VFIO_DMA_MAP_FLAG_WRITE);
    }

    #[test]
    fn vfio_dma_map_bytes_match_the_uapi_layout() {
        // include/uapi/linux/vfio.h: argsz@0 flags@4 vaddr@8 iova@16 size@24.
        assert_eq!(size_of::<vfio_iommu_type1_dma_map>(), 32);
        assert_eq!(offset_of!(vfio_iommu_type1_dma_map, vaddr), 8);
        assert_eq!(offset_of!(vfio_iommu_type1_dma_map, iova), 16);
        assert_eq!(offset_of!(vfio_iommu_type1_dma_map, size), 24);
        let p = mapping_pieces(&ram(), &rw(0x4000_0000, 0x4000_1fff, 0x2000)).unwrap();
        let a = type1_map(&p[0]);
        let mut want = Vec::new();
        want.extend_from_slice(&32u32.to_le_bytes());
        want.extend_from_slice(&3u32.to_le_bytes());
        want.extend_from_slice(&0x7f00_0000_2000u64.to_le_bytes());
        want.extend_from_slice(&0x4000_0000u64.to_le_bytes());
        want.extend_from_slice(&0x2000u64.to_le_bytes());
        assert_eq!(bytes_of(&a), &want[..]);
    }

    #[test]
    fn vfio_dma_unmap_bytes_match_the_uapi_layout() {
        // argsz@0 flags@4 iova@8 size@16, 24 bytes (data[] is empty).
        assert_eq!(size_of::<vfio_iommu_type1_dma_unmap>(), 24);
        let p = DmaPiece {
            iova: 0x5000,
            hva: 0,
            len: 0x3000,
            read: true,
            write: false,
        };
        let a = type1_unmap(&p);
        let mut want = Vec::new();
        want.extend_from_slice(&24u32.to_le_bytes());
        want.extend_from_slice(&0u32.to_le_bytes());
        want.extend_from_slice(&0x5000u64.to_le_bytes());
        want.extend_from_slice(&0x3000u64.to_le_bytes());
        assert_eq!(bytes_of(&a), &want[..]);
    }

    #[test]
    fn ioas_map_bytes_match_the_uapi_layout() {
        // size@0 flags@4 ioas_id@8 __reserved@12 user_va@16 length@24 iova@32.
        assert_eq!(size_of::<iommu_ioas_map>(), 40);
        assert_eq!(offset_of!(iommu_ioas_map, user_va), 16);
        let p = DmaPiece {
            iova: 0x9000,
            hva: 0xabc000,
            len: 0x1000,
            read: true,
            write: true,
        };
        let a = ioas_map(7, &p);
        let mut want = Vec::new();
        want.extend_from_slice(&40u32.to_le_bytes());
        want.extend_from_slice(&(1u32 | 2 | 4).to_le_bytes());
        want.extend_from_slice(&7u32.to_le_bytes());
        want.extend_from_slice(&0u32.to_le_bytes());
        want.extend_from_slice(&0xabc000u64.to_le_bytes());
        want.extend_from_slice(&0x1000u64.to_le_bytes());
        want.extend_from_slice(&0x9000u64.to_le_bytes());
        assert_eq!(bytes_of(&a), &want[..]);
        let u = ioas_unmap(7, &p);
        assert_eq!(bytes_of(&u).len(), 24);
        assert_eq!((u.iova, u.length, u.ioas_id), (0x9000, 0x1000, 7));
    }

    #[test]
    fn misaligned_pieces_are_invalid() {
        let p = DmaPiece {
            iova: 0x1800,
            hva: 0x1000,
            len: 0x1000,
            read: true,
            write: true,
        };
        assert!(matches!(
            check_alignment(&p, 0x1000),
            Err(BackendError::Invalid(_))
        ));
        let p = DmaPiece { iova: 0x2000, ..p };
        assert!(check_alignment(&p, 0x1000).is_ok());
    }

    #[test]
    fn identity_pieces_cover_all_ram() {
        let p = identity_pieces(&ram());
        assert_eq!(p.len(), 4);
        assert!(p.iter().all(|x| x.read && x.write));
        assert_eq!(p[3].iova, 0x1_0000_0000);
    }
}

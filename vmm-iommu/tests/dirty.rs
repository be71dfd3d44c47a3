//! Dirty tracking of emulated DMA (`vmm_iommu::dirty`): a DMA write
//! through an IOVA marks exactly the guest pages its bytes landed in, at
//! the guest-physical address the IOVA translated to, in vm-memory's
//! bitmap of guest memory; reads mark nothing; `take_dirty_pages` returns
//! the pages written since its last call. Through `DmaMemory` and through
//! `IommuMemory` over `EndpointIommu` wrapped in `DirtyIommu`.

use std::sync::Arc;

use vm_memory::bitmap::AtomicBitmap;
use vm_memory::iommu::IommuMemory;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_iommu::config::IommuConfig;
use vmm_iommu::wire::*;
use vmm_iommu::Viommu;
use vmm_iommu::{take_dirty_pages, DirtyIommu};

type Mem = GuestMemoryMmap<AtomicBitmap>;

const EP: u32 = 1;
const MIB: u64 = 1 << 20;

/// 16 MiB of guest RAM with dirty bitmaps, and a vIOMMU whose endpoint 1
/// is in domain 1 with: IOVA 0x10000..0x12fff -> GPA 0x30_0000 (RW),
/// IOVA 0x20000 -> GPA 0x40_0000 and 0x21000 -> GPA 0x80_0000 (two
/// mappings, not contiguous in GPA), IOVA 0x30000 -> GPA 0x50_0000 (read
/// only).
fn setup() -> (Mem, Arc<Viommu>) {
    let mem: Mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), (16 * MIB) as usize)]).unwrap();
    let viommu =
        Arc::new(Viommu::new(&IommuConfig::default(), &[EP], &[(0, 16 * MIB - 1)]).unwrap());
    viommu.set_acked_features(1 << VIRTIO_IOMMU_F_MAP_UNMAP);
    let attach = Request::Attach(AttachReq {
        domain: 1,
        endpoint: EP,
        flags: 0,
        reserved: [0; 4],
    });
    viommu.apply(&attach).unwrap();
    let rw = VIRTIO_IOMMU_MAP_F_READ | VIRTIO_IOMMU_MAP_F_WRITE;
    for (start, end, phys, flags) in [
        (0x10000, 0x12fff, 0x30_0000, rw),
        (0x20000, 0x20fff, 0x40_0000, rw),
        (0x21000, 0x21fff, 0x80_0000, rw),
        (0x30000, 0x30fff, 0x50_0000, VIRTIO_IOMMU_MAP_F_READ),
    ] {
        let map = Request::Map(MapReq {
            domain: 1,
            virt_start: start,
            virt_end: end,
            phys_start: phys,
            flags,
        });
        viommu.apply(&map).unwrap();
    }
    // Whatever set-up wrote is not the DMA's.
    take_dirty_pages(&mem);
    (mem, viommu)
}

/// The three checks, for any DMA view of endpoint 1's memory.
fn writes_dirty_exactly_their_pages<D: Bytes<GuestAddress>>(mem: &Mem, dma: &D)
where
    D::E: std::fmt::Debug,
{
    // 0x1800 bytes from IOVA 0x10800: GPA 0x30_0800..0x30_1fff.
    dma.write_slice(&[0xab; 0x1800], GuestAddress(0x10800))
        .unwrap();
    assert_eq!(take_dirty_pages(mem), vec![0x30_0000, 0x30_1000]);
    // Taken: nothing is left.
    assert_eq!(take_dirty_pages(mem), Vec::<u64>::new());
    // Across two mappings: one page in each, far apart in GPA.
    dma.write_slice(&[1; 0x20], GuestAddress(0x20ff0)).unwrap();
    assert_eq!(take_dirty_pages(mem), vec![0x40_0000, 0x80_0000]);
    // One byte at the end of a page.
    dma.write_obj(7u8, GuestAddress(0x12fff)).unwrap();
    assert_eq!(take_dirty_pages(mem), vec![0x30_2000]);
    // Reads dirty nothing, inside one mapping or across two.
    let mut buf = [0u8; 0x1800];
    dma.read_slice(&mut buf, GuestAddress(0x10800)).unwrap();
    dma.read_slice(&mut buf[..0x20], GuestAddress(0x20ff0))
        .unwrap();
    let _: u64 = dma.read_obj(GuestAddress(0x30000)).unwrap();
    assert_eq!(take_dirty_pages(mem), Vec::<u64>::new());
    // A refused write (read-only mapping, unmapped IOVA) dirties nothing.
    assert!(dma.write_obj(1u8, GuestAddress(0x30000)).is_err());
    assert!(dma.write_obj(1u8, GuestAddress(0x90000)).is_err());
    assert_eq!(take_dirty_pages(mem), Vec::<u64>::new());
    // The bytes are where the pages say.
    let got: u8 = mem.read_obj(GuestAddress(0x30_0800)).unwrap();
    assert_eq!(got, 0xab);
}

#[test]
fn dma_memory_writes_dirty_exactly_the_guest_pages_they_touch() {
    let (mem, viommu) = setup();
    let dma = viommu.dma_memory(EP, mem.clone());
    writes_dirty_exactly_their_pages(&mem, &dma);
}

#[test]
fn iommu_memory_over_a_dirty_endpoint_iommu_dirties_exactly_the_guest_pages() {
    let (mem, viommu) = setup();
    let iommu = DirtyIommu::new(viommu.endpoint_iommu(EP), mem.clone());
    let dma = IommuMemory::new(mem.clone(), iommu, true, AtomicBitmap::default());
    writes_dirty_exactly_their_pages(&mem, &dma);
}

#[test]
fn plain_iommu_memory_logs_iova_pages_not_guest_pages() {
    // Why DirtyIommu exists: vm-memory's IommuMemory logs writes in its
    // own IOVA bitmap, and the guest memory's bitmap stays clean.
    let (mem, viommu) = setup();
    let iova_log = AtomicBitmap::new(1 << 20, std::num::NonZeroUsize::new(0x1000).unwrap());
    let dma = IommuMemory::new(mem.clone(), viommu.endpoint_iommu(EP), true, iova_log);
    dma.write_slice(&[1; 0x10], GuestAddress(0x10800)).unwrap();
    assert_eq!(take_dirty_pages(&mem), Vec::<u64>::new());
    assert!(dma.bitmap().is_addr_set(0x10800));
}

#[test]
fn a_write_after_unmap_and_remap_dirties_the_new_guest_page() {
    let (mem, viommu) = setup();
    let dma = viommu.dma_memory(EP, mem.clone());
    dma.write_obj(1u8, GuestAddress(0x20000)).unwrap();
    let unmap = Request::Unmap(UnmapReq {
        domain: 1,
        virt_start: 0x20000,
        virt_end: 0x20fff,
        reserved: [0; 4],
    });
    viommu.apply(&unmap).unwrap();
    let map = Request::Map(MapReq {
        domain: 1,
        virt_start: 0x20000,
        virt_end: 0x20fff,
        phys_start: 0x90_0000,
        flags: VIRTIO_IOMMU_MAP_F_WRITE,
    });
    viommu.apply(&map).unwrap();
    dma.write_obj(2u8, GuestAddress(0x20000)).unwrap();
    assert_eq!(take_dirty_pages(&mem), vec![0x40_0000, 0x90_0000]);
}

#[test]
fn a_write_racing_with_take_is_marked_again_when_the_access_ends() {
    use vm_memory::iommu::Iommu;
    use vm_memory::Permissions;
    let (mem, viommu) = setup();
    let iommu = DirtyIommu::new(viommu.endpoint_iommu(EP), mem.clone());
    // The device model holds the translation (IommuMemory writes the
    // slices now) while the migration loop takes the dirty pages.
    let held = iommu
        .translate(GuestAddress(0x10000), 0x10, Permissions::Write)
        .unwrap();
    assert_eq!(take_dirty_pages(&mem), vec![0x30_0000]);
    // The access ends: the page is dirty again for the next round.
    drop(held);
    assert_eq!(take_dirty_pages(&mem), vec![0x30_0000]);
    // A read translation marks nothing, held or dropped.
    drop(
        iommu
            .translate(GuestAddress(0x10000), 0x10, Permissions::Read)
            .unwrap(),
    );
    assert_eq!(take_dirty_pages(&mem), Vec::<u64>::new());
    // An access that would end past 2^64 is refused, not wrapped.
    assert!(iommu
        .translate(GuestAddress(u64::MAX - 7), 16, Permissions::Read)
        .is_err());
}

//! Shared setup for the flow tests: guest RAM in three adjacent regions
//! plus one high region, and writers of guest VT-d PASID tables.

#![allow(dead_code)]

use std::sync::Arc;

use vfio_passthrough::host::HostIommu;
use vfio_passthrough::recording::RecordingHost;
use vfio_passthrough::GuestRam;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_iommu::wire::{VIRTIO_IOMMU_MAP_F_READ, VIRTIO_IOMMU_MAP_F_WRITE};
use vmm_iommu::Mapping;

/// 1 MiB at 0, 1 MiB at 1 MiB, 14 MiB at 2 MiB, 1 MiB at 4 GiB.
pub fn guest_memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[
        (GuestAddress(0), 0x10_0000),
        (GuestAddress(0x10_0000), 0x10_0000),
        (GuestAddress(0x20_0000), 0xe0_0000),
        (GuestAddress(0x1_0000_0000), 0x10_0000),
    ])
    .expect("test guest memory")
}

pub fn setup(
    host: RecordingHost,
) -> (
    Arc<RecordingHost>,
    Arc<dyn HostIommu>,
    GuestMemoryMmap,
    GuestRam,
) {
    let mem = guest_memory();
    let ram = GuestRam::new(mem.clone()).expect("regions");
    let rec = Arc::new(host);
    let dynh: Arc<dyn HostIommu> = rec.clone();
    (rec, dynh, mem, ram)
}

pub fn rw(start: u64, end: u64, phys: u64) -> Mapping {
    Mapping {
        start,
        end,
        phys,
        flags: VIRTIO_IOMMU_MAP_F_READ | VIRTIO_IOMMU_MAP_F_WRITE,
    }
}

pub const PASID_DIR: u64 = 0x30_0000;
pub const PASID_TABLE: u64 = 0x31_0000;
pub const ROOT_A: u64 = 0x40_0000;
pub const ROOT_B: u64 = 0x41_0000;

/// Points directory entry 0 at the PASID table (PASIDs 0..63).
pub fn write_pasid_dir(mem: &GuestMemoryMmap) {
    mem.write_obj(PASID_TABLE | 1, GuestAddress(PASID_DIR))
        .expect("dir");
}

/// Writes the 64-byte scalable-mode entry of `pasid` (< 64): first-stage
/// only with root `root`, or not present when `root` is None.
pub fn write_fl_entry(mem: &GuestMemoryMmap, pasid: u64, root: Option<u64>) {
    let mut e = [0u8; 64];
    if let Some(r) = root {
        e[0..8].copy_from_slice(&(1u64 | 1 << 6).to_le_bytes());
        e[16..24].copy_from_slice(&r.to_le_bytes());
    }
    mem.write_slice(&e, GuestAddress(PASID_TABLE + pasid * 64))
        .expect("entry");
}

/// A pass-through entry (PGTT 4), which every backend refuses.
pub fn write_pt_entry(mem: &GuestMemoryMmap, pasid: u64) {
    let mut e = [0u8; 64];
    e[0..8].copy_from_slice(&(1u64 | 4 << 6).to_le_bytes());
    mem.write_slice(&e, GuestAddress(PASID_TABLE + pasid * 64))
        .expect("entry");
}

pub fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

pub fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

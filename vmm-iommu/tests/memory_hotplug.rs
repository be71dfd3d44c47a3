//! Guest memory that changes while the guest runs, end to end through the
//! request queue: RAM plugged and unplugged under a software nested IOMMU
//! whose guest tables live in it, MMIO windows for `MAP_F_MMIO`, and a
//! snapshot that carries the memory map.

use std::sync::{Arc, Mutex};

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap, GuestRegionMmap};
use vmm_iommu::backend::MmioWindow;
use vmm_iommu::config::{IommuConfig, NestedConfig, TableFormat};
use vmm_iommu::emulated::{EmulatedIommu, NestedError};
use vmm_iommu::nested::build::{TableAlloc, VtdPasidTableBuilder, X86TableBuilder};
use vmm_iommu::nested::{x86, Access, Perm};
use vmm_iommu::snapshot::SnapshotError;
use vmm_iommu::testing::{driver_features, Harness};
use vmm_iommu::wire::*;
use vmm_iommu::RamUpdate;
use vmm_iommu::Router;
use vmm_iommu::ACCESS_WRITE;

const EP: u32 = 8;
const RAM_MIB: u64 = 16;
/// A 2 MiB DIMM plugged at 4 GiB.
const DIMM: u64 = 1 << 32;
const DIMM_LEN: u64 = 2 << 20;
const PASID: u32 = 5;
const VA: u64 = 0x40_0000;
/// The data page the guest's tables map `VA` to, in boot RAM.
const DATA: u64 = 0x80_0000;

type Emu = EmulatedIommu<GuestMemoryMmap>;

fn cfg() -> IommuConfig {
    IommuConfig {
        nested: Some(NestedConfig {
            formats: vec![TableFormat::IntelVtd],
            pasid_bits: 16,
        }),
        ..IommuConfig::default()
    }
}

/// A device whose endpoint EP is served by a software nested IOMMU over
/// the harness's guest memory, the driver accepting everything.
fn rig() -> (Harness, Arc<Emu>) {
    let slot: Arc<Mutex<Option<Arc<Emu>>>> = Arc::default();
    let s2 = slot.clone();
    let h = Harness::with_router(
        &cfg(),
        &[EP],
        RAM_MIB,
        &[],
        move |mem, faults| {
            let emu = Arc::new(EmulatedIommu::new(mem.clone(), faults, 16, &[]));
            *s2.lock().unwrap() = Some(emu.clone());
            let mut r = Router::new();
            r.add(emu, &[EP]);
            r
        },
        |d| driver_features(d) | (d.avail_features() & (1 << VIRTIO_IOMMU_F_ATTACH_TABLE)),
    );
    let emu = slot.lock().unwrap().take().unwrap();
    (h, emu)
}

/// The harness's memory with the DIMM plugged.
fn with_dimm(mem: &GuestMemoryMmap) -> GuestMemoryMmap {
    let dimm = GuestRegionMmap::from_range(GuestAddress(DIMM), DIMM_LEN as usize, None).unwrap();
    mem.insert_region(Arc::new(dimm)).unwrap()
}

/// A VT-d PASID directory and 4-level tables, all in `mem` from `at`:
/// PASID `PASID` maps `VA` to `DATA` read-write.
fn vtd_tables(mem: &GuestMemoryMmap, at: u64) -> TableDesc {
    let mut a = TableAlloc::new(mem, at, at + 0x10_0000);
    let dir = VtdPasidTableBuilder::new(&mut a, 16).unwrap();
    let tables = X86TableBuilder::new(&mut a, 4).unwrap();
    tables.map(&mut a, VA, DATA, 12, Perm::RW_USER).unwrap();
    dir.set_first_stage(&mut a, PASID, tables.root(), 4, 1, x86::Flags::default())
        .unwrap();
    TableDesc::IntelVtd {
        pasid_bits: 16,
        pasid_dir_ptr: dir.dir_ptr(),
    }
}

fn bind(h: &mut Harness, t: &TableDesc) -> Status {
    h.send(&Request::AttachTable(AttachTableReq::new(1, EP, t)))
}

fn translate(emu: &Emu) -> Result<u64, NestedError> {
    emu.translate(EP, Some(PASID), VA + 0x18, Access::WRITE)
        .map(|t| t.gpa)
}

#[test]
fn nested_tables_in_plugged_ram_translate_after_the_plug_and_fault_after_the_unplug() {
    let (mut h, emu) = rig();
    let after = with_dimm(&h.mem);
    let table = vtd_tables(&after, DIMM);
    // Not RAM yet: "a pointer outside guest RAM is RANGE" (docs/wire.md).
    assert_eq!(bind(&mut h, &table), Status::Range);

    let plug = RamUpdate {
        start: DIMM,
        len: DIMM_LEN,
        before: &h.mem,
        after: &after,
    };
    h.dev.viommu().add_ram(&plug).unwrap();
    assert_eq!(bind(&mut h, &table), Status::Ok);
    assert_eq!(translate(&emu), Ok(DATA + 0x18));
    // DMA through the guest's tables reaches the data page.
    let dma = vm_memory::iommu::IommuMemory::new(
        after.clone(),
        emu.endpoint_iommu(EP, Some(PASID)),
        true,
        (),
    );
    dma.write_obj(0x5a5a_u32, GuestAddress(VA + 0x18)).unwrap();
    assert_eq!(
        h.mem.read_obj::<u32>(GuestAddress(DATA + 0x18)).unwrap(),
        0x5a5a
    );

    let unplug = RamUpdate {
        start: DIMM,
        len: DIMM_LEN,
        before: &after,
        after: &h.mem,
    };
    h.dev.viommu().remove_ram(&unplug).unwrap();
    // The binding stays as the guest made it, but its tables are gone:
    // the cached translation is dropped and the walk faults.
    assert!(h.dev.viommu().state().domain_table(1).is_some());
    assert!(matches!(translate(&emu), Err(NestedError::Fault(_))));
    h.add_event_buffers(4, 64);
    let faults = h.collect_ext_faults();
    assert_eq!(faults.len(), 1);
    assert_eq!((faults[0].endpoint, faults[0].pasid), (EP, PASID));
    // A new binding there is refused again.
    assert_eq!(
        h.send(&Request::Detach(DetachReq {
            domain: 1,
            endpoint: EP,
        })),
        Status::Ok
    );
    assert_eq!(bind(&mut h, &table), Status::Range);
}

#[test]
fn unplug_refuses_part_of_a_plugged_range() {
    let (h, _emu) = rig();
    let after = with_dimm(&h.mem);
    let v = h.dev.viommu();
    v.add_ram(&RamUpdate {
        start: DIMM,
        len: DIMM_LEN,
        before: &h.mem,
        after: &after,
    })
    .unwrap();
    let half = RamUpdate {
        start: DIMM,
        len: DIMM_LEN / 2,
        before: &after,
        after: &after,
    };
    assert!(v.remove_ram(&half).is_err());
    assert_eq!(v.ram().len(), 2);
}

fn map(domain: u32, virt: u64, phys: u64, flags: u32) -> Request {
    Request::Map(MapReq {
        domain,
        virt_start: virt,
        virt_end: virt + 0xfff,
        phys_start: phys,
        flags,
    })
}

fn attach(domain: u32) -> Request {
    Request::Attach(AttachReq {
        domain,
        endpoint: EP,
        ..Default::default()
    })
}

#[test]
fn map_f_mmio_outside_the_vmm_windows_returns_range() {
    // spec 5.13.6.5: "The VIRTIO_IOMMU_MAP_F_MMIO flag is a memory type
    // rather than a protection flag. It is only available when the
    // VIRTIO_IOMMU_F_MMIO feature has been negotiated." The device maps
    // it only onto MMIO the VMM serves; elsewhere RANGE (docs/wire.md).
    let mut h = Harness::new(&IommuConfig::default(), &[EP]);
    assert_ne!(h.dev.acked_features() & (1 << VIRTIO_IOMMU_F_MMIO), 0);
    assert_eq!(h.send(&attach(2)), Status::Ok);
    let doorbell = 0xd000_0000;
    let f = VIRTIO_IOMMU_MAP_F_WRITE | VIRTIO_IOMMU_MAP_F_MMIO;
    assert_eq!(h.send(&map(2, 0x1000, doorbell, f)), Status::Range);
    // MMIO flag on RAM is refused too: RAM is no window.
    assert_eq!(h.send(&map(2, 0x1000, 0x8000, f)), Status::Range);
    assert_eq!(h.dev.viommu().state().mapping_count(2), 0);

    h.dev
        .viommu()
        .add_mmio_window(MmioWindow {
            gpa: doorbell,
            len: 0x1000,
            hva: None,
        })
        .unwrap();
    assert_eq!(h.send(&map(2, 0x1000, doorbell, f)), Status::Ok);
    // Half in the window, half past it.
    assert_eq!(
        h.send(&Request::Map(MapReq {
            domain: 2,
            virt_start: 0x4000,
            virt_end: 0x5fff,
            phys_start: doorbell,
            flags: f,
        })),
        Status::Range
    );
    // The emulated translators return the MMIO address as any other: the
    // device model's DMA goes to the VMM's bus there.
    let mut t = h.dev.viommu().translator(EP);
    assert_eq!(
        t.translate(0x1040, ACCESS_WRITE).unwrap().0,
        doorbell + 0x40
    );
}

#[test]
fn map_f_mmio_still_needs_f_mmio_negotiated_inside_a_window() {
    // spec 5.13.6.5.2: "If the device doesn't recognize a flags bit, it
    // MUST reject the request and set status to VIRTIO_IOMMU_S_INVAL." —
    // MMIO is unknown without F_MMIO, window or not.
    let mut h = Harness::with_features(&IommuConfig::default(), &[EP], 16, |d| {
        driver_features(d) & !(1 << VIRTIO_IOMMU_F_MMIO)
    });
    h.dev
        .viommu()
        .add_mmio_window(MmioWindow {
            gpa: 0xd000_0000,
            len: 0x1000,
            hva: None,
        })
        .unwrap();
    assert_eq!(h.send(&attach(2)), Status::Ok);
    let f = VIRTIO_IOMMU_MAP_F_WRITE | VIRTIO_IOMMU_MAP_F_MMIO;
    assert_eq!(h.send(&map(2, 0x1000, 0xd000_0000, f)), Status::Inval);
}

#[test]
fn f_mmio_is_offered_without_any_window() {
    // Windows come after FEATURES_OK (a BAR is registered when the guest
    // places it), and Linux refuses its own MMIO maps without the feature.
    let h = Harness::new(&IommuConfig::default(), &[EP]);
    assert!(h.dev.viommu().mmio_windows().is_empty());
    assert_ne!(h.dev.avail_features() & (1 << VIRTIO_IOMMU_F_MMIO), 0);
}

#[test]
fn snapshot_carries_the_memory_map_and_restores_only_onto_the_same() {
    let (mut h, _emu) = rig();
    let after = with_dimm(&h.mem);
    let table = vtd_tables(&after, DIMM);
    let v = h.dev.viommu().clone();
    v.add_ram(&RamUpdate {
        start: DIMM,
        len: DIMM_LEN,
        before: &h.mem,
        after: &after,
    })
    .unwrap();
    let w = MmioWindow {
        gpa: 0xd000_0000,
        len: 0x1000,
        hva: None,
    };
    v.add_mmio_window(w).unwrap();
    assert_eq!(bind(&mut h, &table), Status::Ok);
    // A window that came and went leaves no trace.
    v.remove_mmio_window(w.gpa, w.len).unwrap();
    let snap = h.dev.snapshot().unwrap();
    assert_eq!(
        snap.viommu.ram,
        Some(vec![(0, (RAM_MIB << 20) - 1), (DIMM, DIMM + DIMM_LEN - 1)])
    );
    assert_eq!(snap.viommu.mmio_windows, Some(vec![]));
    let json = snap.to_json().unwrap();
    let back = vmm_iommu::snapshot::DeviceSnapshot::from_json(&json).unwrap();
    assert_eq!(back, snap);

    let router = |mem: &GuestMemoryMmap, faults| {
        let mut r = Router::new();
        r.add(
            Arc::new(EmulatedIommu::new(mem.clone(), faults, 16, &[])),
            &[EP],
        );
        r
    };
    // A device without the DIMM is refused, by name.
    let err = h
        .restored_copy(&cfg(), &[EP], &[], router, &snap)
        .map(|_| ())
        .unwrap_err();
    assert!(
        matches!(
            err,
            SnapshotError::MemoryMap {
                what: "guest RAM",
                ..
            }
        ),
        "{err}"
    );
    // With it, the binding (whose table is in the DIMM) comes back.
    let r = h
        .restored_copy(&cfg(), &[EP], &[(DIMM, DIMM + DIMM_LEN - 1)], router, &snap)
        .unwrap();
    assert!(r.dev.viommu().state().domain_table(1).is_some());
}

#[test]
fn a_restore_replays_mappings_into_a_window_withdrawn_since() {
    let mut h = Harness::new(&IommuConfig::default(), &[EP]);
    let v = h.dev.viommu().clone();
    let w = MmioWindow {
        gpa: 0xd000_0000,
        len: 0x1000,
        hva: None,
    };
    v.add_mmio_window(w).unwrap();
    assert_eq!(h.send(&attach(2)), Status::Ok);
    let f = VIRTIO_IOMMU_MAP_F_WRITE | VIRTIO_IOMMU_MAP_F_MMIO;
    assert_eq!(h.send(&map(2, 0x1000, w.gpa, f)), Status::Ok);
    v.remove_mmio_window(w.gpa, w.len).unwrap();
    let snap = h.dev.snapshot().unwrap();
    let r = h
        .restored_copy(
            &IommuConfig::default(),
            &[EP],
            &[],
            |_, _| Router::new(),
            &snap,
        )
        .unwrap();
    assert_eq!(r.dev.viommu().state().mappings(2)[0].flags, f);
    // A version-1 snapshot (no memory map) is still read; its MAP_F_MMIO
    // mapping is then checked against this device's windows, as any MAP.
    let mut v1 = snap.clone();
    v1.version = 1;
    v1.viommu.ram = None;
    v1.viommu.mmio_windows = None;
    let err = h
        .restored_copy(
            &IommuConfig::default(),
            &[EP],
            &[],
            |_, _| Router::new(),
            &v1,
        )
        .map(|_| ())
        .unwrap_err();
    assert!(matches!(err, SnapshotError::Refused { .. }), "{err}");
}

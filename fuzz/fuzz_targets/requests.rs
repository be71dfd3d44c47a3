//! A hostile driver: the input is a stream of requests (any type byte,
//! any body, any writable size) sent through a real virtqueue to a device
//! with the nested extension and the software nested IOMMU behind it,
//! interleaved with DMA translations. Nothing may panic; every chain gets a
//! status or an unwritten buffer.

#![no_main]

use std::sync::{Arc, Mutex};

use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_iommu::config::{IommuConfig, NestedConfig, TableFormat};
use vmm_iommu::emulated::EmulatedIommu;
use vmm_iommu::nested::Access;
use vmm_iommu::router::Router;
use vmm_iommu::testing::{driver_features, Harness};
use vmm_iommu::wire::{Status, EXT_FAULT_SIZE};

const EPS: [u32; 2] = [8, 9];
/// Where table pointers in the input most likely land: filled from the input.
const TABLES: u64 = 0x80_0000;

fuzz_target!(|data: &[u8]| {
    let cfg = IommuConfig {
        nested: Some(NestedConfig {
            formats: vec![
                TableFormat::IntelVtd,
                TableFormat::ArmSmmuV3,
                TableFormat::ArmLpae,
                TableFormat::X86_64,
            ],
            pasid_bits: 8,
        }),
        ..IommuConfig::default()
    };
    let slot: Arc<Mutex<Option<Arc<EmulatedIommu<GuestMemoryMmap>>>>> = Arc::default();
    let s2 = slot.clone();
    let mut h = Harness::with_router(
        &cfg,
        &EPS,
        16,
        &[],
        move |mem, faults| {
            let emu = Arc::new(EmulatedIommu::new(mem.clone(), faults, 8, &EPS[..1]));
            *s2.lock().unwrap() = Some(emu.clone());
            let mut r = Router::new();
            r.add(emu, &EPS);
            r
        },
        |d| driver_features(d) | (d.avail_features() & (3 << 56)),
    );
    let emu = slot.lock().unwrap().take().unwrap();
    // The first byte says how much of the input (16 bytes a unit) becomes
    // table memory; the rest is the request stream.
    let Some((&n, data)) = data.split_first() else {
        return;
    };
    let (tables, mut rest) = data.split_at(data.len().min(usize::from(n) * 16));
    h.mem.write_slice(tables, GuestAddress(TABLES)).unwrap();
    h.add_event_buffers(8, EXT_FAULT_SIZE as u32);
    let mut sent = 0;
    while rest.len() >= 3 && sent < 64 {
        let len = usize::from(rest[0]) % 96;
        let wlen = u32::from(rest[1]) % 64;
        let translate_va = u64::from(rest[2]) << 12;
        rest = &rest[3..];
        let body = &rest[..len.min(rest.len())];
        rest = &rest[body.len()..];
        let (used, tail) = h.send_raw(&[body], &[wlen]);
        if used >= 4 {
            let st = tail[tail.len() - 4];
            assert!(Status::from_u8(st).is_some() || wlen < 4, "status {st}");
        }
        for ep in EPS {
            for pasid in [None, Some(u32::from(rest.first().copied().unwrap_or(0)))] {
                let _ = emu.translate(ep, pasid, translate_va, Access::WRITE);
            }
        }
        let n = h.collect_ext_faults().len();
        h.add_event_buffers(n, EXT_FAULT_SIZE as u32);
        sent += 1;
    }
});

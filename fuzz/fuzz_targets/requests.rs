//! A hostile driver: the input is a stream of requests (any type byte,
//! any body, any writable size) sent through a real virtqueue to a device
//! with the nested extension and the software nested IOMMU behind it,
//! interleaved with DMA translations, through `EmulatedIommu::translate`,
//! a `NestedTranslator` and the vm-memory adaptor (`NestedIommu` behind an
//! `IommuMemory`), at plain, Arm top-byte tagged and top-of-space
//! addresses (accesses that end exactly at 2^64). Nothing may panic; every
//! chain gets a status or an unwritten buffer.

#![no_main]

use std::sync::{Arc, Mutex};

use libfuzzer_sys::fuzz_target;
use vm_memory::iommu::IommuMemory;
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
        let sel = rest[2];
        // Plain, tagged (a tag byte over a low address) or top of the space.
        let translate_va = match sel & 3 {
            0 | 1 => u64::from(sel) << 12,
            2 => (u64::from(sel) << 56) | (u64::from(sel) << 12) | 0x123,
            _ => u64::MAX - (u64::from(sel) << 4),
        };
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
                let _ = emu
                    .translator(ep, pasid)
                    .translate(translate_va, sel & 4 != 0);
                // The vm-memory adaptor, with a length that may end the
                // access exactly at 2^64 (never past it).
                let dma = IommuMemory::new(h.mem.clone(), emu.endpoint_iommu(ep, pasid), true, ());
                let room = u64::MAX - translate_va + 1;
                let len = (u64::from(sel) * 37 % 0x2100 + 1).min(room) as usize;
                let mut buf = vec![0u8; len];
                if sel & 4 != 0 {
                    let _ = dma.write_slice(&buf, GuestAddress(translate_va));
                } else {
                    let _ = dma.read_slice(&mut buf, GuestAddress(translate_va));
                }
            }
        }
        let n = h.collect_ext_faults().len();
        h.add_event_buffers(n, EXT_FAULT_SIZE as u32);
        sent += 1;
    }
});

//! A hostile driver: the input is a stream of chains of any shape (any
//! number of readable and writable descriptors in any order, direct or
//! through an indirect table, any bytes, PROBE buffers up to and beyond
//! `probe_size`) sent through a real virtqueue to a device with the nested
//! extension and the software nested IOMMU behind it, interleaved with DMA
//! translations: MAP-mode and bypass through the vIOMMU state, nested
//! through `EmulatedIommu::translate`, a `NestedTranslator` and the
//! vm-memory adaptor (`NestedIommu` behind an `IommuMemory`), at plain, Arm
//! top-byte tagged and top-of-space addresses (accesses that end exactly
//! at 2^64).
//!
//! Also (issue 12): an MMIO window is registered, so `MAP_F_MMIO` requests
//! can succeed inside it, and a shape byte of 0x3f plugs or unplugs a DIMM
//! (`Viommu::add_ram` / `remove_ram`, the software IOMMU switching memory).
//!
//! Checked after every chain (issue 11), beyond "nothing panics":
//! - the used length is at most the chain's writable size, and every
//!   writable byte at or past the used length is untouched (still the
//!   harness's 0xa5 poison);
//! - a chain whose writable part ends in a 4-byte tail gets a valid status
//!   there, or is returned unused;
//! - a PROBE answered OK had a buffer of at least `probe_size` bytes of
//!   properties before its tail (virtio-iommu 5.13.6.8);
//! - every MAP-mode / bypass translation that succeeds lies inside a
//!   mapping of the endpoint's domain (found by a linear scan of the
//!   state's mappings, not the mapping table's search) that grants the
//!   access, at the address that mapping gives; or is the identity for a
//!   bypass domain or an unattached endpoint with bypass on;
//! - `DmaMemory` and the `Translator` (IOTLBs filled from the lock-free
//!   index) answer every MAP-mode / bypass translation exactly as the state
//!   does, granted or refused, at the same address;
//! - every nested translation that succeeds is a page of a power-of-two
//!   size of at least 4 KiB containing the address, at the same offset in
//!   the output page, writable if a write was asked for.

#![no_main]

use std::sync::{Arc, Mutex};

use libfuzzer_sys::fuzz_target;
use vm_memory::iommu::IommuMemory;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap, GuestRegionMmap};
use vmm_iommu::backend::MmioWindow;
use vmm_iommu::config::{IommuConfig, NestedConfig, TableFormat};
use vmm_iommu::emulated::EmulatedIommu;
use vmm_iommu::nested::Access;
use vmm_iommu::testing::{driver_features, Harness};
use vmm_iommu::wire::{Status, EXT_FAULT_SIZE, VIRTIO_IOMMU_MAP_F_READ, VIRTIO_IOMMU_MAP_F_WRITE};
use vmm_iommu::{DmaMemory, RamUpdate, Router, Translator};
use vmm_iommu::{ACCESS_READ, ACCESS_WRITE};

/// Endpoints 8 and 9 are served by the software nested IOMMU; 10 only by
/// the vIOMMU state (MAP mode, bypass).
const EPS: [u32; 3] = [8, 9, 10];
/// Where table pointers in the input most likely land: filled from the input.
const TABLES: u64 = 0x80_0000;
/// A chain's pieces and writable bytes stay within one harness slot.
const MAX_PIECES: usize = 8;
const MAX_PIECE: usize = 0x300;
/// The MMIO window `MAP_F_MMIO` mappings may point into.
const WINDOW: u64 = 0xfe00_0000;
/// The DIMM a 0x3f shape byte plugs or unplugs.
const DIMM: u64 = 0x4000_0000;
const DIMM_LEN: u64 = 1 << 20;

struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn byte(&mut self) -> Option<u8> {
        let (&b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(b)
    }
    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_le_bytes([self.byte()?, self.byte()?]))
    }
    fn bytes(&mut self, n: usize) -> &[u8] {
        let (a, b) = self.0.split_at(n.min(self.0.len()));
        self.0 = b;
        a
    }
}

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
    let probe_size = cfg.probe_size;
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
            r.add(emu, &EPS[..2]);
            r
        },
        |d| driver_features(d) | (d.avail_features() & (3 << 56)),
    );
    let emu = slot.lock().unwrap().take().unwrap();
    let viommu = h.dev.viommu().clone();
    viommu
        .add_mmio_window(MmioWindow {
            gpa: WINDOW,
            len: 1 << 20,
            hva: None,
        })
        .unwrap();
    let without_dimm = h.mem.clone();
    let dimm = GuestRegionMmap::from_range(GuestAddress(DIMM), DIMM_LEN as usize, None).unwrap();
    let with_dimm = without_dimm.insert_region(Arc::new(dimm)).unwrap();
    let mut plugged = false;
    let caches: Vec<(u32, DmaMemory<GuestMemoryMmap>, Translator)> = [EPS[0], EPS[2]]
        .iter()
        .map(|&ep| {
            (
                ep,
                viommu.dma_memory(ep, h.mem.clone()),
                viommu.translator(ep),
            )
        })
        .collect();
    let mut caches = caches;
    let mut input = Input(data);
    // The first byte says how much of the input (16 bytes a unit) becomes
    // table memory; the rest is the request stream.
    let Some(n) = input.byte() else {
        return;
    };
    let tables = input.bytes(usize::from(n) * 16).to_vec();
    h.mem.write_slice(&tables, GuestAddress(TABLES)).unwrap();
    h.add_event_buffers(8, EXT_FAULT_SIZE as u32);
    let mut sent = 0;
    while sent < 48 {
        // Chain header: shape byte, selector byte.
        let (Some(shape), Some(sel)) = (input.byte(), input.byte()) else {
            break;
        };
        if shape == 0x3f {
            let (before, after) = if plugged {
                (&with_dimm, &without_dimm)
            } else {
                (&without_dimm, &with_dimm)
            };
            let update = RamUpdate {
                start: DIMM,
                len: DIMM_LEN,
                before,
                after,
            };
            let r = if plugged {
                viommu.remove_ram(&update)
            } else {
                viommu.add_ram(&update)
            };
            assert!(r.is_ok(), "DIMM plug/unplug refused: {r:?}");
            plugged = !plugged;
            continue;
        }
        let indirect = shape & 0x80 != 0;
        let npieces = 1 + usize::from(shape & 7) % MAX_PIECES;
        let mut owned: Vec<Result<Vec<u8>, u32>> = Vec::new();
        for i in 0..npieces {
            let Some(len) = input.u16() else { break };
            let writable = len & 0x8000 != 0;
            let len = usize::from(len & 0x7fff) % MAX_PIECE;
            if writable {
                // Every other chain with a PROBE-sized last buffer: up to
                // and beyond probe_size + the tail.
                let w = if shape & 0x40 != 0 && i + 1 == npieces {
                    (probe_size as usize + 4).saturating_sub(8) + len % 16
                } else {
                    len
                };
                owned.push(Err(w as u32));
            } else {
                owned.push(Ok(input.bytes(len).to_vec()));
            }
        }
        if owned.is_empty() {
            break;
        }
        let pieces: Vec<Result<&[u8], u32>> = owned
            .iter()
            .map(|p| p.as_ref().map(|v| &v[..]).map_err(|w| *w))
            .collect();
        let wsize: u32 = pieces.iter().filter_map(|p| p.err()).sum();
        let (used, wbytes) = h.send_chain(&pieces, indirect);
        // Used length: at most what the driver offered.
        assert!(used <= wsize, "used {used} > writable {wsize}");
        // Nothing written past the used length.
        assert!(
            wbytes[used as usize..].iter().all(|&b| b == 0xa5),
            "bytes past the used length {used} were written"
        );
        let readable_first = pieces
            .iter()
            .position(|p| p.is_err())
            .is_none_or(|w| pieces[w..].iter().all(|p| p.is_err()));
        let head = pieces
            .iter()
            .find_map(|p| p.ok().filter(|r| !r.is_empty()))
            .map(|r| r[0]);
        if used > 0 && readable_first && used == wsize && wsize >= 4 {
            let st = wbytes[wbytes.len() - 4];
            assert!(Status::from_u8(st).is_some(), "status {st}");
            // PROBE (type 5) answered OK: its properties filled at least
            // probe_size bytes.
            if head == Some(5) && Status::from_u8(st) == Some(Status::Ok) {
                assert!(wsize - 4 >= probe_size, "PROBE OK with {wsize} bytes");
            }
        }
        // Translations.
        let translate_va = match sel & 3 {
            0 | 1 => u64::from(sel) << 12,
            2 => (u64::from(sel) << 56) | (u64::from(sel) << 12) | 0x123,
            _ => u64::MAX - (u64::from(sel) << 4),
        };
        let write = sel & 4 != 0;
        check_map_mode(&h, EPS[2], translate_va, write);
        check_map_mode(&h, EPS[0], translate_va, write);
        for (ep, dma, tr) in caches.iter_mut() {
            check_caches_agree(&h, *ep, dma, tr, translate_va, write);
            // A neighbour page too: IOTLB entries of earlier chains are
            // checked against what the requests since did to them.
            check_caches_agree(&h, *ep, dma, tr, translate_va ^ 0x1000, write);
        }
        for ep in &EPS[..2] {
            let ep = *ep;
            for pasid in [None, Some(u32::from(sel >> 3))] {
                let a = if write { Access::WRITE } else { Access::READ };
                if let Ok(t) = emu.translate(ep, pasid, translate_va, a) {
                    check_nested(translate_va, t.gpa, t.page_start, t.page_last);
                    assert!(
                        !write || t.writable,
                        "a write translated to a read-only page"
                    );
                }
                let _ = emu.translator(ep, pasid).translate(translate_va, write);
                // The vm-memory adaptor, with a length that may end the
                // access exactly at 2^64 (never past it).
                let dma = IommuMemory::new(h.mem.clone(), emu.endpoint_iommu(ep, pasid), true, ());
                // From address 0 the room is 2^64 bytes, more than a u64.
                let room = (u64::MAX - translate_va).checked_add(1).unwrap_or(u64::MAX);
                let len = (u64::from(sel) * 37 % 0x2100 + 1).min(room) as usize;
                let mut buf = vec![0u8; len];
                if write {
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

/// A nested translation is a page containing `va`, of a power-of-two size
/// ≥ 4 KiB, at the same offset in the output page.
fn check_nested(va: u64, gpa: u64, start: u64, last: u64) {
    assert!(
        start <= va && va <= last,
        "{va:#x} outside [{start:#x}, {last:#x}]"
    );
    let size = (last - start).wrapping_add(1);
    // A page of 2^64 bytes would be size 0 here; no regime has one.
    assert!(
        size >= 4096 && size.is_power_of_two(),
        "page size {size:#x}"
    );
    assert_eq!(
        gpa & (size - 1),
        (va - start) & (size - 1),
        "offset in page"
    );
}

/// `DmaMemory` and the `Translator` answer as the state does: both refuse
/// what it refuses, both grant what it grants, at its address.
fn check_caches_agree(
    h: &Harness,
    ep: u32,
    dma: &DmaMemory<GuestMemoryMmap>,
    tr: &mut Translator,
    va: u64,
    write: bool,
) {
    let access = if write { ACCESS_WRITE } else { ACCESS_READ };
    let want = h.dev.viommu().translate(ep, va, access).map(|t| t.gpa(va));
    let got = dma.translate(va, access).map(|(gpa, _)| gpa);
    assert_eq!(
        got.ok(),
        want.ok(),
        "DmaMemory vs state at {va:#x} (endpoint {ep})"
    );
    let got = tr.translate(va, access).map(|(gpa, _)| gpa);
    assert_eq!(
        got.ok(),
        want.ok(),
        "Translator vs state at {va:#x} (endpoint {ep})"
    );
}

/// A MAP-mode or bypass translation that succeeds is granted by the state
/// (linear scan of the domain's mappings).
fn check_map_mode(h: &Harness, ep: u32, va: u64, write: bool) {
    let viommu = h.dev.viommu();
    let access = if write { ACCESS_WRITE } else { ACCESS_READ };
    let Ok(t) = viommu.translate(ep, va, access) else {
        return;
    };
    assert!(
        t.iova_start <= va && va <= t.iova_last,
        "window misses {va:#x}"
    );
    let gpa = t.phys_start.wrapping_add(va - t.iova_start);
    let st = viommu.state();
    let identity = match st.endpoint(ep).and_then(|e| e.domain) {
        None => st.unattached_bypass(),
        Some(d) => st.is_bypass_domain(d) == Some(true),
    };
    if identity {
        assert_eq!(gpa, va, "bypass is the identity");
        return;
    }
    let d = st
        .endpoint(ep)
        .and_then(|e| e.domain)
        .expect("a translation without a domain or bypass");
    let want = if write {
        VIRTIO_IOMMU_MAP_F_WRITE
    } else {
        VIRTIO_IOMMU_MAP_F_READ
    };
    let m = st
        .mappings(d)
        .into_iter()
        .find(|m| m.start <= va && va <= m.end)
        .unwrap_or_else(|| panic!("{va:#x} translated without a mapping in domain {d}"));
    assert!(
        m.flags & want != 0,
        "mapping {m:?} does not grant {access:#x}"
    );
    assert_eq!(gpa, m.phys.wrapping_add(va - m.start), "address of {m:?}");
    assert!(
        m.start <= t.iova_start && t.iova_last <= m.end,
        "window [{:#x}, {:#x}] beyond {m:?}",
        t.iova_start,
        t.iova_last
    );
}

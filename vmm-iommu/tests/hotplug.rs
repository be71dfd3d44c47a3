//! Endpoints plugged and unplugged while the device runs
//! (`Viommu::add_endpoint` / `remove_endpoint`): a plugged endpoint is an
//! endpoint like the others, with its backend; an unplugged one is
//! detached first (its domain ends with it if it was the last), its faults
//! and page requests are dropped, its backend is told, and it is NOENT
//! again. Nothing else changes, including for requests that keep coming
//! for other endpoints from another thread.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vm_memory::iommu::IommuMemory;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_iommu::backend::{BackendCaps, IommuBackend, TableBinding};
use vmm_iommu::config::{IommuConfig, NestedConfig, TableFormat};
use vmm_iommu::emulated::{EmulatedIommu, NestedError, PageRequestState};
use vmm_iommu::nested::build::{TableAlloc, VtdPasidTableBuilder, X86TableBuilder};
use vmm_iommu::nested::{x86, Access, Perm};
use vmm_iommu::testing::{driver_features, BackendCall, Harness, RecordingBackend};
use vmm_iommu::wire::*;
use vmm_iommu::HotplugError;
use vmm_iommu::Router;
use vmm_iommu::{ACCESS_READ, ACCESS_WRITE};

const PAGE: u64 = 0x1000;
const PHYS: u64 = 0x50_0000;
/// Endpoints the device is built with.
const EP: u32 = 1;
const EP2: u32 = 2;
/// The endpoint plugged at run time.
const HOT: u32 = 7;

fn nested_cfg() -> IommuConfig {
    IommuConfig {
        nested: Some(NestedConfig {
            formats: vec![TableFormat::IntelVtd, TableFormat::X86_64],
            pasid_bits: 16,
        }),
        ..IommuConfig::default()
    }
}

fn harness() -> Harness {
    Harness::with_features(&nested_cfg(), &[EP, EP2], 16, |d| {
        driver_features(d) | (d.avail_features() & (1 << 56))
    })
}

fn attach(domain: u32, endpoint: u32) -> Request {
    Request::Attach(AttachReq {
        domain,
        endpoint,
        flags: 0,
        reserved: [0; 4],
    })
}

fn detach(domain: u32, endpoint: u32) -> Request {
    Request::Detach(DetachReq { domain, endpoint })
}

fn map(domain: u32, page: u64, phys: u64) -> Request {
    Request::Map(MapReq {
        domain,
        virt_start: page * PAGE,
        virt_end: page * PAGE + PAGE - 1,
        phys_start: phys,
        flags: VIRTIO_IOMMU_MAP_F_READ | VIRTIO_IOMMU_MAP_F_WRITE,
    })
}

fn unmap(domain: u32, page: u64) -> Request {
    Request::Unmap(UnmapReq {
        domain,
        virt_start: page * PAGE,
        virt_end: page * PAGE + PAGE - 1,
        reserved: [0; 4],
    })
}

fn vtd_table() -> TableDesc {
    TableDesc::IntelVtd {
        pasid_bits: 16,
        pasid_dir_ptr: 0x60_0000,
    }
}

#[test]
fn a_plugged_endpoint_probes_attaches_maps_and_translates() {
    let mut h = harness();
    assert_eq!(h.probe(HOT, 512).0, Status::NoEnt);
    h.dev.viommu().add_endpoint(HOT, None).unwrap();
    assert_eq!(h.probe(HOT, 512).0, Status::Ok);
    assert_eq!(h.send(&attach(3, HOT)), Status::Ok);
    assert_eq!(h.send(&map(3, 4, PHYS)), Status::Ok);
    let t = h.dev.viommu().translate(HOT, 4 * PAGE + 8, ACCESS_WRITE);
    assert_eq!(t.map(|t| t.gpa(4 * PAGE + 8)), Ok(PHYS + 8));
    // Without a backend it advertises no table format: ATTACH_TABLE is
    // UNSUPP, as for a built-in endpoint without one.
    let at = Request::AttachTable(AttachTableReq::new(4, HOT, &vtd_table()));
    assert_eq!(h.send(&at), Status::Unsupp);
}

#[test]
fn plugging_an_endpoint_that_exists_is_refused() {
    let h = harness();
    assert_eq!(
        h.dev.viommu().add_endpoint(EP, None),
        Err(HotplugError::Exists(EP))
    );
    assert_eq!(
        h.dev.viommu().remove_endpoint(HOT),
        Err(HotplugError::NoEndpoint(HOT))
    );
}

#[test]
fn a_plugged_endpoint_is_served_by_its_backend() {
    let mut h = harness();
    let rec = Arc::new(RecordingBackend::nested("hot"));
    h.dev
        .viommu()
        .add_endpoint(HOT, Some(rec.clone() as Arc<dyn IommuBackend>))
        .unwrap();
    let at = Request::AttachTable(AttachTableReq::new(4, HOT, &vtd_table()));
    assert_eq!(h.send(&at), Status::Ok);
    assert_eq!(h.send(&attach(5, HOT)), Status::Ok);
    assert_eq!(h.send(&map(5, 1, PHYS)), Status::Ok);
    let calls = rec.calls();
    assert_eq!(
        calls,
        vec![
            BackendCall::BindTable(
                HOT,
                TableBinding {
                    domain: 4,
                    table: vtd_table()
                }
            ),
            BackendCall::UnbindTable(HOT, 4),
            BackendCall::Attach(HOT, 5, 0),
            BackendCall::Map(5, h.dev.viommu().state().mappings(5)[0]),
        ]
    );
}

#[test]
fn a_backend_narrower_than_the_device_is_refused() {
    let h = harness();
    let big_pages = RecordingBackend::new("2m", BackendCaps::map_only(1 << 21, (0, u64::MAX)));
    let err = h
        .dev
        .viommu()
        .add_endpoint(HOT, Some(Arc::new(big_pages)))
        .unwrap_err();
    assert!(
        matches!(
            err,
            HotplugError::PageSize {
                granule: 0x1000,
                ..
            }
        ),
        "{err}"
    );
    let short = RecordingBackend::new("short", BackendCaps::map_only(!0xfff, (0, 0xffff_ffff)));
    let err = h
        .dev
        .viommu()
        .add_endpoint(HOT, Some(Arc::new(short)))
        .unwrap_err();
    assert!(
        matches!(
            err,
            HotplugError::InputRange {
                end: 0xffff_ffff,
                ..
            }
        ),
        "{err}"
    );
    // Nothing was plugged.
    assert!(h.dev.viommu().state().endpoint(HOT).is_none());
}

#[test]
fn unplugging_attached_endpoints_detaches_them_and_ends_the_domain_with_the_last() {
    let mut h = harness();
    let rec = Arc::new(RecordingBackend::nested("hot"));
    for ep in [HOT, HOT + 1] {
        h.dev
            .viommu()
            .add_endpoint(ep, Some(rec.clone() as Arc<dyn IommuBackend>))
            .unwrap();
        assert_eq!(h.send(&attach(3, ep)), Status::Ok);
    }
    assert_eq!(h.send(&map(3, 2, PHYS)), Status::Ok);
    let before = rec.calls().len();
    h.dev.viommu().remove_endpoint(HOT).unwrap();
    assert_eq!(
        rec.calls()[before..],
        [
            BackendCall::Detach(HOT, 3),
            BackendCall::RemoveEndpoint(HOT)
        ]
    );
    // The domain lives on with the other endpoint and its mapping.
    assert_eq!(h.dev.viommu().state().domain_endpoints(3), &[HOT + 1]);
    assert_eq!(h.dev.viommu().state().mapping_count(3), 1);
    h.dev.viommu().remove_endpoint(HOT + 1).unwrap();
    assert_eq!(h.dev.viommu().state().domain_count(), 0);
    assert_eq!(h.dev.viommu().state().total_mappings(), 0);
    assert_eq!(h.send(&map(3, 2, PHYS)), Status::NoEnt);
    // A removed endpoint is NOENT again, for every request naming it.
    assert_eq!(h.send(&attach(3, HOT)), Status::NoEnt);
    assert_eq!(h.send(&detach(3, HOT)), Status::NoEnt);
    assert_eq!(h.probe(HOT, 512).0, Status::NoEnt);
    let at = Request::AttachTable(AttachTableReq::new(4, HOT, &vtd_table()));
    assert_eq!(h.send(&at), Status::NoEnt);
}

#[test]
fn unplugging_a_table_endpoint_unbinds_it() {
    let mut h = harness();
    let rec = Arc::new(RecordingBackend::nested("hot"));
    h.dev
        .viommu()
        .add_endpoint(HOT, Some(rec.clone() as Arc<dyn IommuBackend>))
        .unwrap();
    let at = Request::AttachTable(AttachTableReq::new(4, HOT, &vtd_table()));
    assert_eq!(h.send(&at), Status::Ok);
    h.dev.viommu().remove_endpoint(HOT).unwrap();
    assert_eq!(
        rec.calls()[1..],
        [
            BackendCall::UnbindTable(HOT, 4),
            BackendCall::RemoveEndpoint(HOT)
        ]
    );
    assert!(h.dev.viommu().state().domain_table(4).is_none());
}

#[test]
fn unplugging_drops_its_fault_records_only() {
    let mut h = harness();
    h.dev.viommu().add_endpoint(HOT, None).unwrap();
    // Both refused (unattached, no bypass): two records wait.
    for ep in [HOT, EP] {
        assert!(h
            .dev
            .viommu()
            .translator(ep)
            .translate(0, ACCESS_READ)
            .is_err());
    }
    assert_eq!(h.dev.viommu().faults().len(), 2);
    h.dev.viommu().remove_endpoint(HOT).unwrap();
    h.add_event_buffers(4, EXT_FAULT_SIZE as u32);
    let recs = h.collect_ext_faults();
    assert_eq!(recs.len(), 1);
    assert_eq!(recs[0].endpoint, EP);
}

#[test]
fn dma_of_an_unplugged_endpoint_is_refused_and_not_reported() {
    let mut h = harness();
    h.dev.viommu().add_endpoint(HOT, None).unwrap();
    assert_eq!(h.send(&attach(3, HOT)), Status::Ok);
    assert_eq!(h.send(&map(3, 4, PHYS)), Status::Ok);
    let dma = IommuMemory::new(h.mem.clone(), h.dev.viommu().endpoint_iommu(HOT), true, ());
    let mut t = h.dev.viommu().translator(HOT);
    h.mem.write_obj(0x5au8, GuestAddress(PHYS)).unwrap();
    assert_eq!(dma.read_obj::<u8>(GuestAddress(4 * PAGE)).unwrap(), 0x5a);
    assert!(t.translate(4 * PAGE, ACCESS_READ).is_ok());
    h.dev.viommu().remove_endpoint(HOT).unwrap();
    // Cached translations die with the generation.
    assert!(dma.read_obj::<u8>(GuestAddress(4 * PAGE)).is_err());
    assert!(t.translate(4 * PAGE, ACCESS_READ).is_err());
    // spec 5.13.6.8.2: "The device SHOULD write a valid endpoint ID":
    // nothing is queued for a gone endpoint.
    assert!(h.dev.viommu().faults().is_empty());
}

#[test]
fn a_replugged_endpoint_starts_unattached() {
    let mut h = harness();
    h.dev.viommu().add_endpoint(HOT, None).unwrap();
    assert_eq!(h.send(&attach(3, HOT)), Status::Ok);
    h.dev.viommu().remove_endpoint(HOT).unwrap();
    h.dev.viommu().add_endpoint(HOT, None).unwrap();
    assert_eq!(
        h.dev.viommu().state().endpoint(HOT).map(|e| e.domain),
        Some(None)
    );
    assert_eq!(h.send(&detach(3, HOT)), Status::Inval);
}

#[test]
fn a_snapshot_after_hotplug_restores_once_the_endpoint_is_plugged_again() {
    let mut h = harness();
    h.dev.viommu().add_endpoint(HOT, None).unwrap();
    assert_eq!(h.send(&attach(3, HOT)), Status::Ok);
    assert_eq!(h.send(&map(3, 4, PHYS)), Status::Ok);
    let snap = h.dev.snapshot().unwrap();
    assert_eq!(snap.viommu.endpoints, vec![EP, EP2, HOT]);
    let err = h
        .restored_copy(&nested_cfg(), &[EP, EP2], &[], |_, _| Router::new(), &snap)
        .map(|_| ())
        .unwrap_err();
    assert!(
        matches!(
            err,
            vmm_iommu::snapshot::SnapshotError::UnknownEndpoint(HOT)
        ),
        "{err}"
    );
    let b = h
        .restored_copy(
            &nested_cfg(),
            &[EP, EP2, HOT],
            &[],
            |_, _| Router::new(),
            &snap,
        )
        .unwrap();
    let t = b.dev.viommu().translate(HOT, 4 * PAGE, ACCESS_READ);
    assert_eq!(t.map(|t| t.gpa(4 * PAGE)), Ok(PHYS));
}

type Emu = EmulatedIommu<GuestMemoryMmap>;

#[test]
fn unplugging_drops_its_page_requests_and_wakes_a_waiting_device() {
    const PR_EP: u32 = 8;
    const PASID: u32 = 5;
    let slot: Arc<Mutex<Option<Arc<Emu>>>> = Arc::default();
    let s2 = slot.clone();
    let mut h = Harness::with_router(
        &nested_cfg(),
        &[PR_EP],
        32,
        &[],
        move |mem, faults| {
            let emu: Arc<Emu> = Arc::new(EmulatedIommu::new(mem.clone(), faults, 16, &[PR_EP]));
            *s2.lock().unwrap() = Some(emu.clone());
            let mut r = Router::new();
            r.add(emu, &[PR_EP]);
            r
        },
        |d| driver_features(d) | (d.avail_features() & ((1 << 56) | (1 << 57))),
    );
    let emu = slot.lock().unwrap().take().unwrap();
    let mut a = TableAlloc::new(&h.mem, 0x100_0000, 0x120_0000);
    let dir = VtdPasidTableBuilder::new(&mut a, 16).unwrap();
    let tables = X86TableBuilder::new(&mut a, 4).unwrap();
    tables
        .map(&mut a, 0x40_0000, 0x180_0000, 12, Perm::RW_USER)
        .unwrap();
    dir.set_first_stage(&mut a, PASID, tables.root(), 4, 1, x86::Flags::default())
        .unwrap();
    let desc = TableDesc::IntelVtd {
        pasid_bits: 16,
        pasid_dir_ptr: dir.dir_ptr(),
    };
    let at = Request::AttachTable(AttachTableReq::new(1, PR_EP, &desc));
    assert_eq!(h.send(&at), Status::Ok);
    let grpid = match emu.translate(PR_EP, Some(PASID), 0x50_0000, Access::WRITE) {
        Err(NestedError::PageRequest { grpid }) => grpid,
        other => panic!("{other:?}"),
    };
    // A device thread waits for the answer while the endpoint goes away.
    let e2 = emu.clone();
    let waiter = std::thread::spawn(move || {
        e2.wait_page_response(PR_EP, Some(PASID), grpid, Duration::from_secs(20))
    });
    std::thread::sleep(Duration::from_millis(50));
    h.dev.viommu().remove_endpoint(PR_EP).unwrap();
    assert_eq!(waiter.join().unwrap(), PageRequestState::Unknown);
    assert_eq!(
        emu.page_request_state(PR_EP, Some(PASID), grpid),
        PageRequestState::Unknown
    );
    assert!(emu.binding(PR_EP).is_none());
    // Its page-request record is gone from the queue, and a late answer
    // names an endpoint that does not exist.
    assert!(h.dev.viommu().faults().is_empty());
    let resp = PageRespReq {
        endpoint: PR_EP,
        flags: VIRTIO_IOMMU_PAGE_RESP_F_PASID_VALID,
        pasid: PASID,
        grpid,
        code: VIRTIO_IOMMU_PAGE_RESP_SUCCESS,
        reserved_set: false,
    };
    assert_eq!(h.send(&Request::PageResp(resp)), Status::NoEnt);
}

/// One notification of `pairs` MAP+UNMAP pairs on `domain`; every status
/// must be OK.
fn pairs(h: &mut Harness, domain: u32, pairs: u64, page0: u64) {
    let mut reqs = Vec::with_capacity(2 * pairs as usize);
    for i in 0..pairs {
        reqs.push(map(domain, page0 + i, PHYS + (i % 16) * PAGE));
        reqs.push(unmap(domain, page0 + i));
    }
    let st = h.send_batch(&reqs);
    assert!(st.iter().all(|&s| s == Status::Ok), "{st:?}");
}

#[test]
fn plugging_while_requests_for_other_endpoints_keep_coming() {
    let mut h = harness();
    assert_eq!(h.send(&attach(1, EP)), Status::Ok);
    let viommu = h.dev.viommu().clone();
    let stop = Arc::new(AtomicBool::new(false));
    let plugs = Arc::new(AtomicU64::new(0));
    let (stop2, plugs2) = (stop.clone(), plugs.clone());
    let plugger = std::thread::spawn(move || {
        let rec: Arc<dyn IommuBackend> = Arc::new(RecordingBackend::nested("hot"));
        while !stop2.load(Ordering::Relaxed) {
            viommu.add_endpoint(HOT, Some(rec.clone())).unwrap();
            std::thread::yield_now();
            viommu.remove_endpoint(HOT).unwrap();
            plugs2.fetch_add(1, Ordering::Relaxed);
        }
    });
    // The guest keeps mapping for endpoint 1 and, when it can, attaches
    // the hot endpoint: OK while it is plugged, NOENT while it is not.
    let mut hot_ok = 0;
    for round in 0..200u64 {
        pairs(&mut h, 1, 64, round * 64);
        match h.send(&attach(2, HOT)) {
            Status::Ok => hot_ok += 1,
            Status::NoEnt => {}
            s => panic!("ATTACH of the hot endpoint: {s:?}"),
        }
    }
    stop.store(true, Ordering::Relaxed);
    plugger.join().unwrap();
    assert!(plugs.load(Ordering::Relaxed) > 0);
    // Endpoint 1's domain holds exactly what the guest left: nothing.
    let st = h.dev.viommu().state();
    assert_eq!(st.mapping_count(1), 0);
    assert_eq!(st.endpoint(EP).map(|e| e.domain), Some(Some(1)));
    // The hot endpoint is unplugged; its domain ended with it.
    assert!(st.endpoint(HOT).is_none());
    assert_eq!(st.domain_count(), 1);
    eprintln!(
        "{} plug/unplug cycles; the hot endpoint attached {hot_ok} times of 200",
        plugs.load(Ordering::Relaxed)
    );
}

/// MAP+UNMAP pairs per second (64 pairs a notification, endpoint 1)
/// without hot-plug, then while another thread plugs and unplugs an
/// endpoint with a backend as fast as it can; and the time of one plug
/// and one unplug meanwhile. Prints; asserts no time.
#[test]
#[ignore = "figures: run with --release -- --ignored --nocapture"]
fn figures_pairs_per_second_before_and_during_hotplug() {
    let mut h = harness();
    assert_eq!(h.send(&attach(1, EP)), Status::Ok);
    // A fixed amount of work, timed (a figure, never a bound).
    let run = |h: &mut Harness, notifications: u64| {
        let t = Instant::now();
        for _ in 0..notifications {
            pairs(h, 1, 64, 0);
        }
        (notifications * 64) as f64 / t.elapsed().as_secs_f64()
    };
    run(&mut h, 2_000);
    let before = run(&mut h, 20_000);
    let viommu = h.dev.viommu().clone();
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    let plugger = std::thread::spawn(move || {
        let emu: Arc<Emu> = Arc::new(EmulatedIommu::new(
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap(),
            viommu.fault_queue(),
            16,
            &[],
        ));
        let (mut add, mut remove) = (Vec::new(), Vec::new());
        while !stop2.load(Ordering::Relaxed) {
            let t = Instant::now();
            viommu.add_endpoint(HOT, Some(emu.clone())).unwrap();
            add.push(t.elapsed());
            std::thread::sleep(Duration::from_micros(200));
            let t = Instant::now();
            viommu.remove_endpoint(HOT).unwrap();
            remove.push(t.elapsed());
            std::thread::sleep(Duration::from_micros(200));
        }
        (add, remove)
    });
    let during = run(&mut h, 20_000);
    stop.store(true, Ordering::Relaxed);
    let (mut add, mut remove) = plugger.join().unwrap();
    add.sort_unstable();
    remove.sort_unstable();
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    println!(
        "MAP+UNMAP pairs/s (64 pairs a notification): {before:.0} before, {during:.0} during hot-plug \
         ({} plug+unplug cycles meanwhile); add_endpoint median {:.1} us max {:.1} us, \
         remove_endpoint median {:.1} us max {:.1} us",
        add.len(),
        us(add[add.len() / 2]),
        us(*add.last().unwrap()),
        us(remove[remove.len() / 2]),
        us(*remove.last().unwrap()),
    );
}

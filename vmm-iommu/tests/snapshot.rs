//! Snapshot and restore of the device (`docs/snapshot.md`): a restored
//! device behaves exactly as the one snapshotted (property test: random
//! requests, a snapshot at a random point, the same further requests to
//! both, every status, state, translation, fault record and backend call
//! compared); backends are replayed with exact calls; the software nested
//! IOMMU re-reads the guest's tables and keeps its page requests; every
//! snapshot that does not fit is refused with the reason, and leaves the
//! device as it was.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use proptest::prelude::*;
use vm_memory::GuestMemoryMmap;
use vmm_iommu::backend::{SavedPageRequest, SavedPageRequestState, TableBinding};
use vmm_iommu::config::{IommuConfig, NestedConfig, ReservedKind, ReservedRegion, TableFormat};
use vmm_iommu::emulated::{EmulatedIommu, NestedError, PageRequestState};
use vmm_iommu::nested::build::{TableAlloc, VtdPasidTableBuilder, X86TableBuilder};
use vmm_iommu::nested::{x86, Access, Perm};
use vmm_iommu::snapshot::{
    DeviceSnapshot, DomainKindSnapshot, MappingSnapshot, SnapshotError, SNAPSHOT_VERSION,
};
use vmm_iommu::testing::RecordingBackend;
use vmm_iommu::testing::{driver_features, BackendCall, CountingInterrupt, Harness};
use vmm_iommu::wire::*;
use vmm_iommu::Router;
use vmm_iommu::Translator;
use vmm_iommu::VirtioIommu;
use vmm_iommu::{RequestError, ACCESS_READ, ACCESS_WRITE};

const PAGE: u64 = 0x1000;
const RAM_MIB: u64 = 16;
/// Endpoint served by a recording backend.
const EP_REC: u32 = 8;
/// All endpoints of the property test's device (1 and 2 translated by
/// the state, without a backend), and one it lacks.
const EPS: [u32; 3] = [1, 2, EP_REC];
const UNKNOWN_EP: u32 = 99;
const PHYS: u64 = 0x50_0000;
const RESERVED: (u64, u64) = (0x1_4000, 0x1_5fff);
/// Guest-physical table pointers the ATTACH_TABLEs use (inside RAM).
const VTD_DIR: u64 = 0x60_0000;
const X86_ROOT: u64 = 0x70_0000;

fn nested() -> NestedConfig {
    NestedConfig {
        formats: vec![
            TableFormat::IntelVtd,
            TableFormat::ArmSmmuV3,
            TableFormat::ArmLpae,
            TableFormat::X86_64,
        ],
        pasid_bits: 16,
    }
}

/// What the device offers and the driver accepts in one property case.
#[derive(Clone, Copy, Debug)]
struct Features {
    legacy: bool,
    config_bypass: bool,
    bypass_acked: bool,
    mmio: bool,
    map_unmap: bool,
    nested: bool,
}

fn config(f: &Features) -> IommuConfig {
    let mut c = IommuConfig {
        bypass: f.config_bypass,
        legacy_bypass: f.legacy,
        nested: Some(nested()),
        reserved_regions: vec![ReservedRegion {
            start: RESERVED.0,
            end: RESERVED.1,
            kind: ReservedKind::Reserved,
        }],
        ..IommuConfig::default()
    };
    // Low enough to be hit.
    c.limits.max_domains = 3;
    c.limits.max_mappings_per_domain = 4;
    c.limits.max_mappings = 6;
    c.limits.max_pending_faults = 16;
    c.validate().expect("valid test config");
    c
}

fn acked(f: &Features, dev: &VirtioIommu) -> u64 {
    let mut a = driver_features(dev);
    if !f.bypass_acked {
        a &= !(1 << VIRTIO_IOMMU_F_BYPASS | 1 << VIRTIO_IOMMU_F_BYPASS_CONFIG);
    }
    if !f.mmio {
        a &= !(1 << VIRTIO_IOMMU_F_MMIO);
    }
    if !f.map_unmap {
        a &= !(1 << VIRTIO_IOMMU_F_MAP_UNMAP);
    }
    if !f.nested {
        a &= !(1 << VIRTIO_IOMMU_F_ATTACH_TABLE | 1 << VIRTIO_IOMMU_F_PAGE_REQUEST);
    }
    a
}

fn router_with(
    rec: Arc<RecordingBackend>,
) -> impl FnOnce(&GuestMemoryMmap, Arc<vmm_iommu::FaultQueue>) -> Router {
    move |_, _| {
        let mut r = Router::new();
        r.add(rec, &[EP_REC]);
        r
    }
}

fn harness(f: &Features) -> (Harness, Arc<RecordingBackend>) {
    let rec = Arc::new(RecordingBackend::nested("rec"));
    let f2 = *f;
    let h = Harness::with_router(
        &config(f),
        &EPS,
        RAM_MIB,
        &[],
        router_with(rec.clone()),
        move |d| acked(&f2, d),
    );
    (h, rec)
}

/// A restored copy of `h` with its own recording backend.
fn restored(
    h: &Harness,
    f: &Features,
    snap: &DeviceSnapshot,
) -> Result<(Harness, Arc<RecordingBackend>), SnapshotError> {
    let rec = Arc::new(RecordingBackend::nested("rec"));
    let copy = h.restored_copy(&config(f), &EPS, &[], router_with(rec.clone()), snap)?;
    Ok((copy, rec))
}

#[derive(Clone, Copy, Debug)]
enum Op {
    Attach(u32, u32, u32),
    Detach(u32, u32),
    Map(u32, u64, u64, u64, u32),
    Unmap(u32, u64, u64),
    AttachTable(u32, u32, u8),
    Probe(u32),
    WriteBypass(u8),
}

impl Op {
    fn request(&self) -> Option<Request> {
        Some(match *self {
            Op::Attach(domain, endpoint, flags) => Request::Attach(AttachReq {
                domain,
                endpoint,
                flags,
                reserved: [0; 4],
            }),
            Op::Detach(domain, endpoint) => Request::Detach(DetachReq { domain, endpoint }),
            Op::Map(domain, virt_start, virt_end, phys_start, flags) => Request::Map(MapReq {
                domain,
                virt_start,
                virt_end,
                phys_start,
                flags,
            }),
            Op::Unmap(domain, virt_start, virt_end) => Request::Unmap(UnmapReq {
                domain,
                virt_start,
                virt_end,
                reserved: [0; 4],
            }),
            Op::AttachTable(domain, endpoint, which) => {
                let t = match which {
                    0 => TableDesc::IntelVtd {
                        pasid_bits: 16,
                        pasid_dir_ptr: VTD_DIR,
                    },
                    1 => TableDesc::X86_64 {
                        levels: 4,
                        root: X86_ROOT,
                    },
                    // Outside guest RAM: RANGE.
                    _ => TableDesc::X86_64 {
                        levels: 4,
                        root: RAM_MIB << 20,
                    },
                };
                Request::AttachTable(AttachTableReq::new(domain, endpoint, &t))
            }
            Op::Probe(_) | Op::WriteBypass(_) => return None,
        })
    }
}

/// What one op did, as the driver sees it.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    Status(Status),
    Probe(Status, Vec<u8>),
    Unwritten(u32),
    Config,
}

fn run(h: &mut Harness, op: &Op) -> Outcome {
    match *op {
        Op::Probe(ep) => {
            let (s, props) = h.probe(ep, 512);
            Outcome::Probe(s, props)
        }
        Op::WriteBypass(v) => {
            h.dev.write_config(CONFIG_BYPASS_OFFSET as u64, &[v]);
            Outcome::Config
        }
        _ => {
            let req = op.request().expect("a request");
            let bytes = req.encode();
            // Requests of a type the driver did not negotiate come back
            // unwritten: compare the used length then.
            let (len, tail) = h.send_raw(&[&bytes], &[TAIL_SIZE as u32]);
            if len == 0 {
                Outcome::Unwritten(len)
            } else {
                Outcome::Status(Status::from_u8(tail[0]).expect("status"))
            }
        }
    }
}

fn features() -> impl Strategy<Value = Features> {
    (
        any::<bool>(),
        any::<bool>(),
        prop::bool::weighted(0.8),
        prop::bool::weighted(0.7),
        prop::bool::weighted(0.95),
        prop::bool::weighted(0.7),
    )
        .prop_map(
            |(legacy, config_bypass, bypass_acked, mmio, map_unmap, nested)| Features {
                legacy,
                config_bypass,
                bypass_acked,
                mmio,
                map_unmap,
                nested,
            },
        )
}

fn endpoint() -> impl Strategy<Value = u32> {
    prop_oneof![4 => prop::sample::select(EPS.to_vec()), 1 => Just(UNKNOWN_EP)]
}

fn domain() -> impl Strategy<Value = u32> {
    prop_oneof![8 => 1u32..=4, 1 => Just(0u32), 1 => Just(70_000u32)]
}

fn range() -> impl Strategy<Value = (u64, u64)> {
    (0u64..24, 1u64..=3, prop::bool::weighted(0.95)).prop_map(|(p, n, aligned)| {
        let start = p * PAGE;
        let end = start + n * PAGE - 1;
        if aligned {
            (start, end)
        } else {
            (start + 0x800, end)
        }
    })
}

fn op() -> impl Strategy<Value = Op> {
    let flags = prop_oneof![
        4 => Just(VIRTIO_IOMMU_MAP_F_READ | VIRTIO_IOMMU_MAP_F_WRITE),
        2 => Just(VIRTIO_IOMMU_MAP_F_READ),
        1 => Just(VIRTIO_IOMMU_MAP_F_MMIO | VIRTIO_IOMMU_MAP_F_READ),
        1 => Just(1u32 << 7),
    ];
    prop_oneof![
        4 => (domain(), endpoint(), prop_oneof![3 => Just(0u32), 1 => Just(VIRTIO_IOMMU_ATTACH_F_BYPASS)])
            .prop_map(|(d, e, f)| Op::Attach(d, e, f)),
        1 => (domain(), endpoint()).prop_map(|(d, e)| Op::Detach(d, e)),
        6 => (domain(), range(), 0u64..16, flags)
            .prop_map(|(d, (s, e), p, f)| Op::Map(d, s, e, PHYS + p * PAGE, f)),
        3 => (domain(), prop_oneof![4 => range(), 1 => Just((0, u64::MAX))])
            .prop_map(|(d, (s, e))| Op::Unmap(d, s, e)),
        2 => (domain(), endpoint(), 0u8..3).prop_map(|(d, e, t)| Op::AttachTable(d, e, t)),
        1 => endpoint().prop_map(Op::Probe),
        1 => (0u8..3).prop_map(Op::WriteBypass),
    ]
}

fn check() -> impl Strategy<Value = (u32, u64, u32)> {
    (
        endpoint(),
        (0u64..26).prop_map(|p| p * PAGE + 8),
        prop_oneof![
            Just(ACCESS_READ),
            Just(ACCESS_WRITE),
            Just(ACCESS_READ | ACCESS_WRITE)
        ],
    )
}

/// The device snapshot with the generation cleared: a restore moves the
/// generation past any translator's, so only its direction is promised.
fn observable(h: &Harness) -> DeviceSnapshot {
    let mut s = h.dev.snapshot().expect("snapshot");
    s.viommu.generation = 0;
    s
}

/// Offers event buffers while the driver has descriptors, and returns
/// the fault records the device delivered.
fn faults(h: &mut Harness) -> Vec<ExtFaultRecord> {
    let n = h.eventq.free_descriptors().min(4);
    if n > 0 {
        h.add_event_buffers(n, EXT_FAULT_SIZE as u32);
    }
    h.collect_ext_faults()
}

type Translators = Vec<(u32, Translator)>;

fn translators(h: &Harness) -> Translators {
    EPS.iter()
        .chain(&[UNKNOWN_EP])
        .map(|&ep| (ep, h.dev.viommu().translator(ep)))
        .collect()
}

fn translate(
    h: &Harness,
    ts: &mut Translators,
    (ep, iova, access): (u32, u64, u32),
) -> (Result<u64, String>, Result<u64, String>) {
    let slow = h
        .dev
        .viommu()
        .translate(ep, iova, access)
        .map(|t| t.gpa(iova))
        .map_err(|e| format!("{e:?}"));
    let t = &mut ts.iter_mut().find(|(e, _)| *e == ep).expect("translator").1;
    let fast = t
        .translate(iova, access)
        .map(|(gpa, _)| gpa)
        .map_err(|e| format!("{:?}", e.reason));
    (slow, fast)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    /// Random requests; a snapshot at a random point, restored into a
    /// fresh device; the same further requests to both: every status,
    /// PROBE answer, state, translation (slow path and long-lived
    /// translators), fault record and backend call is the same.
    #[test]
    fn restored_device_answers_every_further_request_as_the_original(
        f in features(),
        before in prop::collection::vec((op(), prop::collection::vec(check(), 0..3)), 0..24),
        after in prop::collection::vec((op(), prop::collection::vec(check(), 0..3)), 1..24),
    ) {
        let (mut a, rec_a) = harness(&f);
        let mut ts_a = translators(&a);
        for (op, checks) in &before {
            run(&mut a, op);
            for &c in checks {
                let _ = translate(&a, &mut ts_a, c);
            }
        }
        let snap = a.dev.snapshot().expect("snapshot");
        // Through the serialized form, as a VMM would store it.
        let snap = DeviceSnapshot::from_json(&snap.to_json().unwrap()).expect("decode");
        let (mut b, rec_b) = restored(&a, &f, &snap).expect("restore");
        let mut ts_b = translators(&b);
        prop_assert_eq!(observable(&a), observable(&b));
        let calls_a = rec_a.calls().len();
        for (i, (op, checks)) in after.iter().enumerate() {
            let (ra, rb) = (run(&mut a, op), run(&mut b, op));
            prop_assert_eq!(ra, rb, "step {} {:?}", i, op);
            for &c in checks {
                prop_assert_eq!(translate(&a, &mut ts_a, c), translate(&b, &mut ts_b, c), "step {} {:?}", i, c);
            }
            prop_assert_eq!(faults(&mut a), faults(&mut b), "faults after step {}", i);
            prop_assert_eq!(observable(&a), observable(&b), "state after step {}", i);
        }
        // The backend of the restored device heard the replay, then
        // exactly what the original's heard after the snapshot.
        let replayed = rec_b.calls();
        let tail_a = rec_a.calls()[calls_a..].to_vec();
        let n = replayed.len() - tail_a.len();
        prop_assert_eq!(&replayed[n..], &tail_a[..]);
        for c in &replayed[..n] {
            prop_assert!(matches!(c, BackendCall::Attach(EP_REC, ..) | BackendCall::BindTable(EP_REC, _)), "{:?}", c);
        }
    }

    /// Any field of a snapshot set to any value: restore answers with a
    /// device or a reason, never a panic, and a refused restore leaves
    /// the device fresh (a valid snapshot still restores into it).
    #[test]
    fn restore_of_any_mutated_snapshot_never_panics(
        which in 0usize..16,
        v in prop_oneof![any::<u64>(), 0u64..8, Just(u64::MAX), (0u64..64).prop_map(|p| p * PAGE)],
    ) {
        let (h, _, snap) = populated();
        let mut bad = snap.clone();
        mutate(&mut bad, which, v);
        let rec = Arc::new(RecordingBackend::nested("rec"));
        let f = all_features();
        let mem_copy = h.restored_copy(&config(&f), &EPS, &[], router_with(rec.clone()), &bad);
        if mem_copy.is_err() {
            // Nothing stays behind in the backend: every join undone.
            let mut joined = 0i64;
            for c in rec.calls() {
                match c {
                    BackendCall::Attach(..) | BackendCall::BindTable(..) => joined += 1,
                    BackendCall::Detach(..) | BackendCall::UnbindTable(..) => joined -= 1,
                    _ => {}
                }
            }
            prop_assert_eq!(joined, 0);
        }
        // Garbage bytes are a decode error, not a panic.
        let mut json = snap.to_json().unwrap();
        let at = (v as usize) % json.len();
        json[at] = (v >> 8) as u8;
        let _ = DeviceSnapshot::from_json(&json);
    }
}

fn all_features() -> Features {
    Features {
        legacy: false,
        config_bypass: false,
        bypass_acked: true,
        mmio: true,
        map_unmap: true,
        nested: true,
    }
}

/// A device with a bit of everything: a MAP domain with two mappings and
/// the recording backend's endpoint, a bypass domain, a table domain, a
/// waiting fault record.
fn populated() -> (Harness, Arc<RecordingBackend>, DeviceSnapshot) {
    let f = all_features();
    let (mut h, rec) = harness(&f);
    let ops = [
        Op::Attach(1, EP_REC, 0),
        Op::Map(1, 0, PAGE - 1, PHYS, VIRTIO_IOMMU_MAP_F_READ),
        Op::Map(1, 4 * PAGE, 6 * PAGE - 1, PHYS + PAGE, 3),
        Op::Attach(1, 1, 0),
        Op::Attach(2, 2, VIRTIO_IOMMU_ATTACH_F_BYPASS),
    ];
    for op in &ops {
        assert_eq!(run(&mut h, op), Outcome::Status(Status::Ok), "{op:?}");
    }
    // A refused DMA leaves a record waiting for an event buffer.
    let mut t = h.dev.viommu().translator(1);
    assert!(t.translate(9 * PAGE, ACCESS_WRITE).is_err());
    let snap = h.dev.snapshot().unwrap();
    (h, rec, snap)
}

/// Sets one field of `s`, chosen by `which`, to (a form of) `v`.
fn mutate(s: &mut DeviceSnapshot, which: usize, v: u64) {
    let v32 = v as u32;
    match which {
        0 => s.version = v32,
        1 => s.acked_features = v,
        2 => s.config.bypass = v as u8,
        3 => s.config.input_end = v,
        4 => {
            if let Some(q) = &mut s.requestq {
                q.desc_table = v;
            }
        }
        5 => {
            if let Some(q) = &mut s.eventq {
                q.size = v as u16;
            }
        }
        6 => {
            if let Some(q) = &mut s.requestq {
                q.next_avail = v as u16;
            }
        }
        7 => s.viommu.endpoints.push(v32),
        8 => s.viommu.domains[0].id = v32,
        9 => s.viommu.domains[0].endpoints.push(v32),
        10 => {
            if let DomainKindSnapshot::Mapped(m) = &mut s.viommu.domains[0].kind {
                m[0].1 = v;
            }
        }
        11 => {
            if let DomainKindSnapshot::Mapped(m) = &mut s.viommu.domains[0].kind {
                m.push(MappingSnapshot(v, v.wrapping_add(PAGE - 1), v, 3));
            }
        }
        12 => {
            s.viommu.domains[1].kind = DomainKindSnapshot::Mapped(vec![MappingSnapshot(0, v, 0, 1)])
        }
        13 => s.viommu.faults = vec![s.viommu.faults[0]; (v % 64) as usize],
        14 => s.viommu.generation = v,
        _ => s.viommu.domains[1].endpoints.clear(),
    }
}

#[test]
fn json_round_trip_is_exact() {
    let (_, _, snap) = populated();
    let json = snap.to_json().unwrap();
    assert_eq!(DeviceSnapshot::from_json(&json).unwrap(), snap);
    assert_eq!(snap.version, SNAPSHOT_VERSION);
}

#[test]
fn restore_replays_the_backend_with_attach_calls_carrying_the_mappings() {
    let (h, rec_a, snap) = populated();
    let (b, rec_b) = restored(&h, &all_features(), &snap).unwrap();
    // The original heard ATTACH then two MAPs; the restored backend hears
    // one ATTACH that carries both mappings.
    assert_eq!(
        rec_a.calls(),
        vec![
            BackendCall::Attach(EP_REC, 1, 0),
            BackendCall::Map(1, h.dev.viommu().state().mappings(1)[0]),
            BackendCall::Map(1, h.dev.viommu().state().mappings(1)[1]),
        ]
    );
    assert_eq!(rec_b.calls(), vec![BackendCall::Attach(EP_REC, 1, 2)]);
    assert_eq!(observable(&h), observable(&b));
}

#[test]
fn restore_rebinds_table_domains() {
    let f = all_features();
    let (mut h, _) = harness(&f);
    assert_eq!(
        run(&mut h, &Op::AttachTable(3, EP_REC, 0)),
        Outcome::Status(Status::Ok)
    );
    let snap = h.dev.snapshot().unwrap();
    let (b, rec_b) = restored(&h, &f, &snap).unwrap();
    assert_eq!(
        rec_b.calls(),
        vec![BackendCall::BindTable(
            EP_REC,
            TableBinding {
                domain: 3,
                table: TableDesc::IntelVtd {
                    pasid_bits: 16,
                    pasid_dir_ptr: VTD_DIR
                }
            }
        )]
    );
    assert_eq!(
        b.dev.viommu().state().domain_table(3),
        h.dev.viommu().state().domain_table(3)
    );
}

#[test]
fn restored_device_delivers_the_waiting_fault_records() {
    let (mut h, _, snap) = populated();
    let (mut b, _) = restored(&h, &all_features(), &snap).unwrap();
    let (fa, fb) = (faults(&mut h), faults(&mut b));
    assert_eq!(fa.len(), 1);
    assert_eq!(fa, fb);
    assert_eq!(fb[0].endpoint, 1);
    assert_eq!(fb[0].address, 9 * PAGE);
}

#[test]
fn restore_moves_the_generation_forward() {
    let (h, _, snap) = populated();
    let (b, _) = restored(&h, &all_features(), &snap).unwrap();
    assert!(b.dev.viommu().generation() >= snap.viommu.generation);
    assert!(b.dev.viommu().generation() > 0);
}

fn refused(snap: &DeviceSnapshot) -> (SnapshotError, Arc<RecordingBackend>) {
    let (h, _, _) = populated();
    let rec = Arc::new(RecordingBackend::nested("rec"));
    let err = h
        .restored_copy(
            &config(&all_features()),
            &EPS,
            &[],
            router_with(rec.clone()),
            snap,
        )
        .map(|_| ())
        .expect_err("restore must be refused");
    (err, rec)
}

#[test]
fn unknown_version_is_refused() {
    let (_, _, mut snap) = populated();
    snap.version = SNAPSHOT_VERSION + 1;
    let (err, _) = refused(&snap);
    assert!(
        matches!(err, SnapshotError::UnknownVersion { found, supported } if found == SNAPSHOT_VERSION + 1 && supported == SNAPSHOT_VERSION),
        "{err}"
    );
    // From bytes, a future version is refused as such even if its fields
    // are not this version's.
    let json = br#"{"version": 7, "something_new": [1, 2, 3]}"#;
    let err = DeviceSnapshot::from_json(json).unwrap_err();
    assert!(
        matches!(err, SnapshotError::UnknownVersion { found: 7, .. }),
        "{err}"
    );
}

#[test]
fn endpoint_the_config_lacks_is_refused() {
    let (h, _, snap) = populated();
    let f = all_features();
    let rec = Arc::new(RecordingBackend::nested("rec"));
    // The device is built for endpoints 2 and 8 only; the snapshot has 1.
    let err = h
        .restored_copy(&config(&f), &[2, EP_REC], &[], router_with(rec), &snap)
        .map(|_| ())
        .unwrap_err();
    assert!(matches!(err, SnapshotError::UnknownEndpoint(1)), "{err}");
    assert_eq!(
        err.to_string(),
        "snapshot endpoint 1 is not behind this device"
    );
    let rec = Arc::new(RecordingBackend::nested("rec"));
    let err = h
        .restored_copy(
            &config(&f),
            &[1, 2, 5, EP_REC],
            &[],
            router_with(rec),
            &snap,
        )
        .map(|_| ())
        .unwrap_err();
    assert!(matches!(err, SnapshotError::MissingEndpoint(5)), "{err}");
}

#[test]
fn mapping_outside_the_input_range_is_refused() {
    let (_, _, mut snap) = populated();
    let DomainKindSnapshot::Mapped(m) = &mut snap.viommu.domains[0].kind else {
        panic!("domain 1 is a MAP domain");
    };
    m.push(MappingSnapshot(1 << 48, (1 << 48) + PAGE - 1, PHYS, 3));
    let (err, rec) = refused(&snap);
    assert!(
        matches!(
            &err,
            SnapshotError::Refused {
                source: RequestError::OutsideInputRange { .. },
                ..
            }
        ),
        "{err}"
    );
    assert!(
        err.to_string()
            .starts_with("domain 1: mapping [0x1000000000000"),
        "{err}"
    );
    // The backend heard nothing: the state is checked first.
    assert_eq!(rec.calls(), vec![]);
}

#[test]
fn domain_outside_domain_range_is_refused() {
    let (_, _, mut snap) = populated();
    snap.viommu.domains[1].id = 70_000;
    let (err, _) = refused(&snap);
    assert!(
        matches!(
            &err,
            SnapshotError::Refused {
                source: RequestError::DomainOutOfRange { domain: 70_000, .. },
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn overlapping_and_misaligned_mappings_are_refused() {
    for (m, want) in [
        (MappingSnapshot(0, PAGE - 1, PHYS, 3), "OverlapsMapping"),
        (MappingSnapshot(0x800, PAGE - 1, PHYS, 3), "Misaligned"),
        (
            MappingSnapshot(RESERVED.0, RESERVED.0 + PAGE - 1, PHYS, 3),
            "OverlapsReserved",
        ),
        (
            MappingSnapshot(8 * PAGE, 9 * PAGE - 1, PHYS, 1 << 9),
            "UnknownFlags",
        ),
    ] {
        let (_, _, mut snap) = populated();
        if let DomainKindSnapshot::Mapped(v) = &mut snap.viommu.domains[0].kind {
            v.push(m);
        }
        let (err, _) = refused(&snap);
        assert!(format!("{err:?}").contains(want), "{want}: {err:?}");
    }
}

#[test]
fn mappings_beyond_the_limits_are_refused() {
    let (_, _, mut snap) = populated();
    if let DomainKindSnapshot::Mapped(v) = &mut snap.viommu.domains[0].kind {
        for p in 10..13 {
            v.push(MappingSnapshot(p * PAGE, p * PAGE + PAGE - 1, PHYS, 3));
        }
    }
    let (err, _) = refused(&snap);
    assert!(
        matches!(
            &err,
            SnapshotError::Refused {
                source: RequestError::Limit("max_mappings_per_domain"),
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn inconsistent_attachments_are_refused() {
    let (_, _, snap) = populated();
    let mut two = snap.clone();
    two.viommu.domains[1].endpoints.push(1);
    assert!(matches!(
        refused(&two).0,
        SnapshotError::TwoDomains {
            endpoint: 1,
            first: 1,
            second: 2
        }
    ));
    let mut empty = snap.clone();
    empty.viommu.domains[1].endpoints.clear();
    assert!(matches!(refused(&empty).0, SnapshotError::EmptyDomain(2)));
    let mut dup = snap.clone();
    dup.viommu.domains.push(dup.viommu.domains[1].clone());
    assert!(matches!(
        refused(&dup).0,
        SnapshotError::DuplicateDomain(2) | SnapshotError::TwoDomains { .. }
    ));
    let mut stranger = snap.clone();
    stranger.viommu.domains[1].endpoints.push(UNKNOWN_EP);
    assert!(matches!(
        refused(&stranger).0,
        SnapshotError::DomainEndpoint {
            domain: 2,
            endpoint: UNKNOWN_EP
        }
    ));
    let mut twice = snap;
    twice.viommu.endpoints.push(1);
    assert!(matches!(
        refused(&twice).0,
        SnapshotError::DuplicateEndpoint(1)
    ));
}

#[test]
fn table_outside_guest_ram_in_a_v1_snapshot_or_unadvertised_is_refused() {
    let f = all_features();
    let (mut h, _) = harness(&f);
    assert_eq!(
        run(&mut h, &Op::AttachTable(3, EP_REC, 0)),
        Outcome::Status(Status::Ok)
    );
    let snap = h.dev.snapshot().unwrap();
    let mut far = snap.clone();
    far.viommu.domains[0].kind = DomainKindSnapshot::Table(
        TableDesc::X86_64 {
            levels: 4,
            root: 1 << 40,
        }
        .into(),
    );
    // A binding whose table is no longer in RAM is a state the device
    // reaches when RAM is unplugged under it: a version-2 snapshot, whose
    // memory map the restore compares, brings it back (its walks fault).
    let (b, _) = restored(&h, &f, &far).unwrap();
    assert!(b.dev.viommu().state().domain_table(3).is_some());
    // Version 1 has no memory map: the pointer is checked as ATTACH_TABLE
    // checked it.
    far.version = 1;
    far.viommu.ram = None;
    far.viommu.mmio_windows = None;
    let (err, _) = refused(&far);
    assert!(
        matches!(
            &err,
            SnapshotError::Refused {
                source: RequestError::TablePointer { .. },
                ..
            }
        ),
        "{err}"
    );
    // A plain endpoint advertises no format.
    let mut plain = snap;
    plain.viommu.domains[0].endpoints = vec![1];
    let (err, _) = refused(&plain);
    assert!(
        matches!(
            &err,
            SnapshotError::Refused {
                source: RequestError::UnsupportedFormat { endpoint: 1, .. },
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn snapshot_of_another_config_is_refused() {
    let (h, _, snap) = populated();
    let mut cfg = config(&all_features());
    cfg.input_range.end = 0xffff_ffff;
    let err = h
        .restored_copy(
            &cfg,
            &EPS,
            &[],
            router_with(Arc::new(RecordingBackend::nested("rec"))),
            &snap,
        )
        .map(|_| ())
        .unwrap_err();
    assert!(
        matches!(
            err,
            SnapshotError::Config {
                field: "input_range.end",
                ..
            }
        ),
        "{err}"
    );
    let mut cfg = config(&all_features());
    cfg.nested = None;
    let err = h
        .restored_copy(
            &cfg,
            &EPS,
            &[],
            router_with(Arc::new(RecordingBackend::nested("rec"))),
            &snap,
        )
        .map(|_| ())
        .unwrap_err();
    assert!(matches!(err, SnapshotError::Features { .. }), "{err}");
}

#[test]
fn bad_features_config_and_queues_are_refused() {
    let (_, _, snap) = populated();
    let mut s = snap.clone();
    s.acked_features |= 1 << 40;
    assert!(matches!(
        refused(&s).0,
        SnapshotError::AckedNotOffered { .. }
    ));
    let mut s = snap.clone();
    s.config.bypass = 2;
    assert!(matches!(
        refused(&s).0,
        SnapshotError::Config {
            field: "bypass",
            ..
        }
    ));
    let mut s = snap.clone();
    s.requestq.as_mut().unwrap().desc_table = (RAM_MIB << 20) - 16;
    assert!(matches!(
        refused(&s).0,
        SnapshotError::Queue { queue: 0, .. }
    ));
    let mut s = snap.clone();
    s.eventq.as_mut().unwrap().size = 48;
    assert!(matches!(
        refused(&s).0,
        SnapshotError::Queue { queue: 1, .. }
    ));
    let mut s = snap.clone();
    s.eventq = None;
    assert!(matches!(refused(&s).0, SnapshotError::Queue { .. }));
    let mut s = snap;
    s.viommu.faults = vec![s.viommu.faults[0]; 17];
    assert!(matches!(
        refused(&s).0,
        SnapshotError::TooManyFaults {
            count: 17,
            capacity: 16
        }
    ));
}

#[test]
fn restore_into_an_activated_device_is_refused() {
    let (mut h, _, snap) = populated();
    let mem = h.mem.clone();
    let err = h
        .dev
        .restore(&snap, &mem, Arc::new(CountingInterrupt::default()))
        .unwrap_err();
    assert!(matches!(err, SnapshotError::NotFresh(_)), "{err}");
}

#[test]
fn failed_restore_undoes_the_backend_and_leaves_the_device_fresh() {
    let (h, _, snap) = populated();
    // Domain 1 (with the backend's endpoint) replays, domain 2 is refused.
    let mut bad = snap.clone();
    bad.viommu.domains[1].kind = DomainKindSnapshot::Mapped(vec![MappingSnapshot(0, 0x7ff, 0, 3)]);
    let cfg = config(&all_features());
    let rec = Arc::new(RecordingBackend::nested("rec"));
    let faults = Arc::new(vmm_iommu::FaultQueue::new(16).unwrap());
    let mut r = Router::new();
    r.add(rec.clone(), &[EP_REC]);
    let viommu = Arc::new(vmm_iommu::Viommu::with_router(
        &cfg,
        &EPS,
        &[(0, (RAM_MIB << 20) - 1)],
        faults,
        r,
    ));
    let mut dev = VirtioIommu::with_viommu(viommu);
    let irq = Arc::new(CountingInterrupt::default());
    // The state is checked whole before any backend call.
    assert!(dev.restore(&bad, &h.mem, irq.clone()).is_err());
    assert_eq!(rec.calls(), vec![]);
    // A backend failure half way is undone.
    rec.fail_next(0);
    let err = dev.restore(&snap, &h.mem, irq.clone()).unwrap_err();
    assert!(matches!(err, SnapshotError::Backend { .. }), "{err}");
    assert!(dev.viommu().state().is_pristine());
    assert!(!dev.is_activated());
    assert_eq!(dev.acked_features(), 0);
    assert!(dev.viommu().faults().is_empty());
    // The same device then takes the valid snapshot.
    dev.restore(&snap, &h.mem, irq).unwrap();
    assert!(dev.is_activated());
    assert_eq!(
        dev.viommu().state().mappings(1),
        h.dev.viommu().state().mappings(1)
    );
    assert_eq!(rec.calls().last(), Some(&BackendCall::Attach(EP_REC, 1, 2)));
}

// ---- The software nested IOMMU: tables re-read, page requests kept ----

const EP: u32 = 8;
const PASID: u32 = 5;
const TABLES: u64 = 0x100_0000;
const DATA: u64 = 0x180_0000;
const EMU_RAM_MIB: u64 = 32;

type Emu = EmulatedIommu<GuestMemoryMmap>;

fn emu_cfg() -> IommuConfig {
    IommuConfig {
        nested: Some(nested()),
        ..IommuConfig::default()
    }
}

fn emu_router(
    slot: Arc<Mutex<Option<Arc<Emu>>>>,
) -> impl FnOnce(&GuestMemoryMmap, Arc<vmm_iommu::FaultQueue>) -> Router {
    move |mem, faults| {
        let emu = Arc::new(EmulatedIommu::new(mem.clone(), faults, 16, &[EP]));
        *slot.lock().unwrap() = Some(emu.clone());
        let mut r = Router::new();
        r.add(emu, &[EP]);
        r
    }
}

fn emu_rig() -> (Harness, Arc<Emu>) {
    let slot: Arc<Mutex<Option<Arc<Emu>>>> = Arc::default();
    let h = Harness::with_router(
        &emu_cfg(),
        &[EP],
        EMU_RAM_MIB,
        &[],
        emu_router(slot.clone()),
        |d| driver_features(d) | (d.avail_features() & ((1 << 56) | (1 << 57))),
    );
    let emu = slot.lock().unwrap().take().unwrap();
    (h, emu)
}

fn page_request(emu: &Emu, va: u64) -> u32 {
    match emu.translate(EP, Some(PASID), va, Access::WRITE) {
        Err(NestedError::PageRequest { grpid }) => grpid,
        other => panic!("{other:?}"),
    }
}

#[test]
fn restored_software_iommu_rereads_tables_and_keeps_page_requests() {
    let (mut h, emu) = emu_rig();
    let mut a = TableAlloc::new(&h.mem, TABLES, TABLES + 0x20_0000);
    let dir = VtdPasidTableBuilder::new(&mut a, 16).unwrap();
    let tables = X86TableBuilder::new(&mut a, 4).unwrap();
    tables
        .map(&mut a, 0x40_0000, DATA, 12, Perm::RW_USER)
        .unwrap();
    dir.set_first_stage(&mut a, PASID, tables.root(), 4, 1, x86::Flags::default())
        .unwrap();
    let desc = TableDesc::IntelVtd {
        pasid_bits: 16,
        pasid_dir_ptr: dir.dir_ptr(),
    };
    assert_eq!(
        h.send(&Request::AttachTable(AttachTableReq::new(1, EP, &desc))),
        Status::Ok
    );
    assert_eq!(
        emu.translate(EP, Some(PASID), 0x40_0000, Access::READ)
            .map(|t| t.gpa),
        Ok(DATA)
    );
    // One request pending, one answered but not collected by the device.
    let pending = page_request(&emu, 0x50_0000);
    let answered = page_request(&emu, 0x60_0000);
    let resp = PageRespReq {
        endpoint: EP,
        flags: VIRTIO_IOMMU_PAGE_RESP_F_PASID_VALID,
        pasid: PASID,
        grpid: answered,
        code: VIRTIO_IOMMU_PAGE_RESP_SUCCESS,
        reserved_set: false,
    };
    assert_eq!(h.send(&Request::PageResp(resp)), Status::Ok);
    let snap = h.dev.snapshot().unwrap();
    assert_eq!(snap.viommu.page_requests.len(), 1);
    assert_eq!(
        snap.viommu.page_requests[0].state.groups,
        vec![
            SavedPageRequest {
                endpoint: EP,
                pasid: Some(PASID),
                grpid: pending,
                state: SavedPageRequestState::Pending
            },
            SavedPageRequest {
                endpoint: EP,
                pasid: Some(PASID),
                grpid: answered,
                state: SavedPageRequestState::Success
            },
        ]
    );
    let slot: Arc<Mutex<Option<Arc<Emu>>>> = Arc::default();
    let mut b = h
        .restored_copy(&emu_cfg(), &[EP], &[], emu_router(slot.clone()), &snap)
        .unwrap();
    let emu_b = slot.lock().unwrap().take().unwrap();
    // Empty caches: the first translation walks the guest's tables.
    let walks = emu_b.stats.snapshot();
    assert_eq!(
        emu_b
            .translate(EP, Some(PASID), 0x40_0000, Access::READ)
            .map(|t| t.gpa),
        Ok(DATA)
    );
    assert!(emu_b.stats.snapshot() != walks);
    // The page requests are where they were, on both.
    for e in [&emu, &emu_b] {
        assert_eq!(
            e.page_request_state(EP, Some(PASID), answered),
            PageRequestState::Success
        );
        assert_eq!(
            e.page_request_state(EP, Some(PASID), pending),
            PageRequestState::Pending
        );
    }
    // Both fault records (the two page requests) wait on both devices.
    let (fa, fb) = (faults(&mut h), faults(&mut b));
    assert_eq!(fa.len(), 2);
    assert_eq!(fa, fb);
    // The guest answers the pending one on both; the next request gets
    // the same group on both.
    let resp = PageRespReq {
        grpid: pending,
        ..resp
    };
    assert_eq!(h.send(&Request::PageResp(resp)), Status::Ok);
    assert_eq!(b.send(&Request::PageResp(resp)), Status::Ok);
    assert_eq!(
        page_request(&emu, 0x70_0000),
        page_request(&emu_b, 0x70_0000)
    );
}

#[test]
fn page_requests_of_a_silent_endpoint_are_refused() {
    let (h, emu) = emu_rig();
    let _ = emu;
    let mut snap = h.dev.snapshot().unwrap();
    snap.viommu.page_requests[0]
        .state
        .groups
        .push(SavedPageRequest {
            endpoint: EP,
            pasid: Some(PASID),
            grpid: 0x200,
            state: SavedPageRequestState::Pending,
        });
    let slot: Arc<Mutex<Option<Arc<Emu>>>> = Arc::default();
    let err = h
        .restored_copy(&emu_cfg(), &[EP], &[], emu_router(slot), &snap)
        .map(|_| ())
        .unwrap_err();
    assert!(matches!(&err, SnapshotError::Backend { .. }), "{err}");
    assert!(err.to_string().contains("beyond 9 bits"), "{err}");
    snap.viommu.page_requests[0].state.groups[0].endpoint = 3;
    let slot: Arc<Mutex<Option<Arc<Emu>>>> = Arc::default();
    let err = h
        .restored_copy(&emu_cfg(), &[EP], &[], emu_router(slot), &snap)
        .map(|_| ())
        .unwrap_err();
    assert!(matches!(&err, SnapshotError::PageRequests(_)), "{err}");
}

// ---- Figures (run with --release --ignored --nocapture) ----

/// Snapshot size and time, and restore time, at 1,000,000 mappings (one
/// domain, 4 KiB pages). Prints; asserts no time.
#[test]
#[ignore = "figures: run with --release -- --ignored --nocapture"]
fn figures_snapshot_and_restore_at_a_million_mappings() {
    const N: u64 = 1_000_000;
    let mut cfg = IommuConfig::default();
    cfg.limits.max_mappings_per_domain = N;
    cfg.limits.max_mappings = N;
    // Guest RAM the mappings point at is declared, not backed.
    let extra = [(1u64 << 32, (1u64 << 32) + N * PAGE - 1)];
    let mut h = Harness::with_ram(&cfg, &[1], RAM_MIB, &extra, driver_features);
    assert_eq!(
        run(&mut h, &Op::Attach(1, 1, 0)),
        Outcome::Status(Status::Ok)
    );
    let mut batch = Vec::with_capacity(512);
    for i in 0..N {
        batch.push(Request::Map(MapReq {
            domain: 1,
            virt_start: i * PAGE,
            virt_end: i * PAGE + PAGE - 1,
            phys_start: (1 << 32) + i * PAGE,
            flags: 3,
        }));
        if batch.len() == 512 || i + 1 == N {
            assert!(h.send_batch(&batch).iter().all(|&s| s == Status::Ok));
            batch.clear();
        }
    }
    let t = Instant::now();
    let snap = h.dev.snapshot().unwrap();
    let t_snap = t.elapsed();
    let t = Instant::now();
    let json = snap.to_json().unwrap();
    let t_ser = t.elapsed();
    let t = Instant::now();
    let back = DeviceSnapshot::from_json(&json).unwrap();
    let t_de = t.elapsed();
    let t = Instant::now();
    let b = h
        .restored_copy(&cfg, &[1], &extra, |_, _| Router::new(), &back)
        .unwrap();
    let t_restore = t.elapsed();
    assert_eq!(b.dev.viommu().state().total_mappings(), N);
    println!(
        "snapshot at {N} mappings: capture {:.1} ms, JSON {:.1} MB ({:.1} B/mapping) in {:.1} ms; \
         decode {:.1} ms; restore (replay through the MAP rules, 16 MiB guest memory copy included) {:.1} ms",
        t_snap.as_secs_f64() * 1e3,
        json.len() as f64 / 1e6,
        json.len() as f64 / N as f64,
        t_ser.as_secs_f64() * 1e3,
        t_de.as_secs_f64() * 1e3,
        t_restore.as_secs_f64() * 1e3,
    );
}

//! Property test: random sequences of ATTACH / DETACH / MAP / UNMAP sent
//! through the real virtqueue (`testing::Harness`), singly and in batches,
//! against a small reference model written straight from the spec's rules.
//!
//! After every step the statuses, the state (attachments, domains,
//! mappings) and a few random translations must agree with the model. The
//! translations are checked three ways: the slow path
//! (`Viommu::translate`), a long-lived `Translator` per endpoint (its IOTLB
//! must never serve a revoked page), and a long-lived vm-memory
//! `IommuMemory` per endpoint.
//!
//! The space is small on purpose: endpoints 1..=3 plus the unknown 99,
//! domains 1..=4 plus the out-of-range 0 and 70000, a 32-page IOVA window
//! holding a reserved and an MSI region, and limits low enough to be hit
//! (2 domains, 4 mappings per domain, 6 in all).
//!
//! Where several errors apply to one request the spec does not say which
//! status wins; the model checks in the order documented in `state.rs`:
//! - ATTACH: reserved, flags, endpoint, domain range, bypass mismatch,
//!   domain limit;
//! - DETACH: endpoint, attachment;
//! - MAP: feature, flags, domain range, domain, bypass, end <= start,
//!   alignment, input range, guest RAM, reserved regions, overlap, limits;
//! - UNMAP: feature, reserved, domain range, domain, bypass, end < start,
//!   split.

use proptest::prelude::*;
use vm_memory::iommu::IommuMemory;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_iommu::config::{IommuConfig, ReservedKind, ReservedRegion};
use vmm_iommu::testing::{driver_features, Harness};
use vmm_iommu::wire::*;
use vmm_iommu::{EndpointIommu, Translator};
use vmm_iommu::{FaultReason, ACCESS_READ, ACCESS_WRITE};

const PAGE: u64 = 0x1000;
const RAM_MIB: u64 = 16;
const RAM_SIZE: u64 = RAM_MIB << 20;
/// Guest-physical base of the generated mappings (above the harness's own
/// queues and buffers, so reads through bypass or mappings are harmless).
const PHYS: u64 = 0x50_0000;
const KNOWN_EPS: [u32; 3] = [1, 2, 3];
const UNKNOWN_EP: u32 = 99;
const ALL_EPS: [u32; 4] = [1, 2, 3, UNKNOWN_EP];
const ALL_DOMAINS: [u32; 6] = [0, 1, 2, 3, 4, 70_000];
const DOMAIN_START: u32 = 1;
const DOMAIN_END: u32 = 65_535;
const INPUT_START: u64 = 0;
const INPUT_END: u64 = 0xffff_ffff_ffff;
const RESERVED: [(u64, u64); 2] = [(0x14000, 0x15fff), (0x1c000, 0x1cfff)];
/// The one MMIO window the VMM registers (above RAM, 4 pages): where
/// `MAP_F_MMIO` mappings may point.
const MMIO_WINDOW: (u64, u64) = (RAM_SIZE + 0x10_0000, RAM_SIZE + 0x10_0000 + 4 * PAGE - 1);
/// With three endpoints, two domains is the largest limit that can be hit.
const MAX_DOMAINS: usize = 2;
const MAX_PER_DOMAIN: usize = 4;
const MAX_TOTAL: usize = 6;
/// How many recent translation probes are repeated after every step.
const RECHECKED: usize = 16;

const R: u32 = VIRTIO_IOMMU_MAP_F_READ;
const W: u32 = VIRTIO_IOMMU_MAP_F_WRITE;
const MMIO: u32 = VIRTIO_IOMMU_MAP_F_MMIO;
const BYPASS: u32 = VIRTIO_IOMMU_ATTACH_F_BYPASS;

/// What the device offers and the driver accepts.
#[derive(Clone, Copy, Debug)]
struct Features {
    /// Offer legacy BYPASS instead of BYPASS_CONFIG.
    legacy: bool,
    /// The driver accepts whichever bypass feature is offered.
    bypass_acked: bool,
    /// Initial config-space `bypass` (meaningful without `legacy`).
    config_bypass: bool,
    mmio: bool,
    map_unmap: bool,
}

#[derive(Clone, Debug)]
struct Mapping {
    start: u64,
    end: u64,
    phys: u64,
    flags: u32,
}

#[derive(Clone, Debug)]
struct Domain {
    id: u32,
    bypass: bool,
    endpoints: Vec<u32>,
    mappings: Vec<Mapping>,
}

/// The reference model: plain vectors, linear scans, no cleverness.
#[derive(Debug)]
struct Model {
    feats: Features,
    /// `(endpoint, attached domain)` for every known endpoint.
    endpoints: Vec<(u32, Option<u32>)>,
    domains: Vec<Domain>,
}

fn overlaps(a: (u64, u64), b: (u64, u64)) -> bool {
    a.0 <= b.1 && b.0 <= a.1
}

impl Model {
    fn new(feats: Features) -> Self {
        Model {
            feats,
            endpoints: KNOWN_EPS.iter().map(|&e| (e, None)).collect(),
            domains: Vec::new(),
        }
    }

    /// ATTACH_F_BYPASS is a known flag only with BYPASS_CONFIG negotiated.
    fn bypass_flag_known(&self) -> bool {
        !self.feats.legacy && self.feats.bypass_acked
    }

    /// "An endpoint is in bypass mode if" it is unattached and either
    /// BYPASS_CONFIG is offered with `bypass` = 1 (accepted or not), or
    /// legacy BYPASS is negotiated.
    fn unattached_bypass(&self) -> bool {
        if self.feats.legacy {
            self.feats.bypass_acked
        } else {
            self.feats.config_bypass
        }
    }

    fn attached(&self, ep: u32) -> Option<Option<u32>> {
        self.endpoints
            .iter()
            .find(|(e, _)| *e == ep)
            .map(|&(_, d)| d)
    }

    fn set_attached(&mut self, ep: u32, d: Option<u32>) {
        for e in &mut self.endpoints {
            if e.0 == ep {
                e.1 = d;
            }
        }
    }

    fn domain(&self, id: u32) -> Option<&Domain> {
        self.domains.iter().find(|d| d.id == id)
    }

    fn domain_mut(&mut self, id: u32) -> Option<&mut Domain> {
        self.domains.iter_mut().find(|d| d.id == id)
    }

    fn in_domain_range(id: u32) -> bool {
        (DOMAIN_START..=DOMAIN_END).contains(&id)
    }

    fn total_mappings(&self) -> usize {
        self.domains.iter().map(|d| d.mappings.len()).sum()
    }

    /// DETACH of `ep` from `id`; the domain ends with its last endpoint.
    fn remove_endpoint(&mut self, ep: u32, id: u32) {
        self.set_attached(ep, None);
        if let Some(d) = self.domain_mut(id) {
            d.endpoints.retain(|&e| e != ep);
        }
        self.domains.retain(|d| !d.endpoints.is_empty());
    }

    fn apply(&mut self, op: &Op) -> Status {
        match *op {
            Op::Attach {
                domain,
                endpoint,
                flags,
                reserved,
            } => self.attach(domain, endpoint, flags, reserved),
            Op::Detach { domain, endpoint } => self.detach(domain, endpoint),
            Op::Map {
                domain,
                start,
                end,
                phys,
                flags,
            } => self.map(domain, start, end, phys, flags),
            Op::Unmap {
                domain,
                start,
                end,
                reserved,
            } => self.unmap(domain, start, end, reserved),
        }
    }

    fn attach(&mut self, id: u32, ep: u32, flags: u32, reserved: bool) -> Status {
        // "If the reserved field of an ATTACH request is not zero, the
        // device MUST reject the request and set status to INVAL."
        if reserved {
            return Status::Inval;
        }
        // "If the device does not recognize a flags bit, it MUST reject the
        // request and set status to INVAL."
        let known = if self.bypass_flag_known() { BYPASS } else { 0 };
        if flags & !known != 0 {
            return Status::Inval;
        }
        // "If the endpoint ... doesn't exist, ... NOENT."
        let Some(current) = self.attached(ep) else {
            return Status::NoEnt;
        };
        if !Self::in_domain_range(id) {
            return Status::Range;
        }
        let bypass = flags & BYPASS != 0;
        match self.domain(id) {
            Some(d) => {
                // "the ATTACH_F_BYPASS flag is not consistent with that
                // domain, the device SHOULD reject ... INVAL."
                if d.bypass != bypass {
                    return Status::Inval;
                }
                if current == Some(id) {
                    return Status::Ok;
                }
            }
            None => {
                let frees_one = current
                    .and_then(|old| self.domain(old))
                    .is_some_and(|d| d.endpoints.len() == 1);
                if self.domains.len() + 1 - usize::from(frees_one) > MAX_DOMAINS {
                    return Status::NoMem;
                }
            }
        }
        // "as if the driver issued a DETACH request with this endpoint,
        // followed by the ATTACH request."
        if let Some(old) = current {
            self.remove_endpoint(ep, old);
        }
        // "If the domain doesn't exist in the device, it is created."
        if self.domain(id).is_none() {
            self.domains.push(Domain {
                id,
                bypass,
                endpoints: Vec::new(),
                mappings: Vec::new(),
            });
        }
        self.domain_mut(id).unwrap().endpoints.push(ep);
        self.set_attached(ep, Some(id));
        Status::Ok
    }

    fn detach(&mut self, id: u32, ep: u32) -> Status {
        let Some(current) = self.attached(ep) else {
            return Status::NoEnt;
        };
        if current != Some(id) {
            return Status::Inval;
        }
        self.remove_endpoint(ep, id);
        Status::Ok
    }

    fn map(&mut self, id: u32, start: u64, end: u64, phys: u64, flags: u32) -> Status {
        if !self.feats.map_unmap {
            return Status::Unsupp;
        }
        let known = R | W | if self.feats.mmio { MMIO } else { 0 };
        if flags & !known != 0 {
            return Status::Inval;
        }
        if !Self::in_domain_range(id) {
            return Status::Range;
        }
        let Some(d) = self.domain(id) else {
            return Status::NoEnt;
        };
        if d.bypass {
            return Status::Inval;
        }
        // "virt_end MUST be strictly greater than virt_start."
        if end <= start {
            return Status::Inval;
        }
        // "If virt_start, phys_start or (virt_end + 1) is not aligned on the
        // page granularity, the device SHOULD reject ... RANGE."
        if start % PAGE != 0 || phys % PAGE != 0 || end.wrapping_add(1) % PAGE != 0 {
            return Status::Range;
        }
        // "Any mapping request to virtual addresses outside of this range
        // fails."
        let input = INPUT_START..=INPUT_END;
        if !input.contains(&start) || !input.contains(&end) {
            return Status::Range;
        }
        // phys_end = phys_start + virt_end - virt_start must not wrap; it
        // may leave guest RAM (a DMA there fails on the bus).
        let Some(phys_end) = phys.checked_add(end - start) else {
            return Status::Range;
        };
        // An MMIO mapping must lie in the VMM's windows (docs/wire.md:
        // RANGE otherwise).
        if flags & MMIO != 0 && !(MMIO_WINDOW.0 <= phys && phys_end <= MMIO_WINDOW.1) {
            return Status::Range;
        }
        // "The device SHOULD reject a MAP request that overlaps a RESV_MEM
        // region."
        if RESERVED.iter().any(|&r| overlaps(r, (start, end))) {
            return Status::Range;
        }
        // "If a mapping already exists in the requested range, ... INVAL."
        if d.mappings
            .iter()
            .any(|m| overlaps((m.start, m.end), (start, end)))
        {
            return Status::Inval;
        }
        if d.mappings.len() >= MAX_PER_DOMAIN || self.total_mappings() >= MAX_TOTAL {
            return Status::NoMem;
        }
        self.domain_mut(id).unwrap().mappings.push(Mapping {
            start,
            end,
            phys,
            flags,
        });
        Status::Ok
    }

    fn unmap(&mut self, id: u32, start: u64, end: u64, reserved: bool) -> Status {
        if !self.feats.map_unmap {
            return Status::Unsupp;
        }
        if reserved {
            return Status::Inval;
        }
        if !Self::in_domain_range(id) {
            return Status::Range;
        }
        let Some(d) = self.domain_mut(id) else {
            return Status::NoEnt;
        };
        if d.bypass {
            return Status::Inval;
        }
        if end < start {
            return Status::Inval;
        }
        // "If a mapping affected by the range is not covered in its entirety
        // by the range ..., RANGE, and SHOULD NOT remove any mapping."
        let covered = |m: &Mapping| start <= m.start && m.end <= end;
        if d.mappings
            .iter()
            .any(|m| overlaps((m.start, m.end), (start, end)) && !covered(m))
        {
            return Status::Range;
        }
        d.mappings.retain(|m| !covered(m));
        Status::Ok
    }

    /// The guest-physical address `ep` reaches at `iova`, or why not.
    fn translate(&self, ep: u32, iova: u64, access: u32) -> Result<u64, FaultReason> {
        let Some(current) = self.attached(ep) else {
            return Err(FaultReason::Unknown);
        };
        let Some(id) = current else {
            return if self.unattached_bypass() {
                Ok(iova)
            } else {
                Err(FaultReason::Domain)
            };
        };
        let d = self.domain(id).expect("attached to a live domain");
        if d.bypass {
            return Ok(iova);
        }
        let m = d
            .mappings
            .iter()
            .find(|m| m.start <= iova && iova <= m.end)
            .ok_or(FaultReason::Mapping)?;
        if access & !(m.flags & (R | W)) != 0 {
            return Err(FaultReason::Mapping);
        }
        Ok(m.phys + (iova - m.start))
    }
}

#[derive(Clone, Copy, Debug)]
enum Op {
    Attach {
        domain: u32,
        endpoint: u32,
        flags: u32,
        reserved: bool,
    },
    Detach {
        domain: u32,
        endpoint: u32,
    },
    Map {
        domain: u32,
        start: u64,
        end: u64,
        phys: u64,
        flags: u32,
    },
    Unmap {
        domain: u32,
        start: u64,
        end: u64,
        reserved: bool,
    },
}

impl Op {
    fn request(&self) -> Request {
        match *self {
            Op::Attach {
                domain,
                endpoint,
                flags,
                reserved,
            } => Request::Attach(AttachReq {
                domain,
                endpoint,
                flags,
                reserved: if reserved { [0, 1, 0, 0] } else { [0; 4] },
            }),
            Op::Detach { domain, endpoint } => Request::Detach(DetachReq { domain, endpoint }),
            Op::Map {
                domain,
                start,
                end,
                phys,
                flags,
            } => Request::Map(MapReq {
                domain,
                virt_start: start,
                virt_end: end,
                phys_start: phys,
                flags,
            }),
            Op::Unmap {
                domain,
                start,
                end,
                reserved,
            } => Request::Unmap(UnmapReq {
                domain,
                virt_start: start,
                virt_end: end,
                reserved: if reserved { [0, 0, 0, 9] } else { [0; 4] },
            }),
        }
    }
}

/// One step: requests (one, or a batch in one notification) and the
/// translations to compare afterwards.
#[derive(Clone, Debug)]
struct Step {
    ops: Vec<Op>,
    batch: bool,
    checks: Vec<Check>,
}

/// A translation to compare: `(endpoint, iova, access)` given outright, or
/// an address inside the n-th live mapping of the model (modulo their
/// number) from an endpoint of its domain, so that mapped pages get probed
/// (and cached) often.
#[derive(Clone, Copy, Debug)]
enum Check {
    Fixed(u32, u64, u32),
    Mapped {
        mapping: usize,
        endpoint: usize,
        offset: u64,
        access: u32,
    },
}

impl Check {
    fn resolve(self, m: &Model) -> (u32, u64, u32) {
        match self {
            Check::Fixed(ep, iova, access) => (ep, iova, access),
            Check::Mapped {
                mapping,
                endpoint,
                offset,
                access,
            } => {
                let live: Vec<(&Domain, &Mapping)> = m
                    .domains
                    .iter()
                    .flat_map(|d| d.mappings.iter().map(move |x| (d, x)))
                    .collect();
                if live.is_empty() {
                    return (1, offset, access);
                }
                let (d, x) = live[mapping % live.len()];
                let ep = d.endpoints[endpoint % d.endpoints.len()];
                (ep, x.start + offset % (x.end - x.start + 1), access)
            }
        }
    }
}

fn features() -> impl Strategy<Value = Features> {
    (
        any::<bool>(),
        prop::bool::weighted(0.8),
        any::<bool>(),
        prop::bool::weighted(0.7),
        prop::bool::weighted(0.95),
    )
        .prop_map(
            |(legacy, bypass_acked, config_bypass, mmio, map_unmap)| Features {
                legacy,
                bypass_acked,
                config_bypass,
                mmio,
                map_unmap,
            },
        )
}

fn domain() -> impl Strategy<Value = u32> {
    prop_oneof![
        8 => 1u32..=2,
        4 => 3u32..=4,
        1 => Just(0u32),
        1 => Just(70_000u32),
    ]
}

fn endpoint() -> impl Strategy<Value = u32> {
    prop_oneof![9 => 1u32..=3, 1 => Just(UNKNOWN_EP)]
}

/// A virt_start: mostly pages of the 32-page window, sometimes misaligned,
/// at the top of the address space, or above the input range.
fn start() -> impl Strategy<Value = u64> {
    prop_oneof![
        12 => (0u64..32).prop_map(|p| p * PAGE),
        1 => (0u64..32).prop_map(|p| p * PAGE + 0x800),
        1 => Just(u64::MAX - PAGE + 1),
        1 => Just(INPUT_END + 1),
    ]
}

/// A `[virt_start, virt_end]`: mostly 1..=4 whole pages, sometimes a
/// misaligned, empty or reversed end (wrapping at the top).
fn range() -> impl Strategy<Value = (u64, u64)> {
    let len = prop_oneof![
        12 => (1u64..=4).prop_map(|n| n * PAGE - 1),
        1 => Just(0x7ff),
        1 => Just(0),
        1 => Just(u64::MAX - PAGE + 1),
    ];
    (start(), len).prop_map(|(s, l)| (s, s.wrapping_add(l)))
}

fn phys() -> impl Strategy<Value = u64> {
    prop_oneof![
        10 => (0u64..16).prop_map(|p| PHYS + p * PAGE),
        1 => Just(PHYS + 0x800),
        1 => Just(RAM_SIZE - PAGE),
        1 => Just(RAM_SIZE),
        1 => Just(u64::MAX - PAGE + 1),
        // In the MMIO window and past its end.
        2 => (0u64..6).prop_map(|p| MMIO_WINDOW.0 + p * PAGE),
    ]
}

fn map_flags() -> impl Strategy<Value = u32> {
    prop_oneof![
        10 => 0u32..8,
        1 => Just(R | (1 << 3)),
        1 => Just(1u32 << 31),
    ]
}

fn attach_flags() -> impl Strategy<Value = u32> {
    prop_oneof![
        8 => Just(0u32),
        3 => Just(BYPASS),
        1 => Just(1u32 << 1),
        1 => Just(BYPASS | (1 << 5)),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    let reserved = || prop::bool::weighted(0.05);
    prop_oneof![
        3 => (domain(), endpoint(), attach_flags(), reserved()).prop_map(
            |(domain, endpoint, flags, reserved)| Op::Attach { domain, endpoint, flags, reserved }
        ),
        1 => (domain(), endpoint()).prop_map(|(domain, endpoint)| Op::Detach { domain, endpoint }),
        8 => (domain(), range(), phys(), map_flags()).prop_map(
            |(domain, (start, end), phys, flags)| Op::Map { domain, start, end, phys, flags }
        ),
        3 => (
            domain(),
            prop_oneof![8 => range(), 1 => Just((0, u64::MAX))],
            reserved()
        )
            .prop_map(|(domain, (start, end), reserved)| Op::Unmap {
                domain,
                start,
                end,
                reserved
            }),
    ]
}

fn check() -> impl Strategy<Value = Check> {
    let iova = prop_oneof![
        10 => (0u64..34, prop_oneof![Just(0u64), Just(8), Just(PAGE - 8)])
            .prop_map(|(p, o)| p * PAGE + o),
        1 => Just(u64::MAX - 7),
    ];
    let access = prop_oneof![
        Just(ACCESS_READ),
        Just(ACCESS_WRITE),
        Just(ACCESS_READ | ACCESS_WRITE)
    ];
    let fixed = (
        prop_oneof![9 => 1u32..=3, 1 => Just(UNKNOWN_EP)],
        iova,
        access.clone(),
    )
        .prop_map(|(ep, iova, access)| Check::Fixed(ep, iova, access));
    let mapped = (any::<usize>(), any::<usize>(), 0u64..4 * PAGE, access).prop_map(
        |(mapping, endpoint, offset, access)| Check::Mapped {
            mapping,
            endpoint,
            offset: offset & !7,
            access,
        },
    );
    prop_oneof![fixed, mapped]
}

fn step() -> impl Strategy<Value = Step> {
    let ops = prop_oneof![
        4 => op().prop_map(|o| (vec![o], false)),
        1 => prop::collection::vec(op(), 2..8).prop_map(|v| (v, true)),
    ];
    (ops, prop::collection::vec(check(), 0..4)).prop_map(|((ops, batch), checks)| Step {
        ops,
        batch,
        checks,
    })
}

fn config(f: &Features) -> IommuConfig {
    let mut c = IommuConfig {
        bypass: f.config_bypass,
        legacy_bypass: f.legacy,
        reserved_regions: vec![
            ReservedRegion {
                start: RESERVED[0].0,
                end: RESERVED[0].1,
                kind: ReservedKind::Reserved,
            },
            ReservedRegion {
                start: RESERVED[1].0,
                end: RESERVED[1].1,
                kind: ReservedKind::Msi,
            },
        ],
        ..IommuConfig::default()
    };
    c.limits.max_domains = MAX_DOMAINS as u32;
    c.limits.max_mappings_per_domain = MAX_PER_DOMAIN as u64;
    c.limits.max_mappings = MAX_TOTAL as u64;
    c.limits.max_pending_faults = 16;
    assert_eq!(c.domain_range.start, DOMAIN_START);
    assert_eq!(c.domain_range.end, DOMAIN_END);
    assert_eq!(
        (c.input_range.start, c.input_range.end),
        (INPUT_START, INPUT_END)
    );
    assert_eq!(c.granule(), PAGE);
    c.validate().expect("valid test config");
    c
}

fn harness(f: &Features) -> Harness {
    let f = *f;
    let h = Harness::with_features(&config(&f), &KNOWN_EPS, RAM_MIB, move |dev| {
        let mut acked = driver_features(dev);
        if !f.bypass_acked {
            acked &= !(1 << VIRTIO_IOMMU_F_BYPASS | 1 << VIRTIO_IOMMU_F_BYPASS_CONFIG);
        }
        if !f.mmio {
            acked &= !(1 << VIRTIO_IOMMU_F_MMIO);
        }
        if !f.map_unmap {
            acked &= !(1 << VIRTIO_IOMMU_F_MAP_UNMAP);
        }
        acked
    });
    h.dev
        .viommu()
        .add_mmio_window(vmm_iommu::backend::MmioWindow {
            gpa: MMIO_WINDOW.0,
            len: MMIO_WINDOW.1 - MMIO_WINDOW.0 + 1,
            hva: None,
        })
        .expect("window above RAM");
    h
}

/// The device's state must be the model's.
fn compare_state(h: &Harness, m: &Model) -> Result<(), TestCaseError> {
    let st = h.dev.viommu().state();
    for ep in ALL_EPS {
        prop_assert_eq!(
            st.endpoint(ep).map(|e| e.domain),
            m.attached(ep),
            "endpoint {}",
            ep
        );
    }
    prop_assert_eq!(st.domain_count(), m.domains.len());
    prop_assert_eq!(st.total_mappings(), m.total_mappings() as u64);
    for id in ALL_DOMAINS {
        let md = m.domain(id);
        prop_assert_eq!(
            st.is_bypass_domain(id),
            md.map(|d| d.bypass),
            "domain {}",
            id
        );
        let mut want_eps = md.map(|d| d.endpoints.clone()).unwrap_or_default();
        let mut got_eps = st.domain_endpoints(id).to_vec();
        want_eps.sort_unstable();
        got_eps.sort_unstable();
        prop_assert_eq!(got_eps, want_eps, "endpoints of domain {}", id);
        let mut want: Vec<(u64, u64, u64, u32)> = md
            .map(|d| {
                d.mappings
                    .iter()
                    .map(|x| (x.start, x.end, x.phys, x.flags))
                    .collect()
            })
            .unwrap_or_default();
        want.sort_unstable();
        let got: Vec<(u64, u64, u64, u32)> = st
            .mappings(id)
            .iter()
            .map(|x| (x.start, x.end, x.phys, x.flags))
            .collect();
        prop_assert_eq!(got, want, "mappings of domain {}", id);
    }
    Ok(())
}

type Dma = IommuMemory<GuestMemoryMmap, EndpointIommu>;

/// Translations through the slow path, the endpoint's long-lived
/// Translator and its long-lived IommuMemory must all be the model's.
fn compare_translation(
    h: &Harness,
    m: &Model,
    translators: &mut [Translator],
    dmas: &[Dma],
    (ep, iova, access): (u32, u64, u32),
) -> Result<(), TestCaseError> {
    let want = m.translate(ep, iova, access);
    let slow = h
        .dev
        .viommu()
        .translate(ep, iova, access)
        .map(|t| t.gpa(iova));
    prop_assert_eq!(
        slow,
        want,
        "slow path ep {} iova {:#x} access {}",
        ep,
        iova,
        access
    );
    let idx = ALL_EPS.iter().position(|&e| e == ep).unwrap();
    let fast = translators[idx]
        .translate(iova, access)
        .map(|(gpa, _)| gpa)
        .map_err(|e| e.reason);
    prop_assert_eq!(
        fast,
        want,
        "translator ep {} iova {:#x} access {}",
        ep,
        iova,
        access
    );
    // Reads only: a write through bypass could land on the harness's rings.
    if access == ACCESS_READ {
        let got = dmas[idx].read_obj::<u8>(GuestAddress(iova));
        match want {
            Ok(gpa) if gpa < RAM_SIZE => {
                let direct = h.mem.read_obj::<u8>(GuestAddress(gpa)).unwrap();
                prop_assert_eq!(got.ok(), Some(direct), "dma ep {} iova {:#x}", ep, iova);
            }
            _ => prop_assert!(
                got.is_err(),
                "dma ep {} iova {:#x} read succeeded",
                ep,
                iova
            ),
        }
    }
    Ok(())
}

fn run(feats: Features, steps: Vec<Step>) -> Result<(), TestCaseError> {
    let mut h = harness(&feats);
    let mut m = Model::new(feats);
    // A distinct byte per page of the mapped physical area, so reads through
    // a wrong translation show.
    for p in 0..32u64 {
        h.mem
            .write_slice(&[p as u8 + 1; PAGE as usize], GuestAddress(PHYS + p * PAGE))
            .unwrap();
    }
    let mut translators: Vec<Translator> = ALL_EPS
        .iter()
        .map(|&ep| h.dev.viommu().translator(ep))
        .collect();
    let dmas: Vec<Dma> = ALL_EPS
        .iter()
        .map(|&ep| IommuMemory::new(h.mem.clone(), h.dev.viommu().endpoint_iommu(ep), true, ()))
        .collect();
    compare_state(&h, &m)?;
    // Triples probed in earlier steps are probed again after every step:
    // an IOTLB that still serves a revoked page shows here.
    let mut recent: std::collections::VecDeque<(u32, u64, u32)> = Default::default();
    for (i, step) in steps.iter().enumerate() {
        let got = if step.batch {
            let reqs: Vec<Request> = step.ops.iter().map(Op::request).collect();
            h.send_batch(&reqs)
        } else {
            vec![h.send(&step.ops[0].request())]
        };
        let want: Vec<Status> = step.ops.iter().map(|op| m.apply(op)).collect();
        prop_assert_eq!(got, want, "step {}: {:?}", i, step.ops);
        compare_state(&h, &m)?;
        for c in &step.checks {
            recent.push_back(c.resolve(&m));
            if recent.len() > RECHECKED {
                recent.pop_front();
            }
        }
        for &c in &recent {
            compare_translation(&h, &m, &mut translators, &dmas, c)?;
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 64,
        max_shrink_iters: 2048,
        ..ProptestConfig::default()
    })]

    #[test]
    fn device_matches_reference_model(
        feats in features(),
        steps in prop::collection::vec(step(), 1..200),
    ) {
        run(feats, steps)?;
    }
}

/// A fixed scenario through the same machinery, so that a broken model or
/// harness shows up even if the random cases happen to miss it.
#[test]
fn reference_model_fixed_scenario() {
    let feats = Features {
        legacy: false,
        bypass_acked: true,
        config_bypass: false,
        mmio: true,
        map_unmap: true,
    };
    let map = |domain, a: u64, b: u64, flags| Op::Map {
        domain,
        start: a * PAGE,
        end: (b + 1) * PAGE - 1,
        phys: PHYS + a * PAGE,
        flags,
    };
    let attach = |domain, endpoint, flags| Op::Attach {
        domain,
        endpoint,
        flags,
        reserved: false,
    };
    let unmap = |domain, a: u64, b: u64| Op::Unmap {
        domain,
        start: a * PAGE,
        end: (b + 1) * PAGE - 1,
        reserved: false,
    };
    let steps = vec![
        Step {
            ops: vec![attach(1, 1, 0), attach(2, 2, BYPASS), attach(3, 3, 0)],
            batch: true,
            checks: vec![
                Check::Fixed(2, 0x3000, ACCESS_READ),
                Check::Fixed(1, 0x3000, ACCESS_READ),
            ],
        },
        Step {
            ops: vec![attach(4, 1, 0)],
            batch: false,
            checks: vec![],
        },
        Step {
            ops: vec![
                map(4, 0, 1, R),
                map(4, 2, 2, W),
                map(4, 20, 20, R),
                map(4, 1, 3, R),
            ],
            batch: true,
            checks: vec![
                Check::Fixed(1, 0x1008, ACCESS_READ),
                Check::Fixed(1, 0x1008, ACCESS_WRITE),
                Check::Fixed(1, 0x2000, ACCESS_READ),
                Check::Fixed(3, 0x1008, ACCESS_READ),
            ],
        },
        Step {
            ops: vec![
                unmap(4, 1, 2),
                unmap(4, 0, 2),
                attach(4, 3, 0),
                attach(3, 1, 0),
            ],
            batch: true,
            checks: vec![
                Check::Fixed(1, 0x1008, ACCESS_READ),
                Check::Fixed(3, 0x1008, ACCESS_READ),
            ],
        },
    ];
    let res = run(feats, steps.clone());
    assert!(res.is_ok(), "{res:?}");
    // The statuses the model gives are the spec's.
    let mut m = Model::new(feats);
    let got: Vec<Vec<Status>> = steps
        .iter()
        .map(|s| s.ops.iter().map(|o| m.apply(o)).collect())
        .collect();
    use Status::*;
    assert_eq!(
        got,
        vec![
            vec![Ok, Ok, NoMem],
            vec![Ok],
            vec![Ok, Ok, Range, Inval],
            vec![Range, Ok, Ok, NoMem],
        ]
    );
}

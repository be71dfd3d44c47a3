//! The `Translator`'s lock-free path: what it answers is what the state
//! answers (random MAP, UNMAP, ATTACH and DETACH, large and unaligned
//! mappings included), and no translation that starts after an UNMAP's
//! status returns the removed mapping, while translators on other threads
//! run beside the requests.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use proptest::prelude::*;
use vmm_iommu::config::IommuConfig;
use vmm_iommu::wire::{
    AttachReq, DetachReq, MapReq, Request, UnmapReq, VIRTIO_IOMMU_F_MAP_UNMAP,
    VIRTIO_IOMMU_MAP_F_READ, VIRTIO_IOMMU_MAP_F_WRITE,
};
use vmm_iommu::Applied;
use vmm_iommu::Viommu;
use vmm_iommu::{ACCESS_READ, ACCESS_WRITE};

const EP: u32 = 1;
const RW: u32 = VIRTIO_IOMMU_MAP_F_READ | VIRTIO_IOMMU_MAP_F_WRITE;
/// 64 GiB of guest RAM declared to the state (never touched).
const RAM: (u64, u64) = (0, (64 << 30) - 1);

fn viommu() -> Arc<Viommu> {
    let v = Viommu::new(&IommuConfig::default(), &[EP], &[RAM]).unwrap();
    v.set_acked_features(1 << VIRTIO_IOMMU_F_MAP_UNMAP);
    Arc::new(v)
}

fn attach(domain: u32) -> Request {
    Request::Attach(AttachReq {
        domain,
        endpoint: EP,
        ..Default::default()
    })
}

fn map(start: u64, end: u64, phys: u64, flags: u32) -> Request {
    Request::Map(MapReq {
        domain: 1,
        virt_start: start,
        virt_end: end,
        phys_start: phys,
        flags,
    })
}

fn unmap(start: u64, end: u64) -> Request {
    Request::Unmap(UnmapReq {
        domain: 1,
        virt_start: start,
        virt_end: end,
        reserved: [0; 4],
    })
}

#[derive(Clone, Debug)]
enum Op {
    Map {
        page: u64,
        pages: u64,
        phys: u64,
        flags: u32,
    },
    Unmap {
        page: u64,
        pages: u64,
    },
    Detach,
    Attach,
}

fn op() -> impl Strategy<Value = Op> {
    // Pages over 4 GiB of IOVA; sizes from one page to past 1 GiB, so
    // that block entries of every level appear, aligned or not.
    let pages = prop_oneof![
        1u64..4,
        500u64..530,
        Just(512),
        Just(1024),
        262_140u64..262_150
    ];
    prop_oneof![
        8 => (0u64..(1 << 20), pages.clone(), 0u64..(1 << 20), 0u32..4)
            .prop_map(|(page, pages, phys, flags)| Op::Map { page, pages, phys, flags }),
        6 => (0u64..(1 << 20), pages).prop_map(|(page, pages)| Op::Unmap { page, pages }),
        1 => Just(Op::Detach),
        1 => Just(Op::Attach),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn translator_answers_as_the_state_after_every_request(
        ops in prop::collection::vec(op(), 1..40),
        probes in prop::collection::vec((0u64..(1 << 20), 0u64..4096, 1u32..4), 32),
    ) {
        let v = viommu();
        v.apply(&attach(1)).unwrap();
        let mut tr = v.translator(EP);
        let mut mapped: Vec<u64> = Vec::new();
        for op in &ops {
            match *op {
                Op::Map { page, pages, phys, flags } => {
                    let start = page << 12;
                    let _ = v.apply(&map(start, start + (pages << 12) - 1, phys << 12, flags));
                    mapped.push(start);
                }
                Op::Unmap { page, pages } => {
                    let start = page << 12;
                    let _ = v.apply(&unmap(start, start + (pages << 12) - 1));
                }
                Op::Detach => {
                    let _ = v.apply(&Request::Detach(DetachReq {
                        domain: 1,
                        endpoint: EP,
                                            }));
                }
                Op::Attach => {
                    let _ = v.apply(&attach(1));
                }
            }
            // Probes at random pages and at the starts and ends of what
            // was mapped, for every access.
            let at = probes
                .iter()
                .map(|&(p, off, a)| ((p << 12) | off, a))
                .chain(mapped.iter().flat_map(|&s| [(s, 1), (s.wrapping_sub(1), 2), (s + 0x1ff_fff, 3)]));
            for (iova, access) in at {
                let access = access & (ACCESS_READ | ACCESS_WRITE);
                let want = v.translate(EP, iova, access).map(|t| t.gpa(iova));
                let got = tr.translate(iova, access).map(|(gpa, _)| gpa).map_err(|e| e.reason);
                prop_assert_eq!(got, want, "iova {:#x} access {} after {:?}", iova, access, op);
            }
            let attached = v.state().endpoint(EP).and_then(|e| e.domain).is_some();
            prop_assert_eq!(tr.is_lock_free(), attached);
        }
    }
}

#[test]
fn no_translation_returns_a_mapping_after_its_unmap_status() {
    const RESIDENT: u64 = 4096;
    const PAIRS: u64 = 200_000;
    let v = viommu();
    v.apply(&attach(1)).unwrap();
    // Even pages resident; the pairs map and unmap odd pages.
    for i in 0..RESIDENT {
        let iova = 0x1_0000_0000 + 2 * i * 4096;
        v.apply(&map(iova, iova + 4095, i * 4096, RW)).unwrap();
    }
    // The IOVA whose UNMAP was answered last; 0 while a MAP is under way.
    // Pair k uses a page no other pair uses, so a value never comes back.
    let last = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    // The pairs start once both readers hold their translator: a writer
    // that takes the write lock back to back can otherwise finish before
    // a reader gets the read lock it builds one under.
    let ready = Arc::new(AtomicU64::new(0));
    // Checks made, over both readers: every 1,024 pairs the writer leaves
    // the last UNMAP's IOVA in place until a reader has checked it, so the
    // check runs however the three threads share two cores.
    let seen = Arc::new(AtomicU64::new(0));
    let readers: Vec<_> = (0..2)
        .map(|t| {
            let (v, last, done, ready, seen) = (
                Arc::clone(&v),
                Arc::clone(&last),
                Arc::clone(&done),
                Arc::clone(&ready),
                Arc::clone(&seen),
            );
            std::thread::spawn(move || {
                let mut tr = v.translator(EP);
                assert!(tr.is_lock_free());
                ready.fetch_add(1, Ordering::AcqRel);
                let (mut checked, mut x) = (0u64, 0x9E37_79B9_7F4A_7C15u64 ^ t);
                while !done.load(Ordering::Acquire) {
                    let gone = last.load(Ordering::Acquire);
                    if gone != 0 {
                        let r = tr.translate(gone, ACCESS_READ);
                        // Still `gone`: no MAP started since its UNMAP's
                        // status, so nothing may translate there.
                        assert!(
                            r.is_err() || last.load(Ordering::Acquire) != gone,
                            "{gone:#x} translated after its UNMAP: {r:?}"
                        );
                        checked += 1;
                        seen.fetch_add(1, Ordering::AcqRel);
                    }
                    // And the resident mappings keep translating right.
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let i = x % RESIDENT;
                    let iova = 0x1_0000_0000 + 2 * i * 4096 + 64;
                    assert_eq!(tr.translate(iova, ACCESS_READ).unwrap().0, i * 4096 + 64);
                }
                checked
            })
        })
        .collect();
    while ready.load(Ordering::Acquire) < 2 {
        std::thread::yield_now();
    }
    for k in 0..PAIRS {
        let iova = 0x1_0000_0000 + (2 * (k % RESIDENT) + 1) * 4096 + (k / RESIDENT) * (1 << 32);
        last.store(0, Ordering::Release);
        assert_eq!(
            v.apply(&map(iova, iova + 4095, 0x1000, RW)),
            Ok(Applied::Done)
        );
        assert_eq!(v.apply(&unmap(iova, iova + 4095)), Ok(Applied::Unmapped(1)));
        last.store(iova, Ordering::Release);
        if k % 1024 == 1023 {
            let before = seen.load(Ordering::Acquire);
            while seen.load(Ordering::Acquire) == before {
                std::thread::yield_now();
            }
        }
    }
    done.store(true, Ordering::Release);
    let checked: u64 = readers.into_iter().map(|r| r.join().unwrap()).sum();
    assert!(checked >= PAIRS / 1024, "{checked} checks");
}

#[test]
fn translators_fall_back_to_the_state_where_no_index_applies() {
    let v = viommu();
    // Unattached: no index, and the state's verdict (blocked).
    let mut tr = v.translator(EP);
    assert!(!tr.is_lock_free());
    assert!(tr.translate(0x1000, ACCESS_READ).is_err());
    // Attached to a MAP-mode domain: the index, from the next access on.
    v.apply(&attach(1)).unwrap();
    v.apply(&map(0x1000, 0x1fff, 0x5000, RW)).unwrap();
    assert_eq!(tr.translate(0x1010, ACCESS_WRITE).unwrap().0, 0x5010);
    assert!(tr.is_lock_free());
    // A bypass domain: the state again.
    v.apply(&Request::Attach(AttachReq {
        domain: 2,
        endpoint: EP,
        flags: vmm_iommu::wire::VIRTIO_IOMMU_ATTACH_F_BYPASS,
        ..Default::default()
    }))
    .ok();
    let _ = tr.translate(0x1010, ACCESS_READ);
    let in_bypass = v.state().is_bypass_domain(2) == Some(true);
    assert_eq!(tr.is_lock_free(), !in_bypass);
}

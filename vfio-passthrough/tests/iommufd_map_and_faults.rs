//! iommufd MAP mode (one IOAS per domain), bypass, and VT-d page
//! requests through the fault queue, over the recording host.

mod common;

use std::path::Path;
use std::sync::Arc;

use common::*;
use vfio_passthrough::host::{Handle, Op};
use vfio_passthrough::recording::RecordingHost;
use vfio_passthrough::IommufdBackend;
use vmm_iommu::backend::{DomainView, IommuBackend, PageResponse};
use vmm_iommu::wire::{Status, VIRTIO_IOMMU_PAGE_RESP_SUCCESS};

const EP: u32 = 16;

fn fixture() -> (Arc<RecordingHost>, IommufdBackend) {
    let (rec, host, _mem, ram) = setup(RecordingHost::default());
    let b = IommufdBackend::new(host, ram).expect("backend");
    b.add_endpoint(EP, Path::new("/sys/bus/pci/devices/0000:65:00.0"))
        .expect("add");
    (rec, b)
}

fn view(id: u32, m: &[vmm_iommu::Mapping]) -> DomainView<'_> {
    DomainView {
        id,
        bypass: false,
        mappings: m,
        table: None,
    }
}

#[test]
fn map_mode_uses_one_ioas_per_domain() {
    let (rec, b) = fixture();
    let maps = [rw(0x1000, 0x1fff, 0x3000)];
    b.attach(EP, &view(2, &maps)).unwrap();
    let ioas = le32(&rec.calls_of(Op::IoasAlloc).pop().unwrap().out, 8);
    assert_eq!(rec.ioas_mappings(ioas), vec![(0x1000, 0x1000)]);
    let dev = b.device_of(EP).unwrap();
    assert_eq!(rec.attached(dev, 0), Some(ioas));
    b.map(2, &rw(0x8000_0000, 0x8011_ffff, 0xf_0000)).unwrap();
    assert_eq!(rec.ioas_mappings(ioas).len(), 4);
    let last = rec.calls_of(Op::IoasMap).pop().unwrap();
    // size 40, flags FIXED_IOVA|WRITEABLE|READABLE, ioas_id, iova@32.
    assert_eq!(
        (le32(&last.arg, 0), le32(&last.arg, 4), le32(&last.arg, 8)),
        (40, 7, ioas)
    );
    assert_eq!(le64(&last.arg, 32), 0x8011_0000);
    b.unmap(2, &[rw(0x8000_0000, 0x8011_ffff, 0xf_0000)])
        .unwrap();
    assert_eq!(rec.ioas_mappings(ioas).len(), 1);
}

#[test]
fn failed_ioas_map_is_undone() {
    let (rec, b) = fixture();
    b.attach(EP, &view(2, &[])).unwrap();
    let ioas = le32(&rec.calls_of(Op::IoasAlloc).pop().unwrap().out, 8);
    let n = rec.count(Op::IoasMap);
    rec.fail_nth(Op::IoasMap, n + 2, libc::ENOMEM);
    assert_eq!(
        b.map(2, &rw(0x8000_0000, 0x8011_ffff, 0xf_0000))
            .unwrap_err()
            .status(),
        Status::DevErr
    );
    assert!(rec.ioas_mappings(ioas).is_empty());
    // A physical range that wraps is refused; one beyond RAM is not (its
    // RAM part, here none, is what the host maps).
    assert_eq!(
        b.map(2, &rw(0x1000, 0x2fff, u64::MAX - 0xfff))
            .unwrap_err()
            .status(),
        Status::Range
    );
    b.map(2, &rw(0, 0xfff, 0x3000_0000)).unwrap();
    assert!(rec.ioas_mappings(ioas).is_empty());
}

#[test]
fn leaving_the_last_endpoint_destroys_the_domain_ioas_and_bypass_uses_the_gpa_ioas() {
    let (rec, b) = fixture();
    b.attach(EP, &view(2, &[rw(0x1000, 0x1fff, 0x3000)]))
        .unwrap();
    let ioas = le32(&rec.calls_of(Op::IoasAlloc).pop().unwrap().out, 8);
    b.attach(
        EP,
        &DomainView {
            id: 9,
            bypass: true,
            mappings: &[],
            table: None,
        },
    )
    .unwrap();
    let dev = b.device_of(EP).unwrap();
    assert_eq!(rec.attached(dev, 0), Some(b.gpa_ioas()));
    assert!(!rec.is_live(ioas));
    b.detach(EP, 9).unwrap();
    assert_eq!(rec.attachments(dev), 0);
}

#[test]
fn attach_failure_keeps_the_old_domain() {
    let (rec, b) = fixture();
    b.attach(EP, &view(2, &[])).unwrap();
    let dev = b.device_of(EP).unwrap();
    let old = rec.attached(dev, 0);
    let live = rec.live_objects();
    // The next attach (the first ones: the reserved-region probe at
    // add_endpoint, and domain 2).
    rec.fail_nth(Op::AttachPt, rec.count(Op::AttachPt), libc::EBUSY);
    assert!(b
        .attach(EP, &view(3, &[rw(0x1000, 0x1fff, 0x3000)]))
        .is_err());
    assert_eq!(rec.attached(dev, 0), old);
    assert_eq!(rec.live_objects(), live);
}

fn pgfault(dev_id: u32, pasid: u32, grpid: u32, cookie: u32) -> Vec<u8> {
    let mut b = Vec::new();
    // flags PASID_VALID | LAST_PAGE, perm READ|WRITE.
    for v in [3u32, dev_id, pasid, grpid, 3, 0] {
        b.extend_from_slice(&v.to_le_bytes());
    }
    b.extend_from_slice(&0x7000_0000u64.to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes());
    b.extend_from_slice(&cookie.to_le_bytes());
    b
}

#[test]
fn page_requests_are_drained_and_answered_with_their_cookie() {
    let (rec, b) = fixture();
    let fq = Handle(le32(&rec.calls_of(Op::FaultQueueAlloc)[0].out, 12) as i32);
    rec.push_read(fq, pgfault(1, 5, 3, 77));
    let mut out = Vec::new();
    b.drain_faults(&mut out);
    assert_eq!(out.len(), 1);
    assert_eq!(
        (out[0].endpoint, out[0].pasid, out[0].page_request),
        (EP, Some(5), Some(3))
    );
    let resp = PageResponse {
        endpoint: EP,
        pasid: Some(5),
        grpid: 3,
        code: VIRTIO_IOMMU_PAGE_RESP_SUCCESS,
    };
    b.page_response(&resp).unwrap();
    let w = rec.calls_of(Op::Write).pop().unwrap();
    assert_eq!(w.target, fq);
    // struct iommu_hwpt_page_response { cookie 77, code SUCCESS (0) }.
    assert_eq!(w.payload, vec![77, 0, 0, 0, 0, 0, 0, 0]);
    assert_eq!(b.page_response(&resp).unwrap_err().status(), Status::NoEnt);
}

#[test]
fn failed_page_response_stays_pending() {
    let (rec, b) = fixture();
    let fq = Handle(le32(&rec.calls_of(Op::FaultQueueAlloc)[0].out, 12) as i32);
    rec.push_read(fq, pgfault(1, 5, 4, 9));
    b.drain_faults(&mut Vec::new());
    rec.fail_nth(Op::Write, 0, libc::EIO);
    let resp = PageResponse {
        endpoint: EP,
        pasid: Some(5),
        grpid: 4,
        code: 1,
    };
    assert_eq!(b.page_response(&resp).unwrap_err().status(), Status::DevErr);
    b.page_response(&resp).unwrap();
    let w = rec.calls_of(Op::Write).pop().unwrap();
    assert_eq!(w.payload, vec![9, 0, 0, 0, 1, 0, 0, 0]);
}

#[test]
fn construction_failure_closes_the_iommufd() {
    let rec = RecordingHost::default();
    rec.fail_nth(Op::IoasMap, 2, libc::ENOMEM);
    let (rec, host, _mem, ram) = setup(rec);
    assert!(IommufdBackend::new(host, ram).is_err());
    assert_eq!(rec.open_handles(), 0);
    assert_eq!(rec.live_objects(), 0);
}

#[test]
fn unattached_bypass_attaches_the_gpa_ioas_and_blocking_detaches() {
    // Config-space bypass reaches the host: the unattached device is put on
    // the guest-physical IOAS, and taken off it when bypass ends.
    let (rec, b) = fixture();
    let dev = b.device_of(EP).unwrap();
    b.set_unattached_bypass(EP, true).unwrap();
    assert_eq!(rec.attached(dev, 0), Some(b.gpa_ioas()));
    b.set_unattached_bypass(EP, false).unwrap();
    assert_eq!(rec.attachments(dev), 0);
    assert!(b.set_unattached_bypass(EP + 100, true).is_err());
}

/// Hot-unplug through the trait (what `Viommu::remove_endpoint` calls):
/// the endpoint's cdev closes and the backend forgets it; a second call,
/// or one for an endpoint it never had, changes nothing.
#[test]
fn unplug_through_the_trait_closes_the_device() {
    let (rec, b) = fixture();
    b.attach(EP, &view(1, &[rw(0x1000, 0x1fff, 0x2000)]))
        .unwrap();
    let open = rec.open_handles();
    IommuBackend::detach(&b, EP, 1).unwrap();
    IommuBackend::remove_endpoint(&b, EP);
    assert_eq!(b.device_of(EP), None);
    assert!(rec.ops().contains(&Op::Close));
    assert!(rec.open_handles() < open, "the cdev is closed");
    let after = rec.ops().len();
    IommuBackend::remove_endpoint(&b, EP);
    IommuBackend::remove_endpoint(&b, 99);
    assert_eq!(rec.ops().len(), after);
}

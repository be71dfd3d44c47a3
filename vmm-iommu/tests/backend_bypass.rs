//! Bypass of unattached endpoints reaches the backends (issue 11, item 5),
//! and a backend that cannot detach at device reset gets its endpoint
//! blocked (item 6). The spec's rule (5.13.6, "An endpoint is in bypass
//! mode if"): with `VIRTIO_IOMMU_F_BYPASS_CONFIG` offered, an endpoint
//! attached to no domain bypasses when config-space `bypass` is 1. A
//! backend that programs host hardware (VFIO) only learns of it through
//! `IommuBackend::set_unattached_bypass`.

use std::sync::{Arc, Mutex};

use vmm_iommu::backend::{
    BackendCaps, BackendError, BackendFault, DomainId, DomainView, EndpointId, IommuBackend,
    PageResponse, TableBinding,
};
use vmm_iommu::config::IommuConfig;
use vmm_iommu::invalidation::Invalidation;
use vmm_iommu::testing::{driver_features, Harness};
use vmm_iommu::wire::*;
use vmm_iommu::Mapping;
use vmm_iommu::Router;

const EP: u32 = 8;
const EP2: u32 = 9;

/// Records the calls that matter here; fails detach when told to.
#[derive(Default)]
struct Host {
    calls: Mutex<Vec<String>>,
    fail_detach: Mutex<bool>,
}

impl Host {
    fn take(&self) -> Vec<String> {
        std::mem::take(&mut self.calls.lock().unwrap())
    }
    fn log(&self, s: String) {
        self.calls.lock().unwrap().push(s);
    }
}

impl IommuBackend for Host {
    fn name(&self) -> &str {
        "host"
    }
    fn caps(&self, _ep: EndpointId) -> BackendCaps {
        BackendCaps::map_only(0x1000, (0, u64::MAX))
    }
    fn attach(&self, ep: EndpointId, dom: &DomainView<'_>) -> Result<(), BackendError> {
        self.log(format!("attach {ep} {}", dom.id));
        Ok(())
    }
    fn detach(&self, ep: EndpointId, dom: DomainId) -> Result<(), BackendError> {
        self.log(format!("detach {ep} {dom}"));
        if *self.fail_detach.lock().unwrap() {
            return Err(BackendError::Host {
                op: "detach",
                source: std::io::Error::from_raw_os_error(5),
            });
        }
        Ok(())
    }
    fn set_unattached_bypass(&self, ep: EndpointId, bypass: bool) -> Result<(), BackendError> {
        self.log(format!("bypass {ep} {bypass}"));
        Ok(())
    }
    fn map(&self, _dom: DomainId, _m: &Mapping) -> Result<(), BackendError> {
        Ok(())
    }
    fn unmap(&self, _dom: DomainId, _removed: &[Mapping]) -> Result<(), BackendError> {
        Ok(())
    }
    fn bind_table(&self, _ep: EndpointId, _b: &TableBinding) -> Result<(), BackendError> {
        Err(BackendError::Unsupported("no tables".into()))
    }
    fn unbind_table(&self, _ep: EndpointId, _dom: DomainId) -> Result<(), BackendError> {
        Ok(())
    }
    fn invalidate(&self, _dom: DomainId, _batch: &[Invalidation]) -> Result<(), BackendError> {
        Ok(())
    }
    fn page_response(&self, _resp: &PageResponse) -> Result<(), BackendError> {
        Ok(())
    }
    fn drain_faults(&self, _out: &mut Vec<BackendFault>) {}
}

fn harness(cfg: &IommuConfig) -> (Harness, Arc<Host>) {
    let host = Arc::new(Host::default());
    let h2 = host.clone();
    let h = Harness::with_router(
        cfg,
        &[EP, EP2],
        16,
        &[],
        move |_, _| {
            let mut r = Router::new();
            r.add(h2, &[EP, EP2]);
            r
        },
        driver_features,
    );
    (h, host)
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

#[test]
fn config_bypass_reaches_the_backend_for_unattached_endpoints_only() {
    // "An endpoint is in bypass mode if: the VIRTIO_IOMMU_F_BYPASS_CONFIG feature is offered and: config field bypass is 1 and the endpoint is not attached to a domain."
    let (mut h, host) = harness(&IommuConfig::default());
    assert_eq!(h.send(&attach(1, EP)), Status::Ok);
    host.take();
    h.dev.write_config(CONFIG_BYPASS_OFFSET as u64, &[1]);
    assert_eq!(host.take(), ["bypass 9 true"]);
    // Leaving its domain while bypass is on: the backend opens bypass.
    assert_eq!(h.send(&detach(1, EP)), Status::Ok);
    assert_eq!(host.take(), ["detach 8 1", "bypass 8 true"]);
    h.dev.write_config(CONFIG_BYPASS_OFFSET as u64, &[0]);
    let mut calls = host.take();
    calls.sort();
    assert_eq!(calls, ["bypass 8 false", "bypass 9 false"]);
    // No change, no call.
    h.dev.write_config(CONFIG_BYPASS_OFFSET as u64, &[0]);
    assert!(host.take().is_empty());
}

#[test]
fn initial_bypass_reaches_the_backend_when_the_device_is_built() {
    let cfg = IommuConfig {
        bypass: true,
        ..IommuConfig::default()
    };
    let (_h, host) = harness(&cfg);
    let mut calls = host.take();
    calls.sort();
    assert_eq!(calls, ["bypass 8 true", "bypass 9 true"]);
}

#[test]
fn a_failed_detach_at_reset_blocks_the_endpoint_and_is_counted() {
    let (mut h, host) = harness(&IommuConfig::default());
    assert_eq!(h.send(&attach(1, EP)), Status::Ok);
    host.take();
    *host.fail_detach.lock().unwrap() = true;
    h.dev.reset();
    assert_eq!(host.take(), ["detach 8 1", "bypass 8 false"]);
    assert_eq!(h.dev.viommu().router().stats.snapshot().backend_failures, 1);
}

#[test]
fn reset_with_bypass_on_reopens_bypass_for_endpoints_that_were_attached() {
    let cfg = IommuConfig {
        bypass: true,
        ..IommuConfig::default()
    };
    let (mut h, host) = harness(&cfg);
    assert_eq!(h.send(&attach(1, EP)), Status::Ok);
    host.take();
    h.dev.reset();
    let calls = host.take();
    assert_eq!(calls[0], "detach 8 1");
    assert!(calls.contains(&"bypass 8 true".to_string()), "{calls:?}");
}

#[test]
fn an_endpoint_plugged_while_bypass_is_on_bypasses_on_its_backend_too() {
    let cfg = IommuConfig {
        bypass: true,
        ..IommuConfig::default()
    };
    let (h, host) = harness(&cfg);
    host.take();
    h.dev.viommu().add_endpoint(10, Some(host.clone())).unwrap();
    assert_eq!(host.take(), ["bypass 10 true"]);
}

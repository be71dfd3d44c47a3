//! Assigning devices to [`IommufdBackend`] and taking them back: the VFIO
//! cdev bound to the iommufd, what its IOMMU offers read (and, where the
//! host can nest, its shared objects set up), its reserved regions found;
//! on removal, detached from everything, its objects released and its
//! cdev closed.

use std::collections::BTreeMap;
use std::path::Path;

use iommufd_bindings::iommufd::iommu_iova_range;
use log::{info, warn};
use vmm_iommu::backend::{BackendError, EndpointId};

use super::{host_err, Endpoint, IommufdBackend, Mode};
use crate::args;
use crate::caps::{
    caps_from_hw, hw_info_request, no_nesting_reason, parse_hw_info, HW_INFO_DATA_LEN,
};
use crate::host::{Handle, Ioctl, Open};
use crate::vtd::RID_PASID;

/// At most this many allowed IOVA ranges of a device are believed: the
/// count comes from the kernel, and x86 reports two or three.
const MAX_RESERVED_QUERY: u32 = 1024;

impl IommufdBackend {
    /// Binds the VFIO cdev of the device at `device` (sysfs path) to the
    /// iommufd as endpoint `ep`, reads what its IOMMU offers, and, where the
    /// host can nest, allocates its nest parent (and, on SMMUv3, vIOMMU,
    /// vDEVICE with `ep` as virtual StreamID, and vEVENTQ). If nesting
    /// cannot be set up the endpoint is MAP-only and its caps say so. Its DMA
    /// is blocked until the guest attaches it.
    pub fn add_endpoint(&self, ep: EndpointId, device: &Path) -> Result<(), BackendError> {
        let mut st = self.lock();
        if st.endpoints.contains_key(&ep) {
            return Err(BackendError::Invalid(format!(
                "endpoint {ep} is already assigned"
            )));
        }
        let opened = self
            .host
            .open(Open::Cdev {
                device,
                iommufd: self.iommufd,
            })
            .map_err(crate::kvm_vfio::open_err("VFIO_DEVICE_BIND_IOMMUFD"))?;
        let dev = opened.handle;
        let Some(dev_id) = opened.dev_id else {
            self.host.close(dev);
            return Err(BackendError::Host {
                op: "VFIO_DEVICE_BIND_IOMMUFD",
                source: std::io::Error::other("no iommufd device ID"),
            });
        };
        let mut info = hw_info_request(dev_id);
        let mut data = [0u8; HW_INFO_DATA_LEN];
        if let Err(e) = self.ioctl(
            "IOMMU_GET_HW_INFO",
            Ioctl::GetHwInfo {
                arg: &mut info,
                data: &mut data,
            },
        ) {
            self.host.close(dev);
            return Err(e);
        }
        let hw = parse_hw_info(&info, &data);
        let mut caps = caps_from_hw(&hw, info.out_max_pasid_log2);
        let mut nesting = None;
        if caps.table_formats.is_empty() {
            info!(
                "iommufd: endpoint {ep}: no nested translation ({}); MAP and bypass only",
                no_nesting_reason(&hw)
            );
        } else {
            let dirty = crate::dirty::hw_dirty_capable(info.out_capabilities);
            let probe = match self.probe_parents(&st, dev, &hw, &caps, dirty) {
                Ok(p) => p,
                Err(e) => {
                    // The probe attachment to a parent could not be undone.
                    self.host.close(dev);
                    return Err(e);
                }
            };
            match self.setup_nesting(&mut st, ep, dev_id, &hw, &caps, dirty, probe) {
                Ok(n) => nesting = Some(n),
                Err(e) => {
                    warn!("iommufd: endpoint {ep} cannot nest, MAP mode only: {e}");
                    caps.table_formats.clear();
                    caps.page_requests = false;
                }
            }
        }
        // The device's reserved regions (the MSI window, RMRRs) become
        // the endpoint's RESV_MEM regions, so the guest never maps there.
        caps.reserved_ranges = self.device_reserved(ep, dev);
        st.endpoints.insert(
            ep,
            Endpoint {
                dev,
                dev_id,
                hw,
                caps,
                nesting,
                mode: Mode::Blocked,
                attached: BTreeMap::new(),
            },
        );
        Ok(())
    }

    /// The IOVA holes the kernel leaves device `dev`: it is attached to a
    /// new empty IOAS (it can reach nothing there), the IOAS's allowed
    /// ranges are read (`IOMMU_IOAS_IOVA_RANGES`: the kernel leaves out
    /// the reserved regions of the devices attached), and it is detached
    /// again (blocked, as it came) and the IOAS destroyed. The holes are
    /// the gaps between allowed ranges. A failure is logged and leaves
    /// no holes: a MAP into one then fails in the kernel (DEVERR), as
    /// before the guest could be told.
    fn device_reserved(&self, ep: EndpointId, dev: Handle) -> Vec<(u64, u64)> {
        let mut a = args::ioas_alloc();
        if let Err(e) = self.ioctl("IOMMU_IOAS_ALLOC", Ioctl::IoasAlloc(&mut a)) {
            warn!("iommufd: endpoint {ep}: no scratch IOAS for its reserved regions: {e}");
            return Vec::new();
        }
        let ioas = a.out_ioas_id;
        let res = self.attach_step(dev, RID_PASID, Some(ioas)).and_then(|()| {
            let res = self.allowed_ranges(ioas);
            let detached = self.attach_step(dev, RID_PASID, None);
            res.and_then(|r| detached.map(|()| r))
        });
        self.destroy_all([ioas]);
        match res {
            Ok(allowed) => crate::caps::iova_holes(&allowed),
            Err(e) => {
                warn!("iommufd: endpoint {ep}: reserved regions unknown: {e}");
                Vec::new()
            }
        }
    }

    /// `IOMMU_IOAS_IOVA_RANGES` of `ioas`, inclusive, asking again with
    /// the count the kernel reports when the buffer is short (EMSGSIZE).
    pub(super) fn allowed_ranges(&self, ioas: u32) -> Result<Vec<(u64, u64)>, BackendError> {
        let mut ranges = vec![iommu_iova_range::default(); 8];
        loop {
            let mut arg = args::ioas_iova_ranges(ioas, ranges.len() as u32);
            match self.host.ioctl(
                self.iommufd,
                Ioctl::IoasIovaRanges {
                    arg: &mut arg,
                    ranges: &mut ranges,
                },
            ) {
                Ok(()) => {
                    let n = (arg.num_iovas as usize).min(ranges.len());
                    return Ok(ranges[..n].iter().map(|r| (r.start, r.last)).collect());
                }
                Err(e)
                    if e.raw_os_error() == Some(libc::EMSGSIZE)
                        && arg.num_iovas as usize > ranges.len()
                        && arg.num_iovas <= MAX_RESERVED_QUERY =>
                {
                    ranges.resize(arg.num_iovas as usize, iommu_iova_range::default());
                }
                Err(e) => return Err(host_err("IOMMU_IOAS_IOVA_RANGES")(e)),
            }
        }
    }

    /// Unbinds an endpoint: detached from everything, its objects
    /// destroyed, its cdev closed.
    pub fn remove_endpoint(&self, ep: EndpointId) -> Result<(), BackendError> {
        let mut st = self.lock();
        if !st.endpoints.contains_key(&ep) {
            return Err(BackendError::NotFound(format!("endpoint {ep}")));
        }
        self.switch(&mut st, ep, BTreeMap::new(), Mode::Blocked, &[])?;
        if let Some(e) = st.endpoints.remove(&ep) {
            if let Some(n) = e.nesting {
                self.release_nesting(&mut st, ep, n);
            }
            self.host.close(e.dev);
        }
        st.pending.retain(|(e, _, _), _| *e != ep);
        Ok(())
    }
}

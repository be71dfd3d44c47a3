//! INVALIDATE through [`IommufdBackend`]: a batch goes to the domain's
//! VT-d endpoints and SMMUv3 endpoints (`nested_vtd.rs`,
//! `nested_smmuv3.rs` lower it), each list of entries in one
//! `IOMMU_HWPT_INVALIDATE`, the rest sent once more when the kernel
//! handles fewer.

use vmm_iommu::backend::{BackendError, DomainId};
use vmm_iommu::invalidation::Invalidation;

use super::{IommufdBackend, Mode};
use crate::args;
use crate::host::Ioctl;

impl IommufdBackend {
    /// Carries out `batch` for the endpoints here bound to tables of
    /// domain `dom`.
    pub(super) fn invalidate_domain(
        &self,
        dom: DomainId,
        batch: &[Invalidation],
    ) -> Result<(), BackendError> {
        let mut st = self.lock();
        let (mut vtd, mut smmu) = (Vec::new(), Vec::new());
        for (id, e) in &st.endpoints {
            match &e.mode {
                Mode::Vtd(d, _) if *d == dom => vtd.push(*id),
                Mode::Smmu { domain, .. } if *domain == dom => smmu.push(*id),
                _ => {}
            }
        }
        if !vtd.is_empty() {
            self.invalidate_vtd(&mut st, &vtd, dom, batch)?;
        }
        if !smmu.is_empty() {
            self.invalidate_smmu(&st, &smmu, batch)?;
        }
        Ok(())
    }

    /// One `IOMMU_HWPT_INVALIDATE` of `entries` on `id`, the part of a
    /// guest batch that starts at entry `first` of it. If the kernel
    /// handles fewer than sent (`entry_num` written back), the rest is sent
    /// once more; if that also falls short, PARTIAL with the batch index of
    /// the first entry not handled.
    pub(super) fn send_invalidate(
        &self,
        id: u32,
        data_type: u32,
        entry_len: usize,
        entries: &[u8],
        first: usize,
    ) -> Result<(), BackendError> {
        let total = entries.len() / entry_len;
        let mut done = 0usize;
        let mut last = None;
        for _ in 0..2 {
            let left = total - done;
            if left == 0 {
                return Ok(());
            }
            let num = u32::try_from(left)
                .map_err(|_| BackendError::NoMemory(format!("{left} invalidation entries")))?;
            let mut a = args::hwpt_invalidate(id, data_type, entry_len as u32, num);
            let r = self.host.ioctl(
                self.iommufd,
                Ioctl::HwptInvalidate {
                    arg: &mut a,
                    entries: &entries[done * entry_len..],
                },
            );
            let handled = (a.entry_num as usize).min(left);
            match r {
                Ok(()) if handled == left => return Ok(()),
                Ok(()) => last = Some(std::io::Error::from_raw_os_error(libc::EIO)),
                Err(e) => last = Some(e),
            }
            done += handled;
        }
        if done == total {
            return Ok(());
        }
        Err(BackendError::Partial {
            op: "IOMMU_HWPT_INVALIDATE",
            index: first + done,
            source: last.unwrap_or_else(|| std::io::Error::from_raw_os_error(libc::EIO)),
        })
    }
}

//! PROBE: the endpoint's properties (reserved regions, and the nested
//! extension's table formats and PASID width) written into the driver's
//! buffer before the tail.

use log::debug;
use vm_memory::GuestMemory;

use super::{walker_page_sizes, VirtioIommu};
use crate::wire::{
    self, ExtProperty, ProbeReq, ResvMemProperty, Status, RESV_MEM_PROPERTY_SIZE,
    VIRTIO_IOMMU_F_ATTACH_TABLE,
};

impl VirtioIommu {
    /// Answers a PROBE: properties into the writable part before the tail.
    pub(super) fn probe<M: GuestMemory>(
        &mut self,
        mem: &M,
        p: &ProbeReq,
        props_len: u64,
    ) -> Status {
        let probe_size = u64::from(self.config.probe_size);
        let mut buf = std::mem::take(&mut self.probe_buf);
        buf.clear();
        let status = {
            let st = self.viommu.state();
            match st.probe(p) {
                Err(e) => {
                    debug!("virtio-iommu: {e}");
                    e.status()
                }
                // spec 5.13.6.7.2: "If the properties list is smaller than
                // probe_size, the device SHOULD NOT write any property. It
                // SHOULD reject the request and set status to INVAL."
                Ok(_) if props_len < probe_size => Status::Inval,
                Ok(regions) => {
                    // The config guarantees that every region fits in
                    // probe_size; stop anyway rather than overrun it.
                    for r in regions {
                        if buf.len() + RESV_MEM_PROPERTY_SIZE > probe_size as usize {
                            break;
                        }
                        let subtype = match r.kind {
                            crate::config::ReservedKind::Reserved => {
                                wire::VIRTIO_IOMMU_RESV_MEM_T_RESERVED
                            }
                            crate::config::ReservedKind::Msi => wire::VIRTIO_IOMMU_RESV_MEM_T_MSI,
                        };
                        buf.extend_from_slice(
                            &ResvMemProperty {
                                subtype,
                                start: r.start,
                                end: r.end,
                            }
                            .encode(),
                        );
                    }
                    if self.negotiated(VIRTIO_IOMMU_F_ATTACH_TABLE) {
                        for prop in self.nested_properties(&st, p.endpoint) {
                            if buf.len() + prop.encoded_len() > probe_size as usize {
                                break;
                            }
                            prop.encode_into(&mut buf);
                        }
                    }
                    // spec 5.13.6.7.2: "If the device doesn't fill all
                    // probe_size bytes with properties, it SHOULD fill the
                    // remaining bytes of properties with zeroes."
                    buf.resize(probe_size as usize, 0);
                    Status::Ok
                }
            }
        };
        let status = if status == Status::Ok && self.write_at(mem, 0, &buf).is_err() {
            Status::IoErr
        } else {
            status
        };
        self.probe_buf = buf;
        status
    }

    /// The nested extension's probe properties of `ep`: what the config
    /// allows intersected with what its backend can do. An endpoint
    /// without a backend (or one without table formats) gets only the
    /// ranges, and no format: ATTACH_TABLE on it is UNSUPP.
    fn nested_properties(&self, st: &crate::state::IommuState, ep: u32) -> Vec<ExtProperty> {
        let caps = self.viommu.router().caps(ep);
        let mut mask = self.config.page_size_mask;
        let (mut start, mut end) = (self.config.input_start, self.config.input_end);
        let mut out_bits = 48;
        let mut pasid_bits = st.pasid_bits();
        if let Some(c) = &caps {
            mask &= c.page_size_mask;
            start = start.max(c.input_range.0);
            end = end.min(c.input_range.1);
            out_bits = c.output_bits;
            pasid_bits = pasid_bits.min(c.pasid_bits);
        }
        let mut props = vec![
            ExtProperty::PageSizeMask(mask),
            ExtProperty::InputRange { start, end },
            ExtProperty::OutputSize(out_bits),
            ExtProperty::PasidSize(pasid_bits),
        ];
        for &format in st.endpoint_formats(ep) {
            let pgt = match format {
                wire::VIRTIO_IOMMU_PSTF_ARM_SMMU_V3 => Some(wire::VIRTIO_IOMMU_PGTF_ARM_LPAE),
                wire::VIRTIO_IOMMU_PSTF_INTEL_VTD => Some(wire::VIRTIO_IOMMU_PGTF_X86_64),
                _ => None,
            };
            props.push(match pgt {
                Some(page_table_format) => ExtProperty::PasidTableFmt {
                    format,
                    page_table_format,
                    page_size_mask: walker_page_sizes(page_table_format),
                },
                None => ExtProperty::PageTableFmt {
                    format,
                    page_size_mask: walker_page_sizes(format),
                },
            });
        }
        props
    }
}

//! The VIOT (Virtual I/O Translation Table, ACPI 6.5): the firmware table
//! that tells a guest where its virtio-iommu is and which endpoints sit
//! behind it, so the guest probes the IOMMU before those endpoints and gives
//! each one the endpoint ID the device expects in ATTACH, MAP and PROBE.
//!
//! This module owns the table's bytes and the rules its contents must keep;
//! it never places the table in guest memory and never picks endpoint IDs
//! (the VMM does both). Layout, from the ACPI 6.5 VIOT and Linux's
//! `struct acpi_viot_*` (`include/acpi/actbl3.h`):
//!
//! ```text
//! 0   standard header (36 bytes, signature "VIOT", revision 0)
//! 36  node_count u16, 38 node_offset u16 (48), 40 reserved [u8; 8]
//! 48  nodes, each starting type u8, reserved u8, length u16:
//!     1 PCI range          (24): endpoint_start u32 @4, segment_start u16 @8,
//!                               segment_end u16 @10, bdf_start u16 @12,
//!                               bdf_end u16 @14, output_node u16 @16
//!     2 MMIO endpoint      (24): endpoint u32 @4, base_address u64 @8,
//!                               output_node u16 @16
//!     3 virtio-pci IOMMU   (16): segment u16 @4, bdf u16 @6
//!     4 virtio-mmio IOMMU  (16): base_address u64 @8
//! ```
//!
//! The one IOMMU node comes first, at offset 48, and every endpoint node's
//! `output_node` is that offset. The nodes are encoded here rather than with
//! `acpi_tables::viot`: that builder ties a PCI range's first endpoint ID to
//! its first BDF and panics on a device number above 31, where this table
//! takes any endpoint ID and returns an error for every bad input. The
//! standard header and the checksum come from `acpi_tables::sdt::Sdt`.

use std::collections::HashMap;

use acpi_tables::sdt::Sdt;

/// VIOT revision (ACPI 6.5; QEMU and Linux use 0).
const VIOT_REVISION: u8 = 0;
/// Length of the standard header plus node_count, node_offset, reserved.
const VIOT_HEADER_LEN: usize = 48;
/// Offset of the first node, which is always the IOMMU node.
const IOMMU_NODE_OFFSET: u16 = VIOT_HEADER_LEN as u16;
/// Offset of `node_count` in the table.
const NODE_COUNT_OFFSET: usize = 36;
/// Offset of `node_offset` in the table.
const NODE_OFFSET_OFFSET: usize = 38;

/// Node type of a range of PCI endpoints.
const NODE_PCI_RANGE: u8 = 1;
/// Node type of one endpoint identified by its MMIO base.
const NODE_MMIO_ENDPOINT: u8 = 2;
/// Node type of a virtio-iommu on virtio-pci.
const NODE_VIRTIO_IOMMU_PCI: u8 = 3;
/// Node type of a virtio-iommu on virtio-mmio.
const NODE_VIRTIO_IOMMU_MMIO: u8 = 4;

/// `sizeof(struct acpi_viot_pci_range)`.
const PCI_RANGE_LEN: usize = 24;
/// `sizeof(struct acpi_viot_mmio)`.
const MMIO_ENDPOINT_LEN: usize = 24;
/// `sizeof(struct acpi_viot_virtio_iommu_pci)`.
const VIRTIO_IOMMU_PCI_LEN: usize = 16;
/// `sizeof(struct acpi_viot_virtio_iommu_mmio)`.
const VIRTIO_IOMMU_MMIO_LEN: usize = 16;

/// The virtio-iommu the table describes: the node every endpoint points at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ViotIommu {
    /// A virtio-iommu on virtio-mmio; the guest finds the device whose MMIO
    /// resource contains `base` (for a virtio-mmio window: its base).
    Mmio {
        /// Base address of the IOMMU's virtio-mmio window.
        base: u64,
    },
    /// A virtio-iommu on virtio-pci.
    Pci {
        /// PCI segment (domain) of the IOMMU function.
        segment: u16,
        /// Bus, device and function: `bus << 8 | device << 3 | function`.
        bdf: u16,
    },
}

/// Endpoints translated by the IOMMU, and the endpoint IDs the IOMMU knows
/// them by.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ViotEndpoint {
    /// One platform device: Linux matches `base` against the device's first
    /// MMIO resource and gives it endpoint ID `endpoint`.
    Mmio {
        /// The endpoint ID the virtio-iommu uses for this device.
        endpoint: u32,
        /// Base of the device's first MMIO resource (its virtio-mmio window).
        base: u64,
    },
    /// A range of PCI functions, inclusive at both ends. Function
    /// (segment `s`, `bdf`) gets endpoint ID
    /// `endpoint_start + ((s - segment_start) << 16) + (bdf - bdf_start)`.
    PciRange {
        /// Endpoint ID of (`segment_start`, `bdf_start`).
        endpoint_start: u32,
        /// First PCI segment of the range.
        segment_start: u16,
        /// Last PCI segment of the range (inclusive).
        segment_end: u16,
        /// First bus/device/function of the range, in every segment.
        bdf_start: u16,
        /// Last bus/device/function of the range (inclusive).
        bdf_end: u16,
    },
}

/// The OEM fields of an ACPI table header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AcpiOem {
    /// OEM ID (6 bytes, space padded by convention).
    pub oem_id: [u8; 6],
    /// OEM table ID (8 bytes).
    pub oem_table_id: [u8; 8],
    /// OEM revision of the table.
    pub oem_revision: u32,
}

impl Default for AcpiOem {
    fn default() -> Self {
        AcpiOem {
            oem_id: *b"VMMIOM",
            oem_table_id: *b"VMMIVIOT",
            oem_revision: 1,
        }
    }
}

/// Why a VIOT could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ViotError {
    /// The IOMMU node plus the endpoint nodes do not fit the u16 node count.
    #[error("VIOT with {endpoints} endpoint nodes and the IOMMU node exceeds 65535 nodes")]
    TooManyNodes {
        /// Number of endpoints given.
        endpoints: usize,
    },
    /// A PCI range whose first segment is above its last.
    #[error("VIOT endpoint {index}: PCI segment_start {start:#06x} above segment_end {end:#06x}")]
    PciSegmentRange {
        /// Index of the endpoint in the slice.
        index: usize,
        /// The range's first segment.
        start: u16,
        /// The range's last segment.
        end: u16,
    },
    /// A PCI range whose first BDF is above its last.
    #[error("VIOT endpoint {index}: PCI bdf_start {start:#06x} above bdf_end {end:#06x}")]
    PciBdfRange {
        /// Index of the endpoint in the slice.
        index: usize,
        /// The range's first BDF.
        start: u16,
        /// The range's last BDF.
        end: u16,
    },
    /// A PCI range whose last function's endpoint ID does not fit in u32.
    #[error("VIOT endpoint {index}: PCI range from endpoint {endpoint_start:#x} ends past endpoint ID u32::MAX")]
    EndpointIdOverflow {
        /// Index of the endpoint in the slice.
        index: usize,
        /// The range's first endpoint ID.
        endpoint_start: u32,
    },
    /// Two MMIO endpoints with one base: the guest could only match the first.
    #[error("VIOT endpoint {index}: MMIO base {base:#x} already names endpoint {first}")]
    DuplicateMmioBase {
        /// Index of the second endpoint with this base.
        index: usize,
        /// Index of the first endpoint with this base.
        first: usize,
        /// The shared base.
        base: u64,
    },
    /// An MMIO endpoint at the IOMMU's own window: the IOMMU would translate itself.
    #[error("VIOT endpoint {index}: MMIO base {base:#x} is the IOMMU's own window")]
    EndpointIsIommu {
        /// Index of the endpoint in the slice.
        index: usize,
        /// The IOMMU's base.
        base: u64,
    },
}

/// Builds the VIOT for one virtio-iommu and the endpoints behind it: the
/// whole table, header and checksum included, ready to be placed in guest
/// memory and listed in the XSDT.
///
/// ```
/// use vmm_iommu::viot::{viot_table, AcpiOem, ViotEndpoint, ViotIommu};
///
/// let viot = viot_table(
///     // The virtio-iommu on its virtio-mmio window.
///     ViotIommu::Mmio { base: 0xd000_0000 },
///     &[
///         // A virtio-mmio device as endpoint 8.
///         ViotEndpoint::Mmio { endpoint: 8, base: 0xd000_1000 },
///         // PCI bus 1 of segment 0: endpoints 0x100..=0x1ff.
///         ViotEndpoint::PciRange {
///             endpoint_start: 0x100,
///             segment_start: 0,
///             segment_end: 0,
///             bdf_start: 0x100,
///             bdf_end: 0x1ff,
///         },
///     ],
///     &AcpiOem::default(),
/// )?;
/// assert_eq!(&viot[..4], b"VIOT");
/// // The whole table sums to zero (the checksum byte sees to it).
/// assert_eq!(viot.iter().fold(0u8, |s, &b| s.wrapping_add(b)), 0);
/// # Ok::<(), vmm_iommu::viot::ViotError>(())
/// ```
pub fn viot_table(
    iommu: ViotIommu,
    endpoints: &[ViotEndpoint],
    oem: &AcpiOem,
) -> Result<Vec<u8>, ViotError> {
    validate(iommu, endpoints)?;
    // One IOMMU node plus one node per endpoint, counted in a u16.
    let node_count = endpoints
        .len()
        .checked_add(1)
        .and_then(|n| u16::try_from(n).ok())
        .ok_or(ViotError::TooManyNodes {
            endpoints: endpoints.len(),
        })?;

    let mut nodes = Vec::with_capacity(VIRTIO_IOMMU_MMIO_LEN + endpoints.len() * PCI_RANGE_LEN);
    match iommu {
        ViotIommu::Mmio { base } => nodes.extend_from_slice(&virtio_iommu_mmio_node(base)),
        ViotIommu::Pci { segment, bdf } => {
            nodes.extend_from_slice(&virtio_iommu_pci_node(segment, bdf))
        }
    }
    for endpoint in endpoints {
        match *endpoint {
            ViotEndpoint::Mmio { endpoint, base } => {
                nodes.extend_from_slice(&mmio_endpoint_node(endpoint, base, IOMMU_NODE_OFFSET))
            }
            ViotEndpoint::PciRange {
                endpoint_start,
                segment_start,
                segment_end,
                bdf_start,
                bdf_end,
            } => nodes.extend_from_slice(&pci_range_node(
                endpoint_start,
                [segment_start, segment_end],
                [bdf_start, bdf_end],
                IOMMU_NODE_OFFSET,
            )),
        }
    }

    let mut table = Sdt::new(
        *b"VIOT",
        VIOT_HEADER_LEN as u32,
        VIOT_REVISION,
        oem.oem_id,
        oem.oem_table_id,
        oem.oem_revision,
    );
    table.write_u16(NODE_COUNT_OFFSET, node_count);
    table.write_u16(NODE_OFFSET_OFFSET, IOMMU_NODE_OFFSET);
    // At most 65535 nodes of at most 24 bytes: the length fits the u32 the
    // header holds, so the append cannot wrap it.
    table.append_slice(&nodes);
    Ok(table.as_slice().to_vec())
}

/// Checks every endpoint against the rules the table must keep.
fn validate(iommu: ViotIommu, endpoints: &[ViotEndpoint]) -> Result<(), ViotError> {
    // Linux binds a platform device to the first MMIO node whose base
    // matches: a second node with the same base would be silently ignored.
    let mut mmio_bases: HashMap<u64, usize> = HashMap::new();
    for (index, endpoint) in endpoints.iter().enumerate() {
        match *endpoint {
            ViotEndpoint::Mmio { base, .. } => {
                if iommu == (ViotIommu::Mmio { base }) {
                    return Err(ViotError::EndpointIsIommu { index, base });
                }
                if let Some(&first) = mmio_bases.get(&base) {
                    return Err(ViotError::DuplicateMmioBase { index, first, base });
                }
                mmio_bases.insert(base, index);
            }
            ViotEndpoint::PciRange {
                endpoint_start,
                segment_start,
                segment_end,
                bdf_start,
                bdf_end,
            } => {
                if segment_start > segment_end {
                    return Err(ViotError::PciSegmentRange {
                        index,
                        start: segment_start,
                        end: segment_end,
                    });
                }
                if bdf_start > bdf_end {
                    return Err(ViotError::PciBdfRange {
                        index,
                        start: bdf_start,
                        end: bdf_end,
                    });
                }
                // Linux computes the ID of the range's last function as
                // ((segment_end - segment_start) << 16) + bdf_end - bdf_start
                // + endpoint_start in u32: it must not wrap onto another ID.
                let last = u64::from(endpoint_start)
                    + (u64::from(segment_end - segment_start) << 16)
                    + u64::from(bdf_end - bdf_start);
                if last > u64::from(u32::MAX) {
                    return Err(ViotError::EndpointIdOverflow {
                        index,
                        endpoint_start,
                    });
                }
            }
        }
    }
    Ok(())
}

/// Encodes the common node header: type, reserved, length.
fn node_header<const N: usize>(node_type: u8) -> [u8; N] {
    let mut node = [0u8; N];
    node[0] = node_type;
    // Every node length is a constant below 256.
    node[2..4].copy_from_slice(&(N as u16).to_le_bytes());
    node
}

/// A virtio-mmio IOMMU node (type 4, `struct acpi_viot_virtio_iommu_mmio`).
fn virtio_iommu_mmio_node(base: u64) -> [u8; VIRTIO_IOMMU_MMIO_LEN] {
    let mut node = node_header::<VIRTIO_IOMMU_MMIO_LEN>(NODE_VIRTIO_IOMMU_MMIO);
    node[8..16].copy_from_slice(&base.to_le_bytes());
    node
}

/// A virtio-pci IOMMU node (type 3, `struct acpi_viot_virtio_iommu_pci`).
fn virtio_iommu_pci_node(segment: u16, bdf: u16) -> [u8; VIRTIO_IOMMU_PCI_LEN] {
    let mut node = node_header::<VIRTIO_IOMMU_PCI_LEN>(NODE_VIRTIO_IOMMU_PCI);
    node[4..6].copy_from_slice(&segment.to_le_bytes());
    node[6..8].copy_from_slice(&bdf.to_le_bytes());
    node
}

/// An MMIO endpoint node (type 2, `struct acpi_viot_mmio`).
fn mmio_endpoint_node(endpoint: u32, base: u64, output_node: u16) -> [u8; MMIO_ENDPOINT_LEN] {
    let mut node = node_header::<MMIO_ENDPOINT_LEN>(NODE_MMIO_ENDPOINT);
    node[4..8].copy_from_slice(&endpoint.to_le_bytes());
    node[8..16].copy_from_slice(&base.to_le_bytes());
    node[16..18].copy_from_slice(&output_node.to_le_bytes());
    node
}

/// A PCI range node (type 1, `struct acpi_viot_pci_range`); `segments` and
/// `bdfs` are `[start, end]`.
fn pci_range_node(
    endpoint_start: u32,
    segments: [u16; 2],
    bdfs: [u16; 2],
    output_node: u16,
) -> [u8; PCI_RANGE_LEN] {
    let mut node = node_header::<PCI_RANGE_LEN>(NODE_PCI_RANGE);
    node[4..8].copy_from_slice(&endpoint_start.to_le_bytes());
    node[8..10].copy_from_slice(&segments[0].to_le_bytes());
    node[10..12].copy_from_slice(&segments[1].to_le_bytes());
    node[12..14].copy_from_slice(&bdfs[0].to_le_bytes());
    node[14..16].copy_from_slice(&bdfs[1].to_le_bytes());
    node[16..18].copy_from_slice(&output_node.to_le_bytes());
    node
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    // The oracle: tables written out field by field from the ACPI 6.5 VIOT
    // layout, independent of the encoders above.

    fn le16(v: u16) -> Vec<u8> {
        v.to_le_bytes().to_vec()
    }
    fn le32(v: u32) -> Vec<u8> {
        v.to_le_bytes().to_vec()
    }
    fn le64(v: u64) -> Vec<u8> {
        v.to_le_bytes().to_vec()
    }

    fn oem() -> AcpiOem {
        AcpiOem {
            oem_id: *b"TESTOE",
            oem_table_id: *b"TESTTBL1",
            oem_revision: 0x1234_5678,
        }
    }

    /// The 48-byte VIOT header with the checksum left 0.
    fn expected_header(length: u32, node_count: u16) -> Vec<u8> {
        let mut t = Vec::new();
        t.extend_from_slice(b"VIOT");
        t.extend(le32(length));
        t.push(0); // revision
        t.push(0); // checksum, fixed by finish()
        t.extend_from_slice(b"TESTOE");
        t.extend_from_slice(b"TESTTBL1");
        t.extend(le32(0x1234_5678));
        t.extend_from_slice(b"RVAT"); // acpi_tables' creator ID
        t.extend_from_slice(&[0, 0, 0, 1]); // and creator revision
        t.extend(le16(node_count));
        t.extend(le16(48)); // node_offset
        t.extend_from_slice(&[0; 8]);
        assert_eq!(t.len(), 48);
        t
    }

    /// Sets byte 9 so the whole table sums to 0.
    fn finish(mut t: Vec<u8>) -> Vec<u8> {
        let sum = t.iter().fold(0u8, |a, b| a.wrapping_add(*b));
        t[9] = 0u8.wrapping_sub(sum);
        t
    }

    fn byte_sum(t: &[u8]) -> u8 {
        t.iter().fold(0u8, |a, b| a.wrapping_add(*b))
    }

    #[test]
    fn mmio_iommu_with_mmio_and_pci_endpoints_matches_hand_encoded_table() {
        let endpoints = [
            ViotEndpoint::Mmio {
                endpoint: 1,
                base: 0xd000_1000,
            },
            ViotEndpoint::Mmio {
                endpoint: 0xdead_beef,
                base: 0x1_2345_6000,
            },
            ViotEndpoint::PciRange {
                endpoint_start: 0x100,
                segment_start: 1,
                segment_end: 2,
                bdf_start: 0x0008,
                bdf_end: 0x01ff,
            },
        ];
        let table = viot_table(ViotIommu::Mmio { base: 0xd000_0000 }, &endpoints, &oem()).unwrap();

        let mut t = expected_header(48 + 16 + 3 * 24, 4);
        // @48: virtio-mmio IOMMU node.
        t.extend_from_slice(&[4, 0]);
        t.extend(le16(16));
        t.extend_from_slice(&[0; 4]);
        t.extend(le64(0xd000_0000));
        // @64: MMIO endpoint 1.
        t.extend_from_slice(&[2, 0]);
        t.extend(le16(24));
        t.extend(le32(1));
        t.extend(le64(0xd000_1000));
        t.extend(le16(48));
        t.extend_from_slice(&[0; 6]);
        // @88: MMIO endpoint 0xdeadbeef.
        t.extend_from_slice(&[2, 0]);
        t.extend(le16(24));
        t.extend(le32(0xdead_beef));
        t.extend(le64(0x1_2345_6000));
        t.extend(le16(48));
        t.extend_from_slice(&[0; 6]);
        // @112: PCI range.
        t.extend_from_slice(&[1, 0]);
        t.extend(le16(24));
        t.extend(le32(0x100));
        t.extend(le16(1));
        t.extend(le16(2));
        t.extend(le16(0x0008));
        t.extend(le16(0x01ff));
        t.extend(le16(48));
        t.extend_from_slice(&[0; 6]);
        let expected = finish(t);

        assert_eq!(table, expected);
    }

    #[test]
    fn pci_iommu_node_matches_hand_encoded_table() {
        let endpoints = [ViotEndpoint::PciRange {
            endpoint_start: 0,
            segment_start: 0,
            segment_end: 0,
            bdf_start: 0,
            bdf_end: 0xffff,
        }];
        let iommu = ViotIommu::Pci {
            segment: 3,
            bdf: 0x0110,
        };
        let table = viot_table(iommu, &endpoints, &oem()).unwrap();

        let mut t = expected_header(48 + 16 + 24, 2);
        t.extend_from_slice(&[3, 0]);
        t.extend(le16(16));
        t.extend(le16(3));
        t.extend(le16(0x0110));
        t.extend_from_slice(&[0; 8]);
        t.extend_from_slice(&[1, 0]);
        t.extend(le16(24));
        t.extend(le32(0));
        t.extend(le16(0));
        t.extend(le16(0));
        t.extend(le16(0));
        t.extend(le16(0xffff));
        t.extend(le16(48));
        t.extend_from_slice(&[0; 6]);

        assert_eq!(table, finish(t));
    }

    #[test]
    fn iommu_alone_is_a_one_node_table_with_zero_checksum() {
        let table = viot_table(ViotIommu::Mmio { base: 0x1000 }, &[], &oem()).unwrap();
        assert_eq!(table.len(), 64);
        assert_eq!(&table[4..8], &64u32.to_le_bytes());
        assert_eq!(&table[36..38], &1u16.to_le_bytes());
        assert_eq!(byte_sum(&table), 0);
    }

    #[test]
    fn default_oem_lands_in_the_header() {
        let table = viot_table(ViotIommu::Mmio { base: 0 }, &[], &AcpiOem::default()).unwrap();
        assert_eq!(&table[10..16], b"VMMIOM");
        assert_eq!(&table[16..24], b"VMMIVIOT");
        assert_eq!(byte_sum(&table), 0);
    }

    #[test]
    fn pci_range_segment_start_above_end_returns_pci_segment_range() {
        let endpoints = [
            ViotEndpoint::Mmio {
                endpoint: 1,
                base: 0x2000,
            },
            ViotEndpoint::PciRange {
                endpoint_start: 0,
                segment_start: 2,
                segment_end: 1,
                bdf_start: 0,
                bdf_end: 0,
            },
        ];
        let err = viot_table(ViotIommu::Mmio { base: 0x1000 }, &endpoints, &oem()).unwrap_err();
        assert_eq!(
            err,
            ViotError::PciSegmentRange {
                index: 1,
                start: 2,
                end: 1
            }
        );
    }

    #[test]
    fn pci_range_bdf_start_above_end_returns_pci_bdf_range() {
        let endpoints = [ViotEndpoint::PciRange {
            endpoint_start: 0,
            segment_start: 0,
            segment_end: 0,
            bdf_start: 0x10,
            bdf_end: 0x0f,
        }];
        let err = viot_table(ViotIommu::Mmio { base: 0x1000 }, &endpoints, &oem()).unwrap_err();
        assert_eq!(
            err,
            ViotError::PciBdfRange {
                index: 0,
                start: 0x10,
                end: 0x0f
            }
        );
    }

    #[test]
    fn pci_range_ids_past_u32_max_return_endpoint_id_overflow() {
        let range = |endpoint_start, segment_end, bdf_end| ViotEndpoint::PciRange {
            endpoint_start,
            segment_start: 0,
            segment_end,
            bdf_start: 0,
            bdf_end,
        };
        let iommu = ViotIommu::Mmio { base: 0x1000 };
        // The last ID is exactly u32::MAX: accepted.
        viot_table(iommu, &[range(u32::MAX - 0xff, 0, 0xff)], &oem()).unwrap();
        assert_eq!(
            viot_table(iommu, &[range(u32::MAX - 0xfe, 0, 0xff)], &oem()),
            Err(ViotError::EndpointIdOverflow {
                index: 0,
                endpoint_start: u32::MAX - 0xfe
            })
        );
        // The segment span counts 1 << 16 IDs per segment.
        assert_eq!(
            viot_table(iommu, &[range(u32::MAX - 0xffff, 1, 0)], &oem()),
            Err(ViotError::EndpointIdOverflow {
                index: 0,
                endpoint_start: u32::MAX - 0xffff
            })
        );
    }

    #[test]
    fn two_mmio_endpoints_at_one_base_return_duplicate_mmio_base() {
        let endpoints = [
            ViotEndpoint::Mmio {
                endpoint: 1,
                base: 0x2000,
            },
            ViotEndpoint::Mmio {
                endpoint: 2,
                base: 0x3000,
            },
            ViotEndpoint::Mmio {
                endpoint: 3,
                base: 0x2000,
            },
        ];
        let err = viot_table(ViotIommu::Mmio { base: 0x1000 }, &endpoints, &oem()).unwrap_err();
        assert_eq!(
            err,
            ViotError::DuplicateMmioBase {
                index: 2,
                first: 0,
                base: 0x2000
            }
        );
    }

    #[test]
    fn mmio_endpoint_at_iommu_base_returns_endpoint_is_iommu() {
        let endpoints = [ViotEndpoint::Mmio {
            endpoint: 1,
            base: 0x1000,
        }];
        let err = viot_table(ViotIommu::Mmio { base: 0x1000 }, &endpoints, &oem()).unwrap_err();
        assert_eq!(
            err,
            ViotError::EndpointIsIommu {
                index: 0,
                base: 0x1000
            }
        );
    }

    #[test]
    fn node_count_past_u16_returns_too_many_nodes() {
        let range = ViotEndpoint::PciRange {
            endpoint_start: 0,
            segment_start: 0,
            segment_end: 0,
            bdf_start: 0,
            bdf_end: 0,
        };
        let iommu = ViotIommu::Mmio { base: 0x1000 };
        // 65534 endpoints + the IOMMU = 65535 nodes: the most there can be.
        let table = viot_table(iommu, &vec![range; 65534], &oem()).unwrap();
        assert_eq!(&table[36..38], &u16::MAX.to_le_bytes());
        assert_eq!(table.len(), 48 + 16 + 65534 * 24);
        assert_eq!(byte_sum(&table), 0);
        assert_eq!(
            viot_table(iommu, &vec![range; 65535], &oem()),
            Err(ViotError::TooManyNodes { endpoints: 65535 })
        );
    }

    fn any_endpoint() -> impl Strategy<Value = ViotEndpoint> {
        prop_oneof![
            (any::<u32>(), 0u64..8).prop_map(|(endpoint, page)| ViotEndpoint::Mmio {
                endpoint,
                base: page << 12,
            }),
            (any::<u32>(), any::<[u16; 4]>()).prop_map(|(e, [s0, s1, b0, b1])| {
                ViotEndpoint::PciRange {
                    endpoint_start: e,
                    segment_start: s0 % 4,
                    segment_end: s1 % 4,
                    bdf_start: b0,
                    bdf_end: b1,
                }
            }),
        ]
    }

    proptest! {
        /// Any input gives an error or a well-formed table: right length and
        /// count, zero checksum, every endpoint pointing at the IOMMU node.
        #[test]
        fn any_input_gives_error_or_well_formed_table(
            iommu_page in 0u64..8,
            endpoints in proptest::collection::vec(any_endpoint(), 0..12),
        ) {
            let Ok(table) = viot_table(ViotIommu::Mmio { base: iommu_page << 12 }, &endpoints, &oem())
            else {
                return Ok(());
            };
            prop_assert_eq!(table.len(), 48 + 16 + 24 * endpoints.len());
            prop_assert_eq!(&table[4..8], &(table.len() as u32).to_le_bytes());
            prop_assert_eq!(&table[36..38], &(endpoints.len() as u16 + 1).to_le_bytes());
            prop_assert_eq!(byte_sum(&table), 0);
            for node in table[64..].chunks(24) {
                prop_assert_eq!(&node[2..4], &24u16.to_le_bytes());
                prop_assert_eq!(&node[16..18], &48u16.to_le_bytes());
            }
        }
    }
}

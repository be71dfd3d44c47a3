//! Snapshots of the device: everything the guest can observe, as plain
//! serde data, and the errors a restore answers with.
//!
//! A [`DeviceSnapshot`] is taken with [`crate::VirtioIommu::snapshot`] while
//! the VMM has the device quiesced (no queue notification in flight), and
//! restored with [`crate::VirtioIommu::restore`] into a device the VMM built
//! from the same config (and the same backends for the same endpoints),
//! before it was activated. The format and its versioning are described
//! in `docs/snapshot.md`.
//!
//! A snapshot is untrusted input (it crossed a network or a disk): restore
//! validates every field by replaying the domains, mappings and tables
//! through the same state rules a guest request meets, so a snapshot that
//! restores is one the device could have reached. Any refusal leaves the
//! device as it was before the call, never half restored. This module
//! never touches guest memory or backends itself.

use serde::{Deserialize, Serialize};

use crate::backend::{BackendError, SavedPageRequests};
use crate::state::RequestError;
use crate::wire::{ExtFaultRecord, TableDesc};

/// The snapshot format version this build writes. Bumped whenever a field
/// is added, removed or changes meaning; this build also reads every
/// version from [`OLDEST_SNAPSHOT_VERSION`] on (version 2 added the guest
/// memory map: `viommu.ram`, `viommu.mmio_windows`).
pub const SNAPSHOT_VERSION: u32 = 2;

/// The oldest snapshot version this build reads.
pub const OLDEST_SNAPSHOT_VERSION: u32 = 1;

/// Everything the guest can observe of one virtio-iommu device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceSnapshot {
    /// Format version, [`SNAPSHOT_VERSION`].
    pub version: u32,
    /// Features the device offered (the target must offer the same).
    pub avail_features: u64,
    /// Features the driver accepted.
    pub acked_features: u64,
    /// Config space as the driver reads it.
    pub config: ConfigSnapshot,
    /// The request queue, if the device was activated.
    pub requestq: Option<QueueSnapshot>,
    /// The event queue, if the device was activated.
    pub eventq: Option<QueueSnapshot>,
    /// Endpoints, domains, faults, page requests.
    pub viommu: ViommuSnapshot,
}

/// The config space (`struct virtio_iommu_config`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigSnapshot {
    /// `page_size_mask`.
    pub page_size_mask: u64,
    /// `input_range.start`.
    pub input_start: u64,
    /// `input_range.end`.
    pub input_end: u64,
    /// `domain_range.start`.
    pub domain_start: u32,
    /// `domain_range.end`.
    pub domain_end: u32,
    /// `probe_size`.
    pub probe_size: u32,
    /// `bypass` (0 or 1), the one field the driver writes.
    pub bypass: u8,
}

/// One split virtqueue's device-side state (virtio-queue's `QueueState`,
/// which is not serde).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueueSnapshot {
    /// The maximum size the device offers.
    pub max_size: u16,
    /// Next available-ring entry the device reads.
    pub next_avail: u16,
    /// Next used-ring entry the device writes.
    pub next_used: u16,
    /// `VIRTIO_F_RING_EVENT_IDX` in use.
    pub event_idx_enabled: bool,
    /// The size the driver chose.
    pub size: u16,
    /// Whether the driver set the queue ready.
    pub ready: bool,
    /// Descriptor table address.
    pub desc_table: u64,
    /// Available ring address.
    pub avail_ring: u64,
    /// Used ring address.
    pub used_ring: u64,
}

impl From<virtio_queue::QueueState> for QueueSnapshot {
    fn from(q: virtio_queue::QueueState) -> Self {
        QueueSnapshot {
            max_size: q.max_size,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx_enabled,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
        }
    }
}

impl From<QueueSnapshot> for virtio_queue::QueueState {
    fn from(q: QueueSnapshot) -> Self {
        virtio_queue::QueueState {
            max_size: q.max_size,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx_enabled,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
        }
    }
}

/// The vIOMMU behind the queues.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ViommuSnapshot {
    /// The translation generation (restored so that it never goes back).
    pub generation: u64,
    /// Every endpoint behind the device (hot-plugged ones included),
    /// ascending.
    pub endpoints: Vec<u32>,
    /// Every domain, ascending by ID; an endpoint's attachment is the
    /// domain that lists it.
    pub domains: Vec<DomainSnapshot>,
    /// Fault records waiting for event buffers, oldest first.
    pub faults: Vec<FaultSnapshot>,
    /// Fault records dropped because the queue was full.
    pub faults_dropped: u64,
    /// Page requests each backend holds.
    pub page_requests: Vec<BackendPageRequests>,
    /// Guest RAM when the snapshot was taken: sorted, merged, inclusive
    /// `[start, end]` ranges (version 2; `None` in a version-1 snapshot).
    /// The target's RAM must be the same: plug RAM plugged since boot
    /// again ([`crate::Viommu::add_ram`]) before restoring.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ram: Option<Vec<(u64, u64)>>,
    /// The MMIO windows registered when the snapshot was taken, as
    /// inclusive `[start, end]` guest-physical ranges, sorted (version 2;
    /// `None` in a version-1 snapshot). The target must have the same
    /// ([`crate::Viommu::add_mmio_window`]); host addresses are the
    /// target's own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mmio_windows: Option<Vec<(u64, u64)>>,
}

/// One domain.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DomainSnapshot {
    /// Domain ID.
    pub id: u32,
    /// Attached endpoints, in the order they joined.
    pub endpoints: Vec<u32>,
    /// What it translates with.
    pub kind: DomainKindSnapshot,
}

/// What a domain translates with.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub enum DomainKindSnapshot {
    /// A MAP/UNMAP domain and its mappings, ascending by IOVA.
    Mapped(Vec<MappingSnapshot>),
    /// An `ATTACH_F_BYPASS` domain.
    Bypass,
    /// An ATTACH_TABLE domain and the guest table bound to it.
    Table(TableSnapshot),
}

/// One mapping as `[virt_start, virt_end, phys_start, flags]` (inclusive
/// end, `VIRTIO_IOMMU_MAP_F_*` flags): a JSON array, the bulk of a large
/// snapshot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MappingSnapshot(pub u64, pub u64, pub u64, pub u32);

/// A bound guest table, field for field as ATTACH_TABLE carried it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(missing_docs)] // the fields are TableDesc's, documented there
pub enum TableSnapshot {
    /// `PGTF_ARM_LPAE`.
    ArmLpae {
        asid: u16,
        tcr: u64,
        ttbr0: u64,
        ttbr1: u64,
        mair: u64,
    },
    /// `PSTF_ARM_SMMU_V3`.
    ArmSmmuV3 {
        s1fmt: u8,
        s1dss: u8,
        s1contextptr: u64,
        s1cdmax: u32,
    },
    /// `PSTF_INTEL_VTD`.
    IntelVtd { pasid_bits: u8, pasid_dir_ptr: u64 },
    /// `PGTF_X86_64`.
    X86_64 { levels: u8, root: u64 },
}

impl From<TableDesc> for TableSnapshot {
    fn from(t: TableDesc) -> Self {
        match t {
            TableDesc::ArmLpae {
                asid,
                tcr,
                ttbr0,
                ttbr1,
                mair,
            } => TableSnapshot::ArmLpae {
                asid,
                tcr,
                ttbr0,
                ttbr1,
                mair,
            },
            TableDesc::ArmSmmuV3 {
                s1fmt,
                s1dss,
                s1contextptr,
                s1cdmax,
            } => TableSnapshot::ArmSmmuV3 {
                s1fmt,
                s1dss,
                s1contextptr,
                s1cdmax,
            },
            TableDesc::IntelVtd {
                pasid_bits,
                pasid_dir_ptr,
            } => TableSnapshot::IntelVtd {
                pasid_bits,
                pasid_dir_ptr,
            },
            TableDesc::X86_64 { levels, root } => TableSnapshot::X86_64 { levels, root },
        }
    }
}

impl From<TableSnapshot> for TableDesc {
    fn from(t: TableSnapshot) -> Self {
        match t {
            TableSnapshot::ArmLpae {
                asid,
                tcr,
                ttbr0,
                ttbr1,
                mair,
            } => TableDesc::ArmLpae {
                asid,
                tcr,
                ttbr0,
                ttbr1,
                mair,
            },
            TableSnapshot::ArmSmmuV3 {
                s1fmt,
                s1dss,
                s1contextptr,
                s1cdmax,
            } => TableDesc::ArmSmmuV3 {
                s1fmt,
                s1dss,
                s1contextptr,
                s1cdmax,
            },
            TableSnapshot::IntelVtd {
                pasid_bits,
                pasid_dir_ptr,
            } => TableDesc::IntelVtd {
                pasid_bits,
                pasid_dir_ptr,
            },
            TableSnapshot::X86_64 { levels, root } => TableDesc::X86_64 { levels, root },
        }
    }
}

/// One fault record waiting for the event queue (the extended record's
/// fields; a classic driver gets its classic part).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(missing_docs)] // the fields are ExtFaultRecord's, documented there
pub struct FaultSnapshot {
    pub reason: u8,
    pub flt_type: u16,
    pub flags: u32,
    pub pr_evt_flags: u32,
    pub endpoint: u32,
    pub pasid: u32,
    pub grpid: u32,
    pub address: u64,
}

impl From<ExtFaultRecord> for FaultSnapshot {
    fn from(r: ExtFaultRecord) -> Self {
        FaultSnapshot {
            reason: r.reason,
            flt_type: r.flt_type,
            flags: r.flags,
            pr_evt_flags: r.pr_evt_flags,
            endpoint: r.endpoint,
            pasid: r.pasid,
            grpid: r.grpid,
            address: r.address,
        }
    }
}

impl From<FaultSnapshot> for ExtFaultRecord {
    fn from(r: FaultSnapshot) -> Self {
        ExtFaultRecord {
            reason: r.reason,
            flt_type: r.flt_type,
            flags: r.flags,
            pr_evt_flags: r.pr_evt_flags,
            endpoint: r.endpoint,
            pasid: r.pasid,
            grpid: r.grpid,
            address: r.address,
        }
    }
}

/// The page requests of one backend. The backend is found again on
/// restore as the one serving `endpoints`, and must carry `backend`'s name.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendPageRequests {
    /// The backend's name.
    pub backend: String,
    /// The endpoints it served, ascending (at least one).
    pub endpoints: Vec<u32>,
    /// Its page requests.
    pub state: SavedPageRequests,
}

/// Why a snapshot was refused, or could not be taken. The device is as it
/// was before the call.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// The bytes are not a snapshot of this format.
    #[error("snapshot does not decode: {0}")]
    Decode(#[from] serde_json::Error),
    /// A version this build does not read.
    #[error(
        "snapshot version {found} is not supported (this build reads versions {} to \
         {supported})",
        OLDEST_SNAPSHOT_VERSION
    )]
    UnknownVersion {
        /// The snapshot's version.
        found: u32,
        /// The newest version this build reads (the one it writes); it
        /// reads every one from [`OLDEST_SNAPSHOT_VERSION`] on.
        supported: u32,
    },
    /// Restore needs a device that is not activated and holds nothing.
    #[error("restore needs a freshly built device: {0}")]
    NotFresh(&'static str),
    /// The snapshot was taken while a notification was half served.
    #[error("snapshot taken with {0} INVALIDATE statuses still pending")]
    Busy(usize),
    /// The device offers other features than the snapshotted one (another
    /// config or other backends).
    #[error("snapshot features {snapshot:#x} differ from the device's {device:#x}")]
    Features {
        /// Offered when the snapshot was taken.
        snapshot: u64,
        /// Offered by this device.
        device: u64,
    },
    /// The driver accepted features the device never offered.
    #[error("accepted features {acked:#x} include bits not offered ({offered:#x})")]
    AckedNotOffered {
        /// Accepted.
        acked: u64,
        /// Offered.
        offered: u64,
    },
    /// A config-space field differs from this device's config.
    #[error("config field {field}: snapshot has {snapshot:#x}, this device {device:#x}")]
    Config {
        /// The field.
        field: &'static str,
        /// The snapshot's value.
        snapshot: u64,
        /// This device's value.
        device: u64,
    },
    /// A queue state the device cannot use.
    #[error("queue {queue}: {reason}")]
    Queue {
        /// Queue index.
        queue: u16,
        /// What is wrong.
        reason: String,
    },
    /// An endpoint in the snapshot that this device does not have.
    #[error("snapshot endpoint {0} is not behind this device")]
    UnknownEndpoint(u32),
    /// An endpoint of this device the snapshot does not have.
    #[error("device endpoint {0} is missing from the snapshot")]
    MissingEndpoint(u32),
    /// An endpoint listed twice.
    #[error("endpoint {0} is listed twice")]
    DuplicateEndpoint(u32),
    /// A domain listed twice.
    #[error("domain {0} is listed twice")]
    DuplicateDomain(u32),
    /// A domain with no endpoint (a domain ends with its last endpoint).
    #[error("domain {0} has no endpoint")]
    EmptyDomain(u32),
    /// A domain lists an endpoint the snapshot does not list.
    #[error("domain {domain} lists endpoint {endpoint}, which the snapshot does not list")]
    DomainEndpoint {
        /// The domain.
        domain: u32,
        /// The endpoint.
        endpoint: u32,
    },
    /// An endpoint attached to two domains.
    #[error("endpoint {endpoint} is in domain {first} and in domain {second}")]
    TwoDomains {
        /// The endpoint.
        endpoint: u32,
        /// The first domain naming it.
        first: u32,
        /// The second.
        second: u32,
    },
    /// A domain, mapping or table the device's rules refuse (outside the
    /// input range or domain range, over a reserved region, a format the
    /// endpoint does not advertise, a limit...).
    #[error("{what}: {source}")]
    Refused {
        /// What was being restored.
        what: String,
        /// The rule it broke.
        #[source]
        source: RequestError,
    },
    /// More fault records than the queue holds.
    #[error("{count} fault records, the queue holds {capacity}")]
    TooManyFaults {
        /// Records in the snapshot.
        count: usize,
        /// The queue's capacity.
        capacity: usize,
    },
    /// Page requests that do not fit this device.
    #[error("page requests: {0}")]
    PageRequests(String),
    /// Guest RAM or the MMIO windows differ from the snapshot's: the
    /// guest's tables and mappings point into a memory map this device
    /// does not have.
    #[error("{what}: snapshot has {snapshot:x?}, this device {device:x?}")]
    MemoryMap {
        /// `"guest RAM"` or `"MMIO windows"`.
        what: &'static str,
        /// The snapshot's ranges.
        snapshot: Vec<(u64, u64)>,
        /// This device's.
        device: Vec<(u64, u64)>,
    },
    /// A backend refused to recreate its state; what it did is undone.
    #[error("backend {backend}: {what}: {source}")]
    Backend {
        /// The backend's name.
        backend: String,
        /// What it was asked.
        what: String,
        /// Its error.
        #[source]
        source: BackendError,
    },
}

/// Only the version, read before the rest so that a snapshot of another
/// version is refused as such rather than as a decode error.
#[derive(Deserialize)]
struct VersionOnly {
    version: u32,
}

impl DeviceSnapshot {
    /// The snapshot as JSON.
    pub fn to_json(&self) -> Result<Vec<u8>, SnapshotError> {
        Ok(serde_json::to_vec(self)?)
    }

    /// Reads a snapshot written by [`Self::to_json`], refusing any other
    /// version first. The content is checked by
    /// [`crate::VirtioIommu::restore`].
    pub fn from_json(bytes: &[u8]) -> Result<Self, SnapshotError> {
        let v: VersionOnly = serde_json::from_slice(bytes)?;
        check_version(v.version)?;
        Ok(serde_json::from_slice(bytes)?)
    }
}

/// Refuses every version but [`OLDEST_SNAPSHOT_VERSION`] to
/// [`SNAPSHOT_VERSION`]. A version-1 snapshot reads as a version-2 one
/// without a memory map (which is then not compared).
pub(crate) fn check_version(found: u32) -> Result<(), SnapshotError> {
    if !(OLDEST_SNAPSHOT_VERSION..=SNAPSHOT_VERSION).contains(&found) {
        return Err(SnapshotError::UnknownVersion {
            found,
            supported: SNAPSHOT_VERSION,
        });
    }
    Ok(())
}

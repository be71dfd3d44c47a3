//! Why a stage-1 lookup failed: the PASID or CD stage (configuration) or the
//! page-table walk (a mapping), with what the guest wrote that caused it.
//!
//! Two questions every fault answers for the software IOMMU:
//! - [`WalkFault::page_request_eligible`]: may the device turn it into a
//!   page request (PCIe PRI / virtio-iommu PAGE_REQ) that the guest can
//!   resolve by filling its tables? Only a not-present entry of the page
//!   tables qualifies; a missing PASID entry or CD is a configuration the
//!   guest has not made, not a page it has not faulted in yet.
//! - [`WalkFault::virtio_reason`]: which `VIRTIO_IOMMU_FAULT_R_*` the fault
//!   record carries (see that method for the mapping and why).

use std::fmt;

use crate::wire::{
    Status, VIRTIO_IOMMU_FAULT_R_DOMAIN, VIRTIO_IOMMU_FAULT_R_MAPPING, VIRTIO_IOMMU_FAULT_R_UNKNOWN,
};

/// A failed stage-1 lookup.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, thiserror::Error)]
#[error("{kind}{}", AtLevel(*.level))]
pub struct WalkFault {
    /// What went wrong.
    pub kind: WalkFaultKind,
    /// The page-table level of the entry at fault, in the format's own
    /// numbering (IA-32e 5..=1, AArch64 0..=3); `None` for faults outside
    /// the page tables (PASID directory/table, CD table, configuration,
    /// permission checks on a leaf).
    pub level: Option<u8>,
}

struct AtLevel(Option<u8>);

impl fmt::Display for AtLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(l) => write!(f, " at level {l}"),
            None => Ok(()),
        }
    }
}

impl WalkFault {
    /// A fault at page-table level `level`.
    #[inline]
    pub const fn at(kind: WalkFaultKind, level: u8) -> Self {
        WalkFault {
            kind,
            level: Some(level),
        }
    }

    /// A fault outside the page tables.
    #[inline]
    pub const fn new(kind: WalkFaultKind) -> Self {
        WalkFault { kind, level: None }
    }

    /// Whether a PRI-capable device may turn this fault into a page request:
    /// only an entry of the page tables that is not present (VT-d P = 0,
    /// Arm descriptor invalid), at any level. Permission, access-flag,
    /// reserved-bit and address-size faults, and every PASID/CD-stage fault,
    /// are reported as unrecoverable.
    #[inline]
    pub fn page_request_eligible(&self) -> bool {
        matches!(self.kind, WalkFaultKind::NotPresent) && self.level.is_some()
    }

    /// The virtio-iommu fault reason for the fault record:
    /// - `VIRTIO_IOMMU_FAULT_R_MAPPING` for everything the page tables say
    ///   about the address: not present, permission, access flag, reserved
    ///   bits or an address too wide in an entry, a table pointer outside
    ///   RAM, an input address outside the translated range or
    ///   non-canonical, walks disabled (EPD0) — the driver looks at its
    ///   mapping;
    /// - `VIRTIO_IOMMU_FAULT_R_DOMAIN` for the PASID/CD stage and the
    ///   regime's configuration: PASID or SubstreamID out of range, a PASID
    ///   directory entry, PASID entry or CD not present, malformed or
    ///   unsupported, a PASID/CD structure outside RAM, traffic without a
    ///   SubstreamID that S1DSS terminates — the (endpoint, PASID) has no
    ///   usable translation context, the nearest the virtio reasons come to
    ///   "not attached";
    /// - `VIRTIO_IOMMU_FAULT_R_UNKNOWN` for what the guest cannot fix by
    ///   editing a table: a resume point that does not fit the regime (a
    ///   caller bug) and an address in the TTB1 half, which this device
    ///   does not walk.
    pub fn virtio_reason(&self) -> u8 {
        use WalkFaultKind as K;
        match self.kind {
            K::NotPresent
            | K::Permission(_)
            | K::AccessFlag
            | K::ReservedBits { .. }
            | K::AddressSize { .. }
            | K::InputOutOfRange { .. }
            | K::NonCanonical { .. }
            | K::WalkDisabled
            | K::BadDescriptor { .. } => VIRTIO_IOMMU_FAULT_R_MAPPING,
            K::TableOutsideRam { .. } => {
                if self.level.is_some() {
                    VIRTIO_IOMMU_FAULT_R_MAPPING
                } else {
                    VIRTIO_IOMMU_FAULT_R_DOMAIN
                }
            }
            K::PasidOutOfRange { .. }
            | K::PasidDirNotPresent { .. }
            | K::PasidDirReserved { .. }
            | K::PasidEntryNotPresent { .. }
            | K::PasidEntryReserved { .. }
            | K::UnsupportedPasidEntry { .. }
            | K::CdOutOfRange { .. }
            | K::CdL1Invalid { .. }
            | K::CdL1Reserved { .. }
            | K::CdInvalid { .. }
            | K::CdReserved { .. }
            | K::UnsupportedCd { .. }
            | K::SubstreamRequired
            | K::UnsupportedConfig(_) => VIRTIO_IOMMU_FAULT_R_DOMAIN,
            K::InvalidStart | K::Ttbr1Unsupported => VIRTIO_IOMMU_FAULT_R_UNKNOWN,
        }
    }
}

/// The kind of verdict a fault is, the same for every backend that reads
/// the guest's structures through this crate's decoders (the software
/// IOMMU at DMA time, a shadowing backend when it binds the table or
/// re-reads an entry): what the guest did wrong, without the detail.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FaultClass {
    /// A PASID directory entry, PASID entry, L1 CD descriptor or CD that
    /// is not present / not valid, or traffic S1DSS terminates: nothing
    /// translates, and nothing is wrong with what is there. A shadowing
    /// backend blocks the PASID.
    NotPresent,
    /// Reserved bits set in a PASID directory entry, PASID entry, L1 CD
    /// descriptor or CD (INVAL for a backend that refuses a binding).
    Reserved,
    /// A translation type, paging mode or regime feature this device does
    /// not implement, including the architecture's reserved encodings of
    /// those fields (UNSUPP).
    Unsupported,
    /// A structure outside guest RAM, or a PASID / SubstreamID beyond the
    /// table (RANGE).
    OutOfRange,
    /// A fault of the page tables themselves (not present, permission,
    /// access flag, reserved bits in a table entry, address size, input
    /// address): a verdict on one address, not on the binding.
    Translation,
}

impl FaultClass {
    /// The status a backend that refuses a binding (or a PASID-cache
    /// invalidation that re-reads an entry) gives for this class: `INVAL`
    /// for reserved bits, `UNSUPP` for what this device does not implement,
    /// `RANGE` for outside RAM or beyond the table. `None` for
    /// [`NotPresent`](Self::NotPresent) (the PASID is blocked, nothing is
    /// refused) and [`Translation`](Self::Translation) (a verdict on one
    /// address, given at DMA time).
    pub fn refusal_status(self) -> Option<Status> {
        match self {
            FaultClass::Reserved => Some(Status::Inval),
            FaultClass::Unsupported => Some(Status::Unsupp),
            FaultClass::OutOfRange => Some(Status::Range),
            FaultClass::NotPresent | FaultClass::Translation => None,
        }
    }
}

impl WalkFault {
    /// The class of this fault (see [`FaultClass`]). A table or entry
    /// outside guest RAM is [`FaultClass::OutOfRange`] at any level.
    pub fn class(&self) -> FaultClass {
        use WalkFaultKind as K;
        match self.kind {
            K::PasidDirNotPresent { .. }
            | K::PasidEntryNotPresent { .. }
            | K::CdL1Invalid { .. }
            | K::CdInvalid { .. }
            | K::SubstreamRequired => FaultClass::NotPresent,
            K::PasidDirReserved { .. }
            | K::PasidEntryReserved { .. }
            | K::CdL1Reserved { .. }
            | K::CdReserved { .. } => FaultClass::Reserved,
            K::UnsupportedPasidEntry { .. }
            | K::UnsupportedCd { .. }
            | K::UnsupportedConfig(_)
            | K::Ttbr1Unsupported => FaultClass::Unsupported,
            K::TableOutsideRam { .. } | K::PasidOutOfRange { .. } | K::CdOutOfRange { .. } => {
                FaultClass::OutOfRange
            }
            K::NotPresent
            | K::Permission(_)
            | K::AccessFlag
            | K::ReservedBits { .. }
            | K::AddressSize { .. }
            | K::InputOutOfRange { .. }
            | K::NonCanonical { .. }
            | K::WalkDisabled
            | K::BadDescriptor { .. }
            | K::InvalidStart => FaultClass::Translation,
        }
    }
}

/// What a stage-1 lookup found wrong.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, thiserror::Error)]
pub enum WalkFaultKind {
    /// A page-table entry is not present (IA-32e P = 0, AArch64 descriptor
    /// bit 0 clear). The only kind eligible for a page request.
    #[error("page-table entry not present")]
    NotPresent,
    /// The leaf does not permit the access.
    #[error("permission denied: {0}")]
    Permission(Denied),
    /// AArch64 leaf with AF = 0 while the CD has AFFD = 0 (this device
    /// behaves as HA = 0: it never sets AF itself).
    #[error("access flag clear")]
    AccessFlag,
    /// IA-32e entry with reserved bits set.
    #[error("reserved bits {bits:#x} set")]
    ReservedBits {
        /// The offending bits.
        bits: u64,
    },
    /// A table or structure the walk needs is not (entirely) in guest RAM.
    #[error("table entry at {gpa:#x} is outside guest RAM")]
    TableOutsideRam {
        /// Guest-physical address of the entry that could not be read.
        gpa: u64,
    },
    /// AArch64: an output or next-table address above the output size
    /// (IPS, capped at 48 bits), or address bits this walker does not
    /// support (`OA[51:48]`).
    #[error("address {addr:#x} exceeds the output address size")]
    AddressSize {
        /// The address bits as the descriptor holds them.
        addr: u64,
    },
    /// AArch64: the input address is above the range T0SZ translates.
    #[error("input address {va:#x} outside the translated range")]
    InputOutOfRange {
        /// The (untagged) input address.
        va: u64,
    },
    /// IA-32e: the input address is not canonical for the paging depth.
    #[error("input address {va:#x} is not canonical")]
    NonCanonical {
        /// The input address.
        va: u64,
    },
    /// AArch64: table walks for the selected half are disabled (EPD0 or
    /// EPD1 set); the architecture reports a translation fault.
    #[error("translation table walks disabled (EPDx = 1)")]
    WalkDisabled,
    /// AArch64: the input address selects TTB1 (`VA[55]` = 1) and EPD1 = 0.
    /// This device walks TTB0 only.
    #[error("input address selects TTB1, which this device does not walk")]
    Ttbr1Unsupported,
    /// AArch64: a descriptor type the level does not allow (a block at a
    /// level without blocks for the granule, or the reserved type 0b01 at
    /// level 3).
    #[error("descriptor {desc:#x} is not valid at this level")]
    BadDescriptor {
        /// The descriptor.
        desc: u64,
    },
    /// The resume point's level does not exist in this regime.
    #[error("resume point does not fit the regime")]
    InvalidStart,
    /// The PASID is at or above `1 << pasid_bits`.
    #[error("PASID {pasid:#x} exceeds the PASID width")]
    PasidOutOfRange {
        /// The PASID.
        pasid: u32,
    },
    /// The PASID directory entry for the PASID has P = 0.
    #[error("PASID directory entry for PASID {pasid:#x} not present")]
    PasidDirNotPresent {
        /// The PASID.
        pasid: u32,
    },
    /// The PASID directory entry has reserved bits set.
    #[error("PASID directory entry for PASID {pasid:#x} has reserved bits {bits:#x}")]
    PasidDirReserved {
        /// The PASID.
        pasid: u32,
        /// The offending bits.
        bits: u64,
    },
    /// The scalable-mode PASID entry has P = 0.
    #[error("PASID entry {pasid:#x} not present")]
    PasidEntryNotPresent {
        /// The PASID.
        pasid: u32,
    },
    /// The PASID entry has reserved bits set.
    #[error("PASID entry {pasid:#x}: qword {qword} has reserved bits {bits:#x}")]
    PasidEntryReserved {
        /// The PASID.
        pasid: u32,
        /// Which of the eight 64-bit words.
        qword: u8,
        /// The offending bits.
        bits: u64,
    },
    /// The PASID entry asks for something this device does not implement.
    #[error("PASID entry {pasid:#x}: {what}")]
    UnsupportedPasidEntry {
        /// The PASID.
        pasid: u32,
        /// What.
        what: Unsupported,
    },
    /// The SubstreamID is outside the CD table (at or above
    /// `1 << S1CDMax`, given while substreams are disabled, or SubstreamID 0
    /// while S1DSS reserves it): SMMU C_BAD_SUBSTREAMID.
    #[error("SubstreamID {ssid:#x} outside the CD table")]
    CdOutOfRange {
        /// The SubstreamID.
        ssid: u32,
    },
    /// The level-1 CD descriptor covering the SubstreamID has V = 0.
    #[error("L1 CD descriptor for SubstreamID {ssid:#x} not valid")]
    CdL1Invalid {
        /// The SubstreamID.
        ssid: u32,
    },
    /// The level-1 CD descriptor has reserved bits set.
    #[error("L1 CD descriptor for SubstreamID {ssid:#x} has reserved bits {bits:#x}")]
    CdL1Reserved {
        /// The SubstreamID.
        ssid: u32,
        /// The offending bits.
        bits: u64,
    },
    /// The CD has V = 0 (SMMU C_BAD_CD).
    #[error("CD {ssid:#x} not valid")]
    CdInvalid {
        /// The SubstreamID (0 for traffic without one).
        ssid: u32,
    },
    /// The CD has reserved bits set.
    #[error("CD {ssid:#x}: dword {dword} has reserved bits {bits:#x}")]
    CdReserved {
        /// The SubstreamID.
        ssid: u32,
        /// Which of the eight 64-bit words.
        dword: u8,
        /// The offending bits.
        bits: u64,
    },
    /// The CD asks for something this device does not implement.
    #[error("CD {ssid:#x}: {what}")]
    UnsupportedCd {
        /// The SubstreamID.
        ssid: u32,
        /// What.
        what: Unsupported,
    },
    /// Traffic without a SubstreamID while S1DSS = 0b00 (terminate).
    #[error("traffic without a SubstreamID is terminated (S1DSS = 0)")]
    SubstreamRequired,
    /// A regime or table configuration this device does not implement.
    #[error("unsupported configuration: {0}")]
    UnsupportedConfig(Unsupported),
}

/// Which rule refused an access.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, thiserror::Error)]
pub enum Denied {
    /// A write to a mapping that is not writable.
    #[error("write to a read-only mapping")]
    Write,
    /// An unprivileged access to a supervisor-only mapping.
    #[error("unprivileged access to a privileged mapping")]
    User,
    /// An instruction fetch from a mapping that is not executable (XD,
    /// PXN/UXN, their table variants, SMEP, WXN, or the implicit PXN of an
    /// EL0-writable page).
    #[error("instruction fetch from a non-executable mapping")]
    Execute,
    /// VT-d: a privileged request while the PASID entry has SRE = 0.
    #[error("privileged request while SRE = 0")]
    SupervisorRequest,
    /// VT-d: an execute request while the PASID entry has ERE = 0.
    #[error("execute request while ERE = 0")]
    ExecuteRequest,
    /// Arm: a privileged data access to a user-accessible page with PAN = 1.
    #[error("privileged data access to a user page with PAN = 1")]
    PrivilegedAccessNever,
}

/// A feature or encoding a guest structure selects that this device does
/// not implement (or that the architecture reserves).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, thiserror::Error)]
pub enum Unsupported {
    /// VT-d PGTT other than first-stage only (0b001): second-stage (0b010),
    /// nested (0b011), pass-through (0b100) and the reserved values.
    #[error("unsupported PGTT {0:#05b} (only first-stage 0b001)")]
    Pgtt(u8),
    /// VT-d FSPM other than 4-level (0) or 5-level (1).
    #[error("unsupported first-stage paging mode {0}")]
    PagingMode(u8),
    /// IA-32e paging depth other than 4 or 5.
    #[error("unsupported paging depth {0} (4 or 5)")]
    Levels(u8),
    /// An output address width outside 32..=52.
    #[error("unsupported output address width {0}")]
    OutputBits(u8),
    /// A PASID width outside 1..=20.
    #[error("unsupported PASID width {0} (1..=20)")]
    PasidBits(u8),
    /// Arm CD.AA64 = 0 (VMSAv8-32 LPAE or VMSAv9-128 tables).
    #[error("AArch32 / 128-bit descriptor tables (AA64 = 0)")]
    Aarch32,
    /// Arm big-endian tables (CD.ENDI = 1).
    #[error("big-endian tables (ENDI = 1)")]
    BigEndian,
    /// Arm TG0 encoding of a reserved granule.
    #[error("reserved granule encoding TG0 = {0}")]
    Granule(u8),
    /// Arm T0SZ outside 16..=48 (16..=47 for 64 KiB).
    #[error("T0SZ {0} outside the supported range")]
    T0sz(u8),
    /// Arm hardware update of access/dirty flags (HA/HD): this device
    /// reports no HTTU, so setting them is ILLEGAL (SMMUv3 CD.HA).
    #[error("hardware access/dirty flag update (HA/HD) not supported")]
    Httu,
    /// Arm 52-bit addresses with 4 KiB/16 KiB granules (TCR.DS).
    #[error("52-bit addresses (DS = 1) not supported")]
    Lpa2,
    /// An SMMUv3 S1Fmt value that does not fit the 2-bit field (the
    /// reserved 0b11 behaves as 0b00, linear).
    #[error("unsupported S1Fmt {0}")]
    S1Fmt(u8),
    /// An SMMUv3 S1DSS value that does not fit the 2-bit field (the
    /// reserved 0b11 behaves as 0b00, terminate).
    #[error("unsupported S1DSS {0}")]
    S1Dss(u8),
    /// SMMUv3 S1CDMax above 20 (SubstreamIDs are 20 bits).
    #[error("S1CDMax {0} above 20")]
    S1CdMax(u32),
    /// Traffic with a PASID on a table format that has none (the direct
    /// x86-64 and Arm LPAE formats translate requests without PASID only).
    #[error("a PASID on a table format without PASIDs")]
    PasidOnDirectTable,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_not_present_page_table_entries_are_page_request_eligible() {
        assert!(WalkFault::at(WalkFaultKind::NotPresent, 1).page_request_eligible());
        assert!(WalkFault::at(WalkFaultKind::NotPresent, 4).page_request_eligible());
        assert!(!WalkFault::new(WalkFaultKind::Permission(Denied::Write)).page_request_eligible());
        assert!(!WalkFault::at(WalkFaultKind::AccessFlag, 3).page_request_eligible());
        assert!(
            !WalkFault::new(WalkFaultKind::PasidEntryNotPresent { pasid: 1 })
                .page_request_eligible()
        );
        assert!(!WalkFault::new(WalkFaultKind::CdInvalid { ssid: 1 }).page_request_eligible());
        assert!(
            !WalkFault::at(WalkFaultKind::ReservedBits { bits: 0x80 }, 4).page_request_eligible()
        );
    }

    #[test]
    fn virtio_reason_separates_mapping_from_context_faults() {
        let mapping = [
            WalkFault::at(WalkFaultKind::NotPresent, 2),
            WalkFault::new(WalkFaultKind::Permission(Denied::User)),
            WalkFault::at(WalkFaultKind::TableOutsideRam { gpa: 1 << 40 }, 3),
            WalkFault::new(WalkFaultKind::NonCanonical { va: 1 << 60 }),
        ];
        for f in mapping {
            assert_eq!(f.virtio_reason(), VIRTIO_IOMMU_FAULT_R_MAPPING, "{f}");
        }
        let domain = [
            WalkFault::new(WalkFaultKind::PasidOutOfRange { pasid: 9 }),
            WalkFault::new(WalkFaultKind::TableOutsideRam { gpa: 1 << 40 }),
            WalkFault::new(WalkFaultKind::UnsupportedPasidEntry {
                pasid: 1,
                what: Unsupported::Pgtt(4),
            }),
            WalkFault::new(WalkFaultKind::CdOutOfRange { ssid: 3 }),
            WalkFault::new(WalkFaultKind::SubstreamRequired),
        ];
        for f in domain {
            assert_eq!(f.virtio_reason(), VIRTIO_IOMMU_FAULT_R_DOMAIN, "{f}");
        }
        assert_eq!(
            WalkFault::new(WalkFaultKind::InvalidStart).virtio_reason(),
            VIRTIO_IOMMU_FAULT_R_UNKNOWN
        );
    }

    #[test]
    fn class_groups_structure_verdicts_apart_from_translation_faults() {
        let cases = [
            (
                WalkFaultKind::PasidEntryNotPresent { pasid: 1 },
                FaultClass::NotPresent,
            ),
            (
                WalkFaultKind::PasidDirNotPresent { pasid: 1 },
                FaultClass::NotPresent,
            ),
            (WalkFaultKind::CdInvalid { ssid: 1 }, FaultClass::NotPresent),
            (
                WalkFaultKind::PasidDirReserved { pasid: 1, bits: 4 },
                FaultClass::Reserved,
            ),
            (
                WalkFaultKind::PasidEntryReserved {
                    pasid: 1,
                    qword: 3,
                    bits: 1,
                },
                FaultClass::Reserved,
            ),
            (
                WalkFaultKind::UnsupportedPasidEntry {
                    pasid: 1,
                    what: Unsupported::Pgtt(4),
                },
                FaultClass::Unsupported,
            ),
            (
                WalkFaultKind::TableOutsideRam { gpa: 1 << 40 },
                FaultClass::OutOfRange,
            ),
            (
                WalkFaultKind::PasidOutOfRange { pasid: 9 },
                FaultClass::OutOfRange,
            ),
            (WalkFaultKind::NotPresent, FaultClass::Translation),
            (
                WalkFaultKind::ReservedBits { bits: 0x80 },
                FaultClass::Translation,
            ),
        ];
        for (kind, class) in cases {
            assert_eq!(WalkFault::new(kind).class(), class, "{kind}");
        }
        // Outside RAM is OutOfRange at any level.
        assert_eq!(
            WalkFault::at(WalkFaultKind::TableOutsideRam { gpa: 1 << 40 }, 4).class(),
            FaultClass::OutOfRange
        );
    }

    #[test]
    fn display_names_the_level_and_the_guest_value() {
        let f = WalkFault::at(WalkFaultKind::ReservedBits { bits: 0x80 }, 4);
        assert_eq!(f.to_string(), "reserved bits 0x80 set at level 4");
        let f = WalkFault::new(WalkFaultKind::UnsupportedPasidEntry {
            pasid: 5,
            what: Unsupported::Pgtt(4),
        });
        assert_eq!(
            f.to_string(),
            "PASID entry 0x5: unsupported PGTT 0b100 (only first-stage 0b001)"
        );
    }
}

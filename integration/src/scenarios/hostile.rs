//! The VMM's view of scenario 6, a hostile driver: the least each part of
//! it adds to the device's and the DMA engine's counters, and the checks
//! against that.

use vmm_iommu::config::{ReservedKind, TableFormat};
use vmm_iommu::wire::{
    Status, VIRTIO_IOMMU_T_ATTACH_TABLE, VIRTIO_IOMMU_T_INVALIDATE, VIRTIO_IOMMU_T_PAGE_RESP,
};

use super::checks::Checks;
use super::map::map_checks;
use super::plan::unmet_requirement;
use crate::config::{Scenario, VmConfig};
use crate::vm::dma_device::DmaStats;
use crate::vm::RunOutcome;

/// The VMM's view of scenario 6: the spec's statuses for the hostile
/// requests, chains returned unwritten, exactly the four device errors the
/// broken queues and DRIVER_OK cause (nothing the nested part does may add
/// one: its errors are request-level), refused DMAs — then, when the config
/// enables the nested extension, what its part adds ([`HostileMin`]), and
/// scenarios 3 and 1 run after it in the same VM.
pub(super) fn hostile_checks(
    c: &mut Checks,
    cfg: &VmConfig,
    o: &RunOutcome,
    n: u64,
    map_faults: u64,
    dma: &DmaStats,
) {
    map_checks(c, o, n);
    let st = |s: Status| o.device.statuses[s as usize];
    c.check(
        o.device.unknown_type >= 2,
        format!(
            "unknown types returned unwritten: {}",
            o.device.unknown_type
        ),
    );
    c.check(
        o.device.no_tail >= 5,
        format!(
            "chains without a tail returned unwritten: {}",
            o.device.no_tail
        ),
    );
    c.check(
        o.transport.needs_reset == 4 && o.transport.features_refused == 2,
        format!(
            "4 device errors (DEVICE_NEEDS_RESET) and 2 refused FEATURES_OK, got {} and {}",
            o.transport.needs_reset, o.transport.features_refused
        ),
    );
    c.check(
        o.transport.ignored >= 6,
        format!("misused registers ignored: {}", o.transport.ignored),
    );
    c.check(
        st(Status::DevErr) == 0 && st(Status::NoMem) == 0,
        format!(
            "no DEVERR or NOMEM answered, got {} and {}",
            st(Status::DevErr),
            st(Status::NoMem)
        ),
    );
    let got_statuses = [
        st(Status::IoErr),
        st(Status::Unsupp),
        st(Status::Inval),
        st(Status::Range),
        st(Status::NoEnt),
    ];
    let spec = HostileMin::spec_part(cfg);
    // Without the extension: the spec's part, then scenario 1.
    let Some(nested) = &cfg.iommu.nested else {
        c.check(
            got_statuses.iter().zip(spec.statuses).all(|(g, w)| *g >= w),
            format!(
                "hostile requests answered IOERR, UNSUPP, INVAL, RANGE, NOENT {got_statuses:?}, at least {:?}",
                spec.statuses
            ),
        );
        c.check(
            dma.bad_args == 5 && dma.pasid_tagged == 1,
            format!(
                "5 DMAs refused for their arguments (one PASID-tagged), got {} ({})",
                dma.bad_args, dma.pasid_tagged
            ),
        );
        c.check(
            o.device.faults_delivered == map_faults,
            format!(
                "{map_faults} fault records delivered, got {}",
                o.device.faults_delivered
            ),
        );
        return;
    };

    // With it: at least what each part the config allows adds to the
    // spec's part, status by status and request type by type.
    let has = |f: TableFormat| nested.formats.contains(&f);
    let vtd = has(TableFormat::IntelVtd);
    let replay = unmet_requirement(cfg, Scenario::NestedVtd).is_none();
    let mut want = spec;
    for (on, part) in [
        (vtd, HostileMin::INTEL_VTD),
        (has(TableFormat::X86_64), HostileMin::X86_64),
        (has(TableFormat::ArmSmmuV3), HostileMin::ARM_SMMU_V3),
        (has(TableFormat::ArmLpae), HostileMin::ARM_LPAE),
        // The engines of this VMM can all wait for a page, so page
        // requests come with the extension.
        (vtd, HostileMin::PAGE_RESP),
        (replay, HostileMin::nested_vtd(n)),
    ] {
        if on {
            want = want.plus(part);
        }
    }
    c.check(
        got_statuses.iter().zip(want.statuses).all(|(g, w)| *g >= w),
        format!(
            "hostile requests answered IOERR, UNSUPP, INVAL, RANGE, NOENT {got_statuses:?}, at least {:?}",
            want.statuses
        ),
    );
    let req = |t: u8| o.device.requests[usize::from(t)];
    let got_requests = [
        req(VIRTIO_IOMMU_T_ATTACH_TABLE),
        req(VIRTIO_IOMMU_T_INVALIDATE),
        req(VIRTIO_IOMMU_T_PAGE_RESP),
    ];
    c.check(
        got_requests.iter().zip(want.requests).all(|(g, w)| *g >= w),
        format!(
            "ATTACH_TABLE, INVALIDATE, PAGE_RESP requests {got_requests:?}, at least {:?}",
            want.requests
        ),
    );
    c.check(
        o.device.faults_delivered >= map_faults + want.records,
        format!(
            "at least {} fault records delivered, got {}",
            map_faults + want.records,
            o.device.faults_delivered
        ),
    );
    c.check(
        dma.faults >= map_faults + want.dma_faults,
        format!(
            "at least {} DMAs ended with a fault status, got {}",
            map_faults + want.dma_faults,
            dma.faults
        ),
    );
    let bad_args = 5 + u64::from(replay);
    c.check(
        dma.bad_args == bad_args,
        format!(
            "{bad_args} DMAs refused for their arguments, got {}",
            dma.bad_args
        ),
    );
    let page_requests = if vtd { HostileMin::PAGE_REQUESTS } else { 0 };
    c.check(
        dma.page_waits == page_requests && dma.retries == 0,
        format!(
            "{page_requests} DMAs waited for a page and none was retried, got {} and {}",
            dma.page_waits, dma.retries
        ),
    );
    let Some(e) = o.emulated else {
        c.check(false, "the VM has the software nested IOMMU");
        return;
    };
    // Every record of the nested part came from the software IOMMU; the
    // rest are scenario 1's.
    c.check(
        o.device.faults_delivered == map_faults + e.faults + e.page_requests,
        format!(
            "fault records delivered = {map_faults} of MAP mode + {} faults and {} page requests of the software IOMMU, got {}",
            e.faults, e.page_requests, o.device.faults_delivered
        ),
    );
    c.check(
        e.page_requests == page_requests,
        format!(
            "{page_requests} page requests sent, got {}",
            e.page_requests
        ),
    );
    c.check(
        e.invalidate_calls == o.router.invalidate_calls
            && e.invalidations == o.router.invalidations_sent
            && o.router.rollbacks == 0,
        format!(
            "the software IOMMU got every invalidate call the router made ({} and {}, router {} and {}), no rollback ({})",
            e.invalidate_calls,
            e.invalidations,
            o.router.invalidate_calls,
            o.router.invalidations_sent,
            o.router.rollbacks
        ),
    );
}

/// The least one part of the hostile scenario adds to the device's and the
/// DMA engine's counters. The guest runs a nested part only for a format
/// its endpoint advertises, and skips a few cases of a part that need a
/// wide PASID, a second endpoint, bypass or a `domain_range` that leaves
/// room below or above it; those come on top.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct HostileMin {
    /// Statuses IOERR, UNSUPP, INVAL, RANGE, NOENT.
    statuses: [u64; 5],
    /// ATTACH_TABLE, INVALIDATE and PAGE_RESP requests decoded (a
    /// truncated one is not: it gets IOERR before it has a type).
    requests: [u64; 3],
    /// Fault records and page requests delivered on the event queue.
    records: u64,
    /// DMAs that ended with a fault status.
    dma_faults: u64,
}

impl HostileMin {
    /// The spec's part (the scenario without the extension): 8 IOERR, 8
    /// INVAL, 8 NOENT, and 3 RANGE plus one for each of ATTACH outside
    /// `domain_range`, MAP over the MSI region and MAP past the end of
    /// `input_range`, which `cfg` may leave no room for.
    fn spec_part(cfg: &VmConfig) -> HostileMin {
        let i = &cfg.iommu;
        let outside_domains = i.domain_range.start > 0 || i.domain_range.end < u32::MAX;
        let msi = i
            .reserved_regions
            .iter()
            .any(|r| r.kind == ReservedKind::Msi);
        let below_input_end = i.input_range.end < u64::MAX - 2 * 4096;
        let range = 3 + [outside_domains, msi, below_input_end]
            .iter()
            .map(|&b| u64::from(b))
            .sum::<u64>();
        HostileMin {
            statuses: [8, 0, 8, range, 8],
            requests: [0; 3],
            records: 0,
            dma_faults: 0,
        }
    }

    /// intel-vtd: 22 ATTACH_TABLEs (UNSUPP formats, INVAL fields, RANGE
    /// pointers, NOENT endpoints, onto a MAP domain, 4 garbage binds), 53
    /// INVALIDATEs (31 checked one by one, 4 with reserved bytes, one of
    /// 2^40 pages, a batch of 16), MAP and UNMAP in a table domain, and 8
    /// DMAs through garbage directories.
    const INTEL_VTD: HostileMin = HostileMin {
        statuses: [4, 3, 43, 7, 6],
        requests: [22, 53, 0],
        records: 8,
        dma_faults: 8,
    };
    /// x86-64: 8 refused ATTACH_TABLEs and 4 garbage binds, 2
    /// INVALIDATEs, 4 DMAs with fault records and 2 at leaves outside RAM
    /// (a fault status, no record).
    const X86_64: HostileMin = HostileMin {
        statuses: [0, 0, 6, 3, 0],
        requests: [12, 2, 0],
        records: 4,
        dma_faults: 6,
    };
    /// arm-smmuv3: 10 refused ATTACH_TABLEs and 3 garbage binds, an
    /// INVALIDATE of an SSID beyond s1cdmax, 8 DMAs.
    const ARM_SMMU_V3: HostileMin = HostileMin {
        statuses: [0, 0, 7, 4, 0],
        requests: [13, 1, 0],
        records: 8,
        dma_faults: 8,
    };
    /// arm-lpae: 3 refused ATTACH_TABLEs and 3 garbage binds, 3 DMAs.
    const ARM_LPAE: HostileMin = HostileMin {
        statuses: [0, 0, 2, 1, 0],
        requests: [6, 0, 0],
        records: 3,
        dma_faults: 3,
    };
    /// Page requests the PAGE_RESP part makes the engine send.
    const PAGE_REQUESTS: u64 = 2;
    /// PAGE_RESP (intel-vtd tables): 17 PAGE_RESPs (and a truncated one),
    /// 2 page requests, one answered FAILURE, one failed by a reset.
    const PAGE_RESP: HostileMin = HostileMin {
        statuses: [1, 0, 7, 0, 9],
        requests: [1, 0, 17],
        records: Self::PAGE_REQUESTS,
        dma_faults: 2,
    };

    /// Scenario 3 run after the nested part, with `n` benchmark
    /// INVALIDATEs.
    const fn nested_vtd(n: u64) -> HostileMin {
        HostileMin {
            statuses: [0, 0, 0, 1, 0],
            requests: [2, 6 + n, 0],
            records: 3,
            dma_faults: 3,
        }
    }

    /// Both parts.
    fn plus(self, o: HostileMin) -> HostileMin {
        let mut r = self;
        for (a, b) in r.statuses.iter_mut().zip(o.statuses) {
            *a += b;
        }
        for (a, b) in r.requests.iter_mut().zip(o.requests) {
            *a += b;
        }
        r.records += o.records;
        r.dma_faults += o.dma_faults;
        r
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_configs::{cfg, DMA};
    use super::*;

    #[test]
    fn hostile_spec_part_expects_range_only_where_the_config_leaves_room() {
        let no_room = cfg(&format!(
            r#"{{"iommu": {{"domain_range": {{"start": 0, "end": 4294967295}},
                "input_range": {{"start": "0x0", "end": "0xffffffffffffffff"}}}}, {DMA}}}"#
        ));
        assert_eq!(HostileMin::spec_part(&no_room).statuses, [8, 0, 8, 3, 8]);
        let room = cfg(&format!(
            r#"{{"iommu": {{"input_range": {{"start": "0x0", "end": "0xffffffffffff"}},
                "reserved_regions": [{{"start": "0xfee00000", "end": "0xfeefffff", "kind": "msi"}}]}},
                {DMA}}}"#
        ));
        assert_eq!(HostileMin::spec_part(&room).statuses, [8, 0, 8, 6, 8]);
    }
}

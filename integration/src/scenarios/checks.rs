//! What the VMM checks on every run, whatever the scenario: the check
//! record, the fast paths it was allowed, what every nested scenario leaves
//! behind, and the guest's measurements on its serial log.

use vmm_iommu::wire::VIRTIO_IOMMU_T_ATTACH_TABLE;

use super::RunOptions;
use crate::config::VmConfig;
use crate::vm::dma_device::DmaStats;
use crate::vm::irq::InterruptPath;
use crate::vm::worker::NotifyPath;
use crate::vm::{dma_slots, RunOutcome};

/// One check the VMM made on what it observed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Check {
    /// What was checked.
    pub what: String,
    /// Whether it held.
    pub ok: bool,
}

/// The number after `key=` on the guest's serial log, if it printed one.
pub fn serial_metric(serial: &str, key: &str) -> Option<u64> {
    let at = serial.find(&format!("{key}="))? + key.len() + 1;
    let digits: String = serial[at..]
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect();
    digits.parse().ok()
}

/// The checks of one run, as they are made.
#[derive(Default)]
pub(super) struct Checks(pub(super) Vec<Check>);

impl Checks {
    /// Records that `what` held (`ok`) or not.
    pub(super) fn check(&mut self, ok: bool, what: impl Into<String>) {
        self.0.push(Check {
            what: what.into(),
            ok,
        });
    }
}

/// What the first DMA engine behind the vIOMMU (the one the guest drives)
/// counted; zeros if the config has none.
pub(super) fn primary_dma(cfg: &VmConfig, o: &RunOutcome) -> DmaStats {
    let primary = dma_slots(cfg)
        .ok()
        .and_then(|v| v.iter().position(|d| d.behind_iommu));
    primary
        .and_then(|i| o.dma.get(i))
        .cloned()
        .unwrap_or_default()
}

/// Whatever the scenario: the paths that ran are the ones allowed, and
/// each ran as it should — the worker served the notifications and
/// stopped when told, interrupts were raised on the line and reached the
/// in-kernel irqchip; without a line none were raised.
pub(super) fn path_checks(c: &mut Checks, opts: &RunOptions, o: &RunOutcome) {
    let p = &o.paths;
    c.check(
        opts.fast_paths.ioeventfd || p.notify != NotifyPath::Ioeventfd,
        format!("notify path {} was allowed", p.notify),
    );
    c.check(
        opts.fast_paths.irqfd || !matches!(p.interrupts, InterruptPath::Irqfd { .. }),
        format!("interrupt path {} was allowed", p.interrupts),
    );
    match (&p.notify, &o.worker) {
        (NotifyPath::Ioeventfd, Some(w)) => {
            c.check(
                w.stopped && w.error.is_none(),
                format!("the device worker stopped when told (error: {:?})", w.error),
            );
            c.check(
                w.kicks[0] > 0,
                format!(
                    "the device worker served the request queue ({} kicks)",
                    w.kicks[0]
                ),
            );
        }
        (NotifyPath::Ioeventfd, None) => c.check(false, "the ioeventfd path had a worker"),
        // A worker may have run before a registration failed.
        (NotifyPath::MmioExit { .. }, _) => {}
    }
    c.check(
        o.transport.interrupt_errors == 0,
        format!(
            "every interrupt raised ({} errors)",
            o.transport.interrupt_errors
        ),
    );
    match p.interrupts {
        InterruptPath::Irqfd { .. } => {
            c.check(
                o.transport.interrupts > 0,
                format!(
                    "interrupts raised through the irqfd: {}",
                    o.transport.interrupts
                ),
            );
            c.check(
                o.line_latched != Some(false),
                "the in-kernel irqchip latched the line",
            );
        }
        InterruptPath::Polled { .. } => c.check(
            o.transport.interrupts == 0,
            format!("no line, no interrupt raised ({})", o.transport.interrupts),
        ),
    }
}

/// What every nested scenario leaves behind: requests of the extension
/// reached the device, the software IOMMU saw what the router sent it,
/// nothing dropped, no domain left.
pub(super) fn nested_common_checks(c: &mut Checks, o: &RunOutcome, attach_tables: u64) {
    let req = |t: u8| o.device.requests[usize::from(t)];
    c.check(
        req(VIRTIO_IOMMU_T_ATTACH_TABLE) == attach_tables,
        format!(
            "{attach_tables} ATTACH_TABLE requests, got {}",
            req(VIRTIO_IOMMU_T_ATTACH_TABLE)
        ),
    );
    let Some(e) = o.emulated else {
        c.check(false, "the VM has the software nested IOMMU");
        return;
    };
    c.check(
        e.invalidate_calls == o.router.invalidate_calls
            && e.invalidations == o.router.invalidations_sent,
        format!(
            "the software IOMMU got every invalidate call the router made ({} calls, {} invalidations; router {} and {})",
            e.invalidate_calls,
            e.invalidations,
            o.router.invalidate_calls,
            o.router.invalidations_sent
        ),
    );
    c.check(o.router.rollbacks == 0, "no backend call rolled back");
    c.check(o.final_domains == 0, "DETACH ended the table domain");
    c.check(
        e.walks > 0,
        format!("the guest's tables were walked ({} walks)", e.walks),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serial_metric_reads_cycles_per_invalidate() {
        let s = "bench: invalidations=50 cycles_per_invalidate=777\n";
        assert_eq!(serial_metric(s, "cycles_per_invalidate"), Some(777));
    }

    #[test]
    fn serial_metric_reads_the_number_after_the_key() {
        let s = "x\nbench: map_unmap_round_trips=10 cycles_per_map_unmap=12345\n";
        assert_eq!(serial_metric(s, "cycles_per_map_unmap"), Some(12345));
        assert_eq!(serial_metric(s, "map_unmap_round_trips"), Some(10));
        assert_eq!(serial_metric(s, "missing"), None);
    }
}

//! Snapshot and restore of the device: features, config space and both
//! queues here, the vIOMMU behind them in [`crate::viommu`].
//!
//! Everything is checked before anything changes; the vIOMMU's part is
//! all or nothing on its own. Counters ([`super::DeviceStats`]) are not
//! part of a snapshot: they are the VMM's, not the guest's.

use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemory;

use super::{bit, VirtioInterrupt, VirtioIommu, VIRTIO_RING_F_EVENT_IDX};
use crate::snapshot::{
    check_version, ConfigSnapshot, DeviceSnapshot, QueueSnapshot, SnapshotError, SNAPSHOT_VERSION,
};
use crate::wire::{EVENT_QUEUE, REQUEST_QUEUE, VIRTIO_IOMMU_F_BYPASS_CONFIG};

impl VirtioIommu {
    /// Everything the guest can observe of the device. Call it with the
    /// VMM's vCPUs and device threads paused, between two notifications.
    pub fn snapshot(&self) -> Result<DeviceSnapshot, SnapshotError> {
        // Deferred INVALIDATEs live only inside one `process_requestq`
        // call; between calls there are none.
        if !self.pending.is_empty() {
            return Err(SnapshotError::Busy(self.pending.len()));
        }
        let c = self.config;
        Ok(DeviceSnapshot {
            version: SNAPSHOT_VERSION,
            avail_features: self.avail_features,
            acked_features: self.acked_features,
            config: ConfigSnapshot {
                page_size_mask: c.page_size_mask,
                input_start: c.input_start,
                input_end: c.input_end,
                domain_start: c.domain_start,
                domain_end: c.domain_end,
                probe_size: c.probe_size,
                bypass: c.bypass,
            },
            requestq: self.requestq.as_ref().map(|q| q.state().into()),
            eventq: self.eventq.as_ref().map(|q| q.state().into()),
            viommu: self.viommu.snapshot(),
        })
    }

    /// Restores `snap` into this device, which must be freshly built from
    /// the same config, with the same backends serving the same endpoints
    /// (hot-plugged ones plugged again), and not activated. Queues found
    /// in the snapshot are checked against `mem` and served from now on,
    /// raising `interrupt`. On success the device behaves as the one
    /// snapshotted; the VMM then processes both queues once, in case a
    /// notification was lost in the pause (that request-queue pass also
    /// lets the driver notify again, should the snapshot have been taken
    /// while a worker polled with notifications off). On error the device is as
    /// before the call.
    pub fn restore<M: GuestMemory>(
        &mut self,
        snap: &DeviceSnapshot,
        mem: &M,
        interrupt: Arc<dyn VirtioInterrupt>,
    ) -> Result<(), SnapshotError> {
        check_version(snap.version)?;
        if self.is_activated() {
            return Err(SnapshotError::NotFresh("the device is activated"));
        }
        if snap.avail_features != self.avail_features {
            return Err(SnapshotError::Features {
                snapshot: snap.avail_features,
                device: self.avail_features,
            });
        }
        let acked = snap.acked_features;
        if acked & !self.avail_features != 0 {
            return Err(SnapshotError::AckedNotOffered {
                acked,
                offered: self.avail_features,
            });
        }
        self.check_config(&snap.config)?;
        let queues = match (snap.requestq, snap.eventq) {
            (None, None) => None,
            (Some(r), Some(e)) => {
                let event_idx = acked & bit(VIRTIO_RING_F_EVENT_IDX) != 0;
                Some((
                    self.restored_queue(mem, REQUEST_QUEUE, r, event_idx)?,
                    self.restored_queue(mem, EVENT_QUEUE, e, event_idx)?,
                ))
            }
            _ => {
                return Err(SnapshotError::Queue {
                    queue: if snap.requestq.is_none() {
                        REQUEST_QUEUE
                    } else {
                        EVENT_QUEUE
                    },
                    reason: "one queue set up without the other".into(),
                })
            }
        };
        self.viommu.restore_state(&snap.viommu, acked)?;
        // Nothing below can fail.
        self.acked_features = acked;
        self.config.bypass = snap.config.bypass;
        if let Some((r, e)) = queues {
            self.requestq = Some(r);
            self.used = super::used::UsedRing::default();
            self.eventq = Some(e);
            self.interrupt = Some(interrupt);
        }
        self.update_bypass();
        self.viommu.restore_generation(snap.viommu.generation);
        Ok(())
    }

    /// Every config field must be this device's (the driver read them at
    /// probe time and relies on them); `bypass` only where the driver
    /// could have written it.
    fn check_config(&self, c: &ConfigSnapshot) -> Result<(), SnapshotError> {
        let d = self.config;
        let fields: [(&'static str, u64, u64); 6] = [
            ("page_size_mask", c.page_size_mask, d.page_size_mask),
            ("input_range.start", c.input_start, d.input_start),
            ("input_range.end", c.input_end, d.input_end),
            (
                "domain_range.start",
                c.domain_start.into(),
                d.domain_start.into(),
            ),
            ("domain_range.end", c.domain_end.into(), d.domain_end.into()),
            ("probe_size", c.probe_size.into(), d.probe_size.into()),
        ];
        for (field, snapshot, device) in fields {
            if snapshot != device {
                return Err(SnapshotError::Config {
                    field,
                    snapshot,
                    device,
                });
            }
        }
        // spec 5.13.4.2: "The device MUST NOT present a value different
        // than 0 or 1 in bypass"; without BYPASS_CONFIG it never changes.
        let writable = self.avail_features & bit(VIRTIO_IOMMU_F_BYPASS_CONFIG) != 0;
        if c.bypass > 1 || (!writable && c.bypass != d.bypass) {
            return Err(SnapshotError::Config {
                field: "bypass",
                snapshot: c.bypass.into(),
                device: d.bypass.into(),
            });
        }
        Ok(())
    }

    /// A queue from its snapshot, valid in `mem` as `activate` requires.
    fn restored_queue<M: GuestMemory>(
        &self,
        mem: &M,
        queue: u16,
        s: QueueSnapshot,
        event_idx: bool,
    ) -> Result<Queue, SnapshotError> {
        let bad = |reason: String| SnapshotError::Queue { queue, reason };
        let max = self.queue_max_sizes()[usize::from(queue)];
        if s.max_size != max {
            return Err(bad(format!(
                "maximum size {} is not the device's {max}",
                s.max_size
            )));
        }
        if s.event_idx_enabled != event_idx {
            return Err(bad("EVENT_IDX use differs from the features".into()));
        }
        let q =
            Queue::try_from(virtio_queue::QueueState::from(s)).map_err(|e| bad(format!("{e}")))?;
        if !q.is_valid(mem) {
            return Err(bad(
                "not ready, or rings misaligned or outside guest memory".into(),
            ));
        }
        Ok(q)
    }
}

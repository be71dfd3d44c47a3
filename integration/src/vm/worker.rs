//! Notifications through ioeventfds, served by a device worker thread.
//!
//! Where KVM offers KVM_CAP_IOEVENTFD, a QueueNotify write of a queue's
//! index (32 bits wide, as the transport requires) is matched inside KVM
//! and signals that queue's eventfd instead of exiting to the VMM; the
//! vCPU goes straight back to the guest. [`Notifier`] registers the two
//! eventfds (one per queue, with a datamatch on the index) when the driver
//! sets DRIVER_OK and unregisters them when it resets the device: before
//! activation, and for any other value or width, the write still exits and
//! the transport serves (or ignores and counts) it as before.
//!
//! [`Worker`] is the thread that serves them. It waits with epoll on the
//! two notification eventfds, the vIOMMU's fault eventfd and a stop
//! eventfd; for each one that fired it clears the count, takes the
//! transport's lock ([`SharedIommu`]) and runs one pass: the request
//! queue, the event queue, or fault delivery. The lock is held for one
//! pass only, so the vCPU thread's register accesses and its fault
//! delivery after a DMA interleave with whole passes.
//!
//! After a request-queue pass the worker polls the request queue for a
//! short, adaptive window before it sleeps again
//! ([`vmm_iommu::AdaptivePoll`], QEMU's IOThread polling): a driver that
//! sends its next request soon (an UNMAP right after a MAP) finds the
//! worker awake instead of paying its wake-up. Each look takes the lock
//! for one load of the avail index. While it polls, the device asks the
//! driver for no notifications (`VIRTQ_USED_F_NO_NOTIFY`, or the avail
//! event with EVENT_IDX), so such a driver does not even exit to notify;
//! they go back on before the worker sleeps.
//!
//! Ordering: the guest polls its used rings, and the device writes a
//! request's status (and applies it, PAGE_RESP and invalidations
//! included) before it publishes the used index (virtio-queue's `add_used`
//! stores the index with release ordering), so a guest that sees the used
//! entry sees the status, and a later exit sees the request applied.
//!
//! Nothing the guest does ends the worker: a queue the device cannot go on
//! with is the transport's DEVICE_NEEDS_RESET, a kick after a reset is
//! dropped as stale. The worker ends when the VM's run ends, however it
//! ends: dropping the [`Worker`] writes the stop eventfd and joins the
//! thread.

use std::fmt;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::thread::{self, JoinHandle};

use kvm_ioctls::{Cap, IoEventAddress, Kvm, VmFd};
use log::{debug, warn};
use vm_memory::GuestMemoryMmap;
use vmm_iommu::wire::{EVENT_QUEUE, REQUEST_QUEUE};
use vmm_iommu::AdaptivePoll;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::iommu::SharedIommu;
use super::virtio_mmio::regs;

/// How queue notifications reach the device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NotifyPath {
    /// Ioeventfds, served by the device worker thread.
    Ioeventfd,
    /// QueueNotify writes exit to the VMM and are served on the vCPU
    /// thread before the write returns.
    MmioExit {
        /// Why the ioeventfd path is not used.
        reason: String,
    },
}

impl fmt::Display for NotifyPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NotifyPath::Ioeventfd => f.write_str("ioeventfd(worker thread)"),
            NotifyPath::MmioExit { .. } => f.write_str("mmio-exit"),
        }
    }
}

impl NotifyPath {
    /// Why the fallback ran (`None` on the ioeventfd path).
    pub fn fallback_reason(&self) -> Option<&str> {
        match self {
            NotifyPath::Ioeventfd => None,
            NotifyPath::MmioExit { reason } => Some(reason),
        }
    }
}

/// The queues' notification eventfds and their registration with KVM.
#[derive(Debug)]
pub struct Notifier {
    /// Indexed by queue (request queue, event queue).
    kicks: [EventFd; 2],
    addr: u64,
    armed: bool,
    /// Set when a registration failed: the run stays on the exit path.
    failed: Option<String>,
}

impl Notifier {
    /// The eventfds for the QueueNotify register of the window at `base`,
    /// if `want` and KVM offers ioeventfds; otherwise why not.
    pub fn new(kvm: &Kvm, base: u64, want: bool) -> Result<Self, NotifyPath> {
        let exit = |reason: String| NotifyPath::MmioExit { reason };
        if !want {
            return Err(exit("ioeventfd turned off by the VMM options".into()));
        }
        if !kvm.check_extension(Cap::Ioeventfd) {
            return Err(exit("KVM offers no ioeventfd (KVM_CAP_IOEVENTFD)".into()));
        }
        let new = || EventFd::new(EFD_NONBLOCK).map_err(|e| exit(format!("eventfd: {e}")));
        Ok(Notifier {
            kicks: [new()?, new()?],
            addr: base + regs::QUEUE_NOTIFY,
            armed: false,
            failed: None,
        })
    }

    /// The path that ran: the exit path if a registration failed.
    pub fn path(&self) -> NotifyPath {
        match &self.failed {
            None => NotifyPath::Ioeventfd,
            Some(e) => NotifyPath::MmioExit {
                reason: format!("ioeventfd registration failed, fell back: {e}"),
            },
        }
    }

    /// Clones of the eventfds for the worker, indexed by queue.
    pub fn kicks(&self) -> std::io::Result<[EventFd; 2]> {
        Ok([self.kicks[0].try_clone()?, self.kicks[1].try_clone()?])
    }

    fn datamatch(queue: usize) -> u32 {
        // Two queues: the index fits.
        queue as u32
    }

    /// Registers the eventfds (the driver set DRIVER_OK). On failure the
    /// run falls back to the exit path for good.
    pub fn arm(&mut self, vm: &VmFd) {
        if self.armed || self.failed.is_some() {
            return;
        }
        let at = IoEventAddress::Mmio(self.addr);
        for (q, evt) in self.kicks.iter().enumerate() {
            if let Err(e) = vm.register_ioevent(evt, &at, Self::datamatch(q)) {
                warn!("ioeventfd for queue {q} not registered, notifications exit: {e}");
                for (done, evt) in self.kicks.iter().enumerate().take(q) {
                    let _ = vm.unregister_ioevent(evt, &at, Self::datamatch(done));
                }
                self.failed = Some(format!("KVM_IOEVENTFD for queue {q}: {e}"));
                return;
            }
        }
        self.armed = true;
    }

    /// Unregisters the eventfds (the driver reset the device) and drops
    /// kicks the worker has not read yet: they were for the old queues.
    pub fn disarm(&mut self, vm: &VmFd) {
        if !self.armed {
            return;
        }
        let at = IoEventAddress::Mmio(self.addr);
        for (q, evt) in self.kicks.iter().enumerate() {
            if let Err(e) = vm.unregister_ioevent(evt, &at, Self::datamatch(q)) {
                // KVM keeps signalling it; the transport drops kicks that
                // find the device reset, so only efficiency suffers.
                warn!("ioeventfd for queue {q} not unregistered: {e}");
            }
            // Non-blocking: EAGAIN when nothing was pending.
            let _ = evt.read();
        }
        self.armed = false;
    }
}

/// What the worker did, for the VMM's report.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WorkerStats {
    /// Returns from `epoll_wait` with events.
    pub wakeups: u64,
    /// Kicks served, by queue (several guest writes may make one kick).
    pub kicks: [u64; 2],
    /// Times the fault eventfd fired.
    pub fault_wakeups: u64,
    /// Polls of the request queue after a pass, and those that found
    /// requests (each one a wake-up the guest did not have to pay).
    pub polls: (u64, u64),
    /// Whether the thread stopped because it was told to (not on an
    /// error of its own).
    pub stopped: bool,
    /// The error that ended the thread early, if one did.
    pub error: Option<String>,
}

/// epoll tokens.
const TOKEN_REQUESTQ: u64 = 0;
const TOKEN_EVENTQ: u64 = 1;
const TOKEN_FAULTS: u64 = 2;
const TOKEN_STOP: u64 = 3;

/// The device worker thread; dropping it stops and joins the thread.
#[derive(Debug)]
pub struct Worker {
    stop: EventFd,
    handle: Option<JoinHandle<WorkerStats>>,
}

impl Worker {
    /// Starts the worker on `kicks` (by queue) and `faults`, serving
    /// `dev` over `mem`.
    pub fn spawn(
        dev: Arc<SharedIommu>,
        mem: GuestMemoryMmap,
        kicks: [EventFd; 2],
        faults: EventFd,
    ) -> std::io::Result<Self> {
        let stop = EventFd::new(EFD_NONBLOCK)?;
        let epoll = Epoll::new()?;
        let sources = [
            (kicks[0].as_raw_fd(), TOKEN_REQUESTQ),
            (kicks[1].as_raw_fd(), TOKEN_EVENTQ),
            (faults.as_raw_fd(), TOKEN_FAULTS),
            (stop.as_raw_fd(), TOKEN_STOP),
        ];
        for (fd, token) in sources {
            epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, token),
            )?;
        }
        let state = WorkerState {
            dev,
            mem,
            kicks,
            faults,
            epoll,
            poll: AdaptivePoll::default(),
            stats: WorkerStats::default(),
        };
        let handle = thread::Builder::new()
            .name("viommu-worker".into())
            .spawn(move || state.run())?;
        Ok(Worker {
            stop,
            handle: Some(handle),
        })
    }

    /// Stops the thread, waits for it and returns its counters.
    pub fn stop(mut self) -> WorkerStats {
        self.stop_and_join()
    }

    fn stop_and_join(&mut self) -> WorkerStats {
        let Some(h) = self.handle.take() else {
            return WorkerStats::default();
        };
        // An eventfd write fails only when the counter would overflow,
        // i.e. it is already readable: the worker wakes either way.
        let _ = self.stop.write(1);
        h.join().unwrap_or_else(|_| WorkerStats {
            error: Some("the worker thread panicked".into()),
            ..WorkerStats::default()
        })
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

/// What the worker thread owns.
struct WorkerState {
    dev: Arc<SharedIommu>,
    mem: GuestMemoryMmap,
    kicks: [EventFd; 2],
    faults: EventFd,
    epoll: Epoll,
    poll: AdaptivePoll,
    stats: WorkerStats,
}

impl WorkerState {
    fn run(mut self) -> WorkerStats {
        let mut events = [EpollEvent::default(); 4];
        loop {
            let n = match self.epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    warn!("viommu worker: epoll_wait failed, stopping: {e}");
                    self.stats.error = Some(format!("epoll_wait: {e}"));
                    return self.stats;
                }
            };
            self.stats.wakeups += 1;
            self.poll.woke();
            let mut stop = false;
            let mut served_requests = false;
            for ev in &events[..n] {
                match ev.data() {
                    TOKEN_REQUESTQ => served_requests |= self.kick(REQUEST_QUEUE),
                    TOKEN_EVENTQ => {
                        self.kick(EVENT_QUEUE);
                    }
                    TOKEN_FAULTS => self.faults(),
                    _ => stop = true,
                }
            }
            // Events that came with the stop were served first: a kick
            // the guest sent before it ended is not lost.
            if stop {
                self.stats.stopped = true;
                self.stats.polls = self.poll.counts();
                return self.stats;
            }
            if served_requests {
                self.poll_requests();
            }
        }
    }

    /// Serves the request queue for as long as polling finds requests.
    /// Polled passes leave the driver's notifications off, so a guest
    /// publishing while the worker watches does not exit to notify; when
    /// polling ends they go back on, and requests published unannounced
    /// in between are served before the worker sleeps. A kick the driver
    /// sent meanwhile stays in its eventfd: the next `epoll_wait` returns
    /// at once and its pass finds nothing, so none is lost.
    fn poll_requests(&mut self) {
        let (dev, mem) = (&self.dev, &self.mem);
        loop {
            while self
                .poll
                .poll(|| dev.lock().queue_pending(mem, REQUEST_QUEUE))
            {
                let mut t = dev.lock();
                t.serve_polled(mem, REQUEST_QUEUE);
                dev.sample_mappings(&t);
            }
            let mut t = dev.lock();
            if !t.end_polling(mem, REQUEST_QUEUE) {
                return;
            }
            t.serve_polled(mem, REQUEST_QUEUE);
            dev.sample_mappings(&t);
        }
    }

    /// Serves a kick of `queue`, if its eventfd still holds one (the
    /// vCPU thread clears them on reset); returns whether it did.
    fn kick(&mut self, queue: u16) -> bool {
        let i = usize::from(queue);
        if self.kicks[i].read().is_err() {
            debug!("viommu worker: kick of queue {queue} already cleared");
            return false;
        }
        self.stats.kicks[i] += 1;
        let mut t = self.dev.lock();
        t.notify_kick(&self.mem, queue);
        if queue == REQUEST_QUEUE {
            self.dev.sample_mappings(&t);
        }
        true
    }

    /// Delivers fault records a DMA queued (the vCPU thread may have
    /// delivered them already; the device then finds none).
    fn faults(&mut self) {
        self.stats.fault_wakeups += 1;
        // The device clears the eventfd when it drains the records; clear
        // it here too, so a level-triggered wake does not repeat.
        let _ = self.faults.read();
        self.dev.lock().process_pending(&self.mem);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use vm_memory::GuestAddress;
    use vmm_iommu::config::IommuConfig;
    use vmm_iommu::VirtioIommu;

    use crate::vm::virtio_mmio::VirtioMmio;

    fn worker() -> (Worker, [EventFd; 2], Arc<SharedIommu>) {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let dev = VirtioIommu::new(&IommuConfig::default(), &[1], &[(0, (1 << 20) - 1)]).unwrap();
        let faults = dev.fault_eventfd().try_clone().unwrap();
        let shared = Arc::new(SharedIommu::new(VirtioMmio::new(dev)));
        let kicks = [
            EventFd::new(EFD_NONBLOCK).unwrap(),
            EventFd::new(EFD_NONBLOCK).unwrap(),
        ];
        let clones = [kicks[0].try_clone().unwrap(), kicks[1].try_clone().unwrap()];
        let w = Worker::spawn(shared.clone(), mem, clones, faults).unwrap();
        (w, kicks, shared)
    }

    #[test]
    fn kick_of_a_device_never_activated_is_dropped_as_stale_and_the_worker_stops() {
        let (w, kicks, shared) = worker();
        kicks[0].write(1).unwrap();
        // A hang guard, not a speed bound: a count of polls (however long
        // a busy host makes each), after which the worker is broken.
        let mut polls = 0u32;
        while shared.lock().stats().stale_kicks == 0 {
            polls += 1;
            assert!(polls < 120_000, "the worker never served the kick");
            thread::sleep(Duration::from_millis(1));
        }
        let st = w.stop();
        assert!(st.stopped && st.error.is_none(), "{st:?}");
        assert_eq!(st.kicks, [1, 0]);
    }

    #[test]
    fn dropping_the_worker_joins_its_thread() {
        let (w, _kicks, shared) = worker();
        // The worker holds a reference until its thread ends.
        assert_eq!(Arc::strong_count(&shared), 2);
        drop(w);
        assert_eq!(Arc::strong_count(&shared), 1);
    }

    #[test]
    fn paths_print_as_the_report_names_them() {
        assert_eq!(
            NotifyPath::Ioeventfd.to_string(),
            "ioeventfd(worker thread)"
        );
        let p = NotifyPath::MmioExit {
            reason: "why".into(),
        };
        assert_eq!(p.to_string(), "mmio-exit");
        assert_eq!(p.fallback_reason(), Some("why"));
    }
}

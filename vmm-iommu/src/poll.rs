//! Adaptive busy-polling of a queue before its worker thread sleeps.
//!
//! A device thread that goes back to `epoll_wait` as soon as a queue is
//! empty pays a wake-up for the next notification: on a host whose idle
//! cores sleep (and more so in a nested VM, where waking one is an IPI
//! through the outer hypervisor) that costs 5 to 20 µs, several times what
//! a MAP takes to apply. A driver that sends its next requests soon after
//! the last answer (Linux maps a DMA buffer right after it unmapped the
//! previous one) keeps paying it. [`AdaptivePoll`] lets the thread look at
//! the queue for a short window first, and adapts that window to how long
//! the waits actually are, as QEMU's IOThread does (`poll-max-ns`, default
//! 32 µs, in `util/aio-posix.c`):
//!
//! - a wait that ended within the window changes nothing;
//! - a wait longer than the most the thread may poll turns polling off
//!   until waits get short again (polling would only burn the core);
//! - a shorter wait than that, but longer than the window, doubles the
//!   window (from 4 µs), up to the most.
//!
//! A window of zero is the plain worker: one look, then sleep.

use std::time::{Duration, Instant};

/// The window a growing poll starts from (QEMU's first step).
const FIRST_WINDOW: Duration = Duration::from_micros(4);

/// The window's adaptation, and the start of the idle stretch it measures.
#[derive(Clone, Debug)]
pub struct AdaptivePoll {
    max: Duration,
    window: Duration,
    idle_since: Option<Instant>,
    polled: u64,
    hits: u64,
}

impl AdaptivePoll {
    /// The most a worker polls by default: QEMU's `poll-max-ns` default.
    pub const DEFAULT_MAX: Duration = Duration::from_micros(32);

    /// Polls for at most `max` before each sleep (zero: never).
    pub fn new(max: Duration) -> Self {
        AdaptivePoll {
            max,
            window: Duration::ZERO,
            idle_since: None,
            polled: 0,
            hits: 0,
        }
    }

    /// The window the next [`AdaptivePoll::poll`] uses.
    pub fn window(&self) -> Duration {
        self.window
    }

    /// The most the window grows to.
    pub fn max(&self) -> Duration {
        self.max
    }

    /// Polls that ran, and those that found work (for the VMM's report).
    pub fn counts(&self) -> (u64, u64) {
        (self.polled, self.hits)
    }

    /// Calls `ready` until it returns true or the window has passed (at
    /// least once either way). Returns whether it found work; the window
    /// adapts to how long that took. When it returns false the caller
    /// sleeps, and calls [`AdaptivePoll::woke`] when it wakes.
    pub fn poll(&mut self, mut ready: impl FnMut() -> bool) -> bool {
        let start = Instant::now();
        self.polled += 1;
        loop {
            if ready() {
                self.hits += 1;
                self.adapt(start.elapsed());
                return true;
            }
            if start.elapsed() >= self.window {
                self.idle_since = Some(start);
                return false;
            }
            std::hint::spin_loop();
        }
    }

    /// The worker woke from the sleep that followed a fruitless
    /// [`AdaptivePoll::poll`]: the window adapts to the whole wait.
    pub fn woke(&mut self) {
        if let Some(start) = self.idle_since.take() {
            self.adapt(start.elapsed());
        }
    }

    /// QEMU's rule (`adjust_polling_time`), with a shrink that turns
    /// polling off.
    fn adapt(&mut self, waited: Duration) {
        if waited <= self.window {
            // The window caught it: as it should be.
        } else if waited > self.max {
            self.window = Duration::ZERO;
        } else {
            let grown = if self.window.is_zero() {
                FIRST_WINDOW
            } else {
                self.window * 2
            };
            self.window = grown.min(self.max);
        }
    }
}

impl Default for AdaptivePoll {
    fn default() -> Self {
        AdaptivePoll::new(AdaptivePoll::DEFAULT_MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const US: Duration = Duration::from_micros(1);

    #[test]
    fn short_waits_grow_the_window_from_4us_by_doubling_up_to_the_most() {
        let mut p = AdaptivePoll::new(32 * US);
        assert_eq!(p.window(), Duration::ZERO);
        let mut seen = vec![];
        for _ in 0..6 {
            // Each wait is longer than the window (once the window is
            // below the most) but within the most.
            p.adapt((p.window() + US).min(32 * US));
            seen.push(p.window().as_micros());
        }
        assert_eq!(seen, [4, 8, 16, 32, 32, 32]);
    }

    #[test]
    fn a_wait_the_window_caught_leaves_it_alone() {
        let mut p = AdaptivePoll::new(32 * US);
        p.adapt(2 * US);
        assert_eq!(p.window(), 4 * US);
        p.adapt(3 * US);
        assert_eq!(p.window(), 4 * US);
    }

    #[test]
    fn a_wait_longer_than_the_most_turns_polling_off() {
        let mut p = AdaptivePoll::new(32 * US);
        for _ in 0..4 {
            p.adapt(p.window() + US);
        }
        assert_eq!(p.window(), 32 * US);
        p.adapt(33 * US);
        assert_eq!(p.window(), Duration::ZERO);
    }

    #[test]
    fn a_zero_most_never_polls() {
        let mut p = AdaptivePoll::new(Duration::ZERO);
        for _ in 0..4 {
            p.adapt(US);
        }
        assert_eq!(p.window(), Duration::ZERO);
        let mut calls = 0;
        assert!(!p.poll(|| {
            calls += 1;
            false
        }));
        assert_eq!(calls, 1, "a zero window looks once");
    }

    #[test]
    fn poll_returns_as_soon_as_work_is_there() {
        // A window far longer than the test: only `ready` ends the poll.
        let mut p = AdaptivePoll::new(Duration::from_secs(3600));
        p.window = Duration::from_secs(3600);
        let mut calls = 0;
        assert!(p.poll(|| {
            calls += 1;
            calls == 3
        }));
        assert_eq!(calls, 3);
        assert_eq!(p.counts(), (1, 1));
    }

    #[test]
    fn waking_after_a_fruitless_poll_adapts_to_the_whole_wait() {
        let mut p = AdaptivePoll::new(Duration::from_secs(3600));
        assert!(!p.poll(|| false));
        // Whatever the sleep took, it was more than the zero window and
        // less than an hour: the window grows.
        p.woke();
        assert_eq!(p.window(), FIRST_WINDOW);
        // A second wake without a poll before it changes nothing.
        p.woke();
        assert_eq!(p.window(), FIRST_WINDOW);
        assert_eq!(p.counts(), (1, 0));
    }
}

#[cfg(test)]
mod device_tests {
    use crate::config::IommuConfig;
    use crate::testing::Harness;
    use crate::wire::{AttachReq, Request};

    #[test]
    fn requestq_pending_sees_exactly_the_requests_the_device_has_not_taken() {
        let mut h = Harness::new(&IommuConfig::default(), &[1]);
        assert!(!h.dev.requestq_pending(&h.mem), "an empty queue");
        let req = Request::Attach(AttachReq {
            domain: 1,
            endpoint: 1,
            ..Default::default()
        })
        .encode();
        h.queue_raw(&[&req], &[4]);
        assert!(
            !h.dev.requestq_pending(&h.mem),
            "a chain the driver has not published yet"
        );
        h.requestq.kick(&h.mem);
        assert!(h.dev.requestq_pending(&h.mem), "a published chain");
        assert_eq!(h.dev.process_requestq(&h.mem).unwrap(), 1);
        assert!(!h.dev.requestq_pending(&h.mem), "every chain taken");
    }

    fn attach(domain: u32) -> Vec<u8> {
        Request::Attach(AttachReq {
            domain,
            endpoint: 1,
            ..Default::default()
        })
        .encode()
    }

    /// Publishes one ATTACH; returns whether the device asked to be
    /// notified of it.
    fn publish(h: &mut Harness, domain: u32, event_idx: bool) -> bool {
        let old = h.requestq.avail_idx();
        h.queue_raw(&[&attach(domain)], &[4]);
        h.requestq.kick(&h.mem);
        h.requestq.device_wants_notification(&h.mem, old, event_idx)
    }

    /// Spec 2.7.10 (virtio 1.3): the device MAY suppress notifications
    /// (VIRTQ_USED_F_NO_NOTIFY, or the avail event with EVENT_IDX). A
    /// polling worker's pass leaves them off, so requests published while
    /// it polls come without a notification; resuming turns them on again
    /// and reports what was published unannounced, so none is stranded.
    fn polling_suppresses_notifications_until_resumed(event_idx: bool) {
        let mut h = if event_idx {
            Harness::with_features(&IommuConfig::default(), &[1], 16, |d| d.avail_features())
        } else {
            Harness::new(&IommuConfig::default(), &[1])
        };
        assert!(
            publish(&mut h, 1, event_idx),
            "notifications are on at first"
        );
        assert_eq!(h.dev.process_requestq_polling(&h.mem).unwrap(), 1);
        assert!(
            !publish(&mut h, 2, event_idx),
            "the device polls: no notification wanted"
        );
        assert_eq!(h.dev.process_requestq_polling(&h.mem).unwrap(), 1);
        assert!(!publish(&mut h, 3, event_idx), "still polling");
        // The worker stops polling: the request it did not see is reported,
        // and from now on the driver notifies.
        assert!(h.dev.resume_requestq_notifications(&h.mem).unwrap());
        assert_eq!(h.dev.process_requestq(&h.mem).unwrap(), 1);
        assert!(!h.dev.resume_requestq_notifications(&h.mem).unwrap());
        assert!(publish(&mut h, 4, event_idx), "notifications are on again");
        // A plain pass after a polling one leaves them on too.
        assert_eq!(h.dev.process_requestq_polling(&h.mem).unwrap(), 1);
        assert!(!publish(&mut h, 5, event_idx));
        assert_eq!(h.dev.process_requestq(&h.mem).unwrap(), 1);
        assert!(publish(&mut h, 6, event_idx));
        assert_eq!(h.dev.process_requestq(&h.mem).unwrap(), 1);
    }

    #[test]
    fn polling_suppresses_notifications_until_resumed_with_no_notify() {
        polling_suppresses_notifications_until_resumed(false);
    }

    #[test]
    fn polling_suppresses_notifications_until_resumed_with_event_idx() {
        polling_suppresses_notifications_until_resumed(true);
    }

    #[test]
    fn resuming_before_activation_is_a_no_op() {
        let mut h = Harness::new(&IommuConfig::default(), &[1]);
        h.dev.reset();
        assert!(!h.dev.resume_requestq_notifications(&h.mem).unwrap());
    }
}

//! The watchdog: ends a vCPU that runs past its deadline.
//!
//! A guest spinning at CPL3 never exits, so `KVM_RUN` only returns when a
//! signal interrupts it. The watchdog thread sends the vCPU thread a
//! real-time signal (with a handler that does nothing, installed without
//! SA_RESTART, so `KVM_RUN` fails with EINTR) once the deadline passes,
//! and again every few milliseconds until the vCPU loop stops: a signal
//! that lands just before the thread enters `KVM_RUN` is lost, the next
//! one is not.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;
use std::thread;
use std::time::{Duration, Instant};

use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

/// How often the watchdog repeats the signal after the deadline.
const KICK_INTERVAL: Duration = Duration::from_millis(5);

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// The signal used to kick vCPU threads, with its handler installed once
/// per process.
fn kick_signal() -> Result<libc::c_int, std::io::Error> {
    static INSTALLED: OnceLock<Result<libc::c_int, i32>> = OnceLock::new();
    let r = INSTALLED.get_or_init(|| {
        let sig = SIGRTMIN();
        register_signal_handler(sig, kick_handler)
            .map(|()| sig)
            .map_err(|e| e.errno())
    });
    r.map_err(std::io::Error::from_raw_os_error)
}

/// The state the vCPU loop and the watchdog share.
#[derive(Debug, Default)]
pub struct Watch {
    expired: AtomicBool,
    done: AtomicBool,
}

impl Watch {
    /// Whether the deadline has passed.
    pub fn expired(&self) -> bool {
        self.expired.load(Ordering::Acquire)
    }
}

/// Runs `body` on the current thread with a watchdog that kicks it out of
/// `KVM_RUN` once `timeout` has passed; `body` sees the expiry through the
/// [`Watch`] it is given. The watchdog thread ("viommu-watchdog") is
/// joined before this returns. Fails, without running `body`, if the
/// signal cannot be installed or the thread cannot be started.
pub fn run_with_watchdog<T>(
    timeout: Duration,
    body: impl FnOnce(&Watch) -> T,
) -> Result<T, std::io::Error> {
    let sig = kick_signal()?;
    // SAFETY: pthread_self has no preconditions; it names the calling
    // thread, which outlives the scope below (the scope joins the
    // watchdog before this function returns).
    let vcpu_thread = unsafe { libc::pthread_self() };
    let watch = Watch::default();
    let deadline = Instant::now() + timeout;
    thread::scope(|s| {
        let dog = thread::Builder::new()
            .name("viommu-watchdog".into())
            .spawn_scoped(s, || {
                while !watch.done.load(Ordering::Acquire) {
                    let now = Instant::now();
                    if now < deadline {
                        thread::park_timeout(deadline - now);
                        continue;
                    }
                    watch.expired.store(true, Ordering::Release);
                    // SAFETY: `vcpu_thread` is alive: it is blocked in this
                    // scope until the watchdog is joined, and `done` is set
                    // before that. The signal has a handler (installed above)
                    // that does nothing.
                    unsafe { libc::pthread_kill(vcpu_thread, sig) };
                    thread::park_timeout(KICK_INTERVAL);
                }
            })?;
        let out = body(&watch);
        watch.done.store(true, Ordering::Release);
        dog.thread().unpark();
        Ok(out)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_that_finishes_in_time_never_sees_expiry() {
        let r = run_with_watchdog(Duration::from_secs(5), |w| w.expired()).unwrap();
        assert!(!r);
    }

    #[test]
    fn blocked_body_is_interrupted_after_the_deadline() {
        let start = Instant::now();
        let r = run_with_watchdog(Duration::from_millis(50), |w| {
            while !w.expired() {
                // A blocking syscall interrupted by the signal (EINTR), as
                // KVM_RUN would be.
                std::thread::sleep(Duration::from_millis(1));
            }
            true
        })
        .unwrap();
        assert!(r);
        assert!(start.elapsed() >= Duration::from_millis(50));
    }
}

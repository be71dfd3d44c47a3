//! Which backend serves which endpoint, and the fan-out of one request to
//! the backends of a domain's endpoints.
//!
//! An endpoint without a backend is translated by the vIOMMU state itself
//! (MAP mode for emulated devices, [`crate::translate`]); it cannot bind a
//! table because nothing would walk it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::backend::{BackendCaps, BackendError, EndpointId, IommuBackend};
use crate::state::RequestError;

/// Counters of the router's work, for the VMM's report and benchmarks.
#[derive(Debug, Default)]
pub struct RouterStats {
    /// Generic invalidations received from the guest.
    pub invalidations: AtomicU64,
    /// `IommuBackend::invalidate` calls made.
    pub invalidate_calls: AtomicU64,
    /// Invalidations passed in those calls (after coalescing).
    pub invalidations_sent: AtomicU64,
    /// Other backend calls (attach, map, bind...).
    pub other_calls: AtomicU64,
    /// Requests undone because a backend failed.
    pub rollbacks: AtomicU64,
    /// Backend failures outside a request (reset, bypass changes), logged.
    pub backend_failures: AtomicU64,
}

impl RouterStats {
    /// A plain copy of the counters.
    pub fn snapshot(&self) -> RouterCounts {
        RouterCounts {
            invalidations: self.invalidations.load(Ordering::Relaxed),
            invalidate_calls: self.invalidate_calls.load(Ordering::Relaxed),
            invalidations_sent: self.invalidations_sent.load(Ordering::Relaxed),
            other_calls: self.other_calls.load(Ordering::Relaxed),
            rollbacks: self.rollbacks.load(Ordering::Relaxed),
            backend_failures: self.backend_failures.load(Ordering::Relaxed),
        }
    }
}

/// A copy of [`RouterStats`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RouterCounts {
    /// Generic invalidations received from the guest.
    pub invalidations: u64,
    /// `IommuBackend::invalidate` calls made.
    pub invalidate_calls: u64,
    /// Invalidations passed in those calls (after coalescing).
    pub invalidations_sent: u64,
    /// Other backend calls.
    pub other_calls: u64,
    /// Requests undone because a backend failed.
    pub rollbacks: u64,
    /// Endpoints blocked because a backend could not detach them (device
    /// reset), and backend bypass changes that failed: each one logged.
    pub backend_failures: u64,
}

/// Which backend serves which endpoint. Behind a lock because endpoints
/// are plugged and unplugged while the device runs; the vIOMMU only
/// changes it under its state's write lock, so a request sees one
/// routing from start to end.
#[derive(Default)]
struct Routes {
    backends: Vec<Arc<dyn IommuBackend>>,
    by_endpoint: HashMap<EndpointId, usize>,
}

/// The backends of one vIOMMU and the endpoints each serves.
#[derive(Default)]
pub struct Router {
    routes: RwLock<Routes>,
    /// Whether `routes` lists a backend: set once the first one is added
    /// and never cleared (backends stay registered). MAP and UNMAP read it
    /// on every request, so they do not take the routes' lock (two atomic
    /// read-modify-writes, a third of a MAP-mode request's cost) when no
    /// backend exists.
    has_backends: AtomicBool,
    /// Work counters.
    pub stats: RouterStats,
}

impl std::fmt::Debug for Router {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let r = self.read();
        let names: Vec<&str> = r.backends.iter().map(|b| b.name()).collect();
        f.debug_struct("Router")
            .field("backends", &names)
            .field("endpoints", &r.by_endpoint.len())
            .finish()
    }
}

impl Router {
    /// A router with no backend: every endpoint is translated in MAP mode
    /// by the state.
    pub fn new() -> Self {
        Router::default()
    }

    fn read(&self) -> RwLockReadGuard<'_, Routes> {
        // Every update below leaves the routes whole, so a poisoned lock
        // still holds a usable table.
        self.routes.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, Routes> {
        self.routes.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes `backend` serve `endpoints` (replacing any earlier choice for
    /// them).
    pub fn add(&mut self, backend: Arc<dyn IommuBackend>, endpoints: &[EndpointId]) {
        let r = self.routes.get_mut().unwrap_or_else(|p| p.into_inner());
        let idx = r.backends.len();
        r.backends.push(backend);
        for &ep in endpoints {
            r.by_endpoint.insert(ep, idx);
        }
        *self.has_backends.get_mut() = true;
    }

    /// Makes `backend` serve the hot-plugged `ep`; a backend already
    /// registered (the same `Arc`) is reused rather than listed twice.
    pub(crate) fn plug(&self, ep: EndpointId, backend: Arc<dyn IommuBackend>) {
        let mut r = self.write();
        let idx = match r.backends.iter().position(|b| Arc::ptr_eq(b, &backend)) {
            Some(i) => i,
            None => {
                r.backends.push(backend);
                r.backends.len() - 1
            }
        };
        r.by_endpoint.insert(ep, idx);
        self.has_backends.store(true, Ordering::Release);
    }

    /// Forgets the unplugged `ep`; returns the backend that served it. The
    /// backend stays registered (its index is what other endpoints use).
    pub(crate) fn unplug(&self, ep: EndpointId) -> Option<Arc<dyn IommuBackend>> {
        let mut r = self.write();
        let idx = r.by_endpoint.remove(&ep)?;
        r.backends.get(idx).cloned()
    }

    /// Whether no backend is registered (the MAP-mode fast path).
    pub fn is_empty(&self) -> bool {
        !self.has_backends.load(Ordering::Acquire)
    }

    /// The backend serving `ep`.
    pub fn backend(&self, ep: EndpointId) -> Option<Arc<dyn IommuBackend>> {
        let r = self.read();
        r.by_endpoint.get(&ep).map(|&i| Arc::clone(&r.backends[i]))
    }

    /// What `ep`'s backend offers, if it has one.
    pub fn caps(&self, ep: EndpointId) -> Option<BackendCaps> {
        self.backend(ep).map(|b| b.caps(ep))
    }

    /// The distinct backends serving `endpoints`, in registration order.
    pub fn backends_of(&self, endpoints: &[EndpointId]) -> Vec<Arc<dyn IommuBackend>> {
        let r = self.read();
        let mut idx: Vec<usize> = endpoints
            .iter()
            .filter_map(|ep| r.by_endpoint.get(ep).copied())
            .collect();
        idx.sort_unstable();
        idx.dedup();
        idx.into_iter()
            .map(|i| Arc::clone(&r.backends[i]))
            .collect()
    }

    /// Every backend.
    pub fn all(&self) -> Vec<Arc<dyn IommuBackend>> {
        self.read().backends.clone()
    }

    /// Every backend with the endpoints it serves now (sorted), in
    /// registration order.
    pub fn all_with_endpoints(&self) -> Vec<(Arc<dyn IommuBackend>, Vec<EndpointId>)> {
        let r = self.read();
        let mut out: Vec<(Arc<dyn IommuBackend>, Vec<EndpointId>)> = r
            .backends
            .iter()
            .map(|b| (Arc::clone(b), Vec::new()))
            .collect();
        for (&ep, &i) in &r.by_endpoint {
            out[i].1.push(ep);
        }
        for (_, eps) in &mut out {
            eps.sort_unstable();
        }
        out
    }

    pub(crate) fn count_call(&self) {
        self.stats.other_calls.fetch_add(1, Ordering::Relaxed);
    }

    /// Whether `backend` (this very `Arc`) is registered.
    pub(crate) fn has(&self, backend: &Arc<dyn IommuBackend>) -> bool {
        self.read().backends.iter().any(|b| Arc::ptr_eq(b, backend))
    }

    /// Calls `forward` on every backend, in registration order, whether it
    /// serves endpoints now or not (a change to guest memory concerns all
    /// of them). If one fails, `back` undoes `forward` on those before it,
    /// last first, and the failing backend's name and error are returned:
    /// all backends or none. An undo that fails too is logged; `what`
    /// names the change there.
    pub(crate) fn all_or_none(
        &self,
        what: &str,
        forward: impl Fn(&dyn IommuBackend) -> Result<(), BackendError>,
        back: impl Fn(&dyn IommuBackend) -> Result<(), BackendError>,
    ) -> Result<(), (String, BackendError)> {
        let backends = self.all();
        for (i, b) in backends.iter().enumerate() {
            self.count_call();
            if let Err(e) = forward(b.as_ref()) {
                for done in backends[..i].iter().rev() {
                    self.count_call();
                    if let Err(u) = back(done.as_ref()) {
                        log::error!(
                            "virtio-iommu: backend {} cannot undo {what}: {u}",
                            done.name()
                        );
                    }
                }
                self.stats.rollbacks.fetch_add(1, Ordering::Relaxed);
                return Err((b.name().to_string(), e));
            }
        }
        Ok(())
    }
}

/// The request error for a backend failure.
pub(crate) fn backend_error(b: &dyn IommuBackend, e: &BackendError) -> RequestError {
    RequestError::Backend {
        backend: b.name().to_string(),
        message: e.to_string(),
        status: e.status(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{BackendCall, RecordingBackend};

    fn recorder(name: &str) -> Arc<RecordingBackend> {
        Arc::new(RecordingBackend::new(
            name,
            BackendCaps::map_only(!0xfff, (0, u64::MAX)),
        ))
    }

    #[test]
    fn all_or_none_reaches_every_backend_even_one_without_endpoints() {
        let (a, b) = (recorder("a"), recorder("b"));
        let mut r = Router::new();
        r.add(a.clone(), &[1]);
        r.add(b.clone(), &[]);
        let res = r.all_or_none(
            "test",
            |x| {
                x.add_mmio_window(&crate::backend::MmioWindow {
                    gpa: 0,
                    len: 1,
                    hva: None,
                })
            },
            |_| Ok(()),
        );
        assert!(res.is_ok());
        for x in [&a, &b] {
            assert_eq!(x.calls().len(), 1);
        }
        assert_eq!(r.stats.snapshot().other_calls, 2);
    }

    #[test]
    fn all_or_none_undoes_the_backends_before_the_failing_one_last_first() {
        let (a, b, c, d) = (recorder("a"), recorder("b"), recorder("c"), recorder("d"));
        let mut r = Router::new();
        for x in [&a, &b, &c, &d] {
            r.add(x.clone(), &[]);
        }
        c.fail_next(0);
        let order = std::sync::Mutex::new(Vec::new());
        let w = crate::backend::MmioWindow {
            gpa: 0x1000,
            len: 0x1000,
            hva: None,
        };
        let (name, err) = r
            .all_or_none(
                "test",
                |x| x.add_mmio_window(&w),
                |x| {
                    order.lock().unwrap().push(x.name().to_string());
                    x.remove_mmio_window(&w)
                },
            )
            .unwrap_err();
        assert_eq!(name, "c");
        assert_eq!(err.status(), crate::wire::Status::DevErr);
        assert_eq!(*order.lock().unwrap(), ["b", "a"]);
        for x in [&a, &b] {
            assert_eq!(
                x.calls(),
                [
                    BackendCall::AddMmioWindow(w),
                    BackendCall::RemoveMmioWindow(w)
                ]
            );
        }
        // The failing backend and those after it keep nothing.
        assert_eq!(c.calls(), [BackendCall::AddMmioWindow(w)]);
        assert!(d.calls().is_empty());
        assert_eq!(r.stats.snapshot().rollbacks, 1);
    }
}

//! Which backend serves which endpoint, and the fan-out of one request to
//! the backends of a domain's endpoints.
//!
//! An endpoint without a backend is translated by the vIOMMU state itself
//! (MAP mode for emulated devices, [`crate::translate`]); it cannot bind a
//! table because nothing would walk it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
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
        self.read().backends.is_empty()
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
}

/// The request error for a backend failure.
pub(crate) fn backend_error(b: &dyn IommuBackend, e: &BackendError) -> RequestError {
    RequestError::Backend {
        backend: b.name().to_string(),
        message: e.to_string(),
        status: e.status(),
    }
}

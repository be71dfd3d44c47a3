//! Which backend serves which endpoint, and the fan-out of one request to
//! the backends of a domain's endpoints.
//!
//! An endpoint without a backend is translated by the vIOMMU state itself
//! (MAP mode for emulated devices, [`crate::translate`]); it cannot bind a
//! table because nothing would walk it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

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
}

/// The backends of one vIOMMU and the endpoints each serves.
#[derive(Default)]
pub struct Router {
    backends: Vec<Arc<dyn IommuBackend>>,
    by_endpoint: HashMap<EndpointId, usize>,
    /// Work counters.
    pub stats: RouterStats,
}

impl std::fmt::Debug for Router {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.backends.iter().map(|b| b.name()).collect();
        f.debug_struct("Router")
            .field("backends", &names)
            .field("endpoints", &self.by_endpoint.len())
            .finish()
    }
}

impl Router {
    /// A router with no backend: every endpoint is translated in MAP mode
    /// by the state.
    pub fn new() -> Self {
        Router::default()
    }

    /// Makes `backend` serve `endpoints` (replacing any earlier choice for
    /// them).
    pub fn add(&mut self, backend: Arc<dyn IommuBackend>, endpoints: &[EndpointId]) {
        let idx = self.backends.len();
        self.backends.push(backend);
        for &ep in endpoints {
            self.by_endpoint.insert(ep, idx);
        }
    }

    /// Whether no backend is registered (the MAP-mode fast path).
    pub fn is_empty(&self) -> bool {
        self.backends.is_empty()
    }

    /// The backend serving `ep`.
    pub fn backend(&self, ep: EndpointId) -> Option<&Arc<dyn IommuBackend>> {
        self.by_endpoint.get(&ep).map(|&i| &self.backends[i])
    }

    /// What `ep`'s backend offers, if it has one.
    pub fn caps(&self, ep: EndpointId) -> Option<BackendCaps> {
        self.backend(ep).map(|b| b.caps(ep))
    }

    /// The distinct backends serving `endpoints`, in registration order.
    pub fn backends_of(&self, endpoints: &[EndpointId]) -> Vec<&Arc<dyn IommuBackend>> {
        let mut idx: Vec<usize> = endpoints
            .iter()
            .filter_map(|ep| self.by_endpoint.get(ep).copied())
            .collect();
        idx.sort_unstable();
        idx.dedup();
        idx.into_iter().map(|i| &self.backends[i]).collect()
    }

    /// Every backend.
    pub fn all(&self) -> &[Arc<dyn IommuBackend>] {
        &self.backends
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

//! A virtio-iommu device (virtio spec v1.3, device ID 23) for Rust VMMs:
//! the device model over `virtio-queue` and `vm-memory`, a state model that
//! holds every normative rule of the spec, translation for the emulated
//! devices behind it, and the nested extension (guest stage-1 tables),
//! carried out by pluggable backends.
//!
//! # Where to start
//!
//! | you want to | use |
//! |---|---|
//! | put a virtio-iommu in a VM | [`VirtioIommu`]: the device model your virtio-mmio or virtio-pci transport forwards to |
//! | serve its request queue from a worker thread | [`VirtioIommu::process_requestq`] on each kick; or [`VirtioIommu::process_requestq_polling`] with [`AdaptivePoll`] over [`VirtioIommu::requestq_pending`] (the driver need not notify while the thread watches), then [`VirtioIommu::resume_requestq_notifications`] before the thread sleeps again |
//! | configure it | [`IommuConfig`]: the `iommu` section of the VM config, from JSON (`docs/config.md`); a VMM's own config file embeds it with [`config::parse_json`] and [`config::IommuConfig::validate_at`] |
//! | give an emulated device DMA by IOVA | [`Viommu::dma_memory`] (a `vm_memory::GuestMemory` with its own IOTLB), vm-memory's `IommuMemory` over [`Viommu::endpoint_iommu`], or a [`Translator`] for address-by-address use |
//! | put an assigned device behind it | an [`IommuBackend`] (the `vfio-passthrough` crate has VFIO type1 and iommufd ones) in a [`Router`], then [`Viommu::with_router`] |
//! | translate through the guest's own page tables | [`EmulatedIommu`], the software nested IOMMU |
//! | plug or unplug guest RAM, or let DMA reach a device's BAR | [`Viommu::add_ram`] / [`Viommu::remove_ram`], [`Viommu::add_mmio_window`] / [`Viommu::remove_mmio_window`] |
//! | describe it to the guest's firmware | `viot::viot_table`, the ACPI VIOT (cargo feature `acpi`) |
//!
//! # Example
//!
//! The shortest path: a config, the device, a domain with one mapping, and
//! an emulated device's DMA through it. In a VMM the guest's requests
//! arrive through the request queue ([`VirtioIommu::process_requestq`]);
//! here they go to the state directly with [`Viommu::apply`].
//!
//! ```
//! use vm_memory::iommu::IommuMemory;
//! use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
//! use vmm_iommu::config::IommuConfig;
//! use vmm_iommu::ACCESS_READ;
//! use vmm_iommu::wire::{
//!     AttachReq, MapReq, Request, UnmapReq, VIRTIO_IOMMU_MAP_F_READ, VIRTIO_IOMMU_MAP_F_WRITE,
//! };
//! use vmm_iommu::VirtioIommu;
//!
//! // Guest RAM (16 MiB at 0) and the `iommu` section of the VM config.
//! let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)])?;
//! let cfg = IommuConfig::from_json_str(
//!     r#"{ "page_size_mask": ["4K", "2M"],
//!          "input_range": { "start": "0x0", "end": "0xffffffffffff" } }"#,
//! )?;
//!
//! // The device, with endpoint 8 behind it; guest RAM as inclusive ranges.
//! let mut dev = VirtioIommu::new(&cfg, &[8], &[(0, (16 << 20) - 1)])?;
//! // The driver accepts the features (the transport's FEATURES_OK).
//! dev.set_acked_features(dev.avail_features());
//!
//! // The guest's ATTACH and MAP: IOVA 0x1000_0000..=0x1000_ffff -> GPA 0x20_0000.
//! let viommu = dev.viommu();
//! viommu.apply(&Request::Attach(AttachReq { domain: 1, endpoint: 8, ..Default::default() }))?;
//! viommu.apply(&Request::Map(MapReq {
//!     domain: 1,
//!     virt_start: 0x1000_0000,
//!     virt_end: 0x1000_ffff,
//!     phys_start: 0x20_0000,
//!     flags: VIRTIO_IOMMU_MAP_F_READ | VIRTIO_IOMMU_MAP_F_WRITE,
//! }))?;
//!
//! // An emulated device translates address by address ...
//! let mut t = viommu.translator(8);
//! assert_eq!(t.translate(0x1000_0010, ACCESS_READ)?, (0x20_0010, 0xff0));
//!
//! // ... or does its DMA through guest memory as endpoint 8 sees it.
//! let dma = IommuMemory::new(mem.clone(), viommu.endpoint_iommu(8), true, ());
//! dma.write_obj(0xfeed_u32, GuestAddress(0x1000_0100))?;
//! assert_eq!(mem.read_obj::<u32>(GuestAddress(0x20_0100))?, 0xfeed);
//!
//! // After UNMAP the access is refused, and a fault record waits for the
//! // driver's event queue.
//! viommu.apply(&Request::Unmap(UnmapReq {
//!     domain: 1,
//!     virt_start: 0x1000_0000,
//!     virt_end: 0x1000_ffff,
//!     ..Default::default()
//! }))?;
//! assert!(dma.read_obj::<u32>(GuestAddress(0x1000_0100)).is_err());
//! assert_eq!(viommu.faults().len(), 1);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # In a VMM
//!
//! The library owns no thread and no global state. The transport calls
//! [`VirtioIommu::set_acked_features`] on FEATURES_OK,
//! [`VirtioIommu::read_config`] / [`VirtioIommu::write_config`] for config
//! space, [`VirtioIommu::activate`] on DRIVER_OK with the two queues the
//! driver set up, [`VirtioIommu::process_requestq`] on a request-queue
//! notification, [`VirtioIommu::process_eventq`] on an event-queue
//! notification and whenever [`VirtioIommu::fault_eventfd`] is readable,
//! and [`VirtioIommu::reset`] / [`VirtioIommu::system_reset`]. Guest
//! mistakes become virtio-iommu statuses (and counters in
//! [`VirtioIommu::stats`]); only VMM-side faults are [`DeviceError`]s.
//!
//! Two programs show the whole wiring, and build with `cargo build
//! --examples`: `vmm-iommu/examples/emulated_device.rs` (queues from the
//! transport registers, a worker thread on kick and fault eventfds, an
//! emulated virtio device's DMA through `IommuMemory` and `DmaMemory`) and
//! `vfio-passthrough/examples/assigned_device.rs` (the VMM's VFIO objects
//! in a backend, the backend in the router, the vIOMMU over the router).
//!
//! An embedder needs `vm-memory = { version = "0.18", features =
//! ["backend-mmap", "iommu"] }`, `virtio-queue = "0.18"` and
//! `vmm-sys-util = "0.15"` beside this crate.
//!
//! # Layout
//!
//! What an embedder uses is at the crate root: the device
//! ([`VirtioIommu`]) and its shared handle ([`Viommu`]); the state model's
//! answers ([`RequestError`], [`FaultReason`], [`Translation`], and
//! [`IommuState`], the spec's rules without lock or backends); the
//! translators of emulated devices ([`Translator`], [`EndpointIommu`],
//! [`DmaMemory`]); the backend seam ([`IommuBackend`], [`Router`],
//! [`EmulatedIommu`], [`Invalidation`]); the config ([`IommuConfig`]).
//! Seven modules are public because their items come in families an
//! embedder names by module: [`wire`] (the bytes of every request,
//! property and fault), [`config`] (the `iommu` section), [`backend`] (the
//! trait's argument types), [`invalidation`] (the vendor-neutral
//! invalidation), [`nested`] (the guest-table formats and walkers),
//! [`emulated`] (the software nested IOMMU) and [`snapshot`] (the saved
//! form). Everything else (mapping tables, caches, queue handling, the
//! lock-free index) is private. `testing` (cargo feature `test-utils`, as
//! virtio-queue's `mock`) is the driver's side of the queues, for tests,
//! benchmarks and examples; a VMM does not need it.

#![deny(missing_docs)]
// The crate's only `unsafe` blocks are the prefetch hints in `prefetch`
// (for reading and for writing), which never touch memory. Everything else
// is safe Rust.
#![deny(unsafe_code)]
#![deny(unsafe_op_in_unsafe_fn)]

pub mod backend;
pub mod config;
mod device;
mod dirty;
mod dma_memory;
pub mod emulated;
mod fault;
mod idhash;
pub mod invalidation;
mod mapping;
pub mod nested;
mod padded;
mod poll;
mod prefetch;
mod router;
mod slices;
pub mod snapshot;
mod state;
#[cfg(any(test, feature = "test-utils"))]
pub mod testing;
mod translate;
mod viommu;
#[cfg(feature = "acpi")]
pub mod viot;
pub mod wire;

// The device model and its shared handle.
pub use device::{
    DeviceError, DeviceStats, VirtioInterrupt, VirtioIommu, EVENT_QUEUE_SIZE, REQUEST_QUEUE_SIZE,
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
pub use fault::FaultQueue;
pub use poll::AdaptivePoll;
pub use viommu::{
    host_ranges, Applied, HotplugError, MemoryMapError, RamUpdate, RequestRun, Viommu,
};

// The spec's state model: what a request is refused for, what a fault
// says, what a translation is; `IommuState` is also the state alone,
// without lock or backends (what `Viommu::state` shows).
pub use mapping::{Mapping, SplitError};
pub use state::{
    AttachOutcome, EndpointInfo, FaultReason, IommuState, RequestError, ReservedRegionError,
    Translation, ACCESS_READ, ACCESS_WRITE,
};

// DMA of emulated devices by IOVA.
pub use dirty::{take_dirty_pages, DirtyGuard, DirtyIommu};
pub use dma_memory::{DmaMemory, DmaSlices, DMA_TLB_ENTRIES};
pub use translate::{
    EndpointIommu, TranslateError, Translator, ENDPOINT_IOTLB_MAX_RANGES, ENDPOINT_IOTLB_SHARDS,
    TLB_ENTRIES as TRANSLATOR_TLB_ENTRIES,
};

// Backends and the router that fans requests out to them.
pub use backend::{BackendCaps, BackendError, IommuBackend};
pub use emulated::EmulatedIommu;
pub use invalidation::Invalidation;
pub use router::{Router, RouterCounts, RouterStats};

// The `iommu` section of the VM config.
pub use config::{ConfigError, IommuConfig};

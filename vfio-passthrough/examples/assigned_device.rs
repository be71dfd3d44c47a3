//! An assigned (VFIO) device behind the virtio-iommu, wired the way a VMM
//! does it: the VMM's own VFIO objects handed to a backend, the backend
//! registered with the router for the device's endpoint, and the vIOMMU
//! built over that router.
//!
//! ```text
//! cargo run -p vfio-passthrough --example assigned_device                  # recording host
//! cargo run -p vfio-passthrough --example assigned_device -- [--backend type1|iommufd] 0000:65:00.0
//! ```
//!
//! Given a device (a PCI address or its `/sys/bus/pci/devices/...`
//! directory, bound to vfio-pci; as root), it opens the VFIO objects as a
//! VMM's PCI passthrough code would (a type1 container with the device's
//! group, or an iommufd with the device's cdev bound to it), hands them to
//! the real host ([`VfioHost::adopt_type1`], [`VfioHost::adopt_iommufd`],
//! [`VfioHost::adopt_cdev`]) so the backend uses them instead of opening
//! its own, and runs the session below against the kernel.
//!
//! Without a device (this machine has no VFIO) it runs the same session
//! over the recording host, for both backends, checks what the fake kernel
//! holds after each step, and prints every ioctl the backend would have
//! made.
//!
//! The session is the guest's: ATTACH the endpoint to a domain, MAP an
//! IOVA range, UNMAP it, DETACH. The guest's side of the request queue
//! (`vmm_iommu::testing::DriverQueue`) is here only because an example has
//! no guest; a VMM serves the request queue exactly as below
//! (`process_requestq` on a notification), and
//! `vmm-iommu/examples/emulated_device.rs` shows the rest of the transport
//! (queues from the transport registers, a worker thread, fault delivery).
//!
//! Exits 0 only if every step behaved.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use iommufd_ioctls::IommuFd;
use vfio_ioctls::{VfioContainer, VfioDevice, VfioIommufd, VfioOps};
use vfio_passthrough::host::{Handle, HostIommu, Op};
use vfio_passthrough::recording::{FakeIommu, RecordedCall, RecordingHost};
use vfio_passthrough::sys::VfioHost;
use vfio_passthrough::{GuestRam, IommufdBackend, Type1Backend};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_iommu::backend::IommuBackend;
use vmm_iommu::config::IommuConfig;
use vmm_iommu::testing::DriverQueue;
use vmm_iommu::wire::{
    AttachReq, DetachReq, MapReq, Request, Status, UnmapReq, TAIL_SIZE, VIRTIO_IOMMU_MAP_F_READ,
    VIRTIO_IOMMU_MAP_F_WRITE,
};
use vmm_iommu::FaultQueue;
use vmm_iommu::Router;
use vmm_iommu::{Viommu, VirtioIommu};
use vmm_iommu::{VirtioInterrupt, VIRTIO_RING_F_EVENT_IDX};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

/// The `iommu` section of the VM config (docs/config.md).
const IOMMU_JSON: &str = r#"{
    "page_size_mask": ["4K", "2M", "1G"],
    "input_range": { "start": "0x0", "end": "0xffffffffffff" },
    "reserved_regions": [ { "start": "0xfee00000", "end": "0xfeefffff", "kind": "msi" } ]
}"#;

/// The assigned device's endpoint ID (its PCI requester ID, 0000:00:02.0).
const ENDPOINT: u32 = 0x10;
/// Guest RAM: 64 MiB at 0.
const RAM_SIZE: u64 = 64 << 20;
/// What the guest maps: 64 KiB at IOVA 1 MiB onto guest-physical 2 MiB.
const IOVA: u64 = 0x10_0000;
const GPA: u64 = 0x20_0000;
const LEN: u64 = 0x1_0000;
/// The device sysfs path the recording host pretends to open.
const RECORDED_DEVICE: &str = "/sys/bus/pci/devices/0000:65:00.0";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Which {
    Type1,
    Iommufd,
}

/// The backend the VMM built, kept typed for its diagnostics.
enum Backend {
    Type1(Arc<Type1Backend>),
    Iommufd(Arc<IommufdBackend>),
}

impl Backend {
    fn as_dyn(&self) -> Arc<dyn IommuBackend> {
        match self {
            Backend::Type1(b) => b.clone(),
            Backend::Iommufd(b) => b.clone(),
        }
    }
}

// ---------------------------------------------------------------------------
// VMM side.
// ---------------------------------------------------------------------------

/// The real host over VFIO objects the VMM opened itself (its PCI
/// passthrough code needs the same `VfioDevice` for BARs and interrupts,
/// and a cdev binds to one iommufd only), then the backend over that host
/// with the device added as `ENDPOINT`. Returns the backend and the VMM's
/// own reference to the device; the backend's close drops only the host's.
fn real_backend(which: Which, device: &Path, ram: GuestRam) -> Result<(Backend, Arc<VfioDevice>)> {
    let host = Arc::new(VfioHost::new());
    let backend = match which {
        Which::Type1 => {
            let container = Arc::new(VfioContainer::new(None)?);
            let ops: Arc<dyn VfioOps> = container.clone();
            let dev = Arc::new(VfioDevice::new(device, ops, false)?);
            host.adopt_type1(device, container, dev.clone());
            let b = Arc::new(Type1Backend::new(host, ram));
            b.add_endpoint(ENDPOINT, device)?;
            (Backend::Type1(b), dev)
        }
        Which::Iommufd => {
            let fd = Arc::new(IommuFd::new()?);
            let vfio = Arc::new(VfioIommufd::new(fd.clone(), None, None)?);
            let ops: Arc<dyn VfioOps> = vfio.clone();
            let dev = Arc::new(VfioDevice::new(device, ops, false)?);
            host.adopt_iommufd(fd, vfio);
            host.adopt_cdev(device, dev.clone());
            let b = Arc::new(IommufdBackend::new(host, ram)?);
            b.add_endpoint(ENDPOINT, device)?;
            (Backend::Iommufd(b), dev)
        }
    };
    Ok(backend)
}

/// The same over the recording host, which plays a consistent kernel.
fn recorded_backend(which: Which, rec: &Arc<RecordingHost>, ram: GuestRam) -> Result<Backend> {
    let host: Arc<dyn HostIommu> = rec.clone();
    let device = Path::new(RECORDED_DEVICE);
    Ok(match which {
        Which::Type1 => {
            let b = Arc::new(Type1Backend::new(host, ram));
            b.add_endpoint(ENDPOINT, device)?;
            Backend::Type1(b)
        }
        Which::Iommufd => {
            let b = Arc::new(IommufdBackend::new(host, ram)?);
            b.add_endpoint(ENDPOINT, device)?;
            Backend::Iommufd(b)
        }
    })
}

/// The guest polls its used ring, so the example needs no interrupt line.
struct NoInterrupt;

impl VirtioInterrupt for NoInterrupt {
    fn trigger(&self, _queue: u16) -> std::io::Result<()> {
        Ok(())
    }
}

/// What the kernel holds for the endpoint after a step, where the example
/// can see it: the recording host's mappings, or the backend's own record
/// of what the real kernel accepted.
fn host_mappings(backend: &Backend, rec: Option<&RecordingHost>) -> Vec<(u64, u64)> {
    match (backend, rec) {
        (Backend::Type1(b), Some(rec)) => b
            .container_of(ENDPOINT)
            .map(|c| rec.type1_mappings(c))
            .unwrap_or_default(),
        (Backend::Type1(b), None) => b.mapped(ENDPOINT).iter().map(|p| (p.iova, p.len)).collect(),
        (Backend::Iommufd(b), Some(rec)) => b
            .attachments(ENDPOINT)
            .get(&0)
            .map(|&ioas| rec.ioas_mappings(ioas))
            .unwrap_or_default(),
        // The real kernel's IOAS contents are not read back here
        // (vfio_l1.rs does that with probe MAPs).
        (Backend::Iommufd(_), None) => Vec::new(),
    }
}

// ---------------------------------------------------------------------------
// GUEST side: the guest's virtio-iommu driver, which your VMM does not have.
// ---------------------------------------------------------------------------

const REQUESTQ: u64 = 0x1_0000;
const EVENTQ: u64 = 0x2_0000;
const REQUEST_BUF: u64 = 0x3_0000;

struct Guest {
    mem: GuestMemoryMmap,
    requestq: DriverQueue,
}

impl Guest {
    /// Sends one request; the VMM serves the notification on the spot (the
    /// transport's exit path).
    fn send(&mut self, dev: &mut VirtioIommu, req: Request) -> Result<Status> {
        let bytes = req.encode();
        let (out, tail) = (GuestAddress(REQUEST_BUF), GuestAddress(REQUEST_BUF + 0x100));
        self.mem.write_slice(&bytes, out)?;
        self.requestq.add_chain(
            &self.mem,
            &[
                (out, bytes.len() as u32, false),
                (tail, TAIL_SIZE as u32, true),
            ],
        );
        self.requestq.kick(&self.mem);
        // VMM: the QueueNotify write.
        dev.process_requestq(&self.mem)?;
        self.requestq
            .pop_used(&self.mem)
            .ok_or("request not completed")?;
        let s: u8 = self.mem.read_obj(tail)?;
        Ok(Status::from_u8(s).ok_or("unknown status")?)
    }
}

// ---------------------------------------------------------------------------

fn ensure(ok: bool, what: &str) -> Result<()> {
    if ok {
        println!("  check: {what}");
        Ok(())
    } else {
        Err(format!("check failed: {what}").into())
    }
}

/// One session: the vIOMMU over a router that sends `ENDPOINT` to the
/// backend, and the guest's ATTACH, MAP, UNMAP, DETACH.
fn session(which: Which, device: Option<&Path>) -> Result<()> {
    println!(
        "== {which:?} backend over the {} host",
        if device.is_some() {
            "real"
        } else {
            "recording"
        }
    );
    let cfg = IommuConfig::from_json_str(IOMMU_JSON)?;
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), RAM_SIZE as usize)])?;
    // The backend pins and maps guest RAM by its host addresses; the VMM
    // keeps `mem` mapped as long as the backend lives.
    let ram = GuestRam::new(mem.clone())?;
    let rec = device
        .is_none()
        .then(|| Arc::new(RecordingHost::new(FakeIommu::vtd_nesting())));
    // `_vfio_device` stands for the VMM's PCI passthrough code, which
    // keeps using the device (BARs, interrupts) while the backend runs.
    let (backend, _vfio_device) = match (device, &rec) {
        (Some(path), _) => {
            let (b, d) = real_backend(which, path, ram)?;
            (b, Some(d))
        }
        (None, Some(rec)) => (recorded_backend(which, rec, ram)?, None),
        (None, None) => unreachable!("a recording host without a device"),
    };
    let caps = backend.as_dyn().caps(ENDPOINT);
    println!(
        "vmm: backend {} serves endpoint {ENDPOINT:#x}: page sizes {:#x}, input range {:#x}..={:#x}",
        backend.as_dyn().name(),
        caps.page_size_mask,
        caps.input_range.0,
        caps.input_range.1
    );

    // The router: which backend serves which endpoint. Endpoints it does
    // not name (emulated devices) are translated by the vIOMMU itself.
    let mut router = Router::new();
    router.add(backend.as_dyn(), &[ENDPOINT]);
    let faults = Arc::new(FaultQueue::new(cfg.limits.max_pending_faults as usize)?);
    let viommu = Arc::new(Viommu::with_router(
        &cfg,
        &[ENDPOINT],
        &[(0, RAM_SIZE - 1)],
        faults,
        router,
    ));
    let mut dev = VirtioIommu::with_viommu(viommu);
    println!(
        "vmm: config space page_size_mask {:#x} (the config's, narrowed to the backend's)",
        dev.config().page_size_mask
    );

    // GUEST: features and queues; VMM: FEATURES_OK and DRIVER_OK.
    dev.set_acked_features(dev.avail_features() & !(1 << VIRTIO_RING_F_EVENT_IDX));
    let requestq = DriverQueue::new(&mem, GuestAddress(REQUESTQ), 16);
    let eventq = DriverQueue::new(&mem, GuestAddress(EVENTQ), 8);
    dev.activate(
        &mem,
        requestq.device_queue(),
        eventq.device_queue(),
        Arc::new(NoInterrupt),
    )?;
    let mut guest = Guest {
        mem: mem.clone(),
        requestq,
    };

    let mut step = |what: &str, req: Request, want: &[(u64, u64)]| -> Result<()> {
        let status = guest.send(&mut dev, req)?;
        println!("  guest: {what}: {status:?}");
        ensure(status == Status::Ok, &format!("{what} succeeded"))?;
        if device.is_some() && matches!(backend, Backend::Iommufd(_)) {
            return Ok(());
        }
        let held = host_mappings(&backend, rec.as_deref());
        ensure(
            held == want,
            &format!("after {what} the host maps {held:x?}"),
        )
    };
    step(
        "ATTACH endpoint to domain 1",
        Request::Attach(AttachReq {
            domain: 1,
            endpoint: ENDPOINT,
            ..Default::default()
        }),
        &[],
    )?;
    step(
        "MAP IOVA 0x100000..0x10ffff -> GPA 0x200000",
        Request::Map(MapReq {
            domain: 1,
            virt_start: IOVA,
            virt_end: IOVA + LEN - 1,
            phys_start: GPA,
            flags: VIRTIO_IOMMU_MAP_F_READ | VIRTIO_IOMMU_MAP_F_WRITE,
        }),
        &[(IOVA, LEN)],
    )?;
    step(
        "UNMAP it",
        Request::Unmap(UnmapReq {
            domain: 1,
            virt_start: IOVA,
            virt_end: IOVA + LEN - 1,
            ..Default::default()
        }),
        &[],
    )?;
    step(
        "DETACH",
        Request::Detach(DetachReq {
            domain: 1,
            endpoint: ENDPOINT,
        }),
        &[],
    )?;

    if let Some(rec) = &rec {
        println!("vmm: the ioctls the backend made (what a real host would have seen):");
        for c in rec.calls() {
            println!("  {}", describe(&c));
        }
        ensure(
            rec.calls().iter().all(|c| c.result.is_ok()),
            "every recorded call succeeded",
        )?;
        let maps = [Op::Type1MapDma, Op::IoasMap];
        ensure(
            rec.calls().iter().any(|c| maps.contains(&c.op)),
            "the guest's MAP reached the host as a DMA map",
        )?;
    }
    Ok(())
}

fn le(b: &[u8], at: usize, n: usize) -> u64 {
    b.get(at..at + n)
        .map(|s| s.iter().rev().fold(0u64, |v, &x| v << 8 | u64::from(x)))
        .unwrap_or(0)
}

/// One line per recorded call, with the addresses of the DMA maps decoded
/// (offsets from `struct vfio_iommu_type1_dma_{map,unmap}` and
/// `struct iommu_ioas_{map,unmap}`).
fn describe(c: &RecordedCall) -> String {
    let Handle(target) = c.target;
    let detail = match c.op {
        Op::Type1MapDma => format!(
            " iova {:#x} size {:#x} vaddr {:#x}",
            le(&c.arg, 16, 8),
            le(&c.arg, 24, 8),
            le(&c.arg, 8, 8)
        ),
        Op::Type1UnmapDma => format!(
            " iova {:#x} size {:#x}",
            le(&c.arg, 8, 8),
            le(&c.arg, 16, 8)
        ),
        Op::IoasMap => format!(
            " ioas {} iova {:#x} length {:#x}",
            le(&c.arg, 8, 4),
            le(&c.arg, 32, 8),
            le(&c.arg, 24, 8)
        ),
        Op::IoasUnmap => format!(
            " ioas {} iova {:#x} length {:#x}",
            le(&c.arg, 4, 4),
            le(&c.arg, 8, 8),
            le(&c.arg, 16, 8)
        ),
        Op::OpenType1 | Op::OpenIommufd | Op::OpenCdev => {
            format!(" {}", String::from_utf8_lossy(&c.payload))
        }
        _ => String::new(),
    };
    let result = match c.result {
        Ok(()) => "ok".to_string(),
        Err(errno) => format!("errno {errno}"),
    };
    format!(
        "#{:<2} {:<30} -> fd {target}{detail}: {result}",
        c.index,
        c.op.name()
    )
}

fn parse_args() -> Result<(Which, Option<PathBuf>)> {
    let mut which = None;
    let mut device = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--backend" => {
                which = Some(match args.next().as_deref() {
                    Some("type1") => Which::Type1,
                    Some("iommufd") => Which::Iommufd,
                    other => return Err(format!("--backend type1|iommufd, not {other:?}").into()),
                })
            }
            spec if device.is_none() => device = Some(vfio_passthrough::host::sysfs_path(spec)?),
            extra => return Err(format!("unexpected argument {extra:?}").into()),
        }
    }
    if which.is_some() && device.is_none() {
        println!("(no device given: --backend only picks the backend for a real device)");
    }
    Ok((which.unwrap_or(Which::Type1), device))
}

fn run() -> Result<()> {
    let (which, device) = parse_args()?;
    match device {
        Some(path) => {
            if !path.exists() {
                return Err(format!("{} does not exist", path.display()).into());
            }
            session(which, Some(&path))
        }
        None => {
            println!(
                "no device given: running over the recording host (this machine needs no VFIO)"
            );
            session(Which::Type1, None)?;
            session(Which::Iommufd, None)
        }
    }
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => {
            println!("assigned_device: every check passed");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("assigned_device: FAILED: {e}");
            ExitCode::FAILURE
        }
    }
}

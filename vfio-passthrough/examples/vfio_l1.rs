//! The real VFIO backends against a real kernel (issue 15): the test
//! program `scripts/vfio-l1.sh` runs, statically linked, as root inside a
//! QEMU-TCG L1 whose q35 machine has an emulated Intel IOMMU and QEMU's
//! `edu` PCI DMA device bound to vfio-pci.
//!
//! ```text
//! vfio_l1 --backend type1|iommufd --device /sys/bus/pci/devices/0000:00:03.0
//! ```
//!
//! It does what a VMM does: opens the VFIO objects itself (a type1
//! container with the device's group, or an iommufd with the device cdev
//! bound to it), hands them to the backend through `VfioHost::adopt_*`,
//! registers guest RAM (two adjacent anonymous mappings it allocates) and
//! builds the vIOMMU with the backend serving edu's endpoint. Then it
//! drives the virtio-iommu through its request queue
//! (`vmm_iommu::testing::Harness`, the request path of the other tests)
//! and programs edu's DMA engine through the BAR0 mmap of the VFIO device,
//! so the data really moves through the host IOMMU as our backend
//! programmed it. What the kernel maps is read back from the kernel (a
//! probe MAP that the kernel refuses with EEXIST where something is mapped,
//! the IOAS's allowed ranges, `/dev/kmsg` for DMAR faults), not from our
//! bookkeeping.
//!
//! Output: one `VFIO-L1-CHECK <backend>.<name> PASS|FAIL (detail)` line per
//! check, `VFIO-L1-FIG` lines, and `vfio-l1 [<backend>]: N passed, M
//! failed`; the exit status is 1 if any check failed.
//!
//! QEMU 7.2's edu: a transfer is at most 4095 bytes (4096 at the device
//! buffer aborts QEMU), addresses are clamped to 28 bits (every IOVA and
//! GPA used for DMA here is below 256 MiB), and each DMA takes ~100 ms.

use std::fmt::Display;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use iommufd_bindings::iommufd::{
    iommu_hw_info_type_IOMMU_HW_INFO_TYPE_INTEL_VTD, iommu_hwpt_data_type_IOMMU_HWPT_DATA_NONE,
    iommufd_hwpt_alloc_flags_IOMMU_HWPT_ALLOC_NEST_PARENT,
};
use iommufd_ioctls::IommuFd;
use vfio_bindings::bindings::vfio::{
    VFIO_PCI_BAR0_REGION_INDEX, VFIO_PCI_CONFIG_REGION_INDEX, VFIO_REGION_INFO_FLAG_MMAP,
};
use vfio_ioctls::{VfioContainer, VfioDevice, VfioIommufd, VfioOps};
use vfio_passthrough::caps::{
    caps_from_hw, hw_info_request, parse_hw_info, parse_type1_info, type1_info_request, HwKind,
    HW_INFO_DATA_LEN, TYPE1_INFO_BUF,
};
use vfio_passthrough::dma::{
    identity_pieces, ioas_map, ioas_unmap, type1_map, type1_unmap, DmaPiece,
};
use vfio_passthrough::host::{Handle, HostIommu, Ioctl};
use vfio_passthrough::kvm_vfio::{KvmVfio, KvmVfioError};
use vfio_passthrough::ram::RamRegion;
use vfio_passthrough::recording::{FakeIommu, RecordingHost};
use vfio_passthrough::sys::{ioas_iova_ranges, VfioHost};
use vfio_passthrough::{args, GuestRam, IommufdBackend, Type1Backend};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_iommu::backend::IommuBackend;
use vmm_iommu::backend::MmioWindow;
use vmm_iommu::config::{IommuConfig, NestedConfig, TableFormat};
use vmm_iommu::testing::{driver_features, Harness};
use vmm_iommu::wire::{
    AttachReq, AttachTableReq, DetachReq, MapReq, Request, Status, UnmapReq, CONFIG_BYPASS_OFFSET,
    VIRTIO_IOMMU_ATTACH_F_BYPASS, VIRTIO_IOMMU_MAP_F_MMIO, VIRTIO_IOMMU_MAP_F_READ,
    VIRTIO_IOMMU_MAP_F_WRITE, VIRTIO_IOMMU_PROBE_T_PAGE_TABLE_FMT,
    VIRTIO_IOMMU_PROBE_T_PASID_TABLE_FMT, VIRTIO_IOMMU_PROBE_T_RESV_MEM,
    VIRTIO_IOMMU_PSTF_INTEL_VTD, VIRTIO_IOMMU_RESV_MEM_T_RESERVED,
};
use vmm_iommu::{RamUpdate, Router};

/// edu's endpoint ID at the vIOMMU.
const EP: u32 = 8;
/// Guest RAM for the backend: two adjacent regions, separate host mappings.
const RAM1: u64 = 0x0400_0000;
const RAM2: u64 = 0x0500_0000;
const RAM_LEN: u64 = 16 << 20;
/// The harness's own memory (queues, request buffers), below RAM1.
const HARNESS_MIB: u64 = 16;
/// A source page and the destination page after it, in RAM1.
const SRC: u64 = RAM1 + 0x10_0000;
const DST: u64 = SRC + 0x1000;
/// IOVAs (below edu's 28-bit DMA mask).
const IOVA_A: u64 = 0x0010_0000;
const IOVA_B: u64 = 0x0030_0000;
const IOVA_C: u64 = 0x0200_0000;
const IOVA_D: u64 = 0x0060_0000;
/// A DIMM plugged while the guest runs, at a GPA the kernel's IOVA map
/// allows (identity maps for bypass), and the IOVA a MAP points at it.
const DIMM: u64 = 0x0700_0000;
const DIMM_LEN: u64 = 2 << 20;
const IOVA_E: u64 = 0x0080_0000;
/// A guest-physical address for edu's own BAR0 as a peer-to-peer target,
/// and the IOVA that maps it (with `MAP_F_MMIO`).
const BAR_GPA: u64 = 0xc000_0000;
const IOVA_F: u64 = 0x00a0_0000;
/// Four pages straddling the RAM1/RAM2 boundary.
const SPAN_GPA: u64 = RAM2 - 0x2000;
const SPAN_LEN: u64 = 0x4000;
/// x86's MSI window, which the host IOMMU driver reserves.
const MSI_START: u64 = 0xfee0_0000;
const MSI_END: u64 = 0xfeef_ffff;
/// edu: its DMA buffer in device address space, and the transfer size.
const EDU_BUF: u64 = 0x4_0000;
const CNT: usize = 2048;
/// How long to wait for one edu transfer and for a DMAR line.
const DMA_TIMEOUT: Duration = Duration::from_secs(5);
const KMSG_TIMEOUT: Duration = Duration::from_secs(2);
/// MAP+UNMAP pairs timed for the figures.
const FIG_PAIRS: u32 = 500;
/// QEMU 7.2's intel-iommu registers (for the recording host's stand-in).
const QEMU_VTD_CAP: u64 = 0xd2_008c_2226_0286;
const QEMU_VTD_ECAP: u64 = 0xf0_0f4a;

type Res<T> = Result<T, String>;

fn err<E: Display>(what: &str) -> impl FnOnce(E) -> String + '_ {
    move |e| format!("{what}: {e}")
}

// ------------------------------------------------------------------ log

/// Prints the libraries' log lines and keeps them, for the check that the
/// backend says why nesting is off.
struct Logger {
    lines: Mutex<Vec<String>>,
}

static LOGGER: Logger = Logger {
    lines: Mutex::new(Vec::new()),
};

impl log::Log for Logger {
    fn enabled(&self, m: &log::Metadata<'_>) -> bool {
        m.level() <= log::Level::Info
    }

    fn log(&self, r: &log::Record<'_>) {
        if self.enabled(r.metadata()) {
            let line = format!("{} {}: {}", r.level(), r.target(), r.args());
            println!("vfio-l1 [log] {line}");
            self.lines
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(line);
        }
    }

    fn flush(&self) {}
}

fn logged(needle: &str) -> Option<String> {
    LOGGER
        .lines
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .find(|l| l.contains(needle))
        .cloned()
}

// ------------------------------------------------------------------ checks

struct Checks {
    backend: &'static str,
    passed: u32,
    failed: u32,
}

impl Checks {
    fn check(&mut self, name: &str, ok: bool, detail: impl Display) -> bool {
        if ok {
            self.passed += 1;
        } else {
            self.failed += 1;
        }
        let v = if ok { "PASS" } else { "FAIL" };
        println!("VFIO-L1-CHECK {}.{name} {v} ({detail})", self.backend);
        ok
    }

    /// A check that cannot run here, and why (not counted).
    fn skip(&mut self, name: &str, why: &str) {
        println!("VFIO-L1-CHECK {}.{name} SKIP ({why})", self.backend);
    }

    /// A check whose work failed before it could decide.
    fn broken(&mut self, name: &str, e: &str) {
        self.check(name, false, format!("error: {e}"));
    }
}

// ------------------------------------------------------------------ edu

/// QEMU's edu device through its VFIO device: BAR0 mapped, bus mastering on.
struct Edu {
    bar: *mut u8,
    len: usize,
    _dev: Arc<VfioDevice>,
}

impl Edu {
    fn open(dev: Arc<VfioDevice>) -> Res<Edu> {
        // PCI_COMMAND: memory space + bus master (config region, offset 4).
        let mut cmd = [0u8; 2];
        dev.region_read(VFIO_PCI_CONFIG_REGION_INDEX, &mut cmd, 4);
        let c = u16::from_le_bytes(cmd) | 0x6;
        dev.region_write(VFIO_PCI_CONFIG_REGION_INDEX, &c.to_le_bytes(), 4);
        if dev.get_region_flags(VFIO_PCI_BAR0_REGION_INDEX) & VFIO_REGION_INFO_FLAG_MMAP == 0 {
            return Err("BAR0 cannot be mmapped".into());
        }
        let len = dev.get_region_size(VFIO_PCI_BAR0_REGION_INDEX) as usize;
        let off = dev.get_region_offset(VFIO_PCI_BAR0_REGION_INDEX);
        if len < 0x100 {
            return Err(format!(
                "BAR0 is {len:#x} bytes, edu's registers need 0x100"
            ));
        }
        // SAFETY: a new shared mapping of `len` bytes of the device fd at the
        // BAR0 region's offset, placed by the kernel (no address given), so
        // it replaces nothing; the result is checked; the mapping lives until
        // Drop unmaps it, and the device Arc kept beside it keeps the fd open.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                dev.as_raw_fd(),
                off as libc::off_t,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(format!("mmap BAR0: {}", std::io::Error::last_os_error()));
        }
        Ok(Edu {
            bar: p.cast(),
            len,
            _dev: dev,
        })
    }

    fn rd32(&self, off: usize) -> u32 {
        assert!(off + 4 <= self.len && off % 4 == 0);
        // SAFETY: `off` is inside the live BAR0 mapping and 4-aligned (checked
        // above); device registers are read with one volatile access.
        unsafe { std::ptr::read_volatile(self.bar.add(off).cast::<u32>()) }
    }

    fn wr32(&self, off: usize, v: u32) {
        assert!(off + 4 <= self.len && off % 4 == 0);
        // SAFETY: as in `rd32`, one volatile store to a device register.
        unsafe { std::ptr::write_volatile(self.bar.add(off).cast::<u32>(), v) }
    }

    fn rd64(&self, off: usize) -> u64 {
        assert!(off + 8 <= self.len && off % 8 == 0);
        // SAFETY: as in `rd32`, 8-aligned, one volatile 64-bit load (edu's
        // DMA registers are 64 bits wide).
        unsafe { std::ptr::read_volatile(self.bar.add(off).cast::<u64>()) }
    }

    fn wr64(&self, off: usize, v: u64) {
        assert!(off + 8 <= self.len && off % 8 == 0);
        // SAFETY: as in `rd64`, one volatile 64-bit store.
        unsafe { std::ptr::write_volatile(self.bar.add(off).cast::<u64>(), v) }
    }

    /// One transfer: RAM → device buffer (`to_ram` false) or back, at
    /// IOVAs; waits for the engine (edu: 0x80 src, 0x88 dst, 0x90 count,
    /// 0x98 command: bit 0 start/busy, bit 1 device → RAM).
    fn dma(&self, src: u64, dst: u64, cnt: usize, to_ram: bool) -> Res<Duration> {
        assert!(cnt < 4096, "QEMU 7.2's edu aborts on a 4096-byte transfer");
        self.wr64(0x80, src);
        self.wr64(0x88, dst);
        self.wr64(0x90, cnt as u64);
        let t0 = Instant::now();
        self.wr64(0x98, 1 | if to_ram { 2 } else { 0 });
        while self.rd64(0x98) & 1 != 0 {
            if t0.elapsed() > DMA_TIMEOUT {
                return Err(format!("edu DMA {src:#x} -> {dst:#x} did not finish"));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(t0.elapsed())
    }

    /// RAM at `from` → device buffer → RAM at `to`, `cnt` bytes.
    fn copy(&self, from: u64, to: u64, cnt: usize) -> Res<()> {
        self.dma(from, EDU_BUF, cnt, false)?;
        self.dma(EDU_BUF, to, cnt, true)?;
        Ok(())
    }
}

impl Drop for Edu {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping `open` made; nothing uses
        // `bar` after this.
        unsafe { libc::munmap(self.bar.cast(), self.len) };
    }
}

// ------------------------------------------------------------------ kmsg

/// New kernel log lines, from `/dev/kmsg` (opened at its end).
struct Kmsg {
    file: File,
    seen: Vec<String>,
}

impl Kmsg {
    fn open() -> Res<Kmsg> {
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open("/dev/kmsg")
            .map_err(err("open /dev/kmsg"))?;
        file.seek(SeekFrom::End(0)).map_err(err("seek /dev/kmsg"))?;
        Ok(Kmsg {
            file,
            seen: Vec::new(),
        })
    }

    fn poll(&mut self) {
        let mut buf = vec![0u8; 8192];
        loop {
            match self.file.read(&mut buf) {
                Ok(0) => return,
                Ok(n) => {
                    let rec = String::from_utf8_lossy(&buf[..n]);
                    let text = rec.split_once(';').map_or(&*rec, |(_, t)| t);
                    let line = text.lines().next().unwrap_or("").to_string();
                    self.seen.push(line);
                }
                // EPIPE: records were overwritten; the next read goes on.
                Err(e) if e.raw_os_error() == Some(libc::EPIPE) => continue,
                Err(_) => return,
            }
        }
    }

    /// The first new line containing `needle`, waiting up to `KMSG_TIMEOUT`.
    fn wait_for(&mut self, needle: &str) -> Option<String> {
        let t0 = Instant::now();
        loop {
            self.poll();
            if let Some(l) = self.seen.iter().find(|l| l.contains(needle)) {
                return Some(l.clone());
            }
            if t0.elapsed() > KMSG_TIMEOUT {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn dmar_needle(iova: u64) -> String {
    format!("fault addr {:#x}", iova & !0xfff)
}

// ------------------------------------------------------------------ kernel view

/// What the kernel maps, asked of the kernel: a probe MAP over a range is
/// refused with EEXIST where anything is mapped there; if it succeeds,
/// nothing was, and the probe is unmapped again.
struct KernelView {
    host: Arc<VfioHost>,
    kind: ViewKind,
    /// Host memory the probes map (never touched by Rust code).
    scratch: RamRegion,
    _scratch_mem: GuestMemoryMmap,
}

enum ViewKind {
    Type1 { container: Handle },
    Iommufd { iommufd: Handle, fd: Arc<IommuFd> },
}

impl KernelView {
    /// Whether the kernel maps anything in `[iova, iova + len)`: of the
    /// container (type1) or of IOAS `ioas` (iommufd).
    fn mapped(&self, ioas: Option<u32>, iova: u64, len: u64) -> Res<bool> {
        assert!(len <= self.scratch.len);
        let probe = DmaPiece {
            iova,
            hva: self.scratch.hva,
            len,
            read: true,
            write: false,
        };
        let (target, res) = match &self.kind {
            ViewKind::Type1 { container } => (
                *container,
                self.host
                    .ioctl(*container, Ioctl::Type1MapDma(&type1_map(&probe))),
            ),
            ViewKind::Iommufd { iommufd, .. } => {
                let ioas = ioas.ok_or("no IOAS to probe")?;
                (
                    *iommufd,
                    self.host
                        .ioctl(*iommufd, Ioctl::IoasMap(&ioas_map(ioas, &probe))),
                )
            }
        };
        match res {
            Ok(()) => {
                let undo = match &self.kind {
                    ViewKind::Type1 { .. } => self
                        .host
                        .ioctl(target, Ioctl::Type1UnmapDma(&mut type1_unmap(&probe))),
                    ViewKind::Iommufd { .. } => {
                        let ioas = ioas.unwrap_or(0);
                        self.host
                            .ioctl(target, Ioctl::IoasUnmap(&mut ioas_unmap(ioas, &probe)))
                    }
                };
                undo.map_err(err("unmapping the probe"))?;
                Ok(false)
            }
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(true),
            Err(e) => Err(format!("probe map at {iova:#x} (+{len:#x}): {e}")),
        }
    }

    /// Whether IOAS `id` still exists in the kernel (iommufd).
    fn ioas_exists(&self, id: u32) -> Res<bool> {
        let ViewKind::Iommufd { fd, .. } = &self.kind else {
            return Err("not iommufd".into());
        };
        match ioas_iova_ranges(fd, id) {
            Ok(_) => Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
            Err(e) => Err(format!("IOMMU_IOAS_IOVA_RANGES of {id}: {e}")),
        }
    }
}

/// The holes between sorted inclusive ranges.
fn holes(ranges: &[(u64, u64)]) -> Vec<(u64, u64)> {
    ranges
        .windows(2)
        .filter(|w| w[1].0 > w[0].1.saturating_add(1))
        .map(|w| (w[0].1 + 1, w[1].0 - 1))
        .collect()
}

fn fmt_ranges(r: &[(u64, u64)]) -> String {
    let v: Vec<String> = r.iter().map(|(s, e)| format!("{s:#x}..={e:#x}")).collect();
    v.join(" ")
}

// ------------------------------------------------------------------ requests

fn attach(domain: u32, flags: u32) -> Request {
    Request::Attach(AttachReq {
        domain,
        endpoint: EP,
        flags,
        reserved: [0; 4],
    })
}

fn detach(domain: u32) -> Request {
    Request::Detach(DetachReq {
        domain,
        endpoint: EP,
    })
}

fn map_mmio(domain: u32, iova: u64, gpa: u64, len: u64) -> Request {
    Request::Map(MapReq {
        domain,
        virt_start: iova,
        virt_end: iova + len - 1,
        phys_start: gpa,
        flags: VIRTIO_IOMMU_MAP_F_READ | VIRTIO_IOMMU_MAP_F_WRITE | VIRTIO_IOMMU_MAP_F_MMIO,
    })
}

fn map(domain: u32, iova: u64, gpa: u64, len: u64) -> Request {
    Request::Map(MapReq {
        domain,
        virt_start: iova,
        virt_end: iova + len - 1,
        phys_start: gpa,
        flags: VIRTIO_IOMMU_MAP_F_READ | VIRTIO_IOMMU_MAP_F_WRITE,
    })
}

fn unmap(domain: u32, iova: u64, len: u64) -> Request {
    Request::Unmap(UnmapReq {
        domain,
        virt_start: iova,
        virt_end: iova + len - 1,
        reserved: [0; 4],
    })
}

/// Sends requests in order; the statuses, or the first that is not OK.
fn send_all(h: &mut Harness, reqs: &[Request]) -> Res<()> {
    for r in reqs {
        let s = h.send(r);
        if s != Status::Ok {
            return Err(format!("{r:?} -> {s:?}"));
        }
    }
    Ok(())
}

/// PROBE properties: (type, value bytes) in order.
fn probe_props(h: &mut Harness) -> Res<Vec<(u16, Vec<u8>)>> {
    let size = h.dev.config().probe_size;
    let (s, b) = h.probe(EP, size);
    if s != Status::Ok {
        return Err(format!("PROBE -> {s:?}"));
    }
    let mut out = Vec::new();
    let mut at = 0usize;
    while at + 4 <= b.len() {
        let ty = u16::from_le_bytes([b[at], b[at + 1]]) & 0x0fff;
        let len = u16::from_le_bytes([b[at + 2], b[at + 3]]) as usize;
        if ty == 0 {
            break;
        }
        let end = (at + 4 + len).min(b.len());
        out.push((ty, b[at + 4..end].to_vec()));
        at = end;
    }
    Ok(out)
}

fn resv_mem(props: &[(u16, Vec<u8>)]) -> Vec<(u8, u64, u64)> {
    props
        .iter()
        .filter(|(t, v)| *t == VIRTIO_IOMMU_PROBE_T_RESV_MEM && v.len() >= 20)
        .map(|(_, v)| {
            let s = u64::from_le_bytes(v[4..12].try_into().unwrap());
            let e = u64::from_le_bytes(v[12..20].try_into().unwrap());
            (v[0], s, e)
        })
        .collect()
}

// ------------------------------------------------------------------ KVM-VFIO

/// The KVM-VFIO device of a fresh VM on L1's /dev/kvm, or `None` with the
/// check reported skipped (the TCG L1 may have no usable KVM).
fn kvm_vfio_device(c: &mut Checks) -> Option<KvmVfio> {
    let made = kvm_ioctls::Kvm::new()
        .map_err(|e| format!("no /dev/kvm in L1: {e}"))
        .and_then(|k| k.create_vm().map_err(|e| format!("KVM_CREATE_VM: {e}")))
        .and_then(|vm| KvmVfio::create(&vm).map_err(|e| e.to_string()));
    match made {
        Ok(k) => Some(k),
        Err(why) => {
            c.skip("kvm.group_registered", &why);
            None
        }
    }
}

/// The VFIO group fds this process holds (`/proc/self/fd` links to
/// `/dev/vfio/<group>`).
fn vfio_group_fds() -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return Vec::new();
    };
    dir.filter_map(|e| {
        let e = e.ok()?;
        let to = std::fs::read_link(e.path()).ok()?;
        let group = to.to_str()?.strip_prefix("/dev/vfio/")?;
        group.bytes().all(|b| b.is_ascii_digit()).then_some(())?;
        e.file_name().to_str()?.parse().ok()
    })
    .collect()
}

/// The group vfio-ioctls opened is registered with the VM's KVM-VFIO
/// device: adding it again is EEXIST (virt/kvm/vfio.c), while a file that
/// is not VFIO is EINVAL.
fn check_group_registered(k: &KvmVfio, c: &mut Checks) {
    let groups = vfio_group_fds();
    let again: Vec<String> = groups
        .iter()
        .map(|&fd| {
            // SAFETY: `fd` is a VFIO group fd the container opened and
            // keeps open (it holds the group while the device is open,
            // which outlives this call); the borrow ends with the call.
            let g = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
            match k.add_file(g) {
                Ok(()) => "added (was not registered)".to_string(),
                Err(KvmVfioError::Add(e)) if e.raw_os_error() == Some(libc::EEXIST) => {
                    "EEXIST".to_string()
                }
                Err(e) => e.to_string(),
            }
        })
        .collect();
    let null = File::open("/dev/null").map(|f| k.add_file(f.as_fd()));
    let refused =
        matches!(&null, Ok(Err(KvmVfioError::Add(e))) if e.raw_os_error() == Some(libc::EINVAL));
    c.check(
        "kvm.group_registered",
        groups.len() == 1 && again == ["EEXIST"] && refused,
        format!(
            "group fds {groups:?}: KVM_DEV_VFIO_FILE_ADD again -> {again:?}; /dev/null -> {:?}",
            null.map(|r| r.err().map(|e| e.to_string()))
        ),
    );
}

// ------------------------------------------------------------------ the run

#[derive(Clone, Copy, PartialEq, Eq)]
enum Which {
    Type1,
    Iommufd,
}

/// Everything one backend run holds.
struct Rig {
    which: Which,
    device: PathBuf,
    host: Arc<VfioHost>,
    ram: GuestMemoryMmap,
    backend: Arc<dyn IommuBackend>,
    type1: Option<Arc<Type1Backend>>,
    iommufd: Option<Arc<IommufdBackend>>,
    view: KernelView,
    edu: Edu,
    kmsg: Kmsg,
    /// iommufd: the VMM's device (for its iommufd device ID).
    dev: Arc<VfioDevice>,
    /// iommufd: the allowed ranges of a domain IOAS with edu attached.
    ioas_ranges: Option<Vec<(u64, u64)>>,
    /// type1: a second edu, the peer-to-peer target.
    peer: Option<Edu>,
}

/// The peer edu through a VFIO container of its own (no DMA of its own:
/// only its BAR0 is used, as a target).
fn open_peer(path: &Path) -> Res<Edu> {
    let container = Arc::new(VfioContainer::new(None).map_err(err("peer's VFIO container"))?);
    let ops: Arc<dyn VfioOps> = container;
    let dev = Arc::new(VfioDevice::new(path, ops, false).map_err(err("peer's VFIO device"))?);
    Edu::open(dev)
}

impl Rig {
    fn open(which: Which, device: &Path, c: &mut Checks) -> Res<Rig> {
        let host = Arc::new(VfioHost::new());
        let ram = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(RAM1), RAM_LEN as usize),
            (GuestAddress(RAM2), RAM_LEN as usize),
        ])
        .map_err(err("guest RAM"))?;
        let scratch_mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 2 * RAM_LEN as usize)])
            .map_err(err("scratch memory"))?;
        let scratch = GuestRam::new(scratch_mem.clone())
            .map_err(err("scratch memory"))?
            .regions()[0];
        let guest_ram = GuestRam::new(ram.clone()).map_err(err("guest RAM regions"))?;
        // The VMM opens its VFIO objects, then hands them to the host.
        let (dev, backend, type1, iommufd, kind, ours) = match which {
            Which::Type1 => {
                // The VMM registers its own container's group with its VM's
                // KVM-VFIO device (vfio-ioctls does it with the handle).
                let kvm = kvm_vfio_device(c);
                let container = Arc::new(
                    VfioContainer::new(kvm.as_ref().map(KvmVfio::handle))
                        .map_err(err("VFIO container"))?,
                );
                let ops: Arc<dyn VfioOps> = container.clone();
                let dev = Arc::new(
                    VfioDevice::new(device, ops, false).map_err(err("VFIO device (group)"))?,
                );
                if let Some(k) = &kvm {
                    check_group_registered(k, c);
                }
                host.adopt_type1(device, container.clone(), dev.clone());
                let b = Arc::new(Type1Backend::new(host.clone(), guest_ram));
                b.add_endpoint(EP, device)
                    .map_err(err("type1 add_endpoint"))?;
                let ours = Handle(container.as_raw_fd());
                let uses = b.container_of(EP);
                let kind = ViewKind::Type1 { container: ours };
                (
                    dev,
                    b.clone() as Arc<dyn IommuBackend>,
                    Some(b),
                    None,
                    kind,
                    (
                        uses == Some(ours),
                        format!("container fd {ours:?}, backend uses {uses:?}"),
                    ),
                )
            }
            Which::Iommufd => {
                let fd = Arc::new(IommuFd::new().map_err(err("open /dev/iommu"))?);
                let vfio =
                    Arc::new(VfioIommufd::new(fd.clone(), None, None).map_err(err("VfioIommufd"))?);
                let ops: Arc<dyn VfioOps> = vfio.clone();
                let dev = Arc::new(
                    VfioDevice::new(device, ops, false)
                        .map_err(err("VFIO cdev bound to iommufd"))?,
                );
                // The VMM's own stage 2: an IOAS with guest RAM at its GPAs,
                // which the backend uses instead of pinning RAM again.
                let mut a = args::ioas_alloc();
                fd.alloc_iommu_ioas(&mut a)
                    .map_err(err("the VMM's IOMMU_IOAS_ALLOC"))?;
                let vmm_ioas = a.out_ioas_id;
                for p in identity_pieces(guest_ram.regions()) {
                    fd.map_iommu_ioas(&ioas_map(vmm_ioas, &p))
                        .map_err(err("the VMM's IOMMU_IOAS_MAP of guest RAM"))?;
                }
                host.adopt_iommufd(fd.clone(), vfio);
                host.adopt_cdev(device, dev.clone());
                let b = Arc::new(
                    IommufdBackend::with_stage2_ioas(host.clone(), guest_ram, vmm_ioas)
                        .map_err(err("IommufdBackend over the VMM's stage 2"))?,
                );
                c.check(
                    "setup.backend_uses_vmm_stage2",
                    b.gpa_ioas() == vmm_ioas,
                    format!(
                        "the VMM's IOAS {vmm_ioas} holds guest RAM; the backend's stage 2 is {}",
                        b.gpa_ioas()
                    ),
                );
                b.add_endpoint(EP, device)
                    .map_err(err("iommufd add_endpoint"))?;
                let ours = Handle(dev.as_raw_fd());
                let uses = b.device_of(EP);
                let detail = format!(
                    "cdev fd {ours:?} (iommufd dev_id {:?}), backend uses {uses:?}",
                    dev.iommufd_dev_id()
                );
                let kind = ViewKind::Iommufd {
                    iommufd: Handle(fd.as_raw_fd()),
                    fd,
                };
                (
                    dev,
                    b.clone() as Arc<dyn IommuBackend>,
                    None,
                    Some(b),
                    kind,
                    (uses == Some(ours), detail),
                )
            }
        };
        c.check("setup.backend_uses_vmm_objects", ours.0, ours.1);
        let edu = Edu::open(dev.clone())?;
        let id = edu.rd32(0);
        edu.wr32(4, 0x1234_5678);
        let live = edu.rd32(4);
        c.check(
            "setup.edu_bar0_mmap",
            id >> 16 == 0x0100 && id & 0xff == 0xed && live == !0x1234_5678,
            format!("id {id:#x}, liveness ~0x12345678 = {live:#x}"),
        );
        Ok(Rig {
            which,
            device: device.to_path_buf(),
            host: host.clone(),
            ram,
            backend,
            type1,
            iommufd,
            view: KernelView {
                host,
                kind,
                scratch,
                _scratch_mem: scratch_mem,
            },
            edu,
            kmsg: Kmsg::open()?,
            dev,
            ioas_ranges: None,
            peer: None,
        })
    }

    /// A harness (driver + device) whose vIOMMU routes `EP` to the backend.
    fn harness(&self, cfg: &IommuConfig) -> Harness {
        let b = self.backend.clone();
        Harness::with_router(
            cfg,
            &[EP],
            HARNESS_MIB,
            &[(RAM1, RAM2 + RAM_LEN - 1)],
            move |_, _| {
                let mut r = Router::new();
                r.add(b, &[EP]);
                r
            },
            driver_features,
        )
    }

    /// The page table the kernel has edu attached to (iommufd: the domain
    /// IOAS), as the backend reports it.
    fn attached_ioas(&self) -> Option<u32> {
        self.iommufd
            .as_ref()
            .and_then(|b| b.attachments(EP).get(&0).copied())
    }

    fn write(&self, gpa: u64, data: &[u8]) -> Res<()> {
        self.ram
            .write_slice(data, GuestAddress(gpa))
            .map_err(err("write guest RAM"))
    }

    fn read(&self, gpa: u64, len: usize) -> Res<Vec<u8>> {
        let mut b = vec![0u8; len];
        self.ram
            .read_slice(&mut b, GuestAddress(gpa))
            .map_err(err("read guest RAM"))?;
        Ok(b)
    }

    /// Fills `src_gpa` with a pattern and `dst_gpa` with zeros, copies
    /// through edu from `src_iova` to `dst_iova`, and says whether the
    /// pattern arrived.
    fn roundtrip(
        &self,
        seed: u8,
        src_gpa: u64,
        dst_gpa: u64,
        src_iova: u64,
        dst_iova: u64,
    ) -> Res<bool> {
        let pat = pattern(seed, CNT);
        self.write(src_gpa, &pat)?;
        self.write(dst_gpa, &[0u8; CNT])?;
        self.edu.copy(src_iova, dst_iova, CNT)?;
        Ok(self.read(dst_gpa, CNT)? == pat)
    }

    /// Loads edu's buffer from `src_iova` (which must work), fills
    /// `dst_gpa` with 0xaa, has edu write to `dst_iova`, and reports
    /// whether RAM stayed untouched and the DMAR line for `dst_iova`.
    fn blocked_write(
        &mut self,
        src_gpa: u64,
        src_iova: Option<u64>,
        dst_gpa: u64,
        dst_iova: u64,
    ) -> Res<(bool, Option<String>)> {
        if let Some(s) = src_iova {
            self.write(src_gpa, &pattern(0x5a, CNT))?;
            self.edu.dma(s, EDU_BUF, CNT, false)?;
        }
        self.write(dst_gpa, &[0xaau8; CNT])?;
        self.edu.dma(EDU_BUF, dst_iova, CNT, true)?;
        let untouched = self.read(dst_gpa, CNT)?.iter().all(|&b| b == 0xaa);
        let line = self.kmsg.wait_for(&dmar_needle(dst_iova));
        Ok((untouched, line))
    }

    /// Whether anything of the endpoint's current domain is mapped in the
    /// kernel at `[iova, iova + len)`.
    fn kernel_maps(&self, iova: u64, len: u64) -> Res<bool> {
        match self.which {
            Which::Type1 => self.view.mapped(None, iova, len),
            Which::Iommufd => match self.attached_ioas() {
                Some(ioas) => self.view.mapped(Some(ioas), iova, len),
                None => Ok(false),
            },
        }
    }
}

fn pattern(seed: u8, n: usize) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed))
        .collect()
}

/// Item 1: ATTACH + MAP, DMA through the IOVA; UNMAP blocks it and the
/// kernel logs the fault; MAP at another IOVA works.
fn check_map(r: &mut Rig, h: &mut Harness, c: &mut Checks) -> Res<()> {
    send_all(h, &[attach(1, 0), map(1, IOVA_A, SRC, 0x2000)])?;
    if r.which == Which::Iommufd {
        if let (Some(ioas), ViewKind::Iommufd { fd, .. }) = (r.attached_ioas(), &r.view.kind) {
            r.ioas_ranges = ioas_iova_ranges(fd, ioas).ok().map(|x| x.0);
        }
    }
    let ok = r.roundtrip(0x11, SRC, DST, IOVA_A, IOVA_A + 0x1000)?;
    let k = r.kernel_maps(IOVA_A, 0x2000)?;
    c.check(
        "map.dma_through_iova",
        ok && k,
        format!(
            "edu RAM->device->RAM via IOVA {IOVA_A:#x}: data {}; kernel maps the IOVA: {k}",
            if ok { "arrived" } else { "WRONG" }
        ),
    );
    send_all(h, &[unmap(1, IOVA_A, 0x2000)])?;
    let k = r.kernel_maps(IOVA_A, 0x2000)?;
    c.check(
        "map.unmap_removes_kernel_mapping",
        !k,
        format!("kernel maps {IOVA_A:#x}..+0x2000 after UNMAP: {k}"),
    );
    let (untouched, line) = r.blocked_write(SRC, None, DST, IOVA_A + 0x1000)?;
    c.check(
        "map.unmapped_dma_blocked",
        untouched,
        format!(
            "RAM behind IOVA {:#x} {}",
            IOVA_A + 0x1000,
            if untouched { "unchanged" } else { "WRITTEN" }
        ),
    );
    c.check(
        "map.dmar_fault_logged",
        line.is_some(),
        line.unwrap_or_else(|| format!("no kernel line with '{}'", dmar_needle(IOVA_A + 0x1000))),
    );
    send_all(h, &[map(1, IOVA_B, SRC, 0x2000)])?;
    let ok = r.roundtrip(0x22, SRC, DST, IOVA_B, IOVA_B + 0x1000)?;
    c.check(
        "map.remap_other_iova",
        ok,
        format!(
            "same pages MAPped again at IOVA {IOVA_B:#x}: data {}",
            if ok { "arrived" } else { "WRONG" }
        ),
    );
    Ok(())
}

/// Item 2: a MAP across two RAM regions becomes two kernel maps and both
/// halves work; a MAP the kernel refuses leaves both sides as they were.
fn check_two_regions(r: &mut Rig, h: &mut Harness, c: &mut Checks) -> Res<()> {
    send_all(h, &[map(1, IOVA_C, SPAN_GPA, SPAN_LEN)])?;
    let half = SPAN_LEN / 2;
    let (k1, k2) = (
        r.kernel_maps(IOVA_C, half)?,
        r.kernel_maps(IOVA_C + half, half)?,
    );
    let pieces = r.type1.as_ref().map(|b| {
        b.mapped(EP)
            .iter()
            .filter(|p| p.iova >= IOVA_C && p.iova < IOVA_C + SPAN_LEN)
            .count()
    });
    // Read across the boundary (RAM1's last bytes and RAM2's first) into
    // edu, write it back into RAM2; then write across the boundary.
    let cross = IOVA_C + half - (CNT as u64) / 2;
    let span = pattern(0x33, SPAN_LEN as usize);
    r.write(SPAN_GPA, &span)?;
    r.edu.dma(cross, EDU_BUF, CNT, false)?;
    let back = SPAN_GPA + half + 0x1000;
    r.edu.dma(EDU_BUF, IOVA_C + half + 0x1000, CNT, true)?;
    let off = (half - CNT as u64 / 2) as usize;
    let read_ok = r.read(back, CNT)? == span[off..off + CNT];
    let fresh = pattern(0x44, CNT);
    r.write(SPAN_GPA, &fresh)?;
    r.edu.dma(IOVA_C, EDU_BUF, CNT, false)?;
    r.edu.dma(EDU_BUF, cross, CNT, true)?;
    let write_ok = r.read(SPAN_GPA + off as u64, CNT)? == fresh;
    c.check(
        "two_regions.both_halves_dma",
        k1 && k2 && read_ok && write_ok,
        format!(
            "MAP {IOVA_C:#x}..+{SPAN_LEN:#x} onto GPA {SPAN_GPA:#x} (RAM1|RAM2 at {RAM2:#x}): kernel maps both halves {k1}/{k2}{}; edu read across the boundary {}, write across it {}",
            pieces.map_or(String::new(), |n| format!(", {n} type1 maps")),
            if read_ok { "ok" } else { "WRONG" },
            if write_ok { "ok" } else { "WRONG" }
        ),
    );
    if let Some(n) = pieces {
        c.check(
            "two_regions.two_kernel_maps",
            n == 2,
            format!("{n} VFIO_IOMMU_MAP_DMA pieces for one MAP"),
        );
    }
    // The second half of this MAP lands on the MSI window, which the
    // kernel refuses; the first half it accepts and must give back.
    let bad_iova = MSI_START - half;
    let before = h.dev.viommu().state().mappings(1);
    let k_before = r.kernel_maps(bad_iova, half)?;
    let s = h.send(&map(1, bad_iova, SPAN_GPA, SPAN_LEN));
    let after = h.dev.viommu().state().mappings(1);
    let k_after = r.kernel_maps(bad_iova, half)?;
    c.check(
        "two_regions.kernel_refused_map_status",
        s != Status::Ok,
        format!("MAP {bad_iova:#x}..+{SPAN_LEN:#x} (second half on the MSI window) -> {s:?}"),
    );
    c.check(
        "two_regions.refused_map_leaves_viommu_state",
        before == after,
        format!(
            "domain 1 mappings before {} after {}",
            before.len(),
            after.len()
        ),
    );
    c.check(
        "two_regions.refused_map_leaves_kernel",
        !k_before && !k_after,
        format!("kernel maps the accepted first half {bad_iova:#x}..+{half:#x}: before {k_before}, after {k_after}"),
    );
    // The IOVAs of the refused MAP are free in the vIOMMU too.
    let s2 = h.send(&map(1, bad_iova, SPAN_GPA, half));
    let s3 = h.send(&unmap(1, bad_iova, half));
    c.check(
        "two_regions.refused_iovas_free_again",
        s2 == Status::Ok && s3 == Status::Ok,
        format!("MAP of the first half alone -> {s2:?}, UNMAP -> {s3:?}"),
    );
    send_all(h, &[unmap(1, IOVA_C, SPAN_LEN)])?;
    Ok(())
}

/// Guest RAM plugged while the guest runs (issue 12): a MAP past RAM pins
/// nothing; plugging a DIMM under it maps it in the kernel and edu's DMA
/// reaches the DIMM; unplugging takes it out of the kernel again (the
/// guest's mapping stays, its DMA faults).
fn check_ram_hotplug(r: &mut Rig, h: &mut Harness, c: &mut Checks) -> Res<()> {
    send_all(h, &[map(1, IOVA_E, DIMM, 0x2000)])?;
    let before_plug = r.kernel_maps(IOVA_E, 0x2000)?;
    let region =
        vm_memory::GuestRegionMmap::from_range(GuestAddress(DIMM), DIMM_LEN as usize, None)
            .map_err(err("DIMM memory"))?;
    let with_dimm = r
        .ram
        .insert_region(Arc::new(region))
        .map_err(err("guest memory with the DIMM"))?;
    let plug = RamUpdate {
        start: DIMM,
        len: DIMM_LEN,
        before: &r.ram,
        after: &with_dimm,
    };
    let plugged = h.dev.viommu().add_ram(&plug);
    let after_plug = r.kernel_maps(IOVA_E, 0x2000)?;
    c.check(
        "hotplug.plug_maps_the_dimm",
        plugged.is_ok() && !before_plug && after_plug,
        format!(
            "MAP {IOVA_E:#x} -> GPA {DIMM:#x} before the DIMM: kernel maps it {before_plug}; add_ram {plugged:?}; then kernel maps it {after_plug}"
        ),
    );
    let pat = pattern(0x66, CNT);
    with_dimm
        .write_slice(&pat, GuestAddress(DIMM))
        .map_err(err("write the DIMM"))?;
    with_dimm
        .write_slice(&[0u8; CNT], GuestAddress(DIMM + 0x1000))
        .map_err(err("write the DIMM"))?;
    r.edu.copy(IOVA_E, IOVA_E + 0x1000, CNT)?;
    let mut back = vec![0u8; CNT];
    with_dimm
        .read_slice(&mut back, GuestAddress(DIMM + 0x1000))
        .map_err(err("read the DIMM"))?;
    c.check(
        "hotplug.dma_into_plugged_ram",
        back == pat,
        format!(
            "edu DIMM -> device -> DIMM via IOVA {IOVA_E:#x}: data {}",
            if back == pat { "arrived" } else { "WRONG" }
        ),
    );
    let unplug = RamUpdate {
        start: DIMM,
        len: DIMM_LEN,
        before: &with_dimm,
        after: &r.ram,
    };
    let unplugged = h.dev.viommu().remove_ram(&unplug);
    let after_unplug = r.kernel_maps(IOVA_E, 0x2000)?;
    let still_mapped = h
        .dev
        .viommu()
        .state()
        .mappings(1)
        .iter()
        .any(|m| m.start == IOVA_E);
    c.check(
        "hotplug.unplug_unmaps_the_dimm",
        unplugged.is_ok() && !after_unplug && still_mapped,
        format!(
            "remove_ram {unplugged:?}; kernel maps {IOVA_E:#x} {after_unplug}; the guest's mapping stays: {still_mapped}"
        ),
    );
    send_all(h, &[unmap(1, IOVA_E, 0x2000)])?;
    Ok(())
}

/// Peer-to-peer DMA (issue 12): another device's BAR0, registered as an
/// MMIO window with the host address of the VMM's mmap of it, is a DMA
/// target once the guest MAPs it with `MAP_F_MMIO`. On type1 the kernel
/// maps the peer's BAR and edu reads the peer's ID register through the
/// IOMMU (edu's own BAR would not do: QEMU refuses a device's DMA into
/// its own MMIO); on iommufd the MAP is refused with UNSUPP
/// (IOMMU_IOAS_MAP cannot pin a BAR's pages).
fn check_p2p(r: &mut Rig, h: &mut Harness, c: &mut Checks) -> Res<()> {
    let (bar, bar_len) = match (&r.peer, r.which) {
        (Some(p), _) => (p.bar as u64, p.len as u64),
        (None, Which::Iommufd) => (r.edu.bar as u64, r.edu.len as u64),
        (None, Which::Type1) => {
            c.skip("p2p.dma_reaches_the_bar", "no second edu (--peer) to reach");
            return Ok(());
        }
    };
    let bar_len = bar_len.min(0x10_0000);
    let window = MmioWindow {
        gpa: BAR_GPA,
        len: bar_len,
        hva: Some(bar),
    };
    if let Err(e) = h.dev.viommu().add_mmio_window(window) {
        c.check("p2p.window_registered", false, format!("{e}"));
        return Ok(());
    }
    let outside = h.send(&map_mmio(1, IOVA_F, BAR_GPA + bar_len, 0x1000));
    c.check(
        "p2p.mmio_map_outside_windows_is_range",
        outside == Status::Range,
        format!("MAP_F_MMIO past the window -> {outside:?}"),
    );
    let s = h.send(&map_mmio(1, IOVA_F, BAR_GPA, 0x1000));
    match (r.which, &r.peer) {
        (Which::Type1, Some(peer)) => {
            let k = r.kernel_maps(IOVA_F, 0x1000)?;
            // RAM at DST gets what edu reads from the peer's BAR at offset
            // 0: the peer's ID register (0x010000ed). Four bytes: edu's
            // registers below 0x80 answer 4-byte accesses only (all ones
            // otherwise), and a DMA of 4 bytes is one such access.
            send_all(h, &[map(1, IOVA_A, DST, 0x1000)])?;
            r.write(DST, &[0u8; 8])?;
            let copied = r.edu.copy(IOVA_F, IOVA_A, 4);
            let got = r.read(DST, 4)?;
            let id = u32::from_le_bytes([got[0], got[1], got[2], got[3]]);
            let want = peer.rd32(0);
            c.check(
                "p2p.dma_reaches_the_bar",
                s == Status::Ok && k && copied.is_ok() && id == want,
                format!(
                    "MAP_F_MMIO {IOVA_F:#x} -> peer BAR GPA {BAR_GPA:#x} -> {s:?}, kernel maps it {k}; edu copy from it {copied:?}: RAM got {id:#x}, the peer's ID register is {want:#x}"
                ),
            );
            send_all(h, &[unmap(1, IOVA_A, 0x1000), unmap(1, IOVA_F, 0x1000)])?;
        }
        _ => {
            c.check(
                "p2p.mmio_map_refused_unsupp",
                s == Status::Unsupp,
                format!("MAP_F_MMIO {IOVA_F:#x} -> BAR GPA {BAR_GPA:#x} -> {s:?}"),
            );
        }
    }
    let removed = h.dev.viommu().remove_mmio_window(BAR_GPA, bar_len);
    c.check(
        "p2p.window_withdrawn",
        removed.is_ok(),
        format!("{:?}", removed.map(|w| w.gpa)),
    );
    Ok(())
}

/// Item 3: bypass through ATTACH_F_BYPASS and through config-space
/// `bypass`; leaving bypass blocks DMA again.
fn check_bypass(r: &mut Rig, h: &mut Harness, c: &mut Checks) -> Res<()> {
    send_all(h, &[attach(2, VIRTIO_IOMMU_ATTACH_F_BYPASS)])?;
    let ok = r.roundtrip(0x55, SRC, DST, SRC, DST)?;
    let k = r.kernel_maps(RAM1, RAM_LEN)?;
    c.check(
        "bypass.attach_bypass_dma_at_gpa",
        ok && k,
        format!("ATTACH_F_BYPASS: edu at GPAs {SRC:#x} -> {DST:#x}: data {}; kernel maps RAM at its GPA: {k}", if ok { "arrived" } else { "WRONG" }),
    );
    send_all(h, &[detach(2)])?;
    let (untouched, line) = r.blocked_write(SRC, None, DST, DST)?;
    c.check(
        "bypass.leaving_blocks_dma",
        untouched && line.is_some(),
        format!(
            "after DETACH the write to GPA {DST:#x}: RAM {}; {}",
            if untouched { "unchanged" } else { "WRITTEN" },
            line.unwrap_or_else(|| "no DMAR line".into())
        ),
    );
    // Config-space bypass: edu attached to no domain.
    h.dev.write_config(CONFIG_BYPASS_OFFSET as u64, &[1]);
    let dst2 = DST + 0x2000;
    let src2 = SRC + 0x2000;
    let works = match r.edu.dma(src2, EDU_BUF, CNT, false) {
        Ok(_) => {
            r.write(dst2, &[0u8; CNT])?;
            let pat = pattern(0x66, CNT);
            r.write(src2, &pat)?;
            r.edu.copy(src2, dst2, CNT)?;
            r.read(dst2, CNT)? == pat
        }
        Err(e) => return Err(e),
    };
    let line = r.kmsg.wait_for(&dmar_needle(src2));
    c.check(
        "bypass.config_bypass_dma_at_gpa",
        works,
        format!(
            "config bypass=1, edu unattached: DMA at GPA {src2:#x} -> {dst2:#x} {}{}",
            if works { "arrived" } else { "was BLOCKED" },
            line.map_or(String::new(), |l| format!(
                " ({l}): the vIOMMU never tells the backend about config-space bypass"
            ))
        ),
    );
    h.dev.write_config(CONFIG_BYPASS_OFFSET as u64, &[0]);
    let dst3 = DST + 0x4000;
    let (untouched, _) = r.blocked_write(SRC, None, dst3, dst3)?;
    c.check(
        "bypass.config_bypass_off_blocks",
        untouched,
        format!(
            "config bypass=0: write to GPA {dst3:#x}: RAM {}",
            if untouched { "unchanged" } else { "WRITTEN" }
        ),
    );
    Ok(())
}

/// Item 6: DETACH and device reset leave no kernel mapping behind.
fn check_teardown(r: &mut Rig, h: &mut Harness, c: &mut Checks) -> Res<()> {
    send_all(
        h,
        &[
            attach(3, 0),
            map(3, IOVA_B, SRC, 0x2000),
            map(3, IOVA_D, RAM2, 0x10000),
        ],
    )?;
    let ioas = r.attached_ioas();
    let ok = r.roundtrip(0x77, SRC, DST, IOVA_B, IOVA_B + 0x1000)?;
    send_all(h, &[detach(3)])?;
    let (gone, what) = teardown_view(r, ioas)?;
    c.check(
        "detach.no_kernel_mapping",
        ok && gone,
        format!(
            "DMA while attached {}; after DETACH {what}",
            if ok { "ok" } else { "WRONG" }
        ),
    );
    let (untouched, line) = r.blocked_write(SRC, None, DST, IOVA_B + 0x1000)?;
    c.check(
        "detach.dma_blocked",
        untouched,
        format!(
            "RAM {}; {}",
            if untouched { "unchanged" } else { "WRITTEN" },
            line.unwrap_or_else(|| "no DMAR line".into())
        ),
    );
    send_all(
        h,
        &[
            attach(4, 0),
            map(4, IOVA_B, SRC, 0x2000),
            map(4, IOVA_D, RAM2, 0x10000),
        ],
    )?;
    let ioas = r.attached_ioas();
    let ok = r.roundtrip(0x78, SRC, DST, IOVA_B, IOVA_B + 0x1000)?;
    h.dev.reset();
    let (gone, what) = teardown_view(r, ioas)?;
    c.check(
        "reset.no_kernel_mapping",
        ok && gone,
        format!(
            "DMA while attached {}; after device reset {what}",
            if ok { "ok" } else { "WRONG" }
        ),
    );
    let (untouched, line) = r.blocked_write(SRC, None, DST, IOVA_B + 0x1000)?;
    c.check(
        "reset.dma_blocked",
        untouched,
        format!(
            "RAM {}; {}",
            if untouched { "unchanged" } else { "WRITTEN" },
            line.unwrap_or_else(|| "no DMAR line".into())
        ),
    );
    Ok(())
}

/// After a detach: nothing mapped at the IOVAs used (type1: the container
/// itself; iommufd: the domain IOAS is gone and edu is attached to nothing).
fn teardown_view(r: &Rig, ioas: Option<u32>) -> Res<(bool, String)> {
    match r.which {
        Which::Type1 => {
            let a = r.view.mapped(None, IOVA_B, 0x2000)?;
            let b = r.view.mapped(None, IOVA_D, 0x10000)?;
            // Every IOVA these checks use, bypass's GPAs included.
            let low = r.view.mapped(None, 0, 2 * RAM_LEN)?;
            let ram = r.view.mapped(None, RAM1, 2 * RAM_LEN)?;
            Ok((
                !a && !b && !low && !ram,
                format!(
                    "the container maps {IOVA_B:#x}: {a}, {IOVA_D:#x}: {b}, anything in 0..{:#x}: {low}, in RAM's GPAs: {ram}",
                    2 * RAM_LEN
                ),
            ))
        }
        Which::Iommufd => {
            let Some(id) = ioas else {
                return Ok((false, "edu was attached to no IOAS".into()));
            };
            let exists = r.view.ioas_exists(id)?;
            let now = r.attached_ioas();
            Ok((
                !exists && now.is_none(),
                format!("domain IOAS {id} exists in the kernel: {exists}; edu attached to {now:?}"),
            ))
        }
    }
}

/// The kernel's IOVA holes for edu, with the source.
fn kernel_holes(r: &Rig) -> Res<(Vec<(u64, u64)>, String)> {
    match &r.view.kind {
        ViewKind::Type1 { container } => {
            let mut buf = type1_info_request(TYPE1_INFO_BUF);
            r.host
                .ioctl(*container, Ioctl::Type1GetInfo { buf: &mut buf })
                .map_err(err("VFIO_IOMMU_GET_INFO"))?;
            let info = parse_type1_info(&buf).map_err(err("VFIO_IOMMU_GET_INFO"))?;
            Ok((
                holes(&info.ranges),
                format!(
                    "type1 IOVA_RANGE capability: {} (pgsizes {:#x})",
                    fmt_ranges(&info.ranges),
                    info.pgsizes
                ),
            ))
        }
        ViewKind::Iommufd { .. } => {
            let ranges = r
                .ioas_ranges
                .clone()
                .ok_or("no IOAS ranges were read while edu was attached")?;
            Ok((
                holes(&ranges),
                format!(
                    "IOMMU_IOAS_IOVA_RANGES with edu attached: {}",
                    fmt_ranges(&ranges)
                ),
            ))
        }
    }
}

fn sysfs_reserved(device: &Path) -> String {
    std::fs::read_to_string(device.join("iommu_group/reserved_regions"))
        .map(|s| s.lines().collect::<Vec<_>>().join("; "))
        .unwrap_or_else(|e| format!("unreadable: {e}"))
}

/// Items 4 and 5, on a second vIOMMU with the nested extension and no
/// reserved regions in its config: the library itself must report the
/// kernel's IOVA holes (read here independently) for the endpoint.
fn check_reserved_and_nesting(r: &mut Rig, c: &mut Checks) -> Res<Harness> {
    let (holes, src) = kernel_holes(r)?;
    let msi = holes.iter().any(|&(s, e)| s <= MSI_START && e >= MSI_END);
    c.check(
        "reserved.kernel_reports_msi_hole",
        msi,
        format!(
            "holes {} from {src}; sysfs group reserved_regions: {}",
            fmt_ranges(&holes),
            sysfs_reserved(&r.device)
        ),
    );
    let cfg = IommuConfig {
        // No reserved regions here: the backend reads the host's holes
        // (BackendCaps::reserved_ranges) and PROBE must report them.
        nested: Some(NestedConfig {
            formats: vec![TableFormat::IntelVtd],
            pasid_bits: 8,
        }),
        ..IommuConfig::default()
    };
    let mut h = r.harness(&cfg);
    let props = probe_props(&mut h)?;
    let resv = resv_mem(&props);
    // Every kernel hole inside the device's input range is covered by the
    // RESV_MEM properties PROBE returns, the MSI window among them.
    let (lo, hi) = h.dev.viommu().input_range();
    let covered = |(s, e): (u64, u64)| {
        let (s, e) = (s.max(lo), e.min(hi));
        s > e
            || resv
                .iter()
                .any(|&(t, rs, re)| t == VIRTIO_IOMMU_RESV_MEM_T_RESERVED && rs <= s && re >= e)
    };
    let shown = resv.iter().any(|&(_, s, e)| s <= MSI_START && e >= MSI_END)
        && holes.iter().all(|&hole| covered(hole));
    c.check(
        "reserved.probe_reports_hole",
        shown,
        format!(
            "kernel holes {}; PROBE RESV_MEM of endpoint {EP}: {}",
            fmt_ranges(&holes),
            resv.iter()
                .map(|(t, s, e)| format!("[{s:#x}..={e:#x} subtype {t}]"))
                .collect::<Vec<_>>()
                .join(" ")
        ),
    );
    send_all(&mut h, &[attach(1, 0)])?;
    let s = h.send(&map(1, MSI_START, SRC, 0x1000));
    let k = r.kernel_maps(MSI_START - 0x1000, 0x1000)?;
    c.check(
        "reserved.map_into_hole_refused",
        s == Status::Range && !k,
        format!("MAP {MSI_START:#x}..+0x1000 -> {s:?}; kernel maps the page below it: {k}"),
    );
    // Item 5: no table format is offered, ATTACH_TABLE is refused.
    let fmts: Vec<u16> = props
        .iter()
        .filter(|(t, _)| {
            *t == VIRTIO_IOMMU_PROBE_T_PASID_TABLE_FMT || *t == VIRTIO_IOMMU_PROBE_T_PAGE_TABLE_FMT
        })
        .map(|(t, _)| *t)
        .collect();
    let mut fb = [0u8; 64];
    fb[0..2].copy_from_slice(&VIRTIO_IOMMU_PSTF_INTEL_VTD.to_le_bytes());
    let s = h.send(&Request::AttachTable(AttachTableReq {
        domain: 9,
        endpoint: EP,
        format_bytes: fb,
    }));
    c.check(
        "nested.no_table_format_offered",
        fmts.is_empty() && s != Status::Ok,
        format!("PROBE table-format properties {fmts:?} (nested extension on, intel-vtd configured); ATTACH_TABLE intel-vtd -> {s:?}"),
    );
    if let Some(b) = &r.iommufd {
        check_hw_info(r, b, c)?;
    }
    Ok(h)
}

/// Item 5 on iommufd: `IOMMU_GET_HW_INFO` from the real VT-d, parsed; the
/// kernel refuses a nest parent; the backend says why in its log.
fn check_hw_info(r: &Rig, b: &IommufdBackend, c: &mut Checks) -> Res<()> {
    let ViewKind::Iommufd { iommufd, .. } = r.view.kind else {
        return Err("not iommufd".into());
    };
    let dev_id = r.dev.iommufd_dev_id().ok_or("no iommufd device ID")?;
    let mut info = hw_info_request(dev_id);
    let mut data = [0u8; HW_INFO_DATA_LEN];
    r.host
        .ioctl(
            iommufd,
            Ioctl::GetHwInfo {
                arg: &mut info,
                data: &mut data,
            },
        )
        .map_err(err("IOMMU_GET_HW_INFO"))?;
    let kind = parse_hw_info(&info, &data);
    // SAFETY: both union members are one u32 at the same offset.
    let ty = unsafe { info.__bindgen_anon_1.out_data_type };
    let mut caps = caps_from_hw(&kind, info.out_max_pasid_log2);
    // The backend adds the device's reserved regions, read from the
    // kernel (checked by the `reserved.*` items); the rest comes from
    // IOMMU_GET_HW_INFO alone.
    caps.reserved_ranges = b.caps(EP).reserved_ranges;
    let (vtd, detail) = match kind {
        HwKind::IntelVtd(h) => (
            ty == iommu_hw_info_type_IOMMU_HW_INFO_TYPE_INTEL_VTD && h.ecap >> 26 & 1 == 0,
            format!(
                "type {ty} (INTEL_VTD), cap {:#x}, ecap {:#x}: NEST (bit 26) {}, MGAW {} bits; caps: pages {:#x}, input {:#x}..={:#x}, PASID bits {}, formats {:?}",
                h.cap, h.ecap, h.ecap >> 26 & 1, h.mgaw(), caps.page_size_mask, caps.input_range.0, caps.input_range.1, caps.pasid_bits, caps.table_formats
            ),
        ),
        other => (false, format!("not VT-d: {other:?}")),
    };
    let backend_caps = b.caps(EP);
    c.check(
        "hw_info.parsed",
        vtd && caps.table_formats.is_empty() && backend_caps == caps,
        format!("{detail}; backend caps equal: {}", backend_caps == caps),
    );
    let mut a = args::hwpt_alloc(
        iommufd_hwpt_alloc_flags_IOMMU_HWPT_ALLOC_NEST_PARENT,
        dev_id,
        b.gpa_ioas(),
        iommu_hwpt_data_type_IOMMU_HWPT_DATA_NONE,
        0,
        0,
    );
    let res = r.host.ioctl(
        iommufd,
        Ioctl::HwptAlloc {
            arg: &mut a,
            data: &[],
        },
    );
    let refused = matches!(&res, Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP));
    if res.is_ok() {
        let _ = r
            .host
            .ioctl(iommufd, Ioctl::Destroy(&args::destroy(a.out_hwpt_id)));
    }
    c.check(
        "hw_info.nest_parent_refused",
        refused,
        format!(
            "IOMMU_HWPT_ALLOC NEST_PARENT on the stage-2 IOAS {}: {res:?}",
            b.gpa_ioas()
        ),
    );
    let line = logged(&format!("endpoint {EP}: no nested translation"));
    c.check(
        "hw_info.log_says_why",
        line.is_some(),
        line.unwrap_or_else(|| "no log line about nesting".into()),
    );
    Ok(())
}

/// The real host's `VFIO_IOMMU_UNMAP_DMA` says what the kernel unmapped,
/// as the uAPI does (and the recording host): the whole mapping inside a
/// larger range, 0 where nothing was mapped (type1 only).
fn check_host_unmap(r: &Rig, c: &mut Checks) -> Res<()> {
    let ViewKind::Type1 { container } = r.view.kind else {
        return Ok(());
    };
    let page = DmaPiece {
        iova: IOVA_D,
        hva: r.view.scratch.hva,
        len: 0x1000,
        read: true,
        write: false,
    };
    let two = DmaPiece {
        len: 0x2000,
        ..page
    };
    r.host
        .ioctl(container, Ioctl::Type1MapDma(&type1_map(&page)))
        .map_err(err("VFIO_IOMMU_MAP_DMA"))?;
    let mut u1 = type1_unmap(&two);
    let r1 = r.host.ioctl(container, Ioctl::Type1UnmapDma(&mut u1));
    let mut u2 = type1_unmap(&two);
    let r2 = r.host.ioctl(container, Ioctl::Type1UnmapDma(&mut u2));
    c.check(
        "host.unmap_writes_back_size",
        r1.is_ok() && u1.size == 0x1000 && r2.is_ok() && u2.size == 0,
        format!(
            "UNMAP_DMA of 0x2000 over one mapped page: {r1:?}, size {:#x}; again: {r2:?}, size {:#x}",
            u1.size, u2.size
        ),
    );
    Ok(())
}

/// Microseconds per MAP+UNMAP pair of one page through the request queue.
fn map_unmap_us(h: &mut Harness, domain: u32) -> Res<f64> {
    let t0 = Instant::now();
    for i in 0..u64::from(FIG_PAIRS) {
        let iova = IOVA_D + (i % 16) * 0x1000;
        send_all(
            h,
            &[map(domain, iova, SRC, 0x1000), unmap(domain, iova, 0x1000)],
        )?;
    }
    Ok(t0.elapsed().as_secs_f64() * 1e6 / f64::from(FIG_PAIRS))
}

/// The closing figure: MAP+UNMAP into the real kernel, and the same
/// through the recording host (same L1, same request path).
fn figures(r: &Rig, h: &mut Harness) -> Res<()> {
    let real = map_unmap_us(h, 1)?;
    let rec = Arc::new(RecordingHost::new(FakeIommu::IntelVtd {
        cap: QEMU_VTD_CAP,
        ecap: QEMU_VTD_ECAP,
    }));
    let ram = GuestRam::new(r.ram.clone()).map_err(err("guest RAM"))?;
    let b: Arc<dyn IommuBackend> = match r.which {
        Which::Type1 => {
            let b = Type1Backend::new(rec.clone(), ram);
            b.add_endpoint(EP, &r.device)
                .map_err(err("recording type1"))?;
            Arc::new(b)
        }
        Which::Iommufd => {
            let b = IommufdBackend::new(rec.clone(), ram).map_err(err("recording iommufd"))?;
            b.add_endpoint(EP, &r.device)
                .map_err(err("recording iommufd"))?;
            Arc::new(b)
        }
    };
    let mut hr = Harness::with_router(
        &IommuConfig::default(),
        &[EP],
        HARNESS_MIB,
        &[(RAM1, RAM2 + RAM_LEN - 1)],
        move |_, _| {
            let mut x = Router::new();
            x.add(b, &[EP]);
            x
        },
        driver_features,
    );
    send_all(&mut hr, &[attach(1, 0)])?;
    let recorded = map_unmap_us(&mut hr, 1)?;
    println!(
        "VFIO-L1-FIG {} MAP+UNMAP pair (4 KiB, through the request queue, {FIG_PAIRS} pairs): real kernel {real:.1} us, recording host {recorded:.1} us, ratio {:.1}",
        name(r.which),
        real / recorded
    );
    Ok(())
}

fn name(w: Which) -> &'static str {
    match w {
        Which::Type1 => "type1",
        Which::Iommufd => "iommufd",
    }
}

fn run(which: Which, device: &Path, peer: Option<&Path>, c: &mut Checks) -> Res<()> {
    let mut r = Rig::open(which, device, c)?;
    // type1: the peer in a container of its own, its BAR0 mmapped, as a VMM
    // holds every assigned device's BARs.
    if let (Which::Type1, Some(p)) = (which, peer) {
        match open_peer(p) {
            Ok(e) => r.peer = Some(e),
            Err(e) => c.broken("p2p.peer_open", &e),
        }
    }
    if let Err(e) = check_host_unmap(&r, c) {
        c.broken("host.unmap_writes_back_size", &e);
    }
    let mut h = r.harness(&IommuConfig::default());
    type Step = fn(&mut Rig, &mut Harness, &mut Checks) -> Res<()>;
    let steps: [(&str, Step); 6] = [
        ("map", check_map),
        ("two_regions", check_two_regions),
        ("hotplug", check_ram_hotplug),
        ("p2p", check_p2p),
        ("bypass", check_bypass),
        ("teardown", check_teardown),
    ];
    for (n, f) in steps {
        if let Err(e) = f(&mut r, &mut h, c) {
            c.broken(&format!("{n}.ran"), &e);
        }
    }
    drop(h);
    match check_reserved_and_nesting(&mut r, c) {
        Ok(mut h2) => {
            if let Err(e) = figures(&r, &mut h2) {
                println!("vfio-l1 [{}] figures: {e}", name(which));
            }
            h2.dev.reset();
        }
        Err(e) => c.broken("reserved.ran", &e),
    }
    let removed = match (&r.type1, &r.iommufd) {
        (Some(b), _) => b.remove_endpoint(EP),
        (_, Some(b)) => b.remove_endpoint(EP),
        _ => Ok(()),
    };
    c.check(
        "teardown.remove_endpoint",
        removed.is_ok(),
        format!("{removed:?}"),
    );
    Ok(())
}

fn main() {
    let _ = log::set_logger(&LOGGER).map(|()| log::set_max_level(log::LevelFilter::Info));
    let mut backend = None;
    let mut device = None;
    let mut peer = None;
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--backend" => backend = it.next(),
            "--device" => device = it.next().map(PathBuf::from),
            "--peer" => peer = it.next().map(PathBuf::from),
            _ => {
                eprintln!(
                    "usage: vfio_l1 --backend type1|iommufd --device /sys/bus/pci/devices/BDF [--peer /sys/bus/pci/devices/BDF]"
                );
                std::process::exit(2);
            }
        }
    }
    let which = match backend.as_deref() {
        Some("type1") => Which::Type1,
        Some("iommufd") => Which::Iommufd,
        _ => {
            eprintln!("vfio_l1: --backend type1 or iommufd");
            std::process::exit(2);
        }
    };
    let Some(device) = device else {
        eprintln!("vfio_l1: --device /sys/bus/pci/devices/BDF");
        std::process::exit(2);
    };
    let mut c = Checks {
        backend: name(which),
        passed: 0,
        failed: 0,
    };
    let t0 = Instant::now();
    if let Err(e) = run(which, &device, peer.as_deref(), &mut c) {
        c.broken("setup.open", &e);
    }
    println!(
        "vfio-l1 [{}]: {} passed, {} failed ({:.1} s)",
        c.backend,
        c.passed,
        c.failed,
        t0.elapsed().as_secs_f64()
    );
    std::process::exit(i32::from(c.failed > 0));
}

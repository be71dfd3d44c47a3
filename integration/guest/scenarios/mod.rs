//! The scenarios, and what they share: the boot info, memory to allocate
//! from in low and high RAM, and the DMA engine they drive.

pub mod bypass;
pub mod hostile;
pub mod hostile_nested;
pub mod hotplug;
pub mod map;
pub mod nested_smmuv3;
pub mod nested_vtd;
pub mod page_request;
pub mod snapshot;

use crate::abi::{self, BootInfo};
use crate::dma::Dma;
use crate::iommu::{self, Iommu};
use crate::rt::Bump;

/// What every scenario starts from.
pub struct Ctx {
    /// What the VMM said.
    pub info: BootInfo,
    /// Free low RAM.
    pub low: Bump,
    /// Free high RAM.
    pub high: Bump,
}

impl Ctx {
    /// The context for `info`.
    pub fn new(info: BootInfo) -> Self {
        check!(info.high_ram_end > info.high_ram_start, "no high RAM");
        check!(info.low_ram_end > abi::FREE_LOW_START, "no free low RAM");
        Ctx {
            info,
            low: Bump::new(abi::FREE_LOW_START, info.low_ram_end),
            high: Bump::new(info.high_ram_start, info.high_ram_end),
        }
    }

    /// The DMA engine behind the vIOMMU and its endpoint.
    pub fn dma(&self) -> (Dma, u32) {
        let i = self.info.primary_dma;
        check!(i < self.info.dma_count, "no DMA engine behind the vIOMMU");
        let dma = Dma::new(abi::DMA_BASE + i * abi::MMIO_WINDOW_SIZE);
        let ep = dma.endpoint();
        check_eq!(
            u64::from(ep),
            self.info.dma_endpoints[i as usize],
            "DMA engine endpoint"
        );
        (dma, ep)
    }

    /// The virtio-iommu, initialised.
    pub fn iommu(&mut self) -> Iommu {
        Iommu::init(abi::VIRTIO_MMIO_BASE, &mut self.low)
    }

    /// The virtio-iommu with the nested extension negotiated (and page
    /// requests if `page_requests`); ends the guest if it is not offered.
    pub fn nested_iommu(&mut self, page_requests: bool) -> Iommu {
        let mut want = iommu::WANTED | iommu::features::ATTACH_TABLE;
        if page_requests {
            want |= iommu::features::PAGE_REQUEST;
        }
        let dev = Iommu::init_with(abi::VIRTIO_MMIO_BASE, &mut self.low, want);
        check_eq!(
            dev.features & want,
            want,
            "nested features offered (features {:#x})",
            dev.features
        );
        check_eq!(
            dev.evt_buf_len,
            iommu::nested::EXT_FAULT_SIZE,
            "event buffers sized for the extended record"
        );
        dev
    }
}

/// What PROBE says about an endpoint's nested translation.
pub struct NestedProbe {
    /// `PASID_SIZE`.
    pub pasid_bits: u8,
    /// `OUTPUT_SIZE`.
    pub output_bits: u8,
    /// The page sizes of the PASID table format asked for (its
    /// `PASID_TABLE_FMT` property), if advertised.
    pub table_page_sizes: Option<u64>,
    /// Every table format advertised (`PAGE_TABLE_FMT` and
    /// `PASID_TABLE_FMT`): bit `n` for format number `n` below 32.
    pub formats: u32,
}

impl NestedProbe {
    /// Whether PROBE advertised table format `format`.
    pub fn has(&self, format: u16) -> bool {
        format < 32 && self.formats & (1 << format) != 0
    }
}

/// PROBEs `ep` and reads the nested extension's properties, looking for
/// `PASID_TABLE_FMT` `format` over page-table format `pgtf`.
pub fn probe_nested(dev: &mut Iommu, ep: u32, format: u16, pgtf: u16) -> NestedProbe {
    use crate::iommu::nested as n;
    use crate::rt::{peek16, peek64, peek8};
    check_eq!(dev.probe(ep), iommu::status::OK, "PROBE");
    let mut p = NestedProbe {
        pasid_bits: 0,
        output_bits: 0,
        table_page_sizes: None,
        formats: 0,
    };
    let end = dev.resp_buf + u64::from(dev.probe_size);
    let mut at = dev.resp_buf;
    let mut seen = 0u32;
    while at + 4 <= end {
        let ty = peek16(at) & 0xfff;
        let len = u64::from(peek16(at + 2));
        if ty == 0 {
            break;
        }
        check!(at + 4 + len <= end, "property {ty} overruns probe_size");
        seen |= 1 << ty.min(31);
        match ty {
            n::PROBE_T_PASID_SIZE => p.pasid_bits = peek8(at + 4),
            n::PROBE_T_OUTPUT_SIZE => p.output_bits = peek8(at + 4),
            n::PROBE_T_PASID_TABLE_FMT if peek16(at + 4) == format && peek16(at + 6) == pgtf => {
                p.table_page_sizes = Some(peek64(at + 8));
            }
            _ => {}
        }
        if matches!(ty, n::PROBE_T_PAGE_TABLE_FMT | n::PROBE_T_PASID_TABLE_FMT) {
            let f = peek16(at + 4);
            if f < 32 {
                p.formats |= 1 << f;
            }
        }
        at += 4 + len;
    }
    // PAGE_SIZE_MASK, INPUT_RANGE, OUTPUT_SIZE and PASID_SIZE come with
    // the extension for every endpoint.
    for ty in [
        n::PROBE_T_PAGE_SIZE_MASK,
        n::PROBE_T_INPUT_RANGE,
        n::PROBE_T_OUTPUT_SIZE,
        n::PROBE_T_PASID_SIZE,
    ] {
        check!(seen & (1 << ty) != 0, "PROBE lacks property {ty}");
    }
    p
}

/// The next event must be an extended fault record: checks its type,
/// reason, endpoint, PASID (if `pasid`), address and access flags, and
/// returns it (for the page-request group).
pub fn expect_ext_fault(
    dev: &mut Iommu,
    flt_type: u16,
    reason: u8,
    endpoint: u32,
    pasid: Option<u32>,
    address: u64,
    access: u32,
) -> iommu::Fault {
    use crate::iommu::nested as n;
    let Some(f) = dev.next_fault() else {
        println!("FAIL: no fault record on the event queue");
        crate::rt::exit(line!());
    };
    println!(
        "  eventq: {} reason={} endpoint={} pasid={:#x} grpid={} address={:#x} flags={} pr_flags={:#x} len={}",
        if f.flt_type == n::FLT_PAGE_REQ { "page request" } else { "fault" },
        reason_name(f.reason),
        f.endpoint,
        f.pasid,
        f.grpid,
        f.address,
        flag_names(f.flags),
        f.pr_evt_flags,
        f.len
    );
    check_eq!(f.len, n::EXT_FAULT_SIZE, "extended record length");
    check_eq!(f.flt_type, flt_type, "flt_type");
    check_eq!(f.reason, reason, "fault reason");
    check_eq!(f.endpoint, endpoint, "fault endpoint");
    let mut flags = access | iommu::FAULT_F_ADDRESS;
    if pasid.is_some() {
        flags |= n::FAULT_F_PASID;
    }
    check_eq!(f.flags, flags, "fault flags");
    check_eq!(f.pasid, pasid.unwrap_or(0), "fault PASID");
    check_eq!(f.address, address, "fault address");
    if flt_type == n::FLT_PAGE_REQ {
        check_eq!(f.pr_evt_flags, n::PR_F_LAST_PAGE, "page request flags");
    } else {
        check_eq!(f.pr_evt_flags, 0, "fault pr_evt_flags");
        check_eq!(f.grpid, 0, "fault grpid");
    }
    f
}

/// Runs `n` INVALIDATEs of `inv` and prints the TSC cycles each took,
/// notification (an exit or an ioeventfd kick) and device work included.
pub fn bench_invalidate(dev: &mut Iommu, inv: &iommu::req::Invalidate, n: u64) {
    if n == 0 {
        return;
    }
    let t0 = crate::rt::rdtsc();
    for _ in 0..n {
        let s = dev.invalidate(inv);
        if s != iommu::status::OK {
            println!("FAIL: benchmark INVALIDATE status {s}");
            crate::rt::exit(line!());
        }
    }
    let cycles = (crate::rt::rdtsc() - t0) / n;
    println!("bench: invalidations={n} cycles_per_invalidate={cycles}");
}

/// Fills `len` bytes at `addr` with a pattern that depends on `seed` and
/// the offset.
pub fn pattern(addr: u64, len: u64, seed: u8) {
    for i in 0..len {
        crate::rt::poke8(addr + i, (i as u8).wrapping_mul(31).wrapping_add(seed));
    }
}

/// Checks byte by byte that `len` bytes at `a` equal those at `b`.
pub fn same_bytes(a: u64, b: u64, len: u64) -> bool {
    let mut i = 0;
    while i < len {
        if crate::rt::peek8(a + i) != crate::rt::peek8(b + i) {
            println!(
                "  bytes differ at offset {i:#x}: {:#x} != {:#x}",
                crate::rt::peek8(a + i),
                crate::rt::peek8(b + i)
            );
            return false;
        }
        i += 1;
    }
    true
}

/// Checks that `len` bytes at `a` all equal `v`.
pub fn all_bytes(a: u64, len: u64, v: u8) -> bool {
    (0..len).all(|i| crate::rt::peek8(a + i) == v)
}

/// The spec's name of a fault reason (`VIRTIO_IOMMU_FAULT_R_*`).
fn reason_name(r: u8) -> &'static str {
    match r {
        0 => "UNKNOWN",
        1 => "DOMAIN",
        2 => "MAPPING",
        _ => "reserved",
    }
}

/// The fault flags by name (`VIRTIO_IOMMU_FAULT_F_*`: READ 1, WRITE 2,
/// EXEC 4, ADDRESS 0x100), `|`-joined, any other bits in hex.
fn flag_names(f: u32) -> crate::rt::FlagNames {
    crate::rt::FlagNames(f)
}

/// Checks the next fault record: its reason, endpoint, address and flags.
pub fn expect_fault(dev: &mut Iommu, reason: u8, endpoint: u32, address: u64, flags: u32) {
    let Some(f) = dev.next_fault() else {
        println!("FAIL: no fault record on the event queue");
        crate::rt::exit(line!());
    };
    println!(
        "  eventq: fault reason={} endpoint={} address={:#x} flags={}",
        reason_name(f.reason),
        f.endpoint,
        f.address,
        flag_names(f.flags)
    );
    check_eq!(f.reason, reason, "fault reason");
    check_eq!(f.endpoint, endpoint, "fault endpoint");
    check_eq!(f.flags, flags | iommu::FAULT_F_ADDRESS, "fault flags");
    check_eq!(f.address, address, "fault address");
}

/// Checks that no fault record waits.
pub fn expect_no_fault(dev: &mut Iommu) {
    if let Some(f) = dev.next_fault() {
        println!(
            "FAIL: unexpected fault record reason={} address={:#x}",
            f.reason, f.address
        );
        crate::rt::exit(line!());
    }
}

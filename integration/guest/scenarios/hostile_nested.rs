//! Scenario 6, the nested extension's part (only when the device offers
//! VIRTIO_IOMMU_F_ATTACH_TABLE): ATTACH_TABLE, INVALIDATE and PAGE_RESP
//! with bad fields, pointers, framing and targets get the statuses of
//! `docs/wire.md` ("Nested extension"), each a request-level error that
//! never asks for a reset. Tables full of garbage bind (the device reads
//! them only when it translates), and every DMA through them ends with a
//! fault status and its 40-byte fault record — or, for a leaf outside RAM,
//! a fault status and no record — while a sentinel page, and the tables
//! themselves, stay as the driver wrote them.
//!
//! Each case prints `hostile: <case>: ok`; the part ends with a summary
//! line. The cases of a format the endpoint's PROBE does not advertise are
//! skipped, and say so. The case tables are laid out one case per line.

use super::hostile::{send, Want};
use super::{all_bytes, expect_ext_fault, expect_no_fault, probe_nested, Ctx, NestedProbe};
use crate::abi;
use crate::dma::Dma;
use crate::iommu::req::{self, Invalidate};
use crate::iommu::status::{INVAL, IOERR, NOENT, OK, RANGE, UNSUPP};
use crate::iommu::{self, config, features, nested as n, Iommu, TAIL_SIZE};
use crate::iommu::{FAULT_R_DOMAIN as R_DOMAIN, FAULT_R_MAPPING as R_MAPPING};
use crate::pgtable::{arm, vtd::PDE_P, x86, CdTable, VtdPasidDir, X86Tables, ARM_T0SZ};
use crate::rt::{self, peek64, poke64, Bump};
use crate::virtio;

const PAGE: u64 = 4096;
/// The domain the cases bind and abuse.
const DOMAIN: u32 = abi::HOSTILE_DOMAIN;
/// A second domain in range (the VMM needs 1..=4 for every scenario); no
/// domain of that number exists when an INVALIDATE names it.
const OTHER: u32 = abi::HOSTILE_DOMAIN + 1;
/// An endpoint ID no config uses.
const NO_ENDPOINT: u32 = 0xffff_fff0;
/// The PASID of the PASID-tagged DMAs (cut to PASID_SIZE): bits in both
/// the directory index (PASID[19:6] = 0x48) and the table index.
const PASID: u32 = 0x1234;
/// Log2 of the number of CDs of the linear CD tables.
const S1CDMAX: u32 = 2;
/// S1DSS: traffic without a SubstreamID is terminated / uses SSID 0.
const S1DSS_TERMINATE: u8 = 0;
const S1DSS_SSID0: u8 = 2;
/// Where tables point when they point beyond guest RAM: inside the output
/// size of every format (OUTPUT_SIZE ≥ 48), above any RAM of this VMM.
const BEYOND_RAM: u64 = 1 << 40;
/// TCR_EL1 of a plain AArch64 regime: T0SZ 16 (48-bit input), TG0 4 KiB,
/// EPD1 (bit 23), IPS 48 bits (bits 34:32 = 5).
const TCR_48: u64 = ARM_T0SZ | (1 << 23) | (5 << 32);
/// TCR_EL1.EPD0 (bit 7): TTB0 walks disabled.
const TCR_EPD0: u64 = 1 << 7;
/// Seed of the random-looking garbage: fixed, so every run is the same.
const SEED: u64 = 0x9e37_79b9_7f4a_7c15;
/// Most table pages the part watches for writes.
const MAX_WATCHED: usize = 32;
/// The access of a DMA case.
const WRITE: bool = true;
const READ: bool = false;

/// A request case: its name, the request (head and body), the status it
/// must get.
type ReqCase<'a> = (&'a str, &'a [u8], u8);
/// An INVALIDATE case: its name, the request, the status it must get.
type InvCase<'a> = (&'a str, Invalidate, u8);
/// A DMA case: its name, its PASID tag, whether it writes, the reason of
/// the fault record it must raise.
type DmaCase<'a> = (&'a str, Option<u32>, bool, u8);

/// What garbage a table page is filled with.
#[derive(Clone, Copy)]
enum Fill {
    /// Every byte 0xff.
    Ones,
    /// Random-looking words.
    Random,
    /// Every entry points at the page itself, with these flags.
    ItselfWith(u64),
}

/// What the cases share.
struct Env {
    /// The DMA engine behind the vIOMMU.
    dma: Dma,
    /// Its endpoint.
    ep: u32,
    /// Another endpoint behind the vIOMMU, if the config has one.
    ep2: Option<u32>,
    /// What PROBE said about `ep`.
    probe: NestedProbe,
    /// A page of 0x5a the device must never write. Garbage DMAs use its
    /// guest-physical address as their IOVA: a walk that fell back to the
    /// identity would land on it.
    sentinel: u64,
    /// The xorshift state of [`Fill::Random`].
    rng: u64,
    /// Tables the device may read and never write: (address, length,
    /// digest when written).
    watched: [(u64, u64, u64); MAX_WATCHED],
    watched_len: usize,
    /// Cases answered as documented.
    cases: u32,
    /// DMAs that ended with a fault status.
    dma_faults: u32,
}

impl Env {
    /// Records one case that passed.
    fn ok(&mut self, name: &str) {
        self.cases += 1;
        println!("hostile: {name}: ok");
    }

    /// `len` bytes (whole pages) from `alloc` filled with `fill`, watched.
    fn table(&mut self, alloc: &mut Bump, len: u64, fill: Fill) -> u64 {
        let t = alloc.alloc(len.max(PAGE), PAGE);
        let mut at = t;
        while at < t + len {
            let v = match fill {
                Fill::Ones => u64::MAX,
                Fill::Random => {
                    // xorshift64*
                    let mut x = self.rng;
                    x ^= x >> 12;
                    x ^= x << 25;
                    x ^= x >> 27;
                    self.rng = x;
                    x.wrapping_mul(0x2545_f491_4f6c_dd1d)
                }
                Fill::ItselfWith(flags) => t | flags,
            };
            poke64(at, v);
            at += 8;
        }
        self.watch(t, len);
        t
    }

    /// Remembers what `len` bytes of table at `addr` hold now.
    fn watch(&mut self, addr: u64, len: u64) {
        check!(self.watched_len < MAX_WATCHED, "too many watched tables");
        self.watched[self.watched_len] = (addr, len, digest(addr, len));
        self.watched_len += 1;
    }

    /// Sends each request and checks its status.
    fn requests(&mut self, dev: &mut Iommu, cases: &[ReqCase]) {
        for &(name, request, want) in cases {
            send(dev, name, request, TAIL_SIZE, Want::Status(want));
            self.cases += 1;
        }
    }

    /// Sends each INVALIDATE and checks its status.
    fn invalidates(&mut self, dev: &mut Iommu, cases: &[InvCase]) {
        for &(name, i, want) in cases {
            self.requests(dev, &[(name, &req::invalidate(&i), want)]);
        }
    }

    /// ATTACH_TABLE `r`, which must succeed, then the DMA `cases` through
    /// the table, then DETACH.
    fn bound(&mut self, dev: &mut Iommu, name: &str, r: &[u8; 76], cases: &[DmaCase]) {
        self.requests(dev, &[(name, r, OK)]);
        for case in cases {
            self.dma_fault(dev, case);
        }
        check_eq!(dev.detach(DOMAIN, self.ep), OK, "DETACH after {name}");
    }

    /// One DMA of 64 bytes at the sentinel's address (a fill, or a compare
    /// of the page with itself): it must end with a fault status and
    /// exactly one extended record naming the endpoint, the PASID, the
    /// address and the access, with the case's reason.
    fn dma_fault(&mut self, dev: &mut Iommu, &(name, pasid, write, reason): &DmaCase) {
        self.dma.set_pasid(pasid);
        let iova = self.sentinel;
        let s = if write {
            self.dma.fill(iova, 0xee, 64)
        } else {
            self.dma.compare(iova, iova, 64).status
        };
        self.dma.set_pasid(None);
        check_eq!(s, abi::DMA_STATUS_FAULT, "{name}: DMA status");
        // Checked field by field without printing the record: serial
        // output costs an exit per byte, and the case line says it all.
        let Some(f) = dev.next_fault() else {
            println!("FAIL: {name}: no fault record on the event queue");
            rt::exit(line!());
        };
        let access = if write {
            iommu::FAULT_F_WRITE
        } else {
            iommu::FAULT_F_READ
        };
        let pasid_flag = if pasid.is_some() { n::FAULT_F_PASID } else { 0 };
        check_eq!(f.len, n::EXT_FAULT_SIZE, "{name}: record length");
        check_eq!(f.flt_type, n::FLT_DMA_UNRECOV, "{name}: flt_type");
        check_eq!(f.reason, reason, "{name}: reason");
        check_eq!(f.endpoint, self.ep, "{name}: endpoint");
        let flags = access | iommu::FAULT_F_ADDRESS | pasid_flag;
        check_eq!(f.flags, flags, "{name}: flags");
        check_eq!(f.pasid, pasid.unwrap_or(0), "{name}: PASID");
        check_eq!(f.address, iova, "{name}: address");
        check_eq!(f.grpid | f.pr_evt_flags, 0, "{name}: page-request fields");
        expect_no_fault(dev);
        self.dma_faults += 1;
        self.ok(name);
    }
}

/// FNV-1a over the 64-bit words of `len` bytes at `addr`.
fn digest(addr: u64, len: u64) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    let mut at = addr;
    while at < addr + len {
        h = (h ^ peek64(at)).wrapping_mul(0x0100_0000_01b3);
        at += 8;
    }
    h
}

/// `r` with byte `at` set to `v`.
fn with<const N: usize>(mut r: [u8; N], at: usize, v: u8) -> [u8; N] {
    r[at] = v;
    r
}

/// Runs the part on `dev` if the device offers the extension, leaving the
/// device reset with the extension negotiated (without page requests) and
/// no domain.
pub fn run(ctx: &mut Ctx, dev: &mut Iommu) {
    let offered = dev.t.device_features();
    if offered & features::ATTACH_TABLE == 0 {
        println!("hostile: nested extension not offered: its cases skipped");
        return;
    }
    dev.wanted = iommu::WANTED | features::ATTACH_TABLE;
    dev.restart();
    check_eq!(
        dev.evt_buf_len,
        n::EXT_FAULT_SIZE,
        "extended record buffers"
    );
    let (dma, ep) = ctx.dma();
    let probe = probe_nested(dev, ep, n::PSTF_INTEL_VTD, n::PGTF_X86_64);
    check!(probe.pasid_bits >= 1, "PROBE: PASID_SIZE 0");
    let ep2 = other_endpoint(ctx, dev, ep);
    let sentinel = ctx.low.pages(1);
    for i in 0..PAGE / 8 {
        poke64(sentinel + 8 * i, 0x5a5a_5a5a_5a5a_5a5a);
    }
    let mut env = Env {
        dma,
        ep,
        ep2,
        probe,
        sentinel,
        rng: SEED,
        watched: [(0, 0, 0); MAX_WATCHED],
        watched_len: 0,
        cases: 0,
        dma_faults: 0,
    };
    println!(
        "hostile: nested extension negotiated (features {:#x}): PASID_SIZE {}, formats {:#x}, second endpoint {:?}",
        dev.features, env.probe.pasid_bits, env.probe.formats, env.ep2
    );

    let vtd = env.probe.has(n::PSTF_INTEL_VTD);
    if vtd {
        attach_table_vtd(ctx, dev, &mut env);
        invalidate(dev, &mut env);
        garbage_vtd(ctx, dev, &mut env);
    }
    if env.probe.has(n::PGTF_X86_64) {
        x86_64(ctx, dev, &mut env);
    }
    if env.probe.has(n::PSTF_ARM_SMMU_V3) {
        arm_smmuv3(ctx, dev, &mut env);
    }
    if env.probe.has(n::PGTF_ARM_LPAE) {
        arm_lpae(ctx, dev, &mut env);
    }
    for (f, name) in [
        (n::PSTF_INTEL_VTD, "intel-vtd"),
        (n::PGTF_X86_64, "x86-64"),
        (n::PSTF_ARM_SMMU_V3, "arm-smmuv3"),
        (n::PGTF_ARM_LPAE, "arm-lpae"),
    ] {
        if !env.probe.has(f) {
            println!("hostile: {name} not advertised: its cases skipped");
        }
    }

    // Nothing the device did wrote the sentinel or a table.
    check!(all_bytes(sentinel, PAGE, 0x5a), "the sentinel page changed");
    for &(addr, len, d) in &env.watched[..env.watched_len] {
        check!(
            digest(addr, len) == d,
            "the device wrote the table at {addr:#x}"
        );
    }
    println!(
        "hostile: sentinel page and {} tables unchanged after {} faulted DMAs",
        env.watched_len, env.dma_faults
    );
    check!(
        dev.t.status() & virtio::STATUS_DEVICE_NEEDS_RESET == 0,
        "a nested request error asked for a reset"
    );

    if offered & features::PAGE_REQUEST != 0 && vtd {
        page_resp(ctx, dev, &mut env);
    } else {
        println!("hostile: page requests or intel-vtd not offered: PAGE_RESP cases skipped");
    }

    dev.wanted = iommu::WANTED | features::ATTACH_TABLE;
    dev.restart();
    println!(
        "hostile: nested: {} cases answered as documented, {} DMAs through hostile tables faulted",
        env.cases, env.dma_faults
    );
}

/// The first DMA engine other than `ep` whose endpoint the vIOMMU manages
/// (PROBE answers OK), if any.
fn other_endpoint(ctx: &Ctx, dev: &mut Iommu, ep: u32) -> Option<u32> {
    let count = (ctx.info.dma_count as usize).min(abi::MAX_DMA_ENGINES);
    ctx.info.dma_endpoints[..count]
        .iter()
        .filter_map(|&e| u32::try_from(e).ok())
        .find(|&e| e != ep && dev.probe(e) == OK)
}

/// ATTACH_TABLE requests the device must refuse, with a valid
/// PSTF_INTEL_VTD directory as the base; the domain kinds a table cannot
/// join; the rules of a bound table domain. Leaves the table bound.
fn attach_table_vtd(ctx: &mut Ctx, dev: &mut Iommu, env: &mut Env) {
    let (ep, bits, info) = (env.ep, env.probe.pasid_bits, ctx.info);
    let dir = VtdPasidDir::new(&mut ctx.low, bits);
    let vtd = |e: u32, b: u8, ptr: u64| req::attach_table_vtd(DOMAIN, e, b, ptr);
    let good = vtd(ep, bits, dir.dir);
    let format = |f: u16| {
        let mut r = good;
        r[12..14].copy_from_slice(&f.to_le_bytes());
        r
    };
    #[rustfmt::skip]
    let cases: &[ReqCase] = &[
        ("ATTACH_TABLE with unknown format 0", &format(0), UNSUPP),
        ("ATTACH_TABLE with unknown format 5", &format(5), UNSUPP),
        ("ATTACH_TABLE with unknown format 0xffff", &format(0xffff), UNSUPP),
        ("ATTACH_TABLE intel-vtd with flags set", &with(good, 15, 1), INVAL),
        ("ATTACH_TABLE intel-vtd with reserved byte 24 set", &with(good, 24, 1), INVAL),
        ("ATTACH_TABLE intel-vtd with reserved byte 75 set", &with(good, 75, 0x80), INVAL),
        ("ATTACH_TABLE intel-vtd pasid_bits 0", &vtd(ep, 0, dir.dir), INVAL),
        ("ATTACH_TABLE intel-vtd pasid_bits PASID_SIZE + 1", &vtd(ep, bits + 1, dir.dir), INVAL),
        ("ATTACH_TABLE intel-vtd pasid_bits 255", &vtd(ep, 255, dir.dir), INVAL),
        ("ATTACH_TABLE directory in the MMIO gap", &vtd(ep, bits, abi::MMIO_GAP_START), RANGE),
        ("ATTACH_TABLE directory beyond the end of RAM", &vtd(ep, bits, info.high_ram_end), RANGE),
        ("ATTACH_TABLE directory misaligned", &vtd(ep, bits, dir.dir + 8), RANGE),
        ("ATTACH_TABLE cut to 44 bytes", &good[..44], IOERR),
        ("ATTACH_TABLE one byte short", &good[..75], IOERR),
        ("ATTACH_TABLE head only", &good[..4], IOERR),
        ("ATTACH_TABLE of an unknown endpoint", &vtd(NO_ENDPOINT, bits, dir.dir), NOENT),
        ("ATTACH_TABLE of endpoint 0xffffffff", &vtd(u32::MAX, bits, dir.dir), NOENT),
    ];
    env.requests(dev, cases);
    // A directory of more than a page can straddle the end of low RAM and
    // wrap past 2^64 from the last page.
    if 8u64 << bits.saturating_sub(6) > PAGE {
        #[rustfmt::skip]
        let cases: &[ReqCase] = &[
            ("ATTACH_TABLE directory across the end of low RAM", &vtd(ep, bits, info.low_ram_end - PAGE), RANGE),
            ("ATTACH_TABLE directory wrapping past 2^64", &vtd(ep, bits, !0xfff), RANGE),
        ];
        env.requests(dev, cases);
    }
    let (dstart, dend) = (
        dev.t.config32(config::DOMAIN_START),
        dev.t.config32(config::DOMAIN_END),
    );
    let outside = [
        (
            "ATTACH_TABLE to a domain below domain_range",
            dstart.checked_sub(1),
        ),
        (
            "ATTACH_TABLE to a domain above domain_range",
            dend.checked_add(1),
        ),
    ];
    for (name, d) in outside {
        if let Some(d) = d {
            let r = req::attach_table_vtd(d, ep, bits, dir.dir);
            env.requests(dev, &[(name, &r, RANGE)]);
        }
    }

    // A MAP domain takes no table, and an INVALIDATE of it is refused; so
    // does a bypass domain.
    let dom = Invalidate {
        gran: n::INV_G_DOMAIN,
        types: n::INV_T_IOTLB,
        domain: DOMAIN,
        ..Default::default()
    };
    #[rustfmt::skip]
    let cases: &[ReqCase] = &[
        ("ATTACH to a MAP domain", &req::attach(DOMAIN, ep, 0), OK),
        ("ATTACH_TABLE onto a MAP domain", &good, INVAL),
        ("INVALIDATE of a MAP domain", &req::invalidate(&dom), INVAL),
    ];
    env.requests(dev, cases);
    if dev.features & features::BYPASS_CONFIG != 0 {
        #[rustfmt::skip]
        let cases: &[ReqCase] = &[
            ("ATTACH to a bypass domain", &req::attach(OTHER, ep, iommu::ATTACH_F_BYPASS), OK),
            ("ATTACH_TABLE onto a bypass domain", &req::attach_table_vtd(OTHER, ep, bits, dir.dir), INVAL),
            ("DETACH from the bypass domain", &req::detach(OTHER, ep), OK),
        ];
        env.requests(dev, cases);
    } else {
        env.requests(dev, &[("DETACH", &req::detach(DOMAIN, ep), OK)]);
    }

    // A table domain: MAP and UNMAP are refused, the table is the
    // domain's.
    #[rustfmt::skip]
    let cases: &[ReqCase] = &[
        ("ATTACH_TABLE intel-vtd", &good, OK),
        ("ATTACH_TABLE again with the same table", &good, OK),
        ("ATTACH_TABLE again with another pasid_bits", &vtd(ep, bits - 1, dir.dir), INVAL),
        ("MAP in a table domain", &req::map(DOMAIN, 0, PAGE - 1, env.sentinel, iommu::MAP_F_READ), INVAL),
        ("UNMAP in a table domain", &req::unmap(DOMAIN, 0, PAGE - 1), INVAL),
    ];
    env.requests(dev, cases);
    if let Some(e2) = env.ep2 {
        let other_dir = VtdPasidDir::new(&mut ctx.low, bits);
        #[rustfmt::skip]
        let cases: &[ReqCase] = &[
            ("plain ATTACH of a second endpoint to a table domain", &req::attach(DOMAIN, e2, 0), INVAL),
            ("ATTACH_TABLE of a second endpoint with another directory", &vtd(e2, bits, other_dir.dir), INVAL),
            ("ATTACH_TABLE of a second endpoint with the same table", &vtd(e2, bits, dir.dir), OK),
            ("DETACH of the second endpoint", &req::detach(DOMAIN, e2), OK),
        ];
        env.requests(dev, cases);
    }
}

/// INVALIDATE requests on the bound PSTF_INTEL_VTD domain: every field
/// the device must refuse, a range it must not walk, and a batch in one
/// notification whose requests each get their own status. Ends with the
/// endpoint detached.
fn invalidate(dev: &mut Iommu, env: &mut Env) {
    let bits = env.probe.pasid_bits;
    let va = Invalidate {
        gran: n::INV_G_VA,
        types: n::INV_T_IOTLB,
        flags: n::INV_F_PASID | n::INV_F_LEAF,
        domain: DOMAIN,
        pasid: 1,
        virt_start: 0x4000_0000,
        nr_pages: 1,
        granule: 12,
        ..Default::default()
    };
    let dom = Invalidate {
        gran: n::INV_G_DOMAIN,
        types: n::INV_T_IOTLB,
        domain: DOMAIN,
        ..Default::default()
    };
    let pas = Invalidate {
        gran: n::INV_G_PASID,
        types: n::INV_T_PASID | n::INV_T_IOTLB,
        flags: n::INV_F_PASID,
        domain: DOMAIN,
        pasid: 1,
        ..Default::default()
    };
    let too_wide = 1u32 << bits.min(31);
    let huge = va.range(0, 1 << 40, 12);
    #[rustfmt::skip]
    let cases: &[InvCase] = &[
        ("INVALIDATE VA, IOTLB, PASID 1, LEAF", va, OK),
        ("INVALIDATE DOMAIN, IOTLB", dom, OK),
        ("INVALIDATE PASID, PASID cache + IOTLB", pas, OK),
        ("INVALIDATE VA with the ARCHID flag", va.flags(va.flags | n::INV_F_ARCHID).archid(42), OK),
        ("INVALIDATE VA, granule 42, one page", va.range(0, 1, 42), OK),
        ("INVALIDATE granularity 0", dom.gran(0), INVAL),
        ("INVALIDATE granularity DOMAIN | PASID", pas.gran(n::INV_G_DOMAIN | n::INV_G_PASID), INVAL),
        ("INVALIDATE granularity 8", dom.gran(8), INVAL),
        ("INVALIDATE granularity 0xffff", dom.gran(0xffff), INVAL),
        ("INVALIDATE no cache type", dom.types(0), INVAL),
        ("INVALIDATE unknown cache type 8", dom.types(8), INVAL),
        ("INVALIDATE unknown flag 8", dom.flags(8), INVAL),
        ("INVALIDATE DOMAIN with LEAF", dom.flags(n::INV_F_LEAF), INVAL),
        ("INVALIDATE DOMAIN with a PASID", dom.flags(n::INV_F_PASID).pasid(1), INVAL),
        ("INVALIDATE DOMAIN with a range", dom.range(0x1000, 1, 12), INVAL),
        ("INVALIDATE PASID without the PASID flag", pas.flags(0), INVAL),
        ("INVALIDATE PASID with a range", pas.range(0, 1, 12), INVAL),
        ("INVALIDATE pasid set without the PASID flag", dom.pasid(5), INVAL),
        ("INVALIDATE archid set without the ARCHID flag", dom.archid(7), INVAL),
        ("INVALIDATE VA of the PASID cache", va.types(n::INV_T_PASID), INVAL),
        ("INVALIDATE granule 11", va.range(0x4000_0000, 1, 11), INVAL),
        ("INVALIDATE granule 43", va.range(0, 1, 43), INVAL),
        ("INVALIDATE nr_pages 0", va.range(0x4000_0000, 0, 12), INVAL),
        ("INVALIDATE virt_start not aligned on the granule", va.range(0x4000_0800, 1, 12), INVAL),
        ("INVALIDATE virt_start not aligned on a 2 MiB granule", va.range(0x4000_1000, 1, 21), INVAL),
        ("INVALIDATE range wrapping past 2^64", va.range(0xffff_ffff_ffff_f000, 2, 12), INVAL),
        ("INVALIDATE range whose size overflows", va.range(0, u64::MAX, 12), INVAL),
        ("INVALIDATE PASID beyond the directory's width", va.pasid(too_wide), RANGE),
        ("INVALIDATE PASID 0xffffffff", pas.pasid(u32::MAX), RANGE),
        ("INVALIDATE of a domain that does not exist", dom.domain(OTHER), NOENT),
        ("INVALIDATE VA of a domain that does not exist", va.domain(OTHER), NOENT),
    ];
    env.invalidates(dev, cases);
    // Reserved bytes (10-11, 20-23, 49-59) and a short body.
    let d = req::invalidate(&dom);
    #[rustfmt::skip]
    let cases: &[ReqCase] = &[
        ("INVALIDATE with reserved byte 10 set", &with(d, 10, 0x40), INVAL),
        ("INVALIDATE with reserved byte 20 set", &with(d, 20, 0x40), INVAL),
        ("INVALIDATE with reserved byte 49 set", &with(d, 49, 0x40), INVAL),
        ("INVALIDATE with reserved byte 59 set", &with(d, 59, 0x40), INVAL),
        ("INVALIDATE cut to 30 bytes", &d[..30], IOERR),
    ];
    env.requests(dev, cases);

    // A huge valid range is answered: nobody walks 2^40 pages. No clock
    // here (a busy host makes any bound flaky): the work is bounded by
    // construction, the router widening ranges past 512 pages
    // (`invalidation::tests::too_many_pages_widen_to_the_pasid_or_domain`)
    // and the software IOMMU scanning its fixed-size caches instead of
    // probing page by page, and the guest's wait on the used ring is bounded.
    let s = dev.invalidate(&huge);
    check_eq!(s, OK, "INVALIDATE of 2^40 pages");
    env.ok("INVALIDATE of 2^40 pages answered OK");

    // One notification, valid and invalid mixed: each its own status (the
    // refused ones are answered at once, the others with their batch).
    #[rustfmt::skip]
    let batch: [(Invalidate, u8); iommu::MAX_BATCH] = [
        (va, OK),
        (dom.gran(0), INVAL),
        (va.range(va.virt_start + PAGE, 1, 12), OK),
        (va.pasid(too_wide), RANGE),
        (dom.domain(OTHER), NOENT),
        (va.range(0, 1, 43), INVAL),
        (pas, OK),
        (va.range(va.virt_start, 0, 12), INVAL),
        (dom, OK),
        (dom.types(0), INVAL),
        (huge, OK),
        (pas.pasid(u32::MAX), RANGE),
        (dom.flags(8), INVAL),
        (va.range(va.virt_start + 2 * PAGE, 3, 12), OK),
        (va.domain(OTHER), NOENT),
        (va.types(n::INV_T_PASID), INVAL),
    ];
    let requests: [Invalidate; iommu::MAX_BATCH] = core::array::from_fn(|k| batch[k].0);
    let mut got = [0xffu8; iommu::MAX_BATCH];
    dev.invalidate_batch(&requests, &mut got);
    for (k, ((_, want), got)) in batch.iter().zip(&got).enumerate() {
        check_eq!(*got, *want, "batched INVALIDATE {k}");
    }
    env.cases += iommu::MAX_BATCH as u32 - 1;
    env.ok("16 INVALIDATEs in one notification, valid and invalid mixed, each with its status");

    env.requests(dev, &[("DETACH", &req::detach(DOMAIN, env.ep), OK)]);
}

/// PSTF_INTEL_VTD directories and PASID tables full of garbage, each bound
/// and DMAed through.
fn garbage_vtd(ctx: &mut Ctx, dev: &mut Iommu, env: &mut Env) {
    let (ep, bits) = (env.ep, env.probe.pasid_bits);
    let len = 8u64 << bits.saturating_sub(6);
    let pasid = Some(PASID & ((1 << bits.min(31)) - 1));
    let vtd = |dir: u64| req::attach_table_vtd(DOMAIN, ep, bits, dir);

    let d = env.table(&mut ctx.low, len, Fill::Ones);
    #[rustfmt::skip]
    let cases: &[DmaCase] = &[
        ("PASID DMA through an all-ones directory", pasid, WRITE, R_DOMAIN),
        ("untagged DMA through an all-ones directory", None, READ, R_DOMAIN),
    ];
    env.bound(
        dev,
        "ATTACH_TABLE of an all-ones PASID directory",
        &vtd(d),
        cases,
    );
    let d = env.table(&mut ctx.low, len, Fill::Random);
    #[rustfmt::skip]
    let cases: &[DmaCase] = &[
        ("PASID DMA through a random directory", pasid, WRITE, R_DOMAIN),
        ("untagged DMA through a random directory", None, WRITE, R_DOMAIN),
    ];
    env.bound(
        dev,
        "ATTACH_TABLE of a random PASID directory",
        &vtd(d),
        cases,
    );
    // Every entry points at the directory, read then as a PASID table of
    // directory entries.
    let d = env.table(&mut ctx.low, len, Fill::ItselfWith(PDE_P));
    #[rustfmt::skip]
    let cases: &[DmaCase] = &[
        ("PASID DMA through a self-referencing directory", pasid, WRITE, R_DOMAIN),
        ("untagged DMA through a self-referencing directory", None, READ, R_DOMAIN),
    ];
    env.bound(
        dev,
        "ATTACH_TABLE of a self-referencing PASID directory",
        &vtd(d),
        cases,
    );

    // One directory, a different lie under each of 8 PASIDs with a
    // directory entry each (PASID_SIZE ≥ 9: with fewer, PASIDs would share
    // entries and the guest would write through its own lies).
    let dir = VtdPasidDir::new(&mut ctx.low, bits);
    let p = |k: u32| (PASID + 64 * k) & ((1 << bits.min(31)) - 1);
    let pde = |k: u32| dir.dir + u64::from(p(k) >> 6) * 8;
    let distinct = (0..8u32).all(|a| (a + 1..8).all(|b| pde(a) != pde(b)));
    let mut cases: [DmaCase; 10] = [("", None, WRITE, R_DOMAIN); 10];
    let mut count = 0;
    if distinct {
        poke64(pde(0), abi::MMIO_GAP_START | PDE_P);
        poke64(pde(1), BEYOND_RAM | PDE_P);
        let junk = env.table(&mut ctx.low, PAGE, Fill::Random);
        poke64(pde(2), junk | PDE_P);
        let roots = [
            abi::MMIO_GAP_START,
            BEYOND_RAM,
            env.table(&mut ctx.low, PAGE, Fill::Ones),
            env.table(&mut ctx.low, PAGE, Fill::Random),
            env.table(&mut ctx.low, PAGE, Fill::ItselfWith(x86::P | x86::US)),
        ];
        for (k, root) in (3u32..).zip(roots) {
            dir.set_first_stage(&mut ctx.low, p(k), root, 9);
        }
        for k in 3..8 {
            env.watch(peek64(pde(k)) & !0xfff, PAGE);
        }
        #[rustfmt::skip]
        let lies: [DmaCase; 8] = [
            ("PASID DMA with its PASID table in the MMIO gap", Some(p(0)), WRITE, R_DOMAIN),
            ("PASID DMA with its PASID table beyond RAM", Some(p(1)), WRITE, R_DOMAIN),
            ("PASID DMA through a random PASID table", Some(p(2)), WRITE, R_DOMAIN),
            ("PASID DMA with its first-stage root in the MMIO gap", Some(p(3)), WRITE, R_MAPPING),
            ("PASID DMA with its first-stage root beyond RAM", Some(p(4)), WRITE, R_MAPPING),
            ("PASID DMA through an all-ones first-stage root", Some(p(5)), WRITE, R_MAPPING),
            ("PASID DMA through a random first-stage root", Some(p(6)), READ, R_MAPPING),
            ("PASID DMA write through a self-referencing read-only first-stage root", Some(p(7)), WRITE, R_MAPPING),
        ];
        cases[..8].copy_from_slice(&lies);
        count = 8;
    } else {
        println!(
            "hostile: PASID_SIZE {bits} too narrow for a directory whose entries lie: skipped"
        );
    }
    env.watch(dir.dir, len);
    #[rustfmt::skip]
    let width: [DmaCase; 2] = [
        ("DMA with a PASID beyond the directory's width", Some(1 << bits.min(31)), WRITE, R_DOMAIN),
        ("DMA with PASID 0xffffffff", Some(u32::MAX), READ, R_DOMAIN),
    ];
    cases[count..count + 2].copy_from_slice(&width);
    let cases = &cases[..count + 2];
    env.bound(
        dev,
        "ATTACH_TABLE of a directory whose entries lie",
        &vtd(dir.dir),
        cases,
    );
}

/// PGTF_X86_64: requests the device must refuse, tables full of garbage,
/// and leaves pointing outside RAM.
fn x86_64(ctx: &mut Ctx, dev: &mut Iommu, env: &mut Env) {
    let (ep, high_ram_end) = (env.ep, ctx.info.high_ram_end);
    let x = |levels: u8, root: u64| req::attach_table_x86(DOMAIN, ep, levels, root);
    let root = ctx.low.pages(1);
    #[rustfmt::skip]
    let cases: &[ReqCase] = &[
        ("ATTACH_TABLE x86-64 levels 3", &x(3, root), INVAL),
        ("ATTACH_TABLE x86-64 levels 6", &x(6, root), INVAL),
        ("ATTACH_TABLE x86-64 levels 0", &x(0, root), INVAL),
        ("ATTACH_TABLE x86-64 with flags set", &with(x(4, root), 15, 1), INVAL),
        ("ATTACH_TABLE x86-64 with reserved byte 30 set", &with(x(4, root), 30, 1), INVAL),
        ("ATTACH_TABLE x86-64 root misaligned", &x(4, root + 0x10), RANGE),
        ("ATTACH_TABLE x86-64 root in the MMIO gap", &x(4, abi::MMIO_GAP_START), RANGE),
        ("ATTACH_TABLE x86-64 root beyond the end of RAM", &x(4, high_ram_end), RANGE),
    ];
    env.requests(dev, cases);

    let ones = env.table(&mut ctx.low, PAGE, Fill::Ones);
    env.requests(
        dev,
        &[("ATTACH_TABLE of an all-ones x86-64 root", &x(4, ones), OK)],
    );
    let pasid = Some(PASID);
    #[rustfmt::skip]
    let cases: &[DmaCase] = &[
        ("DMA through an all-ones x86-64 root", None, WRITE, R_MAPPING),
        ("PASID DMA through a table without PASIDs", pasid, WRITE, R_DOMAIN),
    ];
    for case in cases {
        env.dma_fault(dev, case);
    }
    let dom = Invalidate {
        gran: n::INV_G_DOMAIN,
        types: n::INV_T_IOTLB,
        domain: DOMAIN,
        ..Default::default()
    };
    #[rustfmt::skip]
    let cases: &[InvCase] = &[
        ("INVALIDATE with a PASID of a table without PASIDs", dom.gran(n::INV_G_PASID).flags(n::INV_F_PASID).pasid(1), INVAL),
        ("INVALIDATE DOMAIN of a table without PASIDs", dom, OK),
    ];
    env.invalidates(dev, cases);
    check_eq!(dev.detach(DOMAIN, ep), OK, "DETACH");

    let random = env.table(&mut ctx.low, PAGE, Fill::Random);
    let case = (
        "DMA through a random 5-level x86-64 root",
        None,
        READ,
        R_MAPPING,
    );
    env.bound(
        dev,
        "ATTACH_TABLE of a random 5-level x86-64 root",
        &x(5, random),
        &[case],
    );
    // Every entry points at the root itself, present and user but
    // read-only: the walk ends after 4 reads with the root as the page.
    let selfref = env.table(&mut ctx.low, PAGE, Fill::ItselfWith(x86::P | x86::US));
    let case = (
        "DMA write through a self-referencing read-only x86-64 root",
        None,
        WRITE,
        R_MAPPING,
    );
    env.bound(
        dev,
        "ATTACH_TABLE of a self-referencing x86-64 root",
        &x(4, selfref),
        &[case],
    );

    // Sound tables whose leaves point at the device's own registers and
    // beyond RAM: the IOMMU translates, the bus refuses, no fault record,
    // no byte written there.
    let fs = X86Tables::new(&mut ctx.low);
    let (at_mmio, at_far) = (env.sentinel, env.sentinel + PAGE);
    fs.map(&mut ctx.low, at_mmio, abi::VIRTIO_MMIO_BASE, x86::LEAF_RW);
    fs.map(&mut ctx.low, at_far, BEYOND_RAM, x86::LEAF_RW);
    let name = "ATTACH_TABLE of x86-64 tables with leaves outside RAM";
    env.requests(dev, &[(name, &x(4, fs.root), OK)]);
    let status_before = dev.t.status();
    for (name, iova) in [
        (
            "DMA through a leaf on the virtio-iommu's registers",
            at_mmio,
        ),
        ("DMA through a leaf beyond RAM", at_far),
    ] {
        let s = env.dma.fill(iova, 0xee, 64);
        check_eq!(s, abi::DMA_STATUS_FAULT, "{name}: DMA status");
        expect_no_fault(dev);
        env.dma_faults += 1;
        env.ok(name);
    }
    check_eq!(dev.t.read(virtio::regs::MAGIC), virtio::MAGIC, "MagicValue");
    check_eq!(dev.t.status(), status_before, "device status");
    check_eq!(dev.detach(DOMAIN, ep), OK, "DETACH");
}

/// PSTF_ARM_SMMU_V3: requests the device must refuse, and CD tables full
/// of garbage.
fn arm_smmuv3(ctx: &mut Ctx, dev: &mut Iommu, env: &mut Env) {
    let (ep, bits) = (env.ep, u32::from(env.probe.pasid_bits));
    let s = |fmt: u8, dss: u8, ptr: u64, max: u32| {
        req::attach_table_smmuv3(DOMAIN, ep, fmt, dss, ptr, max)
    };
    let cd = CdTable::new(&mut ctx.low, S1CDMAX).ptr;
    #[rustfmt::skip]
    let cases: &[ReqCase] = &[
        // 3 is the SMMUv3's reserved value that behaves as 0 (docs/wire.md,
        // "Table walk rules"); past the 2-bit fields is invalid.
        ("ATTACH_TABLE arm-smmuv3 s1fmt 4", &s(4, 0, cd, S1CDMAX), INVAL),
        ("ATTACH_TABLE arm-smmuv3 s1dss 4", &s(0, 4, cd, S1CDMAX), INVAL),
        ("ATTACH_TABLE arm-smmuv3 s1cdmax PASID_SIZE + 1", &s(0, 0, cd, bits + 1), INVAL),
        ("ATTACH_TABLE arm-smmuv3 s1cdmax 0xffffffff", &s(0, 0, cd, u32::MAX), INVAL),
        ("ATTACH_TABLE arm-smmuv3 2-level with one leaf table of SSIDs", &s(1, 0, cd, 6), INVAL),
        ("ATTACH_TABLE arm-smmuv3 2-level 64K with one leaf table of SSIDs", &s(2, 0, cd, 10), INVAL),
        ("ATTACH_TABLE arm-smmuv3 with reserved byte 28 set", &with(s(0, 0, cd, S1CDMAX), 28, 1), INVAL),
        ("ATTACH_TABLE arm-smmuv3 CD table misaligned", &s(0, 0, cd + 8, S1CDMAX), RANGE),
        ("ATTACH_TABLE arm-smmuv3 CD table in the MMIO gap", &s(0, 0, abi::MMIO_GAP_START, S1CDMAX), RANGE),
        ("ATTACH_TABLE arm-smmuv3 CD table wrapping past 2^64", &s(0, 0, !63, S1CDMAX), RANGE),
    ];
    env.requests(dev, cases);

    let linear = |ptr: u64, dss: u8| s(0, dss, ptr, S1CDMAX);
    let ones = env.table(&mut ctx.low, PAGE, Fill::Ones);
    #[rustfmt::skip]
    let cases: &[DmaCase] = &[
        ("SSID DMA through an all-ones CD table", Some(1), WRITE, R_DOMAIN),
        ("untagged DMA (S1DSS SSID 0) through an all-ones CD table", None, READ, R_DOMAIN),
    ];
    let r = linear(ones, S1DSS_SSID0);
    env.bound(dev, "ATTACH_TABLE of an all-ones CD table", &r, cases);
    let random = env.table(&mut ctx.low, PAGE, Fill::Random);
    #[rustfmt::skip]
    let cases: &[DmaCase] = &[
        ("SSID DMA through a random CD table", Some(1), WRITE, R_DOMAIN),
        ("untagged DMA with S1DSS terminate", None, WRITE, R_DOMAIN),
    ];
    let r = linear(random, S1DSS_TERMINATE);
    env.bound(dev, "ATTACH_TABLE of a random CD table", &r, cases);

    // Valid CDs whose stage-1 tables lie: TTB0 in the MMIO gap, a level-0
    // table whose descriptors all point at itself, a random one.
    let cds = CdTable::new(&mut ctx.low, S1CDMAX);
    cds.set_cd(1, abi::MMIO_GAP_START, 1);
    let selfref = env.table(&mut ctx.low, PAGE, Fill::ItselfWith(arm::TYPE_TABLE));
    cds.set_cd(2, selfref, 2);
    cds.set_cd(3, env.table(&mut ctx.low, PAGE, Fill::Random), 3);
    env.watch(cds.ptr, PAGE);
    env.requests(
        dev,
        &[(
            "ATTACH_TABLE of a CD table whose CDs lie",
            &linear(cds.ptr, 0),
            OK,
        )],
    );
    #[rustfmt::skip]
    let cases: &[DmaCase] = &[
        ("SSID DMA with TTB0 in the MMIO gap", Some(1), WRITE, R_MAPPING),
        ("SSID DMA through a self-referencing level-0 table", Some(2), WRITE, R_MAPPING),
        ("SSID DMA through a random level-0 table", Some(3), READ, R_MAPPING),
        ("DMA with an SSID beyond s1cdmax", Some(1 << S1CDMAX), WRITE, R_DOMAIN),
    ];
    for case in cases {
        env.dma_fault(dev, case);
    }
    let beyond = Invalidate {
        gran: n::INV_G_PASID,
        types: n::INV_T_PASID | n::INV_T_IOTLB,
        flags: n::INV_F_PASID,
        domain: DOMAIN,
        pasid: 1 << S1CDMAX,
        ..Default::default()
    };
    env.invalidates(
        dev,
        &[("INVALIDATE with an SSID beyond s1cdmax", beyond, RANGE)],
    );
    check_eq!(dev.detach(DOMAIN, ep), OK, "DETACH");

    // Two levels (64 CDs per 4 KiB leaf table): one L1 descriptor all
    // ones, the next pointing at a leaf table in the MMIO gap.
    let s1cdmax = 7;
    if bits >= s1cdmax {
        let l1 = ctx.low.pages(1);
        poke64(l1, u64::MAX);
        poke64(l1 + 8, abi::MMIO_GAP_START | 1);
        env.watch(l1, PAGE);
        #[rustfmt::skip]
        let cases: &[DmaCase] = &[
            ("SSID DMA through an all-ones L1 descriptor", Some(1), WRITE, R_DOMAIN),
            ("SSID DMA through a leaf CD table in the MMIO gap", Some(65), WRITE, R_DOMAIN),
        ];
        let r = s(1, S1DSS_TERMINATE, l1, s1cdmax);
        let name = "ATTACH_TABLE of a 2-level CD table whose L1 descriptors lie";
        env.bound(dev, name, &r, cases);
    }
}

/// PGTF_ARM_LPAE: requests the device must refuse, and regimes full of
/// garbage.
fn arm_lpae(ctx: &mut Ctx, dev: &mut Iommu, env: &mut Env) {
    let ep = env.ep;
    let l = |tcr: u64, ttbr0: u64, ttbr1: u64| {
        req::attach_table_lpae(DOMAIN, ep, 1, tcr, (ttbr0, ttbr1), 0xff)
    };
    let ttb = ctx.low.pages(1);
    env.watch(ttb, PAGE);
    #[rustfmt::skip]
    let cases: &[ReqCase] = &[
        ("ATTACH_TABLE arm-lpae with ttbr1 set", &l(TCR_48, ttb, ttb), INVAL),
        ("ATTACH_TABLE arm-lpae with reserved byte 48 set", &with(l(TCR_48, ttb, 0), 48, 1), INVAL),
        // TTBR0 bits below the top table's alignment read as zero
        // (docs/wire.md, "Table walk rules"): no "misaligned" case here.
        ("ATTACH_TABLE arm-lpae ttbr0 beyond RAM", &l(TCR_48, BEYOND_RAM, 0), RANGE),
    ];
    env.requests(dev, cases);

    let case = ("DMA through an all-ones TCR", None, WRITE, R_DOMAIN);
    let r = l(u64::MAX, ttb, 0);
    env.bound(
        dev,
        "ATTACH_TABLE arm-lpae with an all-ones TCR",
        &r,
        &[case],
    );
    let ones = env.table(&mut ctx.low, PAGE, Fill::Ones);
    let case = (
        "DMA through an all-ones level-0 table",
        None,
        WRITE,
        R_MAPPING,
    );
    let r = l(TCR_48, ones, 0);
    env.bound(
        dev,
        "ATTACH_TABLE arm-lpae with an all-ones level-0 table",
        &r,
        &[case],
    );
    let case = ("DMA with TTB0 walks disabled (EPD0)", None, READ, R_MAPPING);
    let r = l(TCR_48 | TCR_EPD0, ones, 0);
    env.bound(
        dev,
        "ATTACH_TABLE arm-lpae with TTB0 walks disabled",
        &r,
        &[case],
    );
}

/// PAGE_RESP requests the device must refuse, answers that almost match a
/// pending page request, and a reset while one is pending. Leaves the
/// device reset.
fn page_resp(ctx: &mut Ctx, dev: &mut Iommu, env: &mut Env) {
    dev.wanted = iommu::WANTED | features::ATTACH_TABLE | features::PAGE_REQUEST;
    dev.restart();
    let (ep, bits) = (env.ep, env.probe.pasid_bits);
    let p = PASID & ((1 << bits.min(31)) - 1);
    let pr = |e: u32, pasid: Option<u32>, g: u32, code: u16| req::page_resp(e, pasid, g, code);
    let (success, failure) = (n::PAGE_RESP_SUCCESS, n::PAGE_RESP_FAILURE);
    let good = pr(ep, Some(p), 0, success);
    let flags = |f: u32| {
        let mut r = good;
        r[8..12].copy_from_slice(&(f | n::PAGE_RESP_F_PASID_VALID).to_le_bytes());
        r
    };
    let mut no_valid = pr(ep, None, 0, success);
    no_valid[12..16].copy_from_slice(&p.to_le_bytes());
    #[rustfmt::skip]
    let cases: &[ReqCase] = &[
        ("PAGE_RESP cut to 14 bytes", &good[..14], IOERR),
        ("PAGE_RESP with reserved byte 22 set", &with(good, 22, 1), INVAL),
        ("PAGE_RESP with reserved byte 31 set", &with(good, 31, 1), INVAL),
        ("PAGE_RESP with unknown flag 2", &flags(2), INVAL),
        ("PAGE_RESP with unknown flag 0x80000000", &flags(0x8000_0000), INVAL),
        ("PAGE_RESP with a pasid but no PASID_VALID", &no_valid, INVAL),
        ("PAGE_RESP code 3", &pr(ep, Some(p), 0, 3), INVAL),
        ("PAGE_RESP code 0xffff", &pr(ep, Some(p), 0, 0xffff), INVAL),
        ("PAGE_RESP of an unknown endpoint", &pr(NO_ENDPOINT, Some(p), 0, success), NOENT),
        ("PAGE_RESP for a group never sent", &pr(ep, Some(p), 0x1ff, success), NOENT),
        ("PAGE_RESP without PASID for a group never sent", &pr(ep, None, 0, failure), NOENT),
    ];
    env.requests(dev, cases);

    // A real page request, answered wrongly first: the DMA keeps waiting.
    let fs = X86Tables::new(&mut ctx.low);
    let iova = env.sentinel;
    fs.leaf_slot(&mut ctx.low, iova);
    let dir = VtdPasidDir::new(&mut ctx.low, bits);
    dir.set_first_stage(&mut ctx.low, p, fs.root, 9);
    let r = req::attach_table_vtd(DOMAIN, ep, bits, dir.dir);
    env.requests(dev, &[("ATTACH_TABLE with a not-present page", &r, OK)]);
    let g = wait_for_page(dev, env, p, iova);
    let (other, other_name) = match env.ep2 {
        Some(e2) => (e2, "PAGE_RESP of the other endpoint for the group"),
        None => (
            NO_ENDPOINT,
            "PAGE_RESP of an unknown endpoint for the group",
        ),
    };
    #[rustfmt::skip]
    let near: &[ReqCase] = &[
        ("PAGE_RESP naming another PASID", &pr(ep, Some(p ^ 1), g, success), NOENT),
        ("PAGE_RESP without the PASID", &pr(ep, None, g, success), NOENT),
        ("PAGE_RESP naming the next group", &pr(ep, Some(p), (g + 1) & 0x1ff, success), NOENT),
        (other_name, &pr(other, Some(p), g, success), NOENT),
    ];
    for case in near {
        env.requests(dev, &[*case]);
        let s = env.dma.status();
        check_eq!(
            s,
            abi::DMA_STATUS_PAGE_WAIT,
            "{}: the DMA still waits",
            case.0
        );
    }
    #[rustfmt::skip]
    let cases: &[ReqCase] = &[
        ("PAGE_RESP FAILURE for the group", &pr(ep, Some(p), g, failure), OK),
    ];
    env.requests(dev, cases);
    check_eq!(env.dma.status(), abi::DMA_STATUS_FAULT, "DMA after FAILURE");
    env.dma_faults += 1;
    let r = pr(ep, Some(p), g, success);
    env.requests(
        dev,
        &[("second PAGE_RESP for the answered group", &r, NOENT)],
    );

    // A reset while a page request waits: the DMA fails, the group is
    // forgotten.
    let g = wait_for_page(dev, env, p, iova);
    dev.restart();
    let s = env.dma.status();
    check_eq!(
        s,
        abi::DMA_STATUS_FAULT,
        "DMA waiting for a page across a reset"
    );
    env.dma_faults += 1;
    env.ok("device reset while a DMA waits for a page: the DMA faults");
    let r = pr(ep, Some(p), g, success);
    env.requests(
        dev,
        &[(
            "PAGE_RESP after the reset for the forgotten group",
            &r,
            NOENT,
        )],
    );
    env.dma.set_pasid(None);
}

/// A PASID fill of the not-present page at `iova` waits; returns the group
/// of the page request it sent.
fn wait_for_page(dev: &mut Iommu, env: &mut Env, pasid: u32, iova: u64) -> u32 {
    env.dma.set_pasid(Some(pasid));
    let s = env.dma.fill(iova, 0xee, 64);
    check_eq!(s, abi::DMA_STATUS_PAGE_WAIT, "DMA to a not-present page");
    let f = expect_ext_fault(
        dev,
        n::FLT_PAGE_REQ,
        iommu::FAULT_R_MAPPING,
        env.ep,
        Some(pasid),
        iova,
        iommu::FAULT_F_WRITE,
    );
    env.ok("PASID DMA to a not-present page waits for a page request");
    f.grpid
}

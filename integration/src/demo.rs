//! The demo session behind `viommu-vm`: a scripted driver talks to the
//! device through a real virtqueue in guest memory, the config's emulated
//! DMA devices move data through the vIOMMU, and every step is printed with
//! what the device answered and whether that is what the spec expects.

use std::io::Write;

use anyhow::{bail, Result};
use vm_memory::{Bytes, GuestAddress};
use vmm_iommu::testing::{driver_features, layout, Harness};
use vmm_iommu::wire::{
    AttachReq, DetachReq, MapReq, Request, ResvMemProperty, Status, UnmapReq,
    VIRTIO_IOMMU_ATTACH_F_BYPASS, VIRTIO_IOMMU_FAULT_R_DOMAIN, VIRTIO_IOMMU_FAULT_R_MAPPING,
    VIRTIO_IOMMU_F_ATTACH_TABLE, VIRTIO_IOMMU_F_BYPASS_CONFIG, VIRTIO_IOMMU_F_PAGE_REQUEST,
    VIRTIO_IOMMU_MAP_F_READ, VIRTIO_IOMMU_MAP_F_WRITE, VIRTIO_IOMMU_T_ATTACH,
    VIRTIO_IOMMU_T_DETACH, VIRTIO_IOMMU_T_MAP, VIRTIO_IOMMU_T_PROBE, VIRTIO_IOMMU_T_UNMAP,
};

use crate::config::{DeviceKind, VmConfig};
use crate::dma::DmaEngine;

/// What the demo checked.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DemoReport {
    /// Checks made.
    pub checks: u32,
    /// Checks that did not hold.
    pub failed: u32,
}

/// IOVA window the demo maps.
const IOVA: u64 = 0x1000_0000;
/// Guest-physical buffers the demo maps (inside the harness's free area).
const BUF: u64 = layout::FREE;
const PAGE: u64 = 0x1000;

fn describe(r: &Request) -> String {
    match r {
        Request::Attach(a) => format!(
            "ATTACH endpoint={} domain={}{}",
            a.endpoint,
            a.domain,
            if a.flags & VIRTIO_IOMMU_ATTACH_F_BYPASS != 0 {
                " flags=BYPASS"
            } else {
                ""
            }
        ),
        Request::Detach(d) => format!("DETACH endpoint={} domain={}", d.endpoint, d.domain),
        Request::Map(m) => format!(
            "MAP domain={} virt=[{:#x}, {:#x}] phys={:#x} flags={}{}",
            m.domain,
            m.virt_start,
            m.virt_end,
            m.phys_start,
            if m.flags & VIRTIO_IOMMU_MAP_F_READ != 0 {
                "R"
            } else {
                "-"
            },
            if m.flags & VIRTIO_IOMMU_MAP_F_WRITE != 0 {
                "W"
            } else {
                "-"
            },
        ),
        Request::Unmap(u) => format!(
            "UNMAP domain={} virt=[{:#x}, {:#x}]",
            u.domain, u.virt_start, u.virt_end
        ),
        Request::Probe(p) => format!("PROBE endpoint={}", p.endpoint),
        other => format!("request type {}", other.req_type()),
    }
}

struct Session<'a, W: Write> {
    h: Harness,
    out: &'a mut W,
    report: DemoReport,
    step: u32,
}

impl<W: Write> Session<'_, W> {
    fn check(&mut self, ok: bool, what: &str) -> Result<()> {
        self.report.checks += 1;
        if !ok {
            self.report.failed += 1;
        }
        writeln!(
            self.out,
            "      {} {what}",
            if ok { "ok  " } else { "FAIL" }
        )?;
        Ok(())
    }

    fn request(&mut self, r: Request, expect: Status) -> Result<Status> {
        self.step += 1;
        let s = self.h.send(&r);
        writeln!(
            self.out,
            "[{:>2}] {:<62} -> {:?}",
            self.step,
            describe(&r),
            s
        )?;
        self.check(s == expect, &format!("status {expect:?} expected"))?;
        Ok(s)
    }
}

fn map(domain: u32, iova: u64, phys: u64, pages: u64, flags: u32) -> Request {
    Request::Map(MapReq {
        domain,
        virt_start: iova,
        virt_end: iova + pages * PAGE - 1,
        phys_start: phys,
        flags,
    })
}

fn attach(domain: u32, endpoint: u32, flags: u32) -> Request {
    Request::Attach(AttachReq {
        domain,
        endpoint,
        flags,
        reserved: [0; 4],
    })
}

/// Runs the demo session on `cfg`, printing to `out`.
pub fn run_demo<W: Write>(cfg: &VmConfig, out: &mut W) -> Result<DemoReport> {
    if let Some(d) = cfg.devices.iter().find(|d| d.kind == DeviceKind::Vfio) {
        bail!(
            "devices[{}] ({}): VFIO passthrough is not implemented yet",
            cfg.devices.iter().position(|x| x.id == d.id).unwrap_or(0),
            d.id
        );
    }
    let dma_eps: Vec<u32> = cfg
        .devices
        .iter()
        .filter(|d| d.iommu && d.kind == DeviceKind::EmulatedDma)
        .map(|d| d.endpoint)
        .collect();
    let Some(&ep) = dma_eps.first() else {
        bail!("devices: the demo needs at least one emulated-dma device with \"iommu\": true");
    };
    let mem_mib = cfg.memory.size_mib.max(8);
    // The scripted session drives MAP mode: it leaves the nested
    // extension's features unaccepted (the KVM guests exercise them).
    let nested_bits = (1u64 << VIRTIO_IOMMU_F_ATTACH_TABLE) | (1u64 << VIRTIO_IOMMU_F_PAGE_REQUEST);
    let h = Harness::with_features(&cfg.iommu, &cfg.endpoints(), mem_mib, |d| {
        driver_features(d) & !nested_bits
    });
    let mut s = Session {
        h,
        out,
        report: DemoReport::default(),
        step: 0,
    };
    let c = s.h.dev.config();
    writeln!(
        s.out,
        "device: virtio-iommu (id {}), {} MiB guest RAM, endpoints {:?}",
        s.h.dev.device_type(),
        mem_mib,
        cfg.endpoints()
    )?;
    writeln!(
        s.out,
        "config space: page_size_mask={:#x} input_range=[{:#x}, {:#x}] domain_range=[{}, {}] probe_size={} bypass={}",
        c.page_size_mask, c.input_start, c.input_end, c.domain_start, c.domain_end, c.probe_size, c.bypass
    )?;
    writeln!(
        s.out,
        "features: offered {:#x}, accepted {:#x}",
        s.h.dev.avail_features(),
        s.h.dev.acked_features()
    )?;
    if cfg.iommu.nested.is_some() {
        writeln!(
            s.out,
            "nested extension: offered, not accepted by this MAP-mode session (the KVM guests run the nested scenarios)"
        )?;
    }
    writeln!(s.out)?;

    // PROBE every endpoint before attaching it, as the spec asks of drivers.
    for &e in &cfg.endpoints() {
        s.step += 1;
        let (st, props) = s.h.probe(e, c.probe_size);
        writeln!(s.out, "[{:>2}] PROBE endpoint={e:<52} -> {st:?}", s.step)?;
        let mut off = 0;
        let mut n = 0;
        while let Some(p) = props.get(off..).and_then(ResvMemProperty::decode) {
            writeln!(
                s.out,
                "      RESV_MEM {} [{:#x}, {:#x}]",
                if p.subtype == 1 {
                    "MSI     "
                } else {
                    "RESERVED"
                },
                p.start,
                p.end
            )?;
            off += 24;
            n += 1;
        }
        let zero_rest = props[off..].iter().all(|&b| b == 0);
        s.check(
            st == Status::Ok && n == cfg.iommu.reserved_regions.len() && zero_rest,
            "one RESV_MEM per reserved region, rest zero-filled",
        )?;
    }

    // A domain with mappings, and DMA through it.
    s.request(attach(1, ep, 0), Status::Ok)?;
    let src = BUF;
    let dst = BUF + 2 * PAGE;
    let ro = BUF + 4 * PAGE;
    s.h.mem
        .write_slice(b"virtio-iommu demo: DMA through IOVAs", GuestAddress(src))?;
    s.request(
        map(
            1,
            IOVA,
            src,
            2,
            VIRTIO_IOMMU_MAP_F_READ | VIRTIO_IOMMU_MAP_F_WRITE,
        ),
        Status::Ok,
    )?;
    s.request(
        map(
            1,
            IOVA + 0x10000,
            dst,
            2,
            VIRTIO_IOMMU_MAP_F_READ | VIRTIO_IOMMU_MAP_F_WRITE,
        ),
        Status::Ok,
    )?;
    s.request(
        map(1, IOVA + 0x20000, ro, 1, VIRTIO_IOMMU_MAP_F_READ),
        Status::Ok,
    )?;

    let dma = DmaEngine::new(s.h.dev.viommu(), ep, s.h.mem.clone());
    let r = dma.copy(IOVA, IOVA + 0x10000, 36);
    writeln!(
        s.out,
        "     DMA endpoint={ep} copy {:#x} -> {:#x} (36 bytes): {}",
        IOVA,
        IOVA + 0x10000,
        match &r {
            Ok(()) => "done".to_string(),
            Err(e) => e.to_string(),
        }
    )?;
    let mut got = [0u8; 36];
    s.h.mem.read_slice(&mut got, GuestAddress(dst))?;
    s.check(
        r.is_ok() && &got == b"virtio-iommu demo: DMA through IOVAs",
        "bytes arrived at the guest-physical page behind the IOVA",
    )?;

    s.h.add_event_buffers(8, 24);
    let r = dma.fill(IOVA + 0x20000, 0xff, 64);
    writeln!(
        s.out,
        "     DMA endpoint={ep} write to read-only mapping {:#x}: {}",
        IOVA + 0x20000,
        match &r {
            Ok(()) => "done".to_string(),
            Err(e) => e.to_string(),
        }
    )?;
    let faults = s.h.collect_faults();
    report_faults(&mut s, &faults)?;
    s.check(
        r.is_err()
            && faults.first().and_then(|f| f.1).is_some_and(|f| {
                f.reason == VIRTIO_IOMMU_FAULT_R_MAPPING && f.address == IOVA + 0x20000
            }),
        "write refused, MAPPING fault with the address on the eventq",
    )?;

    // What a hostile or buggy driver gets.
    s.request(
        map(1, IOVA + 0x123, src, 1, VIRTIO_IOMMU_MAP_F_READ),
        Status::Range,
    )?;
    s.request(
        map(1, IOVA + PAGE, src, 1, VIRTIO_IOMMU_MAP_F_READ),
        Status::Inval,
    )?;
    s.request(map(1, IOVA + 0x40000, src, 1, 0x80), Status::Inval)?;
    s.request(map(7, IOVA, src, 1, VIRTIO_IOMMU_MAP_F_READ), Status::NoEnt)?;
    if let Some(r) = cfg.iommu.reserved_regions.first() {
        s.request(
            map(1, r.start & !(PAGE - 1), src, 1, VIRTIO_IOMMU_MAP_F_READ),
            Status::Range,
        )?;
    }
    s.request(
        Request::Unmap(UnmapReq {
            domain: 1,
            virt_start: IOVA,
            virt_end: IOVA + PAGE - 1,
            reserved: [0; 4],
        }),
        Status::Range,
    )?;
    s.step += 1;
    let (len, w) = s.h.send_raw(&[&[0x42, 0, 0, 0]], &[4]);
    writeln!(
        s.out,
        "[{:>2}] {:<62} -> used length {len}",
        s.step, "unknown request type 0x42"
    )?;
    s.check(len == 0 && w == [0xa5; 4], "buffer returned unwritten")?;

    // UNMAP takes effect before its status: the next DMA faults.
    s.request(
        Request::Unmap(UnmapReq {
            domain: 1,
            virt_start: IOVA,
            virt_end: IOVA + 0x1ffff,
            reserved: [0; 4],
        }),
        Status::Ok,
    )?;
    let r = dma.read(IOVA, 16);
    writeln!(
        s.out,
        "     DMA endpoint={ep} read {:#x} after UNMAP: {}",
        IOVA,
        match &r {
            Ok(_) => "done".to_string(),
            Err(e) => e.to_string(),
        }
    )?;
    let faults = s.h.collect_faults();
    report_faults(&mut s, &faults)?;
    s.check(
        r.is_err() && faults.len() == 1,
        "read refused, one fault delivered",
    )?;

    // A second endpoint in a bypass domain, if the config has one.
    let bypass_ok = s.h.dev.acked_features() & (1 << VIRTIO_IOMMU_F_BYPASS_CONFIG) != 0;
    if let (Some(&ep2), true) = (dma_eps.get(1), bypass_ok) {
        s.request(attach(2, ep2, VIRTIO_IOMMU_ATTACH_F_BYPASS), Status::Ok)?;
        let dma2 = DmaEngine::new(s.h.dev.viommu(), ep2, s.h.mem.clone());
        let r = dma2.read(src, 8);
        writeln!(
            s.out,
            "     DMA endpoint={ep2} read GPA {src:#x} in bypass domain: {}",
            match &r {
                Ok(b) => format!("{:?}", String::from_utf8_lossy(b)),
                Err(e) => e.to_string(),
            }
        )?;
        s.check(
            r.is_ok_and(|b| b == b"virtio-i"),
            "identity translation in a bypass domain",
        )?;
        s.request(map(2, IOVA, src, 1, VIRTIO_IOMMU_MAP_F_READ), Status::Inval)?;
        s.request(
            Request::Detach(DetachReq {
                domain: 2,
                endpoint: ep2,
            }),
            Status::Ok,
        )?;
    }

    // DETACH: the endpoint is unattached, and (bypass off) cannot reach RAM.
    s.request(
        Request::Detach(DetachReq {
            domain: 1,
            endpoint: ep,
        }),
        Status::Ok,
    )?;
    let r = dma.read(src, 8);
    let faults = s.h.collect_faults();
    writeln!(
        s.out,
        "     DMA endpoint={ep} read GPA {src:#x} while unattached: {}",
        match &r {
            Ok(_) => "done (bypass)".to_string(),
            Err(e) => e.to_string(),
        }
    )?;
    report_faults(&mut s, &faults)?;
    if c.bypass == 1 {
        s.check(r.is_ok(), "unattached endpoint bypasses (config bypass=1)")?;
    } else {
        s.check(
            r.is_err()
                && faults
                    .first()
                    .and_then(|f| f.1)
                    .is_some_and(|f| f.reason == VIRTIO_IOMMU_FAULT_R_DOMAIN),
            "unattached endpoint refused with a DOMAIN fault",
        )?;
    }
    let domains = s.h.dev.viommu().state().domain_count();
    s.check(domains == 0, "the last DETACH ended every domain")?;

    let st = s.h.dev.stats().clone();
    writeln!(s.out)?;
    writeln!(
        s.out,
        "requests: ATTACH {} DETACH {} MAP {} UNMAP {} PROBE {} (unknown type {}, no tail {})",
        st.requests[usize::from(VIRTIO_IOMMU_T_ATTACH)],
        st.requests[usize::from(VIRTIO_IOMMU_T_DETACH)],
        st.requests[usize::from(VIRTIO_IOMMU_T_MAP)],
        st.requests[usize::from(VIRTIO_IOMMU_T_UNMAP)],
        st.requests[usize::from(VIRTIO_IOMMU_T_PROBE)],
        st.unknown_type,
        st.no_tail
    )?;
    let names = [
        "OK", "IOERR", "UNSUPP", "DEVERR", "INVAL", "RANGE", "NOENT", "FAULT", "NOMEM",
    ];
    let statuses: Vec<String> = names
        .iter()
        .zip(st.statuses.iter())
        .filter(|(_, &n)| n > 0)
        .map(|(name, n)| format!("{name} {n}"))
        .collect();
    writeln!(s.out, "statuses: {}", statuses.join(", "))?;
    writeln!(
        s.out,
        "faults: {} delivered on the eventq, {} dropped; mappings removed by UNMAP: {}",
        st.faults_delivered,
        s.h.dev.viommu().faults().dropped(),
        st.unmapped
    )?;
    writeln!(
        s.out,
        "checks: {} passed, {} failed",
        s.report.checks - s.report.failed,
        s.report.failed
    )?;
    Ok(s.report)
}

fn report_faults<W: Write>(
    s: &mut Session<'_, W>,
    faults: &[(u32, Option<vmm_iommu::wire::FaultRecord>)],
) -> Result<()> {
    for (_, f) in faults {
        if let Some(f) = f {
            let reason = match f.reason {
                0 => "UNKNOWN",
                1 => "DOMAIN",
                2 => "MAPPING",
                _ => "?",
            };
            writeln!(
                s.out,
                "      eventq: fault reason={reason} endpoint={} address={:#x} flags={:#x}",
                f.endpoint, f.address, f.flags
            )?;
        }
    }
    Ok(())
}

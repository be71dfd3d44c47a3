//! Scenario 6, a hostile driver: malformed requests, abused descriptor
//! chains, broken queues, transport misuse and bad DMA arguments. Each
//! gets the status the spec asks for, or its buffer back unwritten, or a
//! device that asks to be reset — and the VMM keeps running. When the
//! device offers the nested extension, its requests and tables are abused
//! too ([`hostile_nested`]), and scenario 3 then passes in the same VM.
//! Finally the device is reset and scenario 1 passes in the same VM.

use super::{hostile_nested, map, nested_vtd, probe_nested, Ctx};
use crate::abi;
use crate::iommu::{self, config, req, status, Iommu, Reply, MAP_F_READ, MAP_F_WRITE, TAIL_SIZE};
use crate::rt::{self, peek8};
use crate::virtio::{self, regs, Seg, DESC_F_NEXT, DESC_F_WRITE};

const PAGE: u64 = 4096;
const DOMAIN: u32 = abi::HOSTILE_DOMAIN;
/// An endpoint ID no config uses.
const NO_ENDPOINT: u32 = 0xffff_fff0;
/// An address far outside guest RAM and the MMIO gap.
const NOWHERE: u64 = 0xdead_0000_0000;
const DESC_F_INDIRECT: u16 = 4;

/// What a hostile request should get back.
#[derive(Clone, Copy)]
pub(super) enum Want {
    /// This status in the tail.
    Status(u8),
    /// The buffers back with used length 0 and nothing written.
    Unwritten,
}

/// Checks that `r` is what `want` says, and reports the case on serial.
pub(super) fn expect(dev: &Iommu, name: &str, r: Reply, want: Want, writable: u32) {
    match want {
        Want::Status(s) => {
            check!(
                r.status == Some(s),
                "{name}: status {:?} (used len {}), want {s}",
                r.status,
                r.used_len
            );
        }
        Want::Unwritten => {
            check!(
                r.used_len == 0 && r.status.is_none(),
                "{name}: used len {}, status {:?}, want unwritten",
                r.used_len,
                r.status
            );
            if writable >= TAIL_SIZE {
                check!(
                    peek8(dev.resp_buf + u64::from(writable - TAIL_SIZE)) == 0xa5,
                    "{name}: tail written"
                );
            }
        }
    }
    println!("hostile: {name}: ok");
}

/// Sends `request` with `writable` device-writable bytes and checks the
/// answer against `want`.
pub(super) fn send(dev: &mut Iommu, name: &str, request: &[u8], writable: u32, want: Want) {
    let r = dev.send(request, writable);
    expect(dev, name, r, want, writable);
}

/// Runs the scenario.
pub fn run(ctx: &mut Ctx) {
    let mut dev = ctx.iommu();
    println!("hostile: start (features {:#x})", dev.features);
    let (dma, ep) = ctx.dma();
    check_eq!(dev.attach(DOMAIN, ep, 0), status::OK, "ATTACH");

    requests(ctx, &mut dev, ep);
    chains(ctx, &mut dev);
    queues(&mut dev);
    transport(&mut dev);
    dma_arguments(ctx, &dma);

    hostile_nested::run(ctx, &mut dev);
    if dev.features & iommu::features::ATTACH_TABLE != 0 {
        if nested_vtd_runs(&mut dev, ep) {
            println!("hostile: running scenario 3 in the same VM");
            nested_vtd::run_on(ctx, &mut dev);
        } else {
            println!("hostile: scenario 3 cannot run on this config: skipped");
        }
    }

    // A clean start, then the whole of scenario 1 on the same device.
    dev.wanted = iommu::WANTED;
    dev.restart();
    println!("hostile: device reset, running scenario 1 in the same VM");
    map::run_on(ctx, &mut dev);
    println!("hostile: PASS");
}

/// Whether scenario 3 can run on `dev`: PROBE offers intel-vtd over
/// x86-64 with PASIDs wide enough, and its domain is in `domain_range`
/// (the VMM's requirements for it, seen from the guest).
fn nested_vtd_runs(dev: &mut Iommu, ep: u32) -> bool {
    let p = probe_nested(
        dev,
        ep,
        iommu::nested::PSTF_INTEL_VTD,
        iommu::nested::PGTF_X86_64,
    );
    let d = abi::NESTED_VTD_DOMAIN;
    p.table_page_sizes.is_some_and(|s| s & PAGE != 0)
        && p.pasid_bits >= abi::NESTED_PASID_BITS
        && (dev.t.config32(config::DOMAIN_START)..=dev.t.config32(config::DOMAIN_END)).contains(&d)
}

/// Well-framed requests with bad contents.
fn requests(ctx: &mut Ctx, dev: &mut Iommu, ep: u32) {
    let st = Want::Status;
    let attach = req::attach(DOMAIN, ep, 0);
    send(
        dev,
        "ATTACH cut short",
        &attach[..12],
        TAIL_SIZE,
        st(status::IOERR),
    );
    send(
        dev,
        "request without a head",
        &attach[..2],
        TAIL_SIZE,
        st(status::IOERR),
    );
    send(
        dev,
        "unknown request type 0x42",
        &[0x42, 0, 0, 0, 1, 2, 3, 4],
        TAIL_SIZE,
        Want::Unwritten,
    );
    send(
        dev,
        "request type 0",
        &[0u8; 24],
        TAIL_SIZE,
        Want::Unwritten,
    );

    let mut r = req::attach(DOMAIN, ep, 0);
    r[16] = 1;
    send(
        dev,
        "ATTACH with reserved bytes set",
        &r,
        TAIL_SIZE,
        st(status::INVAL),
    );
    send(
        dev,
        "ATTACH with an unknown flag",
        &req::attach(DOMAIN, ep, 0x80),
        TAIL_SIZE,
        st(status::INVAL),
    );
    send(
        dev,
        "ATTACH of an unknown endpoint",
        &req::attach(DOMAIN, NO_ENDPOINT, 0),
        TAIL_SIZE,
        st(status::NOENT),
    );
    let (dstart, dend) = (
        dev.t.config32(config::DOMAIN_START),
        dev.t.config32(config::DOMAIN_END),
    );
    if let Some(d) = dstart.checked_sub(1).or_else(|| dend.checked_add(1)) {
        send(
            dev,
            "ATTACH to a domain outside domain_range",
            &req::attach(d, ep, 0),
            TAIL_SIZE,
            st(status::RANGE),
        );
    }
    send(
        dev,
        "DETACH from a domain it is not in",
        &req::detach(DOMAIN + 1, ep),
        TAIL_SIZE,
        st(status::INVAL),
    );

    let mut u = req::unmap(DOMAIN, 0, PAGE - 1);
    u[24] = 1;
    send(
        dev,
        "UNMAP with reserved bytes set",
        &u,
        TAIL_SIZE,
        st(status::INVAL),
    );

    let info = ctx.info;
    let iova = abi::IOVA_WINDOW_START;
    let rw = MAP_F_READ | MAP_F_WRITE;
    let map = |virt: u64, pages: u64, phys: u64, flags: u32| {
        req::map(DOMAIN, virt, virt + pages * PAGE - 1, phys, flags)
    };
    // A memory MAP may name guest-physical addresses that are not RAM
    // (Linux's identity domains map the whole input range one to one):
    // accepted; a DMA there fails when it happens. Only a wrap is RANGE.
    send(
        dev,
        "MAP of the hole between the RAM regions",
        &map(iova, 1, info.low_ram_end, rw),
        TAIL_SIZE,
        st(status::OK),
    );
    send(
        dev,
        "UNMAP of it",
        &req::unmap(DOMAIN, iova, iova + 1 * PAGE - 1),
        TAIL_SIZE,
        st(status::OK),
    );
    send(
        dev,
        "MAP across the end of low RAM",
        &map(iova, 2, info.low_ram_end - PAGE, rw),
        TAIL_SIZE,
        st(status::OK),
    );
    send(
        dev,
        "UNMAP of it",
        &req::unmap(DOMAIN, iova, iova + 2 * PAGE - 1),
        TAIL_SIZE,
        st(status::OK),
    );
    send(
        dev,
        "MAP past the end of high RAM",
        &map(iova, 2, info.high_ram_end - PAGE, rw),
        TAIL_SIZE,
        st(status::OK),
    );
    send(
        dev,
        "UNMAP of it",
        &req::unmap(DOMAIN, iova, iova + 2 * PAGE - 1),
        TAIL_SIZE,
        st(status::OK),
    );
    send(
        dev,
        "MAP of MMIO without the MMIO flag",
        &map(iova, 1, abi::VIRTIO_MMIO_BASE, rw),
        TAIL_SIZE,
        st(status::OK),
    );
    send(
        dev,
        "UNMAP of it",
        &req::unmap(DOMAIN, iova, iova + 1 * PAGE - 1),
        TAIL_SIZE,
        st(status::OK),
    );
    send(
        dev,
        "MAP whose physical range wraps",
        &map(iova, 2, 0xffff_ffff_ffff_f000, rw),
        TAIL_SIZE,
        st(status::RANGE),
    );
    send(
        dev,
        "MAP with virt_end below virt_start",
        &req::map(DOMAIN, iova + PAGE, iova, 0, rw),
        TAIL_SIZE,
        st(status::INVAL),
    );
    send(
        dev,
        "MAP not aligned on the granule",
        &map(iova + 0x123, 1, 0x40_0000, rw),
        TAIL_SIZE,
        st(status::RANGE),
    );
    send(
        dev,
        "MAP with an unknown flag",
        &map(iova, 1, 0x40_0000, 0x80),
        TAIL_SIZE,
        st(status::INVAL),
    );
    send(
        dev,
        "MAP in a domain that does not exist",
        &req::map(DOMAIN + 1, iova, iova + PAGE - 1, 0x40_0000, rw),
        TAIL_SIZE,
        st(status::NOENT),
    );
    if info.msi_end != abi::NO_MSI_REGION {
        let at = info.msi_start & !(PAGE - 1);
        send(
            dev,
            "MAP over the reserved MSI region",
            &map(at, 1, 0x40_0000, rw),
            TAIL_SIZE,
            st(status::RANGE),
        );
    }
    let input_end = dev.t.config64(config::INPUT_END);
    if input_end < u64::MAX - 2 * PAGE {
        send(
            dev,
            "MAP outside input_range",
            &map(input_end + 1, 1, 0x40_0000, rw),
            TAIL_SIZE,
            st(status::RANGE),
        );
    }
    let buf = ctx.low.pages(2);
    send(
        dev,
        "MAP",
        &map(iova, 2, buf, rw),
        TAIL_SIZE,
        st(status::OK),
    );
    send(
        dev,
        "MAP overlapping a mapping",
        &map(iova + PAGE, 2, buf, rw),
        TAIL_SIZE,
        st(status::INVAL),
    );
    send(
        dev,
        "UNMAP that would split a mapping",
        &req::unmap(DOMAIN, iova, iova + PAGE - 1),
        TAIL_SIZE,
        st(status::RANGE),
    );
    send(
        dev,
        "UNMAP of the whole mapping",
        &req::unmap(DOMAIN, iova, iova + 2 * PAGE - 1),
        TAIL_SIZE,
        st(status::OK),
    );
    send(
        dev,
        "PROBE with a buffer below probe_size",
        &req::probe(ep),
        8,
        st(status::INVAL),
    );
}

/// Descriptor chains a driver must never build.
fn chains(ctx: &mut Ctx, dev: &mut Iommu) {
    let info = ctx.info;
    let st = Want::Status;
    // A request the device can always answer: ATTACH of an endpoint that
    // does not exist, which changes nothing.
    let harmless = req::attach(DOMAIN, NO_ENDPOINT, 0);
    rt::write_bytes(dev.req_buf, &harmless);
    let (rq, rs) = (dev.req_buf, dev.resp_buf);
    let r = |addr: u64, len: u32| Seg {
        addr,
        len,
        write: false,
    };
    let w = |addr: u64, len: u32| Seg {
        addr,
        len,
        write: true,
    };
    let chain = |dev: &mut Iommu, name: &str, segs: &[Seg], want: Want| {
        rt::write_bytes(dev.req_buf, &harmless);
        for i in 0..u64::from(TAIL_SIZE) {
            rt::poke8(dev.resp_buf + i, 0xa5);
        }
        let reply = dev.send_segs(segs);
        expect(dev, name, reply, want, TAIL_SIZE);
    };
    chain(
        dev,
        "request in a device-writable descriptor",
        &[w(rq, 20), w(rs, 4)],
        st(status::IOERR),
    );
    chain(
        dev,
        "tail in a device-readable descriptor",
        &[r(rq, 20), r(rs, 4)],
        Want::Unwritten,
    );
    chain(
        dev,
        "readable descriptor after a writable one",
        &[r(rq, 20), w(rs, 4), r(rq, 20)],
        st(status::IOERR),
    );
    chain(
        dev,
        "readable descriptor outside guest RAM",
        &[r(NOWHERE, 20), w(rs, 4)],
        st(status::IOERR),
    );
    chain(
        dev,
        "readable descriptor on the device's own MMIO",
        &[r(abi::VIRTIO_MMIO_BASE, 20), w(rs, 4)],
        st(status::IOERR),
    );
    chain(
        dev,
        "readable descriptor across the end of low RAM",
        &[r(info.low_ram_end - 8, 20), w(rs, 4)],
        st(status::IOERR),
    );
    chain(
        dev,
        "writable descriptor outside guest RAM",
        &[r(rq, 20), w(NOWHERE, 4)],
        Want::Unwritten,
    );
    chain(
        dev,
        "zero-length descriptors",
        &[r(rq, 0), r(rq, 20), w(rs, 0), w(rs, 4)],
        st(status::NOENT),
    );
    chain(
        dev,
        "readable length of nearly 4 GiB",
        &[r(rq, 0xffff_0000), w(rs, 4)],
        st(status::NOENT),
    );
    // virtio 1.3 2.7.5.2: no chain is longer than 2^32 bytes; the device
    // stops at the descriptor that would pass it and finds no tail.
    chain(
        dev,
        "chain longer than 4 GiB",
        &[r(rq, 0xffff_ffff), w(rs, 4)],
        Want::Unwritten,
    );
    // The tail of a huge writable buffer: written where it lands in RAM,
    // the buffer returned unwritten where it does not.
    let huge = 0x8000_0000u32;
    let tail_at = info.high_ram_start + u64::from(huge) - u64::from(TAIL_SIZE);
    let reply = {
        rt::write_bytes(dev.req_buf, &harmless);
        dev.send_segs(&[r(rq, 20), w(info.high_ram_start, huge)])
    };
    if tail_at + u64::from(TAIL_SIZE) <= info.high_ram_end {
        check!(
            reply.status == Some(status::NOENT),
            "huge writable buffer: {:?}",
            reply.status
        );
    } else {
        check!(
            reply.used_len == 0,
            "huge writable buffer ending past RAM: used len {}",
            reply.used_len
        );
    }
    println!("hostile: writable length of 2 GiB: ok");

    // Chains whose links are broken: they end where the device stops
    // following them, with no writable part, so no tail.
    dev.req.set_desc(0, rq, 20, DESC_F_NEXT, 0);
    let reply = push_one(dev, 0);
    expect(
        dev,
        "descriptor chained to itself",
        reply,
        Want::Unwritten,
        0,
    );
    dev.req.set_desc(0, rq, 20, DESC_F_NEXT, 1000);
    let reply = push_one(dev, 0);
    expect(
        dev,
        "next index beyond the queue",
        reply,
        Want::Unwritten,
        0,
    );
    dev.req.set_desc(0, NOWHERE, 17, DESC_F_INDIRECT, 0);
    let reply = push_one(dev, 0);
    expect(
        dev,
        "indirect table outside RAM, not negotiated, bad length",
        reply,
        Want::Unwritten,
        0,
    );
    dev.req.set_desc(0, rs, 4, DESC_F_WRITE | DESC_F_NEXT, 1);
    dev.req.set_desc(1, rq, 20, 0, 0);
    let reply = push_one(dev, 0);
    expect(
        dev,
        "writable descriptor first, request after it",
        reply,
        st(status::IOERR),
        0,
    );
}

/// Offers the chain at `head` and waits for its used entry.
fn push_one(dev: &mut Iommu, head: u16) -> Reply {
    for i in 0..u64::from(TAIL_SIZE) {
        rt::poke8(dev.resp_buf + i, 0xa5);
    }
    dev.req.push(head);
    dev.t.notify(0);
    let Some((id, used_len)) = dev.req.wait_used(iommu::WAIT_CYCLES) else {
        println!("FAIL: no used entry");
        rt::exit(line!());
    };
    check_eq!(id, u32::from(head), "used id");
    let status = (used_len == TAIL_SIZE).then(|| peek8(dev.resp_buf));
    Reply { used_len, status }
}

/// Queue states the device cannot go on from: it asks for a reset, and
/// comes back after one. The notification may be served on the device's
/// own thread, so the driver waits for DEVICE_NEEDS_RESET to show.
fn queues(dev: &mut Iommu) {
    dev.req.push(1000);
    dev.t.notify(0);
    check!(
        dev.t
            .wait_status(virtio::STATUS_DEVICE_NEEDS_RESET, iommu::WAIT_CYCLES),
        "head index beyond the queue: no DEVICE_NEEDS_RESET"
    );
    check!(
        dev.t.read(regs::INTERRUPT_STATUS) & 2 != 0,
        "no configuration change interrupt status"
    );
    println!("hostile: head index beyond the queue: DEVICE_NEEDS_RESET");
    dev.restart();
    check_eq!(
        dev.attach(DOMAIN, NO_ENDPOINT, 0),
        status::NOENT,
        "after reset"
    );

    dev.req.set_avail_idx_raw(500);
    dev.t.notify(0);
    check!(
        dev.t
            .wait_status(virtio::STATUS_DEVICE_NEEDS_RESET, iommu::WAIT_CYCLES),
        "avail index far ahead: no DEVICE_NEEDS_RESET"
    );
    println!("hostile: avail index 500 entries ahead: DEVICE_NEEDS_RESET");
    dev.restart();
    check_eq!(
        dev.attach(DOMAIN, NO_ENDPOINT, 0),
        status::NOENT,
        "after reset"
    );
}

/// Misuse of the virtio-mmio registers.
fn transport(dev: &mut Iommu) {
    let t = dev.t;
    // Feature negotiation the device must refuse.
    let offered = t.device_features();
    for (name, f) in [
        (
            "FEATURES_OK without VERSION_1",
            offered & !virtio::F_VERSION_1,
        ),
        (
            "FEATURES_OK with a feature not offered",
            offered | (1 << 50),
        ),
    ] {
        t.reset();
        t.add_status(virtio::STATUS_ACKNOWLEDGE | virtio::STATUS_DRIVER);
        t.set_driver_features(f);
        t.add_status(virtio::STATUS_FEATURES_OK);
        check!(
            t.status() & virtio::STATUS_FEATURES_OK == 0,
            "{name}: accepted"
        );
        println!("hostile: {name}: refused");
    }

    // DRIVER_OK over queues that cannot work.
    dev.req.rewind();
    dev.evt.rewind();
    for (name, size, desc) in [
        (
            "descriptor table outside guest RAM",
            iommu::REQUEST_QUEUE_SIZE,
            NOWHERE,
        ),
        ("queue size that is not a power of two", 3, dev.req.desc),
    ] {
        check!(t.negotiate(iommu::WANTED).is_ok(), "{name}: negotiation");
        t.write(regs::QUEUE_SEL, 0);
        t.write(regs::QUEUE_NUM, u32::from(size));
        t.set_queue_addrs(desc, dev.req.avail, dev.req.used);
        t.write(regs::QUEUE_READY, 1);
        check!(t.setup_queue(1, &dev.evt).is_ok(), "{name}: eventq");
        // A notification before DRIVER_OK is ignored.
        t.notify(0);
        t.add_status(virtio::STATUS_DRIVER_OK);
        check!(
            t.status() & virtio::STATUS_DEVICE_NEEDS_RESET != 0,
            "{name}: no DEVICE_NEEDS_RESET"
        );
        println!("hostile: DRIVER_OK with a {name}: DEVICE_NEEDS_RESET");
    }
    dev.restart();

    // Accesses the transport ignores while the device keeps working.
    check_eq!(
        rt::mmio_read8(abi::VIRTIO_MMIO_BASE + regs::MAGIC),
        0,
        "byte read of MagicValue"
    );
    t.write(regs::MAGIC, 0);
    check_eq!(
        t.read(regs::MAGIC),
        virtio::MAGIC,
        "MagicValue after a write"
    );
    let mask = t.config64(config::PAGE_SIZE_MASK);
    t.set_config8(config::PAGE_SIZE_MASK, 0);
    check_eq!(
        t.config64(config::PAGE_SIZE_MASK),
        mask,
        "page_size_mask after a write"
    );
    let status_before = t.status();
    t.write(regs::STATUS, virtio::STATUS_ACKNOWLEDGE);
    check_eq!(t.status(), status_before, "status after clearing bits");
    t.write(regs::QUEUE_SEL, 0);
    t.write(regs::QUEUE_DESC_LOW, 0);
    t.write(regs::QUEUE_SEL, 9);
    t.write(regs::QUEUE_NUM, 8);
    t.notify(7);
    check_eq!(
        dev.attach(DOMAIN, NO_ENDPOINT, 0),
        status::NOENT,
        "device after ignored accesses"
    );
    println!("hostile: ignored register accesses: ok");
}

/// DMA engine registers with values no driver should write.
fn dma_arguments(ctx: &mut Ctx, dma: &crate::dma::Dma) {
    let buf = ctx.low.pages(1);
    for (name, op, src, len) in [
        ("length 0", abi::DMA_OP_COPY, buf, 0),
        (
            "length above the maximum",
            abi::DMA_OP_COPY,
            buf,
            abi::DMA_MAX_LEN + 1,
        ),
        ("unknown operation", 77, buf, 16),
        (
            "source range that wraps",
            abi::DMA_OP_COPY,
            u64::MAX - 8,
            16,
        ),
    ] {
        let o = dma.run(op, src, buf, len, 0);
        check_eq!(o.status, abi::DMA_STATUS_BAD_ARGS, "DMA {name}");
        println!("hostile: DMA {name}: bad args");
    }
    // PASID-tagged DMA has no translator in MAP mode yet.
    dma.set_pasid(Some(5));
    check_eq!(
        dma.copy(buf, buf + 64, 16),
        abi::DMA_STATUS_BAD_ARGS,
        "PASID-tagged DMA"
    );
    dma.set_pasid(None);
    println!("hostile: DMA tagged with PASID 5: bad args");
    // A byte write to a register is ignored.
    rt::mmio_write8(
        abi::DMA_BASE + ctx.info.primary_dma * abi::MMIO_WINDOW_SIZE + abi::dma_regs::LEN,
        1,
    );
}

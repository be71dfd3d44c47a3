//! The DMA engine as an MMIO device: source, destination, length, PASID,
//! operation (copy, fill, compare), a doorbell and a status register (see
//! `guest/abi.rs` for the layout). The operation runs synchronously on the
//! doorbell write, through the [`DmaRouter`] picked for the engine's
//! endpoint and the transfer's PASID.
//!
//! Every register value comes from the guest and is checked: unknown
//! operations, lengths of zero or above [`abi::DMA_MAX_LEN`], address
//! ranges that wrap, and PASIDs no translator serves end as
//! `DMA_STATUS_BAD_ARGS`; a refused access ends as `DMA_STATUS_FAULT`
//! (with a fault record queued by the vIOMMU when it refused).
//!
//! Page requests: when the nested translation sends one for a missing
//! page, the operation ends as `DMA_STATUS_PAGE_WAIT` and is kept; nothing
//! blocks. The VMM calls [`DmaDevice::poll_page_request`] on the vCPU
//! thread that runs the doorbell — after a request-queue notification it
//! served on the exit, and before every access to the engine's registers
//! (the request queue may be served on another thread) — and once the
//! guest's PAGE_RESP says SUCCESS the operation runs again from the start
//! (every access is translated before any byte moves, so a waiting
//! operation has changed nothing); FAILURE ends it as `DMA_STATUS_FAULT`.

use log::debug;
use vmm_iommu::emulated::{PageRequestState, MAX_PENDING_PAGE_REQUESTS};

use crate::abi::{self, dma_regs};
use crate::dma::{DmaError, DmaRouter};

/// What the engine did, for the VMM's report.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DmaStats {
    /// Operations that completed.
    pub ok: u64,
    /// Operations refused by the IOMMU or outside guest memory.
    pub faults: u64,
    /// Operations refused for their arguments.
    pub bad_args: u64,
    /// Operations tagged with a PASID.
    pub pasid_tagged: u64,
    /// Bytes moved (read plus written).
    pub bytes: u64,
    /// Register accesses ignored (bad width or offset).
    pub ignored: u64,
    /// Times an operation waited for a page (one per page request).
    pub page_waits: u64,
    /// Operations run again after a PAGE_RESP SUCCESS.
    pub retries: u64,
    /// Waiting operations given up because the guest rang the doorbell
    /// again.
    pub abandoned: u64,
}

/// The engine's registers, for a snapshot: what the guest wrote and what
/// the last operation ended with.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DmaRegs {
    /// Source.
    pub src: u64,
    /// Destination.
    pub dst: u64,
    /// Length.
    pub len: u32,
    /// PASID.
    pub pasid: u32,
    /// Flags.
    pub flags: u32,
    /// Operation.
    pub op: u32,
    /// Fill byte (the register's 32 bits).
    pub fill: u32,
    /// Status of the last operation.
    pub status: u32,
    /// Compare result of the last operation.
    pub cmp: u32,
}

/// An engine that cannot be snapshotted now.
#[derive(Debug, thiserror::Error)]
#[error("DMA engine of endpoint {endpoint} has an operation waiting for page request {grpid}")]
pub struct DmaBusy {
    /// The engine's endpoint.
    pub endpoint: u32,
    /// The page-request group it waits for.
    pub grpid: u32,
}

/// The registers of one operation, as the doorbell found them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Job {
    op: u32,
    src: u64,
    dst: u64,
    len: u32,
    fill: u32,
    pasid: Option<u32>,
}

/// An operation waiting for page request `grpid`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Waiting {
    job: Job,
    grpid: u32,
}

/// How an operation ended, short of success.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stop {
    /// `DMA_STATUS_BAD_ARGS` or `DMA_STATUS_FAULT`.
    Status(u32),
    /// Waits for page request `grpid`.
    PageRequest(u32),
}

/// One DMA engine.
pub struct DmaDevice {
    endpoint: u32,
    router: Box<dyn DmaRouter>,
    src: u64,
    dst: u64,
    len: u32,
    pasid: u32,
    flags: u32,
    op: u32,
    fill: u32,
    status: u32,
    cmp: u32,
    /// The operation waiting for a page, if any.
    waiting: Option<Waiting>,
    /// (PASID, group) of page requests whose operation was abandoned,
    /// polled until answered so that the IOMMU forgets them. Bounded by
    /// what the IOMMU keeps outstanding; past it the oldest is dropped.
    abandoned: Vec<(Option<u32>, u32)>,
    /// Reused transfer buffers, so a doorbell does not allocate.
    a: Vec<u8>,
    b: Vec<u8>,
    stats: DmaStats,
}

impl std::fmt::Debug for DmaDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DmaDevice")
            .field("endpoint", &self.endpoint)
            .field("stats", &self.stats)
            .finish()
    }
}

fn set_half(reg: &mut u64, high: bool, v: u32) {
    if high {
        *reg = (*reg & 0xffff_ffff) | (u64::from(v) << 32);
    } else {
        *reg = (*reg & !0xffff_ffff) | u64::from(v);
    }
}

impl DmaDevice {
    /// An engine with endpoint ID `endpoint` whose transfers go where
    /// `router` says.
    pub fn new(endpoint: u32, router: Box<dyn DmaRouter>) -> Self {
        DmaDevice {
            endpoint,
            router,
            src: 0,
            dst: 0,
            len: 0,
            pasid: 0,
            flags: 0,
            op: 0,
            fill: 0,
            status: abi::DMA_STATUS_IDLE,
            cmp: 0,
            waiting: None,
            abandoned: Vec::new(),
            a: Vec::new(),
            b: Vec::new(),
            stats: DmaStats::default(),
        }
    }

    /// The endpoint ID.
    pub fn endpoint(&self) -> u32 {
        self.endpoint
    }

    /// The counters.
    pub fn stats(&self) -> &DmaStats {
        &self.stats
    }

    /// The registers, for a snapshot; refused while an operation waits for
    /// a page request (its retry lives in the engine, not in the guest's
    /// memory). Requests of abandoned operations are the vIOMMU's to
    /// keep and are not carried.
    pub fn regs(&self) -> Result<DmaRegs, DmaBusy> {
        if let Some(w) = self.waiting {
            return Err(DmaBusy {
                endpoint: self.endpoint,
                grpid: w.grpid,
            });
        }
        Ok(DmaRegs {
            src: self.src,
            dst: self.dst,
            len: self.len,
            pasid: self.pasid,
            flags: self.flags,
            op: self.op,
            fill: self.fill,
            status: self.status,
            cmp: self.cmp,
        })
    }

    /// Sets the registers from a snapshot (the engine is fresh: nothing
    /// waits). A status outside the engine's `DMA_STATUS_*` reads as
    /// idle, and the page-wait status, which no snapshot holds, as a
    /// fault.
    pub fn set_regs(&mut self, r: &DmaRegs) {
        self.src = r.src;
        self.dst = r.dst;
        self.len = r.len;
        self.pasid = r.pasid;
        self.flags = r.flags;
        self.op = r.op;
        self.fill = r.fill;
        self.status = match r.status {
            abi::DMA_STATUS_IDLE
            | abi::DMA_STATUS_OK
            | abi::DMA_STATUS_FAULT
            | abi::DMA_STATUS_BAD_ARGS => r.status,
            abi::DMA_STATUS_PAGE_WAIT => abi::DMA_STATUS_FAULT,
            _ => abi::DMA_STATUS_IDLE,
        };
        self.cmp = r.cmp;
    }

    /// A guest read at `offset` in the window.
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let v: u64 = match (offset, data.len()) {
            (dma_regs::SRC, 8) => self.src,
            (dma_regs::DST, 8) => self.dst,
            (dma_regs::SRC, 4) => self.src & 0xffff_ffff,
            (o, 4) if o == dma_regs::SRC + 4 => self.src >> 32,
            (dma_regs::DST, 4) => self.dst & 0xffff_ffff,
            (o, 4) if o == dma_regs::DST + 4 => self.dst >> 32,
            (dma_regs::LEN, 4) => self.len.into(),
            (dma_regs::PASID, 4) => self.pasid.into(),
            (dma_regs::FLAGS, 4) => self.flags.into(),
            (dma_regs::OP, 4) => self.op.into(),
            (dma_regs::FILL, 4) => self.fill.into(),
            (dma_regs::STATUS, 4) => self.status.into(),
            (dma_regs::CMP_RESULT, 4) => self.cmp.into(),
            (dma_regs::ENDPOINT, 4) => self.endpoint.into(),
            (dma_regs::ID, 4) => abi::DMA_ID.into(),
            _ => {
                self.stats.ignored += 1;
                return;
            }
        };
        let n = data.len();
        data.copy_from_slice(&v.to_le_bytes()[..n]);
    }

    /// A guest write at `offset` in the window. Returns whether an
    /// operation ran (so the VMM can deliver the faults it raised).
    pub fn write(&mut self, offset: u64, data: &[u8]) -> bool {
        let v = match *data {
            [a, b, c, d] => u64::from(u32::from_le_bytes([a, b, c, d])),
            [a, b, c, d, e, f, g, h] => u64::from_le_bytes([a, b, c, d, e, f, g, h]),
            _ => {
                self.stats.ignored += 1;
                return false;
            }
        };
        let wide = data.len() == 8;
        let v32 = v as u32;
        match (offset, wide) {
            (dma_regs::SRC, true) => self.src = v,
            (dma_regs::DST, true) => self.dst = v,
            (dma_regs::SRC, false) => set_half(&mut self.src, false, v32),
            (o, false) if o == dma_regs::SRC + 4 => set_half(&mut self.src, true, v32),
            (dma_regs::DST, false) => set_half(&mut self.dst, false, v32),
            (o, false) if o == dma_regs::DST + 4 => set_half(&mut self.dst, true, v32),
            (dma_regs::LEN, false) => self.len = v32,
            (dma_regs::PASID, false) => self.pasid = v32,
            (dma_regs::FLAGS, false) => self.flags = v32,
            (dma_regs::OP, false) => self.op = v32,
            (dma_regs::FILL, false) => self.fill = v32,
            (dma_regs::DOORBELL, false) => {
                self.run();
                return true;
            }
            _ => self.stats.ignored += 1,
        }
        false
    }

    fn run(&mut self) {
        if let Some(w) = self.waiting.take() {
            debug!(
                "dma{}: doorbell abandons the operation waiting for page request {}",
                self.endpoint, w.grpid
            );
            self.stats.abandoned += 1;
            if self.abandoned.len() >= MAX_PENDING_PAGE_REQUESTS {
                self.abandoned.remove(0);
            }
            self.abandoned.push((w.job.pasid, w.grpid));
        }
        let pasid = (self.flags & abi::DMA_FLAGS_PASID_VALID != 0).then_some(self.pasid);
        if pasid.is_some() {
            self.stats.pasid_tagged += 1;
        }
        let job = Job {
            op: self.op,
            src: self.src,
            dst: self.dst,
            len: self.len,
            fill: self.fill,
            pasid,
        };
        self.start(job);
    }

    /// Runs `job` and sets the status it ends with.
    fn start(&mut self, job: Job) {
        self.cmp = 0;
        self.status = match self.execute(&job) {
            Ok(()) => {
                self.stats.ok += 1;
                abi::DMA_STATUS_OK
            }
            Err(Stop::PageRequest(grpid)) => {
                self.stats.page_waits += 1;
                self.waiting = Some(Waiting { job, grpid });
                abi::DMA_STATUS_PAGE_WAIT
            }
            Err(Stop::Status(s)) => {
                if s == abi::DMA_STATUS_FAULT {
                    self.stats.faults += 1;
                } else {
                    self.stats.bad_args += 1;
                }
                s
            }
        };
    }

    /// Whether an operation waits for a page request.
    pub fn waiting(&self) -> bool {
        self.waiting.is_some()
    }

    /// Whether [`Self::poll_page_request`] has anything to look at.
    pub fn needs_poll(&self) -> bool {
        self.waiting.is_some() || !self.abandoned.is_empty()
    }

    /// Looks at the page request the waiting operation (if any) waits for:
    /// answered SUCCESS, the operation runs again (and may wait for
    /// another page); answered otherwise, or forgotten, it ends as
    /// `DMA_STATUS_FAULT`; still pending, nothing changes. Returns whether
    /// the operation ran or ended (so the VMM can deliver what it raised).
    /// Answered requests of abandoned operations are dropped on the way.
    pub fn poll_page_request(&mut self) -> bool {
        if !self.abandoned.is_empty() {
            let (router, ep) = (&self.router, self.endpoint);
            self.abandoned.retain(|&(pasid, grpid)| {
                router.page_request_state(ep, pasid, grpid) == PageRequestState::Pending
            });
        }
        let Some(w) = self.waiting else {
            return false;
        };
        match self
            .router
            .page_request_state(self.endpoint, w.job.pasid, w.grpid)
        {
            PageRequestState::Pending => false,
            PageRequestState::Success => {
                self.waiting = None;
                self.stats.retries += 1;
                self.start(w.job);
                true
            }
            state => {
                debug!(
                    "dma{}: page request {} ended {state:?}: the operation faults",
                    self.endpoint, w.grpid
                );
                self.waiting = None;
                self.stats.faults += 1;
                self.status = abi::DMA_STATUS_FAULT;
                true
            }
        }
    }

    /// Runs `job`; the error is how it stopped.
    fn execute(&mut self, job: &Job) -> Result<(), Stop> {
        let len = job.len;
        if len == 0 || len > abi::DMA_MAX_LEN {
            debug!("dma{}: bad length {len}", self.endpoint);
            return Err(Stop::Status(abi::DMA_STATUS_BAD_ARGS));
        }
        let uses_src = matches!(job.op, abi::DMA_OP_COPY | abi::DMA_OP_COMPARE);
        let wraps = |a: u64| a.checked_add(u64::from(len)).is_none();
        if wraps(job.dst) || (uses_src && wraps(job.src)) {
            debug!("dma{}: address range wraps", self.endpoint);
            return Err(Stop::Status(abi::DMA_STATUS_BAD_ARGS));
        }
        let Some(space) = self.router.route(self.endpoint, job.pasid) else {
            debug!(
                "dma{}: no translator for PASID {:?}",
                self.endpoint, job.pasid
            );
            return Err(Stop::Status(abi::DMA_STATUS_BAD_ARGS));
        };
        // Bounded by DMA_MAX_LEN above.
        let n = len as usize;
        let fault = |e: DmaError| {
            debug!("dma: {e}");
            match e {
                DmaError::PageRequest { grpid, .. } => Stop::PageRequest(grpid),
                _ => Stop::Status(abi::DMA_STATUS_FAULT),
            }
        };
        match job.op {
            abi::DMA_OP_COPY => {
                self.a.resize(n, 0);
                space.dma_read(job.src, &mut self.a).map_err(fault)?;
                space.dma_write(job.dst, &self.a).map_err(fault)?;
                self.stats.bytes += 2 * u64::from(len);
            }
            abi::DMA_OP_FILL => {
                self.a.clear();
                self.a.resize(n, job.fill as u8);
                space.dma_write(job.dst, &self.a).map_err(fault)?;
                self.stats.bytes += u64::from(len);
            }
            abi::DMA_OP_COMPARE => {
                self.a.resize(n, 0);
                self.b.resize(n, 0);
                space.dma_read(job.src, &mut self.a).map_err(fault)?;
                space.dma_read(job.dst, &mut self.b).map_err(fault)?;
                self.stats.bytes += 2 * u64::from(len);
                // 1 + offset of the first difference; n ≤ DMA_MAX_LEN fits.
                self.cmp = self
                    .a
                    .iter()
                    .zip(&self.b)
                    .position(|(x, y)| x != y)
                    .map_or(0, |i| i as u32 + 1);
            }
            op => {
                debug!("dma{}: unknown operation {op}", self.endpoint);
                return Err(Stop::Status(abi::DMA_STATUS_BAD_ARGS));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dma::{DmaError, DmaSpace};
    use std::sync::Mutex;

    /// A flat 64 KiB space at address 0 that refuses everything else.
    struct Flat(Mutex<Vec<u8>>);

    impl DmaSpace for Flat {
        fn dma_read(&self, addr: u64, buf: &mut [u8]) -> Result<(), DmaError> {
            let m = self.0.lock().unwrap();
            let a = addr as usize;
            match m.get(a..a + buf.len()) {
                Some(s) => {
                    buf.copy_from_slice(s);
                    Ok(())
                }
                None => Err(DmaError::BadLength(buf.len())),
            }
        }
        fn dma_write(&self, addr: u64, data: &[u8]) -> Result<(), DmaError> {
            let mut m = self.0.lock().unwrap();
            let a = addr as usize;
            match m.get_mut(a..a + data.len()) {
                Some(s) => {
                    s.copy_from_slice(data);
                    Ok(())
                }
                None => Err(DmaError::BadLength(data.len())),
            }
        }
    }

    struct Untagged(Flat);

    impl DmaRouter for Untagged {
        fn route(&mut self, _ep: u32, pasid: Option<u32>) -> Option<&dyn DmaSpace> {
            pasid.is_none().then_some(&self.0 as &dyn DmaSpace)
        }
    }

    fn engine() -> DmaDevice {
        let mut m = vec![0u8; 0x10000];
        m[..4].copy_from_slice(b"abcd");
        DmaDevice::new(8, Box::new(Untagged(Flat(Mutex::new(m)))))
    }

    fn w32(d: &mut DmaDevice, off: u64, v: u32) -> bool {
        d.write(off, &v.to_le_bytes())
    }

    fn r32(d: &mut DmaDevice, off: u64) -> u32 {
        let mut b = [0u8; 4];
        d.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn program(d: &mut DmaDevice, op: u32, src: u64, dst: u64, len: u32) -> u32 {
        d.write(dma_regs::SRC, &src.to_le_bytes());
        w32(d, dma_regs::DST, dst as u32);
        w32(d, dma_regs::DST + 4, (dst >> 32) as u32);
        w32(d, dma_regs::LEN, len);
        w32(d, dma_regs::OP, op);
        assert!(w32(d, dma_regs::DOORBELL, 1));
        r32(d, dma_regs::STATUS)
    }

    #[test]
    fn copy_then_compare_reports_equal() {
        let mut d = engine();
        assert_eq!(
            program(&mut d, abi::DMA_OP_COPY, 0, 0x100, 4),
            abi::DMA_STATUS_OK
        );
        assert_eq!(
            program(&mut d, abi::DMA_OP_COMPARE, 0, 0x100, 4),
            abi::DMA_STATUS_OK
        );
        assert_eq!(r32(&mut d, dma_regs::CMP_RESULT), 0);
        assert_eq!(
            program(&mut d, abi::DMA_OP_COMPARE, 0, 0x101, 4),
            abi::DMA_STATUS_OK
        );
        assert_eq!(r32(&mut d, dma_regs::CMP_RESULT), 1);
    }

    #[test]
    fn refused_access_is_a_fault() {
        let mut d = engine();
        assert_eq!(
            program(&mut d, abi::DMA_OP_COPY, 0, 0x2_0000, 4),
            abi::DMA_STATUS_FAULT
        );
        assert_eq!(d.stats().faults, 1);
    }

    #[test]
    fn bad_length_op_wrap_and_pasid_are_bad_args() {
        let mut d = engine();
        assert_eq!(
            program(&mut d, abi::DMA_OP_COPY, 0, 0x100, 0),
            abi::DMA_STATUS_BAD_ARGS
        );
        let big = abi::DMA_MAX_LEN + 1;
        assert_eq!(
            program(&mut d, abi::DMA_OP_COPY, 0, 0x100, big),
            abi::DMA_STATUS_BAD_ARGS
        );
        assert_eq!(program(&mut d, 99, 0, 0x100, 4), abi::DMA_STATUS_BAD_ARGS);
        assert_eq!(
            program(&mut d, abi::DMA_OP_COPY, u64::MAX - 1, 0, 4),
            abi::DMA_STATUS_BAD_ARGS
        );
        w32(&mut d, dma_regs::FLAGS, abi::DMA_FLAGS_PASID_VALID);
        assert_eq!(
            program(&mut d, abi::DMA_OP_COPY, 0, 0x100, 4),
            abi::DMA_STATUS_BAD_ARGS
        );
        assert_eq!(d.stats().bad_args, 5);
        assert_eq!(d.stats().pasid_tagged, 1);
    }

    /// A space that asks for a page (group 7) on every write until the
    /// page is "mapped", and a router reporting the group's state.
    struct Paging {
        flat: Flat,
        mapped: std::sync::atomic::AtomicBool,
        answer: Mutex<PageRequestState>,
    }

    impl DmaSpace for Paging {
        fn dma_read(&self, addr: u64, buf: &mut [u8]) -> Result<(), DmaError> {
            self.flat.dma_read(addr, buf)
        }
        fn dma_write(&self, addr: u64, data: &[u8]) -> Result<(), DmaError> {
            if !self.mapped.load(std::sync::atomic::Ordering::Relaxed) {
                return Err(DmaError::PageRequest {
                    iova: addr,
                    grpid: 7,
                });
            }
            self.flat.dma_write(addr, data)
        }
    }

    struct PagingRouter(std::sync::Arc<Paging>);

    impl DmaRouter for PagingRouter {
        fn route(&mut self, _ep: u32, _pasid: Option<u32>) -> Option<&dyn DmaSpace> {
            Some(&*self.0)
        }
        fn page_request_state(&self, _ep: u32, _p: Option<u32>, grpid: u32) -> PageRequestState {
            assert_eq!(grpid, 7);
            *self.0.answer.lock().unwrap()
        }
    }

    fn paging_engine() -> (DmaDevice, std::sync::Arc<Paging>) {
        let p = std::sync::Arc::new(Paging {
            flat: Flat(Mutex::new(vec![0u8; 0x10000])),
            mapped: false.into(),
            answer: Mutex::new(PageRequestState::Pending),
        });
        (DmaDevice::new(8, Box::new(PagingRouter(p.clone()))), p)
    }

    #[test]
    fn page_request_waits_then_success_runs_the_operation_again() {
        let (mut d, p) = paging_engine();
        w32(&mut d, dma_regs::FILL, 0x5a);
        assert_eq!(
            program(&mut d, abi::DMA_OP_FILL, 0, 0x100, 4),
            abi::DMA_STATUS_PAGE_WAIT
        );
        assert!(d.waiting());
        assert!(!d.poll_page_request(), "still pending");
        assert_eq!(r32(&mut d, dma_regs::STATUS), abi::DMA_STATUS_PAGE_WAIT);
        // The guest maps the page and answers SUCCESS; the registers it
        // changed meanwhile do not matter.
        p.mapped.store(true, std::sync::atomic::Ordering::Relaxed);
        *p.answer.lock().unwrap() = PageRequestState::Success;
        w32(&mut d, dma_regs::LEN, 9999);
        assert!(d.poll_page_request());
        assert_eq!(r32(&mut d, dma_regs::STATUS), abi::DMA_STATUS_OK);
        assert_eq!(
            &p.flat.0.lock().unwrap()[0x100..0x105],
            &[0x5a, 0x5a, 0x5a, 0x5a, 0]
        );
        let st = d.stats();
        assert_eq!((st.page_waits, st.retries, st.ok, st.faults), (1, 1, 1, 0));
        assert!(!d.needs_poll());
    }

    #[test]
    fn page_request_failure_ends_the_operation_as_a_fault() {
        let (mut d, p) = paging_engine();
        assert_eq!(
            program(&mut d, abi::DMA_OP_FILL, 0, 0x100, 4),
            abi::DMA_STATUS_PAGE_WAIT
        );
        *p.answer.lock().unwrap() = PageRequestState::Failed;
        assert!(d.poll_page_request());
        assert_eq!(r32(&mut d, dma_regs::STATUS), abi::DMA_STATUS_FAULT);
        assert_eq!((d.stats().faults, d.stats().retries), (1, 0));
        assert!(!d.waiting());
    }

    #[test]
    fn doorbell_while_waiting_abandons_and_polls_the_group_until_answered() {
        let (mut d, p) = paging_engine();
        program(&mut d, abi::DMA_OP_FILL, 0, 0x100, 4);
        assert_eq!(
            program(&mut d, abi::DMA_OP_COPY, 0, 0x200, 4),
            abi::DMA_STATUS_PAGE_WAIT
        );
        assert_eq!(d.stats().abandoned, 1);
        *p.answer.lock().unwrap() = PageRequestState::Failed;
        d.poll_page_request();
        assert!(
            !d.needs_poll(),
            "the abandoned group was answered and dropped"
        );
    }

    #[test]
    fn registers_carry_over_and_a_waiting_engine_refuses_a_snapshot() {
        let mut d = engine();
        w32(&mut d, dma_regs::FILL, 0x77);
        program(&mut d, abi::DMA_OP_COMPARE, 0, 0x101, 4);
        let r = d.regs().unwrap();
        let mut e = engine();
        e.set_regs(&r);
        assert_eq!(e.regs().unwrap(), r);
        assert_eq!(r32(&mut e, dma_regs::CMP_RESULT), 1);
        let (mut p, _) = paging_engine();
        program(&mut p, abi::DMA_OP_FILL, 0, 0x100, 4);
        assert_eq!(p.regs().unwrap_err().grpid, 7);
    }

    #[test]
    fn odd_widths_are_ignored_and_counted() {
        let mut d = engine();
        assert!(!d.write(dma_regs::LEN, &[1, 2]));
        let mut b = [0xffu8; 2];
        d.read(dma_regs::ID, &mut b);
        assert_eq!(b, [0, 0]);
        assert_eq!(r32(&mut d, dma_regs::ID), abi::DMA_ID);
        assert_eq!(d.stats().ignored, 2);
    }
}

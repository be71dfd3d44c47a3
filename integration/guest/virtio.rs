//! A virtio-mmio (version 2) transport and split virtqueues, driver side.
//!
//! Besides the well-behaved path (negotiate, set up queues, submit a chain,
//! poll the used ring) it exposes the raw pieces — descriptor slots, the
//! avail index, queue registers — so the hostile scenario can build what a
//! correct driver never would.

use core::sync::atomic::{fence, Ordering};

use crate::rt::{self, Bump};

pub use crate::abi::virtio_mmio::{
    regs, MAGIC, STATUS_ACKNOWLEDGE, STATUS_DEVICE_NEEDS_RESET, STATUS_DRIVER, STATUS_DRIVER_OK,
    STATUS_FEATURES_OK,
};

/// `VIRTIO_F_VERSION_1`.
pub const F_VERSION_1: u64 = 1 << 32;

/// Descriptor flag: the chain continues at `next`.
pub const DESC_F_NEXT: u16 = 1;
/// Descriptor flag: device-writable.
pub const DESC_F_WRITE: u16 = 2;
/// The used ring's flag by which the device asks for no notification.
pub const USED_F_NO_NOTIFY: u16 = 1;

/// A virtio-mmio device window.
#[derive(Clone, Copy)]
pub struct Transport {
    base: u64,
}

impl Transport {
    /// The window at `base`.
    pub const fn new(base: u64) -> Self {
        Transport { base }
    }

    /// Reads a register.
    pub fn read(&self, off: u64) -> u32 {
        rt::mmio_read32(self.base + off)
    }

    /// Writes a register.
    pub fn write(&self, off: u64, v: u32) {
        rt::mmio_write32(self.base + off, v)
    }

    /// The status byte.
    pub fn status(&self) -> u32 {
        self.read(regs::STATUS)
    }

    /// Adds status bits.
    pub fn add_status(&self, bits: u32) {
        let s = self.status();
        self.write(regs::STATUS, s | bits);
    }

    /// Waits up to `max_cycles` TSC cycles for any of `bits` in the
    /// status byte. The device may serve a notification on another thread
    /// (ioeventfd), so what a notification did shows some time after the
    /// notify write returns, not necessarily when it does.
    pub fn wait_status(&self, bits: u32, max_cycles: u64) -> bool {
        let start = rt::rdtsc();
        loop {
            if self.status() & bits != 0 {
                return true;
            }
            if rt::rdtsc().wrapping_sub(start) > max_cycles {
                return false;
            }
            core::hint::spin_loop();
        }
    }

    /// Resets the device and waits for the reset to show.
    pub fn reset(&self) {
        self.write(regs::STATUS, 0);
        // virtio 1.3 4.2.2.2: "the driver MUST ... wait for a read of
        // Status to return 0" after writing 0.
        let mut tries = 0;
        while self.status() != 0 {
            tries += 1;
            check!(tries < 1000, "device does not complete its reset");
        }
    }

    /// All 64 bits of the device's features.
    pub fn device_features(&self) -> u64 {
        self.write(regs::DEVICE_FEATURES_SEL, 0);
        let lo = self.read(regs::DEVICE_FEATURES);
        self.write(regs::DEVICE_FEATURES_SEL, 1);
        let hi = self.read(regs::DEVICE_FEATURES);
        (u64::from(hi) << 32) | u64::from(lo)
    }

    /// Writes all 64 bits of the driver's features.
    pub fn set_driver_features(&self, f: u64) {
        self.write(regs::DRIVER_FEATURES_SEL, 0);
        self.write(regs::DRIVER_FEATURES, f as u32);
        self.write(regs::DRIVER_FEATURES_SEL, 1);
        self.write(regs::DRIVER_FEATURES, (f >> 32) as u32);
    }

    /// Reset, ACKNOWLEDGE, DRIVER, features (`wanted` ∩ offered), then
    /// FEATURES_OK, checked. Returns the accepted features.
    pub fn negotiate(&self, wanted: u64) -> Result<u64, &'static str> {
        if self.read(regs::MAGIC) != MAGIC {
            return Err("bad magic");
        }
        if self.read(regs::VERSION) != 2 {
            return Err("not a version 2 (modern) virtio-mmio device");
        }
        self.reset();
        self.add_status(STATUS_ACKNOWLEDGE);
        self.add_status(STATUS_DRIVER);
        let accepted = self.device_features() & wanted;
        self.set_driver_features(accepted);
        self.add_status(STATUS_FEATURES_OK);
        // virtio 1.3 3.1.1: "re-read device status to ensure the
        // FEATURES_OK bit is still set: otherwise, the device does not
        // support our subset of features".
        if self.status() & STATUS_FEATURES_OK == 0 {
            return Err("device refused FEATURES_OK");
        }
        Ok(accepted)
    }

    /// Programs queue `idx` with the rings of `q` and marks it ready.
    pub fn setup_queue(&self, idx: u32, q: &Virtqueue) -> Result<(), &'static str> {
        self.write(regs::QUEUE_SEL, idx);
        if self.read(regs::QUEUE_READY) != 0 {
            return Err("queue already ready");
        }
        let max = self.read(regs::QUEUE_NUM_MAX);
        if max == 0 || u32::from(q.size) > max {
            return Err("queue size above QueueNumMax");
        }
        self.write(regs::QUEUE_NUM, u32::from(q.size));
        self.set_queue_addrs(q.desc, q.avail, q.used);
        self.write(regs::QUEUE_READY, 1);
        Ok(())
    }

    /// Writes the three ring addresses of the selected queue.
    pub fn set_queue_addrs(&self, desc: u64, avail: u64, used: u64) {
        self.write(regs::QUEUE_DESC_LOW, desc as u32);
        self.write(regs::QUEUE_DESC_HIGH, (desc >> 32) as u32);
        self.write(regs::QUEUE_DRIVER_LOW, avail as u32);
        self.write(regs::QUEUE_DRIVER_HIGH, (avail >> 32) as u32);
        self.write(regs::QUEUE_DEVICE_LOW, used as u32);
        self.write(regs::QUEUE_DEVICE_HIGH, (used >> 32) as u32);
    }

    /// Notifies queue `idx`.
    pub fn notify(&self, idx: u32) {
        // The ring writes must be visible before the device looks.
        fence(Ordering::SeqCst);
        self.write(regs::QUEUE_NOTIFY, idx);
    }

    /// Reads a config-space byte.
    pub fn config8(&self, off: u64) -> u8 {
        rt::mmio_read8(self.base + regs::CONFIG + off)
    }

    /// Reads a 32-bit config-space field.
    pub fn config32(&self, off: u64) -> u32 {
        self.read(regs::CONFIG + off)
    }

    /// Reads a 64-bit config-space field, retrying across a generation
    /// change as virtio 1.3 2.5.1 asks for fields wider than 32 bits.
    pub fn config64(&self, off: u64) -> u64 {
        loop {
            let gen = self.read(regs::CONFIG_GENERATION);
            let lo = self.config32(off);
            let hi = self.config32(off + 4);
            if self.read(regs::CONFIG_GENERATION) == gen {
                return (u64::from(hi) << 32) | u64::from(lo);
            }
        }
    }

    /// Writes a config-space byte.
    pub fn set_config8(&self, off: u64, v: u8) {
        rt::mmio_write8(self.base + regs::CONFIG + off, v)
    }
}

/// One segment of a chain: `(address, length, device-writable)`.
#[derive(Clone, Copy)]
pub struct Seg {
    /// Guest-physical address.
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
    /// Device-writable.
    pub write: bool,
}

/// A split virtqueue in guest memory.
pub struct Virtqueue {
    /// Number of entries.
    pub size: u16,
    /// Descriptor table.
    pub desc: u64,
    /// Driver (avail) ring.
    pub avail: u64,
    /// Device (used) ring.
    pub used: u64,
    avail_idx: u16,
    last_used: u16,
}

impl Virtqueue {
    /// A zeroed queue of `size` entries from `alloc`.
    pub fn new(alloc: &mut Bump, size: u16) -> Self {
        let s = u64::from(size);
        let desc = alloc.alloc(16 * s, 16);
        let avail = alloc.alloc(6 + 2 * s, 2);
        let used = alloc.alloc(6 + 8 * s, 4);
        Virtqueue {
            size,
            desc,
            avail,
            used,
            avail_idx: 0,
            last_used: 0,
        }
    }

    /// Forgets what the device did: after a device reset the rings start
    /// over from index 0.
    pub fn rewind(&mut self) {
        rt::zero(self.avail, 6 + 2 * u64::from(self.size));
        rt::zero(self.used, 6 + 8 * u64::from(self.size));
        self.avail_idx = 0;
        self.last_used = 0;
    }

    /// Writes descriptor slot `i` as given, valid or not.
    pub fn set_desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let d = self.desc + 16 * u64::from(i % self.size);
        rt::poke64(d, addr);
        rt::poke32(d + 8, len);
        rt::poke16(d + 12, flags);
        rt::poke16(d + 14, next);
    }

    /// Writes `segs` as one chain in slots `0..segs.len()` (the driver
    /// keeps one request in flight) and returns its head, 0.
    pub fn set_chain(&self, segs: &[Seg]) -> u16 {
        for (i, s) in segs.iter().enumerate() {
            let i = i as u16;
            let last = usize::from(i) + 1 == segs.len();
            let mut flags = if last { 0 } else { DESC_F_NEXT };
            if s.write {
                flags |= DESC_F_WRITE;
            }
            self.set_desc(i, s.addr, s.len, flags, if last { 0 } else { i + 1 });
        }
        0
    }

    /// Offers the chain at `head` to the device (no notification).
    pub fn push(&mut self, head: u16) {
        let slot = self.avail + 4 + 2 * u64::from(self.avail_idx % self.size);
        rt::poke16(slot, head);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        fence(Ordering::SeqCst);
        rt::poke16(self.avail + 2, self.avail_idx);
    }

    /// Whether the device wants to be notified of what was just pushed:
    /// it does not while its `VIRTQ_USED_F_NO_NOTIFY` flag is set (a
    /// worker polling the queue). As Linux's `virtqueue_kick_prepare`: a
    /// full barrier after the avail index, then the flag.
    pub fn wants_notification(&self) -> bool {
        fence(Ordering::SeqCst);
        rt::peek16(self.used) & USED_F_NO_NOTIFY == 0
    }

    /// Sets the avail index to any value (hostile use).
    pub fn set_avail_idx_raw(&mut self, idx: u16) {
        fence(Ordering::SeqCst);
        rt::poke16(self.avail + 2, idx);
    }

    /// The used entry the device returned next, if any: `(id, len)`.
    pub fn pop_used(&mut self) -> Option<(u32, u32)> {
        fence(Ordering::SeqCst);
        let idx = rt::peek16(self.used + 2);
        if idx == self.last_used {
            return None;
        }
        let e = self.used + 4 + 8 * u64::from(self.last_used % self.size);
        self.last_used = self.last_used.wrapping_add(1);
        Some((rt::peek32(e), rt::peek32(e + 4)))
    }

    /// Polls the used ring for up to `max_cycles` TSC cycles.
    pub fn wait_used(&mut self, max_cycles: u64) -> Option<(u32, u32)> {
        let start = rt::rdtsc();
        loop {
            if let Some(e) = self.pop_used() {
                return Some(e);
            }
            if rt::rdtsc().wrapping_sub(start) > max_cycles {
                return None;
            }
            core::hint::spin_loop();
        }
    }

    /// Entries the device has used and the driver not yet popped.
    pub fn pending_used(&self) -> u16 {
        fence(Ordering::SeqCst);
        rt::peek16(self.used + 2).wrapping_sub(self.last_used)
    }
}

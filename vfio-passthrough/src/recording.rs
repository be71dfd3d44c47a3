//! A [`HostIommu`] that records every call with its argument bytes and
//! plays a small, consistent kernel: it hands out object IDs and handles,
//! keeps the DMA mappings of each container and IOAS, the attachment of
//! each device and PASID, and the live iommufd objects, so a test can check
//! both the bytes sent and the state they leave. It can be scripted to fail
//! call N, or the Nth call of a kind, with an errno, or to report that an
//! `IOMMU_HWPT_INVALIDATE` handled only some entries.
//!
//! For tests, benchmarks and dry runs on machines without VFIO; it never
//! touches the host.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::io;
use std::sync::{Mutex, MutexGuard};

use iommufd_bindings::iommufd::{
    iommu_hw_info_type_IOMMU_HW_INFO_TYPE_ARM_SMMUV3,
    iommu_hw_info_type_IOMMU_HW_INFO_TYPE_INTEL_VTD,
    iommufd_hwpt_alloc_flags_IOMMU_HWPT_ALLOC_DIRTY_TRACKING,
    iommufd_hwpt_get_dirty_bitmap_flags_IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR,
};
use vfio_bindings::bindings::vfio::{
    VFIO_DEVICE_ATTACH_PASID, VFIO_DEVICE_DETACH_PASID, VFIO_IOMMU_DIRTY_PAGES_FLAG_GET_BITMAP,
    VFIO_IOMMU_DIRTY_PAGES_FLAG_START, VFIO_IOMMU_DIRTY_PAGES_FLAG_STOP, VFIO_IOMMU_INFO_CAPS,
    VFIO_IOMMU_INFO_PGSIZES, VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE,
    VFIO_IOMMU_TYPE1_INFO_CAP_MIGRATION,
};

use crate::host::{Handle, HostIommu, Ioctl, Op, Open, Opened};

/// One recorded call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordedCall {
    /// Position among all calls, from 0.
    pub index: usize,
    /// What it was.
    pub op: Op,
    /// The object it went to (the new handle for an open).
    pub target: Handle,
    /// The argument's bytes as the kernel would read them.
    pub arg: Vec<u8>,
    /// The argument's bytes after the call, as the kernel wrote them back
    /// (output IDs, `entry_num`, unmapped sizes); empty for non-ioctls.
    pub out: Vec<u8>,
    /// The buffer the argument points at (HWPT data, invalidation
    /// entries), the path of an open, the bytes read or written.
    pub payload: Vec<u8>,
    /// `Err(errno)` if the call failed.
    pub result: Result<(), i32>,
}

/// The host IOMMU the recording host pretends to have, for
/// `IOMMU_GET_HW_INFO`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FakeIommu {
    /// Intel VT-d with these capability registers.
    IntelVtd {
        /// Capability register.
        cap: u64,
        /// Extended capability register.
        ecap: u64,
    },
    /// Arm SMMUv3 with these ID registers.
    ArmSmmuV3 {
        /// IDR0..IDR5.
        idr: [u32; 6],
    },
}

impl FakeIommu {
    /// A VT-d unit that nests: scalable mode, first stage, 20-bit PASIDs,
    /// SRS, EAFS, 5-level and 1 GiB first-stage pages, 48-bit MGAW, page
    /// requests.
    pub fn vtd_nesting() -> Self {
        FakeIommu::IntelVtd {
            cap: 1 << 60 | 1 << 56 | 47 << 16,
            ecap: 1 << 47 | 1 << 43 | 1 << 40 | 19 << 35 | 1 << 34 | 1 << 31 | 1 << 29 | 1 << 26,
        }
    }

    /// An SMMUv3 that nests: two-level CD tables, 16-bit ASIDs, 20-bit
    /// SubstreamIDs, 4 KiB granule, 48-bit OAS; `ril` adds range
    /// invalidation.
    pub fn smmuv3(ril: bool) -> Self {
        FakeIommu::ArmSmmuV3 {
            idr: [
                1 << 19 | 1 << 12 | 1 << 1 | 1,
                20 << 6 | 16,
                0,
                if ril { 1 << 10 } else { 0 },
                0,
                1 << 4 | 5,
            ],
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Matcher {
    Index(usize),
    Nth(Op, usize),
}

#[derive(Clone, Copy, Debug)]
enum Action {
    Fail(i32),
    /// An open whose KVM-VFIO registration the kernel refuses.
    Unregistered(i32),
    Partial {
        handled: u32,
        errno: i32,
    },
}

#[derive(Debug)]
struct State {
    calls: Vec<RecordedCall>,
    script: Vec<(Matcher, Action)>,
    next_handle: i32,
    next_object: u32,
    next_dev: u32,
    hw: FakeIommu,
    device_pasid_bits: u8,
    type1_pgsizes: u64,
    type1_ranges: Vec<(u64, u64)>,
    handles: HashSet<Handle>,
    objects: HashSet<u32>,
    /// Per container handle or IOAS ID: iova -> size.
    maps: HashMap<(bool, u64), BTreeMap<u64, u64>>,
    /// (device handle, pasid) -> page table ID; PASID 0 is the RID.
    attached: HashMap<(Handle, u32), u32>,
    reads: HashMap<Handle, VecDeque<Vec<u8>>>,
    /// `IOMMU_GET_HW_INFO`'s `out_capabilities`.
    hw_capabilities: u64,
    /// HWPTs allocated with `IOMMU_HWPT_ALLOC_DIRTY_TRACKING`.
    dirty_capable: HashSet<u32>,
    /// Type1's migration capability (pgsize_bitmap, max bitmap bytes).
    type1_migration: Option<(u64, u64)>,
    /// Dirty tracking on: (true, HWPT ID) or (false, container handle).
    tracking: HashSet<(bool, u64)>,
    /// Dirty 4 KiB IOVA pages, same keys.
    dirty: HashMap<(bool, u64), BTreeSet<u64>>,
    /// The reserved regions (inclusive) of every iommufd device: an IOAS
    /// with a device attached allows every IOVA but these.
    device_reserved: Vec<(u64, u64)>,
    /// The physical IOMMU instance of each device path (0 when unset).
    path_instance: HashMap<Vec<u8>, u32>,
    /// The iommufd device ID of each bound cdev.
    cdev_dev: HashMap<Handle, u32>,
    /// The IOMMU instance of each bound device, by device ID.
    dev_instance: HashMap<u32, u32>,
    /// The IOMMU instance of each HWPT and vIOMMU.
    instance: HashMap<u32, u32>,
    /// Which object each object is built on (a HWPT on its IOAS or
    /// parent, a vIOMMU on its parent, a vDEVICE or vEVENTQ on its
    /// vIOMMU): the kernel refuses to destroy an object others hold.
    built_on: HashMap<u32, u32>,
    /// The vIOMMUs that have a vEVENTQ (one per type per vIOMMU).
    with_veventq: HashSet<u32>,
}

/// The recording, scriptable [`HostIommu`].
#[derive(Debug)]
pub struct RecordingHost {
    state: Mutex<State>,
}

impl Default for RecordingHost {
    fn default() -> Self {
        Self::new(FakeIommu::vtd_nesting())
    }
}

impl RecordingHost {
    /// A host whose devices sit behind `hw`, with 20-bit device PASIDs and
    /// a type1 container mapping 4 KiB/2 MiB/1 GiB pages over the x86
    /// IOVA ranges (below and above the MSI window).
    pub fn new(hw: FakeIommu) -> Self {
        RecordingHost {
            state: Mutex::new(State {
                calls: Vec::new(),
                script: Vec::new(),
                next_handle: 100,
                next_object: 1,
                next_dev: 1,
                hw,
                device_pasid_bits: 20,
                type1_pgsizes: 1 << 12 | 1 << 21 | 1 << 30,
                type1_ranges: vec![(0, 0xfedf_ffff), (0xfef0_0000, (1 << 48) - 1)],
                handles: HashSet::new(),
                objects: HashSet::new(),
                maps: HashMap::new(),
                attached: HashMap::new(),
                reads: HashMap::new(),
                hw_capabilities: 0,
                dirty_capable: HashSet::new(),
                type1_migration: None,
                tracking: HashSet::new(),
                dirty: HashMap::new(),
                device_reserved: Vec::new(),
                path_instance: HashMap::new(),
                cdev_dev: HashMap::new(),
                dev_instance: HashMap::new(),
                instance: HashMap::new(),
                built_on: HashMap::new(),
                with_veventq: HashSet::new(),
            }),
        }
    }

    /// Gives every iommufd device the reserved regions `ranges`
    /// (inclusive, disjoint), as the MSI window and RMRRs are on a real
    /// host: `IOMMU_IOAS_IOVA_RANGES` of an IOAS a device is attached to
    /// leaves them out.
    pub fn set_device_reserved(&self, ranges: Vec<(u64, u64)>) {
        self.lock().device_reserved = ranges;
    }

    /// Puts the device at `device` (its sysfs path, as opened) behind
    /// physical IOMMU instance `instance` (every device is behind instance
    /// 0 otherwise). As the kernel does, HWPTs and vIOMMUs belong to the
    /// instance of the device they were allocated for, and attaching a
    /// device to a HWPT of another instance, building a vIOMMU or nested
    /// HWPT for it on another instance's parent, or a vDEVICE on another
    /// instance's vIOMMU is refused with EINVAL.
    pub fn set_device_iommu(&self, device: &std::path::Path, instance: u32) {
        self.lock()
            .path_instance
            .insert(device.as_os_str().as_encoded_bytes().to_vec(), instance);
    }

    /// The objects built on object `id` (HWPTs on an IOAS or parent,
    /// vIOMMUs on a parent, vDEVICEs and vEVENTQs on a vIOMMU) that are
    /// alive.
    pub fn built_on(&self, id: u32) -> Vec<u32> {
        let s = self.lock();
        let mut v: Vec<u32> = s
            .built_on
            .iter()
            .filter(|(child, on)| **on == id && s.objects.contains(child))
            .map(|(child, _)| *child)
            .collect();
        v.sort_unstable();
        v
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A test that panicked while holding the lock leaves a state that
        // is still worth reading.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sets the device's PASID width (`out_max_pasid_log2`).
    pub fn set_device_pasid_bits(&self, bits: u8) {
        self.lock().device_pasid_bits = bits;
    }

    /// Sets what `VFIO_IOMMU_GET_INFO` reports.
    pub fn set_type1_info(&self, pgsizes: u64, ranges: Vec<(u64, u64)>) {
        let mut s = self.lock();
        s.type1_pgsizes = pgsizes;
        s.type1_ranges = ranges;
    }

    /// Sets what `IOMMU_GET_HW_INFO` reports in `out_capabilities`
    /// (`IOMMU_HW_CAP_DIRTY_TRACKING` lets HWPTs be allocated with
    /// `IOMMU_HWPT_ALLOC_DIRTY_TRACKING`).
    pub fn set_hw_capabilities(&self, caps: u64) {
        self.lock().hw_capabilities = caps;
    }

    /// Offers type1's migration capability (dirty page tracking) in
    /// `VFIO_IOMMU_GET_INFO`, with these page sizes and largest bitmap.
    pub fn set_type1_migration(&self, pgsize_bitmap: u64, max_bitmap_size: u64) {
        self.lock().type1_migration = Some((pgsize_bitmap, max_bitmap_size));
    }

    /// The device behind HWPT `hwpt` wrote `len` bytes at `iova` (as the
    /// host IOMMU saw it): its 4 KiB pages are dirty if tracking is on.
    pub fn device_write_hwpt(&self, hwpt: u32, iova: u64, len: u64) {
        self.lock().device_write((true, u64::from(hwpt)), iova, len);
    }

    /// The device in `container` wrote `len` bytes at `iova`: its 4 KiB
    /// pages are dirty if tracking is on.
    pub fn device_write_type1(&self, container: Handle, iova: u64, len: u64) {
        self.lock()
            .device_write((false, container.0 as u64), iova, len);
    }

    /// Whether dirty tracking is on for HWPT `hwpt`.
    pub fn hwpt_tracking(&self, hwpt: u32) -> bool {
        self.lock().tracking.contains(&(true, u64::from(hwpt)))
    }

    /// Whether dirty tracking is on for `container`.
    pub fn type1_tracking(&self, container: Handle) -> bool {
        self.lock().tracking.contains(&(false, container.0 as u64))
    }

    /// Fails the call at `index` (counting every call from 0) with `errno`.
    pub fn fail_call(&self, index: usize, errno: i32) {
        self.lock()
            .script
            .push((Matcher::Index(index), Action::Fail(errno)));
    }

    /// Fails the `nth` (from 0, counting from the first call of the host's
    /// life) call of kind `op` with `errno`.
    pub fn fail_nth(&self, op: Op, nth: usize, errno: i32) {
        self.lock()
            .script
            .push((Matcher::Nth(op, nth), Action::Fail(errno)));
    }

    /// Fails the `nth` open of kind `op` (`Op::OpenType1`, `Op::OpenCdev`)
    /// as `VfioHost` does when the VM's KVM-VFIO device refuses the group
    /// or cdev (`KVM_DEV_VFIO_FILE_ADD` with `errno`): the error carries a
    /// [`crate::kvm_vfio::KvmVfioError::Add`], and nothing is opened.
    pub fn refuse_registration_nth(&self, op: Op, nth: usize, errno: i32) {
        self.lock()
            .script
            .push((Matcher::Nth(op, nth), Action::Unregistered(errno)));
    }

    /// Makes the `nth` `IOMMU_HWPT_INVALIDATE` handle only `handled`
    /// entries: `entry_num` is written back as `handled` and the call fails
    /// with `errno` (or succeeds if `errno` is 0).
    pub fn partial_nth(&self, nth: usize, handled: u32, errno: i32) {
        self.lock().script.push((
            Matcher::Nth(Op::HwptInvalidate, nth),
            Action::Partial { handled, errno },
        ));
    }

    /// Queues bytes that the next `read` of `handle` returns.
    pub fn push_read(&self, handle: Handle, bytes: Vec<u8>) {
        self.lock()
            .reads
            .entry(handle)
            .or_default()
            .push_back(bytes);
    }

    /// Every call so far.
    pub fn calls(&self) -> Vec<RecordedCall> {
        self.lock().calls.clone()
    }

    /// The calls so far of kind `op`.
    pub fn calls_of(&self, op: Op) -> Vec<RecordedCall> {
        self.lock()
            .calls
            .iter()
            .filter(|c| c.op == op)
            .cloned()
            .collect()
    }

    /// The kinds of the calls so far, in order.
    pub fn ops(&self) -> Vec<Op> {
        self.lock().calls.iter().map(|c| c.op).collect()
    }

    /// How many calls of kind `op` were made.
    pub fn count(&self, op: Op) -> usize {
        self.lock().calls.iter().filter(|c| c.op == op).count()
    }

    /// How many calls were made.
    pub fn len(&self) -> usize {
        self.lock().calls.len()
    }

    /// Whether no call was made.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The DMA mappings (iova, size) of a type1 container.
    pub fn type1_mappings(&self, container: Handle) -> Vec<(u64, u64)> {
        let s = self.lock();
        s.maps
            .get(&(false, container.0 as u64))
            .map(|m| m.iter().map(|(a, b)| (*a, *b)).collect())
            .unwrap_or_default()
    }

    /// The mappings (iova, length) of an IOAS.
    pub fn ioas_mappings(&self, ioas: u32) -> Vec<(u64, u64)> {
        let s = self.lock();
        s.maps
            .get(&(true, u64::from(ioas)))
            .map(|m| m.iter().map(|(a, b)| (*a, *b)).collect())
            .unwrap_or_default()
    }

    /// The page table `device`'s `pasid` (0: the device itself) is attached to.
    pub fn attached(&self, device: Handle, pasid: u32) -> Option<u32> {
        self.lock().attached.get(&(device, pasid)).copied()
    }

    /// How many PASIDs (with the RID as PASID 0) of `device` are attached.
    pub fn attachments(&self, device: Handle) -> usize {
        self.lock()
            .attached
            .keys()
            .filter(|(d, _)| *d == device)
            .count()
    }

    /// The iommufd objects allocated and not destroyed.
    pub fn live_objects(&self) -> usize {
        self.lock().objects.len()
    }

    /// Whether an iommufd object is alive.
    pub fn is_live(&self, id: u32) -> bool {
        self.lock().objects.contains(&id)
    }

    /// The handles opened and not closed.
    pub fn open_handles(&self) -> usize {
        self.lock().handles.len()
    }
}

impl State {
    fn scripted(&mut self, op: Op) -> Option<Action> {
        let index = self.calls.len();
        let nth = self.calls.iter().filter(|c| c.op == op).count();
        let pos = self.script.iter().position(|(m, _)| match *m {
            Matcher::Index(i) => i == index,
            Matcher::Nth(o, n) => o == op && n == nth,
        })?;
        Some(self.script.remove(pos).1)
    }

    fn record(
        &mut self,
        op: Op,
        target: Handle,
        arg: Vec<u8>,
        payload: Vec<u8>,
        result: Result<(), i32>,
    ) {
        self.record_out(op, target, arg, Vec::new(), payload, result);
    }

    fn record_out(
        &mut self,
        op: Op,
        target: Handle,
        arg: Vec<u8>,
        out: Vec<u8>,
        payload: Vec<u8>,
        result: Result<(), i32>,
    ) {
        let index = self.calls.len();
        self.calls.push(RecordedCall {
            index,
            op,
            target,
            arg,
            out,
            payload,
            result,
        });
    }

    fn new_handle(&mut self) -> Handle {
        let h = Handle(self.next_handle);
        self.next_handle += 1;
        self.handles.insert(h);
        h
    }

    /// The IOMMU instance of a bound device, HWPT or vIOMMU (`None` for
    /// an IOAS, which any device may use).
    fn instance_of(&self, id: u32) -> Option<u32> {
        self.instance.get(&id).copied()
    }

    /// EINVAL unless object `pt` (if it belongs to an instance) and
    /// device `dev_id` are behind the same IOMMU instance.
    fn same_instance(&self, pt: u32, dev_id: u32) -> Result<(), i32> {
        match self.instance_of(pt) {
            Some(i) if Some(i) != self.instance_of_dev(dev_id) => Err(libc::EINVAL),
            _ => Ok(()),
        }
    }

    fn instance_of_dev(&self, dev_id: u32) -> Option<u32> {
        self.dev_instance.get(&dev_id).copied()
    }

    fn new_object(&mut self) -> u32 {
        let id = self.next_object;
        self.next_object += 1;
        self.objects.insert(id);
        id
    }

    fn map(&mut self, key: (bool, u64), iova: u64, size: u64) -> Result<(), i32> {
        if size == 0 {
            return Err(libc::EINVAL);
        }
        let end = iova.checked_add(size - 1).ok_or(libc::EINVAL)?;
        let m = self.maps.entry(key).or_default();
        let overlaps = m
            .range(..=end)
            .next_back()
            .is_some_and(|(a, s)| a + (s - 1) >= iova);
        if overlaps {
            return Err(libc::EEXIST);
        }
        m.insert(iova, size);
        Ok(())
    }

    /// Removes the whole mappings inside the range; the bytes removed.
    fn unmap(&mut self, key: (bool, u64), iova: u64, size: u64) -> u64 {
        let Some(m) = self.maps.get_mut(&key) else {
            return 0;
        };
        let last = iova.saturating_add(size.saturating_sub(1));
        let inside: Vec<u64> = m
            .range(iova..=last)
            .filter(|(a, s)| *a + (*s - 1) <= last)
            .map(|(a, _)| *a)
            .collect();
        inside.iter().filter_map(|a| m.remove(a)).sum()
    }

    fn device_write(&mut self, key: (bool, u64), iova: u64, len: u64) {
        if !self.tracking.contains(&key) || len == 0 {
            return;
        }
        let set = self.dirty.entry(key).or_default();
        let last = iova.saturating_add(len - 1);
        let mut p = iova & !0xfff;
        while p <= last {
            set.insert(p);
            match p.checked_add(0x1000) {
                Some(n) => p = n,
                None => break,
            }
        }
    }

    /// Sets the bits of the dirty pages of `key` in `[iova, iova + len)`
    /// (one per `page`) in `bitmap`, clearing them unless `keep`.
    fn read_dirty(
        &mut self,
        key: (bool, u64),
        iova: u64,
        len: u64,
        page: u64,
        bitmap: &mut [u64],
        keep: bool,
    ) -> Result<(), i32> {
        if !self.tracking.contains(&key) {
            return Err(libc::EINVAL);
        }
        if page == 0
            || !page.is_power_of_two()
            || len == 0
            || iova % page != 0
            || len % page != 0
            || iova.checked_add(len - 1).is_none()
        {
            return Err(libc::EINVAL);
        }
        let pages = len / page;
        if (bitmap.len() as u64) < pages.div_ceil(64) {
            return Err(libc::EINVAL);
        }
        let set = self.dirty.entry(key).or_default();
        let hits: Vec<u64> = set.range(iova..=iova + (len - 1)).copied().collect();
        for p in hits {
            let i = (p - iova) / page;
            bitmap[(i / 64) as usize] |= 1 << (i % 64);
            if !keep {
                set.remove(&p);
            }
        }
        Ok(())
    }

    fn emulate(&mut self, target: Handle, call: &mut Ioctl<'_>) -> Result<(), i32> {
        match call {
            Ioctl::Type1GetInfo { buf } => {
                let n = self.type1_ranges.len();
                let mig = self.type1_migration;
                let need = 24 + 16 + 16 * n + if mig.is_some() { 32 } else { 0 };
                let argsz = need.max(buf.len()) as u32;
                buf.get_mut(0..4)
                    .ok_or(libc::EINVAL)?
                    .copy_from_slice(&argsz.to_le_bytes());
                let flags = VFIO_IOMMU_INFO_PGSIZES | VFIO_IOMMU_INFO_CAPS;
                buf[4..8].copy_from_slice(&flags.to_le_bytes());
                buf[8..16].copy_from_slice(&self.type1_pgsizes.to_le_bytes());
                if buf.len() < need {
                    return Ok(());
                }
                buf[16..20].copy_from_slice(&24u32.to_le_bytes());
                buf[24..26]
                    .copy_from_slice(&(VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE as u16).to_le_bytes());
                buf[26..28].copy_from_slice(&1u16.to_le_bytes());
                buf[28..32].copy_from_slice(&0u32.to_le_bytes());
                buf[32..36].copy_from_slice(&(n as u32).to_le_bytes());
                for (i, (s, e)) in self.type1_ranges.iter().enumerate() {
                    let at = 40 + 16 * i;
                    buf[at..at + 8].copy_from_slice(&s.to_le_bytes());
                    buf[at + 8..at + 16].copy_from_slice(&e.to_le_bytes());
                }
                if let Some((pgsizes, max)) = mig {
                    // vfio_iommu_type1_info_cap_migration after the IOVA
                    // range capability, which points at it.
                    let at = 40 + 16 * n;
                    buf[28..32].copy_from_slice(&(at as u32).to_le_bytes());
                    buf[at..at + 2].copy_from_slice(
                        &(VFIO_IOMMU_TYPE1_INFO_CAP_MIGRATION as u16).to_le_bytes(),
                    );
                    buf[at + 2..at + 4].copy_from_slice(&1u16.to_le_bytes());
                    buf[at + 16..at + 24].copy_from_slice(&pgsizes.to_le_bytes());
                    buf[at + 24..at + 32].copy_from_slice(&max.to_le_bytes());
                }
                Ok(())
            }
            Ioctl::Type1MapDma(a) => self.map((false, target.0 as u64), a.iova, a.size),
            Ioctl::Type1UnmapDma(a) => {
                a.size = self.unmap((false, target.0 as u64), a.iova, a.size);
                Ok(())
            }
            Ioctl::IoasAlloc(a) => {
                a.out_ioas_id = self.new_object();
                Ok(())
            }
            Ioctl::IoasMap(a) => {
                if !self.objects.contains(&a.ioas_id) {
                    return Err(libc::ENOENT);
                }
                self.map((true, u64::from(a.ioas_id)), a.iova, a.length)
            }
            Ioctl::IoasUnmap(a) => {
                a.length = self.unmap((true, u64::from(a.ioas_id)), a.iova, a.length);
                if a.length == 0 {
                    return Err(libc::ENOENT);
                }
                Ok(())
            }
            Ioctl::HwptAlloc { arg, data } => {
                if !self.objects.contains(&arg.pt_id) || arg.data_len as usize != data.len() {
                    return Err(libc::EINVAL);
                }
                self.same_instance(arg.pt_id, arg.dev_id)?;
                let dirty =
                    arg.flags & iommufd_hwpt_alloc_flags_IOMMU_HWPT_ALLOC_DIRTY_TRACKING != 0;
                if dirty && !crate::dirty::hw_dirty_capable(self.hw_capabilities) {
                    return Err(libc::EOPNOTSUPP);
                }
                arg.out_hwpt_id = self.new_object();
                if dirty {
                    self.dirty_capable.insert(arg.out_hwpt_id);
                }
                let inst = self.instance_of_dev(arg.dev_id).unwrap_or(0);
                self.instance.insert(arg.out_hwpt_id, inst);
                self.built_on.insert(arg.out_hwpt_id, arg.pt_id);
                Ok(())
            }
            Ioctl::GetHwInfo { arg, data } => {
                let (ty, bytes) = match self.hw {
                    FakeIommu::IntelVtd { cap, ecap } => {
                        let mut b = vec![0u8; 24];
                        b[8..16].copy_from_slice(&cap.to_le_bytes());
                        b[16..24].copy_from_slice(&ecap.to_le_bytes());
                        (iommu_hw_info_type_IOMMU_HW_INFO_TYPE_INTEL_VTD, b)
                    }
                    FakeIommu::ArmSmmuV3 { idr } => {
                        let mut b = vec![0u8; 40];
                        for (i, v) in idr.iter().enumerate() {
                            b[8 + 4 * i..12 + 4 * i].copy_from_slice(&v.to_le_bytes());
                        }
                        (iommu_hw_info_type_IOMMU_HW_INFO_TYPE_ARM_SMMUV3, b)
                    }
                };
                let n = bytes.len().min(data.len()).min(arg.data_len as usize);
                data[..n].copy_from_slice(&bytes[..n]);
                arg.data_len = bytes.len() as u32;
                arg.__bindgen_anon_1.out_data_type = ty;
                arg.out_max_pasid_log2 = self.device_pasid_bits;
                arg.out_capabilities = self.hw_capabilities;
                Ok(())
            }
            Ioctl::HwptInvalidate { arg, entries } => {
                let want = (arg.entry_len as usize).saturating_mul(arg.entry_num as usize);
                if !self.objects.contains(&arg.hwpt_id) || entries.len() != want {
                    arg.entry_num = 0;
                    return Err(libc::EINVAL);
                }
                Ok(())
            }
            Ioctl::ViommuAlloc(a) => {
                if !self.objects.contains(&a.hwpt_id) {
                    return Err(libc::ENOENT);
                }
                // arm_vsmmu_alloc: the parent's SMMU must be the device's.
                self.same_instance(a.hwpt_id, a.dev_id)?;
                a.out_viommu_id = self.new_object();
                let inst = self.instance_of(a.hwpt_id).unwrap_or(0);
                self.instance.insert(a.out_viommu_id, inst);
                self.built_on.insert(a.out_viommu_id, a.hwpt_id);
                Ok(())
            }
            Ioctl::VdeviceAlloc(a) => {
                if !self.objects.contains(&a.viommu_id) {
                    return Err(libc::ENOENT);
                }
                // iommufd_vdevice_alloc_ioctl: the vIOMMU's IOMMU must be
                // the device's.
                self.same_instance(a.viommu_id, a.dev_id)?;
                a.out_vdevice_id = self.new_object();
                self.built_on.insert(a.out_vdevice_id, a.viommu_id);
                Ok(())
            }
            Ioctl::FaultQueueAlloc(a) => {
                a.out_fault_id = self.new_object();
                a.out_fault_fd = self.new_handle().0 as u32;
                Ok(())
            }
            Ioctl::VeventqAlloc(a) => {
                if !self.objects.contains(&a.viommu_id) {
                    return Err(libc::ENOENT);
                }
                // One vEVENTQ of a type per vIOMMU.
                if !self.with_veventq.insert(a.viommu_id) {
                    return Err(libc::EEXIST);
                }
                a.out_veventq_id = self.new_object();
                self.built_on.insert(a.out_veventq_id, a.viommu_id);
                a.out_veventq_fd = self.new_handle().0 as u32;
                Ok(())
            }
            Ioctl::Destroy(a) => {
                // The kernel refuses to destroy an object still in use.
                if self.attached.values().any(|pt| *pt == a.id) {
                    return Err(libc::EBUSY);
                }
                let held = self
                    .built_on
                    .iter()
                    .any(|(child, on)| *on == a.id && self.objects.contains(child));
                if held {
                    return Err(libc::EBUSY);
                }
                if !self.objects.remove(&a.id) {
                    return Err(libc::ENOENT);
                }
                self.built_on.remove(&a.id);
                self.instance.remove(&a.id);
                self.with_veventq.remove(&a.id);
                self.maps.remove(&(true, u64::from(a.id)));
                Ok(())
            }
            Ioctl::IoasIovaRanges { arg, ranges } => {
                if !self.objects.contains(&arg.ioas_id) {
                    return Err(libc::ENOENT);
                }
                let in_use = self.attached.values().any(|pt| *pt == arg.ioas_id);
                let reserved = if in_use {
                    self.device_reserved.clone()
                } else {
                    Vec::new()
                };
                // The allowed ranges are the gaps between reserved ones.
                let mut allowed = Vec::new();
                let mut next = Some(0u64);
                let mut sorted = reserved;
                sorted.sort_unstable();
                for (s, e) in sorted {
                    if let Some(n) = next {
                        if s > n {
                            allowed.push((n, s - 1));
                        }
                    }
                    next = e.checked_add(1).map(|x| next.map_or(x, |n| n.max(x)));
                }
                if let Some(n) = next {
                    allowed.push((n, u64::MAX));
                }
                let room = (arg.num_iovas as usize).min(ranges.len());
                arg.num_iovas = allowed.len() as u32;
                arg.out_iova_alignment = 4096;
                if allowed.len() > room {
                    return Err(libc::EMSGSIZE);
                }
                for (slot, (s, e)) in ranges.iter_mut().zip(allowed) {
                    slot.start = s;
                    slot.last = e;
                }
                Ok(())
            }
            Ioctl::AttachPt(a) => {
                if !self.objects.contains(&a.pt_id) {
                    return Err(libc::ENOENT);
                }
                let dev = self.cdev_dev.get(&target).copied().unwrap_or(0);
                self.same_instance(a.pt_id, dev)?;
                let pasid = if a.flags & VFIO_DEVICE_ATTACH_PASID != 0 {
                    a.pasid
                } else {
                    0
                };
                self.attached.insert((target, pasid), a.pt_id);
                Ok(())
            }
            Ioctl::DetachPt(a) => {
                let pasid = if a.flags & VFIO_DEVICE_DETACH_PASID != 0 {
                    a.pasid
                } else {
                    0
                };
                self.attached.remove(&(target, pasid));
                Ok(())
            }
            Ioctl::HwptSetDirtyTracking(a) => {
                if !self.objects.contains(&a.hwpt_id) {
                    return Err(libc::ENOENT);
                }
                if !self.dirty_capable.contains(&a.hwpt_id) || a.flags & !1 != 0 {
                    return Err(libc::EOPNOTSUPP);
                }
                let key = (true, u64::from(a.hwpt_id));
                if a.flags & 1 != 0 {
                    self.tracking.insert(key);
                } else {
                    self.tracking.remove(&key);
                }
                self.dirty.remove(&key);
                Ok(())
            }
            Ioctl::HwptGetDirtyBitmap { arg, bitmap } => {
                if !self.objects.contains(&arg.hwpt_id) {
                    return Err(libc::ENOENT);
                }
                let keep = arg.flags
                    & iommufd_hwpt_get_dirty_bitmap_flags_IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR
                    != 0;
                let key = (true, u64::from(arg.hwpt_id));
                self.read_dirty(key, arg.iova, arg.length, arg.page_size, bitmap, keep)
            }
            Ioctl::Type1DirtyPages { arg, bitmap } => {
                let Some((pgsizes, _)) = self.type1_migration else {
                    return Err(libc::ENOTTY);
                };
                let argsz = crate::host::le32(arg, 0).ok_or(libc::EINVAL)? as usize;
                let flags = crate::host::le32(arg, 4).ok_or(libc::EINVAL)?;
                if argsz != arg.len() || flags.count_ones() != 1 {
                    return Err(libc::EINVAL);
                }
                let key = (false, target.0 as u64);
                match flags {
                    VFIO_IOMMU_DIRTY_PAGES_FLAG_START => {
                        self.tracking.insert(key);
                        self.dirty.remove(&key);
                        Ok(())
                    }
                    VFIO_IOMMU_DIRTY_PAGES_FLAG_STOP => {
                        self.tracking.remove(&key);
                        self.dirty.remove(&key);
                        Ok(())
                    }
                    VFIO_IOMMU_DIRTY_PAGES_FLAG_GET_BITMAP => {
                        let f = |at| crate::host::le64(arg, at).ok_or(libc::EINVAL);
                        let (iova, size, pgsize, bytes) = (f(8)?, f(16)?, f(24)?, f(32)?);
                        // vfio_iommu_type1.c: the smallest page size, a
                        // range of whole mappings, a bitmap big enough.
                        if pgsize != pgsizes & pgsizes.wrapping_neg() || size == 0 {
                            return Err(libc::EINVAL);
                        }
                        let m = self.maps.get(&key).cloned().unwrap_or_default();
                        let starts = m.contains_key(&iova);
                        let ends = m
                            .range(..=iova.saturating_add(size - 1))
                            .next_back()
                            .is_some_and(|(a, s)| a.checked_add(*s) == iova.checked_add(size));
                        let need = (size / pgsize).div_ceil(64) * 8;
                        if !starts || !ends || bytes < need || (bitmap.len() as u64) * 8 < bytes {
                            return Err(libc::EINVAL);
                        }
                        self.read_dirty(key, iova, size, pgsize, bitmap, false)
                    }
                    _ => Err(libc::EINVAL),
                }
            }
        }
    }
}

impl HostIommu for RecordingHost {
    fn open(&self, what: Open<'_>) -> io::Result<Opened> {
        let mut s = self.lock();
        let (op, payload, target) = match what {
            Open::Type1 { device } => (
                Op::OpenType1,
                device.as_os_str().as_encoded_bytes().to_vec(),
                Handle(-1),
            ),
            Open::Iommufd => (Op::OpenIommufd, Vec::new(), Handle(-1)),
            Open::Cdev { device, iommufd } => (
                Op::OpenCdev,
                device.as_os_str().as_encoded_bytes().to_vec(),
                iommufd,
            ),
        };
        match s.scripted(op) {
            Some(Action::Fail(e) | Action::Partial { errno: e, .. }) => {
                s.record(op, target, Vec::new(), payload, Err(e));
                return Err(io::Error::from_raw_os_error(e));
            }
            Some(Action::Unregistered(e)) => {
                s.record(op, target, Vec::new(), payload, Err(e));
                let why = io::Error::from_raw_os_error(e);
                return Err(crate::kvm_vfio::KvmVfioError::Add(why).into_io());
            }
            None => {}
        }
        let handle = s.new_handle();
        let dev_id = (op == Op::OpenCdev).then(|| {
            let d = s.next_dev;
            s.next_dev += 1;
            d
        });
        if let Some(d) = dev_id {
            let inst = s.path_instance.get(&payload).copied().unwrap_or(0);
            s.dev_instance.insert(d, inst);
            s.cdev_dev.insert(handle, d);
        }
        s.record(op, handle, Vec::new(), payload, Ok(()));
        Ok(Opened { handle, dev_id })
    }

    fn ioctl(&self, target: Handle, mut call: Ioctl<'_>) -> io::Result<()> {
        let mut s = self.lock();
        let op = call.op();
        let (arg, payload) = call.bytes();
        let result = match s.scripted(op) {
            Some(Action::Fail(e) | Action::Unregistered(e)) => {
                if let Ioctl::HwptInvalidate { arg, .. } = &mut call {
                    arg.entry_num = 0;
                }
                Err(e)
            }
            Some(Action::Partial { handled, errno }) => {
                if let Ioctl::HwptInvalidate { arg, .. } = &mut call {
                    arg.entry_num = handled.min(arg.entry_num);
                }
                if errno == 0 {
                    Ok(())
                } else {
                    Err(errno)
                }
            }
            None => s.emulate(target, &mut call),
        };
        let out = call.bytes().0;
        s.record_out(op, target, arg, out, payload, result);
        result.map_err(io::Error::from_raw_os_error)
    }

    fn read(&self, target: Handle, buf: &mut [u8]) -> io::Result<usize> {
        let mut s = self.lock();
        if let Some(Action::Fail(e) | Action::Partial { errno: e, .. }) = s.scripted(Op::Read) {
            s.record(Op::Read, target, Vec::new(), Vec::new(), Err(e));
            return Err(io::Error::from_raw_os_error(e));
        }
        let chunk = s
            .reads
            .get_mut(&target)
            .and_then(|q| q.pop_front())
            .unwrap_or_default();
        let n = chunk.len().min(buf.len());
        buf[..n].copy_from_slice(&chunk[..n]);
        s.record(Op::Read, target, Vec::new(), chunk[..n].to_vec(), Ok(()));
        Ok(n)
    }

    fn write(&self, target: Handle, buf: &[u8]) -> io::Result<usize> {
        let mut s = self.lock();
        if let Some(Action::Fail(e) | Action::Partial { errno: e, .. }) = s.scripted(Op::Write) {
            s.record(Op::Write, target, Vec::new(), buf.to_vec(), Err(e));
            return Err(io::Error::from_raw_os_error(e));
        }
        s.record(Op::Write, target, Vec::new(), buf.to_vec(), Ok(()));
        Ok(buf.len())
    }

    fn close(&self, target: Handle) {
        let mut s = self.lock();
        s.handles.remove(&target);
        s.attached.retain(|(d, _), _| *d != target);
        s.maps.remove(&(false, target.0 as u64));
        s.tracking.remove(&(false, target.0 as u64));
        s.dirty.remove(&(false, target.0 as u64));
        s.record(Op::Close, target, Vec::new(), Vec::new(), Ok(()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use iommufd_bindings::iommufd::{iommu_destroy, iommu_ioas_alloc};
    use std::path::Path;
    use vfio_bindings::bindings::vfio::vfio_iommu_type1_dma_map;

    #[test]
    fn records_bytes_and_hands_out_ids() {
        let h = RecordingHost::default();
        let fd = h.open(Open::Iommufd).unwrap().handle;
        let mut a = iommu_ioas_alloc {
            size: 12,
            flags: 0,
            out_ioas_id: 0,
        };
        h.ioctl(fd, Ioctl::IoasAlloc(&mut a)).unwrap();
        assert_eq!(a.out_ioas_id, 1);
        let c = h.calls();
        assert_eq!(c[1].op, Op::IoasAlloc);
        assert_eq!(c[1].arg, vec![12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(h.live_objects(), 1);
        h.ioctl(fd, Ioctl::Destroy(&iommu_destroy { size: 8, id: 1 }))
            .unwrap();
        assert_eq!(h.live_objects(), 0);
    }

    #[test]
    fn scripted_failures_fire_once() {
        let h = RecordingHost::default();
        h.fail_nth(Op::OpenCdev, 1, libc::EBUSY);
        h.fail_call(0, libc::ENODEV);
        assert_eq!(
            h.open(Open::Iommufd).unwrap_err().raw_os_error(),
            Some(libc::ENODEV)
        );
        let fd = h.open(Open::Iommufd).unwrap().handle;
        let p = Path::new("/sys/bus/pci/devices/0000:00:01.0");
        let d = h
            .open(Open::Cdev {
                device: p,
                iommufd: fd,
            })
            .unwrap();
        assert_eq!(d.dev_id, Some(1));
        assert!(h
            .open(Open::Cdev {
                device: p,
                iommufd: fd
            })
            .is_err());
        assert!(h
            .open(Open::Cdev {
                device: p,
                iommufd: fd
            })
            .is_ok());
        assert_eq!(h.calls()[3].result, Err(libc::EBUSY));
    }

    #[test]
    fn overlapping_type1_maps_are_eexist() {
        let h = RecordingHost::default();
        let c = h
            .open(Open::Type1 {
                device: Path::new("/x"),
            })
            .unwrap()
            .handle;
        let m = vfio_iommu_type1_dma_map {
            argsz: 32,
            flags: 3,
            vaddr: 0,
            iova: 0x1000,
            size: 0x2000,
        };
        h.ioctl(c, Ioctl::Type1MapDma(&m)).unwrap();
        let m2 = vfio_iommu_type1_dma_map {
            iova: 0x2000,
            size: 0x1000,
            ..m
        };
        assert_eq!(
            h.ioctl(c, Ioctl::Type1MapDma(&m2))
                .unwrap_err()
                .raw_os_error(),
            Some(libc::EEXIST)
        );
        assert_eq!(h.type1_mappings(c), vec![(0x1000, 0x2000)]);
    }
}

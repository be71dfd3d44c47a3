//! Snapshot and restore of a paused VM: guest memory, the vCPU's state
//! (registers, segment and control registers, x87/SSE state, the MSRs the
//! guest's state depends on, the local APIC, pending events), the
//! in-kernel irqchip, the virtio-mmio transport, the virtio-iommu
//! (`VirtioIommu::snapshot`, stored as its JSON), the DMA engines'
//! registers and the ports. [`super::Vm::snapshot`] takes one from a VM
//! paused at a sync point; [`super::Vm::restore`] builds a new VM (new
//! KVM VM, new guest memory, a device built from the config) and restores
//! it there.
//!
//! What it never does: trust the snapshot. Every part is checked against
//! the VM built from the config before the guest runs again — the memory
//! layout, the device (by the vIOMMU's own restore, which replays the
//! state through the request rules), the transport's queues and status,
//! the number of DMA engines, the interrupt path — and KVM checks the
//! vCPU state it is given; a failure is a [`SnapshotError`], never a
//! half-restored VM that runs.
//!
//! The x87/SSE state is all of the guest's FPU state: the guest program is
//! built for the baseline x86-64 target (no AVX) and its CR4 has no
//! OSXSAVE, so `KVM_GET_FPU` holds every register it can use.

use kvm_bindings::{
    kvm_debugregs, kvm_fpu, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs,
    kvm_sregs, kvm_vcpu_events, Msrs, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::{VcpuFd, VmFd};

use super::dma_device::{DmaBusy, DmaRegs};
use super::pio::PortsState;
use super::virtio_mmio::{TransportRestoreError, TransportState};

/// The MSRs a snapshot carries: the time-stamp counter (the guest times
/// its waits with RDTSC, so a counter that started over would look like
/// time running backwards), and the system-call, PAT, TSC_AUX and
/// MISC_ENABLE registers a vCPU has. EFER and APIC_BASE travel in the
/// special registers, FS/GS bases in the segments.
pub const SNAPSHOT_MSRS: [(u32, &str); 11] = [
    (0x10, "IA32_TSC"),
    (0x174, "IA32_SYSENTER_CS"),
    (0x175, "IA32_SYSENTER_ESP"),
    (0x176, "IA32_SYSENTER_EIP"),
    (0x1a0, "IA32_MISC_ENABLE"),
    (0x277, "IA32_PAT"),
    (0xc000_0081, "STAR"),
    (0xc000_0082, "LSTAR"),
    (0xc000_0083, "CSTAR"),
    (0xc000_0084, "SFMASK"),
    (0xc000_0102, "KERNEL_GS_BASE"),
];

/// Why a VM cannot be snapshotted or restored.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// A KVM ioctl failed.
    #[error("{what}: {source}")]
    Kvm {
        /// Which ioctl.
        what: &'static str,
        /// The error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// KVM read or wrote fewer MSRs than asked.
    #[error("{what} stopped at MSR {name} ({index:#x}): {done} of {total} done")]
    Msr {
        /// `KVM_GET_MSRS` or `KVM_SET_MSRS`.
        what: &'static str,
        /// The first MSR not done.
        index: u32,
        /// Its name.
        name: &'static str,
        /// MSRs done.
        done: usize,
        /// MSRs asked for.
        total: usize,
    },
    /// The VM is not paused at a sync point.
    #[error("the VM is not paused at a sync point (run it with run_until_pause first)")]
    NotPaused,
    /// A DMA engine has an operation in flight.
    #[error(transparent)]
    DmaBusy(#[from] DmaBusy),
    /// A DMA engine was hot-plugged: this VMM snapshots cold-plugged
    /// engines only.
    #[error(
        "DMA engine slot {0} was hot-plugged; the KVM test VMM snapshots cold-plugged engines only"
    )]
    Hotplugged(usize),
    /// The vIOMMU refused to snapshot or restore.
    #[error("virtio-iommu: {0}")]
    Device(#[from] vmm_iommu::snapshot::SnapshotError),
    /// The transport's state does not fit.
    #[error("virtio-mmio transport: {0}")]
    Transport(#[from] TransportRestoreError),
    /// The snapshot's memory is not the layout of the VM it is restored
    /// into.
    #[error(
        "guest memory: the snapshot has regions {snapshot:x?}, the VM {vm:x?} (start, length)"
    )]
    Memory {
        /// The snapshot's regions.
        snapshot: Vec<(u64, u64)>,
        /// The VM's.
        vm: Vec<(u64, u64)>,
    },
    /// Guest memory could not be copied.
    #[error("guest memory: {0}")]
    GuestMemory(#[from] vm_memory::GuestMemoryError),
    /// The snapshot's DMA engines are not the VM's.
    #[error("the snapshot has {snapshot} DMA engines, the VM {vm}")]
    DmaEngines {
        /// In the snapshot.
        snapshot: usize,
        /// In the VM.
        vm: usize,
    },
    /// The snapshot was taken with an in-kernel irqchip and the VM has
    /// none, or the other way round.
    #[error("the snapshot {} an in-kernel irqchip and the VM {}", if *.snapshot { "has" } else { "has no" }, if *.vm { "has one" } else { "has none" })]
    Irqchip {
        /// Whether the snapshot has one.
        snapshot: bool,
        /// Whether the VM has one.
        vm: bool,
    },
}

pub(super) fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> SnapshotError {
    move |source| SnapshotError::Kvm { what, source }
}

/// One guest RAM region's contents.
#[derive(Clone)]
pub struct RegionSnapshot {
    /// Its guest-physical start.
    pub start: u64,
    /// Its bytes.
    pub bytes: Vec<u8>,
}

impl std::fmt::Debug for RegionSnapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "RegionSnapshot({:#x}, {} bytes)",
            self.start,
            self.bytes.len()
        )
    }
}

/// The vCPU's state.
#[derive(Clone, Debug)]
pub struct VcpuState {
    /// General-purpose registers, RIP, RFLAGS.
    pub regs: kvm_regs,
    /// Segments, descriptor tables, control registers, EFER, APIC base.
    pub sregs: kvm_sregs,
    /// x87 and SSE registers, MXCSR.
    pub fpu: kvm_fpu,
    /// [`SNAPSHOT_MSRS`], in that order.
    pub msrs: Vec<kvm_msr_entry>,
    /// The local APIC (with an in-kernel irqchip only).
    pub lapic: Option<kvm_lapic_state>,
    /// Pending exceptions, interrupts, NMIs, the interrupt shadow.
    pub events: kvm_vcpu_events,
    /// Runnable or halted.
    pub mp_state: kvm_mp_state,
    /// Debug registers.
    pub debugregs: kvm_debugregs,
}

/// The in-kernel irqchip's three chips: master PIC, slave PIC, IOAPIC.
pub const IRQCHIPS: [u32; 3] = [
    KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE,
    KVM_IRQCHIP_IOAPIC,
];

/// A paused VM.
#[derive(Clone, Debug)]
pub struct VmSnapshot {
    /// The sync point it was paused at.
    pub paused_at: u32,
    /// Guest RAM, region by region.
    pub memory: Vec<RegionSnapshot>,
    /// The vCPU.
    pub vcpu: VcpuState,
    /// The in-kernel irqchip, if the VM has one ([`IRQCHIPS`] order).
    pub irqchip: Option<Vec<kvm_irqchip>>,
    /// The virtio-mmio transport.
    pub transport: TransportState,
    /// The virtio-iommu: `DeviceSnapshot::to_json`.
    pub device_json: Vec<u8>,
    /// Each DMA engine's registers, in slot order.
    pub dmas: Vec<DmaRegs>,
    /// The ports.
    pub ports: PortsState,
}

/// How big a snapshot is, part by part (bytes).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SnapshotSize {
    /// Guest RAM.
    pub memory: u64,
    /// Guest RAM in 4 KiB pages that are not all zero (what a sparse
    /// image stores).
    pub memory_nonzero: u64,
    /// The virtio-iommu's JSON.
    pub device: u64,
    /// vCPU and irqchip state (the KVM structures).
    pub cpu: u64,
    /// Transport, DMA engines, ports.
    pub other: u64,
}

impl SnapshotSize {
    /// Everything.
    pub fn total(&self) -> u64 {
        self.memory + self.device + self.cpu + self.other
    }

    /// Everything, guest RAM counted sparsely.
    pub fn total_sparse(&self) -> u64 {
        self.memory_nonzero + self.device + self.cpu + self.other
    }
}

impl VmSnapshot {
    /// The sizes of its parts.
    pub fn size(&self) -> SnapshotSize {
        use std::mem::size_of;
        const PAGE: usize = 4096;
        let memory = self.memory.iter().map(|r| r.bytes.len() as u64).sum();
        let memory_nonzero = self
            .memory
            .iter()
            .flat_map(|r| r.bytes.chunks(PAGE))
            .filter(|p| p.iter().any(|&b| b != 0))
            .map(|p| p.len() as u64)
            .sum();
        let v = &self.vcpu;
        let cpu = size_of::<kvm_regs>()
            + size_of::<kvm_sregs>()
            + size_of::<kvm_fpu>()
            + v.msrs.len() * size_of::<kvm_msr_entry>()
            + v.lapic.map_or(0, |_| size_of::<kvm_lapic_state>())
            + size_of::<kvm_vcpu_events>()
            + size_of::<kvm_mp_state>()
            + size_of::<kvm_debugregs>()
            + self
                .irqchip
                .as_ref()
                .map_or(0, |c| c.len() * size_of::<kvm_irqchip>());
        let other = size_of::<TransportState>()
            + self.transport.queues.len() * size_of::<super::virtio_mmio::QueueRegs>()
            + self.dmas.len() * size_of::<DmaRegs>()
            + size_of::<PortsState>()
            + self.ports.serial.len();
        SnapshotSize {
            memory,
            memory_nonzero,
            device: self.device_json.len() as u64,
            cpu: cpu as u64,
            other: other as u64,
        }
    }
}

/// Lets KVM finish the instruction the vCPU exited on (the port write of
/// the sync point): until `KVM_RUN` is entered again, RIP still points at
/// it and the state is not consistent (KVM API, "KVM_RUN" and
/// `immediate_exit`). Runs no guest code.
pub(super) fn complete_pending_exit(vcpu: &mut VcpuFd) -> Result<(), SnapshotError> {
    vcpu.set_kvm_immediate_exit(1);
    let r = match vcpu.run() {
        Err(e) if e.errno() == libc::EINTR => Ok(()),
        Err(e) => Err(SnapshotError::Kvm {
            what: "KVM_RUN (immediate_exit)",
            source: e,
        }),
        // An exit with immediate_exit set would have run guest code; it
        // does not happen, but a state taken now would not be at the
        // sync point, so it is refused.
        Ok(_) => Err(SnapshotError::NotPaused),
    };
    vcpu.set_kvm_immediate_exit(0);
    r
}

/// Reads the vCPU's state (after [`complete_pending_exit`]).
pub(super) fn save_vcpu(vcpu: &VcpuFd, has_irqchip: bool) -> Result<VcpuState, SnapshotError> {
    let entries: Vec<kvm_msr_entry> = SNAPSHOT_MSRS
        .iter()
        .map(|&(index, _)| kvm_msr_entry {
            index,
            ..Default::default()
        })
        .collect();
    let mut msrs = Msrs::from_entries(&entries).map_err(|_| SnapshotError::Msr {
        what: "KVM_GET_MSRS",
        index: 0,
        name: "(list)",
        done: 0,
        total: entries.len(),
    })?;
    let n = vcpu.get_msrs(&mut msrs).map_err(kvm("KVM_GET_MSRS"))?;
    msr_count("KVM_GET_MSRS", n)?;
    Ok(VcpuState {
        regs: vcpu.get_regs().map_err(kvm("KVM_GET_REGS"))?,
        sregs: vcpu.get_sregs().map_err(kvm("KVM_GET_SREGS"))?,
        fpu: vcpu.get_fpu().map_err(kvm("KVM_GET_FPU"))?,
        msrs: msrs.as_slice().to_vec(),
        lapic: if has_irqchip {
            Some(vcpu.get_lapic().map_err(kvm("KVM_GET_LAPIC"))?)
        } else {
            None
        },
        events: vcpu.get_vcpu_events().map_err(kvm("KVM_GET_VCPU_EVENTS"))?,
        mp_state: vcpu.get_mp_state().map_err(kvm("KVM_GET_MP_STATE"))?,
        debugregs: vcpu.get_debug_regs().map_err(kvm("KVM_GET_DEBUGREGS"))?,
    })
}

fn msr_count(what: &'static str, done: usize) -> Result<(), SnapshotError> {
    let total = SNAPSHOT_MSRS.len();
    match SNAPSHOT_MSRS.get(done) {
        None => Ok(()),
        Some(&(index, name)) => Err(SnapshotError::Msr {
            what,
            index,
            name,
            done,
            total,
        }),
    }
}

/// Sets the vCPU's state: special registers first (they carry the APIC
/// base the local APIC state is checked against), then the others.
pub(super) fn restore_vcpu(vcpu: &VcpuFd, s: &VcpuState) -> Result<(), SnapshotError> {
    vcpu.set_sregs(&s.sregs).map_err(kvm("KVM_SET_SREGS"))?;
    vcpu.set_regs(&s.regs).map_err(kvm("KVM_SET_REGS"))?;
    vcpu.set_fpu(&s.fpu).map_err(kvm("KVM_SET_FPU"))?;
    // Only the MSRs this VMM saves, whatever the snapshot lists.
    let mut entries = Vec::with_capacity(SNAPSHOT_MSRS.len());
    for (i, &(index, name)) in SNAPSHOT_MSRS.iter().enumerate() {
        match s.msrs.get(i) {
            Some(e) if e.index == index => entries.push(*e),
            _ => {
                return Err(SnapshotError::Msr {
                    what: "KVM_SET_MSRS",
                    index,
                    name,
                    done: i,
                    total: SNAPSHOT_MSRS.len(),
                })
            }
        }
    }
    let msrs = Msrs::from_entries(&entries).map_err(|_| SnapshotError::Msr {
        what: "KVM_SET_MSRS",
        index: 0,
        name: "(list)",
        done: 0,
        total: entries.len(),
    })?;
    let n = vcpu.set_msrs(&msrs).map_err(kvm("KVM_SET_MSRS"))?;
    msr_count("KVM_SET_MSRS", n)?;
    if let Some(l) = &s.lapic {
        vcpu.set_lapic(l).map_err(kvm("KVM_SET_LAPIC"))?;
    }
    vcpu.set_mp_state(s.mp_state)
        .map_err(kvm("KVM_SET_MP_STATE"))?;
    vcpu.set_vcpu_events(&s.events)
        .map_err(kvm("KVM_SET_VCPU_EVENTS"))?;
    vcpu.set_debug_regs(&s.debugregs)
        .map_err(kvm("KVM_SET_DEBUGREGS"))?;
    Ok(())
}

/// Reads the in-kernel irqchip's three chips.
pub(super) fn save_irqchip(vm: &VmFd) -> Result<Vec<kvm_irqchip>, SnapshotError> {
    IRQCHIPS
        .iter()
        .map(|&chip_id| {
            let mut c = kvm_irqchip {
                chip_id,
                ..Default::default()
            };
            vm.get_irqchip(&mut c).map_err(kvm("KVM_GET_IRQCHIP"))?;
            Ok(c)
        })
        .collect()
}

/// Sets the in-kernel irqchip's chips (each names its own `chip_id`,
/// which KVM checks).
pub(super) fn restore_irqchip(vm: &VmFd, chips: &[kvm_irqchip]) -> Result<(), SnapshotError> {
    for c in chips {
        vm.set_irqchip(c).map_err(kvm("KVM_SET_IRQCHIP"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn msr_count_names_the_first_msr_not_done() {
        assert!(msr_count("KVM_GET_MSRS", SNAPSHOT_MSRS.len()).is_ok());
        let e = msr_count("KVM_SET_MSRS", 1).unwrap_err().to_string();
        assert!(e.contains("IA32_SYSENTER_CS (0x174): 1 of 11"), "{e}");
    }

    #[test]
    fn size_counts_nonzero_pages_only_in_the_sparse_figure() {
        let mut bytes = vec![0u8; 3 * 4096];
        bytes[4096 + 5] = 1;
        let s = VmSnapshot {
            paused_at: 1,
            memory: vec![RegionSnapshot { start: 0, bytes }],
            vcpu: VcpuState {
                regs: Default::default(),
                sregs: Default::default(),
                fpu: Default::default(),
                msrs: Vec::new(),
                lapic: None,
                events: Default::default(),
                mp_state: Default::default(),
                debugregs: Default::default(),
            },
            irqchip: None,
            transport: TransportState::default(),
            device_json: b"{}".to_vec(),
            dmas: Vec::new(),
            ports: PortsState::default(),
        }
        .size();
        assert_eq!((s.memory, s.memory_nonzero, s.device), (3 * 4096, 4096, 2));
        assert_eq!(s.total() - s.total_sparse(), 2 * 4096);
    }
}

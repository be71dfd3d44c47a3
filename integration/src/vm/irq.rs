//! The transport's interrupt line: KVM's in-kernel irqchip (8259 PICs,
//! IOAPIC, local APIC) and an irqfd on the virtio-mmio GSI, where KVM
//! offers them; otherwise no line, and the guest polls.
//!
//! The guest programs poll their used rings. They run at CPL3 and install
//! no interrupt handler: the IDT covers the 32 exception vectors only, and
//! each of them reports an exception and ends the run. An interrupt that
//! reached the CPU would therefore end the run (the uninitialised PIC
//! would even deliver GSI 5 as vector 5, #BR). So the line is masked at
//! both controllers the GSI is routed to — the master PIC's IMR and the
//! IOAPIC redirection entry — as a polling driver leaves it: the irqfd
//! raises the line inside KVM (the PIC latches the edge in its IRR, which
//! [`line_latched`] reads back) and no vector reaches the CPU, whatever
//! RFLAGS.IF the guest runs with. Nothing here relies on IF=0.
//!
//! With the in-kernel irqchip, `hlt` blocks inside KVM instead of exiting;
//! the guests end with an OUT to the done port, and a guest that never
//! does is ended by the watchdog.
//!
//! [`setup`] must run before the vCPU is created (KVM_CREATE_IRQCHIP).

use std::fmt;

use kvm_bindings::{
    kvm_irqchip, KVM_IOAPIC_NUM_PINS, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::{Cap, Kvm, VmFd};
use log::warn;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// The GSI of the virtio-mmio window (Firecracker's first virtio-mmio
/// line; a legacy-free ISA line, wired to the master PIC and the IOAPIC).
pub const VIRTIO_MMIO_GSI: u32 = 5;

// [`line_latched`] reads the master PIC, and the IOAPIC has 24 pins.
const _: () = assert!(VIRTIO_MMIO_GSI < 8 && VIRTIO_MMIO_GSI < KVM_IOAPIC_NUM_PINS);

/// The IOAPIC redirection entry's mask bit.
const IOAPIC_RTE_MASKED: u64 = 1 << 16;

/// How the transport's interrupts reach the guest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum InterruptPath {
    /// An irqfd on `gsi` of KVM's in-kernel irqchip.
    Irqfd {
        /// The GSI.
        gsi: u32,
    },
    /// No line: the device records causes in InterruptStatus and the
    /// guest polls.
    Polled {
        /// Why there is no line.
        reason: String,
    },
}

impl fmt::Display for InterruptPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            InterruptPath::Irqfd { gsi } => write!(f, "irqfd(gsi {gsi}, in-kernel irqchip)"),
            InterruptPath::Polled { .. } => f.write_str("polled"),
        }
    }
}

impl InterruptPath {
    /// Why the fallback ran (`None` on the irqfd path).
    pub fn fallback_reason(&self) -> Option<&str> {
        match self {
            InterruptPath::Irqfd { .. } => None,
            InterruptPath::Polled { reason } => Some(reason),
        }
    }
}

/// The line set up for the transport.
#[derive(Debug)]
pub struct Line {
    /// The path that runs.
    pub path: InterruptPath,
    /// The irqfd (registered on [`VIRTIO_MMIO_GSI`]) on the irqfd path.
    pub irqfd: Option<EventFd>,
}

impl Line {
    fn polled(reason: impl Into<String>) -> Self {
        Line {
            path: InterruptPath::Polled {
                reason: reason.into(),
            },
            irqfd: None,
        }
    }
}

/// Sets up the in-kernel irqchip and an irqfd on [`VIRTIO_MMIO_GSI`] if
/// `want` and KVM offers both, masking the line as the module explains;
/// otherwise (or if any step fails) the polled path, with the reason.
/// Call before creating the vCPU.
pub fn setup(kvm: &Kvm, vm: &VmFd, want: bool) -> Line {
    if !want {
        return Line::polled("irqfd turned off by the VMM options");
    }
    if !kvm.check_extension(Cap::Irqchip) {
        return Line::polled("KVM offers no in-kernel irqchip (KVM_CAP_IRQCHIP)");
    }
    if !kvm.check_extension(Cap::Irqfd) {
        return Line::polled("KVM offers no irqfd (KVM_CAP_IRQFD)");
    }
    if let Err(e) = vm.create_irq_chip() {
        return Line::polled(format!("KVM_CREATE_IRQCHIP failed: {e}"));
    }
    // From here on the irqchip exists (KVM cannot remove it): a failure
    // leaves it there, masked or not, with no line registered on it.
    if let Err(e) = mask_line(vm, VIRTIO_MMIO_GSI) {
        warn!("irq: cannot mask GSI {VIRTIO_MMIO_GSI}, no irqfd: {e}");
        return Line::polled(format!(
            "cannot mask GSI {VIRTIO_MMIO_GSI} in the in-kernel irqchip: {e}"
        ));
    }
    let evt = match EventFd::new(EFD_NONBLOCK) {
        Ok(e) => e,
        Err(e) => return Line::polled(format!("cannot create the irqfd: {e}")),
    };
    if let Err(e) = vm.register_irqfd(&evt, VIRTIO_MMIO_GSI) {
        return Line::polled(format!("KVM_IRQFD on GSI {VIRTIO_MMIO_GSI} failed: {e}"));
    }
    Line {
        path: InterruptPath::Irqfd {
            gsi: VIRTIO_MMIO_GSI,
        },
        irqfd: Some(evt),
    }
}

fn get_chip(vm: &VmFd, chip_id: u32) -> Result<kvm_irqchip, kvm_ioctls::Error> {
    let mut chip = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    vm.get_irqchip(&mut chip)?;
    Ok(chip)
}

/// Masks `gsi` (below 8: a master PIC line) at the PICs and the IOAPIC.
/// Both PICs get every line masked: nothing else is wired to them.
fn mask_line(vm: &VmFd, gsi: u32) -> Result<(), kvm_ioctls::Error> {
    for id in [KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE] {
        let mut chip = get_chip(vm, id)?;
        // KVM_GET_IRQCHIP filled the union's `pic` member for this
        // chip_id; writing one of its u8 fields needs no unsafe.
        chip.chip.pic.imr = 0xff;
        vm.set_irqchip(&chip)?;
    }
    if gsi < KVM_IOAPIC_NUM_PINS {
        let mut chip = get_chip(vm, KVM_IRQCHIP_IOAPIC)?;
        // SAFETY: KVM_GET_IRQCHIP filled the `ioapic` member for
        // `chip_id` IOAPIC; a redirection entry is a union of a u64 and a
        // bitfield struct over the same 8 bytes, so every bit pattern is
        // valid for `bits`; `gsi` < 24 indexes the 24-entry table.
        unsafe { chip.chip.ioapic.redirtbl[gsi as usize].bits |= IOAPIC_RTE_MASKED };
        vm.set_irqchip(&chip)?;
    }
    Ok(())
}

/// Whether the master PIC has latched an edge on `gsi` (below 8) in its
/// IRR: with the line masked, an edge the irqfd raised stays there. `None`
/// if the irqchip cannot be read (or `gsi` is not a master PIC line).
pub fn line_latched(vm: &VmFd, gsi: u32) -> Option<bool> {
    if gsi >= 8 {
        return None;
    }
    let chip = get_chip(vm, KVM_IRQCHIP_PIC_MASTER).ok()?;
    // SAFETY: `chip.chip` is a C union of plain-integer structs that
    // KVM_GET_IRQCHIP filled for chip_id PIC_MASTER, i.e. its `pic`
    // member; every bit pattern is a valid kvm_pic_state (all its fields
    // are u8), so reading that member is sound.
    let irr = unsafe { chip.chip.pic.irr };
    Some(irr & (1 << gsi) != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_print_as_the_report_names_them() {
        assert_eq!(
            InterruptPath::Irqfd { gsi: 5 }.to_string(),
            "irqfd(gsi 5, in-kernel irqchip)"
        );
        let p = InterruptPath::Polled {
            reason: "why".into(),
        };
        assert_eq!(p.to_string(), "polled");
        assert_eq!(p.fallback_reason(), Some("why"));
    }
}

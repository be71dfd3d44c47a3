//! The vCPU's start state for the Linux 64-bit boot protocol
//! (Documentation/arch/x86/boot.rst, "64-bit Boot Protocol"): long mode
//! with paging on, an identity map covering the kernel, the zero page and
//! the command line, `__BOOT_CS` / `__BOOT_DS` flat segments, interrupts
//! off, `rsi` at the zero page. Also what Linux expects of the platform
//! around the vCPU: CPUID from what KVM supports (with the hypervisor bit
//! and this vCPU's APIC ID), the MSRs a firmware would leave set (fast
//! strings, write-back MTRR default), an x87/SSE state after FNINIT, and
//! the local APIC's LINT0 as ExtINT and LINT1 as NMI, as a PC's BIOS wires
//! them.

use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, kvm_sregs, CpuId, Msrs};
use kvm_ioctls::{Kvm, VcpuFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryError, GuestMemoryMmap};

use super::layout;
use crate::vm::x86::{gdt_entry, segment};

/// An error setting up the vCPU.
#[derive(Debug, thiserror::Error)]
pub enum CpuError {
    /// A KVM ioctl failed.
    #[error("{what}: {source}")]
    Kvm {
        /// Which ioctl.
        what: &'static str,
        /// The error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The boot structures cannot be written to guest memory.
    #[error("cannot write the boot page tables or GDT: {0}")]
    Memory(#[from] GuestMemoryError),
    /// KVM's MSR list cannot be built.
    #[error("cannot build the MSR list: {0}")]
    MsrList(String),
    /// KVM set fewer MSRs than asked.
    #[error("KVM set {set} of {asked} boot MSRs")]
    MsrsPartial {
        /// MSRs set.
        set: usize,
        /// MSRs asked for.
        asked: usize,
    },
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> CpuError {
    move |source| CpuError::Kvm { what, source }
}

/// `__BOOT_CS`: the boot protocol wants the flat code segment at 0x10.
const BOOT_CS: u16 = 0x10;
/// `__BOOT_DS`.
const BOOT_DS: u16 = 0x18;
/// The TSS KVM wants loaded (an empty one is fine: Linux loads its own).
const BOOT_TSS: u16 = 0x20;

/// The boot GDT: null, null, 64-bit code, data, TSS.
const GDT: [u64; 5] = [
    0,
    0,
    gdt_entry(0xa09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
    gdt_entry(0x008b, 0, 0xfffff),
];

const CR0_PE: u64 = 1 << 0;
const CR0_ET: u64 = 1 << 4;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

const PTE_PRESENT_RW: u64 = 0x3;
const PDE_2M: u64 = 0x80;
/// How much the boot identity map covers: 4 GiB in 2 MiB pages, so every
/// address below the MMIO gap is mapped whatever RAM size and wherever
/// the initramfs lands.
const IDENTITY_GIB: u64 = 4;

const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MISC_ENABLE_FAST_STRING: u64 = 1;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
/// MTRRs enabled, default type write-back: without it Linux maps RAM
/// uncached and runs many times slower.
const MTRR_DEF_WB_ENABLED: u64 = (1 << 11) | 6;

/// CPUID.1:ECX bit 31, "running under a hypervisor".
const CPUID_1_ECX_HYPERVISOR: u32 = 1 << 31;

/// LAPIC register offsets in `kvm_lapic_state`.
const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_EXTINT: u32 = 0x7;
const APIC_MODE_NMI: u32 = 0x4;

/// Writes the boot GDT and the identity page tables.
pub fn write_boot_structures(mem: &GuestMemoryMmap) -> Result<(), CpuError> {
    for (i, e) in GDT.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(layout::BOOT_GDT + 8 * i as u64))?;
    }
    mem.write_obj(0u64, GuestAddress(layout::BOOT_IDT))?;
    // PML4[0] -> PDPT; PDPT[i] -> PD i; each PD maps 1 GiB in 2 MiB pages.
    let pdpt = layout::PML4 + 0x1000;
    let pd0 = pdpt + 0x1000;
    mem.write_obj(pdpt | PTE_PRESENT_RW, GuestAddress(layout::PML4))?;
    for g in 0..IDENTITY_GIB {
        let pd = pd0 + g * 0x1000;
        mem.write_obj(pd | PTE_PRESENT_RW, GuestAddress(pdpt + 8 * g))?;
        for i in 0..512u64 {
            let addr = (g << 30) | (i << 21);
            mem.write_obj(addr | PTE_PRESENT_RW | PDE_2M, GuestAddress(pd + 8 * i))?;
        }
    }
    Ok(())
}

/// The end (exclusive) of the low-memory boot structures, which must stay
/// below the EBDA and clear of the command line.
pub const fn boot_structures_end() -> u64 {
    layout::PML4 + 0x2000 + IDENTITY_GIB * 0x1000
}

/// CPUID for vCPU `id`: what KVM supports, marked as a guest of a
/// hypervisor, with the vCPU's APIC ID.
pub fn cpuid(kvm: &Kvm, id: u8) -> Result<CpuId, CpuError> {
    let mut cpuid = kvm
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
    for e in cpuid.as_mut_slice() {
        match e.function {
            1 => {
                e.ecx |= CPUID_1_ECX_HYPERVISOR;
                // EBX[31:24] initial APIC ID, [23:16] logical processors.
                e.ebx = (e.ebx & 0x0000_ffff) | (u32::from(id) << 24) | (1 << 16);
            }
            0xb | 0x1f => {
                // x2APIC ID of this vCPU.
                e.edx = u32::from(id);
            }
            _ => {}
        }
    }
    Ok(cpuid)
}

/// Sets up vCPU `vcpu` to enter the kernel at `entry` (the 64-bit entry
/// of the loaded image) with `rsi` at the zero page.
pub fn setup_vcpu(kvm: &Kvm, vcpu: &VcpuFd, id: u8, entry: u64) -> Result<(), CpuError> {
    vcpu.set_cpuid2(&cpuid(kvm, id)?)
        .map_err(kvm_err("KVM_SET_CPUID2"))?;

    let entries = [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        (MSR_MTRR_DEF_TYPE, MTRR_DEF_WB_ENABLED),
    ]
    .map(|(index, data)| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    });
    let msrs = Msrs::from_entries(&entries).map_err(|e| CpuError::MsrList(format!("{e:?}")))?;
    let set = vcpu.set_msrs(&msrs).map_err(kvm_err("KVM_SET_MSRS"))?;
    if set != entries.len() {
        return Err(CpuError::MsrsPartial {
            set,
            asked: entries.len(),
        });
    }

    let mut sregs: kvm_sregs = vcpu.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
    let code = segment(GDT[usize::from(BOOT_CS >> 3)], BOOT_CS);
    let data = segment(GDT[usize::from(BOOT_DS >> 3)], BOOT_DS);
    let tss = segment(GDT[usize::from(BOOT_TSS >> 3)], BOOT_TSS);
    sregs.gdt.base = layout::BOOT_GDT;
    sregs.gdt.limit = (std::mem::size_of_val(&GDT) - 1) as u16;
    sregs.idt.base = layout::BOOT_IDT;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    sregs.cr3 = layout::PML4;
    sregs.cr4 |= CR4_PAE;
    sregs.cr0 |= CR0_PE | CR0_ET | CR0_PG;
    sregs.efer |= EFER_LME | EFER_LMA;
    vcpu.set_sregs(&sregs).map_err(kvm_err("KVM_SET_SREGS"))?;

    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(kvm_err("KVM_SET_FPU"))?;

    let regs = kvm_regs {
        rflags: 0x2,
        rip: entry,
        rsp: layout::BOOT_STACK,
        rbp: layout::BOOT_STACK,
        rsi: layout::ZERO_PAGE,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(kvm_err("KVM_SET_REGS"))?;

    let mut lapic = vcpu.get_lapic().map_err(kvm_err("KVM_GET_LAPIC"))?;
    set_lvt_mode(&mut lapic.regs, APIC_LVT0, APIC_MODE_EXTINT);
    set_lvt_mode(&mut lapic.regs, APIC_LVT1, APIC_MODE_NMI);
    vcpu.set_lapic(&lapic).map_err(kvm_err("KVM_SET_LAPIC"))?;
    Ok(())
}

/// Sets the delivery mode (bits 10:8) of the LVT register at `off`.
fn set_lvt_mode(regs: &mut [std::os::raw::c_char; 1024], off: usize, mode: u32) {
    let mut b = [0u8; 4];
    for (i, x) in b.iter_mut().enumerate() {
        *x = regs[off + i] as u8;
    }
    let v = (u32::from_le_bytes(b) & !0x700) | (mode << 8);
    for (i, x) in v.to_le_bytes().iter().enumerate() {
        regs[off + i] = *x as std::os::raw::c_char;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_code_segment_is_64_bit_and_data_is_flat() {
        let cs = segment(GDT[2], BOOT_CS);
        assert_eq!((cs.l, cs.db, cs.present, cs.s, cs.type_), (1, 0, 1, 1, 0xb));
        let ds = segment(GDT[3], BOOT_DS);
        assert_eq!((ds.db, ds.g, ds.limit), (1, 1, 0xffff_ffff));
    }

    #[test]
    fn identity_map_covers_the_low_4_gib_in_2_mib_pages() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        write_boot_structures(&mem).unwrap();
        let pml4: u64 = mem.read_obj(GuestAddress(layout::PML4)).unwrap();
        let pdpt = pml4 & !0xfff;
        for g in 0..IDENTITY_GIB {
            let pd: u64 = mem.read_obj(GuestAddress(pdpt + 8 * g)).unwrap();
            let last: u64 = mem.read_obj(GuestAddress((pd & !0xfff) + 8 * 511)).unwrap();
            assert_eq!(last & !0xfff, (g << 30) | (511 << 21));
            assert_eq!(last & 0xff, PTE_PRESENT_RW | PDE_2M);
        }
        assert!(boot_structures_end() <= layout::CMDLINE);
    }

    #[test]
    fn lvt_mode_sets_only_the_delivery_mode() {
        let mut regs = [0 as std::os::raw::c_char; 1024];
        regs[APIC_LVT0] = 0x3f;
        regs[APIC_LVT0 + 2] = 1; // mask bit 16
        set_lvt_mode(&mut regs, APIC_LVT0, APIC_MODE_EXTINT);
        assert_eq!(regs[APIC_LVT0] as u8, 0x3f);
        assert_eq!(regs[APIC_LVT0 + 1] as u8, 0x7);
        assert_eq!(regs[APIC_LVT0 + 2] as u8, 1);
    }
}

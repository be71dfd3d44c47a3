//! The vCPU's start state: 64-bit long mode at CPL3, set up entirely by the
//! VMM, because guest kernel-mode code is emulated instruction by
//! instruction on this machine kind while user-mode code runs natively.
//!
//! Writes the GDT (kernel and user segments, a 64-bit TSS), identity page
//! tables with the U bit (2 MiB pages; 4 KiB pages for the first 2 MiB, so
//! that page 0 faults and the VMM's own tables are supervisor-only), an IDT
//! whose stubs report any exception on a port, and the registers: CR0 with
//! paging, CR4 with PAE and SSE, EFER with LME/LMA, RFLAGS with IOPL=3 and,
//! because KVM on this machine kind runs CPL3 code with IOPL 0 whatever
//! RFLAGS says, a TSS I/O permission bitmap that opens the VMM's ports.

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryError, GuestMemoryMmap};

use crate::abi;

/// Selector of the kernel code segment (exception stubs).
const KERNEL_CS: u16 = 0x08;
/// Selector of the user data segment, RPL 3.
const USER_DS: u16 = 0x18 | 3;
/// Selector of the user 64-bit code segment, RPL 3.
const USER_CS: u16 = 0x20 | 3;
/// Selector of the TSS (a 16-byte descriptor).
const TSS_SELECTOR: u16 = 0x28;
/// Size of a 64-bit TSS without an I/O bitmap.
const TSS_SIZE: u32 = 0x68;
/// Ports the I/O permission bitmap covers (every port the VMM serves is
/// below this); one bit each.
const IO_BITMAP_PORTS: u32 = 0x400;
/// The TSS with its I/O bitmap and the all-ones byte that must follow it,
/// minus one.
const TSS_LIMIT: u32 = TSS_SIZE + IO_BITMAP_PORTS / 8;

/// Exceptions the IDT covers (the architectural ones).
const EXCEPTION_VECTORS: u64 = 32;
/// Bytes per exception stub.
const STUB_SIZE: u64 = 8;
/// Exceptions that push an error code.
const VECTORS_WITH_ERROR_CODE: [u8; 8] = [8, 10, 11, 12, 13, 14, 17, 21];

const CR0_PE: u64 = 1 << 0;
const CR0_MP: u64 = 1 << 1;
const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_WP: u64 = 1 << 16;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const CR4_OSFXSR: u64 = 1 << 9;
const CR4_OSXMMEXCPT: u64 = 1 << 10;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
/// RFLAGS bit 1 is always set.
const RFLAGS_FIXED: u64 = 1 << 1;
/// IOPL=3: port I/O allowed at CPL3.
const RFLAGS_IOPL3: u64 = 3 << 12;

const PTE_P: u64 = 1 << 0;
const PTE_RW: u64 = 1 << 1;
const PTE_US: u64 = 1 << 2;
const PTE_PS: u64 = 1 << 7;

const PML4: u64 = abi::PAGE_TABLES_ADDR;
const PDPT: u64 = abi::PAGE_TABLES_ADDR + 0x1000;
const PT0: u64 = abi::PAGE_TABLES_ADDR + 0x2000;
const PD0: u64 = abi::PAGE_TABLES_ADDR + 0x3000;
/// Page directories fit between `PD0` and the guest program, and in one
/// PDPT.
const MAX_PDS: u64 = {
    let room = (abi::GUEST_LOAD_ADDR - PD0) / 0x1000;
    if room < 512 {
        room
    } else {
        512
    }
};

// The identity map reaches the end of high RAM of the largest config
// (high RAM starts at 4 GiB).
const _: () = assert!(MAX_PDS >= (crate::config::MAX_MEMORY_MIB >> 10) + 4);

/// An error setting up the vCPU.
#[derive(Debug, thiserror::Error)]
pub enum CpuSetupError {
    /// Writing the tables into guest memory failed.
    #[error("cannot write the boot tables into guest memory: {0}")]
    Memory(#[from] GuestMemoryError),
    /// The address space is larger than the identity map can cover.
    #[error("guest address space of {0:#x} bytes is beyond the identity map")]
    AddressSpace(u64),
    /// A KVM ioctl failed.
    #[error("{what}: {source}")]
    Kvm {
        /// Which ioctl.
        what: &'static str,
        /// The error.
        #[source]
        source: kvm_ioctls::Error,
    },
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> CpuSetupError {
    move |source| CpuSetupError::Kvm { what, source }
}

/// A segment descriptor: `flags` holds the access byte (bits 0–7) and the
/// flags nibble (bits 12–15), as in the Intel SDM's figure 3-8.
pub(crate) const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    let base = base as u64;
    let limit = limit as u64;
    let flags = flags as u64;
    ((base & 0xff00_0000) << 32)
        | ((flags & 0xf0ff) << 40)
        | ((limit & 0x000f_0000) << 32)
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0xffff)
}

/// The KVM view of descriptor `entry` loaded with `selector`.
pub(crate) fn segment(entry: u64, selector: u16) -> kvm_segment {
    let base = ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000);
    let limit = ((entry & 0xffff) | ((entry >> 32) & 0x000f_0000)) as u32;
    let g = ((entry >> 55) & 1) as u8;
    let present = ((entry >> 47) & 1) as u8;
    kvm_segment {
        base,
        limit: if g == 1 { (limit << 12) | 0xfff } else { limit },
        selector,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        unusable: u8::from(present == 0),
        padding: 0,
    }
}

const GDT: [u64; 7] = [
    0,
    gdt_entry(0xa09b, 0, 0xfffff), // kernel code, 64-bit
    gdt_entry(0xc093, 0, 0xfffff), // kernel data
    gdt_entry(0xc0f3, 0, 0xfffff), // user data, DPL 3
    gdt_entry(0xa0fb, 0, 0xfffff), // user code, 64-bit, DPL 3
    // 64-bit available TSS (type 9); its upper half (base 63:32) is zero.
    gdt_entry(0x0089, abi::TSS_ADDR as u32, TSS_LIMIT),
    0,
];

/// The page-table entry of the 4 KiB page at `addr` in the first 2 MiB.
fn low_page_entry(addr: u64) -> u64 {
    let supervisor = PTE_P | PTE_RW;
    match addr {
        // Page 0 stays unmapped: a null pointer in the guest faults.
        0 => 0,
        // The boot info: the guest reads it, never writes it.
        abi::BOOT_INFO_ADDR => addr | PTE_P | PTE_US,
        // GDT, TSS, IDT, stubs, the exception stack and the page tables:
        // the CPU reaches them as supervisor, the guest program cannot.
        a if a < abi::KERNEL_STACK_TOP => addr | supervisor,
        a if (abi::PAGE_TABLES_ADDR..abi::GUEST_LOAD_ADDR).contains(&a) => addr | supervisor,
        _ => addr | supervisor | PTE_US,
    }
}

/// Writes the identity page tables covering `[0, top)` (rounded up to
/// 1 GiB), user-accessible except the VMM's own pages.
fn write_page_tables(mem: &GuestMemoryMmap, top: u64) -> Result<(), CpuSetupError> {
    let gib = top.div_ceil(1 << 30);
    if gib == 0 || gib > MAX_PDS {
        return Err(CpuSetupError::AddressSpace(top));
    }
    let user_table = PTE_P | PTE_RW | PTE_US;
    mem.write_obj(PDPT | user_table, GuestAddress(PML4))?;
    let mut pt0 = [0u8; 4096];
    for (i, e) in pt0.chunks_exact_mut(8).enumerate() {
        e.copy_from_slice(&low_page_entry(i as u64 * 0x1000).to_le_bytes());
    }
    mem.write_slice(&pt0, GuestAddress(PT0))?;
    let mut pd = [0u8; 4096];
    for g in 0..gib {
        let table = PD0 + g * 0x1000;
        mem.write_obj(table | user_table, GuestAddress(PDPT + g * 8))?;
        for (j, e) in pd.chunks_exact_mut(8).enumerate() {
            let addr = ((g << 30) | ((j as u64) << 21)) | user_table | PTE_PS;
            e.copy_from_slice(&addr.to_le_bytes());
        }
        if g == 0 {
            pd[..8].copy_from_slice(&(PT0 | user_table).to_le_bytes());
        }
        mem.write_slice(&pd, GuestAddress(table))?;
    }
    Ok(())
}

/// Writes the GDT, the TSS, the IDT and the exception stubs.
fn write_descriptor_tables(mem: &GuestMemoryMmap) -> Result<(), CpuSetupError> {
    for (i, e) in GDT.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(abi::GDT_ADDR + i as u64 * 8))?;
    }
    // TSS: RSP0 at offset 4 is the stack exceptions from CPL3 switch to.
    // KVM on this machine kind runs CPL3 code with IOPL 0 whatever RFLAGS
    // the VMM sets, so port I/O at CPL3 is allowed by the I/O permission
    // bitmap instead: all zeros (allowed) for ports below IO_BITMAP_PORTS,
    // then the terminating all-ones byte; ports above are past the limit,
    // so refused.
    let mut tss = [0u8; TSS_LIMIT as usize + 1];
    tss[4..12].copy_from_slice(&abi::KERNEL_STACK_TOP.to_le_bytes());
    tss[102..104].copy_from_slice(&(TSS_SIZE as u16).to_le_bytes());
    tss[TSS_LIMIT as usize] = 0xff;
    mem.write_slice(&tss, GuestAddress(abi::TSS_ADDR))?;
    for v in 0..EXCEPTION_VECTORS {
        // mov al, v; out EXCEPTION_PORT, al; 1: hlt; jmp 1b
        let port = abi::EXCEPTION_PORT as u8;
        let stub = [0xb0, v as u8, 0xe6, port, 0xf4, 0xeb, 0xfd, 0x90];
        let at = abi::EXCEPTION_STUBS_ADDR + v * STUB_SIZE;
        mem.write_slice(&stub, GuestAddress(at))?;
        // A 64-bit interrupt gate, DPL 0, to the stub.
        let lo = (at & 0xffff)
            | (u64::from(KERNEL_CS) << 16)
            | (0x8e << 40)
            | ((at & 0xffff_0000) << 32);
        let hi = at >> 32;
        mem.write_obj(lo, GuestAddress(abi::IDT_ADDR + v * 16))?;
        mem.write_obj(hi, GuestAddress(abi::IDT_ADDR + v * 16 + 8))?;
    }
    Ok(())
}

/// Whether exception `vector` pushed an error code on the stack.
pub fn has_error_code(vector: u8) -> bool {
    VECTORS_WITH_ERROR_CODE.contains(&vector)
}

/// Writes the boot tables and sets the vCPU to start at `entry` at CPL3,
/// with `rdi` = `arg` and identity paging over `[0, top)`.
pub fn setup_vcpu(
    vcpu: &VcpuFd,
    mem: &GuestMemoryMmap,
    top: u64,
    entry: u64,
    arg: u64,
) -> Result<(), CpuSetupError> {
    write_descriptor_tables(mem)?;
    write_page_tables(mem, top)?;

    let mut sregs: kvm_sregs = vcpu.get_sregs().map_err(kvm("KVM_GET_SREGS"))?;
    sregs.gdt.base = abi::GDT_ADDR;
    sregs.gdt.limit = (std::mem::size_of_val(&GDT) - 1) as u16;
    sregs.idt.base = abi::IDT_ADDR;
    sregs.idt.limit = (EXCEPTION_VECTORS * 16 - 1) as u16;
    sregs.cs = segment(GDT[usize::from(USER_CS >> 3)], USER_CS);
    let data = segment(GDT[usize::from(USER_DS >> 3)], USER_DS);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    let mut tr = segment(GDT[usize::from(TSS_SELECTOR >> 3)], TSS_SELECTOR);
    // The loaded TSS is "busy" (type 11).
    tr.type_ = 0xb;
    sregs.tr = tr;
    sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG;
    sregs.cr3 = PML4;
    sregs.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT;
    sregs.efer = EFER_LME | EFER_LMA;
    vcpu.set_sregs(&sregs).map_err(kvm("KVM_SET_SREGS"))?;

    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(kvm("KVM_SET_FPU"))?;

    let regs = kvm_regs {
        rip: entry,
        rsp: abi::USER_STACK_TOP,
        rdi: arg,
        rflags: RFLAGS_FIXED | RFLAGS_IOPL3,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(kvm("KVM_SET_REGS"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_code_segment_is_64_bit_dpl3() {
        let s = segment(GDT[4], USER_CS);
        assert_eq!((s.l, s.dpl, s.present, s.s, s.type_), (1, 3, 1, 1, 0xb));
        assert_eq!(s.limit, 0xffff_ffff);
    }

    #[test]
    fn tss_descriptor_points_at_the_tss() {
        let s = segment(GDT[5], TSS_SELECTOR);
        assert_eq!(
            (s.base, s.limit, s.type_, s.s),
            (abi::TSS_ADDR, TSS_LIMIT, 9, 0)
        );
    }

    #[test]
    fn first_pages_are_guarded() {
        assert_eq!(low_page_entry(0), 0);
        assert_eq!(low_page_entry(abi::GDT_ADDR) & PTE_US, 0);
        assert_eq!(low_page_entry(PML4) & PTE_US, 0);
        assert_eq!(
            low_page_entry(abi::BOOT_INFO_ADDR) & (PTE_US | PTE_RW),
            PTE_US
        );
        assert_eq!(low_page_entry(0x1f_f000) & PTE_US, 0);
    }
}

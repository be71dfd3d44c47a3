//! The guest test program. The VMM starts it at `_start` in 64-bit mode at
//! CPL3 (port I/O allowed by the TSS bitmap), with identity paging and the boot info at
//! `abi::BOOT_INFO_ADDR`; it runs the scenario the boot info names and
//! ends by writing its result to the done port.
//!
//! Built by `integration/build.rs` for the host target, `no_std` and
//! `no_main`, linked with `guest.ld` at `abi::GUEST_LOAD_ADDR`.

#![no_std]
#![no_main]

// The driver modules are a library for the scenarios: not every scenario
// uses every register, status and helper they define.
#[macro_use]
#[allow(dead_code)]
mod rt;
mod abi;
#[allow(dead_code)]
mod dma;
#[allow(dead_code)]
mod iommu;
#[allow(dead_code)]
mod pgtable;
mod scenarios;
#[allow(dead_code)]
mod virtio;

use abi::BootInfo;

// The entry: the VMM's stack pointer is 16-byte aligned, and the call
// leaves it as the ABI expects at a function's first instruction.
core::arch::global_asm!(
    ".section .text.start, \"ax\"",
    ".global _start",
    "_start:",
    "  and rsp, -16",
    "  call {main}",
    "1: ud2",
    "  jmp 1b",
    main = sym guest_main,
);

extern "C" fn guest_main() -> ! {
    // SAFETY: the VMM wrote a BootInfo at this address before starting us;
    // its page is mapped user-readable. Read once, by value.
    let info: BootInfo =
        unsafe { core::ptr::read_volatile(abi::BOOT_INFO_ADDR as *const BootInfo) };
    check_eq!(info.magic, abi::BOOT_INFO_MAGIC, "boot info magic");
    let mut ctx = scenarios::Ctx::new(info);
    println!("guest: scenario {} starting", info.scenario);
    match info.scenario {
        abi::SCENARIO_MAP => scenarios::map::run(&mut ctx),
        abi::SCENARIO_BYPASS => scenarios::bypass::run(&mut ctx),
        abi::SCENARIO_NESTED_VTD => scenarios::nested_vtd::run(&mut ctx),
        abi::SCENARIO_NESTED_SMMUV3 => scenarios::nested_smmuv3::run(&mut ctx),
        abi::SCENARIO_PAGE_REQUEST => scenarios::page_request::run(&mut ctx),
        abi::SCENARIO_HOSTILE => scenarios::hostile::run(&mut ctx),
        abi::SCENARIO_SNAPSHOT => scenarios::snapshot::run(&mut ctx),
        abi::SCENARIO_HOTPLUG => scenarios::hotplug::run(&mut ctx),
        abi::SELFTEST_SPIN
        | abi::SELFTEST_PAGE_FAULT
        | abi::SELFTEST_PRIVILEGED
        | abi::SELFTEST_PANIC
        | abi::SELFTEST_WRITE_PAGE_TABLES => selftest(info.scenario),
        s => {
            println!("FAIL: unknown scenario {s}");
            rt::exit(line!());
        }
    }
    rt::exit(abi::RESULT_PASS)
}

/// Misbehaviours the VMM must survive and report.
fn selftest(which: u64) {
    println!("selftest: {which:#x}");
    match which {
        abi::SELFTEST_SPIN => loop {
            core::hint::spin_loop();
        },
        abi::SELFTEST_PAGE_FAULT => {
            let v: u64;
            // SAFETY: the load faults (page 0 is not mapped) and the VMM
            // ends the guest on the exception, so no value is produced; in
            // asm, the compiler assumes nothing about address 0.
            unsafe {
                core::arch::asm!("mov {v}, qword ptr [{a}]", a = in(reg) 0u64, v = out(reg) v, options(nostack))
            };
            println!("read {v:#x} from address 0");
        }
        // SAFETY: HLT at CPL3 raises #GP, which the VMM reports; it
        // touches no memory or register of the program.
        abi::SELFTEST_PRIVILEGED => unsafe { core::arch::asm!("hlt", options(nomem, nostack)) },
        abi::SELFTEST_WRITE_PAGE_TABLES => rt::poke64(abi::PAGE_TABLES_ADDR, 0),
        _ => panic!("selftest panic"),
    }
}

//! Where things are in a Linux guest of the test VMM: RAM from 0 below the
//! MMIO gap, the boot structures of the x86 boot protocol in low memory,
//! the ACPI tables in the BIOS area, one virtio-mmio window per device in
//! the gap, and the interrupt line of each.
//!
//! The virtio-iommu is always window 0; the devices of the config follow
//! in config order.

/// Lowest RAM size the Linux guest gets, in MiB.
pub const MIN_RAM_MIB: u64 = 128;
/// Start of the MMIO gap: RAM ends at or below it.
pub const MMIO_GAP_START: u64 = 0xd000_0000;
/// End (exclusive) of the MMIO gap: the IOAPIC, HPET and LAPIC live at its top.
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// Largest RAM size, in MiB: everything below the gap.
pub const MAX_RAM_MIB: u64 = MMIO_GAP_START >> 20;

/// First virtio-mmio window (the virtio-iommu's).
pub const VIRTIO_MMIO_BASE: u64 = MMIO_GAP_START;
/// Size of one virtio-mmio window.
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// Most virtio-mmio windows (and so devices, the vIOMMU included): one
/// IOAPIC pin each from [`VIRTIO_FIRST_GSI`], up to pin 23.
pub const MAX_VIRTIO_DEVICES: usize = 16;
/// Interrupt line (IOAPIC pin = GSI) of window 0; window `i` has
/// `VIRTIO_FIRST_GSI + i`.
pub const VIRTIO_FIRST_GSI: u32 = 5;

/// The IOAPIC's MMIO base.
pub const IOAPIC_ADDR: u64 = 0xfec0_0000;
/// The local APIC's MMIO base.
pub const LAPIC_ADDR: u64 = 0xfee0_0000;

/// COM1's ports and interrupt line (ISA IRQ 4).
pub const SERIAL_PORT: u16 = 0x3f8;
/// COM1's interrupt line.
pub const SERIAL_GSI: u32 = 4;

/// ACPI sleep control register (FADT `SLEEP_CONTROL_REG`, one byte): the
/// guest writes `SLP_EN | SLP_TYP` here to power off.
pub const ACPI_SLEEP_CONTROL_PORT: u16 = 0x600;
/// ACPI sleep status register (FADT `SLEEP_STATUS_REG`, one byte).
pub const ACPI_SLEEP_STATUS_PORT: u16 = 0x601;
/// `SLP_TYP` of S5 (soft off) in the DSDT's `_S5_` package.
pub const ACPI_S5_SLP_TYP: u8 = 5;
/// Test hook port (4 bytes): writing an endpoint ID makes the VMM issue one
/// DMA read of that endpoint at [`TEST_HOOK_IOVA`], which nothing maps, so
/// the guest receives the vIOMMU's fault record for it.
pub const TEST_HOOK_PORT: u16 = 0x610;
/// The IOVA of the test hook's stray DMA.
pub const TEST_HOOK_IOVA: u64 = 0xdead_b000;

/// The GDT the vCPU starts with.
pub const BOOT_GDT: u64 = 0x500;
/// The IDT the vCPU starts with (empty; Linux sets its own).
pub const BOOT_IDT: u64 = 0x520;
/// The boot protocol's zero page (`boot_params`).
pub const ZERO_PAGE: u64 = 0x7000;
/// The initial stack pointer.
pub const BOOT_STACK: u64 = 0x8ff0;
/// The identity page tables: PML4, PDPT, then the page directories.
pub const PML4: u64 = 0x9000;
/// Start of the extended BIOS data area; low RAM in the e820 map ends here.
pub const EBDA_START: u64 = 0x9fc00;
/// The kernel command line.
pub const CMDLINE: u64 = 0x20000;
/// Largest command line, NUL included.
pub const CMDLINE_MAX: usize = 0x1000;
/// Where the ACPI tables go, RSDP first (inside the BIOS area Linux scans).
pub const ACPI_BASE: u64 = 0xe_0000;
/// End (exclusive) of the area for ACPI tables.
pub const ACPI_END: u64 = 0x10_0000;
/// Where the protected-mode kernel is loaded.
pub const KERNEL_START: u64 = 0x10_0000;

/// Base address of virtio-mmio window `i`.
pub const fn virtio_mmio_base(i: usize) -> u64 {
    VIRTIO_MMIO_BASE + i as u64 * VIRTIO_MMIO_SIZE
}

/// Interrupt line of virtio-mmio window `i`.
pub const fn virtio_gsi(i: usize) -> u32 {
    VIRTIO_FIRST_GSI + i as u32
}

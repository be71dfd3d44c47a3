//! The contract between the test VMM and the guest programs: guest-physical
//! layout, I/O ports, the boot-info block, the DMA engine's registers and the
//! scenario numbers.
//!
//! Compiled twice: into the guest (no_std) and into the VMM (through
//! `#[path]`), so both sides read one definition. It holds constants and one
//! plain `repr(C)` struct only: no code that could differ between the two.

#![allow(dead_code)]

/// Serial output: every byte written here is appended to the VMM's log.
pub const SERIAL_PORT: u16 = 0x3f8;
/// Done port: a 32-bit write ends the guest with that result code.
pub const DONE_PORT: u16 = 0xf4;
/// Exception port: the VMM's exception stubs write the vector number here.
pub const EXCEPTION_PORT: u16 = 0xf5;
/// Sync port: a 32-bit write marks sync point N of the scenario, where the
/// VMM may act (pause and snapshot the VM, plug or unplug a DMA engine);
/// the guest goes on after the write either way. A 32-bit read returns
/// how many times this VM was restored from a snapshot.
pub const SYNC_PORT: u16 = 0xf6;
/// Hot-plug port, as a platform's slot status register: a 32-bit read
/// returns the DMA engine slots present (bit `i` for engine `i`); a 32-bit
/// write of a slot bitmap ejects those slots whose removal the platform
/// announced (the guest is done with them), after which their windows
/// read as all ones.
pub const HOTPLUG_PORT: u16 = 0xf7;

/// Result code of a guest whose every check held.
pub const RESULT_PASS: u32 = 0;
/// Result code of a guest that panicked (failed checks report their line).
pub const RESULT_PANIC: u32 = 0xdead;

/// The VMM's global descriptor table (supervisor-only page).
pub const GDT_ADDR: u64 = 0x1000;
/// The 64-bit TSS (supervisor-only page).
pub const TSS_ADDR: u64 = 0x2000;
/// The interrupt descriptor table (supervisor-only page).
pub const IDT_ADDR: u64 = 0x3000;
/// The exception stubs the IDT points at (supervisor-only page).
pub const EXCEPTION_STUBS_ADDR: u64 = 0x4000;
/// The boot-info block (user-readable page).
pub const BOOT_INFO_ADDR: u64 = 0x5000;
/// Top of the stack exceptions are delivered on (pages 0x6000..0x8000).
pub const KERNEL_STACK_TOP: u64 = 0x8000;
/// The page tables: PML4, PDPT, the 4 KiB table of the first 2 MiB, then
/// the page directories, up to [`GUEST_LOAD_ADDR`].
pub const PAGE_TABLES_ADDR: u64 = 0x1_0000;
/// Where the guest program is linked and loaded.
pub const GUEST_LOAD_ADDR: u64 = 0x20_0000;
/// End of the room for the guest program's segments.
pub const GUEST_LOAD_END: u64 = 0x30_0000;
/// Top of the guest program's (CPL3) stack; it grows down to
/// [`GUEST_LOAD_END`].
pub const USER_STACK_TOP: u64 = 0x40_0000;
/// First byte of low RAM the guest may use as it likes.
pub const FREE_LOW_START: u64 = 0x40_0000;

/// Start of the MMIO gap between low and high RAM.
pub const MMIO_GAP_START: u64 = 0xd000_0000;
/// End (exclusive) of the MMIO gap; high RAM starts here.
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// The virtio-mmio window of the virtio-iommu.
pub const VIRTIO_MMIO_BASE: u64 = MMIO_GAP_START;
/// Size of one MMIO window.
pub const MMIO_WINDOW_SIZE: u64 = 0x1000;
/// The first DMA engine's registers; engine `i` is at `DMA_BASE + i * 0x1000`.
pub const DMA_BASE: u64 = MMIO_GAP_START + 0x1_0000;
/// Most DMA engines the boot info describes.
pub const MAX_DMA_ENGINES: usize = 8;

/// `BootInfo::magic`: "VIOMMUBI".
pub const BOOT_INFO_MAGIC: u64 = u64::from_le_bytes(*b"VIOMMUBI");
/// `BootInfo::msi_end` when the config has no MSI region.
pub const NO_MSI_REGION: u64 = 0;

/// What the VMM tells the guest, at [`BOOT_INFO_ADDR`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct BootInfo {
    /// [`BOOT_INFO_MAGIC`].
    pub magic: u64,
    /// The scenario to run (`SCENARIO_*`).
    pub scenario: u64,
    /// End (exclusive) of low RAM, which starts at 0.
    pub low_ram_end: u64,
    /// Start of high RAM.
    pub high_ram_start: u64,
    /// End (exclusive) of high RAM.
    pub high_ram_end: u64,
    /// The configured MSI region (inclusive), reported by PROBE.
    pub msi_start: u64,
    /// Last byte of the MSI region; [`NO_MSI_REGION`] with `msi_start` 0
    /// when the config has none.
    pub msi_end: u64,
    /// Initial config-space `bypass` the config asks for (0 or 1).
    pub bypass_initial: u64,
    /// MAP+UNMAP round trips the benchmark makes (0: skip it).
    pub bench_iterations: u64,
    /// DMA engines present, at most [`MAX_DMA_ENGINES`].
    pub dma_count: u64,
    /// Index of the first DMA engine behind the vIOMMU, the one the
    /// scenarios drive.
    pub primary_dma: u64,
    /// The endpoint ID of each DMA engine.
    pub dma_endpoints: [u64; MAX_DMA_ENGINES],
}

/// Scenario 1: MAP mode end to end.
pub const SCENARIO_MAP: u64 = 1;
/// Scenario 2: bypass through config space and ATTACH_F_BYPASS.
pub const SCENARIO_BYPASS: u64 = 2;
/// Scenario 3: nested translation through a VT-d PASID table.
pub const SCENARIO_NESTED_VTD: u64 = 3;
/// Scenario 4: nested translation through an SMMUv3 CD table.
pub const SCENARIO_NESTED_SMMUV3: u64 = 4;
/// Scenario 5: page requests and PAGE_RESP.
pub const SCENARIO_PAGE_REQUEST: u64 = 5;
/// Scenario 6: a hostile driver, then scenario 1 in the same VM.
pub const SCENARIO_HOSTILE: u64 = 6;
/// Scenario 7: MAP mode across a snapshot: ATTACH and MAPs, sync point
/// [`SNAPSHOT_SYNC`] (where the VMM snapshots the VM and resumes it as a
/// new VM), then DMA through the restored mappings, UNMAP, DETACH.
pub const SCENARIO_SNAPSHOT: u64 = 7;
/// Scenario 8: a DMA engine plugged in at run time and unplugged while
/// attached, with MAP+UNMAP batches for the primary engine in flight.
pub const SCENARIO_HOTPLUG: u64 = 8;

/// The sync point of scenario 7 where the VMM pauses the VM.
pub const SNAPSHOT_SYNC: u32 = 1;
/// The sync point of scenario 8 where the VMM plugs the engine in.
pub const HOTPLUG_PLUG_SYNC: u32 = 1;
/// The sync point of scenario 8 where the VMM unplugs it.
pub const HOTPLUG_UNPLUG_SYNC: u32 = 2;
/// The domain scenario 8 attaches the plugged engine to.
pub const HOTPLUG_DOMAIN: u32 = 2;
/// MAP+UNMAP pairs scenario 8 sends for the primary engine in one
/// notification around each plug event.
pub const HOTPLUG_BATCH_PAIRS: usize = 16;

/// VMM self-test: spin forever (the watchdog must end the run).
pub const SELFTEST_SPIN: u64 = 0x100;
/// VMM self-test: read address 0 (unmapped): a page fault.
pub const SELFTEST_PAGE_FAULT: u64 = 0x101;
/// VMM self-test: execute a privileged instruction at CPL3.
pub const SELFTEST_PRIVILEGED: u64 = 0x102;
/// VMM self-test: panic (the result code is `RESULT_PANIC`).
pub const SELFTEST_PANIC: u64 = 0x103;
/// VMM self-test: write the VMM's own page tables (supervisor-only).
pub const SELFTEST_WRITE_PAGE_TABLES: u64 = 0x104;

/// The domain the MAP scenario attaches to.
pub const MAP_DOMAIN: u32 = 1;
/// The bypass domain of the bypass scenario.
pub const BYPASS_DOMAIN: u32 = 2;
/// The domain the hostile scenario abuses.
pub const HOSTILE_DOMAIN: u32 = 3;
/// The table domain of the nested VT-d scenario.
pub const NESTED_VTD_DOMAIN: u32 = 5;
/// The table domain of the nested SMMUv3 scenario.
pub const NESTED_SMMUV3_DOMAIN: u32 = 6;
/// The table domain of the page-request scenario.
pub const PAGE_REQUEST_DOMAIN: u32 = 7;
/// PASID width the nested scenarios need (`iommu.nested.pasid_bits`): the
/// PASIDs they tag DMA with are below `1 << NESTED_PASID_BITS`.
pub const NESTED_PASID_BITS: u8 = 13;
/// Log2 of the number of CDs of the nested SMMUv3 scenario's linear CD
/// table (its SubstreamIDs are below `1 << NESTED_SMMUV3_S1CDMAX`).
pub const NESTED_SMMUV3_S1CDMAX: u32 = 2;
/// INVALIDATEs the nested VT-d scenario sends in one notification.
pub const NESTED_VTD_BATCH: usize = 4;
/// First IOVA the scenarios map.
pub const IOVA_WINDOW_START: u64 = 0x1000_0000;
/// Last IOVA the scenarios map (inclusive).
pub const IOVA_WINDOW_END: u64 = 0x1fff_ffff;

/// DMA engine registers (offsets in its MMIO window). 64-bit registers take
/// one 8-byte access or two 4-byte ones (low half first); the others take
/// 4-byte accesses.
pub mod dma_regs {
    /// Source address (IOVA, or guest-physical in bypass), 64-bit.
    pub const SRC: u64 = 0x00;
    /// Destination address, 64-bit.
    pub const DST: u64 = 0x08;
    /// Transfer length in bytes, 1..=[`super::DMA_MAX_LEN`].
    pub const LEN: u64 = 0x10;
    /// PASID of the transfer (used when `FLAGS_PASID_VALID` is set).
    pub const PASID: u64 = 0x14;
    /// `FLAGS_*` bits.
    pub const FLAGS: u64 = 0x18;
    /// `OP_*`.
    pub const OP: u64 = 0x1c;
    /// Byte written by `OP_FILL` (low 8 bits).
    pub const FILL: u64 = 0x20;
    /// Any write starts the operation; it completes before the write
    /// returns.
    pub const DOORBELL: u64 = 0x24;
    /// `STATUS_*` of the last operation (read-only).
    pub const STATUS: u64 = 0x28;
    /// `OP_COMPARE`: 0 if equal, else 1 + offset of the first difference
    /// (read-only).
    pub const CMP_RESULT: u64 = 0x2c;
    /// The engine's endpoint ID (read-only).
    pub const ENDPOINT: u64 = 0x30;
    /// [`super::DMA_ID`] (read-only).
    pub const ID: u64 = 0x34;
}

/// `dma_regs::ID`: "DMAE".
pub const DMA_ID: u32 = u32::from_le_bytes(*b"DMAE");
/// Largest transfer the engine accepts (larger is `STATUS_BAD_ARGS`).
pub const DMA_MAX_LEN: u32 = 1 << 20;
/// `dma_regs::FLAGS`: the `PASID` register tags the transfer.
pub const DMA_FLAGS_PASID_VALID: u32 = 1;
/// Copy `LEN` bytes from `SRC` to `DST`.
pub const DMA_OP_COPY: u32 = 1;
/// Fill `LEN` bytes at `DST` with `FILL`.
pub const DMA_OP_FILL: u32 = 2;
/// Compare `LEN` bytes at `SRC` and `DST`.
pub const DMA_OP_COMPARE: u32 = 3;
/// No operation has run since reset.
pub const DMA_STATUS_IDLE: u32 = 0;
/// The last operation completed.
pub const DMA_STATUS_OK: u32 = 1;
/// The last operation was refused by the IOMMU or left guest memory.
pub const DMA_STATUS_FAULT: u32 = 2;
/// The last operation had an unknown op, a bad length or an unsupported
/// PASID.
pub const DMA_STATUS_BAD_ARGS: u32 = 3;
/// The last operation waits for a page: the IOMMU sent a page request and
/// the engine retries (then reports OK or FAULT) once the driver answers
/// it with PAGE_RESP. Ringing the doorbell meanwhile abandons it.
pub const DMA_STATUS_PAGE_WAIT: u32 = 4;

/// The virtio-mmio transport's register layout (virtio 1.3, 4.2.2), which
/// the guest's driver and the VMM's device both follow.
pub mod virtio_mmio {
    /// "virt".
    pub const MAGIC: u32 = 0x7472_6976;

    /// Register offsets.
    pub mod regs {
        /// MagicValue.
        pub const MAGIC: u64 = 0x000;
        /// Version.
        pub const VERSION: u64 = 0x004;
        /// DeviceID.
        pub const DEVICE_ID: u64 = 0x008;
        /// VendorID.
        pub const VENDOR_ID: u64 = 0x00c;
        /// DeviceFeatures.
        pub const DEVICE_FEATURES: u64 = 0x010;
        /// DeviceFeaturesSel.
        pub const DEVICE_FEATURES_SEL: u64 = 0x014;
        /// DriverFeatures.
        pub const DRIVER_FEATURES: u64 = 0x020;
        /// DriverFeaturesSel.
        pub const DRIVER_FEATURES_SEL: u64 = 0x024;
        /// QueueSel.
        pub const QUEUE_SEL: u64 = 0x030;
        /// QueueNumMax.
        pub const QUEUE_NUM_MAX: u64 = 0x034;
        /// QueueNum.
        pub const QUEUE_NUM: u64 = 0x038;
        /// QueueReady.
        pub const QUEUE_READY: u64 = 0x044;
        /// QueueNotify.
        pub const QUEUE_NOTIFY: u64 = 0x050;
        /// InterruptStatus.
        pub const INTERRUPT_STATUS: u64 = 0x060;
        /// InterruptACK.
        pub const INTERRUPT_ACK: u64 = 0x064;
        /// Status.
        pub const STATUS: u64 = 0x070;
        /// QueueDescLow.
        pub const QUEUE_DESC_LOW: u64 = 0x080;
        /// QueueDescHigh.
        pub const QUEUE_DESC_HIGH: u64 = 0x084;
        /// QueueDriverLow.
        pub const QUEUE_DRIVER_LOW: u64 = 0x090;
        /// QueueDriverHigh.
        pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
        /// QueueDeviceLow.
        pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
        /// QueueDeviceHigh.
        pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
        /// SHMLenLow: no shared memory regions, so all ones.
        pub const SHM_LEN_LOW: u64 = 0x0b0;
        /// SHMLenHigh.
        pub const SHM_LEN_HIGH: u64 = 0x0b4;
        /// ConfigGeneration.
        pub const CONFIG_GENERATION: u64 = 0x0fc;
        /// Start of the device config space.
        pub const CONFIG: u64 = 0x100;
    }

    /// Status: ACKNOWLEDGE.
    pub const STATUS_ACKNOWLEDGE: u32 = 1;
    /// Status: DRIVER.
    pub const STATUS_DRIVER: u32 = 2;
    /// Status: DRIVER_OK.
    pub const STATUS_DRIVER_OK: u32 = 4;
    /// Status: FEATURES_OK.
    pub const STATUS_FEATURES_OK: u32 = 8;
    /// Status: DEVICE_NEEDS_RESET.
    pub const STATUS_DEVICE_NEEDS_RESET: u32 = 0x40;
    /// Status: FAILED.
    pub const STATUS_FAILED: u32 = 0x80;
}

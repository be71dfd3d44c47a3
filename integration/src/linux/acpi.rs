//! The Linux guest's firmware tables: RSDP → XSDT → FADT (→ DSDT), MADT
//! and, with a vIOMMU, the VIOT, written into the BIOS area where Linux
//! scans for the RSDP. The DSDT is how the guest finds the virtio-mmio
//! devices (the kernel has no `virtio_mmio.device=` support) and COM1; the
//! VIOT is how it finds the virtio-iommu and the endpoints behind it.
//!
//! This module owns the tables' contents and their placement in
//! [`layout::ACPI_BASE`]..[`layout::ACPI_END`]; it never chooses device
//! windows, interrupt lines or endpoint IDs (the caller passes them, from
//! [`layout`]). The platform is ACPI hardware-reduced: no PM1 blocks, no
//! SCI, no FACS; poweroff is the FADT's sleep control register.

use acpi_tables::{aml, fadt, gas, madt, rsdp, sdt::Sdt, xsdt, Aml, AmlSink};
use vm_memory::{Bytes, GuestAddress, GuestMemoryError, GuestMemoryMmap};
use vmm_iommu::viot::{self, AcpiOem, ViotEndpoint, ViotError, ViotIommu};

use super::layout;

/// OEM ID in every table header.
const OEM_ID: [u8; 6] = *b"VMMIOM";
/// OEM revision of every table.
const OEM_REVISION: u32 = 1;
/// Tables start on 16-byte boundaries: the RSDP must (Linux scans the BIOS
/// area in 16-byte steps), and the others keep their 64-bit fields aligned.
const TABLE_ALIGN: u64 = 16;
/// Pins of KVM's in-kernel IOAPIC: a GSI at or past this reaches nothing.
const IOAPIC_PINS: u32 = 24;
/// `_HID` of a virtio-mmio device (Linux's `virtio_mmio_acpi_match`).
const VIRTIO_MMIO_HID: &str = "LNRO0005";

/// Standard ACPI table header length.
const HEADER_LEN: usize = 36;
/// DSDT revision 2: AML integers are 64 bits wide.
const DSDT_REVISION: u8 = 2;
/// MADT revision (ACPI 6.3 and later).
const MADT_REVISION: u8 = 5;
/// MADT flags: PCAT_COMPAT, the machine also has dual 8259s (KVM's).
const MADT_PCAT_COMPAT: u32 = 1;
/// MADT processor local APIC flags: Enabled.
const LAPIC_ENABLED: u32 = 1;
/// MADT entry type: processor local APIC.
const MADT_LOCAL_APIC: u8 = 0;
/// MADT entry type: interrupt source override.
const MADT_INTERRUPT_OVERRIDE: u8 = 2;
/// FADT IAPC_BOOT_ARCH (ACPI 6.5 table 5.11): VGA not present (bit 2), MSI
/// not supported (bit 3, there is no PCI), PCIe ASPM controls (bit 4: the
/// OS must not touch ASPM), CMOS RTC not present (bit 5: the VMM emulates
/// no RTC, so Linux must not probe ports 0x70/0x71). Legacy devices and
/// 8042 (bits 0, 1) are clear: there is no i8042 to probe either.
const IAPC_BOOT_ARCH: u16 = (1 << 2) | (1 << 3) | (1 << 4) | (1 << 5);

// The MADT holds the APIC addresses in 32 bits, COM1's IRQ descriptor its
// line as a bit of a 16-bit mask.
const _: () = assert!(layout::LAPIC_ADDR <= u32::MAX as u64);
const _: () = assert!(layout::IOAPIC_ADDR <= u32::MAX as u64);
const _: () = assert!(layout::SERIAL_GSI < 16);

/// One virtio-mmio device as the guest sees it in the DSDT (and the VIOT).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VirtioMmioNode {
    /// Base of the device's virtio-mmio window (below 4 GiB).
    pub base: u64,
    /// Size of the window.
    pub size: u64,
    /// The window's interrupt line (IOAPIC pin, edge, active high).
    pub gsi: u32,
    /// `Some(id)`: the device is behind the vIOMMU with endpoint ID `id`.
    pub endpoint: Option<u32>,
}

/// What the tables describe.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AcpiConfig {
    /// Number of vCPUs (local APIC IDs 0 to `vcpus - 1`).
    pub vcpus: u8,
    /// Base of the virtio-iommu's virtio-mmio window, which `devices` lists
    /// too; `None`: no vIOMMU and no VIOT.
    pub iommu: Option<u64>,
    /// Every virtio-mmio device, the virtio-iommu's included, in DSDT order
    /// (device `i` is `\_SB_.VRii` with `_UID` `i`).
    pub devices: Vec<VirtioMmioNode>,
}

/// Why the tables could not be written.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    /// A machine needs at least one vCPU.
    #[error("ACPI: no vCPUs")]
    NoVcpus,
    /// More virtio-mmio devices than the layout has windows and lines for.
    #[error("ACPI: {count} virtio-mmio devices, at most {max}")]
    TooManyDevices {
        /// Devices given.
        count: usize,
        /// The limit, [`layout::MAX_VIRTIO_DEVICES`].
        max: usize,
    },
    /// A window the DSDT's 32-bit Memory32Fixed descriptor cannot hold.
    #[error("ACPI: device {index} window {base:#x}+{size:#x} is empty or not below 4 GiB")]
    BadWindow {
        /// Index of the device.
        index: usize,
        /// The window's base.
        base: u64,
        /// The window's size.
        size: u64,
    },
    /// Two devices with one window base: the VIOT matches endpoints by base.
    #[error("ACPI: device {index} window base {base:#x} is also device {first}'s")]
    DuplicateWindow {
        /// Index of the second device.
        index: usize,
        /// Index of the first device.
        first: usize,
        /// The shared base.
        base: u64,
    },
    /// An interrupt line the IOAPIC does not have.
    #[error("ACPI: device {index} GSI {gsi} is past the IOAPIC's {IOAPIC_PINS} pins")]
    GsiOutOfRange {
        /// Index of the device.
        index: usize,
        /// The line.
        gsi: u32,
    },
    /// The vIOMMU's window is not one of the devices: the guest could not
    /// find the IOMMU the VIOT names.
    #[error("ACPI: vIOMMU window {base:#x} is not among the virtio-mmio devices")]
    IommuNotListed {
        /// The vIOMMU's base.
        base: u64,
    },
    /// The vIOMMU is marked as its own endpoint.
    #[error("ACPI: vIOMMU window {base:#x} has an endpoint ID: it cannot translate itself")]
    IommuIsEndpoint {
        /// The vIOMMU's base.
        base: u64,
    },
    /// A device is marked as an endpoint but there is no vIOMMU.
    #[error("ACPI: device {index} has an endpoint ID but there is no vIOMMU")]
    EndpointWithoutIommu {
        /// Index of the device.
        index: usize,
    },
    /// The VIOT builder refused the endpoints.
    #[error("ACPI: {0}")]
    Viot(#[from] ViotError),
    /// The tables do not fit in the ACPI area.
    #[error("ACPI: tables would end at {end:#x}, past {limit:#x}")]
    TooLarge {
        /// Where the tables would have ended (saturated).
        end: u64,
        /// End of the area.
        limit: u64,
    },
    /// The ACPI area is not (all) guest RAM.
    #[error("ACPI: writing tables to guest memory: {0}")]
    GuestMemory(#[from] GuestMemoryError),
}

/// Builds every table for `cfg` and writes them from [`layout::ACPI_BASE`]
/// up, RSDP first; returns the RSDP's address (for `boot_params.acpi_rsdp_addr`).
pub fn write_acpi_tables(
    mem: &GuestMemoryMmap,
    cfg: &AcpiConfig,
) -> Result<GuestAddress, AcpiError> {
    write_tables_in(mem, cfg, layout::ACPI_BASE, layout::ACPI_END)
}

/// [`write_acpi_tables`] in the area `base..end`.
fn write_tables_in(
    mem: &GuestMemoryMmap,
    cfg: &AcpiConfig,
    base: u64,
    end: u64,
) -> Result<GuestAddress, AcpiError> {
    validate(cfg)?;
    let dsdt = dsdt(&cfg.devices);
    let madt = madt(cfg.vcpus);
    let viot = cfg.iommu.map(|base| viot(base, &cfg.devices)).transpose()?;

    // Sizes first (the XSDT's depends only on its entry count, the FADT's
    // and the RSDP's are fixed), then addresses, then the tables that hold
    // addresses.
    let xsdt_entries = 2 + usize::from(viot.is_some());
    let mut area = Area { next: base, end };
    let rsdp_addr = area.place(rsdp::Rsdp::len())?;
    let xsdt_addr = area.place(xsdt(&vec![0; xsdt_entries]).len())?;
    let fadt_addr = area.place(fadt::FADT::len())?;
    let dsdt_addr = area.place(dsdt.len())?;
    let madt_addr = area.place(madt.len())?;
    let viot_addr = viot.as_ref().map(|t| area.place(t.len())).transpose()?;

    let fadt = fadt(dsdt_addr);
    let mut entries = vec![fadt_addr, madt_addr];
    entries.extend(viot_addr);
    let xsdt = xsdt(&entries);
    let rsdp = to_bytes(&rsdp::Rsdp::new(OEM_ID, xsdt_addr));

    let mut tables = vec![
        (rsdp_addr, &rsdp),
        (xsdt_addr, &xsdt),
        (fadt_addr, &fadt),
        (dsdt_addr, &dsdt),
        (madt_addr, &madt),
    ];
    if let (Some(addr), Some(table)) = (viot_addr, viot.as_ref()) {
        tables.push((addr, table));
    }
    for (addr, bytes) in tables {
        mem.write_slice(bytes, GuestAddress(addr))?;
    }
    Ok(GuestAddress(rsdp_addr))
}

/// The free part of the ACPI area.
struct Area {
    /// Next free, aligned address.
    next: u64,
    /// End (exclusive) of the area.
    end: u64,
}

impl Area {
    /// Reserves `len` bytes and returns their address.
    fn place(&mut self, len: usize) -> Result<u64, AcpiError> {
        let start = self.next;
        let end = u64::try_from(len)
            .ok()
            .and_then(|len| start.checked_add(len))
            .unwrap_or(u64::MAX);
        if end > self.end {
            return Err(AcpiError::TooLarge {
                end,
                limit: self.end,
            });
        }
        self.next = end
            .checked_next_multiple_of(TABLE_ALIGN)
            .unwrap_or(u64::MAX);
        Ok(start)
    }
}

/// Checks `cfg` against what the tables can say and what the guest needs.
fn validate(cfg: &AcpiConfig) -> Result<(), AcpiError> {
    if cfg.vcpus == 0 {
        return Err(AcpiError::NoVcpus);
    }
    // Bounds the DSDT's device names (VR00..VR0F) and the IOAPIC lines.
    if cfg.devices.len() > layout::MAX_VIRTIO_DEVICES {
        return Err(AcpiError::TooManyDevices {
            count: cfg.devices.len(),
            max: layout::MAX_VIRTIO_DEVICES,
        });
    }
    for (index, dev) in cfg.devices.iter().enumerate() {
        let fits_32 = dev
            .base
            .checked_add(dev.size)
            .is_some_and(|end| end <= 1 << 32);
        if dev.size == 0 || !fits_32 {
            return Err(AcpiError::BadWindow {
                index,
                base: dev.base,
                size: dev.size,
            });
        }
        if dev.gsi >= IOAPIC_PINS {
            return Err(AcpiError::GsiOutOfRange {
                index,
                gsi: dev.gsi,
            });
        }
        if let Some(first) = cfg.devices[..index].iter().position(|d| d.base == dev.base) {
            return Err(AcpiError::DuplicateWindow {
                index,
                first,
                base: dev.base,
            });
        }
    }
    match cfg.iommu {
        Some(base) => match cfg.devices.iter().find(|d| d.base == base) {
            None => return Err(AcpiError::IommuNotListed { base }),
            Some(d) if d.endpoint.is_some() => return Err(AcpiError::IommuIsEndpoint { base }),
            Some(_) => {}
        },
        None => {
            if let Some(index) = cfg.devices.iter().position(|d| d.endpoint.is_some()) {
                return Err(AcpiError::EndpointWithoutIommu { index });
            }
        }
    }
    Ok(())
}

/// Encodes any `acpi_tables` object.
fn to_bytes(table: &dyn Aml) -> Vec<u8> {
    let mut bytes = Vec::new();
    table.to_aml_bytes(&mut bytes);
    bytes
}

/// The XSDT listing `entries`.
fn xsdt(entries: &[u64]) -> Vec<u8> {
    let mut xsdt = xsdt::XSDT::new(OEM_ID, *b"VMMIXSDT", OEM_REVISION);
    for &entry in entries {
        xsdt.add_entry(entry);
    }
    to_bytes(&xsdt)
}

/// The FADT: ACPI 6.5, hardware-reduced, DSDT by 64-bit address, poweroff
/// through the sleep control register.
fn fadt(dsdt_addr: u64) -> Vec<u8> {
    let mut fadt = fadt::FADTBuilder::new(OEM_ID, *b"VMMIFACP", OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .flag(fadt::Flags::HwReducedAcpi)
        // No fixed-feature buttons: hardware-reduced machines have none.
        .flag(fadt::Flags::PwrButton)
        .flag(fadt::Flags::SlpButton);
    fadt.iapc_boot_arch = IAPC_BOOT_ARCH.into();
    // Linux supports S5 on a hardware-reduced machine only when both
    // registers are set; poweroff writes SLP_TYP << 2 | SLP_EN (bit 5) to
    // the control register.
    fadt.sleep_control_reg = io_byte_register(layout::ACPI_SLEEP_CONTROL_PORT);
    fadt.sleep_status_reg = io_byte_register(layout::ACPI_SLEEP_STATUS_PORT);
    to_bytes(&fadt.finalize())
}

/// A one-byte register in I/O port space.
fn io_byte_register(port: u16) -> gas::GAS {
    gas::GAS::new(
        gas::AddressSpace::SystemIo,
        8,
        0,
        gas::AccessSize::ByteAccess,
        u64::from(port),
    )
}

/// The MADT: the local APICs, the IOAPIC, and ISA IRQ 0 on GSI 2.
fn madt(vcpus: u8) -> Vec<u8> {
    // Built on `Sdt` because `acpi_tables::madt::MADT` has no flags field
    // (PCAT_COMPAT) and no interrupt source override.
    let mut body = Vec::new();
    body.dword(layout::LAPIC_ADDR as u32);
    body.dword(MADT_PCAT_COMPAT);
    for id in 0..vcpus {
        // Processor local APIC: type, length 8, ACPI processor UID, APIC ID, flags.
        body.vec(&[MADT_LOCAL_APIC, 8, id, id]);
        body.dword(LAPIC_ENABLED);
    }
    madt::IoApic::new(0, layout::IOAPIC_ADDR as u32, 0).to_aml_bytes(&mut body);
    // Interrupt source override: type, length 10, bus 0 (ISA), source IRQ
    // 0, GSI 2, flags 0 (conforms to the bus: edge, active high), as on a PC.
    body.vec(&[MADT_INTERRUPT_OVERRIDE, 10, 0, 0]);
    body.dword(2);
    body.word(0);
    sdt_table(*b"APIC", MADT_REVISION, *b"VMMIMADT", &body)
}

/// The DSDT: one `\_SB_` device per virtio-mmio window, COM1, and `\_S5_`.
fn dsdt(devices: &[VirtioMmioNode]) -> Vec<u8> {
    let mut sb = Vec::new();
    for (index, dev) in devices.iter().enumerate() {
        sb.extend(virtio_mmio_device(index, dev));
    }
    sb.extend(com1_device());
    let sb = aml::Scope::raw("\\_SB_".into(), sb);

    // _S5_: SLP_TYPa, SLP_TYPb, reserved, reserved.
    let slp_typ = layout::ACPI_S5_SLP_TYP;
    let zero = 0u8;
    let s5 = aml::Package::new(vec![&slp_typ, &zero, &zero, &zero]);
    let s5 = aml::Name::new("_S5_".into(), &s5);

    let mut body = sb;
    s5.to_aml_bytes(&mut body);
    sdt_table(*b"DSDT", DSDT_REVISION, *b"VMMIDSDT", &body)
}

/// `Device (VRii) { _HID "LNRO0005", _UID i, _CRS { Memory32Fixed, Interrupt } }`.
fn virtio_mmio_device(index: usize, dev: &VirtioMmioNode) -> Vec<u8> {
    // `validate` keeps index below MAX_VIRTIO_DEVICES (two hex digits) and
    // the window below 4 GiB; the fallbacks are never taken.
    let name = format!("VR{:02X}", index & 0xff);
    let uid = u32::try_from(index).unwrap_or(u32::MAX);
    let base = u32::try_from(dev.base).unwrap_or(u32::MAX);
    let size = u32::try_from(dev.size).unwrap_or(u32::MAX);

    let window = aml::Memory32Fixed::new(true, base, size);
    // Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive) { gsi }.
    let irq = aml::Interrupt::new(true, true, false, false, dev.gsi);
    let crs = aml::ResourceTemplate::new(vec![&window, &irq]);
    let hid = aml::Name::new("_HID".into(), &VIRTIO_MMIO_HID);
    let uid = aml::Name::new("_UID".into(), &uid);
    let crs = aml::Name::new("_CRS".into(), &crs);
    to_bytes(&aml::Device::new(
        name.as_str().into(),
        vec![&hid, &uid, &crs],
    ))
}

/// `Device (COM1) { _HID EisaId ("PNP0501"), _UID 0, _CRS { IO, IRQNoFlags } }`.
fn com1_device() -> Vec<u8> {
    let ports = aml::IO::new(layout::SERIAL_PORT, layout::SERIAL_PORT, 0, 8);
    let irq = IrqNoFlags(1 << layout::SERIAL_GSI);
    let crs = aml::ResourceTemplate::new(vec![&ports, &irq]);
    let hid = aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0501"));
    let uid = aml::Name::new("_UID".into(), &0u8);
    let crs = aml::Name::new("_CRS".into(), &crs);
    to_bytes(&aml::Device::new("COM1".into(), vec![&hid, &uid, &crs]))
}

/// The small IRQ descriptor without flags (ISA: edge, active high,
/// exclusive), which `acpi_tables::aml` lacks: tag 0x22, IRQ mask u16.
struct IrqNoFlags(u16);

impl Aml for IrqNoFlags {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        sink.byte(0x22);
        sink.word(self.0);
    }
}

/// A table of the standard header followed by `body`, checksummed.
fn sdt_table(signature: [u8; 4], revision: u8, oem_table_id: [u8; 8], body: &[u8]) -> Vec<u8> {
    let mut table = Sdt::new(
        signature,
        HEADER_LEN as u32,
        revision,
        OEM_ID,
        oem_table_id,
        OEM_REVISION,
    );
    table.append_slice(body);
    table.as_slice().to_vec()
}

/// The VIOT: the virtio-mmio IOMMU node and one MMIO endpoint node per
/// device behind it.
fn viot(iommu_base: u64, devices: &[VirtioMmioNode]) -> Result<Vec<u8>, ViotError> {
    let endpoints: Vec<ViotEndpoint> = devices
        .iter()
        .filter_map(|d| {
            d.endpoint.map(|endpoint| ViotEndpoint::Mmio {
                endpoint,
                base: d.base,
            })
        })
        .collect();
    let oem = AcpiOem {
        oem_id: OEM_ID,
        oem_table_id: *b"VMMIVIOT",
        oem_revision: OEM_REVISION,
    };
    viot::viot_table(ViotIommu::Mmio { base: iommu_base }, &endpoints, &oem)
}

#[cfg(test)]
mod tests {
    use super::*;

    // Field offsets below are the ACPI 6.5 spec's, written out here rather
    // than taken from the builders.

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    fn node(i: usize, endpoint: Option<u32>) -> VirtioMmioNode {
        VirtioMmioNode {
            base: layout::virtio_mmio_base(i),
            size: layout::VIRTIO_MMIO_SIZE,
            gsi: layout::virtio_gsi(i),
            endpoint,
        }
    }

    /// A vIOMMU (window 0) with two endpoints and one device outside it.
    fn cfg_with_iommu() -> AcpiConfig {
        AcpiConfig {
            vcpus: 2,
            iommu: Some(layout::virtio_mmio_base(0)),
            devices: vec![
                node(0, None),
                node(1, Some(1)),
                node(2, None),
                node(3, Some(7)),
            ],
        }
    }

    fn cfg_without_iommu() -> AcpiConfig {
        AcpiConfig {
            vcpus: 1,
            iommu: None,
            devices: vec![node(0, None), node(1, None)],
        }
    }

    fn u16_at(b: &[u8], off: usize) -> u16 {
        u16::from_le_bytes(b[off..off + 2].try_into().unwrap())
    }
    fn u32_at(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
    }
    fn u64_at(b: &[u8], off: usize) -> u64 {
        u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
    }
    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }
    fn count(haystack: &[u8], needle: &[u8]) -> usize {
        haystack
            .windows(needle.len())
            .filter(|w| w == &needle)
            .count()
    }

    fn read(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0; len];
        mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
        buf
    }

    /// Reads the table at `addr` by its header length, checking that the
    /// length covers the header and that the checksum is 0.
    fn read_table(mem: &GuestMemoryMmap, addr: u64) -> Vec<u8> {
        let header = read(mem, addr, 36);
        let len = u32_at(&header, 4) as usize;
        assert!(len >= 36, "table at {addr:#x} length {len}");
        let table = read(mem, addr, len);
        assert_eq!(sum(&table), 0, "checksum of {:?}", &table[..4]);
        table
    }

    /// The RSDP's XSDT and every table it lists, by signature.
    fn tables(mem: &GuestMemoryMmap, rsdp: GuestAddress) -> (Vec<u8>, Vec<(u64, Vec<u8>)>) {
        let rsdp = read(mem, rsdp.0, 36);
        let xsdt = read_table(mem, u64_at(&rsdp, 24));
        let listed = xsdt[36..]
            .chunks(8)
            .map(|e| {
                let addr = u64_at(e, 0);
                (addr, read_table(mem, addr))
            })
            .collect();
        (xsdt, listed)
    }

    fn find<'a>(listed: &'a [(u64, Vec<u8>)], sig: &[u8; 4]) -> &'a [u8] {
        &listed.iter().find(|(_, t)| &t[..4] == sig).unwrap().1
    }

    fn dsdt_of(mem: &GuestMemoryMmap, listed: &[(u64, Vec<u8>)]) -> Vec<u8> {
        let fadt = find(listed, b"FACP");
        read_table(mem, u64_at(fadt, 140))
    }

    #[test]
    fn rsdp_is_revision_2_at_acpi_base_with_both_checksums() {
        let mem = mem();
        let rsdp = write_acpi_tables(&mem, &cfg_with_iommu()).unwrap();
        assert_eq!(rsdp, GuestAddress(layout::ACPI_BASE));
        let r = read(&mem, rsdp.0, 36);
        assert_eq!(&r[0..8], b"RSD PTR ");
        assert_eq!(sum(&r[..20]), 0, "ACPI 1.0 checksum");
        assert_eq!(&r[9..15], &OEM_ID);
        assert_eq!(r[15], 2, "revision");
        assert_eq!(u32_at(&r, 20), 36, "length");
        assert_eq!(sum(&r), 0, "extended checksum");
        let xsdt = read_table(&mem, u64_at(&r, 24));
        assert_eq!(&xsdt[..4], b"XSDT");
    }

    #[test]
    fn xsdt_lists_fadt_madt_viot_with_an_iommu() {
        let mem = mem();
        let rsdp = write_acpi_tables(&mem, &cfg_with_iommu()).unwrap();
        let (xsdt, listed) = tables(&mem, rsdp);
        assert_eq!(xsdt.len(), 36 + 3 * 8);
        let sigs: Vec<&[u8]> = listed.iter().map(|(_, t)| &t[..4]).collect();
        assert_eq!(sigs, [b"FACP", b"APIC", b"VIOT"]);
    }

    #[test]
    fn xsdt_lists_fadt_madt_only_without_an_iommu() {
        let mem = mem();
        let rsdp = write_acpi_tables(&mem, &cfg_without_iommu()).unwrap();
        let (xsdt, listed) = tables(&mem, rsdp);
        assert_eq!(xsdt.len(), 36 + 2 * 8);
        let sigs: Vec<&[u8]> = listed.iter().map(|(_, t)| &t[..4]).collect();
        assert_eq!(sigs, [b"FACP", b"APIC"]);
    }

    #[test]
    fn tables_lie_in_the_acpi_area_without_overlap() {
        let mem = mem();
        let rsdp = write_acpi_tables(&mem, &cfg_with_iommu()).unwrap();
        let (xsdt, listed) = tables(&mem, rsdp);
        let dsdt_addr = u64_at(find(&listed, b"FACP"), 140);
        let dsdt = read_table(&mem, dsdt_addr);
        let xsdt_addr = u64_at(&read(&mem, rsdp.0, 36), 24);
        let mut spans = vec![
            (rsdp.0, 36),
            (xsdt_addr, xsdt.len() as u64),
            (dsdt_addr, dsdt.len() as u64),
        ];
        spans.extend(listed.iter().map(|(a, t)| (*a, t.len() as u64)));
        spans.sort();
        for pair in spans.windows(2) {
            assert!(pair[0].0 + pair[0].1 <= pair[1].0, "{spans:x?}");
        }
        for (addr, len) in spans {
            assert_eq!(addr % 16, 0);
            assert!(addr >= layout::ACPI_BASE && addr + len <= layout::ACPI_END);
        }
    }

    #[test]
    fn fadt_is_hardware_reduced_with_x_dsdt_and_sleep_registers() {
        let mem = mem();
        let rsdp = write_acpi_tables(&mem, &cfg_with_iommu()).unwrap();
        let (_, listed) = tables(&mem, rsdp);
        let f = find(&listed, b"FACP");
        assert_eq!(f.len(), 276);
        assert_eq!(f[8], 6, "major revision");
        assert_eq!(f[131], 5, "minor revision");
        assert_eq!(u32_at(f, 112) & (1 << 20), 1 << 20, "HW_REDUCED_ACPI");
        assert_eq!(u16_at(f, 109), IAPC_BOOT_ARCH);
        assert_eq!(u16_at(f, 109) & (1 << 2), 1 << 2, "VGA not present");
        assert_eq!(u32_at(f, 40), 0, "32-bit DSDT unused");
        let dsdt = read_table(&mem, u64_at(f, 140));
        assert_eq!(&dsdt[..4], b"DSDT");
        // GAS: space 1 (system I/O), width 8, offset 0, access 1 (byte), address.
        let control = [&[1, 8, 0, 1][..], &0x600u64.to_le_bytes()].concat();
        let status = [&[1, 8, 0, 1][..], &0x601u64.to_le_bytes()].concat();
        assert_eq!(u64::from(layout::ACPI_SLEEP_CONTROL_PORT), 0x600);
        assert_eq!(u64::from(layout::ACPI_SLEEP_STATUS_PORT), 0x601);
        assert_eq!(&f[244..256], &control[..], "SLEEP_CONTROL_REG");
        assert_eq!(&f[256..268], &status[..], "SLEEP_STATUS_REG");
    }

    #[test]
    fn madt_has_one_enabled_lapic_per_vcpu_the_ioapic_and_irq0_override() {
        let mem = mem();
        let cfg = AcpiConfig {
            vcpus: 3,
            ..cfg_with_iommu()
        };
        let rsdp = write_acpi_tables(&mem, &cfg).unwrap();
        let (_, listed) = tables(&mem, rsdp);
        let m = find(&listed, b"APIC");
        assert_eq!(u32_at(m, 36) as u64, layout::LAPIC_ADDR);
        assert_eq!(u32_at(m, 40), 1, "PCAT_COMPAT");

        let mut entries = Vec::new();
        let mut off = 44;
        while off < m.len() {
            let len = m[off + 1] as usize;
            assert!(len >= 2 && off + len <= m.len());
            entries.push(&m[off..off + len]);
            off += len;
        }
        let lapics: Vec<_> = entries.iter().filter(|e| e[0] == 0).collect();
        assert_eq!(lapics.len(), 3);
        for (i, e) in lapics.iter().enumerate() {
            assert_eq!(e.len(), 8);
            assert_eq!((e[2], e[3]), (i as u8, i as u8), "UID, APIC ID");
            assert_eq!(u32_at(e, 4), 1, "enabled");
        }
        let ioapics: Vec<_> = entries.iter().filter(|e| e[0] == 1).collect();
        assert_eq!(ioapics.len(), 1);
        let io = ioapics[0];
        assert_eq!(io.len(), 12);
        assert_eq!(io[2], 0, "IOAPIC ID");
        assert_eq!(u32_at(io, 4) as u64, layout::IOAPIC_ADDR);
        assert_eq!(u32_at(io, 8), 0, "GSI base");
        let overrides: Vec<_> = entries.iter().filter(|e| e[0] == 2).collect();
        assert_eq!(overrides.len(), 1);
        let o = overrides[0];
        assert_eq!(o.len(), 10);
        assert_eq!((o[2], o[3]), (0, 0), "bus ISA, IRQ 0");
        assert_eq!(u32_at(o, 4), 2, "GSI 2");
        assert_eq!(u16_at(o, 8), 0, "flags");
        assert_eq!(entries.len(), 5);
    }

    #[test]
    fn dsdt_describes_every_virtio_mmio_window_com1_and_s5() {
        let mem = mem();
        let cfg = cfg_with_iommu();
        let rsdp = write_acpi_tables(&mem, &cfg).unwrap();
        let (_, listed) = tables(&mem, rsdp);
        let d = dsdt_of(&mem, &listed);
        assert_eq!(d[8], 2, "revision");

        assert_eq!(count(&d, b"LNRO0005"), cfg.devices.len());
        for (i, dev) in cfg.devices.iter().enumerate() {
            assert_eq!(count(&d, format!("VR{i:02X}").as_bytes()), 1);
            // Memory32Fixed: tag 0x86, length 9, read-write, base, size.
            let window = [
                &[0x86, 9, 0, 1][..],
                &(dev.base as u32).to_le_bytes(),
                &(dev.size as u32).to_le_bytes(),
            ]
            .concat();
            assert_eq!(count(&d, &window), 1, "window of device {i}");
            // Extended interrupt: tag 0x89, length 6, consumer | edge, one GSI.
            let irq = [&[0x89, 6, 0, 0x03, 1][..], &dev.gsi.to_le_bytes()].concat();
            assert_eq!(count(&d, &irq), 1, "interrupt of device {i}");
        }

        // COM1: EisaId("PNP0501") = 0x0501d041 as a DWord, IO(0x3f8, 0x3f8, 0, 8), IRQNoFlags {4}.
        assert_eq!(count(&d, b"COM1"), 1);
        assert_eq!(count(&d, &[0x0c, 0x41, 0xd0, 0x05, 0x01]), 1);
        assert_eq!(count(&d, &[0x47, 1, 0xf8, 0x03, 0xf8, 0x03, 0, 8]), 1);
        assert_eq!(count(&d, &[0x22, 0x10, 0x00]), 1);

        // Name (_S5_, Package (4) { 5, 0, 0, 0 }), at the root.
        let s5 = [0x08, b'_', b'S', b'5', b'_', 0x12, 7, 4, 0x0a, 5, 0, 0, 0];
        assert_eq!(layout::ACPI_S5_SLP_TYP, 5);
        assert_eq!(count(&d, &s5), 1);
        assert!(d.ends_with(&s5), "_S5_ follows the \\_SB_ scope");
    }

    #[test]
    fn viot_in_memory_equals_viot_table_of_the_endpoints() {
        let mem = mem();
        let cfg = cfg_with_iommu();
        let rsdp = write_acpi_tables(&mem, &cfg).unwrap();
        let (_, listed) = tables(&mem, rsdp);
        let expected = viot::viot_table(
            ViotIommu::Mmio {
                base: layout::virtio_mmio_base(0),
            },
            &[
                ViotEndpoint::Mmio {
                    endpoint: 1,
                    base: layout::virtio_mmio_base(1),
                },
                ViotEndpoint::Mmio {
                    endpoint: 7,
                    base: layout::virtio_mmio_base(3),
                },
            ],
            &AcpiOem {
                oem_id: OEM_ID,
                oem_table_id: *b"VMMIVIOT",
                oem_revision: OEM_REVISION,
            },
        )
        .unwrap();
        assert_eq!(find(&listed, b"VIOT"), &expected[..]);
    }

    #[test]
    fn every_table_length_matches_its_header_and_checksums_to_zero() {
        let mem = mem();
        let rsdp = write_acpi_tables(&mem, &cfg_with_iommu()).unwrap();
        let (_, listed) = tables(&mem, rsdp);
        // read_table checked length and checksum; the sizes below are fixed.
        assert_eq!(find(&listed, b"FACP").len(), 276);
        assert_eq!(find(&listed, b"APIC").len(), 44 + 2 * 8 + 12 + 10);
        assert_eq!(find(&listed, b"VIOT").len(), 48 + 16 + 2 * 24);
        dsdt_of(&mem, &listed);
    }

    #[test]
    fn most_devices_fit_the_area() {
        let mem = mem();
        let cfg = AcpiConfig {
            vcpus: u8::MAX,
            iommu: Some(layout::virtio_mmio_base(0)),
            devices: (0..layout::MAX_VIRTIO_DEVICES)
                .map(|i| node(i, (i > 0).then_some(i as u32)))
                .collect(),
        };
        let rsdp = write_acpi_tables(&mem, &cfg).unwrap();
        let (_, listed) = tables(&mem, rsdp);
        let d = dsdt_of(&mem, &listed);
        assert_eq!(count(&d, b"LNRO0005"), layout::MAX_VIRTIO_DEVICES);
    }

    #[test]
    fn tables_past_the_area_return_too_large() {
        let mem = mem();
        let base = layout::ACPI_BASE;
        let err = write_tables_in(&mem, &cfg_with_iommu(), base, base + 0x100).unwrap_err();
        assert!(
            matches!(err, AcpiError::TooLarge { limit, .. } if limit == base + 0x100),
            "{err}"
        );
    }

    #[test]
    fn area_outside_guest_memory_returns_guest_memory() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
        let err = write_acpi_tables(&mem, &cfg_with_iommu()).unwrap_err();
        assert!(matches!(err, AcpiError::GuestMemory(_)), "{err}");
    }

    #[test]
    fn invalid_configs_return_their_errors() {
        let mem = mem();
        let check = |cfg: AcpiConfig, want: fn(&AcpiError) -> bool| {
            let err = write_acpi_tables(&mem, &cfg).unwrap_err();
            assert!(want(&err), "{err}");
        };
        check(
            AcpiConfig {
                vcpus: 0,
                ..cfg_with_iommu()
            },
            |e| matches!(e, AcpiError::NoVcpus),
        );
        check(
            AcpiConfig {
                devices: (0..=layout::MAX_VIRTIO_DEVICES)
                    .map(|i| node(i, None))
                    .collect(),
                ..cfg_without_iommu()
            },
            |e| matches!(e, AcpiError::TooManyDevices { count: 17, .. }),
        );
        let mut high = cfg_without_iommu();
        high.devices[1].base = 0xffff_f000;
        high.devices[1].size = 0x2000;
        check(high, |e| matches!(e, AcpiError::BadWindow { index: 1, .. }));
        let mut empty = cfg_without_iommu();
        empty.devices[0].size = 0;
        check(empty, |e| {
            matches!(e, AcpiError::BadWindow { index: 0, .. })
        });
        let mut dup = cfg_without_iommu();
        dup.devices[1].base = dup.devices[0].base;
        check(dup, |e| {
            matches!(
                e,
                AcpiError::DuplicateWindow {
                    index: 1,
                    first: 0,
                    ..
                }
            )
        });
        let mut gsi = cfg_without_iommu();
        gsi.devices[1].gsi = 24;
        check(gsi, |e| {
            matches!(e, AcpiError::GsiOutOfRange { index: 1, gsi: 24 })
        });
        check(
            AcpiConfig {
                iommu: Some(0xc000_0000),
                ..cfg_with_iommu()
            },
            |e| matches!(e, AcpiError::IommuNotListed { base: 0xc000_0000 }),
        );
        let mut self_ep = cfg_with_iommu();
        self_ep.devices[0].endpoint = Some(0);
        check(self_ep, |e| matches!(e, AcpiError::IommuIsEndpoint { .. }));
        check(
            AcpiConfig {
                iommu: None,
                ..cfg_with_iommu()
            },
            |e| matches!(e, AcpiError::EndpointWithoutIommu { index: 1 }),
        );
    }
}

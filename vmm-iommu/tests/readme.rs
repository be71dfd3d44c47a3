//! The README's embedding snippets, compiled and run: each ```rust block
//! of README.md appears verbatim (line by line, indentation aside) in one
//! of the functions below, between the lines that give it its context and
//! the checks of what it did. `readme_snippets_are_compiled_here` fails
//! when the README and this file drift apart. The snippet functions are
//! `rustfmt::skip`: they keep the README's layout.

use std::error::Error;

use vm_memory::Bytes;

type Result = std::result::Result<(), Box<dyn Error>>;

const README: &str = include_str!("../../README.md");
const THIS_FILE: &str = include_str!("readme.rs");

/// The ```rust blocks of the README, each as its non-empty lines, trimmed.
fn readme_rust_blocks() -> Vec<Vec<&'static str>> {
    let mut blocks = Vec::new();
    let mut current: Option<Vec<&str>> = None;
    for line in README.lines() {
        match (&mut current, line.trim()) {
            (None, "```rust") => current = Some(Vec::new()),
            (Some(_), "```") => blocks.extend(current.take()),
            (Some(b), l) if !l.is_empty() => b.push(l),
            _ => {}
        }
    }
    blocks
}

#[test]
fn readme_snippets_are_compiled_here() {
    let source: Vec<&str> = THIS_FILE
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    let blocks = readme_rust_blocks();
    assert_eq!(blocks.len(), 4, "the README's ```rust blocks");
    for block in blocks {
        assert!(
            source.windows(block.len()).any(|w| w == block.as_slice()),
            "this README snippet is not in tests/readme.rs, so it is not compiled:\n{}",
            block.join("\n")
        );
    }
}

const IOMMU_JSON: &str = r#"{
    "page_size_mask": ["4K", "2M", "1G"],
    "reserved_regions": [ { "start": "0xfee00000", "end": "0xfeefffff", "kind": "msi" } ]
}"#;

#[test]
#[rustfmt::skip] // the README's layout, line for line
fn readme_device_and_emulated_dma() -> Result {
    let iommu_json = IOMMU_JSON;
    let iova = 0x1000_0000u64;

    use vm_memory::{GuestAddress, GuestMemoryMmap};
    use vmm_iommu::{config::IommuConfig, VirtioIommu};

    // `iommu_json`: the "iommu" section of the VM config (docs/config.md).
    let cfg = IommuConfig::from_json_str(iommu_json)?;
    let guest_mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 256 << 20)])?;
    // The endpoints behind the vIOMMU, and guest RAM as inclusive [start, end]
    // ranges.
    let dev = VirtioIommu::new(&cfg, &[8], &[(0, (256 << 20) - 1)])?;

    // Transport (virtio-mmio or PCI) glue:
    //   device_type() / queue_max_sizes() / avail_features()
    //   set_acked_features(f)            on FEATURES_OK
    //   read_config(off, buf) / write_config(off, data)
    //   activate(&mem, requestq, eventq, interrupt)   on DRIVER_OK
    //   process_requestq(&mem)           on a requestq notification
    //   process_eventq(&mem)             on an eventq notification, and when
    //                                    dev.fault_eventfd() is readable
    //   reset() / system_reset()

    // An emulated device behind the vIOMMU, endpoint 8: guest memory as the
    // device sees it. Every access is translated and permission-checked, and a
    // refusal becomes a fault record on the event queue.
    let iommu = dev.viommu().endpoint_iommu(8);
    let dma_mem = vm_memory::iommu::IommuMemory::new(guest_mem.clone(), iommu, true, ());
    // Or the faster view, one per device thread (a vm_memory::GuestMemory with
    // an IOTLB of its own), which virtio-queue takes as it is:
    let fast_dma_mem = dev.viommu().dma_memory(8, guest_mem.clone());
    // A device that has read its descriptor chain knows its next buffer:
    // its translation then loads while the device copies this one.
    fast_dma_mem.prefetch(GuestAddress(iova + 4096));

    // Or a per-thread translator with an IOTLB, for address-by-address use:
    let mut t = dev.viommu().translator(8);
    match t.translate(iova, vmm_iommu::ACCESS_READ) {
        Ok((gpa, bytes_left_in_page)) => println!("{iova:#x} -> {gpa:#x} (+{bytes_left_in_page})"),
        Err(refused) => println!("{refused}"), // a fault record is queued
    }

    // Endpoint 8 is attached to nothing and bypass is off: all three refuse,
    // and each refusal is a fault record.
    assert!(dma_mem.read_obj::<u32>(GuestAddress(iova)).is_err());
    assert!(fast_dma_mem.read_obj::<u32>(GuestAddress(iova)).is_err());
    assert_eq!(dev.viommu().faults().len(), 3);
    Ok(())
}

#[test]
#[rustfmt::skip] // the README's layout, line for line
fn readme_nested_router() -> Result {
    use vm_memory::{GuestAddress, GuestMemoryMmap};
    use vmm_iommu::config::IommuConfig;
    use vmm_iommu::VirtioIommu;
    let cfg = IommuConfig::from_json_str(
        r#"{ "nested": { "formats": ["intel-vtd", "arm-smmuv3"], "pasid_bits": 20 } }"#,
    )?;
    let guest_mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 16 << 20)])?;
    let ram = [(0, (16 << 20) - 1)];

    use std::sync::Arc;
    use vmm_iommu::{emulated::EmulatedIommu, FaultQueue, Router, Viommu};

    let faults = Arc::new(FaultQueue::new(cfg.limits.max_pending_faults as usize)?);
    let emu = Arc::new(EmulatedIommu::new(guest_mem.clone(), faults.clone(), 20, &[8]));
    let mut router = Router::new();
    router.add(emu.clone(), &[8]);              // endpoint 8: an emulated device
    // router.add(Arc::new(iommufd_backend), &[16]);   // endpoint 16: assigned
    let viommu = Arc::new(Viommu::with_router(&cfg, &[8, 16], &ram, faults, router));
    let dev = VirtioIommu::with_viommu(viommu);

    // Endpoint 8's DMA with PASID 5 through the guest's own tables:
    let dma_mem = vm_memory::iommu::IommuMemory::new(guest_mem.clone(), emu.endpoint_iommu(8, Some(5)), true, ());

    // The nested extension is offered, and endpoint 8 is bound to no table
    // yet: its DMA is refused.
    let attach_table = 1u64 << vmm_iommu::wire::VIRTIO_IOMMU_F_ATTACH_TABLE;
    assert_ne!(dev.avail_features() & attach_table, 0);
    assert!(dma_mem.read_obj::<u32>(GuestAddress(0x1000)).is_err());
    Ok(())
}

#[test]
#[rustfmt::skip] // the README's layout, line for line
fn readme_memory_changes() -> Result {
    use std::sync::Arc;
    use vm_memory::{GuestAddress, GuestMemoryMmap, GuestRegionMmap};
    use vmm_iommu::{config::IommuConfig, Viommu};
    let guest_mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 16 << 20)])?;
    let viommu = Viommu::new(&IommuConfig::default(), &[8], &[(0, (16 << 20) - 1)])?;
    let dimm = GuestRegionMmap::from_range(GuestAddress(1 << 32), 2 << 20, None)?;
    let (bar_gpa, bar_len, bar_hva) = (0xe000_0000u64, 0x1_0000u64, 0x7f00_0000_0000u64);

    use vmm_iommu::{backend::MmioWindow, RamUpdate};

    // A DIMM plugged at 4 GiB: the VMM maps it, then tells the vIOMMU (and gives
    // `after` to its devices: DmaMemory::set_memory, IommuMemory::new).
    let after = guest_mem.insert_region(Arc::new(dimm))?;
    viommu.add_ram(&RamUpdate { start: 1 << 32, len: 2 << 20, before: &guest_mem, after: &after })?;
    // Unplug: the vIOMMU first (its backends unpin the range), then the VMM unmaps.
    viommu.remove_ram(&RamUpdate { start: 1 << 32, len: 2 << 20, before: &after, after: &guest_mem })?;

    // A VFIO BAR the guest placed, mmapped by the VMM at `bar_hva`; withdrawn
    // before the BAR moves or the mmap goes.
    viommu.add_mmio_window(MmioWindow { gpa: bar_gpa, len: bar_len, hva: Some(bar_hva) })?;
    viommu.remove_mmio_window(bar_gpa, bar_len)?;

    // Both came and went: the memory map is as at boot.
    assert_eq!(viommu.ram(), [(0, (16 << 20) - 1)]);
    assert!(viommu.mmio_windows().is_empty());
    Ok(())
}

#[cfg(feature = "acpi")]
#[test]
#[rustfmt::skip] // the README's layout, line for line
fn readme_viot() -> std::result::Result<(), vmm_iommu::viot::ViotError> {
    use vmm_iommu::viot::{viot_table, AcpiOem, ViotEndpoint, ViotIommu};

    let viot: Vec<u8> = viot_table(
        ViotIommu::Mmio { base: 0xd000_0000 },            // the virtio-iommu's virtio-mmio window
        &[ViotEndpoint::Mmio { endpoint: 8, base: 0xd000_1000 },      // a virtio-mmio device
          ViotEndpoint::PciRange { endpoint_start: 0x100, segment_start: 0, segment_end: 0,
                                   bdf_start: 0x100, bdf_end: 0x1ff }], // PCI bus 1
        &AcpiOem::default(),
    )?;

    assert_eq!(&viot[..4], b"VIOT");
    Ok(())
}

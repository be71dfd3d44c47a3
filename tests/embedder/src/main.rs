//! A VMM's view of vmm-iommu, from the README and the rustdoc only: build
//! the device from the `iommu` config section, negotiate features, activate
//! it with the driver's queues, serve the guest's ATTACH and MAP from the
//! request queue, then translate and do DMA as an emulated device would.
//! It also reads a config file of its own that embeds the `iommu` section,
//! with the library's errors at its paths. Exits non-zero if anything is
//! not as documented.

use std::process::ExitCode;
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::iommu::IommuMemory;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_iommu::config::{self, ConfigError, IommuConfig, ReservedRegion};
use vmm_iommu::testing::DriverQueue;
use vmm_iommu::wire::{
    AttachReq, MapReq, Request, Status, UnmapReq, VIRTIO_IOMMU_MAP_F_READ, VIRTIO_IOMMU_MAP_F_WRITE,
};
use vmm_iommu::VirtioIommu;
use vmm_iommu::{FaultReason, ACCESS_READ, ACCESS_WRITE};
use vmm_iommu::{VirtioInterrupt, VIRTIO_RING_F_EVENT_IDX};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

const EP: u32 = 8;
const RAM: u64 = 32 << 20;
const IOVA: u64 = 0x7000_0000;
const GPA: u64 = 0x40_0000;

/// The guest polls, so interrupts go nowhere.
struct NoIrq;

impl VirtioInterrupt for NoIrq {
    fn trigger(&self, _queue: u16) -> std::io::Result<()> {
        Ok(())
    }
}

/// The device-side queue from the addresses the driver wrote.
fn queue(max: u16, size: u16, desc: u64, avail: u64, used: u64) -> Result<Queue> {
    let mut q = Queue::new(max)?;
    q.set_size(size);
    q.set_desc_table_address(Some(desc as u32), Some((desc >> 32) as u32));
    q.set_avail_ring_address(Some(avail as u32), Some((avail >> 32) as u32));
    q.set_used_ring_address(Some(used as u32), Some((used >> 32) as u32));
    q.set_ready(true);
    Ok(q)
}

fn check(ok: bool, what: &str) -> Result<()> {
    if ok {
        println!("ok: {what}");
        Ok(())
    } else {
        Err(format!("not as documented: {what}").into())
    }
}

/// The VMM's own config file, which embeds the library's `iommu` section
/// (the `config` module's rustdoc): its own fields beside it, devices with
/// reserved regions of their own, and the library's errors at its paths.
#[derive(serde::Deserialize)]
#[serde(remote = "Self", deny_unknown_fields)]
struct VmFile {
    vcpus: u8,
    #[serde(default)]
    iommu: IommuConfig,
    #[serde(default)]
    disks: Vec<Disk>,
}

#[derive(serde::Deserialize)]
#[serde(remote = "Self", deny_unknown_fields)]
struct Disk {
    endpoint: u32,
    bus: Bus,
    #[serde(default)]
    reserved_regions: Vec<ReservedRegion>,
}

#[derive(Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(remote = "Self", rename_all = "kebab-case")]
enum Bus {
    VirtioMmio,
    VirtioPci,
}

config::deserialize_from_object_only!(VmFile, Disk);
config::deserialize_from_string_only!(Bus => "a bus: \"virtio-mmio\" or \"virtio-pci\"");

fn load_vm_file(text: &str) -> std::result::Result<VmFile, ConfigError> {
    let vm: VmFile = config::parse_json(text, "")?;
    vm.iommu.validate_at("iommu")?;
    for (i, d) in vm.disks.iter().enumerate() {
        let at = format!("disks[{i}].reserved_regions");
        vm.iommu
            .validate_endpoint_regions_at("iommu", &d.reserved_regions, &at)?;
    }
    Ok(vm)
}

fn own_config_file() -> Result<()> {
    let vm = load_vm_file(
        r#"{ "vcpus": 2,
             "iommu": { "reserved_regions": [ { "start": "0xfee00000", "end": "0xfeefffff", "kind": "msi" } ] },
             "disks": [ { "endpoint": 8, "bus": "virtio-pci",
                          "reserved_regions": [ { "start": "0x8000000", "end": "0x80fffff", "kind": "reserved" } ] } ] }"#,
    )?;
    check(
        vm.vcpus == 2 && vm.iommu.reserved_regions.len() == 1,
        "the VMM's own config file embeds the iommu section",
    )?;
    check(
        vm.disks[0].endpoint == 8
            && vm.disks[0].bus == Bus::VirtioPci
            && vm.disks[0].reserved_regions.len() == 1,
        "its own devices, with reserved regions of their own",
    )?;
    let err = |text: &str| load_vm_file(text).err().map(|e| e.to_string());
    check(
        err(r#"{ "vcpus": 1, "iommu": { "domain_range": { "start": 9, "end": 1 } } }"#).as_deref()
            == Some("iommu.domain_range: start 9 is above end 1"),
        "an iommu rule broken in it is refused at its path",
    )?;
    check(
        err(r#"{ "vcpus": 1, "disks": [ { "endpoint": 8, "bus": { "virtio-pci": null } } ] }"#)
            .as_deref()
            == Some(
                "disks[0].bus: invalid type: map, expected a bus: \"virtio-mmio\" or \"virtio-pci\"",
            ),
        "its own names take a string only",
    )?;
    check(
        err(r#"{ "vcpus": 1, "disks": [ [8, "virtio-pci"] ] }"#).as_deref()
            == Some("disks[0]: invalid type: sequence, expected a JSON object"),
        "its own structs take an object only",
    )?;
    check(
        err(r#"{ "vcpus": 1,
                 "iommu": { "reserved_regions": [ { "start": "0x1000", "end": "0x1fff", "kind": "msi" } ] },
                 "disks": [ { "endpoint": 8, "bus": "virtio-mmio",
                              "reserved_regions": [ { "start": "0x1800", "end": "0x2fff", "kind": "reserved" } ] } ] }"#)
        .as_deref()
            == Some("disks[0].reserved_regions[0]: 0x1800..=0x2fff overlaps iommu.reserved_regions[0] 0x1000..=0x1fff"),
        "a device's region over the section's is refused at its path",
    )
}

fn run() -> Result<()> {
    own_config_file()?;
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), RAM as usize)])?;
    let cfg = IommuConfig::from_json_str(
        r#"{
            "page_size_mask": ["4K", "2M", "1G"],
            "input_range": { "start": "0x0", "end": "0xffffffffffff" },
            "reserved_regions": [ { "start": "0xfee00000", "end": "0xfeefffff", "kind": "msi" } ]
        }"#,
    )?;
    let bad =
        IommuConfig::from_json_str(r#"{ "input_range": { "start": "0x2000", "end": "0x1000" } }"#);
    check(
        bad.is_err_and(|e| e.to_string().starts_with("iommu.input_range")),
        "a bad config is refused with its JSON path",
    )?;

    let mut dev = VirtioIommu::new(&cfg, &[EP], &[(0, RAM - 1)])?;
    check(dev.device_type() == 23, "device type 23")?;
    dev.set_acked_features(dev.avail_features() & !(1 << VIRTIO_RING_F_EVENT_IDX));

    // The driver's queues (the guest's side, played by DriverQueue).
    let mut requestq = DriverQueue::new(&mem, GuestAddress(0x1_0000), 32);
    let eventq = DriverQueue::new(&mem, GuestAddress(0x2_0000), 8);
    let [max_req, max_evt] = dev.queue_max_sizes();
    let regs = |q: &DriverQueue| {
        let d = q.device_queue();
        (d.size(), d.desc_table(), d.avail_ring(), d.used_ring())
    };
    let (s, d, a, u) = regs(&requestq);
    let rq = queue(max_req, s, d, a, u)?;
    let (s, d, a, u) = regs(&eventq);
    let eq = queue(max_evt, s, d, a, u)?;
    dev.activate(&mem, rq, eq, Arc::new(NoIrq))?;
    check(dev.is_activated(), "activated")?;

    // The guest's requests, served on the request-queue notification.
    let mut send = |dev: &mut VirtioIommu, req: Request| -> Result<Status> {
        let bytes = req.encode();
        mem.write_slice(&bytes, GuestAddress(0x3000))?;
        requestq.add_chain(
            &mem,
            &[
                (GuestAddress(0x3000), bytes.len() as u32, false),
                (GuestAddress(0x3100), 4, true),
            ],
        );
        requestq.kick(&mem);
        dev.process_requestq(&mem)?;
        requestq.pop_used(&mem).ok_or("no used entry")?;
        let s: u8 = mem.read_obj(GuestAddress(0x3100))?;
        Ok(Status::from_u8(s).ok_or("bad status")?)
    };
    let attach = Request::Attach(AttachReq {
        domain: 3,
        endpoint: EP,
        ..Default::default()
    });
    check(send(&mut dev, attach)? == Status::Ok, "ATTACH")?;
    let map = Request::Map(MapReq {
        domain: 3,
        virt_start: IOVA,
        virt_end: IOVA + 0x1f_ffff,
        phys_start: GPA,
        flags: VIRTIO_IOMMU_MAP_F_READ | VIRTIO_IOMMU_MAP_F_WRITE,
    });
    check(send(&mut dev, map)? == Status::Ok, "MAP 2 MiB")?;
    let msi = Request::Map(MapReq {
        domain: 3,
        virt_start: 0xfee0_0000,
        virt_end: 0xfee0_0fff,
        phys_start: GPA,
        flags: VIRTIO_IOMMU_MAP_F_READ,
    });
    check(
        send(&mut dev, msi)? == Status::Range,
        "MAP over the reserved MSI region is RANGE",
    )?;

    // Translation, three ways.
    let viommu = Arc::clone(dev.viommu());
    let mut t = viommu.translator(EP);
    check(
        t.translate(IOVA + 0x1234, ACCESS_WRITE)? == (GPA + 0x1234, 0x1000 - 0x234),
        "Translator: IOVA -> GPA and bytes left in the page",
    )?;
    let dma = viommu.dma_memory(EP, mem.clone());
    dma.write_obj(0x1122_3344_5566_7788u64, GuestAddress(IOVA + 0x10_0000))?;
    check(
        mem.read_obj::<u64>(GuestAddress(GPA + 0x10_0000))? == 0x1122_3344_5566_7788,
        "DmaMemory: a write lands at the mapped GPA",
    )?;
    let iommu_mem = IommuMemory::new(mem.clone(), viommu.endpoint_iommu(EP), true, ());
    check(
        iommu_mem.read_obj::<u64>(GuestAddress(IOVA + 0x10_0000))? == 0x1122_3344_5566_7788,
        "IommuMemory: the same bytes by IOVA",
    )?;

    // UNMAP revokes every view; the refusal is a fault record.
    let unmap = Request::Unmap(UnmapReq {
        domain: 3,
        virt_start: IOVA,
        virt_end: IOVA + 0x1f_ffff,
        ..Default::default()
    });
    check(send(&mut dev, unmap)? == Status::Ok, "UNMAP")?;
    check(
        t.translate(IOVA, ACCESS_READ).map_err(|e| e.reason) == Err(FaultReason::Mapping),
        "Translator refuses after UNMAP",
    )?;
    check(
        dma.read_obj::<u64>(GuestAddress(IOVA + 0x10_0000)).is_err()
            && iommu_mem
                .read_obj::<u64>(GuestAddress(IOVA + 0x10_0000))
                .is_err(),
        "DmaMemory and IommuMemory refuse after UNMAP",
    )?;
    check(viommu.faults().len() == 3, "three fault records queued")?;
    check(
        dev.fault_eventfd().read().is_ok(),
        "the fault eventfd is readable",
    )?;
    Ok(())
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => {
            println!("embedder: all checks passed");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("embedder: {e}");
            ExitCode::FAILURE
        }
    }
}

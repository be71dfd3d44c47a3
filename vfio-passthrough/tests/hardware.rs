//! The real backends against a real device, gated on
//! `VMM_IOMMU_VFIO_DEVICE=<PCI address or sysfs path>` of a device bound to
//! vfio-pci (run by `scripts/vfio-smoke.sh`). Without it, the test prints a
//! loud SKIPPED line and passes; with it, every step must work, and what
//! the host cannot do (no type1, no iommufd, no nesting) is skipped with a
//! line saying why.

use std::path::Path;
use std::sync::Arc;

use vfio_passthrough::host::{sysfs_path, HostIommu};
use vfio_passthrough::sys::VfioHost;
use vfio_passthrough::{GuestRam, IommufdBackend, Type1Backend};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_iommu::backend::{DomainView, IommuBackend, TableBinding};
use vmm_iommu::invalidation::{Caches, Invalidation, Scope, VaRange};
use vmm_iommu::wire::{
    TableDesc, VIRTIO_IOMMU_MAP_F_READ, VIRTIO_IOMMU_MAP_F_WRITE, VIRTIO_IOMMU_PSTF_ARM_SMMU_V3,
    VIRTIO_IOMMU_PSTF_INTEL_VTD,
};
use vmm_iommu::Mapping;

const ENV: &str = "VMM_IOMMU_VFIO_DEVICE";
const EP: u32 = 1;

/// Writes to the stderr handle itself: libtest captures `eprintln!` of a
/// passing test, and a skip must be seen.
fn skipped(what: &str, why: &str) {
    use std::io::Write;
    let _ = writeln!(
        std::io::stderr(),
        "\n********** SKIPPED {what}: {why} **********\n"
    );
}

fn ram() -> (GuestMemoryMmap, GuestRam) {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 64 << 20)]).expect("guest memory");
    let ram = GuestRam::new(mem.clone()).expect("regions");
    (mem, ram)
}

fn mapping() -> Mapping {
    Mapping {
        start: 0x10_0000,
        end: 0x2f_ffff,
        phys: 0x20_0000,
        flags: VIRTIO_IOMMU_MAP_F_READ | VIRTIO_IOMMU_MAP_F_WRITE,
    }
}

fn map_unmap(b: &dyn IommuBackend) {
    let m = mapping();
    b.attach(
        EP,
        &DomainView {
            id: 1,
            bypass: false,
            mappings: &[],
            table: None,
        },
    )
    .expect("attach MAP domain");
    b.map(1, &m).expect("map");
    b.unmap(1, &[m]).expect("unmap");
    b.map(1, &m).expect("map again");
    b.detach(EP, 1).expect("detach (unmaps)");
    b.attach(
        EP,
        &DomainView {
            id: 2,
            bypass: true,
            mappings: &[],
            table: None,
        },
    )
    .expect("attach bypass domain");
    b.detach(EP, 2).expect("detach bypass");
    eprintln!("{}: attach, map, unmap, detach, bypass: ok", b.name());
}

fn nested(b: &IommufdBackend, mem: &GuestMemoryMmap) {
    let caps = b.caps(EP);
    let page = |pasid| Invalidation {
        caches: Caches::IOTLB,
        scope: Scope::Range(VaRange {
            pasid,
            addr: 0x1000,
            granule_log2: 12,
            pages: 16,
            leaf_only: true,
        }),
        archid: None,
    };
    let table = if caps.table_formats.contains(&VIRTIO_IOMMU_PSTF_INTEL_VTD) {
        // PASID directory at 1 MiB -> table at 1 MiB + 4 KiB; PASID 0 first
        // stage only with an empty 4-level root at 2 MiB.
        mem.write_obj(0x10_1000u64 | 1, GuestAddress(0x10_0000))
            .expect("dir");
        let mut e = [0u8; 64];
        e[0..8].copy_from_slice(&(1u64 | 1 << 6).to_le_bytes());
        e[16..24].copy_from_slice(&0x20_0000u64.to_le_bytes());
        mem.write_slice(&e, GuestAddress(0x10_1000)).expect("entry");
        TableDesc::IntelVtd {
            pasid_bits: 0,
            pasid_dir_ptr: 0x10_0000,
        }
    } else if caps.table_formats.contains(&VIRTIO_IOMMU_PSTF_ARM_SMMU_V3) {
        // One (invalid, V=0) CD at 1 MiB: DMA faults, which is fine here.
        TableDesc::ArmSmmuV3 {
            s1fmt: 0,
            s1dss: 0,
            s1contextptr: 0x10_0000,
            s1cdmax: 0,
        }
    } else {
        skipped(
            "nested mode",
            "the host IOMMU offers no nesting for this device (see scripts/check-host.sh)",
        );
        return;
    };
    b.bind_table(EP, &TableBinding { domain: 3, table })
        .expect("bind_table");
    b.invalidate(3, &[page(None)]).expect("IOTLB invalidation");
    let all = Invalidation {
        caches: Caches::ALL,
        scope: Scope::Domain,
        archid: None,
    };
    b.invalidate(3, &[all]).expect("domain invalidation");
    b.unbind_table(EP, 3).expect("unbind_table");
    eprintln!("iommufd: nested bind, invalidate, unbind: ok");
}

#[test]
fn real_backends_on_an_assigned_device() {
    let Ok(spec) = std::env::var(ENV) else {
        skipped(
            "real VFIO backends",
            &format!(
                "{ENV} is not set (a PCI address or sysfs path of a device bound to vfio-pci)"
            ),
        );
        return;
    };
    let path = sysfs_path(&spec).expect("device spec");
    assert!(path.exists(), "{} does not exist", path.display());

    if Path::new("/dev/vfio/vfio").exists() {
        let (_mem, ram) = ram();
        let host: Arc<dyn HostIommu> = Arc::new(VfioHost::new());
        let b = Type1Backend::new(host, ram);
        b.add_endpoint(EP, &path)
            .expect("open the device in a type1 container");
        eprintln!("type1 caps: {:?}", b.caps(EP));
        map_unmap(&b);
        b.remove_endpoint(EP).expect("remove");
    } else {
        skipped(
            "type1",
            "/dev/vfio/vfio is missing (modprobe vfio_iommu_type1)",
        );
    }

    if !Path::new("/dev/iommu").exists() {
        skipped(
            "iommufd",
            "/dev/iommu is missing (CONFIG_IOMMUFD, modprobe iommufd)",
        );
        return;
    }
    if !path.join("vfio-dev").exists() {
        skipped(
            "iommufd",
            "the device has no VFIO cdev (CONFIG_VFIO_DEVICE_CDEV)",
        );
        return;
    }
    let (mem, ram) = ram();
    let host: Arc<dyn HostIommu> = Arc::new(VfioHost::new());
    let b = IommufdBackend::new(host, ram).expect("iommufd with guest RAM in an IOAS");
    b.add_endpoint(EP, &path).expect("bind the cdev to iommufd");
    eprintln!("iommufd caps: {:?}", b.caps(EP));
    map_unmap(&b);
    nested(&b, &mem);
    b.remove_endpoint(EP).expect("remove");
}

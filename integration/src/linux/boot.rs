//! Loading Linux: the bzImage's protected-mode kernel at 1 MiB (linux-loader),
//! the initramfs at the top of RAM, the command line, and the zero page
//! (`boot_params`) with the setup header, the e820 map and the RSDP
//! address, as the x86 boot protocol describes them.

use std::fs::File;
use std::path::Path;

use linux_loader::cmdline::Cmdline;
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::bzimage::BzImage;
use linux_loader::loader::{load_cmdline, KernelLoader};
use vm_memory::{Bytes, GuestAddress, GuestMemoryError, GuestMemoryMmap};

use super::layout;

/// e820 type of usable RAM.
const E820_RAM: u32 = 1;
/// e820 type of reserved memory.
const E820_RESERVED: u32 = 2;
/// `setup_header.boot_flag`.
const BOOT_FLAG: u16 = 0xaa55;
/// `setup_header.header`: "HdrS".
const HDRS: u32 = 0x5372_6448;
/// `type_of_loader`: undefined loader, as VMMs report themselves.
const LOADER_UNDEFINED: u8 = 0xff;
/// `vid_mode`: "normal".
const VID_MODE_NORMAL: u16 = 0xffff;
/// The 64-bit entry point's offset from the loaded protected-mode kernel.
const STARTUP_64_OFFSET: u64 = 0x200;
/// `xloadflags`: XLF_KERNEL_64, the kernel has the 64-bit entry point.
const XLF_KERNEL_64: u16 = 1 << 0;

/// An error loading the guest's kernel, initramfs or command line.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// A file cannot be opened or read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The kernel image is not a bzImage linux-loader can load.
    #[error("cannot load the kernel {path}: {source}")]
    Kernel {
        /// The file.
        path: String,
        /// linux-loader's error.
        #[source]
        source: linux_loader::loader::Error,
    },
    /// The kernel has no 64-bit entry point.
    #[error("the kernel {0} has no 64-bit entry point (XLF_KERNEL_64 clear)")]
    Not64Bit(String),
    /// The initramfs does not fit in RAM above the kernel.
    #[error("the initramfs ({size} bytes) does not fit in guest RAM above the kernel (which ends at {kernel_end:#x})")]
    InitrdTooBig {
        /// Its size.
        size: u64,
        /// Where the kernel ends.
        kernel_end: u64,
    },
    /// The command line is invalid or too long.
    #[error("bad kernel command line: {0}")]
    Cmdline(String),
    /// Guest memory refused a write.
    #[error("cannot write the boot parameters: {0}")]
    Memory(#[from] GuestMemoryError),
}

/// What to boot.
#[derive(Clone, Debug)]
pub struct BootImages<'a> {
    /// The bzImage.
    pub kernel: &'a Path,
    /// The initramfs, if any.
    pub initrd: Option<&'a Path>,
    /// The whole kernel command line.
    pub cmdline: &'a str,
}

/// Where things landed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Loaded {
    /// The 64-bit entry point.
    pub entry: u64,
    /// The initramfs's address and size, if any.
    pub initrd: Option<(u64, u64)>,
}

/// The e820 map of a guest with RAM `[0, ram_end)`: low RAM up to the EBDA,
/// the BIOS area reserved (the ACPI tables live there), RAM from 1 MiB.
pub fn e820_map(ram_end: u64) -> [boot_e820_entry; 3] {
    [
        boot_e820_entry {
            addr: 0,
            size: layout::EBDA_START,
            r#type: E820_RAM,
        },
        boot_e820_entry {
            addr: layout::EBDA_START,
            size: layout::KERNEL_START - layout::EBDA_START,
            r#type: E820_RESERVED,
        },
        boot_e820_entry {
            addr: layout::KERNEL_START,
            size: ram_end - layout::KERNEL_START,
            r#type: E820_RAM,
        },
    ]
}

/// Loads the kernel, the initramfs and the command line into `mem` (RAM
/// `[0, ram_end)`) and writes the zero page; `rsdp` is the ACPI RSDP's
/// address.
pub fn load(
    mem: &GuestMemoryMmap,
    ram_end: u64,
    images: &BootImages<'_>,
    rsdp: u64,
) -> Result<Loaded, BootError> {
    let kpath = images.kernel.display().to_string();
    let mut kernel = File::open(images.kernel).map_err(|source| BootError::Io {
        path: kpath.clone(),
        source,
    })?;
    let kr = BzImage::load(
        mem,
        Some(GuestAddress(layout::KERNEL_START)),
        &mut kernel,
        Some(GuestAddress(layout::KERNEL_START)),
    )
    .map_err(|source| BootError::Kernel {
        path: kpath.clone(),
        source,
    })?;
    let mut hdr = kr
        .setup_header
        .ok_or_else(|| BootError::Not64Bit(kpath.clone()))?;
    if hdr.xloadflags & XLF_KERNEL_64 == 0 {
        return Err(BootError::Not64Bit(kpath));
    }

    let mut cmdline =
        Cmdline::new(layout::CMDLINE_MAX).map_err(|e| BootError::Cmdline(e.to_string()))?;
    cmdline
        .insert_str(images.cmdline)
        .map_err(|e| BootError::Cmdline(e.to_string()))?;
    load_cmdline(mem, GuestAddress(layout::CMDLINE), &cmdline)
        .map_err(|e| BootError::Cmdline(e.to_string()))?;

    let initrd = match images.initrd {
        None => None,
        Some(p) => Some(load_initrd(
            mem,
            ram_end,
            kr.kernel_end,
            hdr.initrd_addr_max,
            p,
        )?),
    };

    hdr.type_of_loader = LOADER_UNDEFINED;
    hdr.boot_flag = BOOT_FLAG;
    hdr.header = HDRS;
    hdr.vid_mode = VID_MODE_NORMAL;
    hdr.cmd_line_ptr = layout::CMDLINE as u32;
    hdr.cmdline_size = images.cmdline.len() as u32;
    if let Some((addr, size)) = initrd {
        // Both fit u32: the initramfs lies below the MMIO gap.
        hdr.ramdisk_image = addr as u32;
        hdr.ramdisk_size = size as u32;
    }

    let mut params = boot_params {
        hdr,
        acpi_rsdp_addr: rsdp,
        ..Default::default()
    };
    let map = e820_map(ram_end);
    params.e820_table[..map.len()].copy_from_slice(&map);
    params.e820_entries = map.len() as u8;
    mem.write_obj(params, GuestAddress(layout::ZERO_PAGE))?;

    Ok(Loaded {
        entry: kr.kernel_load.0 + STARTUP_64_OFFSET,
        initrd,
    })
}

/// Puts the initramfs at the top of RAM (below the kernel's
/// `initrd_addr_max`), page-aligned, above the kernel.
fn load_initrd(
    mem: &GuestMemoryMmap,
    ram_end: u64,
    kernel_end: u64,
    initrd_addr_max: u32,
    path: &Path,
) -> Result<(u64, u64), BootError> {
    let io = |source| BootError::Io {
        path: path.display().to_string(),
        source,
    };
    let data = std::fs::read(path).map_err(io)?;
    let size = data.len() as u64;
    let top = ram_end.min(u64::from(initrd_addr_max) + 1);
    let too_big = BootError::InitrdTooBig { size, kernel_end };
    let addr = top.checked_sub(size).ok_or(too_big)? & !0xfff;
    if addr < kernel_end {
        return Err(BootError::InitrdTooBig { size, kernel_end });
    }
    mem.write_slice(&data, GuestAddress(addr))?;
    Ok((addr, size))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e820_map_leaves_the_bios_area_out_of_ram() {
        // The entries are packed: copy the fields out before comparing.
        let m: Vec<(u64, u64, u32)> = e820_map(512 << 20)
            .iter()
            .map(|e| (e.addr, e.size, e.r#type))
            .collect();
        assert_eq!(m[0], (0, 0x9fc00, E820_RAM));
        assert_eq!(m[1].2, E820_RESERVED);
        assert!(m[1].0 <= layout::ACPI_BASE && layout::ACPI_END <= m[1].0 + m[1].1);
        assert_eq!(m[2].0 + m[2].1, 512 << 20);
    }

    #[test]
    fn initrd_goes_to_the_top_of_ram_page_aligned() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
        let dir = std::env::temp_dir().join(format!("linux-boot-test-{}", std::process::id()));
        std::fs::write(&dir, vec![0x5a; 5000]).unwrap();
        let (addr, size) = load_initrd(&mem, 16 << 20, 2 << 20, u32::MAX, &dir).unwrap();
        assert_eq!(size, 5000);
        assert_eq!(addr % 0x1000, 0);
        assert!(addr + size <= 16 << 20 && addr + size > (16 << 20) - 0x2000);
        let b: u8 = mem.read_obj(GuestAddress(addr + 4999)).unwrap();
        assert_eq!(b, 0x5a);
        // Not above the kernel: refused, not overlapped.
        let e = load_initrd(&mem, 16 << 20, 16 << 20, u32::MAX, &dir).unwrap_err();
        assert!(matches!(e, BootError::InitrdTooBig { .. }));
        std::fs::remove_file(&dir).unwrap();
    }

    #[test]
    fn a_file_that_is_not_a_bzimage_is_an_error() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
        let p = std::env::temp_dir().join(format!("linux-boot-notbz-{}", std::process::id()));
        std::fs::write(&p, vec![0u8; 8192]).unwrap();
        let images = BootImages {
            kernel: &p,
            initrd: None,
            cmdline: "console=ttyS0",
        };
        let e = load(&mem, 16 << 20, &images, 0xe0000).unwrap_err();
        assert!(matches!(e, BootError::Kernel { .. }), "{e}");
        std::fs::remove_file(&p).unwrap();
    }
}

//! The demo: loads a VM config, builds the virtio-iommu device behind it,
//! plays a scripted driver session through a real virtqueue in guest
//! memory, runs DMA from the config's emulated devices through the vIOMMU,
//! and prints what happened, request by request.
//!
//! Usage: `viommu-vm [CONFIG.json]` (default `resources/vm.json`).

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use integration::demo::{run_demo, DemoReport};
use vmm_iommu::config::VmConfig;

fn main() -> Result<()> {
    let path = std::env::args_os()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("resources/vm.json"));
    let cfg = VmConfig::from_file(&path).with_context(|| format!("config {}", path.display()))?;
    println!("config: {}", path.display());
    let mut out = std::io::stdout().lock();
    let report: DemoReport = run_demo(&cfg, &mut out)?;
    if report.failed > 0 {
        bail!("{} of {} demo checks failed", report.failed, report.checks);
    }
    Ok(())
}

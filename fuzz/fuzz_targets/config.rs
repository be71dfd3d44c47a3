//! The VM config parser (issue 11): any bytes are either an error that
//! names what is wrong, or a config that validates, that an embedder can
//! build a device from, and whose `iommu` section parses alone to the same
//! value. Never a panic. The whole file is the test VMM's
//! (`integration::config`), its `iommu` section the library's.

#![no_main]

use integration::config::VmConfig;
use libfuzzer_sys::fuzz_target;
use vmm_iommu::config::IommuConfig;
use vmm_iommu::VirtioIommu;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match VmConfig::from_json_str(text) {
        Err(e) => assert!(!e.to_string().is_empty(), "an error says what is wrong"),
        Ok(cfg) => {
            assert!(cfg.validate().is_ok(), "a parsed config validates");
            let eps = cfg.endpoints();
            assert!(
                eps.windows(2).all(|w| w[0] < w[1]),
                "endpoints sorted, once"
            );
            let ram_end = (cfg.memory.size_mib << 20) - 1;
            let dev = VirtioIommu::new(&cfg.iommu, &eps, &[(0, ram_end)]);
            assert!(
                dev.is_ok(),
                "a valid config builds a device: {:?}",
                dev.err()
            );
        }
    }
    // The iommu section alone: same contract.
    match IommuConfig::from_json_str(text) {
        Err(e) => assert!(!e.to_string().is_empty()),
        Ok(c) => {
            assert!(c.validate().is_ok());
            assert!(c.granule().is_power_of_two() && c.granule() >= 4096);
        }
    }
});

//! Whether this host can run guests, and the one place where tests that
//! need `/dev/kvm` decide to skip.
//!
//! A test on a host without KVM prints a loud `SKIPPED` line and passes,
//! unless `VMM_IOMMU_REQUIRE_KVM=1` is set (as `.ci/run` does wherever
//! `/dev/kvm` exists): then a missing or unusable KVM fails the test.

use std::io::Write;

use kvm_ioctls::{Cap, Kvm};

use crate::vm::FastPaths;

/// Set to `1` to make tests fail, not skip, without KVM.
pub const REQUIRE_KVM_ENV: &str = "VMM_IOMMU_REQUIRE_KVM";

/// `Ok` if `/dev/kvm` opens and speaks the stable API; otherwise why not.
pub fn kvm_available() -> Result<(), String> {
    let kvm = Kvm::new().map_err(|e| format!("/dev/kvm not available: {e}"))?;
    // KVM_API_VERSION has been 12 since Linux 2.6.22.
    match kvm.get_api_version() {
        12 => Ok(()),
        v if v < 0 => Err("/dev/kvm does not answer KVM_GET_API_VERSION".into()),
        v => Err(format!("/dev/kvm speaks API version {v}, not 12")),
    }
}

/// The fast paths this host's KVM offers: ioeventfds
/// (`KVM_CAP_IOEVENTFD`), and an in-kernel irqchip with irqfds
/// (`KVM_CAP_IRQCHIP`, `KVM_CAP_IRQFD`). Neither without `/dev/kvm`.
pub fn fast_paths_offered() -> FastPaths {
    let Ok(kvm) = Kvm::new() else {
        return FastPaths::NONE;
    };
    FastPaths {
        ioeventfd: kvm.check_extension(Cap::Ioeventfd),
        irqfd: kvm.check_extension(Cap::Irqchip) && kvm.check_extension(Cap::Irqfd),
    }
}

/// Whether `REQUIRE_KVM_ENV` asks for KVM.
pub fn kvm_required() -> bool {
    std::env::var(REQUIRE_KVM_ENV).is_ok_and(|v| v == "1")
}

/// For tests: `true` if KVM is usable. Otherwise prints
/// `SKIPPED: /dev/kvm not available` straight to stderr (past the test
/// harness's capture) and returns `false` — or, when
/// `VMM_IOMMU_REQUIRE_KVM=1`, panics so that the test fails.
pub fn kvm_or_skip(test: &str) -> bool {
    let Err(why) = kvm_available() else {
        return true;
    };
    if kvm_required() {
        panic!("{test}: {REQUIRE_KVM_ENV}=1 but KVM is unusable: {why}");
    }
    let _ = writeln!(
        std::io::stderr().lock(),
        "SKIPPED: /dev/kvm not available ({test}: {why})"
    );
    false
}

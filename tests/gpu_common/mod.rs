//! The GPU test files' common gate: run on a CUDA device, skip (visibly) without one.

use rln_engine::backend::cuda;

/// True when a CUDA device is usable. Without one, says once on stderr that the tests
/// of `file` are skipped (print! would be captured by the harness), unless
/// RLN_REQUIRE_GPU=1 demands a device: then it fails.
pub fn gpu_present(file: &str) -> bool {
    if cuda::available() {
        return true;
    }
    assert!(
        std::env::var("RLN_REQUIRE_GPU").map_or(true, |v| v != "1"),
        "RLN_REQUIRE_GPU=1 but no CUDA device is available"
    );
    static SKIP_NOTICE: std::sync::Once = std::sync::Once::new();
    SKIP_NOTICE.call_once(|| {
        use std::io::Write;
        let _ = writeln!(
            std::io::stderr(),
            "{file}: no CUDA device, every test here is skipped (passes)"
        );
    });
    false
}

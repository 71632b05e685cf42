//! The GPU test files' common gate. Their tests are `#[ignore]`d (reported as ignored
//! without a GPU); when run on purpose (`--include-ignored`), a missing device fails.

use rln_engine::backend::cuda;

/// True when a CUDA device is usable; fails the test otherwise: the GPU tests run only
/// when asked for (`--include-ignored`), and then "no device" is an error, not a pass.
pub fn gpu_present(file: &str) -> bool {
    assert!(
        cuda::available(),
        "{file}: no usable CUDA device; these tests are #[ignore]d for machines without one \
         (run them on a GPU with --include-ignored, as tools/gpu-check.sh does)"
    );
    true
}

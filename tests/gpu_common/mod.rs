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

/// The inputs of the launch-trace baselines (src/backend/cuda/trace_tests.rs: same
/// shapes, seeds and distribution).
#[allow(dead_code)]
pub fn trace_input(shape: rln_engine::tensor::Shape, seed: u64) -> rln_engine::tensor::Tensor<f32> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    rln_engine::tensor::Tensor::from_vec(shape, (0..shape.len()).map(|_| rng.random_range(0.0f32..1.0)).collect())
        .unwrap()
}

/// The launch lines of a baseline in tests/data/launch-trace/, each cut to its first
/// `fields` fields (all when None).
#[allow(dead_code)]
pub fn trace_baseline(file: &str, fields: Option<usize>) -> Vec<String> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/launch-trace")
        .join(file);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    text.lines()
        .filter_map(|l| l.strip_prefix("launch "))
        .map(|l| trace_cut(l, fields))
        .collect()
}

#[allow(dead_code)]
pub fn trace_cut(line: &str, fields: Option<usize>) -> String {
    match fields {
        Some(k) => line.split(' ').take(k).collect::<Vec<_>>().join(" "),
        None => line.to_string(),
    }
}

/// The device's launches equal the emulated baseline's, line by line.
#[allow(dead_code)]
pub fn trace_compare(what: &str, got: &[String], want: &[String]) {
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert_eq!(g, w, "{what}: launch {} differs from the emulated baseline", i + 1);
    }
    assert_eq!(got.len(), want.len(), "{what}: number of launches");
    println!("{what}: {} launches as in the baseline", got.len());
}

//! RL throughput on 64×256×256 (ignored by default; run it in a release build):
//!
//!     cargo test --release --test imaging_bench -- --ignored --nocapture
//!
//! and the scikit-image peer on the same volume and PSF:
//!
//!     python3 tools/imaging/rl_peer_bench.py

#[test]
#[ignore = "benchmark: run with --release --ignored"]
fn rl_throughput_64x256x256() {
    let iters: usize = std::env::var("RL_BENCH_ITERS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    let t = rln_engine::imaging::rl::measure_throughput(iters).unwrap();
    println!("{}", serde_json::to_string(&t).unwrap());
    assert!(t.voxel_iterations_per_s > 0.0);
}

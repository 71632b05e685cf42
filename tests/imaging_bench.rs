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

/// Times the forward and inverse 3D FFTs RL uses (`forward_mul`, `inverse_planes`) on
/// the grid of the throughput measurement.
#[test]
#[ignore = "benchmark: run with --release --ignored"]
fn fft_96x288x288() {
    use rln_engine::imaging::fft::Fft3;
    use rustfft::num_complex::Complex32;
    let f = Fft3::new([96, 288, 288]);
    let mut x: Vec<f32> = (0..f.real_len()).map(|i| (i % 97) as f32).collect();
    let mut spec = vec![Complex32::default(); f.spectrum_len()];
    let mut scr = spec.clone();
    f.forward(&mut x, &mut spec, &mut scr);
    let n = 5;
    let t = std::time::Instant::now();
    for _ in 0..n {
        f.forward_mul(&x, None, None, &mut spec, &mut scr);
    }
    let tf = t.elapsed().as_secs_f64() / n as f64;
    let t = std::time::Instant::now();
    for _ in 0..n {
        f.inverse_planes(&mut spec, &mut scr, &mut x, 0..96, |_, d, r| d.copy_from_slice(r));
    }
    let ti = t.elapsed().as_secs_f64() / n as f64;
    println!(
        "forward {:.1} ms, inverse {:.1} ms ({} threads)",
        tf * 1e3,
        ti * 1e3,
        rayon::current_num_threads()
    );
}

//! The CUDA backend against the CPU reference: every kernel against its CPU twin, the
//! whole forward pass (f32, f16, f16 on tensor cores) on fresh random weights and inputs
//! of several sizes (odd ones, batch > 1, sizes that are not tile multiples), the
//! conformance vectors' inference keys, streaming, determinism and out-of-memory.
//! Every test is `#[ignore]`d, so that without a GPU the runner reports them as ignored
//! (not passed); run them with `-- --include-ignored` (tools/gpu-check.sh does): then a
//! missing device or missing reference files fail.
//!
//! Run with `--nocapture --test-threads=1` to see every error next to its tolerance.
//! RLN_GPU_TEST_QUICK=1 keeps only the smallest sizes (for compute-sanitizer runs).
//! The conformance test reads the reference files from $RLN_REFERENCE_DIR, else
//! ../shared/reference next to the crate, else shared/reference.
mod gpu_common;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rln_engine::backend::cpu::CpuBackend;
use rln_engine::backend::cuda::launch::{conv_kernel, Epi, CONV_KERNELS};
use rln_engine::backend::cuda::{
    random_dual_model, random_model, twin, CudaDevice, CudaInferBackend, CudaOptions, CudaPredictor, Precision, Runtime,
};
use rln_engine::infer::cuda::predict_host;
use rln_engine::infer::TilePredictor;
use rln_engine::model::{Model, L};
use rln_engine::net::{BnMode, Rln};
use rln_engine::tensor::{rel_l2, Shape, Tensor};
use std::path::PathBuf;
use std::sync::Arc;

const TOL_F32: f64 = 1e-5;
const TOL_F16: f64 = 1e-2;
/// bf16 storage and operands: 8 significant bits against fp16's 11 (unit roundoff 8×
/// larger); the emulation measures ≤ 1.5e-3 per kernel and 5.4e-4 for the network.
const TOL_BF16: f64 = 2.4e-2;

fn quick() -> bool {
    std::env::var("RLN_GPU_TEST_QUICK").is_ok_and(|v| v == "1")
}

fn device() -> Option<Arc<CudaDevice>> {
    if !gpu_common::gpu_present("tests/gpu.rs") {
        return None;
    }
    let dev = CudaDevice::open(0).expect("a CUDA device is present but could not be opened");
    println!("device: {}; modules: {:?}", dev.describe(), dev.module_sources);
    Some(dev)
}

fn modes() -> [CudaOptions; 5] {
    [
        CudaOptions::f32(),
        CudaOptions::f16().with_tensor_cores(false),
        CudaOptions::f16(),
        CudaOptions::bf16().with_tensor_cores(false),
        CudaOptions::bf16(),
    ]
}

fn tol(o: &CudaOptions) -> f64 {
    match o.precision {
        Precision::F32 => TOL_F32,
        Precision::F16 => TOL_F16,
        Precision::Bf16 => TOL_BF16,
    }
}

fn random(shape: Shape, lo: f32, hi: f32, rng: &mut ChaCha8Rng) -> Tensor<f32> {
    Tensor::from_vec(shape, (0..shape.len()).map(|_| rng.random_range(lo..hi)).collect()).unwrap()
}

/// Asserts finiteness (outputs are poisoned with NaN first) and the relative L2 error.
fn check(what: &str, got: &Tensor<f32>, want: &Tensor<f32>, tol: f64) -> f64 {
    assert_eq!(got.shape, want.shape, "{what}: shape");
    let bad = got.data.iter().filter(|v| !v.is_finite()).count();
    assert_eq!(bad, 0, "{what}: {bad} non-finite values (unwritten or overflowed)");
    let e = rel_l2(&got.data, &want.data);
    println!(
        "{what:<52} rel L2 {e:9.2e}  (tol {tol:.0e})  {}",
        if e <= tol { "ok" } else { "FAIL" }
    );
    e
}

/// Like [`check`] without panicking: prints and returns the error (∞ for non-finite
/// values), so that one bad kernel does not hide the others.
fn measure(what: &str, got: &Tensor<f32>, want: &Tensor<f32>, tol: f64) -> f64 {
    let bad = got.data.iter().filter(|v| !v.is_finite()).count();
    let e = if got.shape != want.shape || bad > 0 {
        f64::INFINITY
    } else {
        rel_l2(&got.data, &want.data)
    };
    let note = if bad > 0 {
        format!(" ({bad} non-finite)")
    } else {
        String::new()
    };
    println!(
        "{what:<52} rel L2 {e:9.2e}  (tol {tol:.0e})  {}{note}",
        if e <= tol { "ok" } else { "FAIL" }
    );
    e
}

/// Inputs of layer l's kernel at shape s: activations in (0, 2), the one-channel
/// operand in (0.05, 1) like a normalized image (or E1).
fn stage_inputs(l: L, s: Shape, rng: &mut ChaCha8Rng) -> (Vec<Tensor<f32>>, Option<Tensor<f32>>) {
    let k = conv_kernel(l);
    let inputs = k.inputs.iter().map(|&c| random(s.with_c(c), 0.0, 2.0, rng)).collect();
    let aux = k.post.map(|_| random(s.with_c(1), 0.05, 1.0, rng));
    (inputs, aux)
}

/// f16 storage rounds the kernel's inputs: give the twin the same rounded inputs.
fn rounded(t: &Tensor<f32>, p: Precision) -> Tensor<f32> {
    if t.shape.c > 1 {
        Tensor {
            shape: t.shape,
            data: t.data.iter().map(|&v| p.round(v)).collect(),
        }
    } else {
        t.clone()
    }
}

#[test]
#[ignore = "needs a CUDA GPU; run with --include-ignored (tools/gpu-check.sh does)"]
fn every_conv_kernel_matches_its_cpu_twin() {
    let Some(dev) = device() else { return };
    let mut failures = Vec::new();
    for o in modes() {
        let sizes = [
            (1u64, Shape::new(2, 1, 5, 9, 35)),
            (2, Shape::new(1, 1, 8, 16, 32)),
            (3, Shape::new(1, 1, 9, 17, 19)),
        ];
        for &(seed, s) in &sizes[..if quick() { 1 } else { 3 }] {
            let model = random_model(seed);
            let net = CudaInferBackend::new(dev.clone(), &model, o).unwrap();
            let mut rng = ChaCha8Rng::seed_from_u64(seed + 50);
            for k in CONV_KERNELS.iter() {
                let (inputs, aux) = stage_inputs(k.layer, s, &mut rng);
                let refs: Vec<&Tensor<f32>> = inputs.iter().collect();
                let name = k.name(o.precision, o.tensor_cores);
                // a failing kernel is reported and the others still run (a device fault is
                // sticky: after one, every later launch fails too, so the first is the culprit)
                let got = match net.run_conv_stage(k.layer, &refs, aux.as_ref()) {
                    Ok(g) => g,
                    Err(e) => {
                        println!("{name} {s}: ERROR {e}");
                        failures.push(format!("{name} {s} (error)"));
                        continue;
                    }
                };
                let rin: Vec<Tensor<f32>> = inputs.iter().map(|t| rounded(t, o.precision)).collect();
                let rrefs: Vec<&Tensor<f32>> = rin.iter().collect();
                let want = twin::conv_stage(&model, k.layer, &rrefs, aux.as_ref()).unwrap();
                if measure(&format!("{name} {s}"), &got.out, &want.out, tol(&o)) > tol(&o) {
                    failures.push(format!("{name} {s}"));
                }
                if matches!(k.epi, Epi::Update | Epi::UpdatePlus1) {
                    let (g, w) = (got.raw.as_ref().unwrap(), want.raw.as_ref().unwrap());
                    if measure(&format!("{name} {s} raw"), g, w, tol(&o)) > tol(&o) {
                        failures.push(format!("{name} {s} raw"));
                    }
                }
            }
        }
    }
    assert!(failures.is_empty(), "kernels off their CPU twin: {failures:?}");
}

#[test]
#[ignore = "needs a CUDA GPU; run with --include-ignored (tools/gpu-check.sh does)"]
fn up2_and_avgpool2_match_their_cpu_twins() {
    let Some(dev) = device() else { return };
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    for o in modes() {
        let model = random_model(4);
        let net = CudaInferBackend::new(dev.clone(), &model, o).unwrap();
        for s in [Shape::new(2, 8, 3, 5, 7), Shape::new(1, 8, 16, 16, 16)] {
            let b3 = rounded(&random(s, 0.0, 2.0, &mut rng), o.precision);
            let got = net.run_up_stage(&b3).unwrap();
            let e = check(
                &format!("up2 {} {s}", o.label()),
                &got,
                &twin::up_stage(&model, &b3).unwrap(),
                tol(&o),
            );
            assert!(e <= tol(&o));
            let x = random(Shape::new(s.n, 1, 2 * s.d, 2 * s.h, 2 * s.w), 0.0, 1.0, &mut rng);
            let got = net.run_pool_stage(&x).unwrap();
            let e = check(
                &format!("avgpool2 {} {}", o.label(), x.shape),
                &got,
                &twin::pool_stage(&x).unwrap(),
                1e-6,
            );
            assert!(e <= 1e-6);
        }
    }
}

fn cpu_forward(model: &Model<f32>, x: &Tensor<f32>) -> (Tensor<f32>, Tensor<f32>, Tensor<f32>) {
    let b = CpuBackend::<f32>::new();
    let f = Rln::new(&b, model).forward(x, BnMode::Running, false).unwrap();
    (f.prediction, f.e1_raw, f.e2_raw)
}

#[test]
#[ignore = "needs a CUDA GPU; run with --include-ignored (tools/gpu-check.sh does)"]
fn forward_matches_cpu_on_random_models_and_sizes() {
    let Some(dev) = device() else { return };
    // even, odd, batch > 1, not tile multiples, a single voxel
    let sizes = [
        Shape::new(1, 1, 16, 24, 32),
        Shape::new(2, 1, 7, 13, 21),
        Shape::new(3, 1, 9, 17, 40),
        Shape::new(1, 1, 1, 1, 1),
        Shape::new(1, 1, 33, 18, 65),
    ];
    let mut worst = [0.0f64; 5];
    for (i, s) in sizes
        .iter()
        .enumerate()
        .skip(if quick() { 1 } else { 0 })
        .take(if quick() { 1 } else { sizes.len() })
    {
        let model = random_model(100 + i as u64);
        let mut rng = ChaCha8Rng::seed_from_u64(200 + i as u64);
        let x = random(*s, 0.0, 1.0, &mut rng);
        let (y, e1r, e2r) = cpu_forward(&model, &x);
        for (m, o) in modes().into_iter().enumerate() {
            let net = CudaInferBackend::new(dev.clone(), &model, o).unwrap();
            let out = predict_host(&net, &x, true).unwrap();
            let t = tol(&o);
            let e = [
                check(&format!("forward {} {s} prediction", o.label()), &out.prediction, &y, t),
                check(
                    &format!("forward {} {s} E1r", o.label()),
                    out.e1_raw.as_ref().unwrap(),
                    &e1r,
                    t,
                ),
                check(
                    &format!("forward {} {s} E2r", o.label()),
                    out.e2_raw.as_ref().unwrap(),
                    &e2r,
                    t,
                ),
            ];
            worst[m] = e.iter().fold(worst[m], |a, &b| a.max(b));
        }
    }
    println!(
        "worst rel L2 vs CPU: f32 {:.2e}, f16 {:.2e}, f16-tc {:.2e}, bf16 {:.2e}, bf16-tc {:.2e}",
        worst[0], worst[1], worst[2], worst[3], worst[4]
    );
    for (m, o) in modes().iter().enumerate() {
        assert!(worst[m] <= tol(o), "{}: worst {:.2e}", o.label(), worst[m]);
    }
}

fn reference_dir() -> Option<PathBuf> {
    let mut c: Vec<PathBuf> = Vec::new();
    if let Some(d) = std::env::var_os("RLN_REFERENCE_DIR") {
        c.push(d.into());
    }
    c.push(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/reference"));
    c.push(PathBuf::from("shared/reference"));
    c.into_iter().find(|d| {
        d.join("rln-tf-vectors-a.safetensors").is_file() && d.join("rln-authors-weights.safetensors").is_file()
    })
}

#[test]
#[ignore = "needs a CUDA GPU; run with --include-ignored (tools/gpu-check.sh does)"]
fn conformance_vectors_inference_keys_on_the_gpu() {
    let Some(_dev) = device() else { return };
    let dir = reference_dir().expect(
        "reference files not found: rln-tf-vectors-a.safetensors and rln-authors-weights.safetensors \
         in $RLN_REFERENCE_DIR, ../shared/reference or shared/reference",
    );
    let model = Model::<f64>::import_tf(&dir.join("rln-authors-weights.safetensors"), 1e-4)
        .unwrap()
        .cast::<f32>();
    for o in modes() {
        let rows =
            rln_engine::conformance::cuda::run_infer(&model, &dir.join("rln-tf-vectors-a.safetensors"), o).unwrap();
        for r in &rows {
            println!(
                "conformance {:<7} {:<20} rel L2 {:9.2e}  (tol {:.0e})  {}",
                o.label(),
                r.key,
                r.rel_err,
                r.tol,
                if r.pass { "ok" } else { "FAIL" }
            );
        }
        assert!(rows.iter().all(|r| r.pass), "{}: conformance failed", o.label());
    }
}

#[test]
#[ignore = "needs a CUDA GPU; run with --include-ignored (tools/gpu-check.sh does)"]
fn stream_of_tiles_equals_tile_by_tile() {
    let Some(dev) = device() else { return };
    let model = random_model(7);
    let mut rng = ChaCha8Rng::seed_from_u64(8);
    let shapes = [
        Shape::new(1, 1, 16, 32, 32),
        Shape::new(1, 1, 15, 31, 33),
        Shape::new(1, 1, 40, 24, 24),
        Shape::new(2, 1, 8, 8, 8),
        Shape::new(1, 1, 16, 32, 32),
    ];
    let tiles: Vec<Tensor<f32>> = shapes.iter().map(|s| random(*s, 0.0, 1.0, &mut rng)).collect();
    for o in modes() {
        let mut p = CudaPredictor::with_device(dev.clone(), &model, o).unwrap();
        println!(
            "{}: {} B/voxel, budget {:?} B",
            p.describe(),
            p.bytes_per_voxel(),
            p.memory_budget()
        );
        assert!(p.memory_budget().is_some_and(|b| b > 0));
        let one: Vec<Tensor<f32>> = tiles.iter().map(|t| p.predict(t).unwrap()).collect();
        let mut streamed = Vec::new();
        let mut it = tiles.iter().cloned().map(Ok);
        p.predict_stream(&mut it, &mut |_x, y| {
            streamed.push(y.clone());
            Ok(())
        })
        .unwrap();
        assert_eq!(streamed.len(), tiles.len());
        for (i, (a, b)) in streamed.iter().zip(&one).enumerate() {
            assert_eq!(a.shape, tiles[i].shape);
            assert!(
                a.data == b.data,
                "{}: streamed tile {i} differs from predict()",
                o.label()
            );
        }
        // and against the CPU
        for (i, t) in tiles.iter().enumerate() {
            check(
                &format!("stream {} tile {i} {}", o.label(), t.shape),
                &streamed[i],
                &cpu_forward(&model, t).0,
                tol(&o),
            );
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU; run with --include-ignored (tools/gpu-check.sh does)"]
fn forward_is_deterministic_and_reads_no_unwritten_memory() {
    let Some(dev) = device() else { return };
    let model = random_model(11);
    let mut rng = ChaCha8Rng::seed_from_u64(12);
    let x = random(Shape::new(1, 1, 37, 45, 70), 0.0, 1.0, &mut rng);
    for o in modes() {
        let net = CudaInferBackend::new(dev.clone(), &model, o).unwrap();
        let a = predict_host(&net, &x, true).unwrap();
        // NaN in every new allocation: a kernel that reads an element nothing wrote turns
        // the output NaN
        let poisoned = Runtime::cuda(dev.clone(), false, true).unwrap();
        let net = CudaInferBackend::on_runtime(poisoned, &model, o).unwrap();
        let b = predict_host(&net, &x, true).unwrap();
        assert!(
            b.prediction.all_finite(),
            "{}: NaN with poisoned allocations",
            o.label()
        );
        assert!(
            a.prediction.data == b.prediction.data,
            "{}: two runs differ (a race?)",
            o.label()
        );
        assert!(
            a.e2_raw.unwrap().data == b.e2_raw.unwrap().data,
            "{}: E2r differs between runs",
            o.label()
        );
        println!("{}: deterministic, no reads of unwritten memory", o.label());
    }
}

#[test]
#[ignore = "needs a CUDA GPU; run with --include-ignored (tools/gpu-check.sh does)"]
fn out_of_memory_is_a_distinct_error() {
    let Some(dev) = device() else { return };
    let rt = rln_engine::backend::cuda::Runtime::cuda(dev.clone(), false, false).unwrap();
    let e = rt.alloc(1usize << 50).err().expect("a 1 PiB allocation must fail");
    println!("1 PiB allocation: {e}");
    assert!(e.is_out_of_memory(), "expected OutOfMemory, got {e:?}");
    // the context is still usable
    let b = rt.alloc(1 << 20).unwrap();
    assert!(b.ptr() != 0);
}

/// The device launches the kernels of the emulated baselines (tests/data/launch-trace/,
/// recorded by src/backend/cuda/trace_tests.rs on the CPU emulation): same model and
/// input, every launch line (kernel, grid, block, shared memory, arguments) equal.
#[test]
#[ignore = "needs a CUDA GPU; run with --include-ignored (tools/gpu-check.sh does)"]
fn device_inference_launches_as_the_emulated_baseline() {
    let Some(dev) = device() else { return };
    let model = random_model(3);
    let x = gpu_common::trace_input(Shape::new(1, 1, 9, 12, 35), 5);
    for (o, file) in [
        (CudaOptions::f32(), "infer-f32.txt"),
        (CudaOptions::f16(), "infer-f16.txt"),
    ] {
        let net = CudaInferBackend::new(dev.clone(), &model, o).unwrap();
        net.runtime().start_trace();
        let y = predict_host(&net, &x, false).unwrap().prediction;
        assert!(y.all_finite(), "{}: non-finite prediction", o.label());
        let got = net.runtime().take_trace();
        gpu_common::trace_compare(o.label(), &got, &gpu_common::trace_baseline(file, None));
    }
}

/// A dual-view ("concat") model runs on GPU inference (the first convs and the input's
/// mean composed of the training kernels, the rest fused): streamed tiles of odd and even
/// sizes, batch two, equal to the CPU network within the single-view tolerances.
#[test]
#[ignore = "needs a CUDA GPU; run with --include-ignored (tools/gpu-check.sh does)"]
fn dual_view_models_stream_on_the_gpu_like_the_cpu() {
    let Some(dev) = device() else { return };
    let model = random_dual_model(5);
    let mut rng = ChaCha8Rng::seed_from_u64(6);
    let tiles: Vec<Tensor<f32>> = [Shape::new(1, 2, 16, 24, 40), Shape::new(2, 2, 9, 13, 21)]
        .iter()
        .map(|s| random(*s, 0.0, 1.0, &mut rng))
        .collect();
    for o in modes() {
        let mut p = CudaPredictor::with_device(dev.clone(), &model, o).unwrap();
        let mut got = Vec::new();
        let mut it = tiles.iter().cloned().map(Ok);
        p.predict_stream(&mut it, &mut |_x, y| {
            got.push(y.clone());
            Ok(())
        })
        .unwrap();
        for (t, y) in tiles.iter().zip(&got) {
            let e = check(
                &format!("dual-view stream {} {}", o.label(), t.shape),
                y,
                &cpu_forward(&model, t).0,
                tol(&o),
            );
            assert!(e <= tol(&o));
        }
    }
}

//! Launch-trace baselines (test-only; issue 15 item 6): for a fixed model and input, the
//! sequence of kernel launches of CUDA inference (f32, and f16 with the tensor-core
//! convs) and of one CUDA training step (single- and dual-view), with the emulated
//! outputs, recorded on the CPU emulation of the device and compared with the files in
//! tests/data/launch-trace/. A restructuring of the CUDA host code must leave them equal
//! (or commit a new baseline with the reason in the commit message).
//!
//! Comparison: names and integers exactly; floats (epilogue constants, batch statistics,
//! outputs) to 1e-6 relative, so that an ulp of a platform's libm does not fail the test
//! while any real change does. On a mismatch the test prints the first differing line.
//! `RLN_BLESS_TRACES=1` rewrites the baselines instead of comparing.
//! The emulated inference output is also compared with the CPU network
//! ([`crate::net::Rln`], running statistics).

#[cfg(test)]
mod tests {
    use super::super::emulate_infer::EmuDevice;
    use super::super::runtime::Runtime;
    use super::super::{random_dual_model, random_model, CudaInferBackend, CudaOptions, CudaTrainBackend, Precision};
    use crate::backend::cpu::{pointwise, CpuBackend};
    use crate::backend::{Backend, TrainPrecision};
    use crate::model::{Model, ModelConfig, Params, Variant, LAYERS};
    use crate::net::{BnMode, Rln};
    use crate::tensor::{rel_l2, Shape, Tensor};
    use crate::train::trainer::TrainConfig;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;
    use std::fmt::Write as _;
    use std::path::PathBuf;
    use std::sync::Arc;

    /// The inference input: odd sizes (mirror-padded to 10×12×36: two FFMA tiles in x and
    /// z, three tensor-core tiles in x), one tile of the stream.
    const INFER_SHAPE: Shape = Shape {
        n: 1,
        c: 1,
        d: 9,
        h: 12,
        w: 35,
    };
    const INFER_MODEL_SEED: u64 = 3;
    /// The training batch: two volumes (the batch index in every kernel).
    const TRAIN_SHAPE: Shape = Shape {
        n: 2,
        c: 1,
        d: 8,
        h: 8,
        w: 12,
    };
    const TRAIN_MODEL_SEED: u64 = 7;

    fn input(shape: Shape, seed: u64) -> Tensor<f32> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        Tensor::from_vec(shape, (0..shape.len()).map(|_| rng.random_range(0.0f32..1.0)).collect()).unwrap()
    }

    fn dir() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/launch-trace")
    }

    /// Summary lines of a tensor or vector: length, Σ, ‖·‖₂, min, max, and every
    /// `stride`-th value.
    fn summary(out: &mut String, what: &str, v: &[f64], stride: usize) {
        let sum: f64 = v.iter().sum();
        let l2 = v.iter().map(|x| x * x).sum::<f64>().sqrt();
        let min = v.iter().cloned().fold(f64::INFINITY, f64::min);
        let max = v.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let _ = writeln!(
            out,
            "output {what} len={} sum={sum:?} l2={l2:?} min={min:?} max={max:?}",
            v.len()
        );
        if stride > 0 {
            let s: Vec<String> = v.iter().step_by(stride).map(|x| format!("{x:?}")).collect();
            let _ = writeln!(out, "output {what} every {stride}th: {}", s.join(" "));
        }
    }

    /// Inference of `model` on the emulated device as the streaming predictor runs it: the
    /// input mirror-padded on the host, `net::Rln::infer` on [`CudaInferBackend`], the
    /// outputs cropped on the host. Returns the launch trace, y, and E1r, E2r with `raw`.
    pub(super) fn emulated_infer(
        model: &Model<f32>,
        opts: CudaOptions,
        x: &Tensor<f32>,
        raw: bool,
    ) -> (Vec<String>, Vec<Tensor<f32>>) {
        // poisoned: an element a kernel should have written but did not is NaN
        let rt = Runtime::on_exec(Arc::new(EmuDevice::default()), true);
        let b = CudaInferBackend::on_runtime(rt.clone(), model, opts).unwrap();
        rt.start_trace();
        let xd = b.from_host(&pointwise::pad_even(x)).unwrap();
        let out = Rln::new(&b, model).infer(&xd, raw).unwrap();
        let lines = rt.take_trace();
        let outs = [Some(out.prediction), out.e1_raw, out.e2_raw]
            .into_iter()
            .flatten()
            .map(|t| pointwise::crop(&b.to_host(&t).unwrap(), x.shape.with_c(1)))
            .collect();
        (lines, outs)
    }

    /// The launch trace and outputs of one forward pass of the CUDA network on the emulation.
    fn infer_trace(opts: CudaOptions) -> (String, Tensor<f32>) {
        let model = random_model(INFER_MODEL_SEED);
        let x = input(INFER_SHAPE, 5);
        let (lines, mut outs) = emulated_infer(&model, opts, &x, false);
        let y = outs.remove(0);
        let mut s = format!(
        "# CUDA inference ({}), random_model({INFER_MODEL_SEED}), input {INFER_SHAPE} uniform (0, 1) seed 5, through net::Rln::infer on CudaInferBackend\n\
         # one line per launch: kernel grid block smem, then every KernelArgs field (pointers: * or 0)\n",
        opts.label()
    );
        for l in &lines {
            let _ = writeln!(s, "launch {l}");
        }
        let v: Vec<f64> = y.data.iter().map(|&v| v as f64).collect();
        summary(&mut s, "prediction", &v, 97);
        (s, y)
    }

    /// The launch trace and outputs of one training step (forward with batch statistics,
    /// loss, backward) of the generic network on the emulated CUDA training backend.
    fn train_trace(variant: Variant, precision: TrainPrecision) -> String {
        let model = Model::<f32>::init(
            ModelConfig {
                variant,
                ..ModelConfig::default()
            },
            TRAIN_MODEL_SEED,
        );
        let x = input(TRAIN_SHAPE.with_c(variant.input_channels()), 11);
        let g = input(TRAIN_SHAPE, 12);
        let mut b = CudaTrainBackend::on_exec(Arc::new(EmuDevice::default()), true);
        b.set_precision(precision);
        let cfg = TrainConfig::default();
        b.runtime().start_trace();
        // the steps of trainer::train_step_on before the optimizer (which runs on the host)
        let net = Rln::new(&b, &model);
        let xd = b.from_host(&x).unwrap();
        let gd = b.from_host(&g).unwrap();
        let fwd = net.forward(&xd, BnMode::Batch, true).unwrap();
        let x1 = if x.shape.c > 1 {
            b.channel_mean(&xd).unwrap()
        } else {
            xd
        };
        let (terms, dy, de1r) = b.loss(&fwd.prediction, &fwd.e1_raw, &x1, &gd).unwrap();
        let grads: Params<f64> = net.backward(&fwd, &dy, &de1r, cfg.grad_mode).unwrap();
        let lines = b.runtime().take_trace();
        let mut s = String::new();
        if precision != TrainPrecision::Fp32 {
            let _ = writeln!(
                s,
                "# --precision {precision}: the wide convs (train_launch::MMA_VARIANTS) on tmma_*_bf16"
            );
        }
        s += &format!(
        "# one CUDA training step ({variant:?}): Model::init(seed {TRAIN_MODEL_SEED}), input {} seed 11, target {TRAIN_SHAPE} seed 12,\n\
         # forward with batch statistics, loss, backward ({:?} gradients) through net::Rln on CudaTrainBackend\n\
         # one line per launch: kernel grid block smem, then every TrainArgs field (pointers: * or 0)\n",
        x.shape, cfg.grad_mode
    );
        for l in &lines {
            let _ = writeln!(s, "launch {l}");
        }
        let _ = writeln!(
            s,
            "output loss={:?} mse={:?} mse_aux={:?} ssim={:?}",
            terms.loss, terms.mse, terms.mse_aux, terms.ssim
        );
        for (spec, p) in LAYERS.iter().zip(&grads.layers) {
            for (what, v) in [("weight", &p.weight), ("gamma", &p.gamma), ("beta", &p.beta)] {
                if !v.is_empty() {
                    summary(&mut s, &format!("grad {}.{what}", spec.name), v, 0);
                }
            }
        }
        s
    }

    /// Floats equal to 1e-6 relative (and 1e-12 absolute); everything else exactly.
    fn same_piece(a: &str, b: &str) -> bool {
        if a == b {
            return true;
        }
        if a.parse::<i64>().is_ok() && b.parse::<i64>().is_ok() {
            return false;
        }
        match (a.parse::<f64>(), b.parse::<f64>()) {
            (Ok(x), Ok(y)) => (x - y).abs() <= 1e-6 * x.abs().max(y.abs()) + 1e-12,
            _ => false,
        }
    }

    fn same_line(a: &str, b: &str) -> bool {
        let split = |s: &str| -> Vec<String> {
            s.split(|c: char| c.is_whitespace() || ",=[]×:".contains(c))
                .map(str::to_string)
                .collect()
        };
        let (pa, pb) = (split(a), split(b));
        pa.len() == pb.len() && pa.iter().zip(&pb).all(|(x, y)| same_piece(x, y))
    }

    /// Compares `got` with the baseline `file` (comment lines aside), or rewrites it when
    /// RLN_BLESS_TRACES=1.
    fn check_baseline(file: &str, got: &str) {
        let path = dir().join(file);
        if std::env::var("RLN_BLESS_TRACES").is_ok_and(|v| v == "1") {
            std::fs::create_dir_all(dir()).unwrap();
            std::fs::write(&path, got).unwrap();
            println!("wrote {}", path.display());
            return;
        }
        let want = std::fs::read_to_string(&path).unwrap_or_else(|e| {
            panic!(
                "cannot read the baseline {}: {e}; record it with RLN_BLESS_TRACES=1",
                path.display()
            )
        });
        let body = |s: &str| -> Vec<String> { s.lines().filter(|l| !l.starts_with('#')).map(str::to_string).collect() };
        let (w, g) = (body(&want), body(got));
        for (i, (a, b)) in w.iter().zip(&g).enumerate() {
            assert!(
                same_line(a, b),
                "{file}: line {} of the trace differs from the baseline\n  baseline: {a}\n  now:      {b}",
                i + 1
            );
        }
        assert_eq!(
            w.len(),
            g.len(),
            "{file}: the baseline has {} lines, the trace now {} (first extra: {:?})",
            w.len(),
            g.len(),
            if w.len() > g.len() {
                w.get(g.len())
            } else {
                g.get(w.len())
            }
        );
    }

    #[test]
    fn inference_f32_launch_trace_matches_the_baseline() {
        let (s, _) = infer_trace(CudaOptions::f32());
        check_baseline("infer-f32.txt", &s);
    }

    #[test]
    fn inference_f16_launch_trace_matches_the_baseline() {
        let (s, _) = infer_trace(CudaOptions::f16());
        check_baseline("infer-f16.txt", &s);
    }

    #[test]
    fn training_step_launch_trace_matches_the_baseline() {
        check_baseline("train-step.txt", &train_trace(Variant::Single, TrainPrecision::Fp32));
    }

    /// The mixed-precision step: the same launches as FP32's except that every wide conv
    /// (forward, its 4→4/8→8 data gradients, its weight gradient) is a `tmma_*_bf16`
    /// launch with its own grid and shared memory; outputs within bf16's error of FP32's.
    #[test]
    fn mixed_precision_training_step_launch_trace_matches_the_baseline() {
        let t = train_trace(Variant::Single, TrainPrecision::Mixed);
        check_baseline("train-step-mixed.txt", &t);
        let f = train_trace(Variant::Single, TrainPrecision::Fp32);
        let names = |t: &str| -> Vec<String> {
            t.lines()
                .filter_map(|l| l.strip_prefix("launch "))
                .map(|l| l.split(' ').next().unwrap().to_string())
                .collect()
        };
        let (nm, nf) = (names(&t), names(&f));
        assert_eq!(nm.len(), nf.len(), "one launch for one launch");
        let mut mma = 0;
        for (m, f) in nm.iter().zip(&nf) {
            if m != f {
                // tmma_{fwd,wgrad}_A_B_C_O_bf16 in place of tconv_{fwd,wgrad}_A_B_C_O
                let want = f.replace("tconv_", "tmma_") + "_bf16";
                assert_eq!(*m, want);
                mma += 1;
            }
        }
        // forward 8 wide convs, their wide data gradients (4→4: 1 + 2, 8→8: 1 + 2 + 1 + 2 + 1)
        // and 8 weight gradients
        assert_eq!(mma, nm.iter().filter(|n| n.starts_with("tmma_")).count());
        assert!(mma >= 16, "{mma} tensor-core launches");
    }

    #[test]
    fn dual_view_training_step_launch_trace_matches_the_baseline() {
        check_baseline(
            "train-step-dual.txt",
            &train_trace(Variant::DualConcat, TrainPrecision::Fp32),
        );
    }

    /// The emulated CUDA network equals the CPU network (running statistics). f32: the same
    /// arithmetic up to summation order and FMA contraction (measured ~1e-7; bound 1e-5).
    /// f16 storage (and fp16 weights in the tensor-core convs): each stored activation is
    /// rounded to 11 significant bits (relative error ≤ 2⁻¹¹ ≈ 4.9e-4 each, random in sign,
    /// partly averaged away by the channel means); measured 5.9e-5 (FP32 cores) and 7.1e-5
    /// (tensor cores for the 8- and 16-channel convs only), bound 5e-4: one worst-case
    /// rounding of every output. bf16 (8 significant bits, 2⁻⁸ ≈ 3.9e-3): bound 4e-3.
    #[test]
    fn emulated_inference_equals_the_cpu_network() {
        let model = random_model(INFER_MODEL_SEED);
        let x = input(INFER_SHAPE, 5);
        let cpu = CpuBackend::<f32>::new();
        let want = Rln::new(&cpu, &model)
            .forward(&x, BnMode::Running, false)
            .unwrap()
            .prediction;
        for (opts, tol) in [
            (CudaOptions::f32(), 1e-5),
            (CudaOptions::f16().with_tensor_cores(false), 5e-4),
            (CudaOptions::f16(), 5e-4),
            (CudaOptions::bf16().with_tensor_cores(false), 4e-3),
            (CudaOptions::bf16(), 4e-3),
        ] {
            let (_, got) = infer_trace(opts);
            assert_eq!(got.shape, want.shape);
            assert!(got.all_finite(), "{}: non-finite outputs", opts.label());
            let e = rel_l2(&got.data, &want.data);
            println!("{}: rel L2 to the CPU network {e:.2e}", opts.label());
            assert!(e <= tol, "{}: rel L2 {e:e} > {tol:e}", opts.label());
        }
    }

    /// A dual-view ("concat", two input channels) model runs on CUDA inference: the two
    /// convs that read both input channels, the input's channel mean and the pooling of
    /// x and x̄ run composed of the f32 training kernels (the fused kernels read one
    /// input channel), every other stage on its fused kernel, and y, E1r, E2r equal the
    /// CPU network. Bounds as for single-view (`emulated_inference_equals_the_cpu_network`):
    /// f32 the same arithmetic up to summation order (1e-5); f16 storage one rounding to
    /// 11 bits of each stored activation (5e-4), the composed stages computing in f32 and
    /// storing their outputs in f16 like the fused ones.
    #[test]
    fn emulated_dual_view_inference_equals_the_cpu_network() {
        let model = random_dual_model(INFER_MODEL_SEED);
        let x = input(INFER_SHAPE.with_c(2), 6);
        let cpu = CpuBackend::<f32>::new();
        let want = Rln::new(&cpu, &model).forward(&x, BnMode::Running, false).unwrap();
        let want = [want.prediction, want.e1_raw, want.e2_raw];
        for (opts, tol) in [
            (CudaOptions::f32(), 1e-5),
            (CudaOptions::f16().with_tensor_cores(false), 5e-4),
            (CudaOptions::f16(), 5e-4),
        ] {
            let (trace, got) = emulated_infer(&model, opts, &x, true);
            for (what, g, w) in [
                ("y", &got[0], &want[0]),
                ("E1r", &got[1], &want[1]),
                ("E2r", &got[2], &want[2]),
            ] {
                assert_eq!(g.shape, w.shape);
                assert!(g.all_finite(), "{} {what}: non-finite outputs", opts.label());
                let e = rel_l2(&g.data, &w.data);
                println!("dual-view {} {what}: rel L2 to the CPU network {e:.2e}", opts.label());
                assert!(e <= tol, "dual-view {} {what}: rel L2 {e:e} > {tol:e}", opts.label());
            }
            // the fused kernels ran where they apply, the composed stages where they do not
            let ran = |k: &str| trace.iter().filter(|l| l.starts_with(&format!("{k} "))).count();
            let f16 = opts.precision == Precision::F16;
            for k in super::super::launch::CONV_KERNELS.iter() {
                let n = ran(&k.name(opts.precision, opts.tensor_cores));
                let want_n = usize::from(!k.layer.spec().reads_input);
                assert_eq!(n, want_n, "{} {}", opts.label(), k.base);
            }
            // x (two channels) is pooled composed, x̄ by the fused kernel
            assert_eq!(ran(super::super::launch::POOL_KERNEL), 1);
            assert_eq!(ran("t_avgpool2"), 1);
            assert_eq!(ran("t_channel_mean"), 1);
            let conversions = ran(super::super::launch::TO_F16_KERNEL);
            assert_eq!(
                conversions,
                if f16 { 2 } else { 0 },
                "{}: a1 and c1 stored as f16",
                opts.label()
            );
        }
    }

    /// bf16 storage has no conversion kernel for the composed dual-view stages: the pass
    /// is refused with an error naming what to use, not run wrongly.
    #[test]
    fn dual_view_bf16_inference_is_refused_clearly() {
        let model = random_dual_model(INFER_MODEL_SEED);
        let x = input(INFER_SHAPE.with_c(2), 6);
        let rt = Runtime::on_exec(Arc::new(EmuDevice::default()), true);
        let b = CudaInferBackend::on_runtime(rt, &model, CudaOptions::bf16()).unwrap();
        let xd = b.from_host(&pointwise::pad_even(&x)).unwrap();
        let e = Rln::new(&b, &model)
            .infer(&xd, false)
            .err()
            .expect("bf16 dual-view ran")
            .to_string();
        assert!(e.contains("bf16") && e.contains("f16"), "{e}");
    }

    /// Device memory of inference as the predictor plans it: the peak of what one pass
    /// allocates (every stage output from the pool, freed after its last reader) stays
    /// within `infer::bytes_per_voxel` per voxel, a second tile allocates exactly as much
    /// as the first, and nothing stays allocated after a pass (no leak across tiles).
    #[test]
    fn inference_memory_stays_within_the_planned_bytes_per_voxel() {
        use super::super::infer::bytes_per_voxel;
        for (model, c) in [(random_model(2), 1), (random_dual_model(2), 2)] {
            for opts in [CudaOptions::f32(), CudaOptions::f16()] {
                let rt = Runtime::on_exec(Arc::new(EmuDevice::default()), false);
                let b = CudaInferBackend::on_runtime(rt.clone(), &model, opts).unwrap();
                let x = input(Shape::new(1, c, 16, 16, 32), 3);
                let xd = b.from_host(&x).unwrap();
                let mut peaks = Vec::new();
                for _ in 0..2 {
                    let (live, _) = rt.mem_bytes();
                    rt.reset_peak();
                    let y = Rln::new(&b, &model).infer(&xd, false).unwrap().prediction;
                    drop(y);
                    let (after, peak) = rt.mem_bytes();
                    assert_eq!(after, live, "{} c={c}: a pass leaves memory allocated", opts.label());
                    peaks.push(peak - live);
                }
                let plan = bytes_per_voxel(opts.precision, c) * x.shape.with_c(1).len();
                println!(
                    "{} c={c}: peak {} B, planned {plan} B ({:.0}%)",
                    opts.label(),
                    peaks[0],
                    100.0 * peaks[0] as f64 / plan as f64
                );
                assert_eq!(
                    peaks[0],
                    peaks[1],
                    "{}: the second tile allocates differently",
                    opts.label()
                );
                assert!(
                    peaks[0] <= plan,
                    "{} c={c}: peak {} B > planned {plan} B",
                    opts.label(),
                    peaks[0]
                );
            }
        }
    }

    /// The single-kernel path of the GPU differential tests (device tensors of f32 and f16
    /// storage up and down, each kernel alone) on the emulation, against the CPU twins.
    /// Inputs of several channels are rounded to f16 first in the f16 network (as the GPU
    /// tests do), so the bound is that of the f16 outputs: 2⁻¹¹ relative, plus the tensor-core
    /// convs' fp16 weights (measured below 1e-3 in emulate.rs).
    #[test]
    fn emulated_single_kernels_match_their_twins() {
        use super::super::launch::CONV_KERNELS;
        use super::super::twin;
        let model = random_model(4);
        let mut rng = ChaCha8Rng::seed_from_u64(8);
        let s = Shape::new(1, 1, 5, 6, 9);
        let mut random = |shape: Shape, lo: f32, hi: f32, p: Precision| {
            let v = (0..shape.len())
                .map(|_| {
                    let x = rng.random_range(lo..hi);
                    if shape.c > 1 {
                        p.round(x)
                    } else {
                        x
                    }
                })
                .collect();
            Tensor::from_vec(shape, v).unwrap()
        };
        // bf16: 8× fp16's bound (unit roundoff 2⁻⁸ vs 2⁻¹¹)
        for (opts, tol) in [
            (CudaOptions::f32(), 1e-5),
            (CudaOptions::f16(), 3e-3),
            (CudaOptions::bf16(), 2.4e-2),
        ] {
            let f16 = opts.precision;
            let rt = Runtime::on_exec(Arc::new(EmuDevice::default()), false);
            let net = CudaInferBackend::on_runtime(rt, &model, opts).unwrap();
            for k in CONV_KERNELS.iter() {
                let inputs: Vec<Tensor<f32>> = k.inputs.iter().map(|&c| random(s.with_c(c), 0.0, 2.0, f16)).collect();
                let refs: Vec<&Tensor<f32>> = inputs.iter().collect();
                let aux = k.post.map(|_| random(s, 0.05, 1.0, f16));
                let got = net.run_conv_stage(k.layer, &refs, aux.as_ref()).unwrap();
                let want = twin::conv_stage(&model, k.layer, &refs, aux.as_ref()).unwrap();
                let e = rel_l2(&got.out.data, &want.out.data);
                assert!(
                    got.out.all_finite() && e <= tol,
                    "{} {}: rel L2 {e:e}",
                    k.base,
                    opts.label()
                );
                if let (Some(g), Some(w)) = (&got.raw, &want.raw) {
                    let e = rel_l2(&g.data, &w.data);
                    assert!(e <= tol, "{} {} raw: rel L2 {e:e}", k.base, opts.label());
                }
            }
            let b3 = random(Shape::new(1, 8, 3, 4, 5), 0.0, 2.0, f16);
            let got = net.run_up_stage(&b3).unwrap();
            let e = rel_l2(&got.data, &twin::up_stage(&model, &b3).unwrap().data);
            assert!(got.all_finite() && e <= tol, "up2 {}: rel L2 {e:e}", opts.label());
            let x = random(Shape::new(1, 1, 6, 8, 10), 0.0, 1.0, f16);
            let got = net.run_pool_stage(&x).unwrap();
            assert_eq!(got, twin::pool_stage(&x).unwrap(), "avgpool2 {}", opts.label());
        }
    }
}

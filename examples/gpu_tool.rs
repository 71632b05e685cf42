//! The engine's side of tools/gpu-check.sh, as a small program independent of the main
//! CLI: the CUDA benchmark, GPU-vs-CPU predictions written for the PyTorch peer, and the
//! conformance vectors on the GPU. Each subcommand prints a table and writes JSON.
//!
//!   gpu_tool bench --mode f16-tc --dims 1,256,256,256 --json out.json
//!   gpu_tool predict --model m.safetensors --dims 1,63,95,127 --out pred.safetensors --json out.json
//!   gpu_tool conformance --model m.safetensors --vectors v.safetensors --json out.json
//!   gpu_tool train-bench --dims 4,64,64,64 --steps 40 --json out.json --check-out chk.safetensors
//!   gpu_tool train-conformance --model m.safetensors --vectors v.safetensors --json out.json

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use rln_engine::backend::cpu::CpuBackend;
use rln_engine::backend::cuda::{self, CudaInferBackend, CudaOptions, CudaTrainBackend};
use rln_engine::backend::{Backend, GradMode};
use rln_engine::bench::{cuda_infer as bench, cuda_train as train_bench};
use rln_engine::infer::cuda::predict_host;
use rln_engine::model::tensor_file::TensorWriter;
use rln_engine::model::Model;
use rln_engine::model::{ModelConfig, Params};
use rln_engine::net::{BnMode, Rln};
use rln_engine::tensor::{rel_l2, Shape, Tensor};
use std::path::PathBuf;

#[derive(Parser)]
#[command(about = "CUDA checks of rln-engine (used by tools/gpu-check.sh)")]
struct Args {
    #[arg(long, default_value_t = 0)]
    device: usize,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Forward throughput on a random model and input.
    Bench {
        /// f32, f16 / bf16 (FP32 cores) or f16-tc / bf16-tc (tensor cores).
        #[arg(long, default_value = "f16-tc")]
        mode: String,
        /// n,d,h,w
        #[arg(long, default_value = "1,256,256,256")]
        dims: String,
        #[arg(long, default_value_t = 30)]
        reps: usize,
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Predictions of every mode and of the CPU on one random input, written to a file.
    Predict {
        #[arg(long)]
        model: PathBuf,
        #[arg(long, default_value = "1,63,95,127")]
        dims: String,
        #[arg(long, default_value_t = 3)]
        seed: u64,
        /// Comma-separated GPU modes, or "none" for the CPU reference only.
        #[arg(long, default_value = "f32,f16,f16-tc,bf16-tc")]
        modes: String,
        #[arg(long)]
        out: PathBuf,
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Training steps on the GPU (CUDA events, median), one profiled step by phase; with
    /// --check-out, also the paper-mode gradients of a small batch on the GPU and the CPU
    /// with the model and batch, for the PyTorch peer's training check.
    TrainBench {
        #[arg(long, default_value = "4,64,64,64")]
        dims: String,
        #[arg(long, default_value_t = 5)]
        warmup: usize,
        #[arg(long, default_value_t = 40)]
        steps: usize,
        #[arg(long)]
        json: Option<PathBuf>,
        /// Write x, g, the model and the GPU's gradients (2×32³) here.
        #[arg(long)]
        check_out: Option<PathBuf>,
        /// Arithmetic of the convs: fp32, or mixed (the wide convs on the tensor cores, bf16).
        #[arg(long, value_enum, default_value_t = rln_engine::backend::TrainPrecision::Fp32)]
        precision: rln_engine::backend::TrainPrecision,
    },
    /// The conformance vectors in training mode on the GPU (infer, train, grad keys).
    TrainConformance {
        #[arg(long)]
        model: PathBuf,
        #[arg(long)]
        vectors: PathBuf,
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// The conformance vectors' inference keys on the GPU, every mode.
    Conformance {
        #[arg(long)]
        model: PathBuf,
        #[arg(long)]
        vectors: PathBuf,
        #[arg(long)]
        json: Option<PathBuf>,
    },
}

fn mode(s: &str, device: usize) -> Result<CudaOptions> {
    let Some(o) = CudaOptions::from_label(s) else {
        bail!("unknown mode {s:?} (f32, f16, f16-tc, bf16, bf16-tc)")
    };
    Ok(CudaOptions { device, ..o })
}

fn dims(s: &str) -> Result<[usize; 4]> {
    let v: Vec<usize> = s
        .split(',')
        .map(|p| p.trim().parse())
        .collect::<Result<_, _>>()
        .with_context(|| format!("--dims {s:?}"))?;
    match v.as_slice() {
        [n, d, h, w] => Ok([*n, *d, *h, *w]),
        [d, h, w] => Ok([1, *d, *h, *w]),
        _ => bail!("--dims takes n,d,h,w or d,h,w"),
    }
}

fn write_json(path: &Option<PathBuf>, v: &serde_json::Value) -> Result<()> {
    if let Some(p) = path {
        std::fs::write(p, serde_json::to_string_pretty(v)?).with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(())
}

fn main() {
    if let Err(e) = run(Args::parse()) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(a: Args) -> Result<()> {
    let cpu_only = matches!(&a.cmd, Cmd::Predict { modes, .. } if modes == "none");
    if !cpu_only && !cuda::available() {
        bail!("no CUDA device (driver missing or no GPU)");
    }
    match a.cmd {
        Cmd::Bench {
            mode: m,
            dims: d,
            reps,
            json,
        } => {
            let mut o = bench::BenchOptions::new(mode(&m, a.device)?);
            o.dims = dims(&d)?;
            o.reps = reps;
            let r = bench::run(&o)?;
            print!("{}", r.table());
            write_json(&json, &serde_json::to_value(&r)?)?;
        }
        Cmd::Predict {
            model,
            dims: d,
            seed,
            modes,
            out,
            json,
        } => {
            let model = Model::<f32>::load(&model)?;
            let [n, dd, h, w] = dims(&d)?;
            let shape = Shape::new(n, 1, dd, h, w);
            // a smooth-ish random volume in [0, 1): noise plus a blob, never zeros
            let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let mut next = || {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((state >> 40) as f32) / (1u64 << 24) as f32
            };
            let mut x = Tensor::<f32>::zeros(shape);
            for (i, v) in x.data.iter_mut().enumerate() {
                let z = (i / (h * w)) % dd;
                let r = (z as f32 / dd as f32 - 0.5).abs();
                *v = 0.7 * next() + 0.3 * (1.0 - 2.0 * r);
            }
            let t0 = std::time::Instant::now();
            let b = CpuBackend::<f32>::new();
            let y_cpu = Rln::new(&b, &model)
                .forward(&x, BnMode::Running, false)
                .unwrap()
                .prediction;
            println!("CPU reference: {:.2} s", t0.elapsed().as_secs_f64());
            let mut wr = TensorWriter::default();
            let sh = vec![n, 1, dd, h, w];
            wr.add_f32("x", sh.clone(), &x.data);
            wr.add_f32("y_cpu", sh.clone(), &y_cpu.data);
            let mut res = serde_json::Map::new();
            for m in modes.split(',').filter(|m| *m != "none") {
                let o = mode(m.trim(), a.device)?;
                // a failing mode is recorded and the others still run
                let y = cuda::CudaDevice::open(a.device)
                    .and_then(|dev| CudaInferBackend::new(dev, &model, o))
                    .and_then(|b| predict_host(&b, &x, false));
                match y {
                    Ok(out) => {
                        let y = out.prediction;
                        let e = rel_l2(&y.data, &y_cpu.data);
                        let bad = y.data.iter().filter(|v| !v.is_finite()).count();
                        println!("{:<7} rel L2 vs CPU {e:.2e}  non-finite {bad}", o.label());
                        res.insert(
                            o.label().to_string(),
                            serde_json::json!({ "rel_l2_vs_cpu": if bad > 0 { f64::INFINITY } else { e }, "nonfinite": bad }),
                        );
                        wr.add_f32(&format!("y_{}", o.label().replace('-', "_")), sh.clone(), &y.data);
                    }
                    Err(e) => {
                        println!("{:<7} ERROR {e}", o.label());
                        res.insert(o.label().to_string(), serde_json::json!({ "error": e.to_string() }));
                    }
                }
            }
            wr.write(&out)?;
            write_json(&json, &serde_json::Value::Object(res))?;
        }
        Cmd::TrainBench {
            dims: d,
            warmup,
            steps,
            json,
            check_out,
            precision,
        } => {
            let mut b = CudaTrainBackend::open(a.device)?;
            b.set_precision(precision);
            let o = train_bench::TrainBenchOptions {
                dims: dims(&d)?,
                warmup,
                steps,
                ..Default::default()
            };
            let r = train_bench::run(&b, &o)?;
            print!("{}", r.table());
            let mut v = serde_json::to_value(&r)?;
            // the timing is written first: a failing check must not lose it
            write_json(&json, &v)?;
            if let Some(path) = check_out {
                // backend ops return errors as values: a failing check is recorded, not fatal
                v["check"] = match train_check(&b, &path) {
                    Ok(c) => c,
                    Err(e) => serde_json::json!({ "error": format!("{e:#}") }),
                };
                write_json(&json, &v)?;
            }
        }
        Cmd::TrainConformance { model, vectors, json } => {
            let b = CudaTrainBackend::open(a.device)?;
            let model = Model::<f32>::load(&model)?;
            let t0 = std::time::Instant::now();
            let r = rln_engine::conformance::run_on(&b, &model, &vectors)?;
            for row in &r.rows {
                println!(
                    "{:<44} rel L2 {:9.2e}  tol {:.0e}  {}",
                    row.key,
                    row.rel_err,
                    row.tol,
                    if row.pass { "ok" } else { "FAIL" }
                );
            }
            println!(
                "training conformance on the GPU ({:.1} s): worst infer {:.2e}, train {:.2e}, grad {:.2e}; {}",
                t0.elapsed().as_secs_f64(),
                r.worst("infer."),
                r.worst("train."),
                r.worst("grad."),
                if r.passed { "PASSED" } else { "FAILED" }
            );
            write_json(&json, &serde_json::to_value(&r)?)?;
        }
        Cmd::Conformance { model, vectors, json } => {
            let model = Model::<f32>::load(&model)?;
            let mut all = Vec::new();
            for m in ["f32", "f16", "f16-tc", "bf16-tc"] {
                let o = mode(m, a.device)?;
                let rows = rln_engine::conformance::cuda::run_infer(&model, &vectors, o)?;
                for r in &rows {
                    println!(
                        "{:<7} {:<20} rel L2 {:9.2e}  tol {:.0e}  {}",
                        m,
                        r.key,
                        r.rel_err,
                        r.tol,
                        if r.pass { "ok" } else { "FAIL" }
                    );
                }
                all.push(serde_json::json!({ "mode": m, "rows": rows }));
            }
            write_json(&json, &serde_json::Value::Array(all))?;
        }
    }
    Ok(())
}

/// Paper-mode gradients of a fresh model on a 2×32³ batch, on the GPU and the CPU: the
/// per-layer errors (JSON), and a file for the PyTorch peer's training check (the model's
/// tensors under their names, x, g, and grad.<name> from the GPU; the loss as `loss`).
fn train_check(b: &CudaTrainBackend, path: &std::path::Path) -> Result<serde_json::Value> {
    let shape = Shape::new(2, 1, 32, 32, 32);
    let model = Model::<f32>::init(ModelConfig::default(), 17);
    let (x, g) = train_bench::bench_batch(shape, 17);
    let grads = |bk: &dyn Fn() -> (f64, Params<f64>)| bk();
    let gpu = grads(&|| {
        let net = Rln::new(b, &model);
        let xd = b.from_host(&x).unwrap();
        let f = net.forward(&xd, BnMode::Batch, true).unwrap();
        let (t, dy, de) = b
            .loss(&f.prediction, &f.e1_raw, &xd, &b.from_host(&g).unwrap())
            .unwrap();
        (t.loss, net.backward(&f, &dy, &de, GradMode::Paper).unwrap())
    });
    let c = CpuBackend::<f32>::new();
    let cpu = grads(&|| {
        let net = Rln::new(&c, &model);
        let f = net.forward(&x, BnMode::Batch, true).unwrap();
        let (t, dy, de) = c.loss(&f.prediction, &f.e1_raw, &x, &g).unwrap();
        (t.loss, net.backward(&f, &dy, &de, GradMode::Paper).unwrap())
    });
    let mut per_tensor = serde_json::Map::new();
    let mut worst: f64 = 0.0;
    for (l, k) in cpu.1.ids() {
        let e = rel_l2(gpu.1.tensor(l, k), cpu.1.tensor(l, k));
        worst = worst.max(e);
        per_tensor.insert(Params::<f64>::name(l, k), serde_json::json!(e));
    }
    println!(
        "train check 2×32³: loss GPU {:.6} CPU {:.6}; worst gradient tensor GPU vs CPU {worst:.2e}",
        gpu.0, cpu.0
    );
    let mut w = model.to_writer();
    let sh = vec![shape.n, 1, shape.d, shape.h, shape.w];
    w.add_f32("x", sh.clone(), &x.data);
    w.add_f32("g", sh, &g.data);
    for (l, k) in gpu.1.ids() {
        let t = gpu.1.tensor(l, k);
        let name = Params::<f64>::name(l, k);
        let shape = model
            .named_tensors()
            .into_iter()
            .find(|(n, _, _)| *n == name)
            .map(|(_, s, _)| s);
        w.add_f64(&format!("grad.{name}"), shape.unwrap_or_else(|| vec![t.len()]), t);
    }
    w.add_f64("loss", vec![1], &[gpu.0]);
    w.write(path)?;
    Ok(serde_json::json!({"loss_gpu": gpu.0, "loss_cpu": cpu.0, "worst_tensor_rel_l2": worst, "rel_l2": per_tensor}))
}

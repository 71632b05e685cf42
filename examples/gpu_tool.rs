//! The engine's side of tools/gpu-check.sh, as a small program independent of the main
//! CLI: the CUDA benchmark, GPU-vs-CPU predictions written for the PyTorch peer, and the
//! conformance vectors on the GPU. Each subcommand prints a table and writes JSON.
//!
//!   gpu_tool bench --mode f16-tc --dims 1,256,256,256 --json out.json
//!   gpu_tool predict --model m.safetensors --dims 1,63,95,127 --out pred.safetensors --json out.json
//!   gpu_tool conformance --model m.safetensors --vectors v.safetensors --json out.json

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use rln_engine::backend::cpu::CpuBackend;
use rln_engine::backend::cuda::{self, bench, CudaNet, CudaOptions};
use rln_engine::model::tensor_file::TensorWriter;
use rln_engine::model::Model;
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
        /// f32, f16 (FP32 cores) or f16-tc (tensor cores).
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
        #[arg(long, default_value = "f32,f16,f16-tc")]
        modes: String,
        #[arg(long)]
        out: PathBuf,
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
    let o = match s {
        "f32" => CudaOptions::f32(),
        "f16" => CudaOptions::f16().with_tensor_cores(false),
        "f16-tc" => CudaOptions::f16(),
        _ => bail!("unknown mode {s:?} (f32, f16, f16-tc)"),
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
            let y_cpu = Rln::new(&b, &model).forward(&x, BnMode::Running, false).prediction;
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
                    .and_then(|dev| CudaNet::new(dev, &model, o))
                    .and_then(|mut net| net.predict_host(&x, false));
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
        Cmd::Conformance { model, vectors, json } => {
            let model = Model::<f32>::load(&model)?;
            let mut all = Vec::new();
            for m in ["f32", "f16", "f16-tc"] {
                let o = mode(m, a.device)?;
                let rows = cuda::conformance::run_infer(&model, &vectors, o)?;
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

//! `rln-engine import-tf`, `conformance`, `bench`: converting the authors' TF weights,
//! checking the engine against their test vectors, and measuring throughput (parse, call
//! the library, print).

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use rln_engine::model::Model;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct ImportTfArgs {
    /// The authors' weights under their TF names (e.g. ../shared/reference/rln-authors-weights.safetensors).
    pub weights: PathBuf,
    /// ε of the RL division nodes: 1e-4 for the authors' published checkpoint, 1e-3 for models
    /// trained with their later code.
    #[arg(long, value_parser = super::finite_f64)]
    pub div_eps: f64,
    /// Output model file (safetensors, canonical names, config in the metadata).
    #[arg(short, long)]
    pub output: PathBuf,
}

pub fn import_tf(a: &ImportTfArgs) -> Result<()> {
    let out = super::args::Output {
        role: "the output -o",
        path: &a.output,
        extensions: super::args::MODEL_EXTENSIONS,
    };
    let _guard = super::args::guard_outputs(&[out], &[("the TF weights", a.weights.as_path())])?;
    let model = Model::<f64>::import_tf(&a.weights, a.div_eps)?;
    model.save(&a.output)?;
    println!(
        "wrote {} ({} trainable values, div_eps {})",
        a.output.display(),
        model.params.count(),
        model.config.div_eps
    );
    Ok(())
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum Precision {
    F32,
    F64,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum ConformanceDevice {
    Cpu,
    Cuda,
}

#[derive(Args, Debug)]
pub struct ConformanceArgs {
    /// The model file (e.g. made by `import-tf` from the authors' weights).
    #[arg(long)]
    pub model: PathBuf,
    /// A vectors file of the authors' graph (reference/README.md layout, any volume size).
    #[arg(long)]
    pub vectors: PathBuf,
    #[arg(long, value_enum, default_value_t = ConformanceDevice::Cpu)]
    pub device: ConformanceDevice,
    /// With --device cuda: FP16 storage (FP32 accumulation; tolerance 1e-2).
    #[arg(long)]
    pub fp16: bool,
    /// Arithmetic of the CPU reference (the tolerances are those of a float32 engine).
    #[arg(long, value_enum, default_value_t = Precision::F32)]
    pub precision: Precision,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn conformance(a: &ConformanceArgs) -> Result<()> {
    super::args::check_fp16_on_cpu(a.fp16, a.device == ConformanceDevice::Cpu)?;
    let model = Model::<f32>::load(&a.model)?;
    if a.device == ConformanceDevice::Cuda {
        // inference-mode keys on the GPU (training runs on the CPU in this build)
        let opts = if a.fp16 {
            rln_engine::backend::cuda::CudaOptions::f16()
        } else {
            rln_engine::backend::cuda::CudaOptions::f32()
        };
        let rows = rln_engine::conformance::cuda::run_infer(&model, &a.vectors, opts)?;
        let passed = rows.iter().all(|r| r.pass);
        if a.json {
            println!(
                "{}",
                serde_json::json!({"device": "cuda", "mode": opts.label(), "rows": rows, "passed": passed})
            );
        } else {
            for r in &rows {
                println!(
                    "{:<48} {:>10.2e} {:>8.0e}  {}",
                    r.key,
                    r.rel_err,
                    r.tol,
                    if r.pass { "ok" } else { "FAIL" }
                );
            }
        }
        if !passed {
            bail!("conformance on the GPU failed");
        }
        return Ok(());
    }
    let report = match a.precision {
        Precision::F32 => rln_engine::conformance::run::<f32>(&model, &a.vectors),
        Precision::F64 => rln_engine::conformance::run::<f64>(&model, &a.vectors),
    }
    .context("conformance")?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        let [n, d, h, w] = report.input_shape;
        println!(
            "vectors {} (batch {n}, volume {d}×{h}×{w}), CPU {}",
            report.vectors, report.precision
        );
        println!("{:<48} {:>10} {:>8}  ", "key", "rel L2", "tol");
        for r in &report.rows {
            println!(
                "{:<48} {:>10.2e} {:>8.0e}  {}",
                r.key,
                r.rel_err,
                r.tol,
                if r.pass { "ok" } else { "FAIL" }
            );
        }
        let failed = report.rows.iter().filter(|r| !r.pass).count();
        println!("{} keys, {} failed", report.rows.len(), failed);
    }
    if !report.passed {
        bail!("conformance failed: some keys exceed their tolerance");
    }
    Ok(())
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum BenchDevice {
    Cpu,
    Cuda,
}

#[derive(Args, Debug)]
pub struct BenchArgs {
    #[arg(long, value_enum, default_value_t = BenchDevice::Cpu)]
    pub device: BenchDevice,
    /// With --device cuda: FP16 storage and tensor cores (FP32 accumulation).
    #[arg(long, conflicts_with = "bf16")]
    pub fp16: bool,
    /// With --device cuda: bfloat16 storage and tensor cores (FP32 accumulation; 8
    /// significant bits against fp16's 11, but f32's range: for models whose
    /// activations overflow fp16).
    #[arg(long)]
    pub bf16: bool,
    /// Minimum seconds spent timing each case (after one warm-up run).
    #[arg(long, value_parser = super::finite_f64, default_value_t = 3.0)]
    pub min_time: f64,
    /// Minimum timed runs of each case.
    #[arg(long, default_value_t = 3)]
    pub min_runs: usize,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    /// Only the network-only figure of `infer`'s streaming tiling of a volume of this
    /// size (z,y,x): the CPU network alone on every tile window, no I/O (the reference
    /// for the pipeline's overhead; tools/stream-bench.sh). Needs --tile.
    #[arg(long, value_parser = super::args::parse_dims, requires = "tile")]
    pub stream_dims: Option<[usize; 3]>,
    /// Tile core (z,y,x) of --stream-dims, as `infer --json` reports it ("core").
    #[arg(long, value_parser = super::args::parse_dims, requires = "stream_dims")]
    pub tile: Option<[usize; 3]>,
    /// Context voxels around each core of --stream-dims.
    #[arg(long, default_value_t = rln_engine::infer::tiling::RECEPTIVE_RADIUS)]
    pub context: usize,
    /// Model whose weights run in --stream-dims (default: random weights).
    #[arg(long)]
    pub model: Option<PathBuf>,
}

pub fn bench(a: &BenchArgs) -> Result<()> {
    super::args::check_fp16_on_cpu(a.fp16, a.device == BenchDevice::Cpu)?;
    if a.bf16 && a.device == BenchDevice::Cpu {
        anyhow::bail!("--bf16 applies to the GPU only (the CPU computes in f32): drop --bf16, or use --device cuda");
    }
    use rln_engine::bench;
    use rln_engine::tensor::Shape;
    if a.device == BenchDevice::Cuda {
        use rln_engine::backend::cuda::CudaOptions;
        use rln_engine::bench::cuda_infer as cb;
        let opts = if a.bf16 {
            CudaOptions::bf16()
        } else if a.fp16 {
            CudaOptions::f16()
        } else {
            CudaOptions::f32()
        };
        let r = cb::run(&cb::BenchOptions::new(opts))?;
        if a.json {
            println!("{}", serde_json::to_string_pretty(&r)?);
        } else {
            println!("{}", r.table());
        }
        return Ok(());
    }
    let t = std::time::Duration::from_secs_f64(a.min_time);
    let mut rows = Vec::new();
    if let (Some(dims), Some(core)) = (a.stream_dims, a.tile) {
        if a.device != BenchDevice::Cpu {
            bail!("--stream-dims measures the CPU network; run it with --device cpu");
        }
        let model = match &a.model {
            Some(p) => Model::<f32>::load(p)?,
            None => Model::<f32>::init(rln_engine::model::ModelConfig::default(), 7),
        };
        let mut cpu = rln_engine::infer::CpuPredictor { model };
        rows.push(bench::stream_network_only(
            &mut cpu, dims, core, a.context, a.min_runs, t,
        )?);
        let report = bench::BenchReport {
            device: bench::cpu_name(),
            threads: rln_engine::threads(),
            isa: rln_engine::backend::cpu::simd::isa().name().to_string(),
            rows,
        };
        if a.json {
            println!("{}", serde_json::to_string_pretty(&report)?);
        } else {
            bench::print_report(&report);
        }
        return Ok(());
    }
    for shape in [Shape::new(4, 1, 64, 64, 64), Shape::new(1, 1, 128, 128, 128)] {
        if !a.json {
            eprintln!("timing the network on {shape} ...");
        }
        rows.extend(bench::cpu_network(shape, a.min_runs, t)?);
    }
    if !a.json {
        eprintln!("timing one training step on 4×1×64×64×64 ...");
    }
    rows.push(bench::train_step(Shape::new(4, 1, 64, 64, 64), a.min_runs, t)?);
    // tiles as `infer` chooses them by default (its default --memory)
    let model = rln_engine::model::Model::<f32>::init(rln_engine::model::ModelConfig::default(), 7);
    let mut cpu = rln_engine::infer::CpuPredictor { model };
    let max_window = rln_engine::infer::stream::choose_window(
        rln_engine::infer::stream::default_memory(),
        rln_engine::infer::TilePredictor::bytes_per_voxel(&cpu),
        1,
        rln_engine::infer::stream::pipeline::PipelineOptions::default().prefetch,
    );
    let core =
        rln_engine::infer::stream::plan::budget_core([256; 3], rln_engine::infer::tiling::RECEPTIVE_RADIUS, max_window);
    if !a.json {
        eprintln!("timing tiled inference of a 256×256×256 volume (cores of at most {core:?}, as infer chooses) ...");
    }
    rows.push(bench::tiled_inference(&mut cpu, [256; 3], core, a.min_runs.min(2), t)?);
    if !a.json {
        eprintln!("timing Richardson–Lucy on 64×256×256 (31³ PSF) ...");
    }
    rows.push(bench::richardson_lucy(10)?);
    let report = bench::BenchReport {
        device: bench::cpu_name(),
        threads: rln_engine::threads(),
        isa: rln_engine::backend::cpu::isa().name().to_string(),
        rows,
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        bench::print_report(&report);
    }
    Ok(())
}

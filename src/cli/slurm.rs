//! `rln-engine plan` and `rln-engine finalize`: one volume over a Slurm job array.

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use rln_engine::imaging::io::OutputDtype;
use rln_engine::slurm::{self, BlockJob, PlanRequest, SchedulerOptions, StoreOptions, TaskDevice};
use std::path::{Path, PathBuf};

use super::args::parse_bytes;
use super::args::{parse_dims, parse_range};

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum PlanDevice {
    /// Every task on a GPU (fails on a node without one: no silent CPU fallback).
    Cuda,
    /// Every task on the CPU.
    Cpu,
}

#[derive(Args, Debug)]
#[command(after_long_help = PLAN_NOTES)]
pub struct PlanArgs {
    /// Model file.
    pub model: PathBuf,
    /// Input volume (an OME-Zarr folder reads by chunk; any format `infer` reads works).
    pub input: PathBuf,
    /// Output OME-Zarr store (*.zarr) every task writes its block into.
    #[arg(short, long)]
    pub output: PathBuf,
    /// Number of blocks = array tasks (each a contiguous run of whole tile cores).
    #[arg(long, required_unless_present = "block_size", conflicts_with = "block_size")]
    pub blocks: Option<usize>,
    /// Instead of --blocks: blocks of about this many voxels (z,y,x) of tile cores each.
    #[arg(long, value_parser = parse_dims)]
    pub block_size: Option<[usize; 3]>,
    /// Normalization statistics shared by every task (measured once here); default
    /// STORE.norm.json beside the store.
    #[arg(long, value_name = "FILE")]
    pub norm_stats: Option<PathBuf>,
    /// Slurm partition (#SBATCH --partition).
    #[arg(long)]
    pub partition: Option<String>,
    /// Slurm account (#SBATCH --account).
    #[arg(long)]
    pub account: Option<String>,
    /// Time limit per task (#SBATCH --time), e.g. 01:00:00.
    #[arg(long)]
    pub time: Option<String>,
    /// Memory per task (#SBATCH --mem), e.g. 32G.
    #[arg(long)]
    pub mem: Option<String>,
    /// Generic resources per task (#SBATCH --gres); default gpu:1 with --device cuda.
    #[arg(long)]
    pub gres: Option<String>,
    /// CPU cores per task (#SBATCH --cpus-per-task; the task's --threads).
    #[arg(long)]
    pub cpus_per_task: Option<usize>,
    /// At most K array tasks at once (--array=…%K).
    #[arg(long, value_name = "K")]
    pub array_max: Option<usize>,
    /// Device of every task (never auto: a GPU job on a node without a GPU must fail).
    #[arg(long, value_enum, default_value_t = PlanDevice::Cuda)]
    pub device: PlanDevice,
    /// FP16 storage on the GPU (FP32 accumulation), passed to every task.
    #[arg(long)]
    pub fp16: bool,
    /// Submit the array and the dependent finalizing job (sbatch) and print their ids.
    #[arg(long)]
    pub submit: bool,
    /// Submit only the blocks without a done marker (after failures), and a new
    /// finalizing job; creates nothing.
    #[arg(long)]
    pub resubmit: bool,
    /// Pyramid levels the finalizing job writes (2× averaging each).
    #[arg(long, default_value_t = 0, value_name = "L")]
    pub pyramid: usize,
    /// The array script to write; default STORE.sbatch (the finalizing job's:
    /// STORE.finalize.sbatch).
    #[arg(long, value_name = "FILE")]
    pub script: Option<PathBuf>,
    /// Largest tile core (z,y,x), fixed in the store's plan for every task; size it for
    /// the GPU the tasks run on (README: "Scale out on a cluster").
    #[arg(long, value_parser = parse_dims)]
    pub tile: Option<[usize; 3]>,
    /// Memory for tiles (e.g. 8G) the tile size is chosen from, instead of --tile.
    #[arg(long, value_parser = parse_bytes)]
    pub memory: Option<usize>,
    /// Chunk shape (z,y,x) of the store; default 64,64,64.
    #[arg(long, value_parser = parse_dims)]
    pub chunks: Option<[usize; 3]>,
    /// Normalization percentiles LOW,HIGH instead of the model's, or of its fixed
    /// normalization (as `infer`).
    #[arg(long, value_parser = parse_range)]
    pub percentiles: Option<(f64, f64)>,
    /// Keep the network's normalized output (as `infer`).
    #[arg(long)]
    pub no_rescale: bool,
    /// Sample type of the store (f32, f16 or u16).
    #[arg(long, default_value = "f32")]
    pub output_dtype: OutputDtype,
    /// Print what was done as JSON.
    #[arg(long)]
    pub json: bool,
}

const PLAN_NOTES: &str = "\
One command plans and submits:
  rln-engine plan MODEL IN.ome.zarr -o OUT.ome.zarr --blocks 64 --partition gpu \\
      --gres gpu:1 --time 01:00:00 --mem 32G --cpus-per-task 8 --submit
It measures the normalization once (STORE.norm.json), creates the store and its tile
plan, writes STORE.sbatch (one array task per block: `infer --block $SLURM_ARRAY_TASK_ID/N
--resume`, log STORE.logs/block-<I>.out) and STORE.finalize.sbatch (`rln-engine finalize`,
after the array: afterany), and submits both. After failures (time limit, a lost node):
the same command with --resubmit instead of --submit submits only the blocks without a
done marker. `rln-engine finalize` fails, listing the missing blocks, until all are done.";

#[derive(Args, Debug)]
pub struct FinalizeArgs {
    /// The store the blocks were written into.
    pub store: PathBuf,
    /// Number of blocks it was split into; default: the one count with markers.
    #[arg(long)]
    pub blocks: Option<usize>,
    /// Pyramid levels to write (2× averaging each).
    #[arg(long, default_value_t = 0, value_name = "L")]
    pub pyramid: usize,
}

/// An absolute path to an existing file or folder (tasks start elsewhere).
fn absolute_existing(p: &Path, what: &str) -> Result<PathBuf> {
    p.canonicalize()
        .with_context(|| format!("{what} {}: not found", p.display()))
}

/// An absolute path whose folder exists (the file itself may not yet).
fn absolute_new(p: &Path, what: &str) -> Result<PathBuf> {
    let name = match p.file_name() {
        Some(n) => n,
        None => bail!("{what} {}: give a file or folder name", p.display()),
    };
    let dir = match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let dir = dir
        .canonicalize()
        .with_context(|| format!("{what} {}: its folder does not exist; create it first", p.display()))?;
    Ok(dir.join(name))
}

pub fn plan(a: &PlanArgs) -> Result<()> {
    if a.submit && a.resubmit {
        bail!("--submit and --resubmit exclude each other: --submit for a new plan, --resubmit to rerun the missing blocks");
    }
    let store = absolute_new(&a.output, "store")?;
    let norm_stats = match &a.norm_stats {
        Some(p) => absolute_new(p, "--norm-stats")?,
        None => slurm::sibling(&store, ".norm.json"),
    };
    let device = match a.device {
        PlanDevice::Cuda => TaskDevice::Cuda,
        PlanDevice::Cpu => TaskDevice::Cpu,
    };
    if device == TaskDevice::Cpu && a.fp16 {
        bail!("--fp16 applies to GPU tasks; drop it or use --device cuda");
    }
    let gres = match (&a.gres, device) {
        (Some(g), _) => Some(g.clone()),
        (None, TaskDevice::Cuda) => Some("gpu:1".to_string()),
        (None, TaskDevice::Cpu) => None,
    };
    let mut task_args = Vec::new();
    if let Some((lo, hi)) = a.percentiles {
        task_args.extend(["--percentiles".to_string(), format!("{lo},{hi}")]);
    }
    task_args.extend([
        "--output-dtype".to_string(),
        format!("{:?}", a.output_dtype).to_lowercase(),
    ]);
    if a.no_rescale {
        task_args.push("--no-rescale".into());
    }
    if a.fp16 {
        task_args.push("--fp16".into());
    }
    let binary = std::env::current_exe().context("finding the rln-engine binary the tasks will run")?;
    let req = PlanRequest {
        job: BlockJob {
            binary,
            model: absolute_existing(&a.model, "model")?,
            input: absolute_existing(&a.input, "input")?,
            store: store.clone(),
            norm_stats,
            blocks: a.blocks.unwrap_or(1),
            device,
            pyramid: a.pyramid,
            task_args,
        },
        block_size: a.block_size,
        store: StoreOptions {
            tile: a.tile,
            memory: a.memory,
            chunks: a.chunks,
            percentiles: a.percentiles.map(|(lo, hi)| [lo, hi]),
            output_dtype: a.output_dtype,
            rescale_output: !a.no_rescale,
        },
        sched: SchedulerOptions {
            partition: a.partition.clone(),
            time: a.time.clone(),
            mem: a.mem.clone(),
            gres,
            cpus_per_task: a.cpus_per_task,
            array_max: a.array_max,
            account: a.account.clone(),
        },
        script: match &a.script {
            Some(p) => absolute_new(p, "--script")?,
            None => slurm::sibling(&store, ".sbatch"),
        },
        submit: a.submit,
        resubmit: a.resubmit,
    };
    let o = slurm::plan(&req)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&o)?);
        return Ok(());
    }
    println!(
        "{}: {} tile(s) in {} block(s), {} not done",
        o.store.display(),
        o.tiles,
        o.blocks,
        o.missing.len()
    );
    println!("array script:    {}", o.script.display());
    println!("finalize script: {}", o.finalize_script.display());
    println!("task logs:       {}/block-<I>.out", slurm::log_dir(&o.store).display());
    match (&o.array_job, &o.finalize_job) {
        (Some(j), Some(f)) => {
            println!(
                "submitted array job {j} (--array={}) and finalize job {f} (after it)",
                o.array.as_deref().unwrap_or("")
            );
        }
        (None, Some(f)) => println!("every block is done; submitted finalize job {f}"),
        _ => println!(
            "submit with: sbatch {s} && sbatch --dependency=afterany:<array job id> {f}\n(or rerun with --submit)",
            s = o.script.display(),
            f = o.finalize_script.display()
        ),
    }
    Ok(())
}

pub fn finalize(a: &FinalizeArgs) -> Result<()> {
    let o = slurm::finalize(&a.store, a.blocks, a.pyramid)?;
    println!(
        "{}: all {} blocks done{}; {}",
        o.store.display(),
        o.blocks,
        if o.pyramid_levels > 0 {
            format!(", {} pyramid level(s) written", o.pyramid_levels)
        } else {
            String::new()
        },
        if o.marked_now {
            "marked complete"
        } else {
            "was complete already"
        }
    );
    Ok(())
}

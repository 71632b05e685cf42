//! Scale-out through Slurm job arrays: one array task per block of one OME-Zarr store.
//!
//! The store and the tile plan are made once (`infer --create-only`, the same function
//! `rln-engine plan` calls); array task `I` of `N` runs `rln-engine infer --block I/N
//! --resume`, which computes block `I`'s chunk-aligned tile cores into the store and then
//! writes the marker `STORE/.rln/blocks/N/I.done`. A dependent job runs
//! `rln-engine finalize`, which checks every marker, writes pyramid levels if asked and
//! marks the store complete. Blocks own disjoint chunks, so tasks never write the same
//! chunk, and a task killed part-way leaves no marker: resubmitting only the blocks
//! without one ([`missing_blocks`], [`array_spec`]) finishes the store.
//!
//! This module writes the batch scripts (plain text, unit-tested), submits them with
//! `sbatch --parsable` and finalizes; it schedules nothing itself: the cluster's Slurm
//! does.

use crate::error::{Error, Result};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The device each array task computes on. There is no `auto`: inside a GPU job a task
/// on a node without a usable GPU must fail, not fall back to the CPU silently.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TaskDevice {
    Cpu,
    Cuda,
}

impl TaskDevice {
    pub fn as_arg(self) -> &'static str {
        match self {
            TaskDevice::Cpu => "cpu",
            TaskDevice::Cuda => "cuda",
        }
    }
}

/// Options passed through to `#SBATCH` lines (None: the cluster's default).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SchedulerOptions {
    pub partition: Option<String>,
    pub time: Option<String>,
    pub mem: Option<String>,
    /// e.g. `gpu:1`; only the array tasks ask for it, not the finalizing job.
    pub gres: Option<String>,
    pub cpus_per_task: Option<usize>,
    /// At most this many array tasks at once (`--array=…%K`).
    pub array_max: Option<usize>,
    /// `--account`, if the cluster bills by account.
    pub account: Option<String>,
}

/// Everything a block task needs: absolute paths, the block count, the device.
#[derive(Clone, Debug)]
pub struct BlockJob {
    /// The `rln-engine` binary the tasks run (absolute: tasks start in another folder).
    pub binary: PathBuf,
    pub model: PathBuf,
    pub input: PathBuf,
    pub store: PathBuf,
    pub norm_stats: PathBuf,
    pub blocks: usize,
    pub device: TaskDevice,
    /// Pyramid levels `finalize` writes (0: none).
    pub pyramid: usize,
    /// More `infer` arguments every task passes (those the store's plan is checked
    /// against, e.g. `--percentiles`, `--output-dtype`; and `--fp16`).
    pub task_args: Vec<String>,
}

/// File names beside the store: `STORE.sbatch`, `STORE.finalize.sbatch`, `STORE.logs/`.
pub fn sibling(store: &Path, suffix: &str) -> PathBuf {
    let mut s = store.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// The per-task log folder: `STORE.logs` (task logs `block-<I>.out`, `finalize.out`).
pub fn log_dir(store: &Path) -> PathBuf {
    sibling(store, ".logs")
}

/// The marker block `i` of `n` writes when done (the layout of `infer --block`; tests
/// use it to fake finished blocks).
pub fn block_marker(store: &Path, i: usize, n: usize) -> PathBuf {
    store
        .join(".rln")
        .join("blocks")
        .join(n.to_string())
        .join(format!("{i}.done"))
}

/// The blocks of `n` whose marker is missing, ascending.
pub fn missing_blocks(store: &Path, n: usize) -> Vec<usize> {
    (0..n)
        .filter(|&i| !crate::infer::stream::block_done(store, i, n))
        .collect()
}

/// A Slurm `--array` value for these task ids: consecutive runs folded into ranges
/// (`0-3,5,7-9`), then `%K` if at most `max` may run at once.
pub fn array_spec(ids: &[usize], max: Option<usize>) -> String {
    let mut ids = ids.to_vec();
    ids.sort_unstable();
    ids.dedup();
    let mut out = String::new();
    let mut k = 0;
    while k < ids.len() {
        let start = ids[k];
        let mut end = start;
        while k + 1 < ids.len() && ids[k + 1] == end + 1 {
            k += 1;
            end += 1;
        }
        if !out.is_empty() {
            out.push(',');
        }
        if end == start {
            let _ = write!(out, "{start}");
        } else {
            let _ = write!(out, "{start}-{end}");
        }
        k += 1;
    }
    if let Some(m) = max {
        let _ = write!(out, "%{m}");
    }
    out
}

/// `s` as one shell word: single quotes, with `'` written as `'\''`.
pub fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/._-+=:,@%".contains(&b))
    {
        return s.to_string();
    }
    format!("'{}'", s.replace('\'', r"'\''"))
}

fn path_str<'a>(p: &'a Path, what: &str) -> Result<&'a str> {
    let s = p
        .to_str()
        .ok_or_else(|| Error::invalid(format!("{what} path {} is not UTF-8; rename it", p.display())))?;
    if s.contains(['\n', '\r', '"']) {
        return Err(Error::invalid(format!(
            "{what} path {s:?} contains a newline or a double quote, which a Slurm script cannot carry; rename it"
        )));
    }
    Ok(s)
}

/// A value for an `#SBATCH` line: sbatch reads these lines itself (no shell), so only
/// plain characters are allowed.
fn sbatch_value(v: &str, what: &str) -> Result<String> {
    if v.is_empty()
        || !v
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/._-+=:,@%[]".contains(&b))
    {
        return Err(Error::invalid(format!(
            "--{what} {v:?}: a Slurm option value may hold letters, digits and /._-+=:,@%[] only"
        )));
    }
    Ok(v.to_string())
}

/// An `#SBATCH --output` path: double-quoted when it holds spaces (sbatch strips them).
fn sbatch_path(p: &Path, what: &str) -> Result<String> {
    let s = path_str(p, what)?;
    Ok(if s.contains(char::is_whitespace) {
        format!("\"{s}\"")
    } else {
        s.to_string()
    })
}

impl BlockJob {
    fn check(&self) -> Result<()> {
        if self.blocks == 0 {
            return Err(Error::invalid("--blocks must be at least 1"));
        }
        for (p, what) in [
            (&self.binary, "rln-engine binary"),
            (&self.model, "model"),
            (&self.input, "input"),
            (&self.store, "store"),
            (&self.norm_stats, "norm-stats"),
        ] {
            if !p.is_absolute() {
                return Err(Error::invalid(format!(
                    "{what} path {} must be absolute in a batch script (tasks start elsewhere)",
                    p.display()
                )));
            }
            path_str(p, what)?;
        }
        Ok(())
    }

    /// Slurm's job name for this store's tasks: `rln-<store file name>`.
    pub fn job_name(&self) -> String {
        let name = self
            .store
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let clean: String = name
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || "._-".contains(c) {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        format!("rln-{clean}")
    }

    fn common_header(&self, s: &mut String, sched: &SchedulerOptions) -> Result<()> {
        if let Some(p) = &sched.partition {
            let _ = writeln!(s, "#SBATCH --partition={}", sbatch_value(p, "partition")?);
        }
        if let Some(a) = &sched.account {
            let _ = writeln!(s, "#SBATCH --account={}", sbatch_value(a, "account")?);
        }
        if let Some(t) = &sched.time {
            let _ = writeln!(s, "#SBATCH --time={}", sbatch_value(t, "time")?);
        }
        if let Some(m) = &sched.mem {
            let _ = writeln!(s, "#SBATCH --mem={}", sbatch_value(m, "mem")?);
        }
        Ok(())
    }

    /// The job-array script: task `$SLURM_ARRAY_TASK_ID` computes that block; its log is
    /// `STORE.logs/block-<I>.out` (appended, so a resubmitted task's log keeps the
    /// failed attempt above it). Each attempt logs a `start` and an `exit` line with the
    /// job id and a timestamp.
    pub fn array_script(&self, sched: &SchedulerOptions) -> Result<String> {
        self.check()?;
        let n = self.blocks;
        let bin = shell_quote(path_str(&self.binary, "binary")?);
        let mut s = String::new();
        let _ = writeln!(s, "#!/bin/bash");
        let _ = writeln!(
            s,
            "# Written by `rln-engine plan` ({} {}): one Slurm array task per block of\n# {}.",
            env!("CARGO_PKG_NAME"),
            env!("CARGO_PKG_VERSION"),
            self.store.display()
        );
        let _ = writeln!(
            s,
            "# `sbatch THIS` runs every block (finished ones exit at once: --resume);\n# `rln-engine plan … --resubmit` submits only the blocks without a done marker.\n# Afterwards `rln-engine finalize` (the .finalize.sbatch job) marks the store complete."
        );
        let _ = writeln!(s, "#SBATCH --job-name={}", self.job_name());
        let _ = writeln!(
            s,
            "#SBATCH --array={}",
            array_spec(&(0..n).collect::<Vec<_>>(), sched.array_max)
        );
        let _ = writeln!(
            s,
            "#SBATCH --output={}",
            sbatch_path(&log_dir(&self.store).join("block-%a.out"), "log")?
        );
        let _ = writeln!(s, "#SBATCH --open-mode=append");
        let _ = writeln!(s, "#SBATCH --ntasks=1");
        if let Some(c) = sched.cpus_per_task {
            if c == 0 {
                return Err(Error::invalid("--cpus-per-task must be at least 1"));
            }
            let _ = writeln!(s, "#SBATCH --cpus-per-task={c}");
        }
        if let Some(g) = &sched.gres {
            let _ = writeln!(s, "#SBATCH --gres={}", sbatch_value(g, "gres")?);
        }
        self.common_header(&mut s, sched)?;
        let _ = writeln!(s, "set -u");
        let _ = writeln!(s, "block=\"$SLURM_ARRAY_TASK_ID\"");
        let _ = writeln!(
            s,
            "echo \"rln-engine block $block/{n} job ${{SLURM_ARRAY_JOB_ID}}_$block on $(hostname) start $(date +%s.%N)\""
        );
        let mut cmd = format!(
            "{bin} --threads \"${{SLURM_CPUS_PER_TASK:-0}}\" infer {} {} -o {} --block \"$block/{n}\" --norm-stats {} --resume --json --device {}",
            shell_quote(path_str(&self.model, "model")?),
            shell_quote(path_str(&self.input, "input")?),
            shell_quote(path_str(&self.store, "store")?),
            shell_quote(path_str(&self.norm_stats, "norm-stats")?),
            self.device.as_arg()
        );
        for a in &self.task_args {
            if a.contains(['\n', '\r']) {
                return Err(Error::invalid(format!("infer argument {a:?} holds a newline")));
            }
            cmd.push(' ');
            cmd.push_str(&shell_quote(a));
        }
        let _ = writeln!(s, "{cmd}");
        let _ = writeln!(s, "status=$?");
        let _ = writeln!(
            s,
            "echo \"rln-engine block $block/{n} job ${{SLURM_ARRAY_JOB_ID}}_$block exit $status $(date +%s.%N)\""
        );
        let _ = writeln!(s, "exit $status");
        Ok(s)
    }

    /// The finalizing job's script: `rln-engine finalize STORE --blocks N [--pyramid L]`,
    /// submitted with `--dependency=afterany:<array job>` (it runs whatever the tasks'
    /// fate, checks every marker itself and fails listing the missing blocks).
    pub fn finalize_script(&self, sched: &SchedulerOptions) -> Result<String> {
        self.check()?;
        let mut s = String::new();
        let _ = writeln!(s, "#!/bin/bash");
        let _ = writeln!(
            s,
            "# Written by `rln-engine plan`: checks that every block of {} is done,\n# writes the pyramid levels and marks the store complete.",
            self.store.display()
        );
        let _ = writeln!(s, "#SBATCH --job-name={}-finalize", self.job_name());
        let _ = writeln!(
            s,
            "#SBATCH --output={}",
            sbatch_path(&log_dir(&self.store).join("finalize.out"), "log")?
        );
        let _ = writeln!(s, "#SBATCH --open-mode=append");
        let _ = writeln!(s, "#SBATCH --ntasks=1");
        let _ = writeln!(s, "#SBATCH --cpus-per-task=1");
        self.common_header(&mut s, sched)?;
        let mut cmd = format!(
            "{} --threads 1 finalize {} --blocks {}",
            shell_quote(path_str(&self.binary, "binary")?),
            shell_quote(path_str(&self.store, "store")?),
            self.blocks
        );
        if self.pyramid > 0 {
            let _ = write!(cmd, " --pyramid {}", self.pyramid);
        }
        let _ = writeln!(s, "exec {cmd}");
        Ok(s)
    }
}

/// Runs `sbatch --parsable EXTRA… SCRIPT` and returns the job id it prints.
pub fn sbatch(script: &Path, extra: &[String]) -> Result<String> {
    let out = Command::new("sbatch")
        .arg("--parsable")
        .args(extra)
        .arg(script)
        .output()
        .map_err(|e| {
            Error::invalid(format!(
                "could not run sbatch ({e}): is Slurm installed and on PATH on this (login) node?"
            ))
        })?;
    if !out.status.success() {
        return Err(Error::invalid(format!(
            "sbatch {} failed ({}): {}",
            script.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    // `--parsable` prints "JOBID" or "JOBID;CLUSTER"
    let text = String::from_utf8_lossy(&out.stdout);
    let id = text.trim().split(';').next().unwrap_or("").to_string();
    if id.is_empty() || !id.bytes().all(|b| b.is_ascii_digit()) {
        return Err(Error::invalid(format!("sbatch printed {text:?}, not a job id")));
    }
    Ok(id)
}

/// The ids of this job name's array tasks still pending or running (squeue), so a
/// resubmission never runs a block twice at once. `None` if squeue cannot be asked.
pub fn queued_jobs(job_name: &str) -> Option<Vec<String>> {
    let out = Command::new("squeue")
        .args(["-h", "-n", job_name, "-o", "%i"])
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    Some(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| l.trim().to_string())
            .filter(|l| !l.is_empty())
            .collect(),
    )
}

/// The options of `infer --create-only` that fix the store and its tile plan (the
/// tasks read the plan from the store; `task_args` repeats those it is checked against).
#[derive(Clone, Debug)]
pub struct StoreOptions {
    /// Largest tile core (z,y,x); None: from `memory`.
    pub tile: Option<[usize; 3]>,
    /// Memory for the tiles in flight (bytes) the tile size is chosen from.
    pub memory: Option<usize>,
    /// Chunk shape of the store.
    pub chunks: Option<[usize; 3]>,
    pub percentiles: Option<[f64; 2]>,
    pub output_dtype: crate::imaging::io::OutputDtype,
    pub rescale_output: bool,
}

/// What `rln-engine plan` is asked to do.
#[derive(Clone, Debug)]
pub struct PlanRequest {
    /// The block job; with `block_size`, `job.blocks` is ignored and computed.
    pub job: BlockJob,
    /// Blocks of about this many voxels (z·y·x) of tile cores, instead of `job.blocks`.
    pub block_size: Option<[usize; 3]>,
    pub store: StoreOptions,
    pub sched: SchedulerOptions,
    /// The array script's path; the finalizing job's is beside it (`.finalize.sbatch`).
    pub script: PathBuf,
    /// Submit the array and the dependent finalizing job.
    pub submit: bool,
    /// Do not create anything: submit the blocks of the existing store without a marker.
    pub resubmit: bool,
}

/// What `plan` did.
#[derive(Clone, Debug, serde::Serialize)]
pub struct PlanOutcome {
    pub store: PathBuf,
    pub script: PathBuf,
    pub finalize_script: PathBuf,
    pub blocks: usize,
    pub tiles: usize,
    /// Blocks without a done marker when planning ended.
    pub missing: Vec<usize>,
    /// The job id of the array (None when nothing was submitted or no block was missing).
    pub array_job: Option<String>,
    pub finalize_job: Option<String>,
    /// The `--array` value submitted.
    pub array: Option<String>,
}

/// The finalizing script beside the array script: `X.sbatch` → `X.finalize.sbatch`.
pub fn finalize_script_path(script: &Path) -> PathBuf {
    let s = script.to_string_lossy();
    match s.strip_suffix(".sbatch") {
        Some(stem) => PathBuf::from(format!("{stem}.finalize.sbatch")),
        None => PathBuf::from(format!("{s}.finalize")),
    }
}

/// Creates (or checks) the store and its norm stats, writes both batch scripts and, if
/// asked, submits them: the array (all blocks, or with `resubmit` only those without a
/// marker) and the finalizing job after it (`afterany`: it checks the markers itself).
pub fn plan(req: &PlanRequest) -> Result<PlanOutcome> {
    let mut job = req.job.clone();
    if req.resubmit {
        if !job.store.is_dir() {
            return Err(Error::invalid(format!(
                "{} does not exist: --resubmit continues a planned store; run `rln-engine plan` without it first",
                job.store.display()
            )));
        }
    } else {
        // a plan file refers to the input and model by path, and tasks must never write
        // into one of them
        for (p, what) in [(&job.model, "model"), (&job.input, "input")] {
            if same_path(p, &job.store) || same_path(p, &job.norm_stats) {
                return Err(Error::invalid(format!(
                    "the store or norm-stats path {} is the {what}: choose another -o / --norm-stats",
                    p.display()
                )));
            }
        }
        create_store(&job, &req.store)?;
    }
    let tiles = store_tile_count(&job.store)?;
    if let Some(bs) = req.block_size {
        job.blocks = blocks_for_size(&job.store, bs)?;
    }
    if job.blocks == 0 || job.blocks > tiles {
        return Err(Error::invalid(format!(
            "--blocks {}: the store's plan has {tiles} tile(s); use 1 to {tiles} blocks (a block is a run of whole tiles)",
            job.blocks
        )));
    }
    let finalize_path = finalize_script_path(&req.script);
    crate::fsutil::check_output_dir(&req.script)?;
    for p in [&req.script, &finalize_path] {
        if same_path(p, &job.model) || same_path(p, &job.input) {
            return Err(Error::invalid(format!(
                "--script {} is an input: choose another path",
                p.display()
            )));
        }
    }
    crate::fsutil::write_atomic(&req.script, job.array_script(&req.sched)?.as_bytes())?;
    crate::fsutil::write_atomic(&finalize_path, job.finalize_script(&req.sched)?.as_bytes())?;
    for p in [&req.script, &finalize_path] {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755));
    }
    // sbatch opens the log files on the node; their folder must exist
    let logs = log_dir(&job.store);
    std::fs::create_dir_all(&logs).map_err(|e| Error::io(&logs, e))?;

    let missing = missing_blocks(&job.store, job.blocks);
    let mut out = PlanOutcome {
        store: job.store.clone(),
        script: req.script.clone(),
        finalize_script: finalize_path.clone(),
        blocks: job.blocks,
        tiles,
        missing: missing.clone(),
        array_job: None,
        finalize_job: None,
        array: None,
    };
    if !(req.submit || req.resubmit) {
        return Ok(out);
    }
    if req.resubmit {
        if let Some(q) = queued_jobs(&job.job_name()) {
            if !q.is_empty() {
                return Err(Error::invalid(format!(
                    "jobs named {} are still queued or running ({}): wait for them (squeue) or cancel them (scancel) before resubmitting, so no block runs twice at once",
                    job.job_name(),
                    q.join(", ")
                )));
            }
        }
    }
    let ids: Vec<usize> = if req.resubmit {
        missing.clone()
    } else {
        (0..job.blocks).collect()
    };
    let mut dependency = Vec::new();
    if !ids.is_empty() {
        let spec = array_spec(&ids, req.sched.array_max);
        let id = sbatch(&req.script, &[format!("--array={spec}")])?;
        dependency.push(format!("--dependency=afterany:{id}"));
        out.array_job = Some(id);
        out.array = Some(spec);
    }
    out.finalize_job = Some(sbatch(&finalize_path, &dependency)?);
    Ok(out)
}

fn same_path(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(x), Ok(y)) => x == y,
        _ => a == b,
    }
}

/// What `finalize` found and did.
#[derive(Clone, Debug, serde::Serialize)]
pub struct FinalizeOutcome {
    pub store: PathBuf,
    pub blocks: usize,
    pub pyramid_levels: usize,
    /// False if the store was complete already (nothing was written).
    pub marked_now: bool,
}

/// The block counts N with markers under `STORE/.rln/blocks/N/`.
pub fn marked_block_counts(store: &Path) -> Vec<usize> {
    let mut ns: Vec<usize> = std::fs::read_dir(store.join(".rln").join("blocks"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    ns.sort_unstable();
    ns
}

/// Checks that every block of `blocks` (None: the one block count with markers) is
/// done, writes `pyramid` levels and marks the store complete; if a block is missing,
/// fails listing them and changes nothing.
pub fn finalize(store: &Path, blocks: Option<usize>, pyramid: usize) -> Result<FinalizeOutcome> {
    if !store.is_dir() {
        return Err(Error::invalid(format!(
            "{} is not a store (no such folder)",
            store.display()
        )));
    }
    let n = match blocks {
        Some(n) => n,
        None => match marked_block_counts(store).as_slice() {
            [n] => *n,
            [] => {
                return Err(Error::invalid(format!(
                    "{} has no block markers: no block has finished; give --blocks N to list the missing ones",
                    store.display()
                )))
            }
            many => {
                return Err(Error::invalid(format!(
                    "{} has markers of several block counts ({many:?}): give --blocks N",
                    store.display()
                )))
            }
        },
    };
    if n == 0 {
        return Err(Error::invalid("--blocks must be at least 1"));
    }
    let missing = missing_blocks(store, n);
    if !missing.is_empty() {
        return Err(Error::invalid(format!(
            "{} of {n} blocks of {} are not done: {} (task ids for sbatch --array); \
             rerun them with `rln-engine plan … --resubmit` (or sbatch --array={} on the block script), then finalize again",
            missing.len(),
            store.display(),
            array_spec(&missing, None),
            array_spec(&missing, None)
        )));
    }
    if pyramid > 0 {
        write_store_pyramid(store, pyramid)?;
    }
    let marked_now = !store_is_complete(store)?;
    if marked_now {
        mark_store_complete(store)?;
    }
    Ok(FinalizeOutcome {
        store: store.to_path_buf(),
        blocks: n,
        pyramid_levels: pyramid,
        marked_now,
    })
}

// ---- the store: block mode of `infer` (infer::stream) and the OME-Zarr store
// (imaging::stream::zarr)

/// `infer --create-only`: the norm stats (measured once, or read and checked if the
/// file exists), the store and its tile plan. On the CPU predictor: planning runs on a
/// login node; the tile size comes from `--tile` (or `--memory`), not from a GPU here.
fn create_store(job: &BlockJob, opts: &StoreOptions) -> Result<()> {
    use crate::infer::stream::{infer_file, InferFileOptions, PredictorChoice};
    let mut o = InferFileOptions::new(job.model.clone(), job.input.clone(), job.store.clone());
    o.predictor = PredictorChoice::Cpu;
    o.percentiles = opts.percentiles;
    o.rescale_output = opts.rescale_output;
    o.output_dtype = opts.output_dtype;
    o.chunks = opts.chunks;
    o.memory = opts.memory;
    o.tile = opts.tile;
    o.norm_stats = Some(job.norm_stats.clone());
    o.create_only = true;
    infer_file(&o).map(|_| ())
}

fn store_tile_count(store: &Path) -> Result<usize> {
    Ok(crate::infer::stream::load_store_plan(store)?.plan.count())
}

/// Blocks of about `block` voxels: that many voxels of whole tile cores per block.
fn blocks_for_size(store: &Path, block: [usize; 3]) -> Result<usize> {
    let plan = crate::infer::stream::load_store_plan(store)?.plan;
    let per_tile: usize = plan.core.iter().product();
    let per_block = (block.iter().product::<usize>() / per_tile.max(1)).max(1);
    Ok(plan.count().div_ceil(per_block))
}

fn write_store_pyramid(store: &Path, levels: usize) -> Result<()> {
    crate::imaging::stream::zarr::write_pyramid(store, levels)
}

fn store_is_complete(store: &Path) -> Result<bool> {
    crate::imaging::stream::zarr::is_complete(store)
}

fn mark_store_complete(store: &Path) -> Result<()> {
    crate::imaging::stream::zarr::mark_complete(store)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job() -> BlockJob {
        BlockJob {
            binary: "/opt/rln/bin/rln-engine".into(),
            model: "/data/models/my model.safetensors".into(),
            input: "/data/in/brain's.ome.zarr".into(),
            store: "/scratch/out/brain.ome.zarr".into(),
            norm_stats: "/scratch/out/brain.ome.zarr.norm.json".into(),
            blocks: 6,
            device: TaskDevice::Cuda,
            pyramid: 3,
            task_args: vec!["--percentiles".into(), "2,99.8".into(), "--fp16".into()],
        }
    }

    fn sched() -> SchedulerOptions {
        SchedulerOptions {
            partition: Some("gpu-a100".into()),
            time: Some("02:00:00".into()),
            mem: Some("64G".into()),
            gres: Some("gpu:1".into()),
            cpus_per_task: Some(8),
            array_max: Some(4),
            account: None,
        }
    }

    #[test]
    fn array_spec_folds_runs_and_throttles() {
        assert_eq!(array_spec(&[0, 1, 2, 3, 4, 5], None), "0-5");
        assert_eq!(array_spec(&[0, 1, 2, 3, 4, 5], Some(4)), "0-5%4");
        assert_eq!(array_spec(&[7, 2, 3, 5, 9, 8], Some(2)), "2-3,5,7-9%2");
        assert_eq!(array_spec(&[4], None), "4");
        assert_eq!(array_spec(&[1, 1, 2], None), "1-2");
    }

    #[test]
    fn shell_quote_keeps_one_word() {
        assert_eq!(shell_quote("/a/b.zarr"), "/a/b.zarr");
        assert_eq!(shell_quote("/a b/c"), "'/a b/c'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote("$HOME"), "'$HOME'");
        assert_eq!(shell_quote(""), "''");
    }

    #[test]
    fn array_script_passes_options_and_quotes_paths() {
        let s = job().array_script(&sched()).unwrap();
        for line in [
            "#SBATCH --job-name=rln-brain.ome.zarr",
            "#SBATCH --array=0-5%4",
            "#SBATCH --output=/scratch/out/brain.ome.zarr.logs/block-%a.out",
            "#SBATCH --partition=gpu-a100",
            "#SBATCH --time=02:00:00",
            "#SBATCH --mem=64G",
            "#SBATCH --gres=gpu:1",
            "#SBATCH --cpus-per-task=8",
        ] {
            assert!(s.lines().any(|l| l == line), "missing {line:?} in\n{s}");
        }
        let cmd = s.lines().find(|l| l.contains(" infer ")).unwrap();
        assert_eq!(
            cmd,
            "/opt/rln/bin/rln-engine --threads \"${SLURM_CPUS_PER_TASK:-0}\" infer \
             '/data/models/my model.safetensors' '/data/in/brain'\\''s.ome.zarr' \
             -o /scratch/out/brain.ome.zarr --block \"$block/6\" \
             --norm-stats /scratch/out/brain.ome.zarr.norm.json --resume --json --device cuda \
             --percentiles 2,99.8 --fp16"
        );
        assert!(!s.contains("auto"), "a batch script must never pass --device auto");
        // every #SBATCH line comes before the first command (sbatch stops reading there)
        let first_cmd = s.lines().position(|l| !l.starts_with('#')).unwrap();
        assert!(s.lines().skip(first_cmd).all(|l| !l.starts_with("#SBATCH")));
    }

    #[test]
    fn array_script_runs_the_quoted_command_in_bash() {
        // the quoting is right if bash splits the command into exactly the paths given
        let mut j = job();
        j.binary = "/bin/echo".into();
        let s = j.array_script(&SchedulerOptions::default()).unwrap();
        let out = Command::new("bash")
            .arg("-c")
            .arg(&s)
            .env("SLURM_ARRAY_TASK_ID", "3")
            .env("SLURM_ARRAY_JOB_ID", "77")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("rln-engine block 3/6 job 77_3 on "), "{text}");
        assert_eq!(
            lines[1],
            "--threads 0 infer /data/models/my model.safetensors /data/in/brain's.ome.zarr \
             -o /scratch/out/brain.ome.zarr --block 3/6 --norm-stats \
             /scratch/out/brain.ome.zarr.norm.json --resume --json --device cuda --percentiles 2,99.8 --fp16"
        );
        assert!(lines[2].starts_with("rln-engine block 3/6 job 77_3 exit 0 "), "{text}");
    }

    #[test]
    fn finalize_script_has_no_gres_and_passes_pyramid() {
        let s = job().finalize_script(&sched()).unwrap();
        assert!(s.contains("\nexec /opt/rln/bin/rln-engine --threads 1 finalize /scratch/out/brain.ome.zarr --blocks 6 --pyramid 3\n"), "{s}");
        assert!(!s.contains("--gres"), "the finalizing job needs no GPU:\n{s}");
        assert!(s.contains("#SBATCH --partition=gpu-a100\n"));
        assert!(s.contains("#SBATCH --output=/scratch/out/brain.ome.zarr.logs/finalize.out\n"));
        let mut j = job();
        j.pyramid = 0;
        assert!(!j.finalize_script(&sched()).unwrap().contains("--pyramid"));
    }

    #[test]
    fn bad_values_are_refused_with_the_option_named() {
        let mut s = sched();
        s.time = Some("2:00:00\n#SBATCH --exclusive".into());
        let e = job().array_script(&s).unwrap_err().to_string();
        assert!(e.contains("--time"), "{e}");
        let mut j = job();
        j.store = "relative/out.zarr".into();
        assert!(j.array_script(&sched()).unwrap_err().to_string().contains("absolute"));
        let mut j = job();
        j.blocks = 0;
        assert!(j.array_script(&sched()).is_err());
        let mut j = job();
        j.store = "/scratch/my out.zarr".into();
        let s = j.array_script(&sched()).unwrap();
        assert!(
            s.contains("#SBATCH --output=\"/scratch/my out.zarr.logs/block-%a.out\"\n"),
            "{s}"
        );
    }

    #[test]
    fn missing_blocks_lists_only_unmarked_ones() {
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("s.zarr");
        for i in [0, 2, 3] {
            let m = block_marker(&store, i, 5);
            std::fs::create_dir_all(m.parent().unwrap()).unwrap();
            std::fs::write(&m, b"").unwrap();
        }
        // a marker of another block count does not count for this one
        let other = block_marker(&store, 1, 4);
        std::fs::create_dir_all(other.parent().unwrap()).unwrap();
        std::fs::write(&other, b"").unwrap();
        assert_eq!(missing_blocks(&store, 5), vec![1, 4]);
        assert_eq!(array_spec(&missing_blocks(&store, 5), Some(2)), "1,4%2");
    }

    #[test]
    fn finalize_lists_missing_blocks_and_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("s.zarr");
        std::fs::create_dir_all(&store).unwrap();
        for i in [0, 1, 3] {
            let m = block_marker(&store, i, 6);
            std::fs::create_dir_all(m.parent().unwrap()).unwrap();
            std::fs::write(&m, b"").unwrap();
        }
        let before = std::fs::read_dir(store.join(".rln/blocks/6")).unwrap().count();
        let e = finalize(&store, None, 2).unwrap_err().to_string();
        assert!(e.contains("3 of 6 blocks"), "{e}");
        assert!(e.contains(": 2,4-5 "), "{e}");
        assert!(e.contains("--resubmit"), "{e}");
        assert_eq!(std::fs::read_dir(store.join(".rln/blocks/6")).unwrap().count(), before);
        assert_eq!(marked_block_counts(&store), vec![6]);
        let e = finalize(&dir.path().join("none.zarr"), Some(2), 0)
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a store"), "{e}");
    }

    #[test]
    fn finalize_script_path_sits_beside_the_array_script() {
        assert_eq!(
            finalize_script_path(Path::new("/a/b.zarr.sbatch")),
            PathBuf::from("/a/b.zarr.finalize.sbatch")
        );
        assert_eq!(
            finalize_script_path(Path::new("/a/run.sh")),
            PathBuf::from("/a/run.sh.finalize")
        );
    }
}

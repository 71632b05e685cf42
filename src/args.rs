//! The commands' shared argument handling, for the CLI and the bindings alike: the value
//! parsers (`parse_dims`, `parse_range`, `parse_bytes`, `finite_f64`, [`Device`]) and the
//! checks every subcommand runs before any work: outputs that would overwrite an input,
//! output paths, locks, thread counts, tile sizes, flags that do not apply to the chosen
//! device. The file-safety rules themselves live in `crate::fsutil`; this module only
//! gathers each command's roles and paths.

use crate::error::{Error, Result};
use crate::fsutil::{check_output_file, refuse_overwriting_inputs, OutputLock};
use std::path::Path;

/// Extensions a volume output may have (the format is chosen by it).
pub const VOLUME_EXTENSIONS: &[&str] = &["tif", "tiff", "h5", "hdf5", "zarr"];
/// Extensions of model and checkpoint files.
pub const MODEL_EXTENSIONS: &[&str] = &["safetensors"];

/// Held while a command writes its outputs: one lock per output, released on drop.
#[must_use = "the outputs are locked only while the guard lives"]
pub struct OutputGuard {
    _locks: Vec<OutputLock>,
}

/// One output of a command: its role in messages ("the output -o"), its path, and the
/// extensions it may have (empty: any).
pub struct Output<'a> {
    pub role: &'a str,
    pub path: &'a Path,
    pub extensions: &'a [&'a str],
}

/// Before any work: no output is an input or another output, every output path is
/// usable (folder exists and is writable, known extension), and every output is locked
/// against a second process writing it.
pub fn guard_outputs(outputs: &[Output<'_>], inputs: &[(&str, &Path)]) -> Result<OutputGuard> {
    let pairs: Vec<(&str, &Path)> = outputs.iter().map(|o| (o.role, o.path)).collect();
    refuse_overwriting_inputs(&pairs, inputs)?;
    for o in outputs {
        check_output_file(o.path, o.role, o.extensions)?;
    }
    let mut locks = Vec::with_capacity(outputs.len());
    for o in outputs {
        locks.push(OutputLock::acquire(o.path)?);
    }
    Ok(OutputGuard { _locks: locks })
}

/// The most threads `--threads` may ask for: 4 per core (at least 16). Beyond that the
/// pools only contend (10 000 threads made infer, rl and train appear to hang).
pub fn max_threads() -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    (4 * cores).max(16)
}

pub fn check_threads(threads: usize) -> Result<()> {
    let max = max_threads();
    if threads > max {
        return Err(Error::invalid(format!(
            "--threads {threads} is more than this machine can use: at most {max} (4 per core, {} cores); \
             0 (the default) uses one per core",
            std::thread::available_parallelism().map_or(1, |n| n.get())
        )));
    }
    Ok(())
}

/// The smallest tile core `--tile` may ask for, per axis. Each tile also reads the
/// network's context (18 voxels) on every side, so a smaller core spends almost all the
/// work on context (`--tile 0,0,0` planned 63 504 tiles of a 32×64×64 volume); an axis
/// of the volume shorter than this is one tile anyway.
pub const MIN_TILE_CORE: usize = 16;

pub fn check_tile(tile: Option<[usize; 3]>) -> Result<()> {
    if let Some(t) = tile {
        if t.iter().any(|&n| n < MIN_TILE_CORE) {
            return Err(Error::invalid(format!(
                "--tile {},{},{}: every tile core size must be at least {MIN_TILE_CORE} voxels (each tile also reads \
                 18 voxels of context on every side); leave --tile out to size tiles by --memory",
                t[0], t[1], t[2]
            )));
        }
    }
    Ok(())
}

/// `--fp16` is FP16 storage on the GPU; with `--device cpu` it would be silently ignored.
pub fn check_fp16_on_cpu(fp16: bool, cpu: bool) -> Result<()> {
    if fp16 && cpu {
        return Err(Error::invalid(
            "--fp16 applies to the GPU only (the CPU computes in f32): drop --fp16, or use --device cuda",
        ));
    }
    Ok(())
}

/// Parses a float option, rejecting NaN and infinities (clap's own parser accepts "NaN"
/// and "inf", which then flow into the computation and its output).
pub fn finite_f64(s: &str) -> Result<f64, String> {
    let v: f64 = s.trim().parse().map_err(|e| format!("{s:?} is not a number: {e}"))?;
    if v.is_finite() {
        Ok(v)
    } else {
        Err(format!("{s:?}: give a finite number"))
    }
}

/// [`finite_f64`] for f32 options (also rejecting values beyond f32's range).
pub fn finite_f32(s: &str) -> Result<f32, String> {
    let v = finite_f64(s)? as f32;
    if v.is_finite() {
        Ok(v)
    } else {
        Err(format!("{s:?} is beyond the float32 range"))
    }
}

/// Parses "LOW,HIGH" (or one value).
pub fn parse_range(s: &str) -> Result<(f64, f64), String> {
    let v: Vec<f64> = s
        .split(',')
        .map(|t| t.trim().parse::<f64>())
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{s:?}: {e}"))?;
    if v.iter().any(|x| !x.is_finite()) {
        return Err(format!("{s:?}: give finite numbers"));
    }
    match v.as_slice() {
        [a] => Ok((*a, *a)),
        [a, b] => Ok((*a, *b)),
        _ => Err(format!("{s:?}: give LOW,HIGH")),
    }
}

/// Parses "64" or "32,64,64" into (z, y, x).
pub fn parse_dims(s: &str) -> Result<[usize; 3], String> {
    let v: Vec<usize> = s
        .split([',', 'x', '×'])
        .map(|t| t.trim().parse::<usize>())
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{s:?}: {e}"))?;
    match v.as_slice() {
        [a] => Ok([*a; 3]),
        [z, y, x] => Ok([*z, *y, *x]),
        _ => Err(format!("{s:?}: give one size or three (z,y,x)")),
    }
}

/// Parses a memory size: "8G", "512M", "1.5GiB" or a number of bytes (`--memory`,
/// and `memory=` of the Python `infer_file`).
pub fn parse_bytes(s: &str) -> Result<usize, String> {
    let t = s.trim().to_ascii_lowercase();
    let t = t.trim_end_matches("ib").trim_end_matches('b');
    let (num, mult) = match t.chars().last() {
        Some('k') => (&t[..t.len() - 1], 1usize << 10),
        Some('m') => (&t[..t.len() - 1], 1 << 20),
        Some('g') => (&t[..t.len() - 1], 1 << 30),
        Some('t') => (&t[..t.len() - 1], 1 << 40),
        _ => (t, 1),
    };
    let v: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a size (e.g. 8G, 512M)"))?;
    if !(v > 0.0 && v.is_finite()) {
        return Err(format!("{s:?}: the size must be positive and finite"));
    }
    Ok((v * mult as f64) as usize)
}

/// Where a command computes (`--device`).
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Device {
    /// CUDA when a GPU is usable, else the CPU (with a notice).
    Auto,
    Cpu,
    Cuda,
}

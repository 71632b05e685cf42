//! The tiled inference loop: normalize, cut tiles out of z-slabs, predict, blend with
//! ramp weights, and emit finished planes — for one or two views (RLN-dual).

use super::tiling::{ramp_weights, PlaneSink, PlaneSource, TilePlan};
use super::TilePredictor;
use crate::error::{Error, Result};
use crate::imaging::normalize::{percentile_affine, percentiles};
use crate::model::{FixedNorm, ModelConfig, Variant};
use crate::tensor::{Shape, Tensor};
use rayon::prelude::*;
use serde::Serialize;

/// How input intensities are normalized before the network (spec §6–7).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum NormalizeMode {
    /// Percentiles of the whole volume (a strided subsample when it is large): no
    /// intensity steps between tiles. The output is mapped back to the input's range.
    Global,
    /// Each tile by its own percentiles, output multiplied by the tile's high
    /// percentile (the authors' scripts).
    PerTile,
}

/// v' = v·scale + offset.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Affine {
    pub scale: f64,
    pub offset: f64,
    /// The percentile values it came from.
    pub p_lo_value: f64,
    pub p_hi_value: f64,
}

impl Affine {
    pub fn from_percentile_values(lo: f64, hi: f64) -> Self {
        let (scale, offset) = percentile_affine(lo, hi);
        Affine {
            scale,
            offset,
            p_lo_value: lo,
            p_hi_value: hi,
        }
    }
    /// `low` → 0, `high` → 1: a model's fixed normalization (its low and high stand
    /// where the percentile values would; unlike the §6 map of percentile values, it
    /// has no special cases).
    pub fn two_point(low: f64, high: f64) -> Self {
        let (scale, offset) = FixedNorm::two_point_map(low, high);
        Affine {
            scale,
            offset,
            p_lo_value: low,
            p_hi_value: high,
        }
    }
    pub fn apply(&self, v: f32) -> f32 {
        (v as f64 * self.scale + self.offset) as f32
    }
    pub fn invert(&self, v: f32) -> f32 {
        ((v as f64 - self.offset) / self.scale) as f32
    }
}

/// The global normalization `config` prescribes for a whole source: its fixed values
/// when it has them (the source is then only checked for non-finite values, all of it
/// when it holds at most `max_samples` voxels), else [`estimate_normalization`].
pub fn model_normalization(src: &mut dyn PlaneSource, config: &ModelConfig, max_samples: usize) -> Result<Affine> {
    match &config.norm_fixed {
        Some(f) => {
            let [d, h, w] = src.dims();
            if d * h * w <= max_samples {
                check_finite(&src.read_planes(0, d)?)?;
            }
            Ok(Affine::two_point(f.low, f.high))
        }
        None => estimate_normalization(src, config.norm_percentiles, max_samples),
    }
}

/// Percentile normalization of a whole source, from at most `max_samples` voxels
/// (every k-th plane, and every j-th voxel of it, when the volume is larger).
pub fn estimate_normalization(src: &mut dyn PlaneSource, pct: [f64; 2], max_samples: usize) -> Result<Affine> {
    let [d, h, w] = src.dims();
    let plane = h * w;
    let total = d * plane;
    let mut sample = Vec::with_capacity(total.min(max_samples));
    if total <= max_samples {
        sample = src.read_planes(0, d)?.into_owned();
    } else {
        let planes = (max_samples / plane).clamp(1, d);
        let zstep = d.div_ceil(planes);
        let per_plane = (max_samples / planes.max(1)).max(1);
        let xstep = plane.div_ceil(per_plane).max(1);
        for z in (0..d).step_by(zstep) {
            let p = src.read_planes(z, z + 1)?;
            sample.extend(p.iter().step_by(xstep));
        }
    }
    check_finite(&sample)?;
    let v = percentiles(&sample, &pct)?;
    Ok(Affine::from_percentile_values(v[0], v[1]))
}

/// Degenerate normalization. When the normalization percentiles coincide (P_lo = P_hi),
/// the volume may be constant; then there is nothing to deconvolve: a constant is its own
/// deconvolution for any PSF that integrates to 1, whereas the network, which never saw
/// a featureless input, would invent structure at the borders (a constant 100 came out
/// as 3.7–99.5). So a constant volume is passed through unchanged (the caller warns).
/// Returns the constant when `aff` is degenerate and every voxel of `src` equals it
/// (one extra pass over the volume, only in that case); `None` otherwise. A volume whose
/// percentiles coincide but that is not constant (a sparse specimen on a flat
/// background) is normalized by spec §6 as usual.
pub fn constant_input(src: &mut dyn PlaneSource, aff: &Affine) -> Result<Option<f32>> {
    if aff.p_lo_value != aff.p_hi_value {
        return Ok(None);
    }
    let c = aff.p_lo_value as f32;
    if c as f64 != aff.p_lo_value {
        return Ok(None); // an interpolated percentile: not a value every voxel holds
    }
    let d = src.dims()[0];
    for z in 0..d {
        if src.read_planes(z, z + 1)?.iter().any(|&v| v != c) {
            return Ok(None);
        }
    }
    Ok(Some(c))
}

fn check_finite(v: &[f32]) -> Result<()> {
    match v.par_iter().position_first(|x| !x.is_finite()) {
        Some(i) => Err(Error::invalid(format!(
            "the input holds a non-finite value ({}) at voxel {i}: clean the volume (e.g. replace NaN with 0) before inference",
            v[i]
        ))),
        None => Ok(()),
    }
}

/// Writes window (z rows of `wd`, starting at (y0, x0)) of a slab of planes `[h, w]` into
/// `dst`, element by element through `f(value, old_dst_value)`; one z plane per task.
fn copy_window(
    dst: &mut [f32],
    slab: &[f32],
    wd: [usize; 3],
    [h, w]: [usize; 2],
    y0: usize,
    x0: usize,
    f: impl Fn(f32, f32) -> f32 + Sync,
) {
    dst.par_chunks_mut(wd[1] * wd[2]).enumerate().for_each(|(z, plane)| {
        for r in 0..wd[1] {
            let row = (z * h + y0 + r) * w + x0;
            for (d, &v) in plane[r * wd[2]..(r + 1) * wd[2]]
                .iter_mut()
                .zip(&slab[row..row + wd[2]])
            {
                *d = f(v, *d);
            }
        }
    });
}

/// Everything the tiled loop needs besides the data.
#[derive(Clone, Debug)]
pub struct StitchOptions {
    pub plan: TilePlan,
    pub normalize: NormalizeMode,
    pub percentiles: [f64; 2],
    /// Global mode: map the output back to the input's intensity range.
    pub rescale_output: bool,
    pub variant: Variant,
}

/// Where the time of [`run_tiled`] went (seconds).
#[derive(Clone, Debug, Default, Serialize)]
pub struct StitchTimes {
    /// Reading input planes from the sources (and checking them).
    pub read: f64,
    /// Cutting tiles out of the slabs and normalizing them.
    pub cut: f64,
    /// Inside the predictor (transfers and network), cut and blend excluded.
    pub predict: f64,
    /// Blending predictions into the accumulators.
    pub blend: f64,
    /// Dividing by the weights and handing planes to the sink.
    pub emit: f64,
    /// Set when the input was constant and passed through unchanged (see
    /// [`constant_input`]): the value, for the caller's warning.
    pub constant_input: Option<f32>,
}

/// Runs `pred` over every tile of `views` (one source, or two for RLN-dual) and writes
/// the blended prediction to `sink`, plane by plane in increasing z. `global` holds the
/// per-view normalization for [`NormalizeMode::Global`]. `progress(done, total)` is
/// called after each tile.
pub fn run_tiled(
    pred: &mut dyn TilePredictor,
    views: &mut [&mut dyn PlaneSource],
    global: &[Affine],
    sink: &mut dyn PlaneSink,
    opts: &StitchOptions,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<StitchTimes> {
    use std::time::Instant;
    let mut times = StitchTimes::default();
    let dims = opts.plan.dims;
    let n_views = opts.variant.views();
    if views.len() != n_views {
        return Err(Error::invalid(format!(
            "the model ({:?}) takes {n_views} view(s), {} given",
            opts.variant,
            views.len()
        )));
    }
    for v in views.iter() {
        if v.dims() != dims {
            return Err(Error::Shape(format!(
                "views differ in size: {:?} vs {:?}",
                v.dims(),
                dims
            )));
        }
    }
    if opts.normalize == NormalizeMode::Global && global.len() != n_views {
        return Err(Error::invalid("global normalization needs one affine per view"));
    }
    let [_, h, w] = dims;
    let plane = h * w;
    if opts.normalize == NormalizeMode::Global {
        // degenerate normalization: a constant input (every view) comes out unchanged
        let mut value = None;
        for (v, aff) in views.iter_mut().zip(global) {
            value = constant_input(&mut **v, aff)?;
            if value.is_none() {
                break;
            }
        }
        if let Some(c) = value {
            let out = if opts.rescale_output { c } else { global[0].apply(c) };
            let buf = vec![out; plane];
            for z in 0..dims[0] {
                sink.write_planes(z, &buf)?;
            }
            progress(opts.plan.count(), opts.plan.count());
            times.constant_input = Some(c);
            return Ok(times);
        }
    }
    let [az, ay, ax] = &opts.plan.axes;
    let total = opts.plan.count();
    let mut done = 0;
    // accumulators of the planes [acc_z0, acc_z0 + acc.len()/plane)
    let mut acc: Vec<f32> = Vec::new();
    let mut wsum: Vec<f32> = Vec::new();
    let mut acc_z0 = 0usize;
    let wy: Vec<Vec<f32>> = ay.iter().map(ramp_weights).collect();
    let wx: Vec<Vec<f32>> = ax.iter().map(ramp_weights).collect();
    let c_in = opts.variant.input_channels();
    for (iz, tz) in az.iter().enumerate() {
        let (z0, z1) = tz.window;
        let t_read = Instant::now();
        let slabs: Vec<std::borrow::Cow<'_, [f32]>> =
            views.iter_mut().map(|v| v.read_planes(z0, z1)).collect::<Result<_>>()?;
        for s in &slabs {
            check_finite(s)?;
        }
        times.read += t_read.elapsed().as_secs_f64();
        // grow the accumulators to cover this row's cores
        let need = (tz.core.1 - acc_z0) * plane;
        if acc.len() < need {
            acc.resize(need, 0.0);
            wsum.resize(need, 0.0);
        }
        let wz = ramp_weights(tz);
        let tiles: Vec<(usize, usize)> = (0..ay.len())
            .flat_map(|iy| (0..ax.len()).map(move |ix| (iy, ix)))
            .collect();
        // each tile's per-view normalization, written when the tile is cut and read when
        // its prediction comes back (tiles are cut lazily: one or two in memory at a time)
        let affines: std::cell::RefCell<Vec<Vec<Affine>>> = std::cell::RefCell::new(Vec::with_capacity(tiles.len()));
        let cut_time = std::cell::Cell::new(0.0f64);
        let cut = |k: usize| -> Result<Tensor<f32>> {
            let t_cut = Instant::now();
            let (iy, ix) = tiles[k];
            let (ty, tx) = (&ay[iy], &ax[ix]);
            let wd = [z1 - z0, ty.window.1 - ty.window.0, tx.window.1 - tx.window.0];
            let vox = wd[0] * wd[1] * wd[2];
            let mut data = vec![0.0f32; c_in * vox];
            let mut affs = Vec::with_capacity(n_views);
            let averaged = opts.variant == Variant::DualAverage;
            let per_tile = opts.normalize == NormalizeMode::PerTile;
            // dual-average with per-tile percentiles needs each view's raw tile on its own
            let mut scratch = if averaged && per_tile {
                vec![0.0f32; vox]
            } else {
                Vec::new()
            };
            for (vi, slab) in slabs.iter().enumerate() {
                let dst: &mut [f32] = if averaged && per_tile {
                    &mut scratch
                } else if averaged {
                    &mut data[..vox]
                } else {
                    &mut data[vi * vox..(vi + 1) * vox]
                };
                let aff = if per_tile {
                    copy_window(dst, slab, wd, [h, w], ty.window.0, tx.window.0, |v, _| v);
                    let p = percentiles(dst, &opts.percentiles)?;
                    Affine::from_percentile_values(p[0], p[1])
                } else {
                    global[vi]
                };
                let (sc, off) = (aff.scale as f32, aff.offset as f32);
                if per_tile {
                    dst.par_chunks_mut(1 << 16)
                        .for_each(|c| c.iter_mut().for_each(|v| *v = *v * sc + off));
                } else if averaged && vi == 1 {
                    copy_window(dst, slab, wd, [h, w], ty.window.0, tx.window.0, |v, old| {
                        0.5 * (old + v * sc + off)
                    });
                } else {
                    copy_window(dst, slab, wd, [h, w], ty.window.0, tx.window.0, |v, _| v * sc + off);
                }
                if averaged && per_tile {
                    let first = vi == 0;
                    data[..vox]
                        .par_chunks_mut(1 << 16)
                        .zip(scratch.par_chunks(1 << 16))
                        .for_each(|(d, s)| {
                            for (d, &v) in d.iter_mut().zip(s) {
                                *d = if first { v } else { 0.5 * (*d + v) };
                            }
                        });
                }
                affs.push(aff);
            }
            affines.borrow_mut().push(affs);
            cut_time.set(cut_time.get() + t_cut.elapsed().as_secs_f64());
            Tensor::from_vec(Shape::new(1, c_in, wd[0], wd[1], wd[2]), data)
        };
        let mut input_iter = (0..tiles.len()).map(cut);
        let mut k = 0usize;
        let mut blend = 0.0f64;
        let t_row = Instant::now();
        pred.predict_stream(&mut input_iter, &mut |_input: Tensor<f32>, y: &Tensor<f32>| {
            let t_blend = Instant::now();
            let (iy, ix) = tiles[k];
            let (ty, tx) = (&ay[iy], &ax[ix]);
            let aff = affines.borrow()[k][0];
            let ys = y.shape;
            if ys.dims() != [z1 - z0, ty.window.1 - ty.window.0, tx.window.1 - tx.window.0] {
                return Err(Error::Shape(format!(
                    "tile prediction has shape {ys}, expected its input window"
                )));
            }
            let map = |v: f32| -> f32 {
                match opts.normalize {
                    NormalizeMode::Global if opts.rescale_output => aff.invert(v),
                    NormalizeMode::Global => v,
                    // the authors: prediction × the tile's high percentile
                    NormalizeMode::PerTile if aff.p_hi_value != 0.0 => v * aff.p_hi_value as f32,
                    NormalizeMode::PerTile => v,
                }
            };
            // one output plane per task: planes of the accumulators are disjoint
            let core_planes = (tz.core.0 - acc_z0) * plane..(tz.core.1 - acc_z0) * plane;
            acc[core_planes.clone()]
                .par_chunks_mut(plane)
                .zip(wsum[core_planes].par_chunks_mut(plane))
                .enumerate()
                .for_each(|(i, (acc_p, ws_p))| {
                    let z = tz.core.0 + i;
                    let lz = z - z0;
                    let wzv = wz[z - tz.core.0];
                    for y_ in ty.core.0..ty.core.1 {
                        let wyz = wzv * wy[iy][y_ - ty.core.0];
                        let src = &y.data[(lz * ys.h + (y_ - ty.window.0)) * ys.w..][..ys.w];
                        let dst = y_ * w;
                        for x in tx.core.0..tx.core.1 {
                            let wt = wyz * wx[ix][x - tx.core.0];
                            acc_p[dst + x] += wt * map(src[x - tx.window.0]);
                            ws_p[dst + x] += wt;
                        }
                    }
                });
            k += 1;
            done += 1;
            progress(done, total);
            blend += t_blend.elapsed().as_secs_f64();
            Ok(())
        })?;
        times.cut += cut_time.get();
        times.blend += blend;
        times.predict += t_row.elapsed().as_secs_f64() - cut_time.get() - blend;
        let t_emit = Instant::now();
        // planes before the next row's first core plane are final
        let final_end = if iz + 1 < az.len() { az[iz + 1].core.0 } else { dims[0] };
        if final_end > acc_z0 {
            let n = (final_end - acc_z0) * plane;
            let out: Vec<f32> = acc[..n].par_iter().zip(&wsum[..n]).map(|(a, s)| a / s).collect();
            crate::imaging::volume::check_finite_result(&out, [final_end - acc_z0, h, w], "network")?;
            sink.write_planes(acc_z0, &out)?;
            acc.drain(..n);
            wsum.drain(..n);
            acc_z0 = final_end;
        }
        times.emit += t_emit.elapsed().as_secs_f64();
    }
    Ok(times)
}

/// [`run_tiled`] into memory, retrying with smaller tiles (every axis ×3/4, at most four
/// times) when the predictor runs out of device memory. Returns the output planes, the
/// timings, and the tile core that worked; `announce(plan)` is called before each attempt.
#[allow(clippy::too_many_arguments)]
pub fn run_tiled_shrinking(
    pred: &mut dyn TilePredictor,
    views: &mut [&mut dyn PlaneSource],
    global: &[Affine],
    opts: &StitchOptions,
    core: [usize; 3],
    overlap: [usize; 3],
    context: usize,
    announce: &mut dyn FnMut(&TilePlan, [usize; 3]),
    progress: &mut dyn FnMut(usize, usize),
) -> Result<(Vec<f32>, StitchTimes, [usize; 3])> {
    let dims = opts.plan.dims;
    let mut core = core;
    for attempt in 0.. {
        let plan = TilePlan::new(dims, core, overlap, context)?;
        announce(&plan, core);
        let o = StitchOptions { plan, ..opts.clone() };
        let mut sink = super::tiling::MemorySink {
            data: Vec::with_capacity(dims.iter().product()),
        };
        match run_tiled(pred, views, global, &mut sink, &o, progress) {
            Ok(t) => return Ok((sink.data, t, core)),
            Err(e) if e.is_out_of_memory() && attempt < 4 && core.iter().any(|&c| c > 32) => {
                core = core.map(|c| ((c * 3 / 4).max(32)) & !1);
            }
            Err(e) if e.is_out_of_memory() => {
                return Err(Error::OutOfMemory(format!(
                "{e}; even {core:?} tiles do not fit: free device memory, pass a smaller --tile, or use --device cpu"
            )))
            }
            Err(e) => return Err(e),
        }
    }
    unreachable!("the loop returns")
}

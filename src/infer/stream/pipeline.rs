//! The overlapped stages of streaming inference over a [`CorePlan`]:
//!
//! ```text
//!  reader threads ──(normalized windows, ≤ prefetch)──▶ predictor (this thread)
//!      ▲  read + normalize, any order                   │ tiles in plan order
//!      └────────── input buffer pool ◀──────────────────┤ core cropped, mapped back
//!                                                       ▼
//!                                      writer thread: write (or assemble) cores
//! ```
//!
//! Reader threads take a buffer from the input pool, then the next tile index, read
//! its window from every view and normalize it; the predictor stage puts tiles back in
//! plan order (a buffer is taken before the index, so the tile it waits for always
//! holds one and the reorder cannot deadlock), runs the network, crops the core into a
//! buffer of the output pool and hands it to the writer thread. The pools are filled
//! once, so no stage allocates per tile (the network's own activations aside). With
//! `prefetch` input buffers, up to `prefetch` tiles are read ahead while one computes
//! and up to `prefetch` cores wait to be written.
//!
//! Cores aligned to the writer's unit are written as they come; when the unit is larger
//! than a core (a TIFF's whole plane), the writer thread assembles unit-aligned boxes
//! and writes each when its last core arrives (memory: one band of such boxes).

use super::plan::{CorePlan, StreamTile};
use crate::error::{Error, Result};
use crate::imaging::stream::{copy_intersection, Region, VolumeReader, VolumeWriter};
use crate::infer::stitch::Affine;
use crate::infer::TilePredictor;
use crate::model::Variant;
use crate::tensor::{Shape, Tensor};
use rayon::prelude::*;
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{channel, sync_channel};
use std::sync::Mutex;
use std::time::Instant;

/// Seconds spent in each phase. Reader and writer phases are summed over their
/// threads and overlap with compute; `wall` is the elapsed time of the whole run.
#[derive(Clone, Debug, Default, Serialize)]
pub struct PhaseSeconds {
    pub read: f64,
    pub normalize: f64,
    /// Host↔device copies (a device predictor reports them inside compute).
    pub transfer: f64,
    pub compute: f64,
    /// Cropping cores, mapping them back to the input's range, checking them.
    pub blend: f64,
    pub write: f64,
    pub wall: f64,
}

/// How the stages are sized.
#[derive(Clone, Copy, Debug)]
pub struct PipelineOptions {
    /// Input (and output) buffers in flight: tiles read ahead of the predictor.
    pub prefetch: usize,
    /// Threads reading and normalizing windows.
    pub reader_threads: usize,
    /// Map predictions back to the input's range (global normalization).
    pub rescale_output: bool,
}

impl Default for PipelineOptions {
    fn default() -> Self {
        PipelineOptions {
            prefetch: 3,
            reader_threads: 2,
            rescale_output: true,
        }
    }
}

/// Observers of a run (all called from pipeline threads).
pub struct PipelineHooks<'a> {
    /// After a tile's core has been written (made durable by the writer): its index
    /// in the plan.
    pub written: &'a (dyn Fn(usize) + Sync),
    /// After a tile's prediction: the number of core voxels it produced.
    pub progress: &'a (dyn Fn(usize) + Sync),
}

/// A read tile: its position in the run's list and its normalized window.
struct ReadTile {
    pos: usize,
    input: Tensor<f32>,
}

/// A predicted core on its way to the writer.
struct Core {
    tile: StreamTile,
    data: Vec<f32>,
}

/// Runs `pred` over the tiles `tiles` (indices into `plan`) of `views`, normalized by
/// `norms` (one per view), and writes each tile's core into `writer`.
#[allow(clippy::too_many_arguments)]
pub fn run_tiles(
    pred: &mut dyn TilePredictor,
    views: &[&dyn VolumeReader],
    norms: &[Affine],
    variant: Variant,
    writer: &dyn VolumeWriter,
    plan: &CorePlan,
    tiles: &[usize],
    opts: PipelineOptions,
    hooks: &PipelineHooks,
) -> Result<PhaseSeconds> {
    let t_wall = Instant::now();
    if views.len() != variant.views() || norms.len() != views.len() {
        return Err(Error::invalid(format!(
            "the model ({variant:?}) takes {} view(s); {} given with {} normalization(s)",
            variant.views(),
            views.len(),
            norms.len()
        )));
    }
    for v in views {
        if v.dims() != plan.dims {
            return Err(Error::Shape(format!(
                "the views differ in size: {:?} vs {:?}; register and resample them to one grid first",
                v.dims(),
                plan.dims
            )));
        }
    }
    if writer.dims() != plan.dims {
        return Err(Error::Shape(format!(
            "the output is {:?}, the input {:?}",
            writer.dims(),
            plan.dims
        )));
    }
    let c_in = variant.input_channels();
    let [mz, my, mx] = plan.max_window();
    let window_cap = c_in * mz * my * mx;
    let core_cap = plan.core.iter().product::<usize>();
    let prefetch = opts.prefetch.max(1);

    let (pool_in_tx, pool_in_rx) = channel::<Vec<f32>>();
    for _ in 0..prefetch + 1 {
        pool_in_tx.send(Vec::with_capacity(window_cap)).expect("receiver alive");
    }
    let (pool_out_tx, pool_out_rx) = channel::<Vec<f32>>();
    for _ in 0..prefetch {
        pool_out_tx.send(Vec::with_capacity(core_cap)).expect("receiver alive");
    }
    let pool_in_rx = Mutex::new(pool_in_rx);
    let next = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let read_time = Mutex::new(0.0f64);
    let norm_time = Mutex::new(0.0f64);
    let (ready_tx, ready_rx) = sync_channel::<Result<ReadTile>>(prefetch + 1);
    let (core_tx, core_rx) = sync_channel::<Core>(prefetch);

    let mut times = PhaseSeconds::default();
    let result: Result<()> = std::thread::scope(|s| {
        // readers
        for _ in 0..opts.reader_threads.max(1) {
            let ready_tx = ready_tx.clone();
            let (pool_in_rx, next, stop, read_time, norm_time) = (&pool_in_rx, &next, &stop, &read_time, &norm_time);
            s.spawn(move || {
                loop {
                    // a buffer first, then an index (see the module doc)
                    let buf = match pool_in_rx.lock().unwrap_or_else(|e| e.into_inner()).recv() {
                        Ok(b) => b,
                        Err(_) => return,
                    };
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    let pos = next.fetch_add(1, Ordering::Relaxed);
                    if pos >= tiles.len() {
                        return;
                    }
                    let tile = plan.tile(tiles[pos]);
                    let r = read_window(views, norms, variant, tile.window, buf, read_time, norm_time)
                        .map(|input| ReadTile { pos, input });
                    let failed = r.is_err();
                    if ready_tx.send(r).is_err() || failed {
                        return;
                    }
                }
            });
        }
        drop(ready_tx);
        // writer
        let writer_handle = {
            // moved, not cloned: if the writer stops, the predictor's wait for an
            // output buffer ends with an error instead of blocking
            let pool_out_tx = pool_out_tx;
            let stop = &stop;
            s.spawn(move || -> Result<f64> {
                let mut t = 0.0;
                let mut boxes = BoxAssembler::new(writer.dims(), writer.write_unit());
                for core in core_rx.iter() {
                    let t0 = Instant::now();
                    let r = boxes.write(writer, core.tile, &core.data);
                    t += t0.elapsed().as_secs_f64();
                    if let Err(e) = r {
                        stop.store(true, Ordering::Relaxed);
                        return Err(e);
                    }
                    (hooks.written)(core.tile.index);
                    let _ = pool_out_tx.send(core.data);
                }
                Ok(t)
            })
        };
        // predictor: tiles in order
        let compute = (|| -> Result<()> {
            let mut waiting: BTreeMap<usize, Tensor<f32>> = BTreeMap::new();
            let mut expect = 0usize;
            let mut failure: Option<Error> = None;
            let mut in_order = std::iter::from_fn(|| {
                if expect >= tiles.len() || failure.is_some() {
                    return None;
                }
                while !waiting.contains_key(&expect) {
                    match ready_rx.recv() {
                        Ok(Ok(t)) => {
                            waiting.insert(t.pos, t.input);
                        }
                        Ok(Err(e)) => {
                            failure = Some(e);
                            return None;
                        }
                        Err(_) => {
                            failure = Some(Error::invalid("the reader threads stopped early"));
                            return None;
                        }
                    }
                }
                let x = waiting.remove(&expect).expect("present");
                expect += 1;
                Some(Ok(x))
            });
            let mut done = 0usize;
            let mut blend = 0.0f64;
            let t0 = Instant::now();
            let r = pred.predict_stream(&mut in_order, &mut |input: Tensor<f32>, y: Tensor<f32>| {
                let tb = Instant::now();
                let tile = plan.tile(tiles[done]);
                done += 1;
                let ws = tile.window.shape;
                if y.shape.dims() != ws {
                    return Err(Error::Shape(format!(
                        "tile prediction has shape {}, expected its input window {ws:?}",
                        y.shape
                    )));
                }
                let mut data = pool_out_rx.recv().map_err(|_| Error::invalid("the writer thread stopped"))?;
                data.clear();
                data.resize(tile.core.voxels(), 0.0);
                copy_intersection(&y.data, tile.window, &mut data, tile.core);
                if opts.rescale_output {
                    let a = norms[0];
                    data.par_chunks_mut(1 << 14).for_each(|c| c.iter_mut().for_each(|v| *v = a.invert(*v)));
                }
                if let Some(i) = data.iter().position(|v| !v.is_finite()) {
                    return Err(Error::Numeric(format!(
                        "the prediction of tile {} (core {:?}+{:?}) is not finite at its voxel {i}: check the model and the input's range",
                        tile.index, tile.core.start, tile.core.shape
                    )));
                }
                let _ = pool_in_tx.send(input.data);
                (hooks.progress)(tile.core.voxels());
                blend += tb.elapsed().as_secs_f64();
                core_tx
                    .send(Core { tile, data })
                    .map_err(|_| Error::invalid("the writer thread stopped"))
            });
            times.blend = blend;
            times.compute = t0.elapsed().as_secs_f64() - blend;
            drop(in_order);
            if let Some(e) = failure {
                return Err(e);
            }
            r
        })();
        stop.store(true, Ordering::Relaxed);
        drop(core_tx);
        drop(pool_in_tx); // readers waiting for a buffer see the pool closed
                          // drain what readers still send, so none blocks
        while ready_rx.try_recv().is_ok() {}
        drop(ready_rx);
        let w = writer_handle
            .join()
            .map_err(|_| Error::invalid("the writer thread panicked"))?;
        // the writer's own error explains a predictor that found the writer gone
        match (compute, w) {
            (_, Err(e)) => Err(e),
            (Err(e), Ok(_)) => Err(e),
            (Ok(()), Ok(t)) => {
                times.write = t;
                Ok(())
            }
        }
    });
    result?;
    times.read = *read_time.lock().unwrap_or_else(|e| e.into_inner());
    times.normalize = *norm_time.lock().unwrap_or_else(|e| e.into_inner());
    times.wall = t_wall.elapsed().as_secs_f64();
    Ok(times)
}

/// Reads `window` of every view into `buf` and normalizes it into the network's input.
fn read_window(
    views: &[&dyn VolumeReader],
    norms: &[Affine],
    variant: Variant,
    window: Region,
    mut buf: Vec<f32>,
    read_time: &Mutex<f64>,
    norm_time: &Mutex<f64>,
) -> Result<Tensor<f32>> {
    let vox = window.voxels();
    let c_in = variant.input_channels();
    buf.clear();
    buf.resize(c_in * vox, 0.0);
    let averaged = variant == Variant::DualAverage;
    let mut scratch = Vec::new();
    for (vi, view) in views.iter().enumerate() {
        let t0 = Instant::now();
        let dst: &mut [f32] = if averaged && vi == 1 {
            scratch.resize(vox, 0.0);
            &mut scratch
        } else if averaged {
            &mut buf[..vox]
        } else {
            &mut buf[vi * vox..(vi + 1) * vox]
        };
        view.read_region(window, dst)?;
        *read_time.lock().unwrap_or_else(|e| e.into_inner()) += t0.elapsed().as_secs_f64();
        let t1 = Instant::now();
        if let Some(i) = dst.iter().position(|v| !v.is_finite()) {
            return Err(Error::invalid(format!(
                "the input holds a non-finite value ({}) in the window {:?}+{:?} (at its voxel {i}): clean the volume (e.g. replace NaN with 0) before inference",
                dst[i], window.start, window.shape
            )));
        }
        // the same arithmetic as the in-memory path (stitch::run_tiled)
        let (sc, off) = (norms[vi].scale as f32, norms[vi].offset as f32);
        if averaged && vi == 1 {
            for (d, &v) in buf[..vox].iter_mut().zip(&scratch) {
                *d = 0.5 * (*d + (v * sc + off));
            }
        } else {
            dst.iter_mut().for_each(|v| *v = *v * sc + off);
        }
        *norm_time.lock().unwrap_or_else(|e| e.into_inner()) += t1.elapsed().as_secs_f64();
    }
    let [d, h, w] = window.shape;
    Tensor::from_vec(Shape::new(1, c_in, d, h, w), buf)
}

/// Writes cores, assembling unit-aligned boxes when a unit is larger than a core.
struct BoxAssembler {
    dims: [usize; 3],
    unit: [usize; 3],
    open: HashMap<Region, (Vec<f32>, usize)>,
}

impl BoxAssembler {
    fn new(dims: [usize; 3], unit: [usize; 3]) -> Self {
        BoxAssembler {
            dims,
            unit: [0, 1, 2].map(|a| unit[a].clamp(1, dims[a])),
            open: HashMap::new(),
        }
    }

    /// The unit-aligned box around `r` (clipped to the volume).
    fn around(&self, r: Region) -> Region {
        let start = [0, 1, 2].map(|a| r.start[a] / self.unit[a] * self.unit[a]);
        let end = [0, 1, 2].map(|a| (r.end()[a].div_ceil(self.unit[a]) * self.unit[a]).min(self.dims[a]));
        Region::new(start, [0, 1, 2].map(|a| end[a] - start[a]))
    }

    fn write(&mut self, writer: &dyn VolumeWriter, tile: StreamTile, data: &[f32]) -> Result<()> {
        let b = self.around(tile.core);
        if b == tile.core {
            return writer.write_region(tile.core, data);
        }
        let entry = self
            .open
            .entry(b)
            .or_insert_with(|| (vec![0.0f32; b.voxels()], b.voxels()));
        copy_intersection(data, tile.core, &mut entry.0, b);
        entry.1 -= tile.core.voxels();
        if entry.1 == 0 {
            let (buf, _) = self.open.remove(&b).expect("present");
            writer.write_region(b, &buf)?;
        }
        Ok(())
    }
}

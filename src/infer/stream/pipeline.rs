//! The overlapped stages of streaming inference over a [`CorePlan`]:
//!
//! ```text
//!  reader threads ──(normalized windows, ≤ prefetch)──▶ predictor workers (1 per device)
//!      ▲  read + normalize, any order                   │ next tile in plan order
//!      └────────── input buffer pool ◀──────────────────┤ core cropped, mapped back
//!                                                       ▼
//!                                      writer thread: write (or assemble) cores
//! ```
//!
//! Reader threads take a buffer from the input pool, then the next tile index, read
//! its window from every view and normalize it; a dispenser puts tiles back in plan
//! order (a buffer is taken before the index, so the tile it waits for always holds
//! one and the reorder cannot deadlock) and hands each to the next free predictor
//! worker (one thread per predictor: one per GPU with `--devices`), which runs the
//! network, crops the core into a buffer of the output pool and hands it to the writer
//! thread. The pools are filled once, so no stage allocates per tile (the network's own
//! activations aside). With `prefetch` input buffers, up to `prefetch` tiles are read
//! ahead while the workers compute and up to `prefetch` cores wait to be written.
//! With several workers cores reach the writer out of plan order: writes of aligned
//! cores are independent, and the caller's watermark counts the written prefix.
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
use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{channel, sync_channel, Receiver, Sender, SyncSender};
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
    /// After a tile's core has been written (made durable by the writer): its position
    /// in the run's list of tiles. With several predictors, tiles finish out of order.
    pub written: &'a (dyn Fn(usize) + Sync),
    /// After a tile's prediction: the number of core voxels it produced.
    pub progress: &'a (dyn Fn(usize) + Sync),
}

/// A read tile: its position in the run's list and its normalized window.
struct ReadTile {
    pos: usize,
    input: Tensor<f32>,
}

/// A predicted core on its way to the writer: its position in the run's list, its tile.
struct Core {
    pos: usize,
    tile: StreamTile,
    data: Vec<f32>,
}

/// Hands read tiles to the predictor workers in the run's order (one lock: a worker
/// waiting for the next tile holds it, the others would wait for that tile anyway).
struct Dispenser {
    ready_rx: Receiver<Result<ReadTile>>,
    waiting: BTreeMap<usize, Tensor<f32>>,
    expect: usize,
    len: usize,
    failure: Option<Error>,
}

impl Dispenser {
    /// The next tile (position, normalized window), or None at the end, after a
    /// reader's failure (kept in `failure`) or when `stop` is set.
    fn next(&mut self, stop: &AtomicBool) -> Option<(usize, Tensor<f32>)> {
        if self.expect >= self.len || self.failure.is_some() || stop.load(Ordering::Relaxed) {
            return None;
        }
        while !self.waiting.contains_key(&self.expect) {
            match self.ready_rx.recv() {
                Ok(Ok(t)) => {
                    self.waiting.insert(t.pos, t.input);
                }
                Ok(Err(e)) => {
                    self.failure = Some(e);
                    return None;
                }
                Err(_) => {
                    if !stop.load(Ordering::Relaxed) {
                        self.failure = Some(Error::invalid("the reader threads stopped early"));
                    }
                    return None;
                }
            }
        }
        let pos = self.expect;
        self.expect += 1;
        Some((pos, self.waiting.remove(&pos).expect("present")))
    }
}

/// The pieces a tile is cut into after its predictor ran out of memory: cores of at
/// most `piece` voxels per axis, each with the plan's context around it.
fn next_piece(piece: [usize; 3]) -> Option<[usize; 3]> {
    if piece.iter().all(|&c| c <= MIN_PIECE) {
        return None;
    }
    Some(piece.map(|c| ((c * 3 / 4).max(MIN_PIECE)) & !1))
}

/// Smallest piece core of the out-of-memory fallback.
const MIN_PIECE: usize = 8;

/// Runs the predictors `preds` (one worker thread each; several share the tiles) over
/// the tiles `tiles` (indices into `plan`) of `views`, normalized by `norms` (one per
/// view), and writes each tile's core into `writer`.
///
/// A predictor that runs out of memory ([`Error::is_out_of_memory`]) does not end the
/// run: that worker recomputes the tiles it held in pieces (sub-cores of 3/4 the size,
/// each with the full context, so the result is unchanged up to float rounding) and
/// keeps cutting its later tiles so, shrinking again while memory still runs out;
/// below cores of [`MIN_PIECE`] voxels it fails with a clear error.
#[allow(clippy::too_many_arguments)]
pub fn run_tiles(
    preds: &mut [&mut dyn TilePredictor],
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
    if preds.is_empty() {
        return Err(Error::invalid("no predictor to run the network"));
    }
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
    let workers = preds.len();

    // every worker may hold a tile while it waits for the next: one buffer more each
    let (pool_in_tx, pool_in_rx) = channel::<Vec<f32>>();
    for _ in 0..prefetch + workers {
        pool_in_tx.send(Vec::with_capacity(window_cap)).expect("receiver alive");
    }
    let (pool_out_tx, pool_out_rx) = channel::<Vec<f32>>();
    for _ in 0..prefetch + workers - 1 {
        pool_out_tx.send(Vec::with_capacity(core_cap)).expect("receiver alive");
    }
    let pool_in_rx = Mutex::new(pool_in_rx);
    let pool_out_rx = Mutex::new(pool_out_rx);
    let next = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let read_time = Mutex::new(0.0f64);
    let norm_time = Mutex::new(0.0f64);
    let (ready_tx, ready_rx) = sync_channel::<Result<ReadTile>>(prefetch + 1);
    let (core_tx, core_rx) = sync_channel::<Core>(prefetch);
    let dispenser = Mutex::new(Dispenser {
        ready_rx,
        waiting: BTreeMap::new(),
        expect: 0,
        len: tiles.len(),
        failure: None,
    });

    // closed (taken) at the end, so that readers waiting for a buffer stop
    let pool_in_tx = Mutex::new(Some(pool_in_tx));
    let ctx = WorkerCtx {
        views,
        norms,
        variant,
        plan,
        tiles,
        opts,
        hooks,
        dispenser: &dispenser,
        stop: &stop,
        pool_in_tx: &pool_in_tx,
        pool_out_rx: &pool_out_rx,
        read_time: &read_time,
        norm_time: &norm_time,
    };
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
            // moved, not cloned: if the writer stops, the predictors' wait for an
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
                    (hooks.written)(core.pos);
                    let _ = pool_out_tx.send(core.data);
                }
                Ok(t)
            })
        };
        // predictor workers: each pulls the next tile in the run's order
        let (first, rest) = preds.split_first_mut().expect("one predictor at least");
        let handles: Vec<_> = rest
            .iter_mut()
            .map(|p| {
                let (ctx, core_tx) = (&ctx, core_tx.clone());
                s.spawn(move || ctx.work(&mut **p, core_tx))
            })
            .collect();
        // the first worker runs on this thread
        let mine = ctx.work(&mut **first, core_tx);
        let mut outcomes = vec![mine];
        for h in handles {
            outcomes.push(
                h.join()
                    .unwrap_or_else(|_| Err(Error::invalid("a predictor thread panicked"))),
            );
        }
        stop.store(true, Ordering::Relaxed);
        // readers waiting for a buffer see the pool closed
        pool_in_tx.lock().unwrap_or_else(|e| e.into_inner()).take();
        // drain what readers still send, so none blocks
        {
            let d = dispenser.lock().unwrap_or_else(|e| e.into_inner());
            while d.ready_rx.try_recv().is_ok() {}
        }
        let w = writer_handle
            .join()
            .map_err(|_| Error::invalid("the writer thread panicked"))?;
        let mut compute: Result<()> = Ok(());
        for o in outcomes {
            match o {
                Ok((c, b)) => {
                    times.compute += c;
                    times.blend += b;
                }
                Err(e) => {
                    if compute.is_ok() {
                        compute = Err(e);
                    }
                }
            }
        }
        let failure = dispenser.lock().unwrap_or_else(|e| e.into_inner()).failure.take();
        // the writer's own error explains a predictor that found the writer gone; a
        // reader's explains a predictor that found no more tiles
        match (compute, w, failure) {
            (_, Err(e), _) => Err(e),
            (_, Ok(_), Some(e)) => Err(e),
            (Err(e), Ok(_), None) => Err(e),
            (Ok(()), Ok(t), None) => {
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

/// What every predictor worker shares.
struct WorkerCtx<'a> {
    views: &'a [&'a dyn VolumeReader],
    norms: &'a [Affine],
    variant: Variant,
    plan: &'a CorePlan,
    tiles: &'a [usize],
    opts: PipelineOptions,
    hooks: &'a PipelineHooks<'a>,
    dispenser: &'a Mutex<Dispenser>,
    stop: &'a AtomicBool,
    pool_in_tx: &'a Mutex<Option<Sender<Vec<f32>>>>,
    pool_out_rx: &'a Mutex<Receiver<Vec<f32>>>,
    read_time: &'a Mutex<f64>,
    norm_time: &'a Mutex<f64>,
}

impl WorkerCtx<'_> {
    /// One worker: streams tiles through `pred`, falling back to pieces when it runs
    /// out of memory. Returns its (compute, blend) seconds; sets `stop` on an error.
    fn work(&self, pred: &mut dyn TilePredictor, core_tx: SyncSender<Core>) -> Result<(f64, f64)> {
        let r = self.work_inner(pred, &core_tx);
        if r.is_err() {
            self.stop.store(true, Ordering::Relaxed);
        }
        r
    }

    /// Returns an input buffer to the pool (unless the run is over).
    fn recycle(&self, buf: Vec<f32>) {
        if let Some(tx) = self.pool_in_tx.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            let _ = tx.send(buf);
        }
    }

    fn next_tile(&self) -> Option<(usize, Tensor<f32>)> {
        self.dispenser.lock().unwrap_or_else(|e| e.into_inner()).next(self.stop)
    }

    fn work_inner(&self, pred: &mut dyn TilePredictor, core_tx: &SyncSender<Core>) -> Result<(f64, f64)> {
        let t0 = Instant::now();
        let mut blend = 0.0f64;
        // positions of the tiles handed to the predictor and not yet back, in order
        let held = RefCell::new(VecDeque::<usize>::new());
        let streamed = {
            let mut tiles_in = std::iter::from_fn(|| {
                let (pos, x) = self.next_tile()?;
                held.borrow_mut().push_back(pos);
                Some(Ok(x))
            });
            pred.predict_stream(&mut tiles_in, &mut |input: Tensor<f32>, y: &Tensor<f32>| {
                let tb = Instant::now();
                let pos = held.borrow_mut().pop_front().expect("a tile in flight");
                let tile = self.plan.tile(self.tiles[pos]);
                let ws = tile.window.shape;
                if y.shape.dims() != ws {
                    return Err(Error::Shape(format!(
                        "tile prediction has shape {}, expected its input window {ws:?}",
                        y.shape
                    )));
                }
                let mut data = self.out_buffer()?;
                data.resize(tile.core.voxels(), 0.0);
                copy_intersection(&y.data, tile.window, &mut data, tile.core);
                self.recycle(input.data);
                let r = self.finish_core(pos, tile, data, core_tx);
                blend += tb.elapsed().as_secs_f64();
                r
            })
        };
        match streamed {
            Ok(()) => Ok((t0.elapsed().as_secs_f64() - blend, blend)),
            Err(e) if e.is_out_of_memory() => {
                // the tiles the predictor held are lost with their buffers: read them
                // again (into new buffers, returned to the pool after) and go on in pieces
                let mut piece = next_piece(self.plan.core).ok_or_else(|| self.too_small(&e, self.plan.core))?;
                let lost: Vec<usize> = held.borrow_mut().drain(..).collect();
                for pos in lost {
                    let tile = self.plan.tile(self.tiles[pos]);
                    let x = read_window(
                        self.views,
                        self.norms,
                        self.variant,
                        tile.window,
                        Vec::new(),
                        self.read_time,
                        self.norm_time,
                    )?;
                    blend += self.in_pieces(pred, pos, x, &mut piece, core_tx)?;
                }
                while let Some((pos, x)) = self.next_tile() {
                    blend += self.in_pieces(pred, pos, x, &mut piece, core_tx)?;
                }
                Ok((t0.elapsed().as_secs_f64() - blend, blend))
            }
            Err(e) => Err(e),
        }
    }

    fn too_small(&self, e: &Error, piece: [usize; 3]) -> Error {
        Error::OutOfMemory(format!(
            "{e}; even tiles cut into cores of {piece:?} voxels (plus {} of context) do not fit: free device memory, pass a smaller --memory or --tile, or use --device cpu",
            self.plan.context
        ))
    }

    fn out_buffer(&self) -> Result<Vec<f32>> {
        let mut data = self
            .pool_out_rx
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .recv()
            .map_err(|_| Error::invalid("the writer thread stopped"))?;
        data.clear();
        Ok(data)
    }

    /// Maps a core back to the input's range, checks it and sends it to the writer.
    fn finish_core(&self, pos: usize, tile: StreamTile, mut data: Vec<f32>, core_tx: &SyncSender<Core>) -> Result<()> {
        if self.opts.rescale_output {
            let a = self.norms[0];
            data.par_chunks_mut(1 << 14)
                .for_each(|c| c.iter_mut().for_each(|v| *v = a.invert(*v)));
        }
        if let Some(i) = data.iter().position(|v| !v.is_finite()) {
            return Err(Error::Numeric(format!(
                "the prediction of tile {} (core {:?}+{:?}) is not finite at its voxel {i}: check the model and the input's range",
                tile.index, tile.core.start, tile.core.shape
            )));
        }
        (self.hooks.progress)(tile.core.voxels());
        core_tx
            .send(Core { pos, tile, data })
            .map_err(|_| Error::invalid("the writer thread stopped"))
    }

    /// Predicts tile `pos` (normalized window `x`) piece by piece: sub-cores of at most
    /// `piece` voxels with the plan's context (windows start even, as the plan's do),
    /// cut from `x`; shrinks `piece` while the predictor runs out of memory. Returns
    /// the seconds spent cutting and assembling.
    fn in_pieces(
        &self,
        pred: &mut dyn TilePredictor,
        pos: usize,
        x: Tensor<f32>,
        piece: &mut [usize; 3],
        core_tx: &SyncSender<Core>,
    ) -> Result<f64> {
        let tile = self.plan.tile(self.tiles[pos]);
        let c_in = x.shape.c;
        let mut data = self.out_buffer()?;
        data.resize(tile.core.voxels(), 0.0);
        let mut tb = 0.0;
        'shrink: loop {
            let sub = CorePlan {
                dims: self.plan.dims,
                core: *piece,
                context: self.plan.context,
            };
            let ranges = [0, 1, 2].map(|a| {
                let (c0, c1) = (tile.core.start[a], tile.core.end()[a]);
                (0..(c1 - c0).div_ceil(piece[a]))
                    .map(|i| (c0 + i * piece[a], (c0 + (i + 1) * piece[a]).min(c1)))
                    .collect::<Vec<_>>()
            });
            for &(z0, z1) in &ranges[0] {
                for &(y0, y1) in &ranges[1] {
                    for &(x0, x1) in &ranges[2] {
                        let t = Instant::now();
                        let core = Region::new([z0, y0, x0], [z1 - z0, y1 - y0, x1 - x0]);
                        let window = sub.window_of(core);
                        let [d, h, w] = window.shape;
                        let mut cut = vec![0.0f32; c_in * window.voxels()];
                        for c in 0..c_in {
                            let (wv, tv) = (window.voxels(), tile.window.voxels());
                            copy_intersection(
                                &x.data[c * tv..(c + 1) * tv],
                                tile.window,
                                &mut cut[c * wv..(c + 1) * wv],
                                window,
                            );
                        }
                        let xs = Tensor::from_vec(Shape::new(1, c_in, d, h, w), cut)?;
                        tb += t.elapsed().as_secs_f64();
                        match pred.predict(&xs) {
                            Ok(y) => {
                                let t = Instant::now();
                                if y.shape.dims() != window.shape {
                                    return Err(Error::Shape(format!(
                                        "tile prediction has shape {}, expected its input window {:?}",
                                        y.shape, window.shape
                                    )));
                                }
                                // only the piece's core: its context belongs to neighbours
                                let mut piece_core = vec![0.0f32; core.voxels()];
                                copy_intersection(&y.data, window, &mut piece_core, core);
                                copy_intersection(&piece_core, core, &mut data, tile.core);
                                tb += t.elapsed().as_secs_f64();
                            }
                            Err(e) if e.is_out_of_memory() => {
                                *piece = next_piece(*piece).ok_or_else(|| self.too_small(&e, *piece))?;
                                continue 'shrink;
                            }
                            Err(e) => return Err(e),
                        }
                    }
                }
            }
            self.recycle(x.data);
            let t = Instant::now();
            self.finish_core(pos, tile, data, core_tx)?;
            return Ok(tb + t.elapsed().as_secs_f64());
        }
    }
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

//! Several tile predictors (one per device of `--devices`) as one [`TilePredictor`], for
//! the blended tiling: [`super::stitch::run_tiled`] hands a z-row's tiles to
//! [`TilePredictor::predict_stream`] and blends each prediction in tile order, so the
//! pool spreads a row's tiles over its predictors (each on its own thread, each pulling
//! the next tile when it is free) and gives the predictions back in tile order. The
//! blend then sees the same predictions in the same order as with one predictor: the
//! output is bit-identical to one device's (the devices being alike).
//!
//! One predictor runs its own stream on the calling thread, as without a pool. With
//! several, the tiles are cut on the calling thread (the stitcher's cutter is not `Send`);
//! at most two per predictor wait for or sit in a predictor (one computing, one staged,
//! as the CUDA predictor's overlap wants). Predictions that finish ahead of an earlier
//! tile wait for it; they are at most one z-row's, of the size of the row's band the
//! stitcher already holds.

use super::TilePredictor;
use crate::error::{Error, Result};
use crate::tensor::Tensor;
use std::cell::RefCell;
use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::Mutex;

/// A tile (its position in the stream) on its way to a predictor.
type Job = (usize, Tensor<f32>);
/// A predictor's answer: (position, input, prediction), or its error.
type Done = Result<(usize, Tensor<f32>, Tensor<f32>)>;

/// Predictors that share the tiles of one stream (see the module doc).
pub struct PredictorPool<'a> {
    preds: Vec<&'a mut dyn TilePredictor>,
    /// Tiles each predictor computed (for messages and tests).
    done: Vec<AtomicUsize>,
}

impl<'a> PredictorPool<'a> {
    /// The pool of `preds` (at least one).
    pub fn new(preds: Vec<&'a mut dyn TilePredictor>) -> Result<Self> {
        if preds.is_empty() {
            return Err(Error::invalid("a predictor pool needs at least one predictor"));
        }
        let done = preds.iter().map(|_| AtomicUsize::new(0)).collect();
        Ok(PredictorPool { preds, done })
    }

    /// How many tiles each predictor computed so far, in the order they were given.
    pub fn tiles_per_predictor(&self) -> Vec<usize> {
        self.done.iter().map(|d| d.load(Ordering::Relaxed)).collect()
    }
}

/// One predictor's thread: its own stream of the tiles it pulls from `jobs`, each
/// prediction sent back with the tile's position; an error ends it and is sent too.
fn work(
    pred: &mut dyn TilePredictor,
    jobs: &Mutex<mpsc::Receiver<Job>>,
    results: mpsc::Sender<Done>,
    done: &AtomicUsize,
) {
    // positions of the tiles pulled and not yet predicted, in order (a predictor may
    // pull tile k+1 before handing out tile k)
    let positions = RefCell::new(VecDeque::new());
    let mut tiles = std::iter::from_fn(|| {
        let (k, x) = jobs.lock().unwrap_or_else(|e| e.into_inner()).recv().ok()?;
        positions.borrow_mut().push_back(k);
        Some(Ok(x))
    });
    let r = pred.predict_stream(&mut tiles, &mut |x, y| {
        let k = positions
            .borrow_mut()
            .pop_front()
            .ok_or_else(|| Error::invalid("a predictor handed out more predictions than it got tiles"))?;
        done.fetch_add(1, Ordering::Relaxed);
        results
            .send(Ok((k, x, y.clone())))
            .map_err(|_| Error::invalid("the tiled run stopped"))
    });
    if let Err(e) = r {
        // the receiver may be gone already (the run failed elsewhere)
        let _ = results.send(Err(e));
    }
}

impl TilePredictor for PredictorPool<'_> {
    fn describe(&self) -> String {
        match self.preds.len() {
            1 => self.preds[0].describe(),
            n => format!("{n} × {}", self.preds[0].describe()),
        }
    }
    fn predict(&mut self, x: &Tensor<f32>) -> Result<Tensor<f32>> {
        self.done[0].fetch_add(1, Ordering::Relaxed);
        self.preds[0].predict(x)
    }
    fn bytes_per_voxel(&self) -> usize {
        self.preds.iter().map(|p| p.bytes_per_voxel()).max().unwrap_or(0)
    }
    fn memory_budget(&self) -> Option<usize> {
        // tiles must fit the smallest device
        self.preds.iter().filter_map(|p| p.memory_budget()).min()
    }
    fn predict_stream(
        &mut self,
        tiles: &mut dyn Iterator<Item = Result<Tensor<f32>>>,
        sink: &mut dyn FnMut(Tensor<f32>, &Tensor<f32>) -> Result<()>,
    ) -> Result<()> {
        let n = self.preds.len();
        if n == 1 {
            // one predictor: its own stream on this thread, as without a pool
            let done = &self.done[0];
            return self.preds[0].predict_stream(tiles, &mut |x, y| {
                done.fetch_add(1, Ordering::Relaxed);
                sink(x, y)
            });
        }
        let (job_tx, job_rx) = mpsc::channel::<Job>();
        let jobs = Mutex::new(job_rx);
        let (done_tx, done_rx) = mpsc::channel::<Done>();
        let (preds, counts) = (&mut self.preds, &self.done);
        std::thread::scope(|s| {
            for (p, count) in preds.iter_mut().zip(counts) {
                let (jobs, results) = (&jobs, done_tx.clone());
                s.spawn(move || work(&mut **p, jobs, results, count));
            }
            drop(done_tx);
            // Owned here, so that leaving this closure (an error included) ends every
            // predictor's stream before the scope joins the threads.
            let mut job_tx = Some(job_tx);
            // tiles sent to predictors and not yet back; at most two per predictor. A
            // predictor that holds a tile while it waits for the next one gets it: the
            // bound does not count predictions waiting for their turn.
            let (mut sent, mut back, mut emitted) = (0usize, 0usize, 0usize);
            let mut ahead: BTreeMap<usize, (Tensor<f32>, Tensor<f32>)> = BTreeMap::new();
            loop {
                while sent - back < 2 * n {
                    let Some(tx) = &job_tx else { break };
                    match tiles.next() {
                        Some(x) => {
                            if tx.send((sent, x?)).is_err() {
                                // every predictor stopped: their errors are in `done_rx`
                                job_tx = None;
                                break;
                            }
                            sent += 1;
                        }
                        // the last tile is out: the predictors' streams end, so a
                        // predictor holding its last tile hands it out
                        None => job_tx = None,
                    }
                }
                if job_tx.is_none() && emitted == sent {
                    return Ok(());
                }
                let (k, x, y) = done_rx.recv().map_err(|_| {
                    Error::invalid("the predictors stopped before every tile of the row was predicted")
                })??;
                back += 1;
                ahead.insert(k, (x, y));
                while let Some((x, y)) = ahead.remove(&emitted) {
                    sink(x, &y)?;
                    emitted += 1;
                }
            }
        })
    }
}

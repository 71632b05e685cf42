//! The streaming tile plan: non-overlapping, chunk-aligned tile cores in z, y, x raster
//! order, each with an input window of `context` voxels around it, and the split of
//! those cores into the contiguous blocks of `infer --block I/N`.
//!
//! Why non-overlapping cores: with `context` ≥ the network's receptive radius and even
//! window starts, a tile's prediction over its core equals the whole-volume prediction
//! up to float rounding, so nothing needs blending across a core's frontier and each
//! finished core can be written at once. Cores are multiples of the output's write unit
//! (a chunk), so no two tiles — and so no two blocks — ever write the same chunk.

use crate::error::{Error, Result};
use crate::imaging::stream::Region;
use serde::{Deserialize, Serialize};
use std::ops::Range;

/// Greatest common divisor (for aligning cores to both the chunk and to pairs).
fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// The tile cores and windows of one streaming run.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CorePlan {
    /// (z, y, x) size of the volume.
    pub dims: [usize; 3],
    /// The nominal core size (the last core of an axis may be shorter).
    pub core: [usize; 3],
    /// Input voxels around each core (window starts rounded down to even).
    pub context: usize,
}

/// Smallest core the budget picks per axis (unless the volume is smaller).
pub const MIN_BUDGET_CORE: usize = 16;

/// The core a budget of `window_voxels` per tile window gives, chosen from the budget
/// alone so that memory does not grow with the volume: the largest even cube-shaped core
/// whose window (core + 2·`context` per axis) holds at most `window_voxels`. An axis
/// the volume spans within that window is taken whole (its window is then the volume's
/// length, shorter than the cube's), and the budget it leaves goes to the other axes;
/// so the volume's shape changes the core only where the volume is smaller than a tile.
/// Never below [`MIN_BUDGET_CORE`] (a budget that small is exceeded).
pub fn budget_core(dims: [usize; 3], context: usize, window_voxels: usize) -> [usize; 3] {
    let mut whole = [false; 3];
    loop {
        let fixed: usize = (0..3).filter(|&a| whole[a]).map(|a| dims[a]).product();
        let free = (0..3).filter(|&a| !whole[a]).count() as u32;
        if free == 0 {
            return dims;
        }
        // the largest window side s with s^free · fixed ≤ window_voxels
        let room = window_voxels / fixed.max(1);
        let mut side = (room as f64).powf(1.0 / free as f64) as usize;
        while (side + 1).checked_pow(free).is_some_and(|v| v <= room) {
            side += 1;
        }
        while side > 1 && side.checked_pow(free).is_none_or(|v| v > room) {
            side -= 1;
        }
        let core = (side.saturating_sub(2 * context).max(MIN_BUDGET_CORE)) & !1;
        let mut grew = false;
        for a in 0..3 {
            if !whole[a] && core + 2 * context >= dims[a] {
                whole[a] = true;
                grew = true;
            }
        }
        if !grew {
            return [0, 1, 2].map(|a| if whole[a] { dims[a] } else { core });
        }
    }
}

/// One tile of a [`CorePlan`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StreamTile {
    /// Index in z, y, x raster order.
    pub index: usize,
    /// What the tile's prediction is written to.
    pub core: Region,
    /// What the network sees: the core plus context, clipped to the volume.
    pub window: Region,
}

impl CorePlan {
    /// A plan with cores of `core` voxels (each at least 2 and even, except where it
    /// spans a whole axis).
    pub fn new(dims: [usize; 3], core: [usize; 3], context: usize) -> Result<Self> {
        if dims.contains(&0) {
            return Err(Error::invalid(format!("cannot tile an empty volume {dims:?}")));
        }
        let core = [0, 1, 2].map(|i| {
            if core[i] >= dims[i] {
                dims[i]
            } else {
                (core[i].max(2)) & !1
            }
        });
        Ok(CorePlan { dims, core, context })
    }

    /// Aligns a desired core size to the write unit of the output: each axis becomes a
    /// multiple of lcm(unit, 2) (so pooling pairs of every window match the whole
    /// volume's) no larger than `desired`; one lcm(unit, 2) when that is larger (over
    /// the budget: cores never share a chunk); and, where one unit spans the whole axis
    /// (a TIFF plane), `desired` itself. Returns the aligned core and whether every
    /// axis is chunk-aligned (false in the last case: the writer assembles bands).
    pub fn align_core(dims: [usize; 3], desired: [usize; 3], unit: [usize; 3]) -> ([usize; 3], bool) {
        let mut aligned = true;
        let core = [0, 1, 2].map(|i| {
            let d = desired[i].max(2);
            if d >= dims[i] {
                return dims[i];
            }
            let u = unit[i].clamp(1, dims[i]);
            let step = u * 2 / gcd(u, 2);
            if step <= d {
                d / step * step
            } else if u >= dims[i] {
                // one unit spans the axis (a TIFF plane): tiles split it, the writer
                // assembles whole units
                aligned = false;
                d & !1
            } else {
                // a chunk larger than the budget's core: one chunk (pair) per core, over
                // the budget, rather than cores that share chunks
                step
            }
        });
        (core, aligned)
    }

    /// Core ranges along axis `a`.
    pub fn axis_cores(&self, a: usize) -> Vec<(usize, usize)> {
        let (len, c) = (self.dims[a], self.core[a]);
        (0..len.div_ceil(c)).map(|i| (i * c, ((i + 1) * c).min(len))).collect()
    }

    fn counts(&self) -> [usize; 3] {
        [0, 1, 2].map(|a| self.dims[a].div_ceil(self.core[a]))
    }

    /// Number of tiles.
    pub fn count(&self) -> usize {
        self.counts().iter().product()
    }

    /// The window of a core along one axis: `context` more on each side, start even.
    fn window_axis(&self, a: usize, c0: usize, c1: usize) -> (usize, usize) {
        let w0 = c0.saturating_sub(self.context) & !1;
        let w1 = (c1 + self.context).min(self.dims[a]);
        (w0, w1)
    }

    /// The window of any core region (a piece of a tile's core, say): `context` more
    /// on each side, starts even, clipped to the volume.
    pub fn window_of(&self, core: Region) -> Region {
        let mut window = core;
        for a in 0..3 {
            let (w0, w1) = self.window_axis(a, core.start[a], core.end()[a]);
            window.start[a] = w0;
            window.shape[a] = w1 - w0;
        }
        window
    }

    /// Tile `index` (z, y, x raster order).
    pub fn tile(&self, index: usize) -> StreamTile {
        let [_, ny, nx] = self.counts();
        let idx = [index / (ny * nx), (index / nx) % ny, index % nx];
        let mut core = Region::new([0; 3], [0; 3]);
        let mut window = core;
        for a in 0..3 {
            let c0 = idx[a] * self.core[a];
            let c1 = (c0 + self.core[a]).min(self.dims[a]);
            let (w0, w1) = self.window_axis(a, c0, c1);
            core.start[a] = c0;
            core.shape[a] = c1 - c0;
            window.start[a] = w0;
            window.shape[a] = w1 - w0;
        }
        StreamTile { index, core, window }
    }

    /// The largest window, in voxels per axis.
    pub fn max_window(&self) -> [usize; 3] {
        [0, 1, 2].map(|a| {
            self.axis_cores(a)
                .iter()
                .map(|&(c0, c1)| {
                    let (w0, w1) = self.window_axis(a, c0, c1);
                    w1 - w0
                })
                .max()
                .unwrap_or(0)
        })
    }

    /// A bound on every window's size that depends on the core and context only
    /// (clipped to the volume): core + 2·context (+1 when an odd context meets the
    /// even window starts).
    pub fn window_bound(&self) -> [usize; 3] {
        [0, 1, 2].map(|a| {
            if self.core[a] >= self.dims[a] {
                self.dims[a]
            } else {
                (self.core[a] + 2 * self.context + (self.context & 1)).min(self.dims[a])
            }
        })
    }

    /// The host memory (bytes) the tiles in flight of this plan take: README's formula
    /// W·(B + 4·C·(P+1) + 4·P) with W = [`Self::window_bound`] voxels, B the predictor's
    /// bytes per window voxel, C input channels and P tiles read ahead (reader caches
    /// and a TIFF output's band not included).
    pub fn memory_estimate(&self, predictor_bytes_per_voxel: usize, c_in: usize, prefetch: usize) -> usize {
        let w: usize = self.window_bound().iter().product();
        w * (predictor_bytes_per_voxel + super::pipeline_bytes_per_voxel(c_in, prefetch))
    }

    /// The tiles of block `i` of `n`: the raster order split into `n` contiguous ranges
    /// of (nearly) equal length.
    pub fn block_tiles(&self, i: usize, n: usize) -> Result<Range<usize>> {
        check_block(i, n)?;
        let t = self.count();
        if n > t {
            return Err(Error::invalid(format!(
                "--block {i}/{n}: the plan has only {t} tile(s); use at most {t} blocks"
            )));
        }
        Ok(t * i / n..t * (i + 1) / n)
    }

    /// The tiles whose cores intersect `region` (which must lie inside the volume).
    pub fn region_tiles(&self, region: Region) -> Result<Vec<usize>> {
        region.check_fits(self.dims, "--region")?;
        let [_, ny, nx] = self.counts();
        let r = |a: usize| region.start[a] / self.core[a]..(region.end()[a] - 1) / self.core[a] + 1;
        let mut out = Vec::new();
        for z in r(0) {
            for y in r(1) {
                for x in r(2) {
                    out.push((z * ny + y) * nx + x);
                }
            }
        }
        Ok(out)
    }
}

/// Checks a block number: 0 ≤ i < n.
pub fn check_block(i: usize, n: usize) -> Result<()> {
    if n == 0 || i >= n {
        return Err(Error::invalid(format!(
            "--block {i}/{n}: the block index must satisfy 0 ≤ I < N (e.g. --block 0/4 … 3/4)"
        )));
    }
    Ok(())
}

/// Parses `I/N`.
pub fn parse_block(s: &str) -> std::result::Result<(usize, usize), String> {
    let (i, n) = s
        .split_once('/')
        .ok_or_else(|| format!("{s:?}: a block is I/N, e.g. 0/8 (block 0 of 8)"))?;
    let p = |t: &str| {
        t.trim()
            .parse::<usize>()
            .map_err(|_| format!("{s:?}: a block is I/N with whole numbers, e.g. 3/8"))
    };
    let (i, n) = (p(i)?, p(n)?);
    check_block(i, n).map_err(|e| e.to_string())?;
    Ok((i, n))
}

/// Parses `z0:z1,y0:y1,x0:x1` (half-open voxel ranges).
pub fn parse_region(s: &str) -> std::result::Result<Region, String> {
    let parts: Vec<&str> = s.split(',').collect();
    if parts.len() != 3 {
        return Err(format!("{s:?}: a region is z0:z1,y0:y1,x0:x1, e.g. 0:64,0:512,0:512"));
    }
    let mut r = Region::new([0; 3], [0; 3]);
    for (a, p) in parts.iter().enumerate() {
        let (lo, hi) = p
            .split_once(':')
            .ok_or_else(|| format!("{s:?}: axis {a} is {p:?}, expected START:END"))?;
        let lo: usize = lo
            .trim()
            .parse()
            .map_err(|_| format!("{s:?}: {lo:?} is not a number"))?;
        let hi: usize = hi
            .trim()
            .parse()
            .map_err(|_| format!("{s:?}: {hi:?} is not a number"))?;
        if hi <= lo {
            return Err(format!(
                "{s:?}: axis {a} range {lo}:{hi} is empty (END must exceed START)"
            ));
        }
        r.start[a] = lo;
        r.shape[a] = hi - lo;
    }
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cores_tile_the_volume_once_and_windows_start_even() {
        let p = CorePlan::new([21, 70, 91], [8, 32, 32], 18).unwrap();
        let mut hits = vec![0u8; 21 * 70 * 91];
        for k in 0..p.count() {
            let t = p.tile(k);
            assert_eq!(t.index, k);
            for a in 0..3 {
                assert_eq!(t.window.start[a] % 2, 0);
                assert!(t.window.start[a] <= t.core.start[a] && t.window.end()[a] >= t.core.end()[a]);
            }
            for z in t.core.start[0]..t.core.end()[0] {
                for y in t.core.start[1]..t.core.end()[1] {
                    for x in t.core.start[2]..t.core.end()[2] {
                        hits[(z * 70 + y) * 91 + x] += 1;
                    }
                }
            }
        }
        assert!(hits.iter().all(|&h| h == 1));
    }

    #[test]
    fn blocks_partition_tiles_and_never_share_a_chunk() {
        let dims = [40, 70, 90];
        let unit = [8, 16, 16];
        let (core, aligned) = CorePlan::align_core(dims, [20, 40, 40], unit);
        assert!(aligned);
        assert_eq!(core, [16, 32, 32]);
        let p = CorePlan::new(dims, core, 18).unwrap();
        let n = 5;
        let mut owner = std::collections::HashMap::new();
        let mut covered = 0;
        for i in 0..n {
            let r = p.block_tiles(i, n).unwrap();
            covered += r.len();
            for k in r {
                let c = p.tile(k).core;
                for a in 0..3 {
                    assert_eq!(c.start[a] % unit[a], 0);
                }
                // every chunk the core touches belongs to this block alone
                for cz in c.start[0] / unit[0]..(c.end()[0] - 1) / unit[0] + 1 {
                    for cy in c.start[1] / unit[1]..(c.end()[1] - 1) / unit[1] + 1 {
                        for cx in c.start[2] / unit[2]..(c.end()[2] - 1) / unit[2] + 1 {
                            let prev = owner.insert((cz, cy, cx), i);
                            assert!(
                                prev.is_none(),
                                "chunk {:?} written by blocks {prev:?} and {i}",
                                (cz, cy, cx)
                            );
                        }
                    }
                }
            }
        }
        assert_eq!(covered, p.count());
        assert!(p.block_tiles(3, 2).is_err());
        assert!(p.block_tiles(0, 0).is_err());
        assert!(p.block_tiles(0, 10_000).is_err());
    }

    #[test]
    fn block_and_region_strings() {
        assert_eq!(parse_block("2/8"), Ok((2, 8)));
        assert!(parse_block("3/2").unwrap_err().contains("0 ≤ I < N"));
        assert!(parse_block("0/0").is_err());
        assert!(parse_block("1-2").is_err());
        assert_eq!(parse_region("0:4,2:10,3:5"), Ok(Region::new([0, 2, 3], [4, 8, 2])));
        assert!(parse_region("4:4,0:1,0:1").is_err());
        assert!(parse_region("0:4,0:1").is_err());
        let p = CorePlan::new([20, 64, 64], [10, 32, 32], 0).unwrap();
        assert_eq!(p.region_tiles(Region::new([0, 30, 0], [1, 4, 1])).unwrap(), vec![0, 2]);
    }

    #[test]
    fn memory_follows_the_budget_not_the_volume() {
        // the CPU predictor's 320 B per voxel, one channel, 3 tiles ahead
        let (bpv, c_in, p) = (320, 1, 3);
        for (budget, depth, hw) in [(512usize << 20, 300, 256), (256 << 20, 150, 600), (2 << 30, 700, 1000)] {
            let window = crate::infer::stream::choose_window(budget, bpv, c_in, p);
            let plan = |d: usize| {
                let dims = [d, hw, hw];
                let core = budget_core(dims, 18, window);
                let (core, _) = CorePlan::align_core(dims, core, [16, 32, 32]);
                CorePlan::new(dims, core, 18).unwrap()
            };
            let (a, b) = (plan(depth), plan(4 * depth));
            assert!(
                a.core[0] + 36 < depth,
                "depth {depth} must exceed a window: core {:?}",
                a.core
            );
            assert_eq!(a.core, b.core, "budget {budget}");
            let (ma, mb) = (a.memory_estimate(bpv, c_in, p), b.memory_estimate(bpv, c_in, p));
            assert_eq!(ma, mb, "budget {budget}: depth {depth} and {}", 4 * depth);
            assert!(ma <= budget, "{ma} > {budget}");
            // the budget is used, not just respected: within alignment to the chunks
            assert!(ma * 4 > budget, "{ma} of {budget}");
            // and the windows the pipeline sizes its buffers by stay within the bound
            for q in [&a, &b] {
                let (mw, wb) = (q.max_window(), q.window_bound());
                assert!((0..3).all(|i| mw[i] <= wb[i]), "{mw:?} > {wb:?}");
            }
        }
        // a volume thinner than a window: that axis is whole, the others take the budget
        let window = 1_000_000;
        let c = budget_core([20, 4000, 4000], 18, window);
        assert_eq!(c[0], 20);
        assert!(c[1] > 100 && 20 * (c[1] + 36) * (c[2] + 36) <= window, "{c:?}");
        assert_eq!(budget_core([20, 30, 40], 18, window), [20, 30, 40]);
        // a budget below the smallest tile gives the smallest tile
        assert_eq!(budget_core([500; 3], 18, 1000), [16; 3]);
    }

    #[test]
    fn align_core_with_plane_units_assembles() {
        let (core, aligned) = CorePlan::align_core([30, 500, 600], [16, 128, 128], [1, 500, 600]);
        assert!(!aligned);
        assert_eq!(core, [16, 128, 128]);
        let (core, _) = CorePlan::align_core([30, 500, 600], [16, 128, 128], [3, 64, 64]);
        assert_eq!(core, [12, 128, 128]);
    }
}

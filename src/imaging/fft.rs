//! Real-to-complex 3D FFTs: realfft along x, rustfft along y and z, parallel with rayon.
//!
//! The spectrum is kept in a transposed layout, `[kx][ky][kz]` (index
//! `(kx·ny + ky)·nz + kz`, kx in 0..nx/2+1), so that every 1D transform runs on contiguous
//! lines; pointwise products of two spectra (all that convolution and RL need) do not
//! care about the layout. [`Fft3::freq`] gives the signed frequency of an index.

use rayon::prelude::*;
use realfft::{ComplexToReal, RealFftPlanner, RealToComplex};
use rustfft::{num_complex::Complex32, Fft, FftPlanner};
use std::ops::Range;
use std::sync::Arc;

/// Lines moved per task in the z transposes (8 complex values = one cache line).
const BLOCK: usize = 16;

pub struct Fft3 {
    /// Real-space (z, y, x) size.
    pub dims: [usize; 3],
    /// nx/2 + 1.
    pub xc: usize,
    r2c: Arc<dyn RealToComplex<f32>>,
    c2r: Arc<dyn ComplexToReal<f32>>,
    fy: Arc<dyn Fft<f32>>,
    iy: Arc<dyn Fft<f32>>,
    fz: Arc<dyn Fft<f32>>,
    iz: Arc<dyn Fft<f32>>,
}

/// The smallest n' ≥ n whose prime factors are 2, 3, 5 and 7 (fast FFT sizes); even when `even`.
pub fn fast_len(n: usize, even: bool) -> usize {
    let mut m = n.max(1);
    loop {
        let mut r = m;
        for p in [2, 3, 5, 7] {
            while r.is_multiple_of(p) {
                r /= p;
            }
        }
        if r == 1 && (!even || m.is_multiple_of(2)) {
            return m;
        }
        m += 1;
    }
}

impl Fft3 {
    pub fn new(dims: [usize; 3]) -> Self {
        let [nz, ny, nx] = dims;
        let mut rp = RealFftPlanner::<f32>::new();
        let mut cp = FftPlanner::<f32>::new();
        Fft3 {
            dims,
            xc: nx / 2 + 1,
            r2c: rp.plan_fft_forward(nx),
            c2r: rp.plan_fft_inverse(nx),
            fy: cp.plan_fft_forward(ny),
            iy: cp.plan_fft_inverse(ny),
            fz: cp.plan_fft_forward(nz),
            iz: cp.plan_fft_inverse(nz),
        }
    }

    pub fn real_len(&self) -> usize {
        self.dims.iter().product()
    }

    pub fn spectrum_len(&self) -> usize {
        self.dims[0] * self.dims[1] * self.xc
    }

    /// Signed frequency indices (kz, ky, kx) of spectrum index `i`.
    pub fn freq(&self, i: usize) -> [i64; 3] {
        let [nz, ny, _] = self.dims;
        let kz = i % nz;
        let ky = (i / nz) % ny;
        let kx = i / (nz * ny);
        let s = |k: usize, n: usize| {
            if k <= n / 2 {
                k as i64
            } else {
                k as i64 - n as i64
            }
        };
        [s(kz, nz), s(ky, ny), kx as i64]
    }

    /// Forward transform of `input` (clobbered) into `out` (spectrum_len), with
    /// `scratch` (spectrum_len) as working space.
    pub fn forward(&self, input: &mut [f32], out: &mut [Complex32], scratch: &mut [Complex32]) {
        let [_, ny, nx] = self.dims;
        let xc = self.xc;
        assert_eq!(input.len(), self.real_len());
        assert_eq!(out.len(), self.spectrum_len());
        assert_eq!(scratch.len(), self.spectrum_len());
        // x: rows → out as [z][y][kx]
        let r2c = &self.r2c;
        input
            .par_chunks_mut(nx * ny)
            .zip(out.par_chunks_mut(xc * ny))
            .for_each_init(
                || r2c.make_scratch_vec(),
                |s, (inp, o)| {
                    for (row, orow) in inp.chunks_exact_mut(nx).zip(o.chunks_exact_mut(xc)) {
                        let _ = r2c.process_with_scratch(row, orow, s);
                    }
                },
            );
        // y: per plane, transpose [y][kx] → [kx][y] into scratch, transform rows of ny
        let fy = &self.fy;
        out.par_chunks(xc * ny)
            .zip(scratch.par_chunks_mut(xc * ny))
            .for_each_init(
                || vec![Complex32::default(); fy.get_inplace_scratch_len()],
                |s, (a, b)| {
                    transpose(a, b, ny, xc);
                    fy.process_with_scratch(b, s);
                },
            );
        self.forward_z_stage(scratch, None, out);
    }

    /// The last stage of both forward transforms: transpose `src` [z][m] → [m][z]
    /// (m = kx·ny + ky) into `out`, transform rows of nz, and multiply by `kernel`
    /// (same layout as `out`) while the block is in cache, when given.
    fn forward_z_stage(&self, src: &[Complex32], kernel: Option<&[Complex32]>, out: &mut [Complex32]) {
        let [nz, ny, _] = self.dims;
        let m = self.xc * ny;
        let fz = &self.fz;
        out.par_chunks_mut(BLOCK * nz).enumerate().for_each_init(
            || vec![Complex32::default(); fz.get_inplace_scratch_len()],
            |s, (bi, o)| {
                let m0 = bi * BLOCK;
                let cnt = o.len() / nz;
                for z in 0..nz {
                    let row = &src[z * m + m0..z * m + m0 + cnt];
                    for (j, &v) in row.iter().enumerate() {
                        o[j * nz + z] = v;
                    }
                }
                fz.process_with_scratch(o, s);
                if let Some(k) = kernel {
                    let len = o.len();
                    for (a, b) in o.iter_mut().zip(&k[m0 * nz..m0 * nz + len]) {
                        *a *= *b;
                    }
                }
            },
        );
    }

    /// Inverse transform of `spec` (clobbered) into `out` (real_len), normalized (1/N),
    /// with `scratch` (spectrum_len) as working space.
    pub fn inverse(&self, spec: &mut [Complex32], out: &mut [f32], scratch: &mut [Complex32]) {
        let [nz, ny, nx] = self.dims;
        let xc = self.xc;
        let m = xc * ny;
        assert_eq!(spec.len(), self.spectrum_len());
        assert_eq!(out.len(), self.real_len());
        // z
        let iz = &self.iz;
        spec.par_chunks_mut(BLOCK * nz).for_each_init(
            || vec![Complex32::default(); iz.get_inplace_scratch_len()],
            |s, c| iz.process_with_scratch(c, s),
        );
        // [m][z] → [z][m] into scratch, BLOCK planes per task
        let src: &[Complex32] = spec;
        scratch.par_chunks_mut(BLOCK * m).enumerate().for_each(|(bi, o)| {
            let z0 = bi * BLOCK;
            let cnt = o.len() / m;
            for j in 0..m {
                let col = &src[j * nz + z0..j * nz + z0 + cnt];
                for (zz, &v) in col.iter().enumerate() {
                    o[zz * m + j] = v;
                }
            }
        });
        // y: per plane rows of ny ([kx][y]), transpose back to [y][kx] into spec
        let iy = &self.iy;
        scratch.par_chunks_mut(m).zip(spec.par_chunks_mut(m)).for_each_init(
            || vec![Complex32::default(); iy.get_inplace_scratch_len()],
            |s, (b, a)| {
                iy.process_with_scratch(b, s);
                transpose(b, a, xc, ny);
            },
        );
        // x: c2r per row, scaled
        let c2r = &self.c2r;
        let scale = 1.0 / (nx * ny * nz) as f32;
        spec.par_chunks_mut(xc * ny)
            .zip(out.par_chunks_mut(nx * ny))
            .for_each_init(
                || c2r.make_scratch_vec(),
                |s, (a, o)| {
                    for (crow, orow) in a.chunks_exact_mut(xc).zip(o.chunks_exact_mut(nx)) {
                        crow[0].im = 0.0;
                        if nx % 2 == 0 {
                            crow[xc - 1].im = 0.0;
                        }
                        let _ = c2r.process_with_scratch(crow, orow, s);
                        orow.iter_mut().for_each(|v| *v *= scale);
                    }
                },
            );
    }
    /// The x and y stages of the forward transform, per plane in cache: r2c rows into a
    /// plane buffer, transpose, y FFTs, into `scratch` (planes outside `support.0` and
    /// rows outside `support.1` are known zero: skipped).
    fn forward_xy_stage(&self, input: &[f32], support: (Range<usize>, Range<usize>), scratch: &mut [Complex32]) {
        let [_, ny, nx] = self.dims;
        let xc = self.xc;
        let (zr, yr) = support;
        let (r2c, fy) = (&self.r2c, &self.fy);
        input
            .par_chunks(nx * ny)
            .zip(scratch.par_chunks_mut(xc * ny))
            .enumerate()
            .for_each_init(
                || {
                    (
                        r2c.make_scratch_vec(),
                        r2c.make_input_vec(),
                        vec![Complex32::default(); xc * ny],
                        vec![Complex32::default(); fy.get_inplace_scratch_len()],
                    )
                },
                |(s, row, plane, sy), (z, (inp, b))| {
                    if !zr.contains(&z) {
                        b.fill(Complex32::default());
                        return;
                    }
                    for (y, (irow, prow)) in inp.chunks_exact(nx).zip(plane.chunks_exact_mut(xc)).enumerate() {
                        if yr.contains(&y) {
                            row.copy_from_slice(irow);
                            let _ = r2c.process_with_scratch(row, prow, s);
                        } else {
                            prow.fill(Complex32::default());
                        }
                    }
                    transpose(plane, b, ny, xc);
                    fy.process_with_scratch(b, sy);
                },
            );
    }

    /// [`Fft3::forward`] that leaves `input` untouched and multiplies the spectrum by
    /// `kernel` (same layout) on the fly, when given. `support` (z range, y range), when
    /// given, promises that `input` is zero outside those planes and rows: their
    /// transforms are skipped.
    pub fn forward_mul(
        &self,
        input: &[f32],
        kernel: Option<&[Complex32]>,
        support: Option<(Range<usize>, Range<usize>)>,
        out: &mut [Complex32],
        scratch: &mut [Complex32],
    ) {
        let support = support.unwrap_or((0..self.dims[0], 0..self.dims[1]));
        assert_eq!(input.len(), self.real_len());
        assert_eq!(out.len(), self.spectrum_len());
        assert_eq!(scratch.len(), self.spectrum_len());
        self.forward_xy_stage(input, support, scratch);
        self.forward_z_stage(scratch, kernel, out);
    }

    /// [`Fft3::inverse`] that hands each real z plane in `planes`, as computed, to
    /// `sink(z, dst_plane, result_plane)` with the matching plane of `dst`, so that
    /// pointwise work on the result needs no pass of its own. Planes of `dst` outside
    /// `planes` are set to 0 without being computed.
    pub fn inverse_planes<F>(
        &self,
        spec: &mut [Complex32],
        scratch: &mut [Complex32],
        dst: &mut [f32],
        planes: Range<usize>,
        sink: F,
    ) where
        F: Fn(usize, &mut [f32], &[f32]) + Sync,
    {
        let [nz, ny, _] = self.dims;
        let xc = self.xc;
        let m = xc * ny;
        assert_eq!(spec.len(), self.spectrum_len());
        assert_eq!(dst.len(), self.real_len());
        // z inverse FFTs on BLOCK lines at a time, scattered straight into [z][m] planes
        let iz = &self.iz;
        let dst_ptr = SharedMut(scratch.as_mut_ptr());
        let sl = scratch.len();
        spec.par_chunks(BLOCK * nz).enumerate().for_each_init(
            || {
                (
                    vec![Complex32::default(); BLOCK * nz],
                    vec![Complex32::default(); iz.get_inplace_scratch_len()],
                )
            },
            |(buf, s), (bi, c)| {
                let cnt = c.len() / nz;
                let m0 = bi * BLOCK;
                let b = &mut buf[..c.len()];
                b.copy_from_slice(c);
                iz.process_with_scratch(b, s);
                for z in planes.clone() {
                    for j in 0..cnt {
                        let i = z * m + m0 + j;
                        assert!(i < sl);
                        // SAFETY: i < scratch.len(); each task owns the columns m0..m0+cnt of
                        // every plane, so no two tasks write the same element, and scratch is
                        // not read until the parallel loop has finished.
                        unsafe { *dst_ptr.get().add(i) = b[j * nz + z] };
                    }
                }
            },
        );
        self.inverse_yx_planes(scratch, dst, &planes, sink);
    }

    /// Circular convolution with `kernel` (a spectrum in this layout) in one sweep per
    /// stage: x/y transforms per plane, then per block of z lines FFT · kernel · inverse
    /// FFT without leaving the cache, then inverse y/x per plane handed to
    /// `sink(z, dst_plane, result_plane)` for z in `planes` (other planes of `dst` are set
    /// to 0). `support` as in [`Fft3::forward_mul`]. Equals `forward_mul` followed by
    /// `inverse_planes`, with one scratch buffer of `spectrum_len()` and no spectrum kept.
    #[allow(clippy::too_many_arguments)]
    pub fn convolve_planes<F>(
        &self,
        input: &[f32],
        kernel: &[Complex32],
        support: Option<(Range<usize>, Range<usize>)>,
        scratch: &mut [Complex32],
        dst: &mut [f32],
        planes: Range<usize>,
        sink: F,
    ) where
        F: Fn(usize, &mut [f32], &[f32]) + Sync,
    {
        let [nz, ny, _] = self.dims;
        let xc = self.xc;
        let m = xc * ny;
        assert_eq!(input.len(), self.real_len());
        assert_eq!(dst.len(), self.real_len());
        assert_eq!(scratch.len(), self.spectrum_len());
        assert_eq!(kernel.len(), self.spectrum_len());
        let (zr, yr) = support.unwrap_or((0..nz, 0..ny));
        self.forward_xy_stage(input, (zr, yr), scratch);
        // z: gather BLOCK columns, FFT, multiply, inverse FFT, scatter back (same columns)
        let (fz, iz) = (&self.fz, &self.iz);
        let ptr = SharedMut(scratch.as_mut_ptr());
        let sl = self.spectrum_len();
        let nblocks = m.div_ceil(BLOCK);
        (0..nblocks).into_par_iter().for_each_init(
            || {
                (
                    vec![Complex32::default(); BLOCK * nz],
                    vec![Complex32::default(); fz.get_inplace_scratch_len().max(iz.get_inplace_scratch_len())],
                )
            },
            |(buf, s), bi| {
                let m0 = bi * BLOCK;
                let cnt = BLOCK.min(m - m0);
                let b = &mut buf[..cnt * nz];
                assert!((nz - 1) * m + m0 + cnt <= sl);
                for z in 0..nz {
                    for j in 0..cnt {
                        // SAFETY: in bounds (asserted); this task alone reads and writes
                        // columns m0..m0+cnt, no other reference to scratch is used meanwhile.
                        b[j * nz + z] = unsafe { *ptr.get().add(z * m + m0 + j) };
                    }
                }
                fz.process_with_scratch(b, s);
                for (a, k) in b.iter_mut().zip(&kernel[m0 * nz..(m0 + cnt) * nz]) {
                    *a *= *k;
                }
                iz.process_with_scratch(b, s);
                for z in planes.clone() {
                    for j in 0..cnt {
                        // SAFETY: as above.
                        unsafe { *ptr.get().add(z * m + m0 + j) = b[j * nz + z] };
                    }
                }
            },
        );
        self.inverse_yx_planes(scratch, dst, &planes, sink);
    }

    /// The last stage of [`Fft3::inverse_planes`] and [`Fft3::convolve_planes`]: `scratch`
    /// holds each z plane's y/x spectrum ([z][m] planes); inverse y then x per plane, scaled
    /// by 1/N, handed to `sink(z, dst_plane, result_plane)` for z in `planes` (other planes
    /// of `dst` are set to 0).
    fn inverse_yx_planes<F>(&self, scratch: &mut [Complex32], dst: &mut [f32], planes: &Range<usize>, sink: F)
    where
        F: Fn(usize, &mut [f32], &[f32]) + Sync,
    {
        let [nz, ny, nx] = self.dims;
        let (xc, m) = (self.xc, self.xc * ny);
        let (iy, c2r) = (&self.iy, &self.c2r);
        let scale = 1.0 / (nx * ny * nz) as f32;
        scratch
            .par_chunks_mut(m)
            .zip(dst.par_chunks_mut(nx * ny))
            .enumerate()
            .for_each_init(
                || {
                    (
                        vec![Complex32::default(); iy.get_inplace_scratch_len()],
                        vec![Complex32::default(); m],
                        c2r.make_scratch_vec(),
                        vec![0.0f32; nx * ny],
                    )
                },
                |(sy, plane_c, sx, plane_r), (z, (b, d))| {
                    if !planes.contains(&z) {
                        d.fill(0.0);
                        return;
                    }
                    iy.process_with_scratch(b, sy);
                    transpose(b, plane_c, xc, ny);
                    for (crow, orow) in plane_c.chunks_exact_mut(xc).zip(plane_r.chunks_exact_mut(nx)) {
                        crow[0].im = 0.0;
                        if nx % 2 == 0 {
                            crow[xc - 1].im = 0.0;
                        }
                        let _ = c2r.process_with_scratch(crow, orow, sx);
                        orow.iter_mut().for_each(|v| *v *= scale);
                    }
                    sink(z, d, plane_r);
                },
            );
    }
}

/// A pointer that parallel tasks may share because each writes disjoint elements.
struct SharedMut(*mut Complex32);
unsafe impl Sync for SharedMut {}
unsafe impl Send for SharedMut {}
impl SharedMut {
    fn get(&self) -> *mut Complex32 {
        self.0
    }
}

/// `b[c][r] = a[r][c]` for an `rows × cols` matrix `a`, in cache-sized tiles.
fn transpose(a: &[Complex32], b: &mut [Complex32], rows: usize, cols: usize) {
    const T: usize = 16;
    for r0 in (0..rows).step_by(T) {
        for c0 in (0..cols).step_by(T) {
            for r in r0..(r0 + T).min(rows) {
                for c in c0..(c0 + T).min(cols) {
                    b[c * rows + r] = a[r * cols + c];
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Direct DFT of one frequency for the comparison.
    fn dft_at(x: &[f32], dims: [usize; 3], k: [i64; 3]) -> (f64, f64) {
        let [nz, ny, nx] = dims;
        let (mut re, mut im) = (0.0, 0.0);
        for z in 0..nz {
            for y in 0..ny {
                for xx in 0..nx {
                    let ph = -2.0
                        * std::f64::consts::PI
                        * (k[0] as f64 * z as f64 / nz as f64
                            + k[1] as f64 * y as f64 / ny as f64
                            + k[2] as f64 * xx as f64 / nx as f64);
                    let v = x[(z * ny + y) * nx + xx] as f64;
                    re += v * ph.cos();
                    im += v * ph.sin();
                }
            }
        }
        (re, im)
    }

    #[test]
    fn forward_matches_dft_and_inverse_round_trips() {
        for dims in [[6usize, 10, 8], [5, 7, 9], [12, 3, 16]] {
            let n: usize = dims.iter().product();
            let x: Vec<f32> = (0..n).map(|i| ((i * 7919) % 101) as f32 / 50.0 - 1.0).collect();
            let f = Fft3::new(dims);
            let mut inp = x.clone();
            let mut spec = vec![Complex32::default(); f.spectrum_len()];
            let mut scr = spec.clone();
            f.forward(&mut inp, &mut spec, &mut scr);
            for i in (0..spec.len()).step_by(7) {
                let k = f.freq(i);
                let (re, im) = dft_at(&x, dims, k);
                assert!(
                    (spec[i].re as f64 - re).abs() < 1e-3 && (spec[i].im as f64 - im).abs() < 1e-3,
                    "{dims:?} {k:?}"
                );
            }
            let mut back = vec![0.0f32; n];
            f.inverse(&mut spec, &mut back, &mut scr);
            let err = x.iter().zip(&back).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
            assert!(err < 1e-5, "{dims:?} round trip error {err}");
        }
    }

    #[test]
    fn fused_variants_match_the_plain_transforms() {
        let dims = [6usize, 10, 8];
        let n: usize = dims.iter().product();
        let x: Vec<f32> = (0..n).map(|i| ((i * 31) % 17) as f32 - 8.0).collect();
        let f = Fft3::new(dims);
        let k: Vec<Complex32> = (0..f.spectrum_len())
            .map(|i| Complex32::new(1.0 + (i % 3) as f32, (i % 5) as f32 - 2.0))
            .collect();
        let (mut a, mut b) = (
            vec![Complex32::default(); f.spectrum_len()],
            vec![Complex32::default(); f.spectrum_len()],
        );
        let mut scr = a.clone();
        f.forward_mul(&x, Some(&k), None, &mut a, &mut scr);
        let mut xin = x.clone();
        f.forward(&mut xin, &mut b, &mut scr);
        b.iter_mut().zip(&k).for_each(|(v, w)| *v *= *w);
        assert!(a.iter().zip(&b).all(|(p, q)| (p - q).norm() < 1e-3));
        let mut r1 = vec![0.0f32; n];
        f.inverse(&mut b, &mut r1, &mut scr);
        let mut r2 = vec![1.0f32; n];
        f.inverse_planes(&mut a, &mut scr, &mut r2, 0..dims[0], |_, d, r| {
            d.iter_mut().zip(r).for_each(|(d, r)| *d += r)
        });
        assert!(r1.iter().zip(&r2).all(|(p, q)| (p + 1.0 - q).abs() < 1e-4));

        // pruned: input zero outside planes 1..4 and rows 2..7; output wanted on planes 2..5
        let plane = dims[1] * dims[2];
        let xs: Vec<f32> = x
            .iter()
            .enumerate()
            .map(|(i, &v)| {
                if (1..4).contains(&(i / plane)) && (2..7).contains(&((i / dims[2]) % dims[1])) {
                    v
                } else {
                    0.0
                }
            })
            .collect();
        let (mut c, mut d) = (
            vec![Complex32::default(); f.spectrum_len()],
            vec![Complex32::default(); f.spectrum_len()],
        );
        f.forward_mul(&xs, None, Some((1..4, 2..7)), &mut c, &mut scr);
        f.forward_mul(&xs, None, None, &mut d, &mut scr);
        assert!(c.iter().zip(&d).all(|(p, q)| (p - q).norm() < 1e-4));
        let mut full = vec![0.0f32; n];
        f.inverse(&mut d, &mut full, &mut scr);
        let mut part = vec![7.0f32; n];
        f.inverse_planes(&mut c, &mut scr, &mut part, 2..5, |_, d, r| d.copy_from_slice(r));
        for (i, (p, q)) in full.iter().zip(&part).enumerate() {
            let want = if (2..5).contains(&(i / plane)) { *p } else { 0.0 };
            assert!((want - q).abs() < 1e-4, "{i}: {want} vs {q}");
        }
    }

    #[test]
    fn fast_lengths() {
        assert_eq!(fast_len(97, false), 98);
        assert_eq!(fast_len(11, true), 12);
        assert_eq!(fast_len(127, true), 128);
        assert_eq!(fast_len(121, false), 125);
    }
}

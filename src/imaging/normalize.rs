//! Percentile normalization of rln-spec.md §6, shared by training, inference and `eval`.

use crate::error::{Error, Result};

/// The authors' percentiles: (0.01, 99.5).
pub const P_LO: f64 = 0.01;
pub const P_HI: f64 = 99.5;

/// The `p`-th percentile (0 ≤ p ≤ 100) of `values` with numpy's default ("linear")
/// interpolation: sorted `a`, virtual index `i = p/100 · (n − 1)`, result
/// `a[⌊i⌋] + (a[⌊i⌋+1] − a[⌊i⌋])·frac(i)`, evaluated as numpy does. O(n).
pub fn percentile(values: &[f32], p: f64) -> Result<f64> {
    Ok(percentiles(values, &[p])?[0])
}

/// Several percentiles of one array (one copy of the data, one selection per value).
pub fn percentiles(values: &[f32], ps: &[f64]) -> Result<Vec<f64>> {
    if values.is_empty() {
        return Err(Error::invalid("percentile of an empty volume"));
    }
    if let Some(p) = ps.iter().find(|p| !(0.0..=100.0).contains(*p)) {
        return Err(Error::invalid(format!("percentile {p} is outside [0, 100]")));
    }
    if values.iter().any(|v| v.is_nan()) {
        return Err(Error::invalid("percentile of a volume holding NaN"));
    }
    let mut a = values.to_vec();
    let n = a.len();
    let mut out = Vec::with_capacity(ps.len());
    for &p in ps {
        let q = p / 100.0;
        let virt = q * (n - 1) as f64;
        let lo = (virt.floor() as usize).min(n - 1);
        let t = virt - lo as f64;
        let (_, &mut lo_v, right) = a.select_nth_unstable_by(lo, |x, y| x.total_cmp(y));
        let lo_v = lo_v as f64;
        let hi_v = if lo + 1 < n {
            right.iter().copied().fold(f32::INFINITY, f32::min) as f64
        } else {
            lo_v
        };
        // numpy's _lerp: symmetric form for t ≥ 0.5 (exact at t = 1)
        let d = hi_v - lo_v;
        out.push(if t >= 0.5 { hi_v - d * (1.0 - t) } else { lo_v + d * t });
    }
    Ok(out)
}

/// The affine map of §6 for percentiles `(p_lo_value, p_hi_value)`: returns `(scale, offset)`
/// with `v' = v·scale + offset`.
pub fn percentile_affine(p_lo_value: f64, p_hi_value: f64) -> (f64, f64) {
    if p_hi_value == 0.0 {
        (1.0, 0.0)
    } else if p_hi_value < 2.0 * p_lo_value {
        // bright flat background: divide by the high percentile only
        (1.0 / p_hi_value, 0.0)
    } else {
        let s = 1.0 / (p_hi_value - p_lo_value + 1e-20);
        (s, -p_lo_value * s)
    }
}

/// Normalizes `values` in place by spec §6 and returns the two percentile values
/// `(P_lo, P_hi)`: `(v − P_lo)/(P_hi − P_lo + 1e-20)`; unchanged if `P_hi = 0`;
/// `v / P_hi` if `P_hi < 2·P_lo`.
pub fn normalize_percentile_in_place(values: &mut [f32], p_lo: f64, p_hi: f64) -> Result<(f64, f64)> {
    let pv = percentiles(values, &[p_lo, p_hi])?;
    let (lo, hi) = (pv[0], pv[1]);
    if hi == 0.0 {
        return Ok((lo, hi));
    }
    if hi < 2.0 * lo {
        values.iter_mut().for_each(|v| *v = (*v as f64 / hi) as f32);
    } else {
        let den = hi - lo + 1e-20;
        values.iter_mut().for_each(|v| *v = ((*v as f64 - lo) / den) as f32);
    }
    Ok((lo, hi))
}

/// A normalized copy of `values` (see [`normalize_percentile_in_place`]).
pub fn normalize_percentile(values: &[f32], p_lo: f64, p_hi: f64) -> Result<Vec<f32>> {
    let mut v = values.to_vec();
    normalize_percentile_in_place(&mut v, p_lo, p_hi)?;
    Ok(v)
}

/// Ground-truth normalization of §6: `max(0, normalize(g))`.
pub fn normalize_ground_truth(values: &[f32]) -> Result<Vec<f32>> {
    let mut v = normalize_percentile(values, P_LO, P_HI)?;
    v.iter_mut().for_each(|x| *x = x.max(0.0));
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentile_matches_numpy_linear() {
        // np.percentile([3, 1, 4, 1, 5, 9, 2, 6], [0, 10, 50, 99.5, 100])
        let v = [3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0, 6.0];
        let p = percentiles(&v, &[0.0, 10.0, 50.0, 99.5, 100.0]).unwrap();
        let want = [1.0, 1.0, 3.5, 8.895, 9.0];
        for (a, b) in p.iter().zip(want) {
            assert!((a - b).abs() < 1e-12, "{p:?}");
        }
    }

    #[test]
    fn normalization_cases() {
        let v: Vec<f32> = (0..1000).map(|i| i as f32).collect();
        let n = normalize_percentile(&v, 0.01, 99.5).unwrap();
        let lo = 0.0999f64;
        let hi = 994.005f64;
        assert!((n[500] as f64 - (500.0 - lo) / (hi - lo)).abs() < 1e-6);
        // P_hi = 0: unchanged
        let z = vec![0.0f32; 10];
        assert_eq!(normalize_percentile(&z, 0.01, 99.5).unwrap(), z);
        // P_hi < 2 P_lo: divide by P_hi
        let flat: Vec<f32> = (0..1000).map(|i| 100.0 + (i % 10) as f32 * 0.1).collect();
        let n = normalize_percentile(&flat, 0.01, 99.5).unwrap();
        let hi = percentile(&flat, 99.5).unwrap();
        assert!((n[3] as f64 - flat[3] as f64 / hi).abs() < 1e-6);
    }
}

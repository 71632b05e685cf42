//! The command-line front end: argument parsing and printing only; the work is done by
//! the library.

pub mod args;
pub mod compare;
pub mod convert;
pub mod core;
pub mod demo;
pub mod imaging;
pub mod infer;
pub mod slurm;
pub mod train;

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

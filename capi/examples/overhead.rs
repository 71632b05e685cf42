//! Times the library's one-call deconvolution (`infer::deconvolve`, CPU) and the C ABI's
//! `rln_engine_deconvolve` on one raw float32 volume, alternating, for the bindings'
//! overhead (python/tests/overhead.py times the Python call on the same file):
//!
//!     cargo run --release -p rln-engine-capi --example overhead -- MODEL VOLUME.f32 NZ NY NX [RUNS]
//!
//! prints each run's seconds and the medians.

use rln_engine::imaging::volume::Volume;
use rln_engine::infer::{deconvolve, CpuPredictor};
use rln_engine::model::Model;
use rln_engine_capi::*;
use std::ffi::CString;
use std::time::Instant;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let a: Vec<String> = std::env::args().collect();
    if a.len() < 6 {
        return Err("usage: overhead MODEL VOLUME.f32 NZ NY NX [RUNS]".into());
    }
    let model = Model::<f32>::load(a[1].as_ref())?;
    let dims = [a[3].parse()?, a[4].parse()?, a[5].parse()?];
    let runs: usize = a.get(6).map_or(Ok(5), |s| s.parse())?;
    let bytes = std::fs::read(&a[2])?;
    let data = bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    let vol = Volume::new(dims, data)?;
    let mut cpu = CpuPredictor { model: model.clone() };
    let path = CString::new(a[1].as_str())?;
    let (mut m, mut engine) = (std::ptr::null_mut(), std::ptr::null_mut());
    let mut out = vec![0f32; vol.len()];
    let buf = |p: *mut f32| RlnBuffer {
        data: p.cast(),
        dtype: RLN_DTYPE_F32,
        shape: dims,
        strides: [0, 0, 0],
    };
    let mut input = vol.data.clone();
    let (ib, ob) = (buf(input.as_mut_ptr()), buf(out.as_mut_ptr()));
    unsafe {
        assert_eq!(rln_model_open(path.as_ptr(), &mut m), RlnStatus::Ok);
        assert_eq!(rln_engine_open(m, RLN_DEVICE_CPU, 0, false, &mut engine), RlnStatus::Ok);
    }
    let (mut lib, mut capi) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        let t = Instant::now();
        let res = deconvolve(&mut cpu, &model, &vol, [256, 256, 256])?;
        lib.push(t.elapsed().as_secs_f64());
        std::hint::black_box(res);
        let t = Instant::now();
        assert_eq!(unsafe { rln_engine_deconvolve(engine, &ib, &ob) }, RlnStatus::Ok);
        capi.push(t.elapsed().as_secs_f64());
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    println!("library runs: {lib:.3?}\nC ABI runs:   {capi:.3?}");
    println!(
        "median: library {:.3} s, C ABI {:.3} s",
        median(&mut lib),
        median(&mut capi)
    );
    unsafe {
        rln_engine_free(engine);
        rln_model_free(m);
    }
    Ok(())
}

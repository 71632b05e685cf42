//! Times the library's one-call deconvolution (`infer::deconvolve`, CPU) on a raw
//! float32 volume, for comparing the Python and C bindings' overhead with the library:
//!
//!     cargo run --release --example time_deconvolve -- MODEL VOLUME.f32 NZ NY NX [RUNS]
//!
//! prints each run's seconds and the median.

use rln_engine::imaging::volume::Volume;
use rln_engine::infer::{deconvolve, CpuPredictor};
use rln_engine::model::Model;
use std::time::Instant;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let a: Vec<String> = std::env::args().collect();
    if a.len() < 6 {
        return Err("usage: time_deconvolve MODEL VOLUME.f32 NZ NY NX [RUNS]".into());
    }
    let model = Model::<f32>::load(a[1].as_ref())?;
    let dims = [a[3].parse()?, a[4].parse()?, a[5].parse()?];
    let runs: usize = a.get(6).map_or(Ok(5), |s| s.parse())?;
    let bytes = std::fs::read(&a[2])?;
    let data = bytes.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
    let vol = Volume::new(dims, data)?;
    let mut cpu = CpuPredictor { model: model.clone() };
    let mut times = Vec::new();
    for _ in 0..runs {
        let t = Instant::now();
        let out = deconvolve(&mut cpu, &model, &vol, [256, 256, 256])?;
        times.push(t.elapsed().as_secs_f64());
        std::hint::black_box(out);
    }
    println!("runs: {times:.3?}");
    times.sort_by(f64::total_cmp);
    println!("median {:.3} s", times[times.len() / 2]);
    Ok(())
}

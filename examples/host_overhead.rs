//! Host-side cost of tiled inference (cutting, normalization, blending, stitching) with a
//! predictor that does no work: `cargo run --release --example host_overhead`.
use rln_engine::infer::stitch::{estimate_normalization, run_tiled, NormalizeMode, StitchOptions};
use rln_engine::infer::tiling::{MemorySink, MemorySource, PlaneSource, TilePlan, RECEPTIVE_RADIUS};
use rln_engine::infer::TilePredictor;
use rln_engine::tensor::Tensor;
struct Identity;
impl TilePredictor for Identity {
    fn describe(&self) -> String {
        "identity".into()
    }
    fn predict(&mut self, x: &Tensor<f32>) -> rln_engine::Result<Tensor<f32>> {
        Ok(x.clone())
    }
    fn bytes_per_voxel(&self) -> usize {
        8
    }
}
fn main() {
    let dims = [128, 1024, 1024];
    let n: usize = dims.iter().product();
    let data: Vec<f32> = (0..n).map(|i| (i % 1013) as f32).collect();
    let plan = TilePlan::new(dims, [512, 432, 432], [10, 24, 24], RECEPTIVE_RADIUS).unwrap();
    let opts = StitchOptions {
        plan,
        normalize: NormalizeMode::Global,
        percentiles: [0.01, 99.5],
        rescale_output: true,
        variant: Default::default(),
    };
    let t = std::time::Instant::now();
    let mut src = MemorySource { dims, data: &data };
    let aff = estimate_normalization(&mut src, [0.01, 99.5], 64 << 20).unwrap();
    let t_norm = t.elapsed().as_secs_f64();
    let mut sink = MemorySink {
        data: Vec::with_capacity(n),
    };
    let mut views: Vec<&mut dyn PlaneSource> = vec![&mut src];
    run_tiled(&mut Identity, &mut views, &[aff], &mut sink, &opts, &mut |_, _| {}).unwrap();
    let t_all = t.elapsed().as_secs_f64();
    println!(
        "{} voxels: normalization {t_norm:.2} s, total {t_all:.2} s ({:.3e} voxels/s host side, {} threads)",
        n,
        n as f64 / t_all,
        rayon::current_num_threads()
    );
}

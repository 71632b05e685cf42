//! Criterion benchmarks of the CPU reference's ops and of the whole network.
//! `cargo bench --bench cpu_ops` (add `-- conv3` to run a subset).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use rln_engine::backend::cpu::CpuBackend;
use rln_engine::backend::{Backend, Epilogue, GradMode};
use rln_engine::model::{Model, ModelConfig};
use rln_engine::net::{BnMode, Rln};
use rln_engine::tensor::{Shape, Tensor};

fn volume(shape: Shape, seed: u32) -> Tensor<f32> {
    let mut s = seed.wrapping_mul(2654435761) | 1;
    let data = (0..shape.len())
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            (s >> 8) as f32 / (1 << 24) as f32
        })
        .collect();
    Tensor::from_vec(shape, data).unwrap()
}

fn ops(c: &mut Criterion) {
    let b = CpuBackend::<f32>::new();
    let mut g = c.benchmark_group("conv3");
    g.sample_size(10);
    // the network's conv shapes at 64³ (full resolution)
    for (ci, co) in [(1usize, 4usize), (4, 4), (1, 8), (8, 8), (10, 8), (16, 8)] {
        let s = Shape::new(1, ci, 64, 64, 64);
        let x = volume(s, 1);
        let w: Vec<f32> = volume(Shape::new(1, 1, co, ci, 27), 2).data;
        let dz = volume(s.with_c(co), 3);
        g.throughput(Throughput::Elements(s.spatial() as u64));
        g.bench_function(BenchmarkId::new("forward", format!("{ci}to{co}")), |bn| {
            bn.iter(|| b.conv3(&[&x], &w, co, &Epilogue::identity()).unwrap())
        });
        g.bench_function(BenchmarkId::new("backward_data", format!("{ci}to{co}")), |bn| {
            bn.iter(|| b.conv3_backward_data(&dz, &w, &[ci], &[true]).unwrap())
        });
        g.bench_function(BenchmarkId::new("backward_weight", format!("{ci}to{co}")), |bn| {
            bn.iter(|| b.conv3_backward_weight(&[&x], &dz).unwrap())
        });
    }
    g.finish();

    let mut g = c.benchmark_group("network");
    g.sample_size(10);
    let s = Shape::new(1, 1, 64, 64, 64);
    let model = Model::<f32>::init(ModelConfig::default(), 1);
    let net = Rln::new(&b, &model);
    let x = volume(s, 4);
    let gt = volume(s, 5);
    g.throughput(Throughput::Elements(s.spatial() as u64));
    g.bench_function("forward_64", |bn| {
        bn.iter(|| net.forward(&x, BnMode::Running, false).unwrap())
    });
    g.bench_function("train_step_64", |bn| {
        bn.iter(|| {
            let f = net.forward(&x, BnMode::Batch, true).unwrap();
            let (_, dy, de) = b.loss(&f.prediction, &f.e1_raw, &x, &gt).unwrap();
            net.backward(&f, &dy, &de, GradMode::Paper).unwrap()
        })
    });
    g.finish();
}

criterion_group!(benches, ops);
criterion_main!(benches);

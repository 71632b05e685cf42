//! Profiling helper: `perf record target/release/examples/prof_net [train]`.
use rln_engine::backend::cpu::CpuBackend;
use rln_engine::backend::{Backend, GradMode};
use rln_engine::model::{Model, ModelConfig};
use rln_engine::net::{BnMode, Rln};
use rln_engine::tensor::{Shape, Tensor};

fn main() {
    let b = CpuBackend::<f32>::new();
    let s = Shape::new(4, 1, 64, 64, 64);
    let x = Tensor::from_vec(s, (0..s.len()).map(|i| ((i * 7919) % 1000) as f32 * 0.001).collect()).unwrap();
    let m = Model::<f32>::init(ModelConfig::default(), 1);
    let net = Rln::new(&b, &m);
    let train = std::env::args().nth(1).is_some_and(|a| a == "train");
    for _ in 0..3 {
        if train {
            let f = net.forward(&x, BnMode::Batch, true).unwrap();
            let (_, dy, de) = b.loss(&f.prediction, &f.e1_raw, &x, &x).unwrap();
            std::hint::black_box(net.backward(&f, &dy, &de, GradMode::Paper).unwrap());
        } else {
            std::hint::black_box(net.forward(&x, BnMode::Running, false).unwrap());
        }
    }
}

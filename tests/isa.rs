//! Every instruction-set variant of the CPU kernels (AVX-512, AVX2+FMA, baseline) computes
//! the same network as the naive implementation. One test in its own binary, because it
//! switches a process-wide setting.

mod common;

use common::*;
use rln_engine::backend::cpu::simd::{detected, force_isa, isa, Isa};
use rln_engine::backend::cpu::CpuBackend;
use rln_engine::backend::{Backend, GradMode};
use rln_engine::model::{Model, Variant};
use rln_engine::net::{BnMode, Rln};
use rln_engine::tensor::{rel_l2, Shape, Tensor};

#[test]
fn every_isa_variant_matches_the_naive_network_and_its_gradients() {
    let m64 = random_model(70, Variant::Single);
    let m32: Model<f32> = m64.cast();
    let s = Shape::new(2, 1, 6, 9, 70);
    let x64: Tensor<f64> = random_volume(71, s);
    let g32: Tensor<f32> = random_volume(72, s);
    let want = naive_forward(&m64, &x64, false);
    let x32: Tensor<f32> = x64.cast();
    let mut grads = Vec::new();
    for which in [Isa::Avx512, Isa::Avx2, Isa::Baseline] {
        force_isa(Some(which));
        if isa() != which {
            eprintln!("skipping {which:?}: this CPU supports only {:?}", detected());
            continue;
        }
        let b = CpuBackend::<f32>::new();
        let net = Rln::new(&b, &m32);
        let y = net.forward(&x32, BnMode::Running, false).unwrap().prediction;
        let e = rel_l2(&y.data, &want.y.data);
        assert!(e < 2e-5, "{which:?}: forward rel err {e:e}");
        let f = net.forward(&x32, BnMode::Batch, true).unwrap();
        let (_, dy, de) = b.loss(&f.prediction, &f.e1_raw, &x32, &g32).unwrap();
        grads.push((which, net.backward(&f, &dy, &de, GradMode::Paper).unwrap()));
    }
    force_isa(None);
    // all variants' gradients agree with the first one to float32 rounding
    let (_, g0) = &grads[0];
    for (which, g) in &grads[1..] {
        for (l, k) in g0.ids() {
            let e = rel_l2(g.tensor(l, k), g0.tensor(l, k));
            assert!(
                e < 1e-4,
                "{which:?} gradient {l}/{k:?} differs from {:?} by {e:e}",
                grads[0].0
            );
        }
    }
}

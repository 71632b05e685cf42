//! Synthetic pairs: determinism, families, noise model, anisotropic mode.

use rln_engine::imaging::psf::gaussian_kernel;
use rln_engine::imaging::synth::{self, Family, SynthConfig, Synthesizer};

fn psf() -> rln_engine::imaging::Volume {
    gaussian_kernel([7, 9, 9], [1.5, 1.0, 1.0]).with_voxel_size([0.2, 0.1, 0.1])
}

#[test]
fn pairs_depend_on_the_seed_only_not_on_threads() {
    let cfg = SynthConfig {
        size: [16, 32, 32],
        ..Default::default()
    };
    let run = |threads: usize, seed: u64| {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        pool.install(|| synth::make_pair(&cfg, &psf(), seed).unwrap())
    };
    let (a, b) = (run(1, 42), run(2, 42));
    assert_eq!(a.0.data, b.0.data);
    assert_eq!(a.1.data, b.1.data);
    let c = run(2, 43);
    assert_ne!(a.1.data, c.1.data);
    assert_eq!(a.1.voxel_size, Some([0.2, 0.1, 0.1]));
}

#[test]
fn noise_model_and_background_follow_the_authors_recipe() {
    // no objects visible: only the background 30 → input ≈ Poisson(5·30) + N(0, 0.5²)
    let cfg = SynthConfig {
        size: [16, 32, 32],
        intensity: [0.0, 1e-6],
        ..Default::default()
    };
    let (input, gt) = synth::make_pair(&cfg, &psf(), 1).unwrap();
    let n = gt.len() as f64;
    assert!(
        gt.data.iter().all(|&v| (v - 30.0).abs() < 1e-3),
        "ground truth is the background"
    );
    let mean = input.sum() / n;
    let var = input.data.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
    assert!((mean - 150.0).abs() < 0.5, "mean {mean}");
    assert!((var / (150.0 + 0.25) - 1.0).abs() < 0.05, "variance {var}");
}

#[test]
fn families_can_be_chosen_and_counts_scale_with_volume() {
    let dims = [64, 64, 64];
    let only = |f: Vec<Family>, seed| {
        let cfg = SynthConfig {
            families: f,
            background: 0.0,
            ..Default::default()
        };
        synth::phantom(&cfg, dims, seed)
    };
    // dots only: every lit voxel belongs to 2×2×2 dots → lit count is a multiple-of-8 scale
    let dots = only(vec![Family::Dots], 3);
    let lit = dots.data.iter().filter(|&&v| v > 0.0).count();
    // 50 per 128³ → 6.25 dots in 64³, ≤ 8 voxels each
    assert!(lit > 0 && lit <= 7 * 8 + 8, "lit voxels {lit}");
    // spheres (100 per 128³ → 12.5 in 64³) fill far more than dots
    let spheres = only(vec![Family::Spheres], 3);
    let lit_s = spheres.data.iter().filter(|&&v| v > 0.0).count();
    assert!(lit_s > 20 * lit, "{lit_s} vs {lit}");
    // filaments are thin and long
    let fil = only(vec![Family::Filaments], 3);
    assert!(fil.data.iter().any(|&v| v > 0.0));
    assert!(synth::make_pair(
        &SynthConfig {
            families: vec![],
            ..Default::default()
        },
        &psf(),
        0
    )
    .is_err());
}

#[test]
fn anisotropic_mode_downsamples_the_input_axially() {
    let cfg = SynthConfig {
        size: [24, 32, 32],
        anisotropic_factor: 3,
        upsample_input: false,
        ..Default::default()
    };
    let (input, gt) = synth::make_pair(&cfg, &psf(), 9).unwrap();
    assert_eq!(gt.dims, [24, 32, 32]);
    assert_eq!(input.dims, [8, 32, 32]);
    assert_eq!(input.voxel_size, Some([0.6000000000000001, 0.1, 0.1]));
    let up = Synthesizer::new(
        &SynthConfig {
            upsample_input: true,
            ..cfg.clone()
        },
        &psf(),
    )
    .unwrap()
    .make_pair(9)
    .unwrap();
    assert_eq!(up.0.dims, [24, 32, 32]);
    // upsampled planes at multiples of 3 are the sampled planes
    assert_eq!(&up.0.data[3 * 1024..4 * 1024], &input.data[1024..2048]);
}

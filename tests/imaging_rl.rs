//! Richardson–Lucy: geometry (no wrap-around), flux, convergence, noisy data, Wiener–Butterworth.

mod imaging_common;
use rln_engine::imaging::metrics::{self, Normalize};
use rln_engine::imaging::psf::{self, gaussian_kernel, GibsonLanni, PsfSpec};
use rln_engine::imaging::rl::{self, BackProjector, RlConfig, RlPlan};
use rln_engine::imaging::synth::{self, SynthConfig};
use rln_engine::imaging::Volume;
use std::ops::ControlFlow;

fn widefield_psf() -> Volume {
    psf::generate(&PsfSpec::GibsonLanni(GibsonLanni {
        na: 1.3,
        wavelength: 0.6,
        ns: 1.515,
        dxy: 0.1,
        dz: 0.2,
        nx: 21,
        nz: 17,
        ..Default::default()
    }))
    .unwrap()
}

#[test]
fn convolve_same_is_linear_convolution_without_wraparound() {
    let dims = [7, 10, 12];
    let img = Volume::new(dims, (0..840).map(|i| ((i * 37) % 23) as f32).collect()).unwrap();
    let k = Volume::new([3, 5, 4], (0..60).map(|i| 1.0 + (i % 7) as f32).collect()).unwrap();
    let s = k.sum();
    let plan = RlPlan::new(dims, &k, BackProjector::Matched).unwrap();
    let out = plan.convolve_same(&img).unwrap();
    let c = [1i64, 2, 2];
    let mut worst: f64 = 0.0;
    for z in 0..7i64 {
        for y in 0..10i64 {
            for x in 0..12i64 {
                let mut acc = 0.0f64;
                for (pz, py, px) in (0..3).flat_map(|a| (0..5).flat_map(move |b| (0..4).map(move |c| (a, b, c)))) {
                    let (sz, sy, sx) = (z - (pz - c[0]), y - (py - c[1]), x - (px - c[2]));
                    if (0..7).contains(&sz) && (0..10).contains(&sy) && (0..12).contains(&sx) {
                        acc += k.at(pz as usize, py as usize, px as usize) as f64 / s
                            * img.at(sz as usize, sy as usize, sx as usize) as f64;
                    }
                }
                worst = worst.max((acc - out.at(z as usize, y as usize, x as usize) as f64).abs());
            }
        }
    }
    assert!(worst < 1e-4, "max deviation from direct convolution {worst}");
}

/// RL error to the truth at iterations 1, 5, 10, 20, 50 must fall.
fn assert_falls(err: &[f64], e0: f64, what: &str) {
    eprintln!(
        "{what}: blurred {e0:.4}, RL at 1/5/10/20/50: {:.4} {:.4} {:.4} {:.4} {:.4}",
        err[0], err[4], err[9], err[19], err[49]
    );
    assert!(err[0] < e0, "{what}: first iteration {} vs blurred {e0}", err[0]);
    for w in [0usize, 4, 9, 19, 49].windows(2) {
        assert!(err[w[1]] < err[w[0]], "{what}: error must fall: {err:?}");
    }
    assert!(err[49] < 0.75 * e0, "{what}: {} vs blurred {e0}", err[49]);
}

#[test]
fn rl_error_falls_over_50_iterations_on_noiseless_data() {
    let psf = gaussian_kernel([9, 11, 11], [1.6, 1.2, 1.2]);
    let size = [24, 48, 48];
    let plan = RlPlan::new(size, &psf, BackProjector::Matched).unwrap();
    let ext = plan.extended_dims();
    // (1) a scene inside the field of view (zero within half a PSF of the edges)
    let cfg = SynthConfig {
        size,
        background: 0.0,
        ..Default::default()
    };
    let mut scene = synth::blur_gaussian_5(&synth::phantom(&cfg, ext, 7));
    let (o, m) = (plan.image_offset(), [4usize, 5, 5]);
    for z in 0..ext[0] {
        for y in 0..ext[1] {
            for x in 0..ext[2] {
                let inside = (0..3).all(|a| {
                    let p = [z, y, x][a];
                    p >= o[a] + m[a] && p + m[a] < o[a] + size[a]
                });
                if !inside {
                    let i = scene.index(z, y, x);
                    scene.data[i] = 0.0;
                }
            }
        }
    }
    let truth = scene.crop(o, size).unwrap();
    let y = plan.blur_extended(&scene).unwrap();
    let mut err = Vec::new();
    let mut flux = Vec::new();
    plan.run(&y, 50, 0.0, |_, e| {
        err.push(imaging_common::rel_l2(&e.data, &truth.data));
        flux.push(e.sum());
        ControlFlow::Continue(())
    })
    .unwrap();
    assert_falls(
        &err,
        imaging_common::rel_l2(&y.data, &truth.data),
        "scene inside the field",
    );
    let total = y.sum();
    for f in &flux {
        assert!((f / total - 1.0).abs() < 2e-3, "flux {f} vs {total}");
    }
    // (2) the authors' scene (background 30) running past the edges: the interior (half a
    // PSF from the edges) converges; the edge planes are less constrained
    let cfg = SynthConfig {
        size,
        ..Default::default()
    };
    let scene = synth::blur_gaussian_5(&synth::phantom(&cfg, ext, 8));
    let truth = scene.crop(o, size).unwrap();
    let y = plan.blur_extended(&scene).unwrap();
    let inner = |v: &Volume| {
        v.crop(m, [size[0] - 2 * m[0], size[1] - 2 * m[1], size[2] - 2 * m[2]])
            .unwrap()
    };
    let (ti, yi) = (inner(&truth), inner(&y));
    let mut err = Vec::new();
    plan.run(&y, 50, 0.0, |_, e| {
        err.push(imaging_common::rel_l2(&inner(e).data, &ti.data));
        ControlFlow::Continue(())
    })
    .unwrap();
    assert_falls(
        &err,
        imaging_common::rel_l2(&yi.data, &ti.data),
        "scene past the edges, interior",
    );
}

#[test]
fn rl_keeps_total_flux_of_a_centered_object() {
    let psf = gaussian_kernel([7, 9, 9], [1.2, 1.0, 1.0]);
    let dims = [20, 32, 32];
    let mut obj = Volume::zeros(dims);
    for (z, y, x, v) in [(10, 16, 16, 1000.0), (8, 12, 18, 500.0), (12, 19, 13, 700.0)] {
        let i = obj.index(z, y, x);
        obj.data[i] = v;
    }
    let plan = RlPlan::new(dims, &psf, BackProjector::Matched).unwrap();
    let y = plan.convolve_same(&obj).unwrap();
    let est = plan.run(&y, 40, 0.0, |_, _| ControlFlow::Continue(())).unwrap();
    let r = est.sum() / y.sum();
    assert!((r - 1.0).abs() < 1e-3, "flux ratio {r}");
    // and it sharpens: the peak voxel gains
    assert!(est.at(10, 16, 16) > 2.0 * y.at(10, 16, 16));
}

fn ssim_series(input: &Volume, gt: &Volume, psf: &Volume, cfg: &RlConfig) -> Vec<f64> {
    let mut out = Vec::new();
    rl::richardson_lucy_with(input, psf, cfg, |_, e| {
        out.push(metrics::evaluate(gt, e, Normalize::Affine, None).unwrap().ssim);
        ControlFlow::Continue(())
    })
    .unwrap();
    out
}

#[test]
fn rl_improves_ssim_on_noisy_pairs() {
    // widefield Gibson–Lanni PSF, the authors' noise (5 photons/unit, read noise 0.5)
    let psf = widefield_psf();
    let cfg = SynthConfig {
        size: [32, 64, 64],
        ..Default::default()
    };
    let (input, gt) = synth::make_pair(&cfg, &psf, 11).unwrap();
    let raw = metrics::evaluate(&gt, &input, Normalize::Affine, None).unwrap().ssim;
    let rl = ssim_series(
        &input,
        &gt,
        &psf,
        &RlConfig {
            iterations: 50,
            ..Default::default()
        },
    );
    let wb = ssim_series(
        &input,
        &gt,
        &psf,
        &RlConfig {
            iterations: 5,
            back_projector: BackProjector::WB_DEFAULT,
            ..Default::default()
        },
    );
    eprintln!(
        "widefield pair: SSIM raw {raw:.4}; RL at 1/5/10/20/50 {:.4} {:.4} {:.4} {:.4} {:.4}; WB at 1..5 {wb:.4?}",
        rl[0], rl[4], rl[9], rl[19], rl[49]
    );
    assert!(rl[49] > raw + 0.3, "RL 50 {} vs raw {raw}", rl[49]);
    let wb_best = wb.iter().copied().fold(f64::MIN, f64::max);
    assert!(wb_best > raw + 0.25, "WB best of 5 {wb_best} vs raw {raw}");
}

#[test]
fn wiener_butterworth_reaches_rl_50_quality_in_5_iterations() {
    // compact (Gaussian) PSF, the authors' noise
    let psf = psf::generate(&PsfSpec::Gaussian(psf::GaussianPsf::from_fwhm(
        [0.6, 0.25, 0.25],
        [0.1, 0.1, 0.1],
        None,
    )))
    .unwrap();
    let cfg = SynthConfig {
        size: [32, 64, 64],
        ..Default::default()
    };
    let (input, gt) = synth::make_pair(&cfg, &psf, 11).unwrap();
    let raw = metrics::evaluate(&gt, &input, Normalize::Affine, None).unwrap().ssim;
    let rl = ssim_series(
        &input,
        &gt,
        &psf,
        &RlConfig {
            iterations: 50,
            ..Default::default()
        },
    );
    let wb = ssim_series(
        &input,
        &gt,
        &psf,
        &RlConfig {
            iterations: 5,
            back_projector: BackProjector::WB_DEFAULT,
            ..Default::default()
        },
    );
    eprintln!(
        "Gaussian-PSF pair: SSIM raw {raw:.4}; RL at 1/5/10/20/50 {:.4} {:.4} {:.4} {:.4} {:.4}; WB at 1..5 {wb:.4?}",
        rl[0], rl[4], rl[9], rl[19], rl[49]
    );
    assert!(rl[49] > raw + 0.05);
    let first = wb.iter().position(|&s| s >= rl[49]);
    assert!(
        first.is_some(),
        "WB never reached RL-50 SSIM {} in 5 iterations: {wb:?}",
        rl[49]
    );
}

#[test]
fn observer_stops_early_and_bad_geometry_is_rejected() {
    let psf = gaussian_kernel([5, 5, 5], [1.0, 1.0, 1.0]);
    let img = Volume::new([8, 16, 16], vec![1.0; 2048]).unwrap();
    let mut seen = 0;
    rl::richardson_lucy_with(&img, &psf, &RlConfig::default(), |i, _| {
        seen = i;
        if i == 3 {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    })
    .unwrap();
    assert_eq!(seen, 3);
    let big = gaussian_kernel([9, 5, 5], [1.0, 1.0, 1.0]);
    let e = rl::richardson_lucy(&img, &big, &RlConfig::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("larger than the image"), "{e}");
}

/// The OTF route (`rl --otf`, `--radial-otf`) with free and mirror edges grows the domain
/// as the PSF path does: on the OTF made from a PSF it equals the PSF path with the same
/// edges up to the OTF's ring binning and interpolation (measured against how far the
/// two routes are apart with periodic edges, and how far free or mirror edges are from
/// periodic ones), and keeps the input's shape.
#[test]
fn otf_route_with_free_and_mirror_edges_matches_the_psf_path() {
    use rln_engine::imaging::radial_otf::{RadialOtf, RadialOtfOptions};
    use rln_engine::imaging::rl::Boundary;
    let voxel = [0.2, 0.1, 0.1];
    let psf = gaussian_kernel([31, 41, 41], [1.2, 1.3, 1.3]);
    let opts = RadialOtfOptions {
        background: Some(0.0),
        fix_origin: 0,
        ..Default::default()
    };
    let otf = RadialOtf::from_bead(&psf, voxel, &opts).unwrap();
    // bright spots everywhere, the edges included (where the edge handling shows)
    let dims = [32, 48, 56];
    let mut obj = Volume::zeros(dims);
    let mut s: u64 = 0x2545_F491_4F6C_DD1D;
    for _ in 0..60 {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        let i = (s % obj.len() as u64) as usize;
        obj.data[i] += 500.0;
    }
    let plan = RlPlan::new(dims, &psf, BackProjector::Matched).unwrap();
    let mut img = plan.convolve_same(&obj).unwrap();
    img.data.iter_mut().for_each(|v| *v += 5.0);
    let cfg = |boundary| RlConfig {
        iterations: 15,
        background: 5.0,
        boundary,
        ..Default::default()
    };
    let by_psf = |b| rl::richardson_lucy(&img, &psf, &cfg(b)).unwrap();
    let by_otf = |b| rl::richardson_lucy_otf(&img, &otf, voxel, &cfg(b)).unwrap().0;
    let rel = |a: &Volume, b: &Volume| imaging_common::rel_l2(&a.data, &b.data);
    let psf_periodic = by_psf(Boundary::Periodic);
    let routes_periodic = rel(&by_otf(Boundary::Periodic), &psf_periodic);
    for b in [Boundary::Free, Boundary::Mirror] {
        let (p, o) = (by_psf(b), by_otf(b));
        assert_eq!(o.dims, img.dims, "{b:?}: the output has the input's shape");
        assert!(o.data.iter().all(|v| v.is_finite()));
        let routes = rel(&o, &p);
        let edges = rel(&p, &psf_periodic);
        eprintln!("{b:?}: OTF vs PSF route {routes:.2e} (periodic edges: {routes_periodic:.2e}); {b:?} vs periodic edges {edges:.2e}");
        assert!(routes < 2.0 * routes_periodic.max(1e-3), "{b:?}: {routes:e}");
        assert!(routes < 0.15 * edges, "{b:?}: {routes:e} vs edges {edges:e}");
    }
    // an unmatched back projector is still refused on this route
    let wb = RlConfig {
        back_projector: BackProjector::WB_DEFAULT,
        ..cfg(Boundary::Free)
    };
    assert!(rl::richardson_lucy_otf(&img, &otf, voxel, &wb).is_err());
}

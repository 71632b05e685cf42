//! PSF models against closed forms and against psfmodels' scalar Gibson–Lanni model.

mod imaging_common;
use imaging_common::*;
use rln_engine::imaging::psf::{self, GaussianPsf, GibsonLanni, PsfSpec};

fn gl_from_json(v: &serde_json::Value) -> GibsonLanni {
    serde_json::from_value(v.clone()).unwrap()
}

#[test]
fn gibson_lanni_matches_psfmodels_scalar() {
    let sets: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(data_dir().join("psf_sets.json")).unwrap()).unwrap();
    let mut worst: f64 = 0.0;
    for (name, params) in sets.as_object().unwrap() {
        let spec = PsfSpec::GibsonLanni(gl_from_json(params));
        let ours = psf::generate(&spec).unwrap();
        let want = npy_volume(&data_dir().join(format!("psf_{name}.npy")));
        assert_eq!(ours.dims, want.dims, "{name}");
        let e = rel_l2(&ours.data, &want.data);
        eprintln!("psfmodels scalar vs engine, {name}: relative L2 {e:.2e}");
        assert!(e <= 0.02, "{name}: relative L2 {e}");
        worst = worst.max(e);
        assert!((ours.sum() - 1.0).abs() < 1e-5);
    }
    eprintln!("worst {worst:.2e}");
}

#[test]
fn in_focus_matched_gibson_lanni_is_the_airy_pattern() {
    // matched indices, source on the coverslip, point samples: |∫J0(k NA r ρ) ρ dρ|² = Airy
    let p = GibsonLanni {
        ns: 1.515,
        nx: 41,
        nz: 1,
        dxy: 0.02,
        wavelength: 0.5,
        oversample: 1,
        ..Default::default()
    };
    let v = psf::generate(&PsfSpec::GibsonLanni(p.clone())).unwrap();
    let k = 2.0 * std::f64::consts::PI / p.wavelength;
    let c = 20.0;
    let airy: Vec<f32> = (0..41 * 41)
        .map(|i| {
            let (y, x) = ((i / 41) as f64 - c, (i % 41) as f64 - c);
            let vv = k * p.na * (x * x + y * y).sqrt() * p.dxy;
            (if vv == 0.0 {
                1.0
            } else {
                (2.0 * libm::j1(vv) / vv).powi(2)
            }) as f32
        })
        .collect();
    let s: f64 = airy.iter().map(|&a| a as f64).sum();
    let airy: Vec<f32> = airy.iter().map(|&a| (a as f64 / s) as f32).collect();
    let e = rel_l2(&v.data, &airy);
    eprintln!("in-focus lateral profile vs Airy: relative L2 {e:.2e}");
    assert!(e < 2e-3, "relative L2 to Airy {e}");
}

#[test]
fn gaussian_psf_has_the_requested_fwhm() {
    let fwhm = [0.6, 0.25, 0.2];
    let vs = [0.1, 0.05, 0.04];
    let v = psf::generate(&PsfSpec::Gaussian(GaussianPsf::from_fwhm(fwhm, vs, None))).unwrap();
    assert!((v.sum() - 1.0).abs() < 1e-5);
    assert_eq!(v.voxel_size, Some(vs));
    let sig = psf::moment_sigma(&v);
    let half = psf::fwhm_voxels(&v);
    for a in 0..3 {
        let from_moments = sig[a] * psf::FWHM_PER_SIGMA * vs[a];
        assert!(
            (from_moments / fwhm[a] - 1.0).abs() < 5e-3,
            "axis {a}: {from_moments} vs {}",
            fwhm[a]
        );
        let from_half_max = half[a] * vs[a];
        assert!(
            (from_half_max / fwhm[a] - 1.0).abs() < 0.03,
            "axis {a}: {from_half_max} vs {}",
            fwhm[a]
        );
    }
    // Zhang et al. paraxial widths below NA 0.7
    let g = GaussianPsf::from_optics(0.5, 0.5, 1.0, [0.2, 0.05, 0.05], None).unwrap();
    let k = 2.0 * std::f64::consts::PI / 0.5;
    assert!((g.fwhm[1] - 2f64.sqrt() / (k * 0.5) * psf::FWHM_PER_SIGMA).abs() < 1e-12);
    assert!((g.fwhm[0] - 2.0 * 6f64.sqrt() / (k * 0.25) * psf::FWHM_PER_SIGMA).abs() < 1e-12);
}

#[test]
fn spec_in_metadata_regenerates_the_identical_psf() {
    let spec = PsfSpec::GibsonLanni(GibsonLanni {
        nx: 25,
        nz: 21,
        pz: 3.0,
        ns: 1.33,
        dz: 0.1,
        ..Default::default()
    });
    let a = psf::generate(&spec).unwrap();
    let back = PsfSpec::from_metadata(a.metadata.as_deref().unwrap()).unwrap();
    assert_eq!(back, spec);
    let b = psf::generate(&back).unwrap();
    assert_eq!(a.data, b.data, "regeneration must be bit-identical");
    assert_eq!(a.voxel_size, Some([0.1, 0.05, 0.05]));
}

#[test]
fn confocal_is_narrower_than_widefield_and_pinhole_widens_it() {
    let optics = GibsonLanni {
        nx: 33,
        nz: 25,
        dxy: 0.04,
        dz: 0.1,
        ns: 1.515,
        wavelength: 0.52,
        ..Default::default()
    };
    let wf = psf::generate(&PsfSpec::GibsonLanni(optics.clone())).unwrap();
    let conf = |au: f64| {
        psf::generate(&PsfSpec::Confocal(psf::ConfocalPsf {
            optics: optics.clone(),
            ex_wavelength: 0.488,
            pinhole_au: au,
        }))
        .unwrap()
    };
    let (c0, c1) = (conf(0.0), conf(1.0));
    let (fw, f0, f1) = (psf::fwhm_voxels(&wf), psf::fwhm_voxels(&c0), psf::fwhm_voxels(&c1));
    assert!((c0.sum() - 1.0).abs() < 1e-5 && (c1.sum() - 1.0).abs() < 1e-5);
    // point-pinhole confocal ≈ widefield / √2 laterally (λ_ex ≈ λ_em)
    let ratio = f0[2] / fw[2];
    assert!(
        ratio > 0.66 && ratio < 0.78,
        "lateral FWHM ratio confocal/widefield {ratio}"
    );
    assert!(f0[0] < fw[0] * 0.85, "axial {f0:?} vs {fw:?}");
    assert!(
        f1[2] > f0[2] && f1[2] < fw[2],
        "1 AU pinhole between: {:?} {:?} {:?}",
        f0,
        f1,
        fw
    );
}

#[test]
fn measured_bead_is_centered_cropped_and_normalized() {
    use rln_engine::imaging::Volume;
    let dims = [21, 40, 40];
    let cen = [10.3, 18.6, 22.2];
    let mut data = Vec::new();
    for z in 0..dims[0] {
        for y in 0..dims[1] {
            for x in 0..dims[2] {
                let d = [
                    (z as f64 - cen[0]) / 2.0,
                    (y as f64 - cen[1]) / 1.3,
                    (x as f64 - cen[2]) / 1.3,
                ];
                let g = (-0.5 * (d[0] * d[0] + d[1] * d[1] + d[2] * d[2])).exp();
                data.push((100.0 + 1000.0 * g) as f32);
            }
        }
    }
    let bead = Volume::new(dims, data).unwrap().with_voxel_size([0.2, 0.1, 0.1]);
    let opts = psf::MeasuredOptions {
        crop: Some([15, 21, 21]),
        ..Default::default()
    };
    let (p, _) = psf::clean_measured(&bead, &opts).unwrap();
    assert_eq!(p.dims, [15, 21, 21]);
    assert!((p.sum() - 1.0).abs() < 1e-5);
    assert_eq!(p.voxel_size, Some([0.2, 0.1, 0.1]));
    let meta: serde_json::Value = serde_json::from_str(p.metadata.as_deref().unwrap()).unwrap();
    assert!((meta["background"].as_f64().unwrap() - 100.0).abs() < 0.5, "{meta}");
    // centroid of the result at the center voxel
    let s = p.sum();
    let mut c = [0.0; 3];
    for z in 0..15 {
        for y in 0..21 {
            for x in 0..21 {
                let w = p.at(z, y, x) as f64 / s;
                c[0] += w * z as f64;
                c[1] += w * y as f64;
                c[2] += w * x as f64;
            }
        }
    }
    for (a, want) in [7.0, 10.0, 10.0].iter().enumerate() {
        assert!((c[a] - want).abs() < 0.1, "centroid {c:?}");
    }
    assert!(psf::clean_measured(
        &bead,
        &psf::MeasuredOptions {
            crop: Some([14, 21, 21]),
            ..Default::default()
        }
    )
    .is_err());
}

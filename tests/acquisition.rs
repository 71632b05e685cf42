//! `train --like`'s estimates of a raw volume's acquisition, on synthetic raw volumes made
//! with known camera offset, gain, read noise and photon level: each estimate the estimator
//! reports as identified (95% interval within 15%) is within 15% of the truth, the others'
//! 95% intervals hold the truth.

use rln_engine::imaging::acquisition;
use rln_engine::imaging::psf::{self, GaussianPsf, PsfSpec};
use rln_engine::imaging::synth::{self, SynthConfig};

/// A camera: offset ADU, gain ADU/photon, read noise photons, photons per unit of ground
/// truth (the synthetic background is 30 units).
#[derive(Clone, Copy)]
struct Camera {
    offset: f64,
    gain: f64,
    read_noise: f64,
    photons: f64,
}

const BRIGHT: Camera = Camera {
    offset: 100.0,
    gain: 2.0,
    read_noise: 1.6,
    photons: 5.0,
};
const DIM: Camera = Camera {
    offset: 400.0,
    gain: 0.5,
    read_noise: 3.0,
    photons: 1.0,
};
const MID: Camera = Camera {
    offset: 200.0,
    gain: 1.0,
    read_noise: 2.0,
    photons: 2.0,
};

/// A synthetic raw volume of `cam` (48×192×192, Gaussian PSF, the default phantoms) and
/// its background in photons.
fn raw_volume(cam: Camera, seed: u64) -> (rln_engine::imaging::Volume, f64) {
    let psf = psf::generate(&PsfSpec::Gaussian(GaussianPsf::from_fwhm(
        [0.8, 0.3, 0.3],
        [0.2, 0.1, 0.1],
        None,
    )))
    .unwrap();
    let cfg = SynthConfig {
        size: [48, 192, 192],
        photons: cam.photons,
        read_noise: cam.read_noise,
        ..Default::default()
    };
    let (mut raw, _) = synth::make_pair(&cfg, &psf, seed).unwrap();
    raw.data
        .iter_mut()
        .for_each(|v| *v = (cam.offset + cam.gain * *v as f64) as f32);
    (raw, cam.photons * cfg.background as f64)
}

/// Checks every estimate against the truth; `expect_identified`: (offset, read noise)
/// must be reported as identified (gain and background photons always must).
fn check(cam: Camera, expect_identified: (bool, bool)) {
    let (raw, bg_photons) = raw_volume(cam, 7);
    let e = acquisition::estimate(&raw).unwrap();
    eprintln!(
        "truth: offset {}, gain {}, read noise {}, background {bg_photons} photons\nestimate: {}",
        cam.offset,
        cam.gain,
        cam.read_noise,
        e.summary()
    );
    // within 15% where the estimator says it is identified, else the 95% interval holds the truth
    let check_one = |what: &str, est: f64, se: f64, truth: f64, identified: bool| {
        let [lo, hi] = e.interval(est, se);
        if identified {
            assert!(
                (est - truth).abs() <= 0.15 * truth,
                "{what}: estimate {est} vs truth {truth} (issue 20: within 15%)"
            );
        } else {
            assert!(
                (lo..=hi).contains(&truth),
                "{what}: truth {truth} outside the 95% interval {lo}..{hi}"
            );
        }
    };
    let gain_id = e.identified(e.gain, e.gain_se);
    let offset_id = e.identified(e.offset, e.offset_se);
    let bg_id = e.identified(e.background_photons, e.background_photons_se);
    assert!(
        gain_id && bg_id,
        "gain and background photons must be identified: {e:?}"
    );
    assert_eq!(offset_id, expect_identified.0, "offset identified? {e:?}");
    assert_eq!(
        e.read_noise_identified(),
        expect_identified.1,
        "read noise identified? {e:?}"
    );
    check_one("gain", e.gain, e.gain_se, cam.gain, gain_id);
    check_one("offset", e.offset, e.offset_se, cam.offset, offset_id);
    check_one(
        "background photons",
        e.background_photons,
        e.background_photons_se,
        bg_photons,
        bg_id,
    );
    // read noise: σ_r within 15% when identified, else σ_r² = truth² inside σ_r²'s interval
    if e.read_noise_identified() {
        check_one("read noise", e.read_noise, 0.0, cam.read_noise, true);
    } else {
        check_one(
            "read noise²",
            e.read_noise_var,
            e.read_noise_var_se,
            cam.read_noise.powi(2),
            false,
        );
    }
    let bg_adu = cam.offset + cam.gain * bg_photons;
    assert!(
        (e.background - bg_adu).abs() <= 0.05 * bg_adu,
        "background {} vs {bg_adu} ADU",
        e.background
    );
}

/// Shot noise 150 photons at the background hides a read noise of 1.6 (σ_r² = 2.6 photons²)
/// and leaves the offset to κ₃ (±15 ADU at 95%).
#[test]
fn estimates_a_bright_scmos_like_volume() {
    check(BRIGHT, (false, false));
}

#[test]
fn estimates_a_dim_high_offset_volume() {
    check(DIM, (true, true));
}

#[test]
fn estimates_a_mid_volume() {
    check(MID, (true, false));
}

#[test]
fn refuses_a_volume_without_photon_noise() {
    let v = rln_engine::imaging::Volume::new([4, 16, 16], vec![7.0; 1024]).unwrap();
    assert!(acquisition::estimate(&v).is_err());
}

/// The spread of the estimates over independent noise and phantoms (10 seeds per camera)
/// against the reported standard errors: `cargo test --release --test acquisition -- --ignored`.
#[test]
#[ignore = "10 volumes per camera: a measurement (about 10 s in release)"]
fn spread_over_seeds_matches_the_reported_uncertainty() {
    for (name, cam) in [("bright", BRIGHT), ("dim", DIM), ("mid", MID)] {
        let mut rows = Vec::new();
        for seed in 0..10u64 {
            let (raw, bg) = raw_volume(cam, 1000 + seed);
            let e = acquisition::estimate(&raw).unwrap();
            rows.push([
                e.offset,
                e.offset_se,
                e.gain,
                e.gain_se,
                e.read_noise_var,
                e.read_noise_var_se,
                e.background_photons,
                e.background_photons_se,
                bg,
            ]);
        }
        let stat = |i: usize| {
            let n = rows.len() as f64;
            let mean = rows.iter().map(|r| r[i]).sum::<f64>() / n;
            let sd = (rows.iter().map(|r| (r[i] - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt();
            let se = rows.iter().map(|r| r[i + 1]).sum::<f64>() / n;
            (mean, sd, se)
        };
        let truths = [cam.offset, cam.gain, cam.read_noise.powi(2), rows[0][8]];
        for (k, what) in ["offset", "gain", "read noise²", "background photons"]
            .iter()
            .enumerate()
        {
            let (mean, sd, se) = stat(2 * k);
            eprintln!(
                "{name}: {what}: truth {:.4}, mean {mean:.4}, sd over seeds {sd:.4} ({:.1}% of truth), mean reported se {se:.4}",
                truths[k],
                100.0 * sd / truths[k]
            );
            // the jackknife's standard error is the spread over seeds within a factor 2.5 (the
            // spread of 10 seeds is itself uncertain by ~25%)
            assert!(se > 0.4 * sd && se < 2.5 * sd, "{name} {what}: se {se} vs sd {sd}");
        }
    }
}

/// A widefield raw volume (Gibson–Lanni, NA 1.4, 100/200 nm voxels, as the shipped model's
/// PSF) of `photons` per unit and `density`, on a camera of offset 100 ADU, gain 1.5.
fn widefield_raw(photons: f64, density: f64, seed: u64) -> (rln_engine::imaging::Volume, rln_engine::imaging::Volume) {
    let psf = psf::generate(&PsfSpec::GibsonLanni(psf::GibsonLanni {
        wavelength: 0.52,
        dxy: 0.1,
        dz: 0.2,
        nx: 65,
        nz: 33,
        oversample: 1,
        ..Default::default()
    }))
    .unwrap();
    let cfg = SynthConfig {
        size: [48, 160, 160],
        photons,
        read_noise: 1.0,
        density,
        ..Default::default()
    };
    let (mut raw, _) = synth::make_pair(&cfg, &psf, seed).unwrap();
    raw.data.iter_mut().for_each(|v| *v = 100.0 + 1.5 * *v);
    (raw, psf)
}

/// `train --like`'s match: the photons per unit of ground truth of the synthetic pairs,
/// recovered within 15% from widefield raw volumes whose out-of-focus haze lifts the
/// background well above the scene's 30 units (dividing the background photons by 30, as
/// before, is 56% off at density 1: asserted, so the test keeps testing the haze). The
/// density is printed, not asserted: under this much haze the bright fraction barely grows
/// with it (measured at 48×160×160: truth 1 → 1.08, truth 0.4 → 0.98, truth 2 → 0.95), and
/// at density 2 overlapping structures lift the bright end, so the photon level came out
/// 47% high there (8 → 11.8): a known limit, not covered here. The scene's constant then
/// makes the pairs' floor the raw's (with the authors' 30 it would be 58% high at 0.4).
#[test]
fn like_matches_the_photon_level_under_widefield_haze() {
    for (photons, density, seed) in [(2.0, 1.0, 21), (6.0, 0.4, 22)] {
        let (raw, psf) = widefield_raw(photons, density, seed);
        let e = acquisition::estimate(&raw).unwrap();
        let m = acquisition::match_synthetic(&e, raw.dims, &psf, &SynthConfig::default()).unwrap();
        let naive = e.background_photons / 30.0;
        eprintln!(
            "truth photons {photons}, density {density}: matched {:.3} photons, density {:.3}, scene background {:.2} \
             (floor {:.1} units at density 1); background photons / 30 = {naive:.3}",
            m.photons, m.density, m.background, m.background_units
        );
        assert!(
            (m.photons / photons - 1.0).abs() <= 0.15,
            "photons {} vs {photons}",
            m.photons
        );
        if density == 1.0 {
            assert!(
                (naive / photons - 1.0).abs() > 0.15,
                "the haze must matter in this test: {naive} vs {photons}"
            );
        }
        assert!(
            m.background_units > 40.0,
            "widefield haze at density 1: {}",
            m.background_units
        );
        assert_eq!(m.read_noise, e.read_noise);
        // what the match is for: pairs made with it (other phantoms) look like the raw at the
        // floor and at the bright end, in photons, within 20% (a new draw's haze and bright end
        // differ from the raw's by ~10–15% at this size; the authors' constant 30 at the
        // matched photons and density would put the floor 24% high, no constant 50% low)
        let matched = SynthConfig {
            size: raw.dims,
            photons: m.photons,
            read_noise: m.read_noise,
            density: m.density,
            background: m.background as f32,
            ..Default::default()
        };
        // (the pair is in photons: its levels are read in ADU; the raw's through its estimated
        // camera, as the match sees them: the estimate's own errors are the tests above's)
        let pair = acquisition::estimate(&synth::make_pair(&matched, &psf, seed + 100).unwrap().0).unwrap();
        let (raw_floor, raw_bright) = (e.background_photons, e.bright_photons());
        eprintln!(
            "  a matched pair: floor {:.1} photons (raw {raw_floor:.1}), bright end {:.1} (raw {raw_bright:.1})",
            pair.background, pair.bright
        );
        assert!(
            (pair.background / raw_floor - 1.0).abs() <= 0.2,
            "floor {} vs {raw_floor}",
            pair.background
        );
        assert!(
            (pair.bright / raw_bright - 1.0).abs() <= 0.2,
            "bright {} vs {raw_bright}",
            pair.bright
        );
    }
}

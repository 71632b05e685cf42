//! `train --like`'s estimates of a raw volume's acquisition, on synthetic raw volumes made
//! with known camera offset, gain, read noise and photon level.

use rln_engine::imaging::acquisition;
use rln_engine::imaging::psf::{self, GaussianPsf, PsfSpec};
use rln_engine::imaging::synth::{self, SynthConfig};

/// (offset ADU, gain ADU/photon, read noise photons, photons per unit)
fn check(offset: f64, gain: f64, read_noise: f64, photons: f64) {
    let psf = psf::generate(&PsfSpec::Gaussian(GaussianPsf::from_fwhm(
        [0.8, 0.3, 0.3],
        [0.2, 0.1, 0.1],
        None,
    )))
    .unwrap();
    let cfg = SynthConfig {
        size: [48, 192, 192],
        photons,
        read_noise,
        ..Default::default()
    };
    let (mut raw, _) = synth::make_pair(&cfg, &psf, 7).unwrap();
    raw.data.iter_mut().for_each(|v| *v = (offset + gain * *v as f64) as f32);
    let e = acquisition::estimate(&raw).unwrap();
    let bg_photons = photons * cfg.background as f64;
    eprintln!(
        "truth: offset {offset}, gain {gain}, read noise {read_noise}, background {bg_photons} photons; \
         estimate: offset {:.2}, gain {:.4}, read noise {:.3}, background {:.2} ADU = {:.2} photons, bright {:.2}%",
        e.offset,
        e.gain,
        e.read_noise,
        e.background,
        e.background_photons,
        100.0 * e.signal_fraction
    );
    let within = |est: f64, truth: f64, what: &str| {
        assert!((est - truth).abs() <= 0.15 * truth, "{what}: estimate {est} vs truth {truth}");
    };
    within(e.gain, gain, "gain");
    within(e.offset, offset, "offset");
    within(e.read_noise, read_noise, "read noise");
    within(e.background_photons, bg_photons, "background photons");
    within(e.background, offset + gain * bg_photons, "background ADU");
}

#[test]
fn estimates_a_bright_scmos_like_volume_within_15_percent() {
    check(100.0, 2.0, 1.6, 5.0);
}

#[test]
fn estimates_a_dim_high_offset_volume_within_15_percent() {
    check(400.0, 0.5, 3.0, 1.0);
}

#[test]
fn refuses_a_volume_without_photon_noise() {
    let v = rln_engine::imaging::Volume::new([4, 16, 16], vec![7.0; 1024]).unwrap();
    assert!(acquisition::estimate(&v).is_err());
}

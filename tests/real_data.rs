//! Real data: pycudadecon 0.5.1's lattice light-sheet test volume, its measured PSF and
//! cudaDecon's 10-iteration result (fetched by tools/fetch-pycudadecon-data.sh into
//! target/real-data; $RLN_REAL_DATA points elsewhere). Without the data every test prints
//! SKIPPED and returns, unless RLN_REQUIRE_REAL_DATA is set (CI), where absence fails.

mod imaging_common;
use imaging_common::rel_l2;
use rln_engine::imaging::psf::{self, CentreRule, MeasuredOptions};
use rln_engine::imaging::radial_otf::{RadialOtf, RadialOtfOptions};
use rln_engine::imaging::rl::{self, BackgroundMode, Boundary, RlConfig};
use rln_engine::imaging::{read_volume, write_volume, OutputDtype, Volume};
use std::path::{Path, PathBuf};

fn data_dir(test: &str) -> Option<PathBuf> {
    let dir = std::env::var_os("RLN_REAL_DATA").map(PathBuf::from).unwrap_or_else(|| {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("target/real-data/pycudadecon-0.5.1/tests/test_data")
    });
    if ["im_deskewed.tif", "im_decon.tif", "psf.tif"]
        .iter()
        .all(|f| dir.join(f).is_file())
    {
        return Some(dir);
    }
    let msg = format!(
        "{test}: SKIPPED: pycudadecon's test data are not in {} (run tools/fetch-pycudadecon-data.sh)",
        dir.display()
    );
    if std::env::var_os("RLN_REQUIRE_REAL_DATA").is_some() {
        panic!("{msg}; RLN_REQUIRE_REAL_DATA is set");
    }
    eprintln!("{msg}");
    None
}

/// The data's voxel size (pycudadecon's tests: dz 0.3, dx 0.1 µm) and the PSF's (0.1 µm).
const DATA_VOXEL: [f64; 3] = [0.3, 0.1, 0.1];
const PSF_VOXEL: [f64; 3] = [0.1, 0.1, 0.1];
/// cudaDecon keeps the first 84 planes and 480 columns (its FFT sizes) of the 88×320×481 input.
const KEPT: [usize; 3] = [84, 320, 480];

/// The LLS PSF cleaned for the data: default noise floor (3 σ) for the cleaning facts;
/// for deconvolution as cudaDecon does it, radially averaged with a 2 σ floor (keeps more
/// of the faint side lobes; 1.25 σ lets noise in and RL diverges from cudaDecon: 0.54).
fn cleaned_psf(
    dir: &Path,
    centre: CentreRule,
    radial: bool,
    sigmas: f64,
    z_centre_offset: f64,
) -> (Volume, psf::MeasuredReport) {
    let bead = read_volume(dir.join("psf.tif")).unwrap();
    psf::clean_measured(
        &bead,
        &MeasuredOptions {
            voxel_size: Some(PSF_VOXEL),
            target_voxel_size: Some(DATA_VOXEL),
            centre,
            radial,
            noise_floor_sigmas: sigmas,
            z_centre_offset,
            ..Default::default()
        },
    )
    .unwrap()
}

fn decon_psf(dir: &Path) -> Volume {
    cleaned_psf(dir, CentreRule::Peak, true, 2.0, 0.0).0
}

fn cudadecon_config(iterations: usize, accelerate: bool) -> RlConfig {
    RlConfig {
        iterations,
        background: 98.0,
        boundary: Boundary::Periodic,
        background_mode: BackgroundMode::Subtract,
        apodize: 15,
        accelerate,
        ..Default::default()
    }
}

#[test]
fn measured_lls_psf_loses_its_noise_floor_and_ghost_plane() {
    let Some(dir) = data_dir("measured_lls_psf_loses_its_noise_floor_and_ghost_plane") else {
        return;
    };
    let (p, r) = cleaned_psf(&dir, CentreRule::Peak, false, 3.0, 0.0);
    let f = psf::fwhm_voxels(&p);
    eprintln!(
        "LLS PSF: {} at {:?} µm, FWHM z,y,x {:.3} {:.3} {:.3} µm; σ {:.2}, support {} voxels, mass outside support {:.1}%, \
         beyond 20 px {:.1}% → {:.1}%, edge plane {:.2}% → {:.2}%, plane backgrounds {:?}…",
        p.shape_str(),
        p.voxel_size.unwrap(),
        f[0] * 0.3,
        f[1] * 0.1,
        f[2] * 0.1,
        r.noise_sigma,
        r.support_voxels,
        100.0 * r.mass_outside_support,
        100.0 * r.mass_beyond_20px_before,
        100.0 * r.mass_beyond_20px_after,
        100.0 * r.edge_plane_mass_before,
        100.0 * r.edge_plane_mass_after,
        &r.plane_background[..3]
    );
    assert_eq!(p.voxel_size, Some(DATA_VOXEL));
    assert!((p.sum() - 1.0).abs() < 1e-4);
    // the noise floor held most of the positive mass, far from the bead (issue 20: 68%)
    assert!(r.mass_beyond_20px_before > 0.5, "{}", r.mass_beyond_20px_before);
    // cudaDecon's effective PSF has 7% beyond 20 px; the cleaned one must not have more
    assert!(r.mass_beyond_20px_after < 0.07, "{}", r.mass_beyond_20px_after);
    // the first plane's higher background (151 vs 143) is gone with per-plane backgrounds
    assert!(
        r.plane_background[0] > r.plane_background[30] + 5.0,
        "{:?}",
        &r.plane_background[..3]
    );
    assert!(r.edge_plane_mass_after < 0.001, "{}", r.edge_plane_mass_after);
    // an LLS PSF at 0.1 µm pixels: ~0.3 µm laterally, ~0.7 µm axially (FWHM)
    assert!((0.25..0.4).contains(&(f[2] * 0.1)), "{f:?}");
    assert!((0.5..1.0).contains(&(f[0] * 0.3)), "{f:?}");
    // the raw file's voxel size is not the data's: rl must refuse the unresampled PSF
    let bead = read_volume(dir.join("psf.tif")).unwrap().with_voxel_size(PSF_VOXEL);
    let data = Volume::zeros([4, 4, 4]).with_voxel_size(DATA_VOXEL);
    assert!(psf::check_voxel_sizes_match(&bead, &data).is_err());
    assert_eq!(psf::check_voxel_sizes_match(&p, &data).unwrap(), None);
}

fn kept_input(dir: &Path) -> Volume {
    read_volume(dir.join("im_deskewed.tif"))
        .unwrap()
        .crop([0, 0, 0], KEPT)
        .unwrap()
}

#[test]
fn accelerated_rl_reproduces_cudadecon() {
    let Some(dir) = data_dir("accelerated_rl_reproduces_cudadecon") else {
        return;
    };
    let reference = read_volume(dir.join("im_decon.tif")).unwrap();
    assert_eq!(reference.dims, KEPT);
    let input = kept_input(&dir);
    let p = decon_psf(&dir);
    let (acc, stats) = rl::richardson_lucy_traced(&input, &p, &cudadecon_config(10, true)).unwrap();
    let e_acc = rel_l2(&acc.data, &reference.data);
    let raw: Vec<f32> = input.data.iter().map(|v| (v - 98.0).max(0.0)).collect();
    let e_raw = rel_l2(&raw, &reference.data);
    eprintln!(
        "vs cudaDecon's im_decon.tif: background-subtracted input {e_raw:.4}, accelerated RL 10 it. {e_acc:.4}; \
         λ per iteration {:?}",
        stats
            .iter()
            .map(|s| (s.lambda * 1000.0).round() / 1000.0)
            .collect::<Vec<_>>()
    );
    assert!(
        stats[0].lambda == 0.0 && stats[1].lambda == 0.0 && stats[5].lambda > 0.3,
        "{stats:?}"
    );
    assert!(
        e_acc < ACCELERATED_TOLERANCE,
        "accelerated RL vs cudaDecon: rel L2 {e_acc}"
    );
}

fn otf_rel_diff(a: &RadialOtf, b: &RadialOtf) -> f64 {
    assert_eq!((a.nkr, a.nkz), (b.nkr, b.nkz));
    let num: f64 = a
        .values
        .iter()
        .zip(&b.values)
        .map(|(x, y)| (x - y).norm_sqr() as f64)
        .sum();
    let den: f64 = b.values.iter().map(|y| y.norm_sqr() as f64).sum();
    (num / den).sqrt()
}

fn bead_otf(dir: &Path, z_centre_offset: f64) -> RadialOtf {
    let bead = read_volume(dir.join("psf.tif")).unwrap();
    RadialOtf::from_bead(
        &bead,
        PSF_VOXEL,
        &RadialOtfOptions {
            z_centre_offset,
            ..Default::default()
        },
    )
    .unwrap()
}

/// The radially averaged OTF made from the raw bead is cudaDecon's: pycudadecon's otf.tif
/// (made by its radialft from the same psf.tif) is reproduced to 1e-3 once the fitted z
/// centre is moved by radialft's +0.6 planes; without that move only the kz phase differs
/// (the magnitudes agree; measured 0.124 relative).
#[test]
fn radial_otf_reproduces_cudadecons_otf_file() {
    let Some(dir) = data_dir("radial_otf_reproduces_cudadecons_otf_file") else {
        return;
    };
    let theirs = RadialOtf::read_cudadecon(&dir.join("otf.tif"), PSF_VOXEL[0], PSF_VOXEL[2]).unwrap();
    assert_eq!((theirs.nkr, theirs.nkz), (65, 61));
    let ours = bead_otf(&dir, 0.6);
    let shifted = otf_rel_diff(&ours, &theirs);
    let centred = bead_otf(&dir, 0.0);
    let unshifted = otf_rel_diff(&centred, &theirs);
    let mag: f64 = {
        let num: f64 = centred
            .values
            .iter()
            .zip(&theirs.values)
            .map(|(x, y)| ((x.norm() - y.norm()) as f64).powi(2))
            .sum();
        let den: f64 = theirs.values.iter().map(|y| y.norm_sqr() as f64).sum();
        (num / den).sqrt()
    };
    eprintln!(
        "radial OTF vs otf.tif: {shifted:.2e} (z centre +0.6), {unshifted:.3} (fitted centre; magnitudes {mag:.2e})"
    );
    assert!(shifted < 1e-3, "{shifted}");
    assert!(mag < 1e-3, "{mag}");
    assert!(unshifted > 0.05, "{unshifted}");
    // the file round-trips through cudaDecon's layout
    let tmp = tempfile::tempdir().unwrap();
    let f = tmp.path().join("otf.tif");
    ours.write_cudadecon(&f).unwrap();
    let back = RadialOtf::read_cudadecon(&f, PSF_VOXEL[0], PSF_VOXEL[2]).unwrap();
    assert_eq!(back.values, ours.values);
    assert!((back.dkr - ours.dkr).abs() < 1e-12 && (back.dkz - ours.dkz).abs() < 1e-12);
}

/// cudaDecon's route end to end: the raw bead's radial OTF, interpolated onto the data's
/// frequency grid (bead at 0.1 µm steps, data at 0.3 µm), accelerated RL with cudaDecon's
/// options reproduces im_decon.tif to ≤ 0.10 (issue 20); so does its own otf.tif.
#[test]
fn radial_otf_rl_reproduces_cudadecon() {
    let Some(dir) = data_dir("radial_otf_rl_reproduces_cudadecon") else {
        return;
    };
    let reference = read_volume(dir.join("im_decon.tif")).unwrap();
    let input = kept_input(&dir);
    let cfg = cudadecon_config(10, true);
    let run = |otf: &RadialOtf| rl::richardson_lucy_otf(&input, otf, DATA_VOXEL, &cfg).unwrap().0;
    let theirs = RadialOtf::read_cudadecon(&dir.join("otf.tif"), PSF_VOXEL[0], PSF_VOXEL[2]).unwrap();
    let e_file = rel_l2(&run(&theirs).data, &reference.data);
    let e_bead = rel_l2(&run(&bead_otf(&dir, 0.6)).data, &reference.data);
    let e_centred = rel_l2(&run(&bead_otf(&dir, 0.0)).data, &reference.data);
    eprintln!(
        "accelerated RL, 10 it., vs im_decon.tif: their otf.tif {e_file:.4}; our OTF of psf.tif {e_bead:.4} \
         (z centre +0.6 as radialft), {e_centred:.4} (fitted centre)"
    );
    assert!(e_file < 0.02, "{e_file}");
    assert!(e_bead < 0.02, "{e_bead}");
    // the bound holds with the raw bead and radialft's centring
    assert!(e_bead <= 0.10);
    // the 0.06 µm centre move alone accounts for ~0.11 of difference
    assert!(e_centred > 0.05 && e_centred < 0.2, "{e_centred}");
    // other back projectors and edges are refused on this route
    let wb = RlConfig {
        back_projector: rl::BackProjector::WienerButterworth {
            alpha: 0.1,
            beta: 0.3,
            order: 10.0,
        },
        ..cfg.clone()
    };
    assert!(rl::richardson_lucy_otf(&input, &theirs, DATA_VOXEL, &wb).is_err());
}

/// The PSF route to cudaDecon's result (`psf --measured --via-radial-otf --otf-z-offset 0.6`):
/// the raw bead's radial OTF with radialft's +0.6-plane z centre, interpolated onto a grid
/// in the data's voxels the size of the bead's field (21×129×129), transformed back, its
/// negative ripples set to 0; accelerated RL with it as an ordinary PSF meets issue 20's
/// 0.10 (0.071 measured). The ripples are the bead's noise, averaged over rings but not
/// removed; they are as often positive as negative, so clipping leaves a positive haze
/// whose mass grows with the grid: on a smaller grid less is clipped and the result is
/// closer (21×65×65: 0.038), on the data's whole grid more (0.093, where the unclipped PSF
/// would be the OTF route itself, 0.0057). Without the +0.6 planes: 0.126.
#[test]
fn psf_via_radial_otf_reproduces_cudadecon() {
    let Some(dir) = data_dir("psf_via_radial_otf_reproduces_cudadecon") else {
        return;
    };
    let reference = read_volume(dir.join("im_decon.tif")).unwrap();
    let input = kept_input(&dir);
    let cfg = cudadecon_config(10, true);
    let (otf_radialft, otf_fitted) = (bead_otf(&dir, 0.6), bead_otf(&dir, 0.0));
    // offset: the z centre `otf` was made with, for the message
    let run = |otf: &RadialOtf, offset: f64, dims: Option<[usize; 3]>| {
        let (p, r) = otf.to_psf(DATA_VOXEL, dims).unwrap();
        let out = rl::richardson_lucy_traced(&input, &p, &cfg).unwrap().0;
        let e = rel_l2(&out.data, &reference.data);
        eprintln!(
            "PSF via the radial OTF, z centre {offset:+}, {}: negative mass clipped {:.1}% (lowest {:.2}% of the peak) \
             → accelerated RL vs im_decon.tif {e:.4}",
            p.shape_str(),
            100.0 * r.negative_mass,
            -100.0 * r.min_over_peak
        );
        (p, r, e)
    };
    let (p, r, e) = run(&otf_radialft, 0.6, None);
    let (_, _, e_centred) = run(&otf_fitted, 0.0, None);
    let (_, r_small, e_small) = run(&otf_radialft, 0.6, Some([21, 65, 65]));
    let (_, r_full, e_full) = run(&otf_radialft, 0.6, Some(KEPT));
    // the bead's 6.1 × 12.8 × 12.8 µm field in 0.3 × 0.1 × 0.1 µm voxels, made odd
    assert_eq!(p.dims, [21, 129, 129]);
    assert_eq!(p.voxel_size, Some(DATA_VOXEL));
    assert!((p.sum() - 1.0).abs() < 1e-4 && p.data.iter().all(|&v| v >= 0.0));
    assert!(e <= 0.10, "PSF via the radial OTF vs cudaDecon: rel L2 {e}");
    // radialft's z centre is what brings it under 0.10
    assert!(e_centred > 0.10, "{e_centred}");
    // the clipped ripple mass grows with the grid, and so does the difference
    assert!(r_small.negative_mass < r.negative_mass && r.negative_mass < r_full.negative_mass);
    assert!(e_small < e && e < e_full, "{e_small} {e} {e_full}");
}

/// The PSF cleaned in space meets issue 20's 0.10 too once it is centred where radialft
/// centres cudaDecon's OTF, 0.6 bead planes past the parabola peak (`psf --measured …
/// --centre peak --radial --noise-floor 2 --z-centre-offset 0.6`): 0.075 measured, 0.131
/// without the move (`accelerated_rl_reproduces_cudadecon`). A gentler floor keeps more of
/// the faint lobes: 1.5 σ 0.050 (1.25 σ lets noise in: 0.54, see `cleaned_psf`).
#[test]
fn spatial_psf_centred_as_radialft_reproduces_cudadecon() {
    let Some(dir) = data_dir("spatial_psf_centred_as_radialft_reproduces_cudadecon") else {
        return;
    };
    let reference = read_volume(dir.join("im_decon.tif")).unwrap();
    let input = kept_input(&dir);
    let cfg = cudadecon_config(10, true);
    let run = |sigmas: f64| {
        let (p, r) = cleaned_psf(&dir, CentreRule::Peak, true, sigmas, 0.6);
        let out = rl::richardson_lucy_traced(&input, &p, &cfg).unwrap().0;
        let e = rel_l2(&out.data, &reference.data);
        eprintln!(
            "PSF cleaned in space, z centre +0.6 planes, floor {sigmas} σ: {} → accelerated RL vs im_decon.tif {e:.4}",
            p.shape_str()
        );
        (r, e)
    };
    let (r, e) = run(2.0);
    let (_, e_gentle) = run(1.5);
    // the parabola peak moved by 0.6 planes
    let (_, r0) = cleaned_psf(&dir, CentreRule::Peak, true, 2.0, 0.0);
    assert!((r.centre_zyx[0] - r0.centre_zyx[0] - 0.6).abs() < 1e-9);
    assert!(e <= 0.10, "spatial PSF centred as radialft vs cudaDecon: rel L2 {e}");
    assert!(e_gentle < e, "{e_gentle} {e}");
}

/// The PSF cleaned in space (noise floor 2σ, radial) centred on the parabola peak reaches
/// 0.131 here (measured), short of issue 20's 0.10: cudaDecon's OTF is centred 0.06 µm
/// further along z, and keeps the faint lobes the noise floor cuts. The bound is
/// met with radialft's centre, in space (`spatial_psf_centred_as_radialft_reproduces_cudadecon`,
/// 0.075), through the PSF made from the radial OTF (`psf_via_radial_otf_reproduces_cudadecon`,
/// 0.071) and by the OTF itself (`radial_otf_rl_reproduces_cudadecon`, 0.0057); this bound
/// guards the default centring against regressions (measured + 0.009).
const ACCELERATED_TOLERANCE: f64 = 0.14;

fn python() -> Option<PathBuf> {
    let p = std::env::var_os("RLN_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target/py-venv/bin/python"));
    p.is_file().then_some(p)
}

#[test]
fn plain_rl_matches_numpy_reference_and_approaches_cudadecon() {
    let test = "plain_rl_matches_numpy_reference_and_approaches_cudadecon";
    let Some(dir) = data_dir(test) else {
        return;
    };
    let Some(py) = python() else {
        eprintln!("{test}: SKIPPED: no Python venv (tools/install-python-venv.sh, or set RLN_PYTHON)");
        assert!(
            std::env::var_os("RLN_REQUIRE_REAL_DATA").is_none(),
            "RLN_REQUIRE_REAL_DATA is set"
        );
        return;
    };
    let input = kept_input(&dir);
    let p = decon_psf(&dir);
    let (plain, stats) = rl::richardson_lucy_traced(&input, &p, &cudadecon_config(10, false)).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let (fi, fp, fo) = (
        tmp.path().join("in.tif"),
        tmp.path().join("psf.tif"),
        tmp.path().join("ref.npy"),
    );
    write_volume(&fi, &input, OutputDtype::F32).unwrap();
    write_volume(&fp, &p, OutputDtype::F32).unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/imaging/rl_reference.py");
    let st = std::process::Command::new(&py)
        .arg(&script)
        .args([&fi, &fp, &fo])
        .args(["--iterations", "10", "--background", "98", "--apodize", "15"])
        .status()
        .unwrap();
    assert!(st.success(), "{} failed", script.display());
    let reference = imaging_common::npy_volume(&fo);
    let e_ref = rel_l2(&plain.data, &reference.data);
    let decon = read_volume(dir.join("im_decon.tif")).unwrap();
    let e_cuda = rel_l2(&plain.data, &decon.data);
    eprintln!(
        "plain RL 10 it.: vs the NumPy reference {e_ref:.2e}, vs cudaDecon (accelerated) {e_cuda:.4}; change per iteration {:?}",
        stats.iter().map(|s| format!("{:.3e}", s.change)).collect::<Vec<_>>()
    );
    // the same algorithm in f32 FFTs vs f64 (and a tiny positive floor instead of exact
    // zeros where the data are 0): 4.3e-3 measured; issue 20 asks ≤ 0.2
    assert!(e_ref < 1e-2, "plain RL vs NumPy reference: rel L2 {e_ref}");
    // RL's change per iteration falls without acceleration
    assert!(stats[9].change < stats[2].change, "{stats:?}");
}

#[test]
fn lls_volume_acquisition_estimate_is_plausible() {
    let Some(dir) = data_dir("lls_volume_acquisition_estimate_is_plausible") else {
        return;
    };
    let raw = read_volume(dir.join("im_deskewed.tif")).unwrap();
    let e = rln_engine::imaging::acquisition::estimate(&raw).unwrap();
    eprintln!("im_deskewed.tif: {}", e.summary());
    // cudaDecon's tests subtract 98; the background mode must be near it, above the offset
    assert!((90.0..115.0).contains(&e.background), "{e:?}");
    assert!(e.offset < e.background && e.gain > 0.0, "{e:?}");
    // 95.9 ± 0.2 ADU, 1.14 ± 0.03 ADU/photon, 1.61 (1.51–1.70) photons, 1.4 ± 0.2 photons
    // measured: the gain is identified, the background holds photons, and the read noise is
    // that of a scientific camera (1–3 e⁻), not the shot noise mistaken for it
    assert!(e.identified(e.gain, e.gain_se), "{e:?}");
    assert!(
        e.interval(e.background_photons, e.background_photons_se)[0] > 0.0,
        "{e:?}"
    );
    assert!(e.read_noise_interval()[1] < 5.0, "{e:?}");
}

//! Metrics against scikit-image and numpy (vectors from tools/imaging/make_metric_vectors.py).

mod imaging_common;
use imaging_common::*;
use rln_engine::imaging::metrics::{self, Normalize};
use rln_engine::imaging::normalize::{percentile, P_HI, P_LO};
use rln_engine::imaging::Volume;

#[test]
fn ssim_psnr_nrmse_and_percentiles_match_scikit_image() {
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(data_dir().join("metric_ref.json")).unwrap()).unwrap();
    for (name, want) in r.as_object().unwrap() {
        let gt = npy_volume(&data_dir().join(format!("metric_{name}_gt.npy")));
        let pred = npy_volume(&data_dir().join(format!("metric_{name}_pred.npy")));
        let dr = want["data_range"].as_f64().unwrap();
        let m = metrics::evaluate(&gt, &pred, Normalize::None, Some(dr)).unwrap();
        let (ws, wp, wn) = (
            want["ssim"].as_f64().unwrap(),
            want["psnr"].as_f64().unwrap(),
            want["nrmse"].as_f64().unwrap(),
        );
        eprintln!(
            "{name}: SSIM {:.9} vs skimage {ws:.9} (Δ {:.1e}); PSNR {:.9} vs {wp:.9} (Δ {:.1e})",
            m.ssim,
            (m.ssim - ws).abs(),
            m.psnr,
            (m.psnr - wp).abs()
        );
        assert!((m.ssim - ws).abs() <= 1e-6, "{name}: SSIM {} vs {ws}", m.ssim);
        assert!((m.psnr - wp).abs() <= 1e-6, "{name}: PSNR {} vs {wp}", m.psnr);
        assert!((m.nrmse - wn).abs() <= 1e-9, "{name}: NRMSE {} vs {wn}", m.nrmse);
        for (p, key) in [(P_LO, "p_lo"), (P_HI, "p_hi")] {
            let ours = percentile(&gt.data, p).unwrap();
            let np = want[key].as_f64().unwrap();
            assert!(
                (ours - np).abs() <= 1e-6 * np.abs().max(1.0),
                "{name} {key}: {ours} vs {np}"
            );
        }
    }
}

#[test]
fn affine_normalization_is_scale_and_offset_invariant() {
    let gt = npy_volume(&data_dir().join("metric_structured_gt.npy"));
    let pred = npy_volume(&data_dir().join("metric_structured_pred.npy"));
    let m1 = metrics::evaluate(&gt, &pred, Normalize::Affine, None).unwrap();
    let scaled = gt.like(pred.data.iter().map(|&v| 3.0 * v - 50.0).collect()).unwrap();
    let m2 = metrics::evaluate(&gt, &scaled, Normalize::Affine, None).unwrap();
    assert!(
        (m1.ssim - m2.ssim).abs() < 1e-5 && (m1.psnr - m2.psnr).abs() < 1e-4,
        "{m1:?} {m2:?}"
    );
    // a perfect prediction up to scale/offset scores SSIM 1, r 1
    let same = gt.like(gt.data.iter().map(|&v| 0.5 * v + 7.0).collect()).unwrap();
    let m = metrics::evaluate(&gt, &same, Normalize::Affine, None).unwrap();
    assert!(m.ssim > 0.99999 && m.pearson_r > 0.999999 && m.psnr > 80.0, "{m:?}");
    assert!(m1.ssim < 0.9 && m1.pearson_r < 0.99);
}

#[test]
fn shape_mismatch_and_small_volumes_are_clear_errors() {
    let a = Volume::zeros([12, 20, 20]);
    let b = Volume::zeros([12, 20, 21]);
    let e = metrics::evaluate(&a, &b, Normalize::None, Some(1.0))
        .unwrap_err()
        .to_string();
    assert!(e.contains("12×20×20") && e.contains("12×20×21"), "{e}");
    let small = Volume::new([5, 20, 20], (0..2000).map(|i| i as f32).collect()).unwrap();
    let e = metrics::evaluate(&small, &small, Normalize::None, Some(1.0))
        .unwrap_err()
        .to_string();
    assert!(e.contains("11 voxels"), "{e}");
    let mut nan = Volume::new([12, 20, 20], vec![1.0; 4800]).unwrap();
    let i = nan.index(3, 4, 5);
    nan.data[i] = f32::NAN;
    let e = metrics::evaluate(&a, &nan, Normalize::None, Some(1.0))
        .unwrap_err()
        .to_string();
    assert!(e.contains("z=3, y=4, x=5"), "{e}");
}

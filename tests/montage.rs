//! The PNG montage of `demo` (and the real-data comparison): every panel is labelled.

use rln_engine::imaging::bitmap_text::{draw_text, text_height};
use rln_engine::imaging::montage::write_montage;
use rln_engine::imaging::Volume;

#[test]
fn montage_panels_carry_their_labels() {
    let dims = [8, 70, 64];
    let n: usize = dims.iter().product();
    let a = Volume::new(dims, (0..n).map(|i| (i % 97) as f32).collect()).unwrap();
    let b = Volume::new(dims, (0..n).map(|i| (i % 13) as f32).collect()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.png");
    write_montage(&path, &[("input", &a), ("RLD 12 it.", &b)]).unwrap();
    let dec = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&path).unwrap()));
    let mut r = dec.read_info().unwrap();
    let mut buf = vec![0u8; r.output_buffer_size()];
    let info = r.next_frame(&mut buf).unwrap();
    let (w, h) = (info.width as usize, info.height as usize);
    let gap = 4;
    let strip = text_height(2) + 2 * gap;
    assert_eq!(h, strip + 70 + gap + 8, "label strip above the slices");
    // each panel's strip holds exactly its label, drawn as the font draws it
    for (k, label) in ["input", "RLD 12 it."].iter().enumerate() {
        let x0 = k * (64 + gap);
        let mut want = vec![255u8; w * strip];
        draw_text(&mut want, w, x0 + 1, gap, x0 + 64, label, 2, 0);
        for y in 0..strip {
            for x in x0..x0 + 64 {
                assert_eq!(buf[y * w + x], want[y * w + x], "{label}: pixel ({y}, {x})");
            }
        }
        let dark = (0..strip)
            .flat_map(|y| (x0..x0 + 64).map(move |x| (y, x)))
            .filter(|&(y, x)| buf[y * w + x] == 0)
            .count();
        assert!(dark > 50, "{label}: {dark} dark pixels");
    }
}

/// Runs `compare --png` on one small volume with `extra` arguments; checks that the
/// panels carry input, `rl_label(report)`, RLN, ground truth; returns the JSON report.
fn compare_png_labels(extra: &[&str], rl_label: impl Fn(&serde_json::Value) -> String) -> serde_json::Value {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("compare.png");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_rln-engine"))
        .args(["compare", "--model", MODEL, "--size", "34,66,66", "--count", "1"])
        .args(["--rl-min", "1", "--rl-max", "6", "--json", "--png"])
        .arg(&path)
        .args(extra)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let dec = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&path).unwrap()));
    let mut r = dec.read_info().unwrap();
    let mut buf = vec![0u8; r.output_buffer_size()];
    let info = r.next_frame(&mut buf).unwrap();
    let (w, gap) = (info.width as usize, 4);
    assert_eq!(w, 4 * 66 + 3 * gap, "four panels: input, RL, RLN, ground truth");
    let strip = text_height(2) + 2 * gap;
    for (i, label) in [
        "input".to_string(),
        rl_label(&report),
        "RLN".into(),
        "ground truth".into(),
    ]
    .iter()
    .enumerate()
    {
        let x0 = i * (66 + gap);
        let mut want = vec![255u8; w * strip];
        draw_text(&mut want, w, x0 + 1, gap, x0 + 66, label, 2, 0);
        for y in 0..strip {
            for x in x0..x0 + 66 {
                assert_eq!(buf[y * w + x], want[y * w + x], "{label}: pixel ({y}, {x})");
            }
        }
    }
    report
}

const MODEL: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/models/rln-synthetic-widefield.safetensors"
);

/// `compare --png`: the first held-out volume's panels, the RLD one labelled with the
/// best-PSNR iteration count the report names.
#[test]
fn compare_png_labels_rld_with_its_best_iteration_count() {
    let report = compare_png_labels(&[], |r| format!("RLD {} it.", r["rld_best_psnr_iterations"]));
    assert_eq!(report["rows"].as_array().unwrap().len(), 4, "input, RLD ×2, RLN");
    assert!(report["rl_accelerated"].is_null());
    let model = MODEL;
    // the PNG is an output like any other: it may not overwrite the model
    let refused = std::process::Command::new(env!("CARGO_BIN_EXE_rln-engine"))
        .args(["compare", "--model", model, "--png", model])
        .output()
        .unwrap();
    assert!(!refused.status.success());
}

/// `compare --rl-accelerated`: accelerated RL is swept too, RLN is judged against the
/// stronger variant, and the PNG shows the stronger one at its best-PSNR count.
#[test]
fn compare_with_accelerated_rl_judges_and_draws_the_strongest_rl() {
    let strongest = |r: &serde_json::Value| {
        let rows = r["rows"].as_array().unwrap();
        let psnr = |prefix: &str| {
            rows.iter()
                .filter(|row| row["method"].as_str().unwrap().starts_with(prefix))
                .map(|row| row["psnr"].as_f64().unwrap())
                .fold(f64::MIN, f64::max)
        };
        if psnr("RL accelerated,") > psnr("RLD,") {
            format!("RL acc. {} it.", r["rl_accelerated"]["best_psnr_iterations"])
        } else {
            format!("RLD {} it.", r["rld_best_psnr_iterations"])
        }
    };
    let report = compare_png_labels(&["--rl-accelerated"], strongest);
    let rows = report["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 6, "input, RLD ×2, RL accelerated ×2, RLN: {rows:?}");
    let acc = &report["rl_accelerated"];
    for k in ["best_psnr_iterations", "best_ssim_iterations"] {
        let n = acc[k].as_u64().unwrap();
        assert!((1..=6).contains(&n), "{k} = {n}");
    }
    let rln = rows.last().unwrap();
    let best = |key: &str| {
        rows[1..5]
            .iter()
            .map(|r| r[key].as_f64().unwrap())
            .fold(f64::MIN, f64::max)
    };
    let beats = rln["psnr"].as_f64().unwrap() > best("psnr") && rln["ssim"].as_f64().unwrap() > best("ssim");
    assert_eq!(report["rln_beats_rld"].as_bool().unwrap(), beats);
}

/// `rln-engine montage`: one labelled column per panel, fluxes above each panel's level
/// against the first's, refused mismatched shapes and an output that is an input.
#[test]
fn montage_command_draws_panels_and_reports_flux() {
    use rln_engine::imaging::{write_volume, OutputDtype};
    let dir = tempfile::tempdir().unwrap();
    let dims = [6, 40, 64];
    let n: usize = dims.iter().product();
    // a: 100 + ramp; b: the same structure without the offset 100 and scaled by 1.03
    let ramp: Vec<f32> = (0..n).map(|i| (i % 29) as f32).collect();
    let a = Volume::new(dims, ramp.iter().map(|r| 100.0 + r).collect()).unwrap();
    let b = Volume::new(dims, ramp.iter().map(|r| 1.03 * r).collect()).unwrap();
    let small = Volume::new([6, 40, 32], vec![1.0; 6 * 40 * 32]).unwrap();
    let (pa, pb, ps) = (
        dir.path().join("a.tif"),
        dir.path().join("b.tif"),
        dir.path().join("s.tif"),
    );
    write_volume(&pa, &a, OutputDtype::F32).unwrap();
    write_volume(&pb, &b, OutputDtype::F32).unwrap();
    write_volume(&ps, &small, OutputDtype::F32).unwrap();
    let bin = env!("CARGO_BIN_EXE_rln-engine");
    let png_path = dir.path().join("m.png");
    let out = std::process::Command::new(bin)
        .args([
            "montage",
            "--json",
            "--flux-level",
            "100,0",
            "--voxel-size",
            "0.3,0.1,0.1",
            "--crop",
            "0,0,0,6,40,64",
            "-o",
        ])
        .arg(&png_path)
        .arg(format!("raw={}", pa.display()))
        .arg(format!("RLN={}", pb.display()))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let ratio = report["panels"][1]["flux_ratio_to_first"].as_f64().unwrap();
    assert!((ratio - 1.03).abs() < 1e-5, "flux ratio {ratio}");
    let dec = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&png_path).unwrap()));
    let r = dec.read_info().unwrap();
    assert_eq!(r.info().width as usize, 2 * 64 + 4, "two columns");
    // mismatched shapes and an output that is an input: clear errors, nothing written
    for (args, want) in [
        (
            vec![format!("a={}", pa.display()), format!("s={}", ps.display())],
            "one shape",
        ),
        (vec![format!("a={}", pa.display()), "nolabel".to_string()], "LABEL=FILE"),
        (
            vec!["--crop".into(), "0,0,0,6,40".into(), format!("a={}", pa.display())],
            "six numbers",
        ),
        (
            vec!["--crop".into(), "0,0,0,6,40,65".into(), format!("a={}", pa.display())],
            "--crop of panel a",
        ),
    ] {
        let bad = dir.path().join("bad.png");
        let out = std::process::Command::new(bin)
            .args(["montage", "-o"])
            .arg(&bad)
            .args(&args)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(want), "{err}");
        assert!(!bad.exists());
    }
    let out = std::process::Command::new(bin)
        .args(["montage", "-o"])
        .arg(dir.path().join("a.png"))
        .arg(format!("a={}", pa.display()))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

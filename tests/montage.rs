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

/// `compare --png`: the first held-out volume's panels, the RLD one labelled with the
/// best-PSNR iteration count the report names.
#[test]
fn compare_png_labels_rld_with_its_best_iteration_count() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("compare.png");
    let model = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/models/rln-synthetic-widefield.safetensors"
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_rln-engine"))
        .args(["compare", "--model", model, "--size", "34,66,66", "--count", "1"])
        .args(["--rl-min", "1", "--rl-max", "6", "--json", "--png"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let k = report["rld_best_psnr_iterations"].as_u64().unwrap();
    let dec = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&path).unwrap()));
    let mut r = dec.read_info().unwrap();
    let mut buf = vec![0u8; r.output_buffer_size()];
    let info = r.next_frame(&mut buf).unwrap();
    let (w, gap) = (info.width as usize, 4);
    assert_eq!(w, 4 * 66 + 3 * gap, "four panels: input, RLD, RLN, ground truth");
    let strip = text_height(2) + 2 * gap;
    for (i, label) in [
        "input".to_string(),
        format!("RLD {k} it."),
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
    // the PNG is an output like any other: it may not overwrite the model
    let refused = std::process::Command::new(env!("CARGO_BIN_EXE_rln-engine"))
        .args(["compare", "--model", model, "--png", model])
        .output()
        .unwrap();
    assert!(!refused.status.success());
}

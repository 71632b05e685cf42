//! `rln-engine demo` from the command line, on a volume smaller than the default.

use std::process::Command;

/// (name, PSNR, SSIM) rows of the demo's table.
fn table(stdout: &str) -> Vec<(String, f64, f64)> {
    stdout
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            // name (possibly "RLD (57 it.)"), PSNR, SSIM, time
            if f.len() < 4 {
                return None;
            }
            let n = f.len();
            let (p, s) = (f[n - 3].parse().ok()?, f[n - 2].parse().ok()?);
            Some((f[..n - 3].join(" "), p, s))
        })
        .collect()
}

#[test]
fn demo_writes_its_files_and_rln_beats_rld_and_the_input() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("demo");
    let o = Command::new(env!("CARGO_BIN_EXE_rln-engine"))
        .args(["demo", "--size", "40,96,96", "--rl-iterations", "60", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(o.status.success(), "{stderr}");
    assert!(
        !stderr.contains("--fp16"),
        "a note about a flag the user did not give: {stderr}"
    );
    for f in ["input.tif", "rln.tif", "rld.tif", "ground_truth.tif", "comparison.png"] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    let rows = table(&stdout);
    let get = |prefix: &str| {
        rows.iter()
            .find(|r| r.0.starts_with(prefix))
            .unwrap_or_else(|| panic!("{prefix}: {stdout}"))
    };
    let (input, rld, rln) = (get("input"), get("RLD"), get("RLN"));
    // the shipped model on its own PSF and trained families: better than both
    assert!(
        rln.1 > rld.1 + 1.0 && rld.1 > input.1,
        "PSNR input {} RLD {} RLN {}",
        input.1,
        rld.1,
        rln.1
    );
    assert!(
        rln.2 > rld.2 && rln.2 > input.2,
        "SSIM input {} RLD {} RLN {}",
        input.2,
        rld.2,
        rln.2
    );
    let rln_out = rln_engine::imaging::io::read_volume(out.join("rln.tif")).unwrap();
    assert_eq!(rln_out.dims, [40, 96, 96]);
    assert!(rln_out.data.iter().all(|v| v.is_finite()));
}

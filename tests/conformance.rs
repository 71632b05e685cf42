//! Conformance with the authors' TensorFlow graph (../shared/reference), through the
//! library and through the CLI, and the errors for broken model and vectors files.

use rln_engine::conformance::{self, TOL_GRAD, TOL_INFER, TOL_TRAIN};
use rln_engine::model::tensor_file::{TensorFile, TensorWriter};
use rln_engine::model::Model;
use std::path::{Path, PathBuf};
use std::process::Command;

fn reference(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/reference")
        .join(name)
}

fn authors_model() -> Model<f32> {
    Model::<f32>::import_tf(&reference("rln-authors-weights.safetensors"), 1e-4).expect("import the authors' weights")
}

#[test]
fn imported_authors_model_passes_every_key_in_f32() {
    let report = conformance::run::<f32>(&authors_model(), &reference("rln-tf-vectors-a.safetensors")).unwrap();
    assert_eq!(report.input_shape, [4, 24, 40, 32]);
    // 3 outputs + 4 loss terms in each mode, and the 49 trainable tensors' gradients
    assert_eq!(report.rows.len(), 14 + 49);
    for r in &report.rows {
        assert!(r.pass, "{} rel err {:e} > tol {:e}", r.key, r.rel_err, r.tol);
    }
    assert!(report.worst("infer.") <= TOL_INFER);
    assert!(report.worst("train.") <= TOL_TRAIN);
    assert!(report.worst("grad.") <= TOL_GRAD);
}

#[test]
fn model_file_round_trip_is_exact() {
    let m = authors_model();
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("m.safetensors");
    m.save(&p).unwrap();
    let back = Model::<f32>::load(&p).unwrap();
    assert_eq!(back, m);
    assert_eq!(back.config.div_eps, 1e-4);
}

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_rln-engine"))
}

#[test]
fn cli_import_and_conformance_pass() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("authors.safetensors");
    let out = bin()
        .args([
            "import-tf",
            reference("rln-authors-weights.safetensors").to_str().unwrap(),
            "--div-eps",
            "1e-4",
            "-o",
        ])
        .arg(&model)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = bin()
        .args(["conformance", "--json", "--model"])
        .arg(&model)
        .arg("--vectors")
        .arg(reference("rln-tf-vectors-a.safetensors"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["passed"], true);
    assert_eq!(report["rows"].as_array().unwrap().len(), 63);

    // a wrong div_eps changes the network: the CLI must fail with a non-zero status
    let wrong = dir.path().join("wrong.safetensors");
    assert!(bin()
        .args([
            "import-tf",
            reference("rln-authors-weights.safetensors").to_str().unwrap(),
            "--div-eps",
            "1e-1",
            "-o"
        ])
        .arg(&wrong)
        .status()
        .unwrap()
        .success());
    let out = bin()
        .args(["conformance", "--model"])
        .arg(&wrong)
        .arg("--vectors")
        .arg(reference("rln-tf-vectors-a.safetensors"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("FAIL"));
}

/// Rewrites a model file with `edit` applied to its tensors/metadata.
fn edited_model(
    dir: &Path,
    name: &str,
    edit: impl FnOnce(&mut Vec<(String, Vec<usize>, Vec<f32>)>, &mut std::collections::HashMap<String, String>),
) -> PathBuf {
    let src = dir.join("good.safetensors");
    if !src.exists() {
        authors_model().save(&src).unwrap();
    }
    let f = TensorFile::open(&src).unwrap();
    let mut tensors: Vec<(String, Vec<usize>, Vec<f32>)> = f
        .names()
        .into_iter()
        .map(|n| {
            let t = f.get(&n).unwrap();
            (n, t.shape, t.data.iter().map(|&v| v as f32).collect())
        })
        .collect();
    let mut meta = f.metadata();
    edit(&mut tensors, &mut meta);
    let mut w = TensorWriter::default();
    for (n, s, d) in &tensors {
        w.add_f32(n, s.clone(), d);
    }
    w.metadata = meta;
    let p = dir.join(name);
    w.write(&p).unwrap();
    p
}

fn load_error(p: &Path) -> String {
    match Model::<f32>::load(p) {
        Ok(_) => panic!("{} loaded although it is broken", p.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn broken_model_files_are_rejected_with_the_tensor_named() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let e = load_error(&edited_model(d, "missing.safetensors", |t, _| {
        t.retain(|(n, _, _)| n != "h2.bp.conv1.weight")
    }));
    assert!(e.contains("h2.bp.conv1.weight") && e.contains("missing"), "{e}");
    let e = load_error(&edited_model(d, "extra.safetensors", |t, _| {
        t.push(("h9.conv.weight".into(), vec![2], vec![0.0, 1.0]))
    }));
    assert!(e.contains("h9.conv.weight"), "{e}");
    let e = load_error(&edited_model(d, "shape.safetensors", |t, _| {
        let w = t.iter_mut().find(|(n, _, _)| n == "h1.fp.conv2.weight").unwrap();
        w.1 = vec![4, 4, 27];
    }));
    assert!(e.contains("h1.fp.conv2.weight") && e.contains("shape"), "{e}");
    let e = load_error(&edited_model(d, "nan.safetensors", |t, _| {
        let w = t.iter_mut().find(|(n, _, _)| n == "h3.conv2.weight").unwrap();
        w.2[17] = f32::NAN;
    }));
    assert!(e.contains("h3.conv2.weight") && e.contains("non-finite"), "{e}");
    let e = load_error(&edited_model(d, "version.safetensors", |_, m| {
        let c = m.get_mut("rln_config").unwrap();
        *c = c.replace("\"format_version\":1", "\"format_version\":7");
    }));
    assert!(e.contains("version 7"), "{e}");
    let e = load_error(&edited_model(d, "noconfig.safetensors", |_, m| {
        m.clear();
    }));
    assert!(e.contains("import-tf"), "{e}");
    // truncated file
    let good = std::fs::read(d.join("good.safetensors")).unwrap();
    let trunc = d.join("trunc.safetensors");
    std::fs::write(&trunc, &good[..good.len() / 2]).unwrap();
    let e = load_error(&trunc);
    assert!(e.contains("truncated"), "{e}");
}

#[test]
fn vectors_without_a_key_are_rejected_with_the_key_named() {
    let dir = tempfile::tempdir().unwrap();
    let f = TensorFile::open(&reference("rln-tf-vectors-a.safetensors")).unwrap();
    let mut w = TensorWriter::default();
    for n in f.names() {
        if n != "grad.update/u_2" {
            let t = f.get(&n).unwrap();
            w.add_f32(&n, t.shape, &t.data.iter().map(|&v| v as f32).collect::<Vec<_>>());
        }
    }
    let p = dir.path().join("v.safetensors");
    w.write(&p).unwrap();
    let e = conformance::run::<f32>(&authors_model(), &p).unwrap_err().to_string();
    assert!(e.contains("grad.update/u_2"), "{e}");
    // and the CLI exits non-zero without a panic
    let model = dir.path().join("m.safetensors");
    authors_model().save(&model).unwrap();
    let out = bin()
        .args(["conformance", "--model"])
        .arg(&model)
        .arg("--vectors")
        .arg(&p)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("grad.update/u_2") && !err.contains("panicked"), "{err}");
}

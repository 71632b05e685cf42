//! Numerical correctness (issue 14): thin and odd volumes (the TIFF layout ImageJ and
//! tifffile read, every depth 1–9 against the authors' NumPy specification), no silent
//! non-finite or clipped output, absurd model weights, degenerate normalization, numeric
//! option errors, a tiling test that tells contexts apart, and the subsampled branch of
//! the global normalization estimate.

mod common;

use common::*;
use rln_engine::backend::cpu::CpuBackend;
use rln_engine::imaging::io::{
    check_representable, read_volume, read_volume_with, write_volume, OutputDtype, ReadOptions,
};
use rln_engine::imaging::normalize::percentiles;
use rln_engine::imaging::psf::{generate, GaussianPsf, PsfSpec};
use rln_engine::imaging::Volume;
use rln_engine::infer::stitch::{estimate_normalization, run_tiled, Affine, NormalizeMode, StitchOptions};
use rln_engine::infer::tiling::{MemorySink, MemorySource, PlaneSource, TilePlan, DEFAULT_OVERLAP, RECEPTIVE_RADIUS};
use rln_engine::infer::{deconvolve, CpuPredictor, TilePredictor};
use rln_engine::model::tensor_file::{TensorFile, TensorWriter};
use rln_engine::model::{Model, Variant, L};
use rln_engine::net::{BnMode, Rln};
use rln_engine::tensor::{rel_l2, Shape, Tensor};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const SHIPPED: &str = "models/rln-synthetic-widefield.safetensors";

fn reference_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/reference")
}

fn engine(args: &[&str], cwd: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_rln-engine"))
        .args(args)
        .current_dir(cwd)
        .output()
        .unwrap()
}

/// What is wrong with `o` as the answer to bad input: it must fail with a message
/// containing `needle` (exit 1 from our errors or 2 from clap; never 101, a panic).
fn clear_error_problem(o: &Output, needle: &str) -> Option<String> {
    let err = String::from_utf8_lossy(&o.stderr);
    if o.status.success() {
        Some(format!("expected an error containing {needle:?}, got success"))
    } else if o.status.code() == Some(101) {
        Some(format!("panicked: {err}"))
    } else if !err.contains(needle) {
        Some(format!("expected {needle:?} in: {err}"))
    } else {
        None
    }
}

fn assert_clear_error(o: &Output, needle: &str) {
    if let Some(p) = clear_error_problem(o, needle) {
        panic!("{p}");
    }
}

/// The test tooling's Python (tools/install-python-venv.sh) when it has `modules`.
fn python_with(modules: &[&str]) -> Option<PathBuf> {
    let py = std::env::var_os("RLN_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target/py-venv/bin/python"));
    let ok = Command::new(&py)
        .args(["-c", &format!("import {}", modules.join(", "))])
        .output()
        .is_ok_and(|o| o.status.success());
    if ok {
        Some(py)
    } else {
        eprintln!(
            "SKIPPED: no Python with {modules:?} at {} (run tools/install-python-venv.sh or set RLN_PYTHON)",
            py.display()
        );
        None
    }
}

fn structured(dims: [usize; 3], seed: u64) -> Volume {
    let t: Tensor<f32> = random_volume(seed, Shape::new(1, 1, dims[0], dims[1], dims[2]));
    Volume::new(dims, t.data.iter().map(|v| 100.0 + 900.0 * v).collect()).unwrap()
}

// ------------------------------------------------------------------ thin volumes

/// What ImageJ (and tifffile for such files) read: `images=N` planes back to back from the
/// first plane's strip offset, the other directories ignored.
fn read_as_imagej(path: &Path, dims: [usize; 3], dtype: OutputDtype) -> Vec<f32> {
    use tiff::decoder::Decoder;
    use tiff::tags::Tag;
    let bytes = std::fs::read(path).unwrap();
    assert_eq!(&bytes[..2], b"II", "little-endian TIFF expected");
    let mut dec = Decoder::new(std::io::Cursor::new(&bytes)).unwrap();
    let off = dec.get_tag_u64_vec(Tag::StripOffsets).unwrap()[0] as usize;
    let n: usize = dims.iter().product();
    let b = &bytes[off..];
    (0..n)
        .map(|i| match dtype {
            OutputDtype::F32 => f32::from_le_bytes(b[4 * i..4 * i + 4].try_into().unwrap()),
            OutputDtype::U16 => u16::from_le_bytes([b[2 * i], b[2 * i + 1]]) as f32,
            OutputDtype::F16 => half::f16::from_bits(u16::from_le_bytes([b[2 * i], b[2 * i + 1]])).to_f32(),
        })
        .collect()
}

const THIN_AND_ODD: [[usize; 3]; 9] = [
    [2, 64, 64],
    [2, 8, 8],
    [2, 128, 128],
    [1, 4, 4],
    [2, 2, 2],
    [3, 3, 3],
    [4, 4, 4],
    [5, 7, 9],
    [9, 6, 5],
];

#[test]
fn written_stacks_are_contiguous_as_imagej_reads_them() {
    let dir = tempfile::tempdir().unwrap();
    for dims in THIN_AND_ODD {
        let v = structured(dims, 1);
        for dtype in [OutputDtype::F32, OutputDtype::U16, OutputDtype::F16] {
            let p = dir
                .path()
                .join(format!("v{}x{}x{}_{dtype:?}.tif", dims[0], dims[1], dims[2]));
            write_volume(&p, &v, dtype).unwrap();
            let opts = ReadOptions {
                allow_2d: true,
                ..ReadOptions::default()
            };
            let ours = read_volume_with(&p, &opts).unwrap().data;
            let imagej = read_as_imagej(&p, dims, dtype);
            assert_eq!(
                imagej, ours,
                "{dims:?} {dtype:?}: ImageJ's contiguous read differs from the pages"
            );
            let tol = if dtype == OutputDtype::F32 { 0.0 } else { 0.5 };
            let err = ours
                .iter()
                .zip(&v.data)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f32, f32::max);
            assert!(err <= tol, "{dims:?} {dtype:?}: max error {err}");
        }
    }
}

#[test]
fn infer_on_thin_and_odd_volumes_is_finite_and_read_alike_by_tifffile() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let model = Model::<f32>::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join(SHIPPED)).unwrap();
    let py = python_with(&["numpy", "tifffile"]);
    for dims in [[2usize, 64, 64], [2, 8, 8], [4, 4, 4], [3, 3, 3], [2, 2, 2], [3, 5, 2]] {
        let v = structured(dims, 2);
        let name = format!("in{}x{}x{}.tif", dims[0], dims[1], dims[2]);
        write_volume(d.join(&name), &v, OutputDtype::F32).unwrap();
        let out = format!("out_{name}");
        let model_path = Path::new(env!("CARGO_MANIFEST_DIR")).join(SHIPPED);
        let o = engine(
            &[
                "infer",
                model_path.to_str().unwrap(),
                &name,
                "-o",
                &out,
                "--device",
                "cpu",
            ],
            d,
        );
        assert!(o.status.success(), "{dims:?}: {}", String::from_utf8_lossy(&o.stderr));
        let y = read_volume(d.join(&out)).unwrap();
        // the same as the library's one-call deconvolution, and in the input's range
        let want = deconvolve(&mut CpuPredictor { model: model.clone() }, &model, &v, [256; 3]).unwrap();
        assert_eq!(y.data, want.data, "{dims:?}");
        let (lo, hi) = y
            .data
            .iter()
            .fold((f32::MAX, f32::MIN), |(a, b), &x| (a.min(x), b.max(x)));
        assert!(lo > -100.0 && hi < 1e5, "{dims:?}: output range [{lo}, {hi}]");
        assert_eq!(
            read_as_imagej(&d.join(&out), dims, OutputDtype::F32),
            y.data,
            "{dims:?}"
        );
        if let Some(py) = &py {
            let script = format!(
                "import tifffile, numpy as np\na = tifffile.imread({out:?}).astype(np.float64)\n\
                 print(list(a.shape)); print(repr(float(a.sum()))); print(bool(np.isfinite(a).all()))"
            );
            let o = Command::new(py).args(["-c", &script]).current_dir(d).output().unwrap();
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
            let s = String::from_utf8_lossy(&o.stdout);
            let sum: f64 = y.data.iter().map(|&v| v as f64).sum();
            let lines: Vec<&str> = s.lines().collect();
            assert_eq!(
                lines[0],
                format!("[{}, {}, {}]", dims[0], dims[1], dims[2]),
                "{dims:?}: tifffile shape"
            );
            assert_eq!(lines[2], "True", "{dims:?}: tifffile reads non-finite values");
            let got: f64 = lines[1].parse().unwrap();
            assert!(
                (got - sum).abs() <= 1e-6 * sum.abs(),
                "{dims:?}: tifffile sum {got} vs {sum}"
            );
        }
    }
}

/// The engine's rule for any size (net/mod.rs): mirror-pad odd sizes to even, run the
/// spec, crop. Checked against the authors' NumPy specification with their weights: the
/// padded input through `rln_reference.RLN`, cropped, for every depth 1–9 and odd/even
/// H and W.
#[test]
fn every_depth_1_to_9_matches_the_authors_numpy_spec_with_mirror_padding() {
    let Some(py) = python_with(&["numpy", "safetensors"]) else {
        return;
    };
    let weights = reference_dir().join("rln-authors-weights.safetensors");
    let m = Model::<f64>::import_tf(&weights, 1e-4).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut cases = Vec::new();
    for depth in 1..=9usize {
        for (h, w) in [(6usize, 7usize), (5, 4)] {
            let s = Shape::new(1, 1, depth, h, w);
            let x: Tensor<f64> = random_volume(200 + depth as u64, s);
            let k = cases.len();
            let bytes: Vec<u8> = x.data.iter().flat_map(|v| v.to_le_bytes()).collect();
            std::fs::write(dir.path().join(format!("x{k}.bin")), bytes).unwrap();
            cases.push((s, x));
        }
    }
    let shapes: Vec<String> = cases
        .iter()
        .map(|(s, _)| format!("({},{},{})", s.d, s.h, s.w))
        .collect();
    let script = format!(
        "import sys, numpy as np\nsys.path.insert(0, {ref_dir:?})\n\
         from rln_reference import RLN\nfrom safetensors.numpy import load_file\n\
         net = RLN(load_file({weights:?}), div_eps=1e-4)\n\
         for k, (d, h, w) in enumerate([{shapes}]):\n\
         \x20   x = np.fromfile(f'x{{k}}.bin', dtype='<f8').reshape(1, d, h, w, 1)\n\
         \x20   xp = np.pad(x, ((0, 0), (0, d % 2), (0, h % 2), (0, w % 2), (0, 0)), mode='symmetric')\n\
         \x20   y = net.forward(xp)['prediction'][:, :d, :h, :w, :]\n\
         \x20   np.ascontiguousarray(y, dtype='<f8').tofile(f'y{{k}}.bin')\n",
        ref_dir = reference_dir().to_str().unwrap(),
        weights = weights.to_str().unwrap(),
        shapes = shapes.join(", "),
    );
    let o = Command::new(&py)
        .args(["-c", &script])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let b = CpuBackend::<f64>::new();
    for (k, (s, x)) in cases.iter().enumerate() {
        let got = Rln::new(&b, &m).forward(x, BnMode::Running, false).unwrap().prediction;
        let want: Vec<f64> = std::fs::read(dir.path().join(format!("y{k}.bin")))
            .unwrap()
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        let e = rel_l2(&got.data, &want);
        assert!(e < 1e-10, "{s}: engine vs NumPy spec rel err {e:e}");
        // and the naive second implementation agrees (tests/common)
        let naive = naive_forward(&m, x, false);
        assert!(rel_l2(&got.data, &naive.y.data) < 1e-12, "{s}: vs naive");
    }
}

// ------------------------------------------------------------------ non-finite / clipped output

#[test]
fn writers_refuse_non_finite_out_of_range_and_all_zero_u16_volumes() {
    let dir = tempfile::tempdir().unwrap();
    let cases: [(&[f32], OutputDtype, &str); 7] = [
        (&[1.0, f32::NAN], OutputDtype::F32, "NaN"),
        (&[1.0, f32::INFINITY], OutputDtype::F16, "inf"),
        (&[1.0, 70000.0], OutputDtype::F16, "65504"),
        (&[-70000.0, 1.0], OutputDtype::F16, "65504"),
        (&[-5.0, 1.0], OutputDtype::U16, "0…65535"),
        (&[1.0, 65536.0], OutputDtype::U16, "0…65535"),
        // a PSF sums to 1: all its values would round to 0
        (&[0.01, 0.002], OutputDtype::U16, "all zeros"),
    ];
    for (k, (data, dtype, needle)) in cases.iter().enumerate() {
        let v = Volume::new([data.len(), 1, 1], data.to_vec()).unwrap();
        let p = dir.path().join(format!("c{k}.tif"));
        let e = write_volume(&p, &v, *dtype).unwrap_err().to_string();
        assert!(e.contains(needle), "{data:?} as {dtype:?}: {e}");
        assert!(!p.exists(), "{data:?} as {dtype:?}: a file was written");
    }
    // within range: rounding only, no error
    check_representable(&[-0.4, 0.0, 65535.4], OutputDtype::U16).unwrap();
    check_representable(&[-65504.0, 65504.0], OutputDtype::F16).unwrap();
    check_representable(&[0.0, 0.0], OutputDtype::U16).unwrap();
}

#[test]
fn a_network_result_with_nan_is_an_error_naming_the_stage() {
    // huge but finite weights (the load check is bypassed: the model is built in memory)
    let mut m = Model::<f32>::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join(SHIPPED)).unwrap();
    m.params.layers[L::H1FpConv1 as usize]
        .weight
        .iter_mut()
        .for_each(|w| *w = 3e38);
    let v = structured([4, 8, 8], 3);
    let e = deconvolve(&mut CpuPredictor { model: m.clone() }, &m, &v, [64; 3])
        .unwrap_err()
        .to_string();
    assert!(e.contains("network result is not finite"), "{e}");
}

#[test]
fn an_rl_result_with_inf_is_an_error_naming_the_stage() {
    use rln_engine::imaging::rl::{richardson_lucy, BackProjector, Boundary, RlConfig};
    let psf = generate(&PsfSpec::Gaussian(GaussianPsf::from_fwhm(
        [2.0; 3],
        [1.0; 3],
        Some([5, 5, 5]),
    )))
    .unwrap();
    let v = Volume::new([6, 6, 6], vec![3e38; 216]).unwrap();
    let cfg = RlConfig {
        iterations: 2,
        background: 0.0,
        back_projector: BackProjector::Matched,
        boundary: Boundary::Auto,
        ..RlConfig::default()
    };
    let e = richardson_lucy(&v, &psf, &cfg).unwrap_err().to_string();
    assert!(e.contains("Richardson–Lucy result is not finite"), "{e}");
}

#[test]
fn models_with_absurd_weights_are_rejected_at_load_and_import() {
    let dir = tempfile::tempdir().unwrap();
    let mut m = Model::<f32>::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join(SHIPPED)).unwrap();
    m.params.layers[L::H1FpConv1 as usize].weight[3] = 3e38;
    let p = dir.path().join("huge.safetensors");
    m.save(&p).unwrap();
    let e = Model::<f32>::load(&p).unwrap_err().to_string();
    assert!(e.contains("h1.fp.conv1.weight") && e.contains("plausible"), "{e}");
    // the shipped model and the authors' weights load (running variances reach ~3e8)
    let authors = reference_dir().join("rln-authors-weights.safetensors");
    Model::<f32>::import_tf(&authors, 1e-4).unwrap();
    // import-tf: one TF tensor scaled beyond 1e6
    let f = TensorFile::open(&authors).unwrap();
    let mut w = TensorWriter::default();
    for name in f.names() {
        let t = f.get(&name).unwrap();
        let mut data: Vec<f64> = t.data.clone();
        if name == "update/u_2" {
            data[0] = 2e6;
        }
        w.add_f32(
            &name,
            t.shape.clone(),
            &data.iter().map(|&v| v as f32).collect::<Vec<_>>(),
        );
    }
    let bad = dir.path().join("tf_huge.safetensors");
    w.write(&bad).unwrap();
    let e = Model::<f32>::import_tf(&bad, 1e-4).unwrap_err().to_string();
    assert!(e.contains("update/u_2") && e.contains("plausible"), "{e}");
    let o = engine(
        &[
            "import-tf",
            bad.to_str().unwrap(),
            "--div-eps",
            "1e-4",
            "-o",
            "m.safetensors",
        ],
        dir.path(),
    );
    assert_clear_error(&o, "plausible");
    assert!(!dir.path().join("m.safetensors").exists());
}

// ------------------------------------------------------------------ degenerate normalization

#[test]
fn a_constant_volume_passes_through_unchanged_and_a_sparse_one_is_normalized() {
    let m = Model::<f32>::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join(SHIPPED)).unwrap();
    let mut pred = CpuPredictor { model: m.clone() };
    let flat = Volume::new([6, 10, 12], vec![100.0; 720]).unwrap();
    let y = deconvolve(&mut pred, &m, &flat, [64; 3]).unwrap();
    assert!(
        y.data.iter().all(|&v| v == 100.0),
        "constant 100 came out as {:?}",
        &y.data[..4]
    );
    // equal percentiles but not constant (a sparse specimen on a flat background): §6
    // normalization and the network, not a pass-through
    let mut sparse = flat.clone();
    sparse.data[7 * 12 + 5] = 1000.0;
    let y = deconvolve(&mut pred, &m, &sparse, [64; 3]).unwrap();
    assert!(y.data.iter().all(|v| v.is_finite()));
    assert_ne!(y.data, sparse.data);
    // the CLI says so
    let dir = tempfile::tempdir().unwrap();
    write_volume(dir.path().join("flat.tif"), &flat, OutputDtype::F32).unwrap();
    let mp = Path::new(env!("CARGO_MANIFEST_DIR")).join(SHIPPED);
    let o = engine(
        &[
            "infer",
            mp.to_str().unwrap(),
            "flat.tif",
            "-o",
            "y.tif",
            "--device",
            "cpu",
        ],
        dir.path(),
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stderr).contains("nothing to deconvolve"));
    assert_eq!(read_volume(dir.path().join("y.tif")).unwrap().data, flat.data);
}

// ------------------------------------------------------------------ numeric option errors

#[test]
fn numeric_options_out_of_range_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mp = Path::new(env!("CARGO_MANIFEST_DIR")).join(SHIPPED);
    let m = mp.to_str().unwrap();
    let o = engine(
        &[
            "psf",
            "--model",
            "gaussian",
            "--fwhm",
            "0.6,0.25,0.25",
            "--dxy",
            "0.1",
            "--dz",
            "0.2",
            "--nx",
            "9",
            "--nz",
            "9",
            "-o",
            "psf.tif",
        ],
        d,
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // every case is checked and the failures listed together
    let mut failures: Vec<String> = Vec::new();
    let mut expect = |what: &str, o: Output, needle: &str| {
        if let Some(p) = clear_error_problem(&o, needle) {
            failures.push(format!("{what}: {p}"));
        }
    };
    let train = |extra: &[&str]| {
        let mut a = vec![
            "train",
            "--synth-psf",
            "psf.tif",
            "--synth-size",
            "16",
            "--steps",
            "1",
            "-o",
            "t.safetensors",
        ];
        a.extend_from_slice(extra);
        engine(&a, d)
    };
    expect(
        "train --synth-count 0",
        train(&["--synth-count", "0"]),
        "--synth-count 0",
    );
    expect("train --batch 0", train(&["--batch", "0"]), "--batch 0");
    expect("train --lr=-1", train(&["--lr=-1"]), "--lr -1");
    expect("train --lr NaN", train(&["--lr", "NaN"]), "finite");
    expect("train --crop 1", train(&["--crop", "1"]), "too small");
    expect(
        "train --epoch-steps 0",
        train(&["--epoch-steps", "0"]),
        "--epoch-steps 0",
    );
    let compare = |extra: &[&str]| {
        // big enough for the model's 33×65×65 PSF, so that the range checks are what fails
        let mut a = vec!["compare", "--model", m, "--size", "34,66,66"];
        a.extend_from_slice(extra);
        engine(&a, d)
    };
    expect(
        "compare --rl-min 5 --rl-max 1",
        compare(&["--rl-min", "5", "--rl-max", "1"]),
        "rl-min",
    );
    expect(
        "compare --rl-min 0 --rl-max 0",
        compare(&["--rl-min", "0", "--rl-max", "0"]),
        "rl-min",
    );
    expect("compare --count 0", compare(&["--count", "0"]), "--count");
    expect(
        "psf --from-model --nx",
        engine(&["psf", "--from-model", m, "--nx", "15", "-o", "p2.tif"], d),
        "--nx would be ignored",
    );
    expect(
        "psf --dtype u16",
        engine(
            &[
                "psf",
                "--model",
                "gaussian",
                "--fwhm",
                "0.6,0.25,0.25",
                "--dxy",
                "0.1",
                "--dz",
                "0.2",
                "--dtype",
                "u16",
                "-o",
                "p3.tif",
            ],
            d,
        ),
        "all zeros",
    );
    for (cmd, opt) in [
        (
            vec!["synth", "--psf", "psf.tif", "-o", "s", "--size", "8"],
            "--background",
        ),
        (vec!["synth", "--psf", "psf.tif", "-o", "s", "--size", "8"], "--photons"),
        (vec!["rl", "psf.tif", "--psf", "psf.tif", "-o", "r.tif"], "--background"),
        (vec!["psf", "-o", "p4.tif"], "--na"),
        (vec!["psf", "-o", "p4.tif", "--model", "gaussian"], "--fwhm"),
        (vec!["infer", m, "psf.tif", "-o", "i.tif"], "--percentiles"),
    ] {
        for bad in ["NaN", "inf", "-inf"] {
            let mut a = cmd.clone();
            let val = format!("{opt}={bad}");
            a.push(&val);
            expect(&a.join(" "), engine(&a, d), "finite");
        }
    }
    assert!(
        failures.is_empty(),
        "{} case(s) failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    for f in ["t.safetensors", "p2.tif", "p3.tif", "s", "r.tif", "p4.tif", "i.tif"] {
        assert!(!d.join(f).exists(), "{f} was written");
    }
}

#[test]
fn compare_rejects_empty_ranges_in_the_library() {
    use rln_engine::compare::{compare_on_synthetic, RlSweep};
    use rln_engine::imaging::synth::SynthConfig;
    let m = Model::<f32>::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join(SHIPPED)).unwrap();
    let psf = generate(&PsfSpec::Gaussian(GaussianPsf::from_fwhm(
        [2.0; 3],
        [1.0; 3],
        Some([5, 5, 5]),
    )))
    .unwrap();
    let synth = SynthConfig {
        size: [8, 8, 8],
        ..SynthConfig::default()
    };
    for (count, range, needle) in [(0, (5, 10), "--count"), (1, (0, 0), "rl-min"), (1, (5, 1), "rl-min")] {
        let e = compare_on_synthetic(
            &mut CpuPredictor { model: m.clone() },
            &m,
            &psf,
            &synth,
            count,
            1,
            RlSweep {
                min: range.0,
                max: range.1,
                accelerated: false,
            },
            &mut |_| {},
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains(needle), "{count} {range:?}: {e}");
    }
}

#[test]
fn conformance_vectors_of_inconsistent_shapes_are_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let x: Tensor<f32> = random_volume(5, Shape::new(1, 1, 4, 4, 4));
    let mut w = TensorWriter::default();
    w.add_f32("input", vec![1, 4, 4, 4, 1], &x.data);
    w.add_f32("ground_truth", vec![1, 4, 4, 4, 1], &x.data);
    w.add_f32("infer.prediction", vec![2, 4, 4, 4, 1], &[0.5; 128]);
    let p = dir.path().join("vectors.safetensors");
    w.write(&p).unwrap();
    let m = Model::<f32>::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join(SHIPPED)).unwrap();
    let e = match rln_engine::conformance::run::<f32>(&m, &p) {
        Ok(_) => panic!("inconsistent vectors accepted"),
        Err(e) => e.to_string(),
    };
    assert!(e.contains("infer.prediction") && e.contains("shape"), "{e}");
}

// ------------------------------------------------------------------ tiling and normalization

fn tiled(m: &Model<f32>, data: &[f32], dims: [usize; 3], core: [usize; 3], context: usize) -> Vec<f32> {
    let plan = TilePlan::new(dims, core, DEFAULT_OVERLAP, context).unwrap();
    assert!(plan.count() >= 9, "several tiles per axis: {}", plan.count());
    let opts = StitchOptions {
        plan,
        normalize: NormalizeMode::Global,
        percentiles: [0.01, 99.5],
        rescale_output: false,
        variant: Variant::Single,
    };
    let mut src = MemorySource { dims, data };
    let mut sink = MemorySink { data: Vec::new() };
    let identity = Affine::from_percentile_values(0.0, 1.0);
    let mut views: Vec<&mut dyn PlaneSource> = vec![&mut src];
    let mut pred = CpuPredictor { model: m.clone() };
    run_tiled(&mut pred, &mut views, &[identity], &mut sink, &opts, &mut |_, _| {}).unwrap();
    sink.data
}

/// The window of `x` (N×1×D×H×W) from `a` to `b` along spatial `axis` (0 = z).
fn window(x: &Tensor<f64>, axis: usize, (a, b): (usize, usize)) -> Tensor<f64> {
    let s = x.shape;
    let mut dims = [s.d, s.h, s.w];
    dims[axis] = b - a;
    let out = Shape::new(1, 1, dims[0], dims[1], dims[2]);
    let mut data = Vec::with_capacity(out.len());
    for z in 0..dims[0] {
        for y in 0..dims[1] {
            for xx in 0..dims[2] {
                let mut p = [z, y, xx];
                p[axis] += a;
                data.push(x.data[(p[0] * s.h + p[1]) * s.w + p[2]]);
            }
        }
    }
    Tensor::from_vec(out, data).unwrap()
}

/// Largest difference, relative to the largest output, between the whole-volume f64
/// prediction and each tile's prediction over its core, for the tiles `plan_axis` cuts
/// along `axis` with `context` (odd cores: both parities of the pooling at core edges).
fn window_error(m: &Model<f64>, x: &Tensor<f64>, axis: usize, context: usize) -> f64 {
    use rln_engine::infer::tiling::plan_axis;
    let b = CpuBackend::<f64>::new();
    let net = Rln::new(&b, m);
    let whole = net.forward(x, BnMode::Running, false).unwrap().prediction;
    let scale = whole.data.iter().fold(0.0f64, |a, &v| a.max(v.abs()));
    let s = x.shape;
    let len = [s.d, s.h, s.w][axis];
    let tiles = plan_axis(len, 27, DEFAULT_OVERLAP[2], context);
    assert!(tiles.len() >= 3 && tiles.iter().any(|t| t.window != (0, len)));
    let mut worst = 0.0f64;
    for t in &tiles {
        let y = net
            .forward(&window(x, axis, t.window), BnMode::Running, false)
            .unwrap()
            .prediction;
        let want = window(&whole, axis, (t.core.0, t.core.1));
        let got = window(&y, axis, (t.core.0 - t.window.0, t.core.1 - t.window.0));
        for (g, w) in got.data.iter().zip(&want.data) {
            worst = worst.max((g - w).abs() / scale);
        }
    }
    worst
}

/// Tiling tells contexts apart. In f64 with the shipped model: a tile whose window has
/// the default context (the receptive radius) predicts its core exactly as the whole
/// volume does (measured: exactly), and two voxels less context is measurably different
/// (measured: 3e-8 to 4e-7 of the output's scale: the outermost voxels of the receptive
/// field carry little weight, at float32's resolution, hence f64). Along z and x, odd
/// cores (both parities of the pooling at core edges).
#[test]
fn tile_windows_with_the_receptive_radius_equal_whole_volume_and_two_voxels_less_do_not() {
    let m: Model<f64> = Model::<f32>::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join(SHIPPED))
        .unwrap()
        .cast();
    for (axis, shape) in [(0usize, Shape::new(1, 1, 90, 6, 8)), (2, Shape::new(1, 1, 6, 8, 90))] {
        let x: Tensor<f64> = random_volume(91 + axis as u64, shape);
        let e_full = window_error(&m, &x, axis, RECEPTIVE_RADIUS);
        let e_less = window_error(&m, &x, axis, RECEPTIVE_RADIUS - 2);
        eprintln!(
            "axis {axis}: core vs whole, context {RECEPTIVE_RADIUS}: {e_full:e}, context {}: {e_less:e}",
            RECEPTIVE_RADIUS - 2
        );
        assert!(e_full <= 1e-12, "axis {axis}, context {RECEPTIVE_RADIUS}: {e_full:e}");
        assert!(
            e_less >= 1e3 * e_full.max(1e-15),
            "axis {axis}: context {} not told apart from {RECEPTIVE_RADIUS}: {e_less:e}",
            RECEPTIVE_RADIUS - 2
        );
    }
}

/// The float32 tiled loop (cut, predict, ramp blending) with the shipped model: the
/// default context equals the whole volume to 1e-6; four voxels less is visibly worse.
#[test]
fn tiled_loop_with_the_default_context_equals_whole_volume_in_f32() {
    let m = Model::<f32>::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join(SHIPPED)).unwrap();
    let dims = [12usize, 76, 76];
    let x: Tensor<f32> = random_volume(90, Shape::new(1, 1, dims[0], dims[1], dims[2]));
    let whole = CpuPredictor { model: m.clone() }.predict(&x).unwrap().data;
    let core = [12, 27, 27];
    let e_full = rel_l2(&tiled(&m, &x.data, dims, core, RECEPTIVE_RADIUS), &whole);
    let e_less = rel_l2(&tiled(&m, &x.data, dims, core, RECEPTIVE_RADIUS - 4), &whole);
    eprintln!(
        "tiled vs whole: context {RECEPTIVE_RADIUS}: {e_full:e}, context {}: {e_less:e}",
        RECEPTIVE_RADIUS - 4
    );
    assert!(e_full <= 1e-6, "context {RECEPTIVE_RADIUS}: rel err {e_full:e}");
    assert!(
        e_less >= 5.0 * e_full,
        "context {} not told apart: {e_less:e}",
        RECEPTIVE_RADIUS - 4
    );
}

/// A source that records which planes were read.
struct CountingSource<'a> {
    inner: MemorySource<'a>,
    planes_read: Vec<usize>,
}

impl PlaneSource for CountingSource<'_> {
    fn dims(&self) -> [usize; 3] {
        self.inner.dims
    }
    fn read_planes(&mut self, z0: usize, z1: usize) -> rln_engine::Result<std::borrow::Cow<'_, [f32]>> {
        self.planes_read.extend(z0..z1);
        self.inner.read_planes(z0, z1)
    }
}

#[test]
fn subsampled_normalization_uses_the_stated_stride_and_tracks_the_full_percentiles() {
    let dims = [40usize, 50, 60];
    let v = structured(dims, 7);
    let plane = dims[1] * dims[2];
    let pct = [0.01, 99.5];
    // a budget of 4.5 planes: every 10th plane, every voxel of it; below one plane: the
    // first plane, every 3rd voxel
    let mut aff = None;
    for (max_samples, planes, xstep) in [(plane * 9 / 2, vec![0usize, 10, 20, 30], 1usize), (1000, vec![0], 3)] {
        let mut src = CountingSource {
            inner: MemorySource { dims, data: &v.data },
            planes_read: Vec::new(),
        };
        let a = estimate_normalization(&mut src, pct, max_samples).unwrap();
        assert_eq!(src.planes_read, planes, "budget {max_samples}");
        let sample: Vec<f32> = planes
            .iter()
            .flat_map(|&z| v.data[z * plane..(z + 1) * plane].iter().step_by(xstep).copied())
            .collect();
        assert!(sample.len() <= max_samples);
        let want = percentiles(&sample, &pct).unwrap();
        assert_eq!((a.p_lo_value, a.p_hi_value), (want[0], want[1]), "budget {max_samples}");
        aff.get_or_insert(a);
    }
    let aff = aff.unwrap();
    // and it estimates the whole volume's percentiles (smooth distribution: within 1%)
    let full = estimate_normalization(&mut MemorySource { dims, data: &v.data }, pct, usize::MAX).unwrap();
    let range = full.p_hi_value - full.p_lo_value;
    assert!(
        (aff.p_hi_value - full.p_hi_value).abs() < 0.01 * range,
        "{aff:?} vs {full:?}"
    );
    assert!(
        (aff.p_lo_value - full.p_lo_value).abs() < 0.01 * range,
        "{aff:?} vs {full:?}"
    );
    assert_ne!(
        aff, full,
        "the subsample must differ from the full volume for this test to mean anything"
    );
}

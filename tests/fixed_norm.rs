//! Fixed input normalization (`train --fixed-norm`, `ModelConfig::norm_fixed`): the
//! normalization's arithmetic and its camera round trip, the model file, training crops
//! and flux targets, inference in memory and streamed against an oracle that builds the
//! map by hand, the `--percentiles` override, the CLI's errors, and what `train --like
//! RAW --fixed-norm like` records.

mod common;

use common::*;
use rand::Rng;
use rln_engine::imaging::normalize::percentiles;
use rln_engine::imaging::{read_volume, write_volume, OutputDtype, Volume};
use rln_engine::infer::stitch::{run_tiled, Affine, NormalizeMode, StitchOptions};
use rln_engine::infer::stream::{infer_file, InferFileOptions};
use rln_engine::infer::tiling::{MemorySink, MemorySource, PlaneSource, TilePlan, DEFAULT_OVERLAP, RECEPTIVE_RADIUS};
use rln_engine::infer::{deconvolve, CpuPredictor};
use rln_engine::model::{FixedNorm, Model, ModelConfig};
use rln_engine::tensor::rel_l2;
use rln_engine::train::data::{normalize_views, CropSampler, Dataset, Pair, TargetScale};
use std::ffi::OsStr;
use std::path::Path;
use std::process::{Command, Output};

const MODEL: &str = "models/rln-synthetic-widefield.safetensors";
/// In-memory tiles small enough that the test volumes are cut into several.
const CORE: [usize; 3] = [8, 24, 24];

fn engine(args: &[&dyn AsRef<OsStr>]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_rln-engine"))
        .args(args.iter().map(|a| a.as_ref()))
        .output()
        .unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn fixed(low: f64, high: f64, camera_offset: f64, camera_gain: f64) -> FixedNorm {
    FixedNorm {
        low,
        high,
        camera_offset,
        camera_gain,
    }
}

// ------------------------------------------------------------------ FixedNorm itself

#[test]
fn in_photons_equals_the_raw_map_through_the_camera() {
    let mut r = rng(71);
    for _ in 0..200 {
        let f = fixed(
            r.random_range(-50.0..500.0),
            r.random_range(600.0..5000.0),
            r.random_range(-20.0..400.0),
            r.random_range(0.05..8.0),
        );
        f.validate().unwrap();
        let p = f.in_photons();
        assert_eq!((p.camera_offset, p.camera_gain), (0.0, 1.0));
        let ((sr, or), (sp, op)) = (f.affine(), p.affine());
        // the raw map itself: low → 0, high → 1
        assert!((f.low * sr + or).abs() <= 1e-12 && (f.high * sr + or - 1.0).abs() <= 1e-12);
        for _ in 0..20 {
            let photons: f64 = r.random_range(-10.0..3000.0);
            let raw = f.camera_offset + f.camera_gain * photons;
            let (a, b) = (photons * sp + op, raw * sr + or);
            assert!(
                (a - b).abs() <= 1e-10 * (1.0 + b.abs()),
                "{f:?}: photons {photons} → {a}, raw {raw} → {b}"
            );
        }
    }
}

#[test]
fn validate_rejects_bad_values_and_the_config_with_them() {
    let good = fixed(100.0, 900.0, 95.0, 1.2);
    good.validate().unwrap();
    let bad = [
        fixed(900.0, 100.0, 0.0, 1.0),
        fixed(5.0, 5.0, 0.0, 1.0),
        fixed(f64::NAN, 900.0, 0.0, 1.0),
        fixed(100.0, f64::INFINITY, 0.0, 1.0),
        fixed(100.0, 900.0, f64::NAN, 1.0),
        fixed(100.0, 900.0, 0.0, 0.0),
        fixed(100.0, 900.0, 0.0, -1.5),
        fixed(100.0, 900.0, 0.0, f64::INFINITY),
    ];
    for f in bad {
        let e = f.validate().expect_err(&format!("{f:?} accepted"));
        assert!(e.to_string().contains("fixed normalization"), "{f:?}: {e}");
        let config = ModelConfig {
            norm_fixed: Some(f),
            ..ModelConfig::default()
        };
        assert!(config.validate().is_err(), "a config with {f:?} accepted");
    }
}

#[test]
fn the_model_file_keeps_norm_fixed_and_older_configs_load_without_it() {
    let f = fixed(101.25, 873.5, 99.75, 1.375);
    let config = ModelConfig {
        norm_fixed: Some(f),
        ..ModelConfig::default()
    };
    let json = serde_json::to_string(&config).unwrap();
    let back: ModelConfig = serde_json::from_str(&json).unwrap();
    assert_eq!(back.norm_fixed, Some(f));
    // a config without the field (every model made before it) loads with none, and one
    // without it does not write it
    let plain = serde_json::to_value(ModelConfig::default()).unwrap();
    assert!(plain.get("norm_fixed").is_none(), "{plain}");
    let mut old = serde_json::to_value(&config).unwrap();
    old.as_object_mut().unwrap().remove("norm_fixed");
    let old: ModelConfig = serde_json::from_value(old).unwrap();
    assert_eq!(old.norm_fixed, None);
    // through the model file
    let dir = tempfile::tempdir().unwrap();
    let mut m = Model::<f32>::init(config.clone(), 5);
    m.save(&dir.path().join("m.safetensors")).unwrap();
    let loaded = Model::<f32>::load(&dir.path().join("m.safetensors")).unwrap();
    assert_eq!(loaded.config.norm_fixed, Some(f));
    // written as version 2, which an engine that knows only version 1 (and would
    // ignore the field) refuses; a model without it stays version 1
    assert_eq!(loaded.config.format_version, 2);
    m.config.norm_fixed = None;
    m.save(&dir.path().join("p.safetensors")).unwrap();
    let plain = Model::<f32>::load(&dir.path().join("p.safetensors")).unwrap();
    assert_eq!(plain.config.norm_fixed, None);
    assert_eq!(plain.config.format_version, 1);
    // a version-1 file with the field (written before version 2) still reads with it;
    // a version beyond 2 is refused by name
    let v = |ver: u32| {
        config
            .to_json()
            .replace("\"format_version\":2", &format!("\"format_version\":{ver}"))
    };
    assert!(
        config.to_json().contains("\"format_version\":2"),
        "{}",
        config.to_json()
    );
    assert_eq!(ModelConfig::from_json(&v(1)).unwrap().norm_fixed, Some(f));
    let e = ModelConfig::from_json(&v(3)).unwrap_err().to_string();
    assert!(e.contains("version 3") && e.contains("1 to 2"), "{e}");
    // the shipped model predates the field
    assert_eq!(Model::<f32>::load(Path::new(MODEL)).unwrap().config.norm_fixed, None);
}

// ------------------------------------------------------------------ training crops

/// A blob scene `g` (≥ 10) and its input: `offset + gain·g` plus a box blur along x
/// (flux kept) and noise.
fn scene(seed: u64, dims: [usize; 3], gain: f32) -> (Volume, Volume) {
    let mut r = rng(seed);
    let n = dims[0] * dims[1] * dims[2];
    let mut g = vec![10.0f32; n];
    for _ in 0..10 {
        let c = [
            r.random_range(0..dims[0]) as f32,
            r.random_range(0..dims[1]) as f32,
            r.random_range(0..dims[2]) as f32,
        ];
        for (i, v) in g.iter_mut().enumerate() {
            let p = [
                (i / (dims[1] * dims[2])) as f32,
                ((i / dims[2]) % dims[1]) as f32,
                (i % dims[2]) as f32,
            ];
            let d2: f32 = p.iter().zip(&c).map(|(a, b)| (a - b).powi(2)).sum();
            *v += 300.0 * (-d2 / 6.0).exp();
        }
    }
    let nx = dims[2];
    let x: Vec<f32> = (0..n)
        .map(|i| {
            let (row, k) = (i / nx, i % nx);
            let blur: f32 = (0..3).map(|j| g[row * nx + (k + nx + j - 1) % nx]).sum::<f32>() / 3.0;
            gain * blur + r.random_range(-2.0..2.0)
        })
        .collect();
    (Volume::new(dims, x).unwrap(), Volume::new(dims, g).unwrap())
}

#[test]
fn fixed_views_and_input_flux_targets() {
    let dims = [16, 24, 24];
    let (x, g) = scene(81, dims, 2.5);
    let f = fixed(30.0, 600.0, 0.0, 1.0);
    let (views, maps) = normalize_views(vec![x.data.clone()], [0.01, 99.5], Some(&f)).unwrap();
    let (s, o) = (1.0 / (f.high - f.low), -f.low / (f.high - f.low));
    assert_eq!(maps.len(), 1);
    assert!((maps[0].0 - s).abs() <= 1e-15 * s && (maps[0].1 - o).abs() <= 1e-14 * o.abs());
    for (got, v) in views[0].iter().zip(&x.data) {
        let want = ((*v as f64 - f.low) / (f.high - f.low)) as f32;
        assert!((got - want).abs() <= 1e-6 * (1.0 + want.abs()), "{got} vs {want}");
    }
    // the percentile map of the same crop is another one (so the above tests `fixed`)
    let (pv, _) = normalize_views(vec![x.data.clone()], [0.01, 99.5], None).unwrap();
    assert!(rel_l2(&pv[0], &views[0]) > 0.1);

    // through the sampler: a whole-volume crop is the fixed map of the input, and the
    // input-flux target is g·ratio·scale + offset clipped at 0
    let pair = Pair::new("p".into(), vec![x.clone()], g.clone()).unwrap();
    let ratio = pair.flux_ratios[0];
    assert!((ratio - 2.5).abs() < 0.01, "flux ratio {ratio}");
    let target = TargetScale::InputFlux.target(&g.data, &pair, &maps).unwrap();
    let want_target: Vec<f32> = g
        .data
        .iter()
        .map(|&v| ((v as f64 * ratio * s + o) as f32).max(0.0))
        .collect();
    let close = |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(p, q)| (p - q).abs() <= 1e-5 * (1.0 + q.abs()));
    assert!(close(&target, &want_target));
    let sampler = CropSampler {
        crop: dims,
        batch: 1,
        target_scale: TargetScale::InputFlux,
        fixed: Some(f),
        ..CropSampler::default()
    };
    let data = Dataset { pairs: vec![pair] };
    let b = sampler.batch(&data, rln_engine::model::Variant::Single, 0, 7).unwrap();
    assert!(
        close(&b.input.data, &views[0]),
        "the sampler's crop is not the fixed map"
    );
    assert!(close(&b.ground_truth.data, &want_target), "the sampler's target");
    // the target clips: the fixed low lies above the ground truth's floor·ratio
    assert!(want_target.contains(&0.0) && want_target.iter().any(|&v| v > 0.5));
}

// ------------------------------------------------------------------ inference

/// The shipped model and the same with `norm_fixed` = `vol`'s own percentile values.
fn models_for(vol: &Volume) -> (Model<f32>, Model<f32>, FixedNorm) {
    let pct_model = Model::<f32>::load(Path::new(MODEL)).unwrap();
    let p = percentiles(&vol.data, &pct_model.config.norm_percentiles).unwrap();
    // the two-point branch of the §6 map, so that the fixed map equals it
    assert!(p[1] > 2.0 * p[0], "percentiles {p:?}");
    let f = fixed(p[0], p[1], 0.0, 1.0);
    let mut fixed_model = pct_model.clone();
    fixed_model.config.norm_fixed = Some(f);
    (pct_model, fixed_model, f)
}

fn in_memory(model: &Model<f32>, vol: &Volume) -> Vec<f32> {
    let mut pred = CpuPredictor { model: model.clone() };
    deconvolve(&mut pred, model, vol, CORE).unwrap().data
}

/// The oracle: the tiled network with the affine map `v' = (v − low)/(high − low)`
/// written out here, output mapped back through it.
fn by_hand(model: &Model<f32>, vol: &Volume, low: f64, high: f64) -> Vec<f32> {
    let aff = Affine {
        scale: 1.0 / (high - low),
        offset: -low / (high - low),
        p_lo_value: low,
        p_hi_value: high,
    };
    let opts = StitchOptions {
        plan: TilePlan::new(vol.dims, CORE, DEFAULT_OVERLAP, RECEPTIVE_RADIUS).unwrap(),
        normalize: NormalizeMode::Global,
        percentiles: model.config.norm_percentiles,
        rescale_output: true,
        variant: model.config.variant,
    };
    let mut src = MemorySource {
        dims: vol.dims,
        data: &vol.data,
    };
    let mut sink = MemorySink { data: Vec::new() };
    let mut views: Vec<&mut dyn PlaneSource> = vec![&mut src];
    run_tiled(
        &mut CpuPredictor { model: model.clone() },
        &mut views,
        &[aff],
        &mut sink,
        &opts,
        &mut |_, _| {},
    )
    .unwrap();
    sink.data
}

/// `infer_file` (the streamed `infer`) of `vol` as a TIFF with the model `model`.
fn streamed(dir: &Path, name: &str, model: &Model<f32>, vol: &Volume, percentiles: Option<[f64; 2]>) -> Vec<f32> {
    let (m, input, output) = (
        dir.join(format!("{name}.safetensors")),
        dir.join(format!("{name}.in.tif")),
        dir.join(format!("{name}.out.tif")),
    );
    model.save(&m).unwrap();
    write_volume(&input, vol, OutputDtype::F32).unwrap();
    let mut opts = InferFileOptions::new(m, input, output.clone());
    opts.tile = Some([8, 24, 24]);
    opts.percentiles = percentiles;
    infer_file(&opts).unwrap();
    read_volume(&output).unwrap().data
}

#[test]
fn fixed_values_at_the_volumes_percentiles_equal_percentile_inference_and_scaling_shows_them() {
    let dir = tempfile::tempdir().unwrap();
    let dims = [12, 40, 48];
    let vol = test_volume(dims, 91);
    let (pct_model, fixed_model, f) = models_for(&vol);

    // on the volume the values came from, both normalizations are one map
    let reference = in_memory(&pct_model, &vol);
    let e = rel_l2(&in_memory(&fixed_model, &vol), &reference);
    assert!(e <= 1e-6, "in memory: fixed vs percentile model rel L2 {e:e}");
    let e = rel_l2(&streamed(dir.path(), "fixed", &fixed_model, &vol, None), &reference);
    assert!(e <= 1e-6, "streamed: fixed vs percentile model rel L2 {e:e}");

    // three times brighter: the percentile model is scale-invariant, the fixed model maps
    // 3v to 3·(v − low)/(high − low) + 2·low/(high − low), which the network sees
    let bright = vol.like(vol.data.iter().map(|v| 3.0 * v).collect()).unwrap();
    let pct3 = in_memory(&pct_model, &bright);
    let three_ref: Vec<f32> = reference.iter().map(|v| 3.0 * v).collect();
    let e = rel_l2(&pct3, &three_ref);
    assert!(e <= 1e-5, "the percentile model is not scale-invariant here: {e:e}");
    let fixed3 = in_memory(&fixed_model, &bright);
    let oracle = by_hand(&fixed_model, &bright, f.low, f.high);
    let e = rel_l2(&fixed3, &oracle);
    assert!(
        e <= 1e-6,
        "in memory on 3v: fixed model vs the hand-built map, rel L2 {e:e}"
    );
    let moved = rel_l2(&fixed3, &pct3);
    eprintln!("on 3v: fixed model vs percentile model rel L2 {moved:.3}");
    assert!(moved > 0.05, "the fixed values had no effect on 3v: rel L2 {moved:e}");
    // the streamed path agrees with the in-memory one
    let s3 = streamed(dir.path(), "fixed3", &fixed_model, &bright, None);
    let e = rel_l2(&s3, &fixed3);
    assert!(e <= 1e-6, "on 3v: streamed vs in-memory fixed model rel L2 {e:e}");
    // the library's buffer entry normalizes the same way
    let aff = rln_engine::infer::buffers::global_normalization(&fixed_model, dims, &bright.data).unwrap();
    assert_eq!(aff, Affine::two_point(f.low, f.high));
}

#[test]
fn percentiles_given_at_inference_replace_the_fixed_normalization() {
    let dir = tempfile::tempdir().unwrap();
    let dims = [12, 40, 48];
    let vol = test_volume(dims, 93);
    let pct_model = Model::<f32>::load(Path::new(MODEL)).unwrap();
    // fixed values far from the volume's percentiles, so that keeping them would show
    let mut fixed_model = pct_model.clone();
    fixed_model.config.norm_fixed = Some(fixed(20.0, 3000.0, 0.0, 1.0));
    let pct = [0.5, 99.0];
    let mut own = pct_model.clone();
    own.config.norm_percentiles = pct;
    let reference = in_memory(&own, &vol);
    // the library (infer_file)
    let got = streamed(dir.path(), "lib", &fixed_model, &vol, Some(pct));
    let e = rel_l2(&got, &reference);
    assert!(
        e <= 1e-6,
        "infer_file --percentiles on a fixed model vs the percentile model: {e:e}"
    );
    let kept = rel_l2(&streamed(dir.path(), "kept", &fixed_model, &vol, None), &reference);
    assert!(kept > 0.05, "the fixed values must matter on this volume: {kept:e}");
    // the CLI
    let (m, input, out) = (
        dir.path().join("lib.safetensors"),
        dir.path().join("lib.in.tif"),
        dir.path().join("cli.tif"),
    );
    let o = engine(&[
        &"infer",
        &m,
        &input,
        &"-o",
        &out,
        &"--device",
        &"cpu",
        &"--tile",
        &"16,24,24",
        &"--percentiles",
        &"0.5,99",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let e = rel_l2(&read_volume(&out).unwrap().data, &reference);
    assert!(
        e <= 1e-6,
        "infer --percentiles on a fixed model vs the percentile model: {e:e}"
    );
}

// ------------------------------------------------------------------ the CLI's errors

/// A Gaussian PSF sampled like the synthetic raw volumes (0.2 / 0.1 µm).
fn test_psf() -> Volume {
    rln_engine::imaging::psf::generate(&rln_engine::imaging::psf::PsfSpec::Gaussian(
        rln_engine::imaging::psf::GaussianPsf::from_fwhm([0.6, 0.25, 0.25], [0.2, 0.1, 0.1], Some([9, 9, 9])),
    ))
    .unwrap()
}

const TINY_TRAIN: [&str; 14] = [
    "train",
    "--steps",
    "2",
    "--epoch-steps",
    "1",
    "--batch",
    "1",
    "--crop",
    "16",
    "--synth-count",
    "1",
    "--synth-val-count",
    "0",
    "--device=cpu",
];

fn tiny_train(dir: &Path, extra: &[&dyn AsRef<OsStr>]) -> Output {
    let psf = dir.join("psf.tif");
    if !psf.exists() {
        write_volume(&psf, &test_psf(), OutputDtype::F32).unwrap();
    }
    let mut args: Vec<&dyn AsRef<OsStr>> = TINY_TRAIN.iter().map(|a| a as &dyn AsRef<OsStr>).collect();
    args.extend_from_slice(&[&"--synth-psf", &psf]);
    args.extend_from_slice(extra);
    engine(&args)
}

/// Failed, with every `words` in its message, without a panic and without `output`.
fn assert_clear_error(o: &Output, words: &[&str], output: &Path) {
    let err = stderr(o);
    assert!(!o.status.success(), "succeeded: {err}");
    assert!(!err.contains("panicked"), "{err}");
    for w in words {
        assert!(err.contains(w), "no {w:?} in: {err}");
    }
    assert!(!output.exists(), "{} was left", output.display());
}

#[test]
fn cli_refuses_fixed_norm_misuse_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let out = d.join("m.safetensors");
    // `like` needs the --like raw volume
    let o = tiny_train(
        d,
        &[&"--synth-size", &"16,32,32", &"--fixed-norm", &"like", &"-o", &out],
    );
    assert_clear_error(&o, &["--fixed-norm like", "--like RAW"], &out);
    assert!(
        !stderr(&o).contains("making"),
        "refused only after making data: {}",
        stderr(&o)
    );
    // LO ≥ HI and malformed values: the parser refuses them
    for bad in ["5,3", "4,4", "abc", "1,nan"] {
        let o = tiny_train(d, &[&"--synth-size", &"16,32,32", &"--fixed-norm", &bad, &"-o", &out]);
        assert_clear_error(&o, &["--fixed-norm"], &out);
        assert_eq!(o.status.code(), Some(2), "{bad}: {}", stderr(&o));
    }
    let o = tiny_train(d, &[&"--synth-size", &"16,32,32", &"--fixed-norm", &"5,3", &"-o", &out]);
    assert!(stderr(&o).contains("LO < HI"), "{}", stderr(&o));
    // a resumed run keeps its checkpoint's normalization: the flag would be ignored
    let ck = d.join("run.ckpt.safetensors");
    let o = tiny_train(
        d,
        &[
            &"--synth-size",
            &"16,32,32",
            &"--fixed-norm",
            &"1,9",
            &"--resume",
            &ck,
            &"-o",
            &out,
        ],
    );
    assert_clear_error(&o, &["--fixed-norm", "--resume"], &out);
    // per-tile normalization contradicts fixed values
    let vol = test_volume([8, 24, 24], 95);
    let (input, result) = (d.join("in.tif"), d.join("out.tif"));
    write_volume(&input, &vol, OutputDtype::F32).unwrap();
    let mut m = Model::<f32>::load(Path::new(MODEL)).unwrap();
    m.config.norm_fixed = Some(fixed(100.0, 900.0, 0.0, 1.0));
    m.save(&d.join("fixed.safetensors")).unwrap();
    let fixed_model = d.join("fixed.safetensors");
    let per_tile = |extra: &[&dyn AsRef<OsStr>]| {
        let mut args: Vec<&dyn AsRef<OsStr>> = vec![
            &"infer",
            &fixed_model,
            &input,
            &"-o",
            &result,
            &"--device",
            &"cpu",
            &"--normalize",
            &"per-tile",
        ];
        args.extend_from_slice(extra);
        engine(&args)
    };
    let o = per_tile(&[]);
    assert_clear_error(&o, &["--normalize per-tile", "fixed", "--percentiles"], &result);
    // ... unless --percentiles replaces them
    let o = per_tile(&[&"--percentiles", &"0.01,99.5"]);
    assert!(o.status.success(), "{}", stderr(&o));
}

// ------------------------------------------------------------------ train --like

#[test]
fn train_like_records_the_raw_volumes_percentiles_and_camera() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let psf = test_psf();
    // a raw volume of a camera with offset 100 ADU and gain 2 ADU/photon
    let sc = rln_engine::imaging::synth::SynthConfig {
        size: [16, 64, 64],
        photons: 5.0,
        read_noise: 1.6,
        ..Default::default()
    };
    let (mut raw, _) = rln_engine::imaging::synth::make_pair(&sc, &psf, 17).unwrap();
    raw.data.iter_mut().for_each(|v| *v = 100.0 + 2.0 * *v);
    let raw_path = d.join("raw.tif");
    write_volume(&raw_path, &raw, OutputDtype::F32).unwrap();
    let out = d.join("m.safetensors");
    let o = tiny_train(
        d,
        &[
            &"--synth-size",
            &"16,32,32",
            &"--like",
            &raw_path,
            &"--fixed-norm",
            &"like",
            &"--percentiles",
            &"1,99.8",
            &"-o",
            &out,
        ],
    );
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    let m = Model::<f32>::load(&out).unwrap();
    let f = m.config.norm_fixed.expect("no norm_fixed recorded");
    assert_eq!(m.config.norm_percentiles, [1.0, 99.8]);
    // low/high: the raw volume's numpy-style percentiles at the model's percentiles
    let raw_read = read_volume(&raw_path).unwrap();
    let p = percentiles(&raw_read.data, &m.config.norm_percentiles).unwrap();
    assert!(
        (f.low - p[0]).abs() <= 1e-9 * p[0].abs() && (f.high - p[1]).abs() <= 1e-9 * p[1].abs(),
        "recorded {}..{}, percentiles of the raw {p:?}",
        f.low,
        f.high
    );
    // the camera: the --like estimate recorded with it (and that estimate is the raw's)
    let est = &m.config.training.as_ref().unwrap()["like"]["estimate"];
    let (offset, gain) = (est["offset"].as_f64().unwrap(), est["gain"].as_f64().unwrap());
    assert!(
        (f.camera_offset - offset).abs() <= 1e-9 * offset.abs(),
        "{f:?} vs {est}"
    );
    assert!((f.camera_gain - gain).abs() <= 1e-9 * gain, "{f:?} vs {est}");
    let e = rln_engine::imaging::acquisition::estimate(&raw_read).unwrap();
    assert!((e.gain - gain).abs() <= 1e-9 * gain && (e.offset - offset).abs() <= 1e-9 * offset.abs());
    assert!((gain - 2.0).abs() < 0.3, "gain estimate {gain} (truth 2)");
    // the training crops were normalized in photons: low/high back through that camera
    let tf: FixedNorm = serde_json::from_value(m.config.training.as_ref().unwrap()["fixed_norm"].clone()).unwrap();
    let want = [(f.low - offset) / gain, (f.high - offset) / gain];
    assert!(
        (tf.low - want[0]).abs() <= 1e-9 * (1.0 + want[0].abs()) && (tf.high - want[1]).abs() <= 1e-9 * want[1].abs(),
        "training inputs {tf:?}, want {want:?}"
    );
    assert_eq!((tf.camera_offset, tf.camera_gain), (0.0, 1.0));
    // and printed
    assert!(err.contains("input normalization: fixed"), "{err}");
    assert!(err.contains(&format!("{:.4}..{:.4}", f.low, f.high)), "{err}");
}

// ------------------------------------------------------------------ compare

/// `compare` on the same held-out volumes with `model`, then `extra` flags: its report.
fn compare_report(model: &Path, extra: &[&str]) -> serde_json::Value {
    let mut args: Vec<&dyn AsRef<OsStr>> = vec![
        &"compare",
        &"--model",
        &model,
        &"--size",
        &"34,66,66",
        &"--count",
        &"1",
        &"--rl-min",
        &"1",
        &"--rl-max",
        &"2",
        &"--device",
        &"cpu",
        &"--json",
    ];
    args.extend(extra.iter().map(|a| a as &dyn AsRef<OsStr>));
    let o = engine(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    serde_json::from_slice(&o.stdout).unwrap()
}

fn rln_psnr(report: &serde_json::Value) -> f64 {
    report["rows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["method"] == "RLN")
        .unwrap()["psnr"]
        .as_f64()
        .unwrap()
}

/// compare's volumes are in photons: a model whose fixed values are in a camera's raw
/// units scores as the same model with those values taken back through the camera, and
/// `--percentiles` scores as the percentile model.
#[test]
fn compare_takes_fixed_values_through_the_camera_and_percentiles_replace_them() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let shipped = Model::<f32>::load(Path::new(MODEL)).unwrap();
    let (lo, hi) = (20.0, 400.0); // photons
    let save = |name: &str, f: Option<FixedNorm>| {
        let mut m = shipped.clone();
        m.config.norm_fixed = f;
        m.save(&d.join(name)).unwrap();
        d.join(name)
    };
    // a camera of offset 100 ADU, gain 2 ADU/photon (exact in binary, so both are one map)
    let raw_units = save(
        "raw.safetensors",
        Some(fixed(100.0 + 2.0 * lo, 100.0 + 2.0 * hi, 100.0, 2.0)),
    );
    let photons = save("photons.safetensors", Some(fixed(lo, hi, 0.0, 1.0)));
    let (a, b) = (compare_report(&raw_units, &[]), compare_report(&photons, &[]));
    let reported: FixedNorm = serde_json::from_value(a["rln_fixed_norm"].clone()).unwrap();
    assert_eq!(reported, fixed(lo, hi, 0.0, 1.0));
    assert!(
        (rln_psnr(&a) - rln_psnr(&b)).abs() <= 1e-9,
        "raw-unit model {} dB vs photon model {} dB",
        rln_psnr(&a),
        rln_psnr(&b)
    );
    let pct_model = save("pct.safetensors", None);
    let p = compare_report(&pct_model, &[]);
    assert!(p.get("rln_fixed_norm").is_none(), "{p}");
    eprintln!(
        "RLN PSNR: fixed {:.3} dB, percentiles {:.3} dB",
        rln_psnr(&a),
        rln_psnr(&p)
    );
    assert!(
        (rln_psnr(&a) - rln_psnr(&p)).abs() > 0.05,
        "the fixed values must matter here"
    );
    let pct = shipped.config.norm_percentiles;
    let over = compare_report(&raw_units, &["--percentiles", &format!("{},{}", pct[0], pct[1])]);
    assert!(over.get("rln_fixed_norm").is_none(), "{over}");
    assert!((rln_psnr(&over) - rln_psnr(&p)).abs() <= 1e-9);
}

/// With fixed values nothing is sampled, yet a non-finite input voxel is still an error
/// (in memory and streamed), not a NaN output.
#[test]
fn a_non_finite_input_is_refused_by_a_fixed_model() {
    let dir = tempfile::tempdir().unwrap();
    let mut vol = test_volume([12, 40, 48], 97);
    vol.data[5 * 40 * 48 + 17 * 48 + 30] = f32::NAN;
    let mut m = Model::<f32>::load(Path::new(MODEL)).unwrap();
    m.config.norm_fixed = Some(fixed(100.0, 900.0, 0.0, 1.0));
    let e = deconvolve(&mut CpuPredictor { model: m.clone() }, &m, &vol, CORE).unwrap_err();
    assert!(e.to_string().contains("non-finite"), "{e}");
    let (model, input, output) = (
        dir.path().join("m.safetensors"),
        dir.path().join("in.tif"),
        dir.path().join("out.tif"),
    );
    m.save(&model).unwrap();
    {
        // (write_volume refuses NaN: the pages written directly)
        use tiff::encoder::{colortype, TiffEncoder};
        let mut enc = TiffEncoder::new(std::fs::File::create(&input).unwrap()).unwrap();
        let plane = 40 * 48;
        for z in 0..12 {
            enc.write_image::<colortype::Gray32Float>(48, 40, &vol.data[z * plane..(z + 1) * plane])
                .unwrap();
        }
    }
    let e = infer_file(&InferFileOptions::new(model, input, output.clone())).unwrap_err();
    assert!(e.to_string().contains("(5, 17, 30) is NaN"), "{e}");
    assert!(!output.exists());
}

/// Fixed values with HIGH < 2·LOW, where the §6 percentile map would divide by HIGH only:
/// the streamed path still maps (v − low)/(high − low), as the hand-built map does.
#[test]
fn streamed_fixed_values_keep_their_two_point_map_where_percentiles_would_not() {
    let dir = tempfile::tempdir().unwrap();
    let vol = test_volume([12, 40, 48], 99);
    let mut m = Model::<f32>::load(Path::new(MODEL)).unwrap();
    let (low, high) = (500.0, 900.0);
    m.config.norm_fixed = Some(fixed(low, high, 0.0, 1.0));
    let oracle = by_hand(&m, &vol, low, high);
    let e = rel_l2(&streamed(dir.path(), "f", &m, &vol, None), &oracle);
    assert!(e <= 1e-6, "streamed vs the hand-built map rel L2 {e:e}");
    let e = rel_l2(&in_memory(&m, &vol), &oracle);
    assert!(e <= 1e-6, "in memory vs the hand-built map rel L2 {e:e}");
}

//! Training: exact resume, determinism, the checkpoint format, and the errors raised
//! before any work starts.

mod common;

use rln_engine::imaging::io::{write_volume, OutputDtype};
use rln_engine::imaging::volume::Volume;
use rln_engine::model::{Model, ModelConfig, Variant};
use rln_engine::train::data::{CropSampler, Dataset, Pair, SynthVariation};
use rln_engine::train::trainer::{self, TrainConfig, TrainObserver, TrainState};
use std::ffi::OsStr;
use std::path::Path;
use std::process::{Command, Output};

/// Runs the engine binary with `args` (strings and paths) and returns its exit status
/// and output.
fn engine(args: &[&dyn AsRef<OsStr>]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_rln-engine"))
        .args(args.iter().map(|a| a.as_ref()))
        .output()
        .unwrap()
}

/// `train` on DIR's pairs with batch 1 and 16³ crops (the CLI tests' tiny run), then
/// `extra` flags.
fn tiny_train(data: &Path, steps: &str, out: &Path, extra: &[&dyn AsRef<OsStr>]) -> Output {
    let mut args: Vec<&dyn AsRef<OsStr>> = vec![
        &"train", &"--steps", &steps, &"--batch", &"1", &"--crop", &"16", &"--data", &data, &"-o", &out,
    ];
    args.extend_from_slice(extra);
    engine(&args)
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Writes one training pair as `train --data` reads it: `dir/input/NAME.tif`
/// (`dir/input2/NAME.tif` for a second view) and `dir/ground_truth/NAME.tif`.
fn write_pair(dir: &Path, name: &str, inputs: &[&Volume], ground_truth: &Volume) {
    let file = format!("{name}.tif");
    for (v, sub) in inputs.iter().zip(["input", "input2"]) {
        std::fs::create_dir_all(dir.join(sub)).unwrap();
        write_volume(dir.join(sub).join(&file), v, OutputDtype::F32).unwrap();
    }
    std::fs::create_dir_all(dir.join("ground_truth")).unwrap();
    write_volume(dir.join("ground_truth").join(&file), ground_truth, OutputDtype::F32).unwrap();
}

fn blob_volume(seed: u64, dims: [usize; 3], noise: f32) -> (Volume, Volume) {
    let mut r = common::rng(seed);
    use rand::Rng;
    let n = dims[0] * dims[1] * dims[2];
    let mut gt = vec![10.0f32; n];
    for _ in 0..12 {
        let c = [
            r.random_range(0..dims[0]),
            r.random_range(0..dims[1]),
            r.random_range(0..dims[2]),
        ];
        let a: f32 = r.random_range(100.0..500.0);
        for z in 0..dims[0] {
            for y in 0..dims[1] {
                for x in 0..dims[2] {
                    let d2 = (z as f32 - c[0] as f32).powi(2)
                        + (y as f32 - c[1] as f32).powi(2)
                        + (x as f32 - c[2] as f32).powi(2);
                    gt[(z * dims[1] + y) * dims[2] + x] += a * (-d2 / 4.0).exp();
                }
            }
        }
    }
    let input: Vec<f32> = gt.iter().map(|&g| g * 0.7 + r.random_range(0.0..noise)).collect();
    (Volume::new(dims, input).unwrap(), Volume::new(dims, gt).unwrap())
}

fn dataset(n: usize, dims: [usize; 3]) -> Dataset {
    Dataset {
        pairs: (0..n)
            .map(|i| {
                let (x, g) = blob_volume(i as u64 + 1, dims, 20.0);
                Pair::new(format!("p{i}"), vec![x], g).unwrap()
            })
            .collect(),
    }
}

fn small_cfg(steps: u64) -> TrainConfig {
    TrainConfig {
        steps,
        epoch_steps: 2,
        sampler: CropSampler {
            crop: [16, 16, 16],
            batch: 2,
            ..CropSampler::default()
        },
        seed: 5,
        val_crop: [24, 24, 24],
        ..TrainConfig::default()
    }
}

struct Ckpt {
    path: std::path::PathBuf,
    data: Vec<(String, [usize; 3])>,
    count: usize,
}
impl TrainObserver for Ckpt {
    fn on_checkpoint(&mut self, s: &TrainState, c: &TrainConfig) -> rln_engine::Result<()> {
        self.count += 1;
        trainer::save_checkpoint(&self.path, s, c, &self.data)
    }
}

#[test]
fn killed_and_resumed_run_ends_with_the_same_weights() {
    let data = dataset(3, [24, 24, 24]);
    let cfg = small_cfg(6);
    let model = Model::<f32>::init(ModelConfig::default(), 5);
    let dir = tempfile::tempdir().unwrap();

    let mut straight = TrainState::new(model.clone(), &cfg);
    let mut obs = Ckpt {
        path: dir.path().join("a.ckpt"),
        data: data.fingerprint(),
        count: 0,
    };
    trainer::train(&mut straight, &cfg, &data, Some(&data), 2, None, &mut obs).unwrap();
    assert_eq!(straight.step, 6);
    assert_eq!(obs.count, 3, "a checkpoint every 2 steps");

    // "killed" after 3 steps: only the checkpoint survives
    let mut first = TrainState::new(model, &cfg);
    let mut obs = Ckpt {
        path: dir.path().join("b.ckpt"),
        data: data.fingerprint(),
        count: 0,
    };
    trainer::train(&mut first, &cfg, &data, None, 2, Some(3), &mut obs).unwrap();
    assert_eq!(first.step, 3);
    drop(first);
    let (mut resumed, cfg2, fp) = trainer::load_checkpoint(&dir.path().join("b.ckpt")).unwrap();
    assert_eq!(resumed.step, 3);
    assert_eq!(cfg2, cfg);
    assert_eq!(fp, data.fingerprint());
    trainer::train(&mut resumed, &cfg2, &data, None, 2, None, &mut obs).unwrap();
    assert_eq!(resumed.step, 6);
    assert_eq!(
        resumed.model, straight.model,
        "resumed weights differ from the uninterrupted run"
    );
    assert_eq!(resumed.adam, straight.adam);
    // the checkpoint is also a loadable model file
    let m = Model::<f32>::load(&dir.path().join("a.ckpt")).unwrap();
    assert_eq!(m, straight.model);
}

/// The CPU training loop on the backend's resident state (issue 16) is today's host
/// arithmetic, bit for bit: three steps of `train` equal the former loop written out
/// here (forward with batch statistics, loss, host gradients, `Adam::update` in f64,
/// `update_running_stats`) in weights, running statistics, Adam's moments and counters.
#[test]
fn cpu_training_equals_the_former_host_optimizer_bit_for_bit() {
    use rln_engine::backend::cpu::CpuBackend;
    use rln_engine::backend::Backend;
    use rln_engine::net::{update_running_stats, BnMode, Rln};
    let data = dataset(2, [20, 20, 20]);
    let cfg = small_cfg(3);
    let model = Model::<f32>::init(ModelConfig::default(), 9);
    struct Nop;
    impl TrainObserver for Nop {}
    let mut now = TrainState::new(model.clone(), &cfg);
    trainer::train(&mut now, &cfg, &data, None, 0, None, &mut Nop).unwrap();

    let b = CpuBackend::<f32>::new();
    let mut former = TrainState::new(model.clone(), &cfg);
    for step in 0..3 {
        let batch = cfg.sampler.batch(&data, Variant::Single, step, cfg.seed).unwrap();
        let net = Rln::new(&b, &former.model);
        let fwd = net.forward(&batch.input, BnMode::Batch, true).unwrap();
        let (_, dy, de) = b
            .loss(&fwd.prediction, &fwd.e1_raw, &batch.input, &batch.ground_truth)
            .unwrap();
        let grads = net.backward(&fwd, &dy, &de, cfg.grad_mode).unwrap();
        let stats = fwd.batch_stats;
        former.adam.update(&mut former.model.params, &grads);
        update_running_stats(&mut former.model, &stats);
        former.step += 1;
    }
    assert_ne!(former.model, model);
    assert_eq!(now, former, "weights, statistics, moments or counters differ");
}

#[test]
fn training_reduces_the_loss_and_changes_running_statistics() {
    let data = dataset(2, [24, 24, 24]);
    let mut cfg = small_cfg(30);
    cfg.schedule.base = 0.01;
    let mut st = TrainState::new(Model::<f32>::init(ModelConfig::default(), 1), &cfg);
    let before = trainer::validate(&st.model, &data, &cfg).unwrap();
    let r0 = st.model.running.clone();
    struct Nop;
    impl TrainObserver for Nop {}
    trainer::train(&mut st, &cfg, &data, None, 0, None, &mut Nop).unwrap();
    let after = trainer::validate(&st.model, &data, &cfg).unwrap();
    assert!(
        after.loss < before.loss,
        "validation loss {} → {}",
        before.loss,
        after.loss
    );
    assert_ne!(st.model.running, r0);
}

#[test]
fn bad_training_data_is_rejected_before_training() {
    let dims = [24, 24, 24];
    let (x, g) = blob_volume(1, dims, 5.0);
    // constant volume
    let flat = Volume::new(dims, vec![3.0; 24 * 24 * 24]).unwrap();
    let e = Pair::new("flat".into(), vec![x.clone()], flat).unwrap_err().to_string();
    assert!(e.contains("constant"), "{e}");
    // NaN voxel
    let mut nan = x.clone();
    nan.data[100] = f32::NAN;
    assert!(Pair::new("nan".into(), vec![nan], g.clone()).is_err());
    // shape mismatch
    let (x2, _) = blob_volume(2, [24, 24, 20], 5.0);
    let e = Pair::new("mm".into(), vec![x2], g.clone()).unwrap_err().to_string();
    assert!(e.contains("mm"), "{e}");
    // smaller than the crop
    let d = Dataset {
        pairs: vec![Pair::new("small".into(), vec![x.clone()], g.clone()).unwrap()],
    };
    let e = d.check_crop([32, 16, 16]).unwrap_err().to_string();
    assert!(e.contains("small") && e.contains("crop"), "{e}");

    // unpaired files in a folder, through the CLI: non-zero exit, no output
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write_pair(d, "a", &[&x], &g);
    write_volume(d.join("input/b.tif"), &x, OutputDtype::F32).unwrap();
    let train = |out: &Path| engine(&[&"train", &"--steps", &"2", &"--crop", &"16", &"--data", &d, &"-o", &out]);
    let out = d.join("m.safetensors");
    let o = train(&out);
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(err.contains("unpaired") && err.contains("b.tif"), "{err}");
    assert!(!out.exists());
    // output folder that does not exist
    let o = train(Path::new("/nonexistent-rln-dir/m.safetensors"));
    assert!(!o.status.success());
    assert!(stderr(&o).contains("does not exist"));
}

#[test]
fn cli_train_stop_and_resume_matches_a_straight_run() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for i in 0..2 {
        let (x, g) = blob_volume(10 + i, [20, 20, 20], 10.0);
        write_pair(d, &format!("v{i}"), &[&x], &g);
    }
    let run = |extra: &[&str], out: &str| {
        let mut flags: Vec<&dyn AsRef<OsStr>> = vec![&"--threads", &"2", &"--epoch-steps", &"2"];
        flags.extend(extra.iter().map(|a| a as &dyn AsRef<OsStr>));
        let o = tiny_train(d, "4", &d.join(out), &flags);
        assert!(o.status.success(), "{}", stderr(&o));
    };
    run(&["--keep-checkpoints"], "straight.safetensors");
    run(&["--stop-after", "2"], "resumed.safetensors");
    assert!(
        !d.join("resumed.safetensors").exists(),
        "a stopped run must not write the final model"
    );
    assert!(d.join("resumed.ckpt.safetensors").exists());
    let ck = d.join("resumed.ckpt.safetensors");
    // --keep-checkpoints kept each checkpoint's model (every epoch of 2 steps): step 2
    // is the stopped run's checkpoint, step 4 the final model
    let at2 = Model::<f32>::load(&d.join("straight.step00002.safetensors")).unwrap();
    let stopped = Model::<f32>::load(&ck).unwrap();
    assert_eq!(at2.params, stopped.params);
    assert_eq!(at2.running, stopped.running);
    assert!(
        at2.config.provenance.ends_with("(its weights at step 2)"),
        "{}",
        at2.config.provenance
    );
    assert!(
        !d.join("resumed.step00002.safetensors").exists(),
        "kept only when asked"
    );
    run(&["--resume", ck.to_str().unwrap()], "resumed.safetensors");
    let a = Model::<f32>::load(&d.join("straight.safetensors")).unwrap();
    let b = Model::<f32>::load(&d.join("resumed.safetensors")).unwrap();
    assert_eq!(a.params, b.params);
    assert_eq!(a.running, b.running);
    let at4 = Model::<f32>::load(&d.join("straight.step00004.safetensors")).unwrap();
    assert_eq!(at4.params, a.params);
    // the JSON-lines log has one line per step of each run
    let log = std::fs::read_to_string(d.join("straight.log.jsonl")).unwrap();
    assert_eq!(log.lines().filter(|l| l.contains("\"loss\"")).count(), 4);
    let _ = Variant::Single;
}

/// `--precision`: the checkpoint and the model's training record keep it; mixed is a
/// CUDA option, so the CPU refuses it, also when a mixed checkpoint is resumed without
/// `--precision fp32`; with it, the run continues in FP32 with a notice.
#[test]
fn cli_train_records_the_precision_and_refuses_mixed_on_the_cpu() {
    use rln_engine::backend::TrainPrecision;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (x, g) = blob_volume(30, [20, 20, 20], 10.0);
    write_pair(d, "v0", &[&x], &g);
    let run = |extra: &[&str], out: &str| {
        let mut flags: Vec<&dyn AsRef<OsStr>> = vec![&"--threads", &"2", &"--epoch-steps", &"2"];
        flags.extend(extra.iter().map(|a| a as &dyn AsRef<OsStr>));
        tiny_train(d, "4", &d.join(out), &flags)
    };
    let o = run(&["--precision", "mixed"], "m.safetensors");
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("--precision mixed is a CUDA option"),
        "{}",
        stderr(&o)
    );
    assert!(!d.join("m.safetensors").exists() && !d.join("m.ckpt.safetensors").exists());

    let o = run(&["--stop-after", "2"], "m.safetensors");
    assert!(o.status.success(), "{}", stderr(&o));
    let ck = d.join("m.ckpt.safetensors");
    let (state, mut cfg, fp) = trainer::load_checkpoint(&ck).unwrap();
    assert_eq!(cfg.precision, TrainPrecision::Fp32, "recorded in the checkpoint");
    // the same checkpoint as a mixed-precision run (on a GPU) would have written it
    cfg.precision = TrainPrecision::Mixed;
    trainer::save_checkpoint(&ck, &state, &cfg, &fp).unwrap();
    assert_eq!(
        trainer::load_checkpoint(&ck).unwrap().1.precision,
        TrainPrecision::Mixed
    );
    let o = run(&["--resume", ck.to_str().unwrap()], "m.safetensors");
    assert!(!o.status.success(), "a mixed checkpoint resumed on the CPU");
    assert!(stderr(&o).contains("--precision fp32"), "{}", stderr(&o));
    let o = run(
        &["--resume", ck.to_str().unwrap(), "--precision", "fp32"],
        "m.safetensors",
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("trained with --precision mixed; continuing with --precision fp32"),
        "{}",
        stderr(&o)
    );
    let m = Model::<f32>::load(&d.join("m.safetensors")).unwrap();
    assert_eq!(m.config.training.as_ref().unwrap()["precision"], "fp32");
    assert_eq!(trainer::load_checkpoint(&ck).unwrap().1.precision, TrainPrecision::Fp32);
}

/// Issue 14: with --reproducible identical runs, and a resumed run and the same run
/// uninterrupted, write byte-identical model files (`cmp` verifies a resume); a resumed
/// run's log holds every step once, even when the killed run logged steps after its last
/// checkpoint; a fresh run into the same -o starts a fresh log.
#[test]
fn cli_train_reproducible_models_are_byte_identical_and_logs_never_repeat_steps() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (x, g) = blob_volume(31, [20, 20, 20], 10.0);
    write_pair(d, "v", &[&x], &g);
    let run = |extra: &[&str], out: &str| {
        let mut flags: Vec<&dyn AsRef<OsStr>> = vec![&"--threads", &"2", &"--epoch-steps", &"2", &"--reproducible"];
        flags.extend(extra.iter().map(|a| a as &dyn AsRef<OsStr>));
        let o = tiny_train(d, "4", &d.join(out), &flags);
        assert!(o.status.success(), "{}", stderr(&o));
    };
    let steps_logged = |log: &str| -> Vec<u64> {
        std::fs::read_to_string(d.join(log))
            .unwrap()
            .lines()
            .filter(|l| l.contains("\"loss\""))
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["step"]
                    .as_u64()
                    .unwrap()
            })
            .collect()
    };
    run(&[], "a.safetensors");
    run(&[], "b.safetensors");
    let a = std::fs::read(d.join("a.safetensors")).unwrap();
    assert!(
        a == std::fs::read(d.join("b.safetensors")).unwrap(),
        "two identical runs differ in bytes"
    );
    // stopped at step 2 (checkpoint), then as if killed during step 3: its line is logged
    run(&["--stop-after", "2"], "r.safetensors");
    let mut log = std::fs::read_to_string(d.join("r.log.jsonl")).unwrap();
    log.push_str("{\"step\":3,\"loss\":0.5,\"mse\":0.1,\"lr\":0.01}\n");
    std::fs::write(d.join("r.log.jsonl"), log).unwrap();
    run(
        &["--resume", d.join("r.ckpt.safetensors").to_str().unwrap()],
        "r.safetensors",
    );
    assert!(
        a == std::fs::read(d.join("r.safetensors")).unwrap(),
        "the resumed run's model differs in bytes"
    );
    assert_eq!(
        steps_logged("r.log.jsonl"),
        [1, 2, 3, 4],
        "the resumed log repeats or misses steps"
    );
    // a fresh run into the same output does not append to the old log
    run(&[], "a.safetensors");
    assert_eq!(steps_logged("a.log.jsonl"), [1, 2, 3, 4]);
    assert!(a == std::fs::read(d.join("a.safetensors")).unwrap());
}

#[test]
fn prefetching_batches_on_a_thread_gives_the_same_run() {
    use rln_engine::backend::cpu::CpuBackend;
    let data = dataset(2, [24, 24, 24]);
    let cfg = small_cfg(4);
    let model = Model::<f32>::init(ModelConfig::default(), 8);
    struct Nop;
    impl TrainObserver for Nop {}
    let b = CpuBackend::<f32>::new();
    let mut plain = TrainState::new(model.clone(), &cfg);
    trainer::train_on(&b, false, &mut plain, &cfg, &data, Some(&data), 0, None, &mut Nop).unwrap();
    let mut pre = TrainState::new(model, &cfg);
    trainer::train_on(&b, true, &mut pre, &cfg, &data, Some(&data), 0, None, &mut Nop).unwrap();
    assert_eq!(pre, plain);
    // stopping early (as after an error) ends the batch thread too
    let mut short = TrainState::new(Model::<f32>::init(ModelConfig::default(), 8), &cfg);
    trainer::train_on(&b, true, &mut short, &cfg, &data, None, 0, Some(1), &mut Nop).unwrap();
    assert_eq!(short.step, 1);
}

#[test]
fn cli_train_on_cuda_without_a_gpu_fails_before_training() {
    if rln_engine::backend::cuda::available() {
        println!("skipped: a CUDA device is present (tests/gpu_train.rs and the GPU check cover it)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (x, g) = blob_volume(3, [20, 20, 20], 10.0);
    write_pair(d, "v", &[&x], &g);
    let run = |device: &str| {
        tiny_train(
            d,
            "1",
            &d.join(format!("{device}.safetensors")),
            &[&"--device", &device],
        )
    };
    let o = run("cuda");
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(err.contains("--device cuda") && err.contains("--device cpu"), "{err}");
    assert!(!d.join("cuda.safetensors").exists());
    // auto falls back to the CPU with a notice
    let o = run("auto");
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("no CUDA device"));
    assert!(d.join("auto.safetensors").exists());
}

#[test]
fn cli_dual_view_train_and_infer() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (x, g) = blob_volume(21, [20, 20, 20], 10.0);
    let (x2, _) = blob_volume(22, [20, 20, 20], 10.0);
    write_pair(d, "v", &[&x, &x2], &g);
    let (view1, view2) = (d.join("input/v.tif"), d.join("input2/v.tif"));
    for variant in ["dual-concat", "dual-average"] {
        let model = d.join(format!("{variant}.safetensors"));
        let o = tiny_train(d, "2", &model, &[&"--variant", &variant]);
        assert!(o.status.success(), "{}", stderr(&o));
        let m = Model::<f32>::load(&model).unwrap();
        assert_eq!(m.config.variant.views(), 2);
        // infer needs the second view, and uses it
        let out = d.join(format!("{variant}.tif"));
        let o = engine(&[&"infer", &model, &view1, &"-o", &out, &"--device", &"cpu"]);
        assert!(!o.status.success() && stderr(&o).contains("--input2"));
        assert!(!out.exists());
        let o = engine(&[
            &"infer",
            &model,
            &view1,
            &"--input2",
            &view2,
            &"-o",
            &out,
            &"--device",
            &"cpu",
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
        let y = rln_engine::imaging::io::read_volume(&out).unwrap();
        assert_eq!(y.dims, [20, 20, 20]);
        assert!(y.data.iter().all(|v| v.is_finite()));
    }
    // a single-view model refuses a second view
    let single = d.join("single.safetensors");
    Model::<f32>::init(ModelConfig::default(), 1).save(&single).unwrap();
    let out = d.join("s.tif");
    let o = engine(&[&"infer", &single, &view1, &"--input2", &view2, &"-o", &out]);
    assert!(!o.status.success());
}

#[test]
fn synthetic_density_and_photon_ranges_are_deterministic_and_validated() {
    use rln_engine::imaging::psf::gaussian_kernel;
    use rln_engine::imaging::synth::SynthConfig;
    let psf = gaussian_kernel([9, 9, 9], [1.5, 1.0, 1.0]);
    let cfg = SynthConfig {
        size: [16, 32, 32],
        photons: 1.0,
        ..SynthConfig::default()
    };
    let make = |d, p| {
        let vary = SynthVariation {
            density: d,
            photons: p,
            family_subsets: None,
        };
        Dataset::synthetic(&cfg, &psf, 3, 11, &vary).unwrap()
    };
    // a degenerate range (1, 1) draws exactly 1: the same data as the fixed level
    let fixed = make(None, None);
    let degenerate = make(None, Some((1.0, 1.0)));
    for (a, b) in fixed.pairs.iter().zip(&degenerate.pairs) {
        assert_eq!(a.inputs[0].data, b.inputs[0].data);
    }
    // a real range changes the noise (not the objects) and is the same for the same seed
    let r1 = make(Some((0.5, 2.0)), Some((2.0, 50.0)));
    let r2 = make(Some((0.5, 2.0)), Some((2.0, 50.0)));
    for (a, b) in r1.pairs.iter().zip(&r2.pairs) {
        assert_eq!(a.inputs[0].data, b.inputs[0].data);
        assert_eq!(a.ground_truth.data, b.ground_truth.data);
    }
    let photons_only = make(None, Some((2.0, 50.0)));
    for (a, b) in fixed.pairs.iter().zip(&photons_only.pairs) {
        assert_eq!(
            a.ground_truth.data, b.ground_truth.data,
            "the photon level must not move objects"
        );
        assert_ne!(a.inputs[0].data, b.inputs[0].data);
        // more photons per unit: a brighter input than at 1 photon per unit
        let (sa, sb): (f64, f64) = (a.inputs[0].sum(), b.inputs[0].sum());
        assert!(sb > 1.5 * sa, "input sum {sb} at ≥2 photons/unit vs {sa} at 1");
    }
    // bad ranges are errors, not panics, found before any volume is made (count 0)
    for bad in [(0.0, 5.0), (5.0, 1.0), (-1.0, 2.0), (1.0, f64::INFINITY)] {
        assert!(
            Dataset::synthetic(
                &cfg,
                &psf,
                0,
                11,
                &SynthVariation {
                    photons: Some(bad),
                    ..Default::default()
                }
            )
            .is_err(),
            "{bad:?}"
        );
        assert!(
            Dataset::synthetic(
                &cfg,
                &psf,
                0,
                11,
                &SynthVariation {
                    density: Some(bad),
                    ..Default::default()
                }
            )
            .is_err(),
            "{bad:?}"
        );
    }
}

#[test]
fn input_scale_augmentation_scales_inputs_only_and_keeps_the_crops() {
    let data = dataset(2, [24, 32, 32]);
    let plain = small_cfg(1).sampler;
    let fixed = CropSampler {
        input_scale: Some((2.0, 2.0)),
        ..plain.clone()
    };
    let ranged = CropSampler {
        input_scale: Some((0.5, 2.0)),
        ..plain.clone()
    };
    for step in 0..4 {
        let a = plain.batch(&data, Variant::Single, step, 9).unwrap();
        let b = fixed.batch(&data, Variant::Single, step, 9).unwrap();
        let c = ranged.batch(&data, Variant::Single, step, 9).unwrap();
        // same crops (ground truth unchanged), inputs exactly doubled
        assert_eq!(a.ground_truth.data, b.ground_truth.data);
        assert_eq!(a.ground_truth.data, c.ground_truth.data);
        for (x, y) in a.input.data.iter().zip(&b.input.data) {
            assert_eq!(2.0 * x, *y);
        }
        // per crop one factor within the range
        let vox = a.input.data.len() / 2;
        for k in 0..2 {
            let (xa, xc) = (
                &a.input.data[k * vox..(k + 1) * vox],
                &c.input.data[k * vox..(k + 1) * vox],
            );
            let (i, _) = xa
                .iter()
                .enumerate()
                .max_by(|p, q| p.1.abs().total_cmp(&q.1.abs()))
                .unwrap();
            let f = xc[i] / xa[i];
            assert!((0.5 - 1e-6..=2.0 + 1e-6).contains(&f), "factor {f}");
            for (x, y) in xa.iter().zip(xc) {
                assert!((f * x - y).abs() <= 1e-5 * (1.0 + y.abs()), "one factor per crop");
            }
        }
        // deterministic for (step, seed)
        assert_eq!(
            c.input.data,
            ranged.batch(&data, Variant::Single, step, 9).unwrap().input.data
        );
    }
    let bad = CropSampler {
        input_scale: Some((0.0, 2.0)),
        ..plain
    };
    assert!(bad.batch(&data, Variant::Single, 0, 9).is_err());
}

#[test]
fn cli_infer_percentiles_override_the_models_own() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (x, _) = blob_volume(31, [24, 24, 24], 10.0);
    write_volume(d.join("x.tif"), &x, OutputDtype::F32).unwrap();
    let m995 = Model::<f32>::init(ModelConfig::default(), 3);
    let mut m999 = m995.clone();
    m999.config.norm_percentiles = [0.01, 99.9];
    m995.save(&d.join("m995.safetensors")).unwrap();
    m999.save(&d.join("m999.safetensors")).unwrap();
    let infer = |model: &str, out: &str, extra: &[&str]| {
        let (model, input, out) = (d.join(model), d.join("x.tif"), d.join(out));
        let mut args: Vec<&dyn AsRef<OsStr>> = vec![&"infer", &model, &input, &"-o", &out, &"--device", &"cpu"];
        args.extend(extra.iter().map(|a| a as &dyn AsRef<OsStr>));
        let o = engine(&args);
        (o.status.success(), stderr(&o))
    };
    let read = |out: &str| rln_engine::imaging::io::read_volume(d.join(out)).unwrap().data;
    assert!(infer("m999.safetensors", "recorded.tif", &[]).0);
    assert!(infer("m995.safetensors", "override.tif", &["--percentiles", "0.01,99.9"]).0);
    assert!(infer("m995.safetensors", "own.tif", &[]).0);
    let (recorded, overridden, own) = (read("recorded.tif"), read("override.tif"), read("own.tif"));
    let max_abs_diff = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
    // the override normalizes exactly as a model that recorded those percentiles
    let max_diff = max_abs_diff(&recorded, &overridden);
    let scale = recorded.iter().map(|v| v.abs()).fold(0.0f32, f32::max);
    assert!(
        max_diff <= 1e-6 * scale,
        "override differs by {max_diff} (scale {scale})"
    );
    // and differs from the model's own normalization
    let own_diff = max_abs_diff(&own, &overridden);
    assert!(own_diff > 1e-3 * scale, "--percentiles had no effect ({own_diff})");
    // invalid percentiles: a clear error, no output
    let (ok, err) = infer("m995.safetensors", "bad.tif", &["--percentiles", "99,1"]);
    assert!(
        !ok && err.contains("--percentiles") && err.contains("low < high"),
        "{err}"
    );
    assert!(!d.join("bad.tif").exists());
}

#[test]
fn family_subsets_vary_the_scene_per_volume_deterministically() {
    use rln_engine::imaging::psf::gaussian_kernel;
    use rln_engine::imaging::synth::{Family, SynthConfig};
    let psf = gaussian_kernel([9, 9, 9], [1.5, 1.0, 1.0]);
    let cfg = SynthConfig {
        size: [32, 64, 64],
        families: vec![Family::Spheres, Family::Dots, Family::Rods],
        ..SynthConfig::default()
    };
    let subsets = SynthVariation {
        family_subsets: Some(0.5),
        ..Default::default()
    };
    let all = Dataset::synthetic(&cfg, &psf, 12, 5, &SynthVariation::default()).unwrap();
    let a = Dataset::synthetic(&cfg, &psf, 12, 5, &subsets).unwrap();
    let b = Dataset::synthetic(&cfg, &psf, 12, 5, &subsets).unwrap();
    let mut differ = 0;
    for ((x, y), z) in a.pairs.iter().zip(&b.pairs).zip(&all.pairs) {
        assert_eq!(x.ground_truth.data, y.ground_truth.data, "same seed, same scenes");
        differ += usize::from(x.ground_truth.data != z.ground_truth.data);
    }
    // half the volumes keep all families, the others a subset (all three again with
    // probability 1/8): 12 volumes with no subset at all has probability (9/16)^12 ≈ 1e-3,
    // and the draw is deterministic, so this checks that subsets happen at all
    assert!(differ >= 1, "no volume drew a subset");
    assert!(differ < 12, "no volume kept all families");
    // fraction 0 is the plain data, fraction 1 draws a subset for every volume (all
    // three families again with probability 1/8 each)
    let none = SynthVariation {
        family_subsets: Some(0.0),
        ..Default::default()
    };
    let every = SynthVariation {
        family_subsets: Some(1.0),
        ..Default::default()
    };
    let n0 = Dataset::synthetic(&cfg, &psf, 12, 5, &none).unwrap();
    let n1 = Dataset::synthetic(&cfg, &psf, 12, 5, &every).unwrap();
    let mut differ_every = 0;
    for ((x, y), z) in n0.pairs.iter().zip(&n1.pairs).zip(&all.pairs) {
        assert_eq!(x.ground_truth.data, z.ground_truth.data);
        differ_every += usize::from(y.ground_truth.data != z.ground_truth.data);
    }
    assert!(
        differ_every > differ,
        "fraction 1: {differ_every} subsets, 1/2: {differ}"
    );
    for bad in [-0.1, 1.5, f64::NAN] {
        let v = SynthVariation {
            family_subsets: Some(bad),
            ..Default::default()
        };
        assert!(Dataset::synthetic(&cfg, &psf, 0, 5, &v).is_err(), "{bad}");
    }
    // a single family stays that family (the subset is never empty)
    let one = SynthConfig {
        families: vec![Family::Dots],
        ..cfg.clone()
    };
    let d1 = Dataset::synthetic(&one, &psf, 4, 5, &subsets).unwrap();
    let d0 = Dataset::synthetic(&one, &psf, 4, 5, &SynthVariation::default()).unwrap();
    for (x, y) in d1.pairs.iter().zip(&d0.pairs) {
        assert_eq!(x.ground_truth.data, y.ground_truth.data);
    }
}

#[test]
fn input_flux_targets_are_the_ground_truth_in_the_inputs_normalized_units() {
    use rln_engine::imaging::normalize::{percentile_affine, percentiles};
    use rln_engine::train::data::TargetScale;
    let dims = [24, 32, 32];
    let (_, g) = blob_volume(41, dims, 1.0);
    let whole = |target_scale| CropSampler {
        crop: dims,
        batch: 1,
        target_scale,
        ..CropSampler::default()
    };
    let targets = |x: &Volume, scale| {
        let data = Dataset {
            pairs: vec![Pair::new("p".into(), vec![x.clone()], g.clone()).unwrap()],
        };
        let b = whole(scale).batch(&data, Variant::Single, 0, 7).unwrap();
        (b.input.data, b.ground_truth.data, data.pairs[0].flux_ratios[0])
    };
    let close = |a: &[f32], b: &[f32], tol: f32| a.iter().zip(b).all(|(p, q)| (p - q).abs() <= tol * (1.0 + q.abs()));

    // a pure gain of 3: both target scales agree, and equal the normalized input (≥ 0)
    let gain = g.like(g.data.iter().map(|v| 3.0 * v).collect()).unwrap();
    let (x, flux, ratio) = targets(&gain, TargetScale::InputFlux);
    let (_, own, _) = targets(&gain, TargetScale::Own);
    assert!((ratio - 3.0).abs() < 1e-5, "flux ratio {ratio}");
    let x_clipped: Vec<f32> = x.iter().map(|v| v.max(0.0)).collect();
    assert!(close(&flux, &x_clipped, 1e-5));
    assert!(close(&own, &x_clipped, 1e-5));

    // blurred (circular 5-voxel box along x keeps the flux): the input-flux target is
    // 3·g under the input's own normalization map, the authors' is not
    let [nz, ny, nx] = dims;
    let mut blurred = vec![0.0f32; g.len()];
    for r in 0..nz * ny {
        for i in 0..nx {
            blurred[r * nx + i] = (0..5).map(|k| 3.0 * g.data[r * nx + (i + nx + k - 2) % nx] / 5.0).sum();
        }
    }
    let blurred = g.like(blurred).unwrap();
    let (_, flux, ratio) = targets(&blurred, TargetScale::InputFlux);
    let (_, own, _) = targets(&blurred, TargetScale::Own);
    assert!((ratio - 3.0).abs() < 1e-5, "flux ratio {ratio}");
    let p = percentiles(&blurred.data, &[0.01, 99.5]).unwrap();
    let (s, o) = percentile_affine(p[0], p[1]);
    let want: Vec<f32> = g
        .data
        .iter()
        .map(|&v| ((3.0 * v as f64 * s + o) as f32).max(0.0))
        .collect();
    assert!(close(&flux, &want, 1e-5));
    let max = |v: &[f32]| v.iter().cloned().fold(0.0f32, f32::max);
    // the blur lowered the input's peaks, so the sharp target reaches above the input's range
    assert!(
        max(&flux) > 1.2 * max(&own),
        "flux max {} own max {}",
        max(&flux),
        max(&own)
    );
}

#[test]
fn input_flux_targets_of_two_views_are_in_the_units_of_their_mean() {
    use rln_engine::train::data::TargetScale;
    let dims = [24, 32, 32];
    let (_, g) = blob_volume(43, dims, 1.0);
    // two views of the same object at gains 3 and 6: each normalizes to the same crop,
    // so the views' mean is that crop and the flux target must equal it (clipped at 0).
    // Taking view 1's map with the mean flux ratio (4.5) would scale the target by 1.5.
    let view1 = g.like(g.data.iter().map(|v| 3.0 * v).collect()).unwrap();
    let view2 = g.like(g.data.iter().map(|v| 6.0 * v).collect()).unwrap();
    let data = Dataset {
        pairs: vec![Pair::new("p".into(), vec![view1, view2], g.clone()).unwrap()],
    };
    let r = &data.pairs[0].flux_ratios;
    assert!((r[0] - 3.0).abs() < 1e-5 && (r[1] - 6.0).abs() < 1e-5, "{r:?}");
    let sampler = CropSampler {
        crop: dims,
        batch: 1,
        target_scale: TargetScale::InputFlux,
        ..CropSampler::default()
    };
    for variant in [Variant::DualAverage, Variant::DualConcat] {
        let b = sampler.batch(&data, variant, 0, 7).unwrap();
        let n = g.len();
        // the first n values are the mean (dual-average) or view 1 (dual-concat; here equal)
        let x: Vec<f32> = b.input.data[..n].iter().map(|v| v.max(0.0)).collect();
        let err = x
            .iter()
            .zip(&b.ground_truth.data)
            .map(|(p, q)| (p - q).abs() / (1.0 + q.abs()))
            .fold(0.0f32, f32::max);
        assert!(
            err <= 1e-5,
            "{variant:?}: max relative |target − normalized input| {err}"
        );
    }
}

/// The CPU backend with a device-like memory limit: an op whose result would exceed
/// `limit` bytes fails with [`rln_engine::Error::OutOfMemory`] instead of running, as a
/// device allocation does. Every other op is the CPU backend's.
struct MemoryLimited {
    cpu: rln_engine::backend::cpu::CpuBackend<f32>,
    limit: usize,
}

mod memory_limited {
    use super::MemoryLimited;
    use rln_engine::backend::loss::LossTerms;
    use rln_engine::backend::{Backend, BnTrainState, ChannelStats, Epilogue, GradMode};
    use rln_engine::model::{Model, Params, Variant};
    use rln_engine::tensor::{Shape, Tensor};
    use rln_engine::train::adam::Adam;
    use rln_engine::{Error, Result};

    type X = Tensor<f32>;
    type Epi<'a> = Epilogue<'a, X, f32>;

    impl MemoryLimited {
        /// Fails before an allocation of `shape` beyond the limit.
        fn alloc(&self, shape: Shape) -> Result<()> {
            let bytes = shape.len() * 4;
            if bytes > self.limit {
                return Err(Error::OutOfMemory(format!(
                    "allocating {bytes} bytes for a {shape} tensor (limit {} bytes)",
                    self.limit
                )));
            }
            Ok(())
        }
    }

    impl Backend for MemoryLimited {
        type T = f32;
        type X = X;
        type Grads = Params<f64>;
        type Opt = Adam;
        fn grads_new(&self, variant: Variant) -> Result<Params<f64>> {
            self.cpu.grads_new(variant)
        }
        fn opt_new(&self, model: &Model<f32>, adam: &Adam) -> Result<Adam> {
            self.cpu.opt_new(model, adam)
        }
        fn opt_step(
            &self,
            adam: &mut Adam,
            grads: &Params<f64>,
            stats: &[Option<ChannelStats>],
            model: &mut Model<f32>,
        ) -> Result<bool> {
            self.cpu.opt_step(adam, grads, stats, model)
        }
        fn opt_download(&self, adam: &Adam, model: &mut Model<f32>) -> Result<Adam> {
            self.cpu.opt_download(adam, model)
        }
        fn shape(&self, x: &X) -> Shape {
            x.shape
        }
        fn from_host(&self, t: &X) -> Result<X> {
            self.alloc(t.shape)?;
            self.cpu.from_host(t)
        }
        fn to_host(&self, x: &X) -> Result<X> {
            self.cpu.to_host(x)
        }
        fn conv3(&self, inputs: &[&X], weight: &[f32], c_out: usize, epi: &Epi<'_>) -> Result<X> {
            self.alloc(inputs[0].shape.with_c(c_out))?;
            self.cpu.conv3(inputs, weight, c_out, epi)
        }
        fn up2(&self, x: &X, weight: &[f32], c_out: usize, epi: &Epi<'_>) -> Result<X> {
            let s = x.shape;
            self.alloc(Shape::new(s.n, c_out, 2 * s.d, 2 * s.h, 2 * s.w))?;
            self.cpu.up2(x, weight, c_out, epi)
        }
        fn epilogue(&self, z: &X, epi: &Epi<'_>) -> Result<X> {
            self.alloc(z.shape)?;
            self.cpu.epilogue(z, epi)
        }
        fn avgpool2(&self, x: &X) -> Result<X> {
            self.cpu.avgpool2(x)
        }
        fn channel_mean(&self, x: &X) -> Result<X> {
            self.cpu.channel_mean(x)
        }
        fn batch_stats(&self, z: &X) -> Result<ChannelStats> {
            self.cpu.batch_stats(z)
        }
        fn rl_divide(&self, a: &X, fp: &X, eps: f64) -> Result<X> {
            self.cpu.rl_divide(a, fp, eps)
        }
        fn rl_update(&self, a: &X, bp: &X) -> Result<X> {
            self.cpu.rl_update(a, bp)
        }
        fn loss(&self, y: &X, e1r: &X, x1: &X, g: &X) -> Result<(LossTerms, X, X)> {
            self.cpu.loss(y, e1r, x1, g)
        }
        fn epilogue_backward(
            &self,
            z: &X,
            dy: &X,
            softplus: bool,
            bn: Option<&BnTrainState<f32>>,
        ) -> Result<(X, Vec<f64>, Vec<f64>)> {
            self.alloc(z.shape)?;
            self.cpu.epilogue_backward(z, dy, softplus, bn)
        }
        fn conv3_backward_data(
            &self,
            dz: &X,
            weight: &[f32],
            c_in: &[usize],
            needed: &[bool],
        ) -> Result<Vec<Option<X>>> {
            self.cpu.conv3_backward_data(dz, weight, c_in, needed)
        }
        fn conv3_backward_weight(&self, inputs: &[&X], dz: &X) -> Result<Vec<f64>> {
            self.cpu.conv3_backward_weight(inputs, dz)
        }
        fn up2_backward_data(&self, dz: &X, weight: &[f32], c_in: usize) -> Result<X> {
            self.cpu.up2_backward_data(dz, weight, c_in)
        }
        fn up2_backward_weight(&self, x: &X, dz: &X) -> Result<Vec<f64>> {
            self.cpu.up2_backward_weight(x, dz)
        }
        fn rl_divide_backward(&self, a: &X, fp: &X, eps: f64, dq: &X, mode: GradMode) -> Result<(X, X)> {
            self.cpu.rl_divide_backward(a, fp, eps, dq, mode)
        }
        fn rl_update_backward(&self, a: &X, bp: &X, de: &X, mode: GradMode) -> Result<(X, X)> {
            self.cpu.rl_update_backward(a, bp, de, mode)
        }
        fn channel_mean_backward(&self, dy: &X, channels: usize) -> Result<X> {
            self.cpu.channel_mean_backward(dy, channels)
        }
        fn accumulate(&self, acc: &mut X, t: &X) -> Result<()> {
            self.cpu.accumulate(acc, t)
        }
        fn pad_even(&self, x: &X) -> Result<X> {
            self.cpu.pad_even(x)
        }
        fn crop(&self, x: &X, shape: Shape) -> Result<X> {
            self.cpu.crop(x, shape)
        }
        fn uncrop_zeros(&self, x: &X, shape: Shape) -> Result<X> {
            self.alloc(shape)?;
            self.cpu.uncrop_zeros(x, shape)
        }
    }
}

/// An allocation that fails inside the backend reaches the caller of the training loop
/// as the typed out-of-memory error, naming the batch and crop to lower, without a panic
/// and without touching the state; the same run fits with a larger limit.
#[test]
fn out_of_memory_in_the_backend_is_a_typed_error_from_the_trainer() {
    let data = dataset(2, [20, 20, 20]);
    let cfg = small_cfg(2);
    let model = Model::<f32>::init(ModelConfig::default(), 7);
    // a batch of 2 × 16³ crops: the one-channel input (32 KiB) and the half-resolution
    // activations fit, the full-resolution ones (4 or more channels, ≥ 128 KiB) do not
    let tight = MemoryLimited {
        cpu: Default::default(),
        limit: 2 * 16 * 16 * 16 * 4 * 3,
    };
    let mut state = TrainState::new(model.clone(), &cfg);
    struct Quiet;
    impl TrainObserver for Quiet {}
    let e = trainer::train_on(&tight, false, &mut state, &cfg, &data, None, 0, None, &mut Quiet)
        .expect_err("the activations exceed the limit");
    assert!(matches!(e, rln_engine::Error::OutOfMemory(_)), "{e:?}");
    assert!(e.is_out_of_memory());
    let msg = e.to_string();
    println!("{msg}");
    for want in [
        "out of memory",
        "training step 0",
        "lower the batch size (--batch, now 2)",
        "the crop size (--crop, now 16×16×16)",
        "limit 98304 bytes",
    ] {
        assert!(msg.contains(want), "{msg:?} lacks {want:?}");
    }
    assert_eq!(state.step, 0);
    assert_eq!(state.model, model, "a failed step leaves the model untouched");

    // the largest tensor of this run is 8 channels at full size (2 × 8 × 16³ × 4 bytes)
    let roomy = MemoryLimited {
        cpu: Default::default(),
        limit: 2 * 8 * 16 * 16 * 16 * 4,
    };
    trainer::train_on(&roomy, false, &mut state, &cfg, &data, None, 0, None, &mut Quiet).expect("fits");
    assert_eq!(state.step, 2);
}

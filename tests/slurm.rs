//! `rln-engine plan` / `finalize` on a real Slurm cluster: a single-node cluster on
//! localhost, started by tools/slurm-local-cluster.sh (or reused if running; `.ci/run`
//! starts it before `cargo test` and stops it after). Each test runs a job array over a
//! small OME-Zarr volume with the CPU model and compares the assembled store with one
//! plain `infer` run, bit for bit.
//!
//! If Slurm cannot be installed or started the tests FAIL with the script's message,
//! except outside CI (`CI` unset) on a machine where this user is not root: there the
//! script cannot install anything, and the tests print "SKIPPED: …" and return.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rln_engine::imaging::io::{read_volume, write_volume, OutputDtype};
use rln_engine::imaging::volume::Volume;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Mutex;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_rln-engine");
/// The longest a job array of these tests may take (queue + run) before the test fails.
const JOB_TIMEOUT: Duration = Duration::from_secs(300);
/// Input size, chunks and tile cores: 3×2×2 = 12 tiles, so blocks hold 3 tiles each.
const DIMS: [usize; 3] = [24, 80, 80];
const TILE: &str = "8,40,40";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn model() -> PathBuf {
    root().join("models/rln-synthetic-widefield.safetensors")
}

/// How many tests hold the cluster, and whether this process started it (then the
/// last one out stops it, by the script's pids).
static CLUSTER: Mutex<(usize, bool)> = Mutex::new((0, false));

/// The running local cluster (`SLURM_CONF` for the clients); dropped: released.
struct Cluster {
    conf: String,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let mut c = CLUSTER.lock().unwrap_or_else(|e| e.into_inner());
        c.0 -= 1;
        if c.0 == 0 && c.1 {
            let _ = Command::new(root().join("tools/slurm-local-cluster.sh")).arg("stop").status();
            c.1 = false;
        }
    }
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// Brings the cluster up (or reuses a running one); None: skipped (see the module doc).
fn cluster() -> Option<Cluster> {
    let script = root().join("tools/slurm-local-cluster.sh");
    let mut c = CLUSTER.lock().unwrap_or_else(|e| e.into_inner());
    let was_running = Command::new(&script).arg("status").output().is_ok_and(|o| o.status.success());
    if !was_running {
        let out = Command::new(&script).arg("start").output().expect("run tools/slurm-local-cluster.sh");
        if !out.status.success() {
            let msg = format!(
                "the local Slurm cluster could not be started (tools/slurm-local-cluster.sh start):\n{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            if std::env::var_os("CI").is_none() && !is_root() {
                eprintln!("SKIPPED: {msg}\n(not root and CI unset; in CI this test fails)");
                return None;
            }
            panic!("{msg}");
        }
        c.1 = true;
    }
    c.0 += 1;
    let env = Command::new(&script).arg("env").output().expect("slurm-local-cluster.sh env");
    let text = String::from_utf8_lossy(&env.stdout);
    let conf = text
        .trim()
        .strip_prefix("export SLURM_CONF=")
        .unwrap_or_else(|| panic!("slurm-local-cluster.sh env printed {text:?}"))
        .to_string();
    Some(Cluster { conf })
}

impl Cluster {
    fn cmd(&self, program: &str) -> Command {
        let mut c = Command::new(program);
        c.env("SLURM_CONF", &self.conf);
        c
    }

    /// Waits until none of these jobs is pending or running (bounded by JOB_TIMEOUT).
    fn wait_for(&self, jobs: &[&str]) {
        let t0 = Instant::now();
        loop {
            let out = self
                .cmd("squeue")
                .args(["-h", "-o", "%i %T", "-j", &jobs.join(",")])
                .output()
                .expect("squeue");
            let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
            // squeue fails for a job id it has forgotten: that job is done as well
            if text.is_empty() {
                return;
            }
            if t0.elapsed() > JOB_TIMEOUT {
                let _ = self.cmd("scancel").args(jobs).status();
                panic!("jobs {jobs:?} still queued after {JOB_TIMEOUT:?}:\n{text}");
            }
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    /// The state of array task `job_task` (e.g. "17_2"), "" once it left the queue.
    fn task_state(&self, job_task: &str) -> String {
        let out = self
            .cmd("squeue")
            .args(["-h", "-o", "%T", "-j", job_task])
            .output()
            .expect("squeue");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().expect("spawn");
    if !out.status.success() {
        panic!(
            "{cmd:?} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    out
}

/// A small volume with structure (blobs over a background, noise) as an OME-Zarr input.
fn make_input(dir: &Path) -> PathBuf {
    let mut rng = ChaCha8Rng::seed_from_u64(18);
    let [nz, ny, nx] = DIMS;
    let blobs: Vec<[f32; 4]> = (0..40)
        .map(|_| {
            [
                rng.random_range(0.0..nz as f32),
                rng.random_range(0.0..ny as f32),
                rng.random_range(0.0..nx as f32),
                rng.random_range(200.0..2000.0),
            ]
        })
        .collect();
    let mut data = Vec::with_capacity(nz * ny * nx);
    for z in 0..nz {
        for y in 0..ny {
            for x in 0..nx {
                let mut v = 100.0 + rng.random_range(0.0..20.0);
                for b in &blobs {
                    let d2 = (z as f32 - b[0]).powi(2) * 0.5 + (y as f32 - b[1]).powi(2) + (x as f32 - b[2]).powi(2);
                    v += b[3] * (-d2 / 8.0).exp();
                }
                data.push(v);
            }
        }
    }
    let tif = dir.join("input.tif");
    write_volume(&tif, &Volume::new(DIMS, data).unwrap(), OutputDtype::F32).unwrap();
    let zarr = dir.join("input.ome.zarr");
    run(Command::new(BIN).args(["convert", tif.to_str().unwrap(), zarr.to_str().unwrap(), "--chunks", TILE]));
    zarr
}

/// One plain `infer` into a store, the reference the job array must equal.
fn single_run(dir: &Path, input: &Path) -> Vec<f32> {
    let out = dir.join("single.ome.zarr");
    run(Command::new(BIN).args(["--threads", "2", "infer"]).arg(model()).arg(input).arg("-o").arg(&out).args([
        "--device", "cpu", "--tile", TILE, "--chunks", TILE,
    ]));
    read_store(&out)
}

/// A store's values, through `convert` to a TIFF (f32, exact).
fn read_store(store: &Path) -> Vec<f32> {
    let tif = store.with_extension("check.tif");
    let _ = std::fs::remove_file(&tif);
    run(Command::new(BIN).arg("convert").arg(store).arg(&tif));
    let v = read_volume(&tif).unwrap();
    assert_eq!(v.dims, DIMS);
    v.data
}

/// Whether the store's root attributes say `rln_engine.complete`.
fn store_complete(store: &Path) -> bool {
    // TEMPORARY until stream::zarr::is_complete is on main: the root attributes of a
    // Zarr v3 (zarr.json) or v2 (.zattrs) store
    let attrs: serde_json::Value = match std::fs::read(store.join("zarr.json")) {
        Ok(b) => serde_json::from_slice::<serde_json::Value>(&b).unwrap()["attributes"].clone(),
        Err(_) => match std::fs::read(store.join(".zattrs")) {
            Ok(b) => serde_json::from_slice(&b).unwrap(),
            Err(_) => return false,
        },
    };
    attrs["rln_engine"]["complete"] == serde_json::Value::Bool(true)
}

fn assert_bitwise_equal(a: &[f32], b: &[f32], what: &str) {
    assert_eq!(a.len(), b.len());
    let diff = a.iter().zip(b).filter(|(x, y)| x.to_bits() != y.to_bits()).count();
    assert_eq!(diff, 0, "{what}: {diff} of {} voxels differ from the single run", a.len());
    assert!(a.iter().all(|v| v.is_finite()));
}

fn plan_args(input: &Path, store: &Path, blocks: usize) -> Vec<String> {
    [
        "plan",
        model().to_str().unwrap(),
        input.to_str().unwrap(),
        "-o",
        store.to_str().unwrap(),
        "--blocks",
        &blocks.to_string(),
        "--device",
        "cpu",
        "--cpus-per-task",
        "1",
        "--tile",
        TILE,
        "--chunks",
        TILE,
        "--time",
        "00:10:00",
        "--json",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn json_field(out: &Output, key: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("plan --json printed no JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)));
    match &v[key] {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Null => None,
        other => Some(other.to_string()),
    }
}

fn log_of(store: &Path, name: &str) -> String {
    std::fs::read_to_string(rln_engine::slurm::log_dir(store).join(name)).unwrap_or_default()
}

#[test]
#[ignore = "needs infer --block (issue 13)"]
fn job_array_equals_single_run() {
    let Some(cluster) = cluster() else { return };
    let t0 = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let input = make_input(dir.path());
    let store = dir.path().join("out.ome.zarr");
    let blocks = 4;
    let mut args = plan_args(&input, &store, blocks);
    args.push("--submit".into());
    let out = run(cluster.cmd(BIN).args(&args));
    let array = json_field(&out, "array_job").expect("an array job id");
    let fin = json_field(&out, "finalize_job").expect("a finalize job id");
    assert!(!store_complete(&store), "the store is complete before any block ran");
    cluster.wait_for(&[&array, &fin]);
    let wall = t0.elapsed().as_secs_f64();

    for i in 0..blocks {
        assert!(rln_engine::slurm::block_marker(&store, i, blocks).is_file(), "block {i} not marked:\n{}", log_of(&store, &format!("block-{i}.out")));
        let log = log_of(&store, &format!("block-{i}.out"));
        assert!(log.contains(&format!("job {array}_{i} ")) && log.contains(" exit 0 "), "block {i} log:\n{log}");
    }
    let fin_log = log_of(&store, "finalize.out");
    assert!(store_complete(&store), "not complete after the finalize job; its log:\n{fin_log}");
    assert!(fin_log.contains("marked complete"), "{fin_log}");
    assert_bitwise_equal(&read_store(&store), &single_run(dir.path(), &input), "job array");
    eprintln!("job array of {blocks} blocks over {DIMS:?}: plan + queue + run + finalize {wall:.1} s");
}

#[test]
#[ignore = "needs infer --block (issue 13)"]
fn cancelled_tasks_are_resubmitted_alone() {
    let Some(cluster) = cluster() else { return };
    let dir = tempfile::tempdir().unwrap();
    let input = make_input(dir.path());
    let store = dir.path().join("out.ome.zarr");
    let blocks = 4;
    // plan only, then submit the array by hand one task at a time (%1), so task 2 can be
    // caught running and task 3 is still pending when they are cancelled
    let mut args = plan_args(&input, &store, blocks);
    args.extend(["--array-max".into(), "1".into()]);
    let out = run(cluster.cmd(BIN).args(&args));
    let script = PathBuf::from(json_field(&out, "script").unwrap());
    let sb = run(cluster.cmd("sbatch").arg("--parsable").arg(&script));
    let job = String::from_utf8_lossy(&sb.stdout).trim().split(';').next().unwrap().to_string();
    let t0 = Instant::now();
    while cluster.task_state(&format!("{job}_2")) != "RUNNING" {
        assert!(t0.elapsed() < JOB_TIMEOUT, "task {job}_2 never ran");
        std::thread::sleep(Duration::from_millis(50));
    }
    // task 2 is mid-block (process start, model load and 3 tiles take seconds); task 3 waits
    run(cluster.cmd("scancel").arg(format!("{job}_2")).arg(format!("{job}_3")));
    cluster.wait_for(&[&job]);

    let log2 = log_of(&store, "block-2.out");
    assert!(log2.contains(&format!("job {job}_2 ")), "task 2 did not start:\n{log2}");
    assert!(!log2.contains(" exit "), "task 2 finished before it was cancelled (no fault injected):\n{log2}");
    assert_eq!(rln_engine::slurm::missing_blocks(&store, blocks), vec![2, 3]);
    assert!(!store_complete(&store));
    let fin = Command::new(BIN).arg("finalize").arg(&store).output().unwrap();
    assert!(!fin.status.success(), "finalize passed with blocks missing");
    let err = String::from_utf8_lossy(&fin.stderr);
    assert!(err.contains("2 of 4 blocks") && err.contains(": 2-3 "), "{err}");

    // resubmit: only blocks 2 and 3 run, then the store equals a single run
    let mut args = plan_args(&input, &store, blocks);
    args.extend(["--array-max".into(), "1".into(), "--resubmit".into()]);
    let out = run(cluster.cmd(BIN).args(&args));
    assert_eq!(json_field(&out, "array").as_deref(), Some("2-3%1"));
    let again = json_field(&out, "array_job").unwrap();
    let fin = json_field(&out, "finalize_job").unwrap();
    cluster.wait_for(&[&again, &fin]);
    for i in 0..blocks {
        let log = log_of(&store, &format!("block-{i}.out"));
        let reran = log.contains(&format!("job {again}_{i} "));
        assert_eq!(reran, i == 2 || i == 3, "block {i} rerun: {reran}; log:\n{log}");
    }
    assert!(log_of(&store, "block-2.out").contains(&format!("job {again}_2 exit 0 ")));
    assert!(store_complete(&store), "finalize log:\n{}", log_of(&store, "finalize.out"));
    assert_bitwise_equal(&read_store(&store), &single_run(dir.path(), &input), "resubmitted job array");
}

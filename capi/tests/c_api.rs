//! The C ABI against the Rust library on the same volumes: examples/c/deconvolve.c
//! compiled with `cc` against the static library and run as a program, and the entry
//! points called directly with strided views, u16 buffers and bad arguments.

use rln_engine::imaging::rl::{richardson_lucy, RlConfig};
use rln_engine::imaging::synth::{blur_gaussian_5, phantom, SynthConfig};
use rln_engine::imaging::volume::Volume;
use rln_engine::infer::{deconvolve, CpuPredictor};
use rln_engine::model::Model;
use rln_engine_capi::*;
use std::ffi::{c_void, CStr, CString};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::ptr;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

fn model_path() -> PathBuf {
    repo().join("models/rln-synthetic-widefield.safetensors")
}

/// A blurred phantom in camera counts (u16 values), z,y,x order.
fn camera_volume(dims: [usize; 3], seed: u64) -> Vec<u16> {
    let scene = blur_gaussian_5(&blur_gaussian_5(&phantom(&SynthConfig::default(), dims, seed)));
    scene
        .data
        .iter()
        .map(|&v| (100.0 + 3.0 * v).round().clamp(0.0, 65535.0) as u16)
        .collect()
}

/// The Rust library's result (whole volume in one tile, as the C API's default on a small volume).
fn library_result(dims: [usize; 3], values: &[f32]) -> Vec<f32> {
    let model = Model::<f32>::load(&model_path()).unwrap();
    let vol = Volume::new(dims, values.to_vec()).unwrap();
    let mut cpu = CpuPredictor { model: model.clone() };
    deconvolve(&mut cpu, &model, &vol, [256, 256, 256]).unwrap().data
}

/// (max |a − b|, that over the range of b).
fn max_diff(a: &[f32], b: &[f32]) -> (f64, f64) {
    assert_eq!(a.len(), b.len());
    let d = a.iter().zip(b).map(|(x, y)| (x - y).abs() as f64).fold(0.0, f64::max);
    let lo = b.iter().copied().fold(f32::INFINITY, f32::min) as f64;
    let hi = b.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    (d, d / (hi - lo))
}

fn last_error() -> String {
    unsafe { CStr::from_ptr(rln_last_error()) }
        .to_string_lossy()
        .into_owned()
}

fn open_cpu_engine() -> (*mut RlnModel, *mut RlnEngine) {
    let path = CString::new(model_path().to_str().unwrap()).unwrap();
    let mut model = ptr::null_mut();
    let mut engine = ptr::null_mut();
    unsafe {
        assert_eq!(
            rln_model_open(path.as_ptr(), &mut model),
            RlnStatus::Ok,
            "{}",
            last_error()
        );
        assert_eq!(
            rln_engine_open(model, RLN_DEVICE_CPU, 0, false, &mut engine),
            RlnStatus::Ok,
            "{}",
            last_error()
        );
    }
    (model, engine)
}

fn buffer<T>(data: *mut T, dtype: u32, shape: [usize; 3], strides: [isize; 3]) -> RlnBuffer {
    RlnBuffer {
        data: data as *mut c_void,
        dtype,
        shape,
        strides,
    }
}

/// The static library cargo built for this test run. `cargo test` builds the library's
/// crate types into target/<profile>/deps/ (next to this test's executable); only an
/// explicit `cargo build -p rln-engine-capi` copies it up to target/<profile>/.
fn static_library() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let deps = exe.parent().unwrap();
    let candidates = [
        deps.join("librln_engine_capi.a"),
        deps.parent().unwrap().join("librln_engine_capi.a"),
    ];
    candidates.iter().find(|p| p.exists()).cloned().unwrap_or_else(|| {
        panic!(
            "librln_engine_capi.a is in neither {} nor {}: build it with `cargo build --release -p rln-engine-capi`",
            candidates[0].display(),
            candidates[1].display()
        )
    })
}

#[test]
fn c_example_matches_the_rust_library() {
    let dims = [16, 64, 64];
    let raw = camera_volume(dims, 7);
    let dir = tempfile::tempdir().unwrap();
    let exe = dir.path().join("deconvolve");
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let status = Command::new(&cc)
        .arg("-O2")
        .arg("-Wall")
        .arg("-Werror")
        .arg(repo().join("examples/c/deconvolve.c"))
        .arg("-I")
        .arg(repo().join("capi/include"))
        .arg(static_library())
        .args(["-lstdc++", "-lpthread", "-ldl", "-lm", "-o"])
        .arg(&exe)
        .status()
        .unwrap_or_else(|e| panic!("running the C compiler {cc:?}: {e} (install one, e.g. apt install gcc)"));
    assert!(status.success(), "compiling examples/c/deconvolve.c failed");

    let input = dir.path().join("in.u16");
    let output = dir.path().join("out.f32");
    std::fs::write(&input, raw.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>()).unwrap();
    let run = Command::new(&exe)
        .arg(model_path())
        .arg(&input)
        .arg(&output)
        .args(dims.map(|d| d.to_string()))
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "the C example failed: {}",
        String::from_utf8_lossy(&run.stderr)
    );
    let bytes = std::fs::read(&output).unwrap();
    let c_out: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect();

    let expected = library_result(dims, &raw.iter().map(|&v| v as f32).collect::<Vec<_>>());
    let (abs, rel) = max_diff(&c_out, &expected);
    println!("C example vs Rust library on {dims:?}: max |diff| {abs:.3e}, relative to the output range {rel:.3e}");
    assert!(
        rel <= 1e-6,
        "C example differs from the library by {abs} ({rel} of the range)"
    );

    // a failure says why on stderr and exits non-zero, leaving no output
    let missing = dir.path().join("missing.u16");
    let bad = Command::new(&exe)
        .arg(dir.path().join("no-such-model.safetensors"))
        .arg(&input)
        .arg(&missing)
        .args(dims.map(|d| d.to_string()))
        .output()
        .unwrap();
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("no-such-model.safetensors"), "{err}");
    assert!(!missing.exists());
}

#[test]
fn strided_and_u16_buffers_match_the_contiguous_result() {
    let dims = [12, 40, 48];
    let raw = camera_volume(dims, 3);
    let values: Vec<f32> = raw.iter().map(|&v| v as f32).collect();
    let expected = library_result(dims, &values);
    let (model, engine) = open_cpu_engine();
    let [d, h, w] = dims;

    // input: f32 inside a larger array (3 voxels of padding per row), z axis reversed
    let pad = 3;
    let mut big = vec![f32::NAN; d * h * (w + pad)];
    for z in 0..d {
        for y in 0..h {
            for x in 0..w {
                big[((d - 1 - z) * h + y) * (w + pad) + x] = values[(z * h + y) * w + x];
            }
        }
    }
    let zs = (h * (w + pad)) as isize;
    let first = unsafe { big.as_mut_ptr().offset((d as isize - 1) * zs) };
    let input = buffer(first, RLN_DTYPE_F32, dims, [-zs, (w + pad) as isize, 1]);
    // output: f32 transposed in memory (x slowest)
    let mut out_t = vec![0f32; d * h * w];
    let output = buffer(
        out_t.as_mut_ptr(),
        RLN_DTYPE_F32,
        dims,
        [1, d as isize, (d * h) as isize],
    );
    assert_eq!(
        unsafe { rln_engine_deconvolve(engine, &input, &output) },
        RlnStatus::Ok,
        "{}",
        last_error()
    );
    let mut got = vec![0f32; d * h * w];
    for z in 0..d {
        for y in 0..h {
            for x in 0..w {
                got[(z * h + y) * w + x] = out_t[z + d * y + d * h * x];
            }
        }
    }
    let (abs, rel) = max_diff(&got, &expected);
    println!("strided f32 views vs library: max |diff| {abs:.3e} ({rel:.3e} of the range)");
    assert!(rel <= 1e-6);

    // u16 in, u16 out (rounded), C order given by zero strides
    let mut raw_in = raw.clone();
    let mut out16 = vec![0u16; d * h * w];
    let input = buffer(raw_in.as_mut_ptr(), RLN_DTYPE_U16, dims, [0, 0, 0]);
    let output = buffer(out16.as_mut_ptr(), RLN_DTYPE_U16, dims, [0, 0, 0]);
    assert_eq!(
        unsafe { rln_engine_deconvolve(engine, &input, &output) },
        RlnStatus::Ok,
        "{}",
        last_error()
    );
    let want: Vec<u16> = expected.iter().map(|v| v.round() as u16).collect();
    let off = out16.iter().zip(&want).filter(|(a, b)| a.abs_diff(**b) > 1).count();
    assert_eq!(
        off, 0,
        "{off} u16 voxels differ from the rounded library output by more than 1"
    );
    assert!(out16.iter().zip(&want).filter(|(a, b)| a != b).count() < out16.len() / 100);

    // a result that does not fit u16 (negative intensities) is an error, never clamped
    let mut negative: Vec<f32> = values.iter().map(|v| v - 5000.0).collect();
    let mut untouched = vec![7u16; d * h * w];
    let input = buffer(negative.as_mut_ptr(), RLN_DTYPE_F32, dims, [0, 0, 0]);
    let output = buffer(untouched.as_mut_ptr(), RLN_DTYPE_U16, dims, [0, 0, 0]);
    assert_eq!(
        unsafe { rln_engine_deconvolve(engine, &input, &output) },
        RlnStatus::InvalidArgument
    );
    assert!(last_error().contains("does not fit u16"), "{}", last_error());
    assert!(untouched.iter().all(|&v| v == 7));

    // in place, with small tiles: the same up to float rounding
    let mut inplace = values.clone();
    let buf = buffer(inplace.as_mut_ptr(), RLN_DTYPE_F32, dims, [0, 0, 0]);
    let tile = [8usize, 24, 24];
    unsafe {
        assert_eq!(rln_engine_set_tile(engine, tile.as_ptr()), RlnStatus::Ok);
        assert_eq!(
            rln_engine_deconvolve(engine, &buf, &buf),
            RlnStatus::Ok,
            "{}",
            last_error()
        );
    }
    let (abs, rel) = max_diff(&inplace, &expected);
    println!("in place, tiles of {tile:?} vs one tile: max |diff| {abs:.3e} ({rel:.3e} of the range)");
    assert!(rel <= 1e-4);
    unsafe {
        rln_engine_free(engine);
        rln_model_free(model);
    }
}

#[test]
fn errors_are_codes_with_messages_and_leave_the_output_untouched() {
    let (model, engine) = open_cpu_engine();
    assert_eq!(last_error(), "");
    let dims = [8, 24, 24];
    let n = 8 * 24 * 24;
    let mut input: Vec<f32> = (0..n).map(|i| (i % 97) as f32).collect();
    let mut output = vec![-7f32; n];
    let out = buffer(output.as_mut_ptr(), RLN_DTYPE_F32, dims, [0, 0, 0]);
    unsafe {
        // missing file: an I/O error naming the path
        let path = CString::new("/nonexistent/model.safetensors").unwrap();
        let mut m = ptr::null_mut();
        assert_eq!(rln_model_open(path.as_ptr(), &mut m), RlnStatus::Io);
        assert!(
            last_error().contains("/nonexistent/model.safetensors"),
            "{}",
            last_error()
        );
        assert!(m.is_null());
        assert_eq!(rln_model_open(ptr::null(), &mut m), RlnStatus::NullPointer);
        assert!(last_error().contains("path"), "{}", last_error());

        // a 2D image (a zero-sized axis), an unknown dtype, a NaN voxel, a shape mismatch
        let flat = buffer(input.as_mut_ptr(), RLN_DTYPE_F32, [0, 24, 24], [0, 0, 0]);
        assert_eq!(rln_engine_deconvolve(engine, &flat, &out), RlnStatus::InvalidArgument);
        assert!(last_error().contains("3D"), "{}", last_error());
        let odd = buffer(input.as_mut_ptr(), 7, dims, [0, 0, 0]);
        assert_eq!(rln_engine_deconvolve(engine, &odd, &out), RlnStatus::InvalidArgument);
        assert!(last_error().contains("dtype"), "{}", last_error());
        input[100] = f32::NAN;
        let nan = buffer(input.as_mut_ptr(), RLN_DTYPE_F32, dims, [0, 0, 0]);
        assert_eq!(rln_engine_deconvolve(engine, &nan, &out), RlnStatus::InvalidArgument);
        assert!(last_error().contains("non-finite"), "{}", last_error());
        input[100] = 1.0;
        let small = buffer(output.as_mut_ptr(), RLN_DTYPE_F32, [8, 24, 23], [0, 0, 0]);
        let good = buffer(input.as_mut_ptr(), RLN_DTYPE_F32, dims, [0, 0, 0]);
        assert_eq!(rln_engine_deconvolve(engine, &good, &small), RlnStatus::InvalidArgument);
        assert!(last_error().contains("output shape"), "{}", last_error());
        assert_eq!(rln_engine_deconvolve(engine, ptr::null(), &out), RlnStatus::NullPointer);
        assert!(output.iter().all(|&v| v == -7.0), "a failed call wrote into the output");

        // the message is per thread: another thread's failure does not change ours
        std::thread::spawn(|| {
            assert_eq!(
                rln_engine_deconvolve(ptr::null_mut(), ptr::null(), ptr::null()),
                RlnStatus::NullPointer
            );
        })
        .join()
        .unwrap();
        assert!(last_error().contains("input is NULL"), "{}", last_error());

        // success clears it
        assert_eq!(
            rln_engine_deconvolve(engine, &good, &out),
            RlnStatus::Ok,
            "{}",
            last_error()
        );
        assert_eq!(last_error(), "");
        assert!(output.iter().all(|v| v.is_finite()));

        // bad device code; CUDA without a GPU fails, auto falls back to the CPU
        let mut e = ptr::null_mut();
        assert_eq!(rln_engine_open(model, 9, 0, false, &mut e), RlnStatus::InvalidArgument);
        assert!(last_error().contains("RLN_DEVICE_CPU"), "{}", last_error());
        if rln_cuda_available() {
            println!("SKIP: a CUDA device is present; the no-GPU error path is not exercised");
        } else {
            assert_eq!(
                rln_engine_open(model, RLN_DEVICE_CUDA, 0, true, &mut e),
                RlnStatus::Cuda
            );
            assert!(last_error().contains("no CUDA device"), "{}", last_error());
            assert!(e.is_null());
            assert_eq!(rln_engine_open(model, RLN_DEVICE_AUTO, 0, false, &mut e), RlnStatus::Ok);
            let what = CStr::from_ptr(rln_engine_describe(e)).to_string_lossy().into_owned();
            assert!(what.starts_with("CPU") && what.contains("no CUDA device"), "{what}");
            rln_engine_free(e);
        }
        rln_engine_free(engine);
        rln_model_free(model);
        rln_engine_free(ptr::null_mut());
        rln_model_free(ptr::null_mut());
    }
}

#[test]
fn richardson_lucy_matches_the_library() {
    let dims = [16, 32, 32];
    let raw = camera_volume(dims, 11);
    let values: Vec<f32> = raw.iter().map(|&v| v as f32).collect();
    let psf = rln_engine::imaging::psf::gaussian_kernel([9, 9, 9], [2.0, 1.5, 1.5]);
    let cfg = RlConfig {
        iterations: 10,
        background: 90.0,
        ..RlConfig::default()
    };
    let expected = richardson_lucy(&Volume::new(dims, values).unwrap(), &psf, &cfg).unwrap();
    let mut raw = raw;
    let mut kernel = psf.data.clone();
    let mut out = vec![0f32; raw.len()];
    let input = buffer(raw.as_mut_ptr(), RLN_DTYPE_U16, dims, [0, 0, 0]);
    let k = buffer(kernel.as_mut_ptr(), RLN_DTYPE_F32, psf.dims, [0, 0, 0]);
    let output = buffer(out.as_mut_ptr(), RLN_DTYPE_F32, dims, [0, 0, 0]);
    let status = unsafe { rln_richardson_lucy(&input, &k, 10, 90.0, &output) };
    assert_eq!(status, RlnStatus::Ok, "{}", last_error());
    let (abs, _) = max_diff(&out, &expected.data);
    assert_eq!(abs, 0.0, "RL through the C API differs from the library by {abs}");
    // the result is a deconvolution, not a copy of the input
    assert!(max_diff(&out, &raw.iter().map(|&v| v as f32).collect::<Vec<_>>()).0 > 10.0);
}

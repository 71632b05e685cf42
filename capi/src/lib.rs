//! The C ABI of rln-engine: deconvolve caller-owned buffers with an RLN model (CPU or
//! CUDA, FP16 on the GPU) or with Richardson–Lucy, from C, C++, Fiji (JNA), MATLAB MEX
//! or any language with a C FFI. `include/rln_engine.h` is generated from this file by
//! cbindgen (tests/header.rs checks that the committed header is current).
//!
//! Conventions:
//! - every function returns an [`RlnStatus`] (or a value that cannot fail); on an error
//!   [`rln_last_error`] gives the message on the calling thread. No Rust panic crosses
//!   the boundary: each entry point catches it and returns `RLN_STATUS_PANIC`.
//! - volumes are [`RlnBuffer`]s: a pointer, a sample type, the (z, y, x) shape and
//!   strides in elements (all strides 0: C order), so views into larger arrays (a
//!   crop, a transposed or reversed axis) need no copy on the caller's side.
//! - outputs are written only when the whole computation succeeded (never half-written).

use rln_engine::imaging::io::{check_output_range, OutputDtype};
use rln_engine::imaging::rl::{richardson_lucy, RlConfig};
use rln_engine::imaging::volume::Volume;
use rln_engine::infer::buffers::{deconvolve_slice, open_predictor, Device};
use rln_engine::infer::TilePredictor;
use rln_engine::model::Model;
use rln_engine::Error;
use std::cell::RefCell;
use std::ffi::{c_char, c_void, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

/// The network's receptive radius in voxels: blocks cut from a larger volume need this
/// much context on every side that is not the volume's border to match the whole-volume
/// result.
pub const RLN_RECEPTIVE_RADIUS: usize = 18;

/// Sample type of a buffer: unsigned 16-bit integers.
pub const RLN_DTYPE_U16: u32 = 1;
/// Sample type of a buffer: 32-bit floats.
pub const RLN_DTYPE_F32: u32 = 2;

/// Device choice: CUDA device 0 when usable, else the CPU.
pub const RLN_DEVICE_AUTO: u32 = 0;
/// Device choice: the CPU (f32; FP16 does not apply).
pub const RLN_DEVICE_CPU: u32 = 1;
/// Device choice: the CUDA device of the given ordinal (an error without a usable GPU).
pub const RLN_DEVICE_CUDA: u32 = 2;

/// Result of every fallible call; on anything but `RLN_STATUS_OK`, `rln_last_error()`
/// says what went wrong and what to do.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RlnStatus {
    Ok = 0,
    /// A required pointer argument was NULL.
    NullPointer = 1,
    /// An argument is out of range or inconsistent (shape, dtype, strides, device code...).
    InvalidArgument = 2,
    /// A file could not be read.
    Io = 3,
    /// A file was read but is not a valid model (or volume).
    Format = 4,
    /// The model is unusable (non-finite weights, wrong variant...).
    Model = 5,
    /// The CUDA driver or device failed, or no GPU is usable for RLN_DEVICE_CUDA.
    Cuda = 6,
    /// Device memory ran out: retry with smaller tiles (rln_engine_set_tile).
    OutOfMemory = 7,
    /// A non-finite result (the output buffer is left untouched).
    Numeric = 8,
    /// A bug inside rln-engine (a Rust panic, caught at the boundary); please report it.
    Panic = 9,
}

/// A 3D volume in caller-owned memory: element (z, y, x) is at
/// `data + z*strides[0] + y*strides[1] + x*strides[2]` elements of `dtype`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct RlnBuffer {
    /// First element (may be read-only for inputs).
    pub data: *mut c_void,
    /// RLN_DTYPE_U16 or RLN_DTYPE_F32.
    pub dtype: u32,
    /// (z, y, x) sizes in voxels, all positive.
    pub shape: [usize; 3],
    /// (z, y, x) strides in elements (negative: a reversed axis); all 0 means C order
    /// (strides shape[1]*shape[2], shape[2], 1).
    pub strides: [isize; 3],
}

/// An RLN model loaded from a .safetensors file (opaque).
pub struct RlnModel {
    model: Model<f32>,
}

/// A model bound to a device, ready to deconvolve (opaque).
pub struct RlnEngine {
    model: Model<f32>,
    predictor: Box<dyn TilePredictor + Send>,
    tile: Option<[usize; 3]>,
    description: CString,
}

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_last_error(msg: &str) {
    let c = CString::new(msg.replace('\0', " ")).unwrap_or_default();
    LAST_ERROR.with(|e| *e.borrow_mut() = c);
}

/// An error of this layer: a status and its message.
struct Failure(RlnStatus, String);

impl From<Error> for Failure {
    fn from(e: Error) -> Self {
        let status = match &e {
            Error::Io { .. } => RlnStatus::Io,
            Error::Format { .. } => RlnStatus::Format,
            Error::InvalidInput(_) | Error::Shape(_) => RlnStatus::InvalidArgument,
            Error::Model(_) => RlnStatus::Model,
            Error::Cuda(_) => RlnStatus::Cuda,
            Error::OutOfMemory(_) => RlnStatus::OutOfMemory,
            Error::Numeric(_) => RlnStatus::Numeric,
        };
        Failure(status, e.to_string())
    }
}

fn invalid(msg: impl Into<String>) -> Failure {
    Failure(RlnStatus::InvalidArgument, msg.into())
}

fn null(what: &str) -> Failure {
    Failure(RlnStatus::NullPointer, format!("{what} is NULL"))
}

/// Runs `body`, turning its error or a panic into a status and the thread's last error.
fn guard(body: impl FnOnce() -> Result<(), Failure>) -> RlnStatus {
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(())) => {
            set_last_error("");
            RlnStatus::Ok
        }
        Ok(Err(Failure(status, msg))) => {
            set_last_error(&msg);
            status
        }
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            set_last_error(&format!("internal error in rln-engine (please report it): {what}"));
            RlnStatus::Panic
        }
    }
}

/// The element offsets of a buffer's voxels in z,y,x order, after checking its fields.
fn offsets(b: &RlnBuffer, what: &str) -> Result<Vec<isize>, Failure> {
    if b.data.is_null() {
        return Err(null(&format!("{what}.data")));
    }
    if b.dtype != RLN_DTYPE_U16 && b.dtype != RLN_DTYPE_F32 {
        return Err(invalid(format!(
            "{what}.dtype is {}; use RLN_DTYPE_U16 ({RLN_DTYPE_U16}) or RLN_DTYPE_F32 ({RLN_DTYPE_F32})",
            b.dtype
        )));
    }
    let [d, h, w] = b.shape;
    if d == 0 || h == 0 || w == 0 {
        return Err(invalid(format!(
            "{what} has shape {d}×{h}×{w}; RLN needs a non-empty 3D stack (z, y, x), so a 2D image is a stack of 1 plane at least"
        )));
    }
    let n = d
        .checked_mul(h)
        .and_then(|n| n.checked_mul(w))
        .filter(|&n| n <= isize::MAX as usize / 4)
        .ok_or_else(|| invalid(format!("{what} shape {d}×{h}×{w} is too large")))?;
    let s = if b.strides == [0, 0, 0] {
        [(h * w) as isize, w as isize, 1]
    } else {
        b.strides
    };
    let mut out = Vec::with_capacity(n);
    for z in 0..d as isize {
        for y in 0..h as isize {
            let row = z * s[0] + y * s[1];
            out.extend((0..w as isize).map(|x| row + x * s[2]));
        }
    }
    Ok(out)
}

/// The buffer's samples as a z-major f32 vector.
///
/// # Safety
/// `b` must describe readable memory of its dtype at every offset.
unsafe fn gather(b: &RlnBuffer, what: &str) -> Result<Vec<f32>, Failure> {
    let offs = offsets(b, what)?;
    Ok(match b.dtype {
        RLN_DTYPE_U16 => {
            let p = b.data as *const u16;
            offs.iter().map(|&o| *p.offset(o) as f32).collect()
        }
        _ => {
            let p = b.data as *const f32;
            offs.iter().map(|&o| *p.offset(o)).collect()
        }
    })
}

/// Writes z-major `values` into the buffer at `offs` (its [`offsets`]); u16: rounded, and
/// a value that does not fit 0..65535 is an error before anything is written.
///
/// # Safety
/// `b` must describe writable memory of its dtype at every offset.
unsafe fn scatter(b: &RlnBuffer, offs: &[isize], values: &[f32]) -> Result<(), Failure> {
    if b.dtype == RLN_DTYPE_U16 {
        check_output_range(values, OutputDtype::U16, [0; 3], b.shape, "the u16 output")?;
        let p = b.data as *mut u16;
        for (&o, &v) in offs.iter().zip(values) {
            *p.offset(o) = v.round() as u16;
        }
    } else {
        let p = b.data as *mut f32;
        for (&o, &v) in offs.iter().zip(values) {
            *p.offset(o) = v;
        }
    }
    Ok(())
}

/// Checks the output buffer against the input's shape before any work is done; its
/// element offsets.
fn check_output(out: &RlnBuffer, shape: [usize; 3]) -> Result<Vec<isize>, Failure> {
    let offs = offsets(out, "output")?;
    if out.shape != shape {
        return Err(invalid(format!(
            "output shape {:?} differs from the input's {:?}; give an output of the input's shape",
            out.shape, shape
        )));
    }
    Ok(offs)
}

/// The library's version, e.g. "0.1.0" (static string). Thread-safe.
#[no_mangle]
pub extern "C" fn rln_version() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr() as *const c_char
}

/// The message of the last failed call on the calling thread ("" after a successful
/// call). The pointer stays valid until the next rln_* call on this thread. Thread-safe
/// (each thread has its own message).
#[no_mangle]
pub extern "C" fn rln_last_error() -> *const c_char {
    LAST_ERROR.with(|e| e.borrow().as_ptr())
}

/// Whether a CUDA driver and at least one device are usable. Thread-safe.
#[no_mangle]
pub extern "C" fn rln_cuda_available() -> bool {
    catch_unwind(rln_engine::backend::cuda::available).unwrap_or(false)
}

/// Sets the number of CPU threads of all later work (0: one per core). Takes effect only
/// before the first computation of the process; later calls are ignored. Thread-safe.
#[no_mangle]
pub extern "C" fn rln_set_threads(threads: usize) {
    let _ = catch_unwind(|| rln_engine::set_threads(threads));
}

/// Loads an RLN model (.safetensors written by `rln-engine train`) into `*out`; free it
/// with rln_model_free. Thread-safe; a model is immutable and may be shared by threads
/// (every function taking `const RlnModel *` may run concurrently on one model).
///
/// # Safety
/// `path` must be a NUL-terminated string (UTF-8), `out` a valid pointer.
#[no_mangle]
pub unsafe extern "C" fn rln_model_open(path: *const c_char, out: *mut *mut RlnModel) -> RlnStatus {
    guard(|| {
        if path.is_null() {
            return Err(null("path"));
        }
        if out.is_null() {
            return Err(null("out"));
        }
        *out = std::ptr::null_mut();
        let path = CStr::from_ptr(path)
            .to_str()
            .map_err(|_| invalid("path is not valid UTF-8"))?;
        let model = Model::<f32>::load(Path::new(path))?;
        *out = Box::into_raw(Box::new(RlnModel { model }));
        Ok(())
    })
}

/// Frees a model (NULL is ignored). Engines opened from it stay valid (they hold their
/// own copy). Not thread-safe with other calls on the same model.
///
/// # Safety
/// `model` must come from rln_model_open and not be freed twice.
#[no_mangle]
pub unsafe extern "C" fn rln_model_free(model: *mut RlnModel) {
    if !model.is_null() {
        let _ = catch_unwind(AssertUnwindSafe(|| drop(Box::from_raw(model))));
    }
}

/// Binds `model` to a device: `device` is RLN_DEVICE_AUTO, RLN_DEVICE_CPU or
/// RLN_DEVICE_CUDA (with `cuda_ordinal`), `fp16` selects FP16 storage on the GPU (FP32
/// accumulation; ignored on the CPU). RLN_DEVICE_CUDA without a usable GPU fails with
/// RLN_STATUS_CUDA; RLN_DEVICE_AUTO falls back to the CPU (rln_engine_describe says
/// which). Free with rln_engine_free. Thread-safe (the model is only read).
///
/// # Safety
/// `model` must be a live model, `out` a valid pointer.
#[no_mangle]
pub unsafe extern "C" fn rln_engine_open(
    model: *const RlnModel,
    device: u32,
    cuda_ordinal: u32,
    fp16: bool,
    out: *mut *mut RlnEngine,
) -> RlnStatus {
    guard(|| {
        if model.is_null() {
            return Err(null("model"));
        }
        if out.is_null() {
            return Err(null("out"));
        }
        *out = std::ptr::null_mut();
        let dev = match device {
            RLN_DEVICE_AUTO => Device::Auto,
            RLN_DEVICE_CPU => Device::Cpu,
            RLN_DEVICE_CUDA => Device::Cuda(cuda_ordinal as usize),
            d => {
                return Err(invalid(format!(
                    "device is {d}; use RLN_DEVICE_AUTO ({RLN_DEVICE_AUTO}), RLN_DEVICE_CPU ({RLN_DEVICE_CPU}) or RLN_DEVICE_CUDA ({RLN_DEVICE_CUDA})"
                )))
            }
        };
        let model = (*model).model.clone();
        let (predictor, note) = open_predictor(&model, dev, fp16)?;
        let mut description = predictor.describe();
        if let Some(n) = note {
            description = format!("{description} ({n})");
        }
        let description = CString::new(description.replace('\0', " ")).unwrap_or_default();
        *out = Box::into_raw(Box::new(RlnEngine {
            model,
            predictor,
            tile: None,
            description,
        }));
        Ok(())
    })
}

/// What the engine runs on, e.g. "CPU f32 (avx512, 2 threads)" or
/// "NVIDIA H100 f32"; owned by the engine, valid until rln_engine_free. Returns NULL for
/// a NULL engine. Thread-safe.
///
/// # Safety
/// `engine` must be a live engine or NULL.
#[no_mangle]
pub unsafe extern "C" fn rln_engine_describe(engine: *const RlnEngine) -> *const c_char {
    if engine.is_null() {
        return std::ptr::null();
    }
    (*engine).description.as_ptr()
}

/// Sets the largest tile core (z, y, x) of later deconvolutions; NULL restores the
/// automatic choice (the largest tile the device's memory holds). Smaller tiles use
/// less memory and give the same result up to float rounding. Not thread-safe with
/// other calls on the same engine.
///
/// # Safety
/// `engine` must be a live engine; `tile` NULL or 3 readable values.
#[no_mangle]
pub unsafe extern "C" fn rln_engine_set_tile(engine: *mut RlnEngine, tile: *const usize) -> RlnStatus {
    guard(|| {
        if engine.is_null() {
            return Err(null("engine"));
        }
        (*engine).tile = if tile.is_null() {
            None
        } else {
            let t = [*tile, *tile.add(1), *tile.add(2)];
            if t.contains(&0) {
                return Err(invalid(format!("tile sizes must be positive, got {t:?}")));
            }
            Some(t)
        };
        Ok(())
    })
}

/// Deconvolves `input` into `output` (same shape; u16 or f32 each): the model's
/// percentile normalization over the whole input, tiles with context and blending, the
/// output in the input's intensity range (u16 output: rounded; a value outside 0..65535
/// is an error, RLN_STATUS_INVALID_ARGUMENT, never clamped). Equals the Rust library's
/// `infer::deconvolve` on the same volume. `output` may be `input` itself or overlap it
/// (the input is read first). On any error `output` is untouched. Not thread-safe on one
/// engine (calls on one engine must not overlap); different engines may run
/// concurrently (CPU engines then share the CPU threads).
///
/// # Safety
/// `engine` must be a live engine; the buffers must describe valid memory (input
/// readable, output writable) at every element their shape and strides address.
#[no_mangle]
pub unsafe extern "C" fn rln_engine_deconvolve(
    engine: *mut RlnEngine,
    input: *const RlnBuffer,
    output: *const RlnBuffer,
) -> RlnStatus {
    guard(|| {
        if engine.is_null() {
            return Err(null("engine"));
        }
        if input.is_null() {
            return Err(null("input"));
        }
        if output.is_null() {
            return Err(null("output"));
        }
        let (input, output, engine) = (&*input, &*output, &mut *engine);
        let data = gather(input, "input")?;
        let out_offsets = check_output(output, input.shape)?;
        let result = deconvolve_slice(
            engine.predictor.as_mut(),
            &engine.model,
            input.shape,
            &data,
            engine.tile,
            None,
        )?;
        scatter(output, &out_offsets, &result)?;
        Ok(())
    })
}

/// Frees an engine (NULL is ignored); releases its device memory. Not thread-safe with
/// other calls on the same engine.
///
/// # Safety
/// `engine` must come from rln_engine_open and not be freed twice.
#[no_mangle]
pub unsafe extern "C" fn rln_engine_free(engine: *mut RlnEngine) {
    if !engine.is_null() {
        let _ = catch_unwind(AssertUnwindSafe(|| drop(Box::from_raw(engine))));
    }
}

/// Classical Richardson–Lucy deconvolution of `input` by `psf` (any odd or even size,
/// centred; normalized to unit sum internally) for `iterations` iterations with a
/// constant `background`, matched back projector, into `output` (same shape as the
/// input). The same as `rln-engine rl`. On any error `output` is untouched. Thread-safe
/// (calls may run concurrently; they share the CPU threads).
///
/// # Safety
/// The buffers must describe valid memory at every element they address.
#[no_mangle]
pub unsafe extern "C" fn rln_richardson_lucy(
    input: *const RlnBuffer,
    psf: *const RlnBuffer,
    iterations: u32,
    background: f32,
    output: *const RlnBuffer,
) -> RlnStatus {
    guard(|| {
        if input.is_null() {
            return Err(null("input"));
        }
        if psf.is_null() {
            return Err(null("psf"));
        }
        if output.is_null() {
            return Err(null("output"));
        }
        let (input, psf, output) = (&*input, &*psf, &*output);
        let image = Volume::new(input.shape, gather(input, "input")?)?;
        let kernel = Volume::new(psf.shape, gather(psf, "psf")?)?;
        let out_offsets = check_output(output, input.shape)?;
        image.check_finite("input")?;
        kernel.check_finite("psf")?;
        let cfg = RlConfig {
            iterations: iterations as usize,
            background,
            ..RlConfig::default()
        };
        let result = richardson_lucy(&image, &kernel, &cfg)?;
        if let Some((at, v)) = result.first_non_finite() {
            return Err(Failure(
                RlnStatus::Numeric,
                format!("Richardson–Lucy produced a non-finite value ({v}) at voxel {at:?}; check the PSF (positive, unit sum) and the input's range"),
            ));
        }
        scatter(output, &out_offsets, &result.data)?;
        Ok(())
    })
}

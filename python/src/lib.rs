//! The native half of the Python package `rln_engine` (the extension module
//! `rln_engine._rln_engine`): thin wrappers over the library that take and return
//! C-contiguous float32 numpy arrays, release the GIL while they compute, and turn the
//! library's errors into Python exceptions. Argument conversion, defaults and
//! docstrings for users live in the pure-Python modules (python/rln_engine/).

use numpy::{PyArray1, PyArray3, PyArrayMethods, PyReadonlyArray3, PyUntypedArrayMethods};
use pyo3::exceptions::{PyFileNotFoundError, PyMemoryError, PyOSError, PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use rln_engine::backend::cuda::Precision;
use rln_engine::imaging::io::{OutputDtype, ReadOptions};
use rln_engine::imaging::metrics;
use rln_engine::imaging::psf::{self, GibsonLanni, PsfSpec};
use rln_engine::imaging::rl::{richardson_lucy as rl, RlConfig};
use rln_engine::imaging::volume::Volume;
use rln_engine::infer::buffers::{
    deconvolve_slice, global_normalization, normalization_from_values, open_predictor, Device,
};
use rln_engine::infer::stitch::Affine;
use rln_engine::infer::TilePredictor;
use rln_engine::model::Model as EngineModel;
use rln_engine::Error;
use std::path::PathBuf;
use std::sync::Mutex;

/// The library's error as the Python exception a caller expects.
fn to_py(e: Error) -> PyErr {
    let msg = e.to_string();
    match e {
        Error::Io { cause, .. } if cause.kind() == std::io::ErrorKind::NotFound => PyFileNotFoundError::new_err(msg),
        Error::Io { .. } => PyOSError::new_err(msg),
        Error::InvalidInput(_) | Error::Shape(_) | Error::Format { .. } | Error::Model(_) => PyValueError::new_err(msg),
        Error::OutOfMemory(_) => PyMemoryError::new_err(msg),
        Error::Cuda(_) | Error::Numeric(_) => PyRuntimeError::new_err(msg),
    }
}

fn shape3(a: &PyReadonlyArray3<'_, f32>) -> [usize; 3] {
    let s = a.shape();
    [s[0], s[1], s[2]]
}

/// The array's values without a copy (the Python side passes C-contiguous float32).
fn slice<'a>(a: &'a PyReadonlyArray3<'_, f32>, what: &str) -> PyResult<&'a [f32]> {
    a.as_slice()
        .map_err(|_| PyValueError::new_err(format!("{what} must be C-contiguous (use numpy.ascontiguousarray)")))
}

/// z-major values as a numpy array of `dims` (the vector becomes the array's memory).
fn to_array<'py>(py: Python<'py>, dims: [usize; 3], data: Vec<f32>) -> PyResult<Bound<'py, PyArray3<f32>>> {
    PyArray1::from_vec(py, data).reshape(dims)
}

/// A GPU predictor kept between calls: opening one creates a CUDA context, compiles or
/// loads the kernels and uploads the weights, which a call per block must not repeat.
struct CachedGpu {
    device: Device,
    fp16: bool,
    predictor: Box<dyn TilePredictor + Send>,
}

/// An RLN model loaded from a .safetensors file.
#[pyclass(module = "rln_engine._rln_engine", name = "NativeModel", frozen)]
struct NativeModel {
    model: EngineModel<f32>,
    path: PathBuf,
    /// The last GPU predictor (calls on one model and GPU take turns; CPU calls run
    /// concurrently, each with its own predictor).
    gpu: Mutex<Option<CachedGpu>>,
}

impl NativeModel {
    /// Runs the network on `device`; the note says why "auto" fell back to the CPU.
    fn run(
        &self,
        device: Device,
        fp16: bool,
        dims: [usize; 3],
        data: &[f32],
        tile: Option<[usize; 3]>,
        norm: Option<Affine>,
    ) -> rln_engine::Result<(Vec<f32>, Option<String>)> {
        if device != Device::Cpu {
            let mut cache = self.gpu.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(c) = cache.as_mut().filter(|c| c.device == device && c.fp16 == fp16) {
                return Ok((
                    deconvolve_slice(c.predictor.as_mut(), &self.model, dims, data, tile, norm)?,
                    None,
                ));
            }
            *cache = None; // release the old device's memory first
            let (mut predictor, note) = open_predictor(&self.model, device, fp16)?;
            if note.is_none() {
                let out = deconvolve_slice(predictor.as_mut(), &self.model, dims, data, tile, norm)?;
                *cache = Some(CachedGpu {
                    device,
                    fp16,
                    predictor,
                });
                return Ok((out, None));
            }
            // "auto" fell back to the CPU: nothing to keep
            return Ok((
                deconvolve_slice(predictor.as_mut(), &self.model, dims, data, tile, norm)?,
                note,
            ));
        }
        let (mut predictor, note) = open_predictor(&self.model, Device::Cpu, fp16)?;
        Ok((
            deconvolve_slice(predictor.as_mut(), &self.model, dims, data, tile, norm)?,
            note,
        ))
    }
}

#[pymethods]
impl NativeModel {
    #[staticmethod]
    fn load(py: Python<'_>, path: PathBuf) -> PyResult<Self> {
        let model = py.detach(|| EngineModel::<f32>::load(&path)).map_err(to_py)?;
        Ok(NativeModel {
            model,
            path,
            gpu: Mutex::new(None),
        })
    }

    #[getter]
    fn path(&self) -> PathBuf {
        self.path.clone()
    }

    #[getter]
    fn percentiles(&self) -> (f64, f64) {
        let p = self.model.config.norm_percentiles;
        (p[0], p[1])
    }

    #[getter]
    fn variant(&self) -> String {
        format!("{:?}", self.model.config.variant)
    }

    #[getter]
    fn provenance(&self) -> String {
        self.model.config.provenance.clone()
    }

    /// The low and high percentile values of the model's normalization of `array`.
    fn normalization(&self, py: Python<'_>, array: PyReadonlyArray3<'_, f32>) -> PyResult<(f64, f64)> {
        let dims = shape3(&array);
        let data = slice(&array, "the array")?;
        let a = py
            .detach(|| global_normalization(&self.model, dims, data))
            .map_err(to_py)?;
        Ok((a.p_lo_value, a.p_hi_value))
    }

    /// Deconvolves a C-contiguous float32 z,y,x array; returns the result and a note
    /// when device "auto" fell back to the CPU.
    #[pyo3(signature = (array, device, fp16, tile, normalization))]
    fn deconvolve<'py>(
        &self,
        py: Python<'py>,
        array: PyReadonlyArray3<'py, f32>,
        device: &str,
        fp16: bool,
        tile: Option<(usize, usize, usize)>,
        normalization: Option<(f64, f64)>,
    ) -> PyResult<(Bound<'py, PyArray3<f32>>, Option<String>)> {
        let device: Device = device.parse().map_err(to_py)?;
        let dims = shape3(&array);
        let data = slice(&array, "the array")?;
        let norm = normalization
            .map(|(lo, hi)| normalization_from_values(lo, hi))
            .transpose()
            .map_err(to_py)?;
        let tile = tile.map(|t| [t.0, t.1, t.2]);
        let (out, note) = py
            .detach(|| self.run(device, fp16, dims, data, tile, norm))
            .map_err(to_py)?;
        Ok((to_array(py, dims, out)?, note))
    }
}

/// Richardson–Lucy deconvolution (matched back projector) of float32 arrays.
#[pyfunction]
fn richardson_lucy<'py>(
    py: Python<'py>,
    array: PyReadonlyArray3<'py, f32>,
    psf: PyReadonlyArray3<'py, f32>,
    iterations: usize,
    background: f32,
) -> PyResult<Bound<'py, PyArray3<f32>>> {
    let image = Volume::new(shape3(&array), slice(&array, "the array")?.to_vec()).map_err(to_py)?;
    let kernel = Volume::new(shape3(&psf), slice(&psf, "the PSF")?.to_vec()).map_err(to_py)?;
    let out = py
        .detach(|| -> rln_engine::Result<Volume> {
            image.check_finite("the array")?;
            kernel.check_finite("the PSF")?;
            let cfg = RlConfig {
                iterations,
                background,
                ..RlConfig::default()
            };
            let out = rl(&image, &kernel, &cfg)?;
            if let Some((at, v)) = out.first_non_finite() {
                return Err(Error::Numeric(format!(
                    "Richardson–Lucy produced a non-finite value ({v}) at voxel {at:?}; check the PSF (positive) and the input's range"
                )));
            }
            Ok(out)
        })
        .map_err(to_py)?;
    to_array(py, out.dims, out.data)
}

/// A Gibson–Lanni widefield PSF from its parameters as JSON (the field names of
/// `rln_engine::imaging::psf::GibsonLanni`); unit sum.
#[pyfunction]
fn gibson_lanni<'py>(py: Python<'py>, params_json: &str) -> PyResult<Bound<'py, PyArray3<f32>>> {
    let p: GibsonLanni =
        serde_json::from_str(params_json).map_err(|e| PyValueError::new_err(format!("PSF parameters: {e}")))?;
    let v = py
        .detach(|| {
            p.validate()?;
            psf::generate(&PsfSpec::GibsonLanni(p))
        })
        .map_err(to_py)?;
    to_array(py, v.dims, v.data)
}

fn same_shape(a: &PyReadonlyArray3<'_, f32>, b: &PyReadonlyArray3<'_, f32>) -> PyResult<[usize; 3]> {
    let (da, db) = (shape3(a), shape3(b));
    if da != db {
        return Err(PyValueError::new_err(format!(
            "the arrays differ in shape: {da:?} vs {db:?}; compare volumes of one size"
        )));
    }
    Ok(da)
}

fn checked_range(gt: &[f32], data_range: Option<f64>) -> PyResult<f64> {
    if let Some(i) = gt.iter().position(|v| !v.is_finite()) {
        return Err(PyValueError::new_err(format!(
            "the ground truth holds a non-finite value ({}) at flat index {i}",
            gt[i]
        )));
    }
    let r = data_range.unwrap_or_else(|| {
        let (lo, hi) = gt
            .iter()
            .fold((f32::INFINITY, f32::NEG_INFINITY), |(l, h), &v| (l.min(v), h.max(v)));
        (hi - lo) as f64
    });
    if !(r > 0.0 && r.is_finite()) {
        return Err(PyValueError::new_err(format!(
            "data range must be positive (got {r}; a constant ground truth needs an explicit data_range)"
        )));
    }
    Ok(r)
}

/// What both metrics check: same shapes, a usable data range, a finite prediction.
/// Returns the dims, both volumes' values and the data range.
fn metric_inputs<'a>(
    gt: &'a PyReadonlyArray3<'_, f32>,
    pred: &'a PyReadonlyArray3<'_, f32>,
    data_range: Option<f64>,
) -> PyResult<([usize; 3], &'a [f32], &'a [f32], f64)> {
    let dims = same_shape(gt, pred)?;
    let (g, p) = (slice(gt, "gt")?, slice(pred, "pred")?);
    let r = checked_range(g, data_range)?;
    if p.iter().any(|v| !v.is_finite()) {
        return Err(PyValueError::new_err("the prediction holds non-finite values"));
    }
    Ok((dims, g, p, r))
}

/// SSIM of 3D volumes (scikit-image's structural_similarity, Gaussian window σ 1.5).
#[pyfunction]
#[pyo3(signature = (gt, pred, data_range=None))]
fn ssim(
    py: Python<'_>,
    gt: PyReadonlyArray3<'_, f32>,
    pred: PyReadonlyArray3<'_, f32>,
    data_range: Option<f64>,
) -> PyResult<f64> {
    let (dims, g, p, r) = metric_inputs(&gt, &pred, data_range)?;
    py.detach(|| metrics::ssim(dims, g, p, r)).map_err(to_py)
}

/// PSNR in dB (scikit-image's peak_signal_noise_ratio).
#[pyfunction]
#[pyo3(signature = (gt, pred, data_range=None))]
fn psnr(
    py: Python<'_>,
    gt: PyReadonlyArray3<'_, f32>,
    pred: PyReadonlyArray3<'_, f32>,
    data_range: Option<f64>,
) -> PyResult<f64> {
    let (_, g, p, r) = metric_inputs(&gt, &pred, data_range)?;
    Ok(py.detach(|| metrics::psnr(g, p, r)))
}

/// `rln-engine train` with these flags (the CLI's, without "train"); `command_line`
/// is recorded as the model's provenance.
#[pyfunction]
fn train(py: Python<'_>, flags: Vec<String>, command_line: String) -> PyResult<()> {
    let args = rln_engine::train::command::parse_args(&flags).map_err(|e| PyValueError::new_err(e.to_string()))?;
    let summary = py
        .detach(|| rln_engine::train::command::train_as(&args, &command_line))
        .map_err(to_py)?;
    println!("{summary}");
    Ok(())
}

/// An option's value through the CLI's parser of it, or a `ValueError` naming the
/// keyword, the value and what is expected.
fn parsed<T>(keyword: &str, value: &str, parse: impl Fn(&str) -> Result<T, String>) -> PyResult<T> {
    parse(value).map_err(|e| PyValueError::new_err(format!("{keyword}={value:?}: {e}")))
}

fn parsed_opt<T>(keyword: &str, value: Option<&str>, parse: impl Fn(&str) -> Result<T, String>) -> PyResult<Option<T>> {
    value.map(|v| parsed(keyword, v, parse)).transpose()
}

/// `rln-engine infer MODEL INPUT -o OUTPUT` with the CLI's options (the Python wrapper
/// passes sizes, tuples, blocks and regions as the command line's text, so that they
/// are checked by the same parsers): streams the volume through the network with
/// bounded memory (`rln_engine::infer::stream::infer_file`). Returns the run's summary
/// as JSON (what `infer --json` prints) and a note when device "auto" ran on the CPU.
#[pyfunction]
#[pyo3(signature = (
    model_path, input, output, *, input2, device, devices, fp16, memory, tile, overlap,
    context, normalize, percentiles, norm_stats, rescale, output_dtype, chunks,
    create_only, block, region, resume, channel, time
))]
#[allow(clippy::too_many_arguments)]
fn infer_file(
    py: Python<'_>,
    model_path: PathBuf,
    input: PathBuf,
    output: PathBuf,
    input2: Option<PathBuf>,
    device: &str,
    devices: Option<Vec<usize>>,
    fp16: bool,
    memory: Option<&str>,
    tile: Option<&str>,
    overlap: &str,
    context: usize,
    normalize: &str,
    percentiles: Option<&str>,
    norm_stats: Option<PathBuf>,
    rescale: bool,
    output_dtype: &str,
    chunks: Option<&str>,
    create_only: bool,
    block: Option<&str>,
    region: Option<&str>,
    resume: bool,
    channel: Option<usize>,
    time: Option<usize>,
) -> PyResult<(String, Option<String>)> {
    use rln_engine::args::{check_fp16_on_cpu, check_tile, guard_outputs, parse_bytes, Output, VOLUME_EXTENSIONS};
    use rln_engine::args::{parse_dims, parse_range};
    use rln_engine::infer::stitch::NormalizeMode;
    use rln_engine::infer::stream::{self as streaming, plan, InferFileOptions, PredictorChoice};

    let device: Device = device.parse().map_err(to_py)?;
    let output_dtype: OutputDtype = output_dtype.parse().map_err(to_py)?;
    let normalize = match normalize {
        "global" => NormalizeMode::Global,
        "per-tile" | "per_tile" => NormalizeMode::PerTile,
        other => {
            return Err(PyValueError::new_err(format!(
                "normalize={other:?}: give \"global\" or \"per-tile\""
            )))
        }
    };
    let memory = parsed_opt("memory", memory, parse_bytes)?;
    let tile = parsed_opt("tile", tile, parse_dims)?;
    let overlap = parsed("overlap", overlap, parse_dims)?;
    let percentiles = parsed_opt("percentiles", percentiles, parse_range)?;
    let chunks = parsed_opt("chunks", chunks, parse_dims)?;
    let block = parsed_opt("block", block, plan::parse_block)?;
    let region = parsed_opt("region", region, plan::parse_region)?;
    check_tile(tile).map_err(to_py)?;
    check_fp16_on_cpu(fp16, device == Device::Cpu).map_err(to_py)?;
    let precision = if fp16 { Precision::F16 } else { Precision::F32 };
    let predictor = match (&devices, device) {
        (Some(_), Device::Cpu) => {
            return Err(PyValueError::new_err(
                "devices= names CUDA devices; it does not go with device=\"cpu\"",
            ))
        }
        (Some(d), _) => PredictorChoice::Cuda {
            devices: d.clone(),
            precision,
        },
        (None, Device::Cpu) => PredictorChoice::Cpu,
        (None, Device::Cuda(n)) => PredictorChoice::Cuda {
            devices: vec![n],
            precision,
        },
        (None, Device::Auto) => PredictorChoice::Auto { precision },
    };

    let mut o = InferFileOptions::new(model_path, input, output);
    o.input2 = input2;
    o.predictor = predictor;
    o.percentiles = percentiles.map(|(lo, hi)| [lo, hi]);
    o.normalize = normalize;
    o.rescale_output = rescale;
    o.output_dtype = output_dtype;
    o.chunks = chunks;
    o.memory = memory;
    o.tile = tile;
    o.overlap = overlap;
    o.context = context;
    o.norm_stats = norm_stats;
    o.create_only = create_only;
    o.block = block;
    o.region = region;
    o.resume = resume;
    o.read_options = ReadOptions {
        channel,
        time,
        ..Default::default()
    };
    let summary = py.detach(|| -> PyResult<streaming::InferSummary> {
        // as the CLI: no output may be an input; a whole run locks its output
        // against a second writer, split runs share a store
        let mut inputs = vec![("the model", o.model.as_path()), ("the input", o.input.as_path())];
        inputs.extend(o.input2.as_deref().map(|p| ("the second view input2", p)));
        inputs.extend(
            o.norm_stats
                .as_deref()
                .filter(|p| p.exists())
                .map(|p| ("the norm_stats file", p)),
        );
        let split = o.block.is_some() || o.region.is_some() || o.resume;
        let _guard = if split {
            rln_engine::fsutil::refuse_overwriting_inputs(&[("the output", o.output.as_path())], &inputs)
                .map_err(to_py)?;
            None
        } else {
            let out = Output {
                role: "the output",
                path: &o.output,
                extensions: VOLUME_EXTENSIONS,
            };
            Some(guard_outputs(&[out], &inputs).map_err(to_py)?)
        };
        streaming::infer_file(&o).map_err(to_py)
    })?;
    let note = summary.device_note.clone();
    let json =
        serde_json::to_string(&summary).map_err(|e| PyRuntimeError::new_err(format!("the run's summary: {e}")))?;
    Ok((json, note))
}

#[pyfunction]
fn cuda_available() -> bool {
    rln_engine::backend::cuda::available()
}

/// CPU threads of all later work (0: one per core); only the first call takes effect.
#[pyfunction]
fn set_threads(n: usize) {
    rln_engine::set_threads(n)
}

#[pyfunction]
fn threads() -> usize {
    rln_engine::threads()
}

#[pymodule]
fn _rln_engine(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<NativeModel>()?;
    m.add_function(wrap_pyfunction!(richardson_lucy, m)?)?;
    m.add_function(wrap_pyfunction!(gibson_lanni, m)?)?;
    m.add_function(wrap_pyfunction!(ssim, m)?)?;
    m.add_function(wrap_pyfunction!(psnr, m)?)?;
    m.add_function(wrap_pyfunction!(train, m)?)?;
    m.add_function(wrap_pyfunction!(infer_file, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_available, m)?)?;
    m.add_function(wrap_pyfunction!(set_threads, m)?)?;
    m.add_function(wrap_pyfunction!(threads, m)?)?;
    m.add("RECEPTIVE_RADIUS", rln_engine::infer::tiling::RECEPTIVE_RADIUS)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("HDF5", cfg!(feature = "hdf5"))?;
    Ok(())
}

//! Reading and writing volumes: TIFF stacks (`.tif`, `.tiff`), folders of 2D slices,
//! and HDF5 datasets (`.h5`, `.hdf5`; cargo feature `hdf5`).
//!
//! HDF5 paths name the dataset after a colon: `file.h5:/group/data`. Without one, reading
//! takes the file's only 3D dataset and writing uses `/data`. The voxel size is kept in
//! the dataset attribute `element_size_um` (z, y, x), the convention of ilastik and
//! Fiji's HDF5 plugins; metadata JSON in the attribute `rln_metadata`.

pub use super::format::{check_output_range, split_dataset_path, OutputDtype, ReadOptions};
use super::tiff_io;
use super::volume::Volume;
use crate::error::{Error, Result};
use std::path::Path;

/// How to write a volume.
#[derive(Clone, Debug)]
pub struct WriteOptions {
    pub dtype: OutputDtype,
    /// TIFF: switch to BigTIFF when the estimated file size reaches this many bytes.
    pub bigtiff_threshold: u64,
    /// HDF5 dataset (overrides a `file.h5:/dataset` suffix; default `/data`).
    pub dataset: Option<String>,
}

impl WriteOptions {
    pub fn new(dtype: OutputDtype) -> Self {
        WriteOptions {
            dtype,
            bigtiff_threshold: tiff_io::BIGTIFF_THRESHOLD,
            dataset: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Tiff,
    Hdf5,
    Folder,
}

fn kind_of(path: &Path) -> Result<Kind> {
    if path.is_dir() {
        return Ok(Kind::Folder);
    }
    let ext = path
        .extension()
        .map(|e| e.to_string_lossy().to_lowercase())
        .unwrap_or_default();
    match ext.as_str() {
        "tif" | "tiff" => Ok(Kind::Tiff),
        "h5" | "hdf5" => Ok(Kind::Hdf5),
        _ => Err(Error::invalid(format!(
            "{}: unknown volume format (use .tif/.tiff, .h5/.hdf5[:/dataset], or a folder of 2D TIFF slices)",
            path.display()
        ))),
    }
}

/// Reads a 3D volume from a TIFF stack, a folder of 2D slices or an HDF5 dataset.
pub fn read_volume(path: impl AsRef<Path>) -> Result<Volume> {
    read_volume_with(path, &ReadOptions::default())
}

pub fn read_volume_with(path: impl AsRef<Path>, opts: &ReadOptions) -> Result<Volume> {
    let (file, ds) = split_dataset_path(path.as_ref());
    if !file.exists() {
        return Err(Error::io(
            &file,
            std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or folder"),
        ));
    }
    let vol = match kind_of(&file)? {
        Kind::Tiff => tiff_io::read_tiff(&file, opts)?,
        Kind::Folder => read_slice_folder(&file, opts)?,
        Kind::Hdf5 => read_hdf5(&file, opts.dataset.clone().or(ds).as_deref(), opts)?,
    };
    vol.check_voxel_size(&file.display().to_string())?;
    Ok(vol)
}

/// Writes `vol` as `dtype`, the format chosen by the extension of `path`.
pub fn write_volume(path: impl AsRef<Path>, vol: &Volume, dtype: OutputDtype) -> Result<()> {
    write_volume_with(path, vol, &WriteOptions::new(dtype))
}

pub fn write_volume_with(path: impl AsRef<Path>, vol: &Volume, opts: &WriteOptions) -> Result<()> {
    let (file, ds) = split_dataset_path(path.as_ref());
    check_output_range(&vol.data, opts.dtype, [0; 3], vol.dims, &file.display().to_string())?;
    // a whole volume can also be checked as a whole: nonzero values that all round to 0
    check_representable(&vol.data, opts.dtype).map_err(|e| match e {
        Error::InvalidInput(m) => Error::invalid(format!("{}: {m}", file.display())),
        e => e,
    })?;
    match kind_of(&file) {
        Ok(Kind::Tiff) => tiff_io::write_tiff(&file, vol, opts.dtype, opts.bigtiff_threshold),
        Ok(Kind::Hdf5) => write_hdf5(
            &file,
            opts.dataset.clone().or(ds).as_deref().unwrap_or("/data"),
            vol,
            opts.dtype,
        ),
        Ok(Kind::Folder) => Err(Error::invalid(format!(
            "{} is a folder; give a file name",
            file.display()
        ))),
        Err(e) => Err(e),
    }
}

/// Largest finite float16 value.
pub const F16_MAX: f32 = 65504.0;

/// Errors unless every value can be stored as `dtype` without silent damage: no NaN or
/// infinity in any type; float16 within ±65504 (beyond it becomes ±inf); uint16 within
/// [0, 65535] after rounding (beyond it would be clamped), and not a volume whose nonzero
/// values all round to 0 (e.g. a PSF, which sums to 1). The message names the offending
/// value and suggests f32; the writers never rescale behind the user's back.
pub fn check_representable(data: &[f32], dtype: OutputDtype) -> Result<()> {
    use rayon::prelude::*;
    let (lo, hi, nonfinite) = data
        .par_chunks(1 << 16)
        .map(|c| {
            c.iter()
                .fold((f32::INFINITY, f32::NEG_INFINITY, None), |(lo, hi, nf), &v| {
                    if v.is_finite() {
                        (lo.min(v), hi.max(v), nf)
                    } else {
                        (lo, hi, nf.or(Some(v)))
                    }
                })
        })
        .reduce(
            || (f32::INFINITY, f32::NEG_INFINITY, None),
            |a, b| (a.0.min(b.0), a.1.max(b.1), a.2.or(b.2)),
        );
    if let Some(v) = nonfinite {
        return Err(Error::Numeric(format!(
            "the volume holds {v}; non-finite values are never written"
        )));
    }
    if lo > hi {
        return Ok(()); // empty
    }
    match dtype {
        OutputDtype::F32 => Ok(()),
        OutputDtype::F16 if lo < -F16_MAX || hi > F16_MAX => Err(Error::invalid(format!(
            "values range over [{lo}, {hi}], beyond float16's ±{F16_MAX} (they would become infinite): \
             write float32 (--output-dtype f32 / --dtype f32) or scale the data down first"
        ))),
        OutputDtype::U16 if lo < -0.5 || hi >= 65535.5 => Err(Error::invalid(format!(
            "values range over [{lo}, {hi}], outside uint16's 0…65535 (they would be clamped): \
             write float32 (--output-dtype f32 / --dtype f32) or rescale the data first"
        ))),
        OutputDtype::U16 if hi < 0.5 && (lo != 0.0 || hi != 0.0) => Err(Error::invalid(format!(
            "every value is below 0.5 (largest {hi}), so uint16 would store all zeros: \
             write float32 (--dtype f32) or scale the data up first"
        ))),
        _ => Ok(()),
    }
}

/// The 2D TIFF files of a folder, sorted by name, read as consecutive z planes.
pub fn read_slice_folder(dir: &Path, opts: &ReadOptions) -> Result<Volume> {
    let files = super::stream::folder::slice_files(dir)?;
    if files.is_empty() {
        return Err(Error::invalid(format!(
            "{}: folder holds no .tif/.tiff slices",
            dir.display()
        )));
    }
    let slice_opts = ReadOptions {
        allow_2d: true,
        check_finite: false,
        ..opts.clone()
    };
    let mut out: Option<Volume> = None;
    for f in &files {
        let s = tiff_io::read_tiff(f, &slice_opts)?;
        if s.dims[0] > 1 {
            return Err(Error::format(
                f,
                format!(
                    "is a 3D stack ({}) in the folder {}: a folder is read as 2D slices, one per z plane; \
                     give the stack's file itself, or move the stacks into separate folders",
                    s.shape_str(),
                    dir.display()
                ),
            ));
        }
        match &mut out {
            None => out = Some(s),
            Some(v) => {
                if s.dims[1..] != v.dims[1..] {
                    return Err(Error::format(
                        f,
                        format!(
                            "slice is {}×{} but {} is {}×{}; all slices must have one size",
                            s.dims[1],
                            s.dims[2],
                            files[0].display(),
                            v.dims[1],
                            v.dims[2]
                        ),
                    ));
                }
                v.data.extend_from_slice(&s.data);
                v.dims[0] += s.dims[0];
            }
        }
    }
    let vol = out.expect("at least one slice");
    if vol.dims[0] <= 1 && !opts.allow_2d {
        return Err(Error::invalid(format!(
            "{}: folder holds a single 2D slice ({}×{}); RLN needs a 3D stack",
            dir.display(),
            vol.dims[1],
            vol.dims[2]
        )));
    }
    if opts.check_finite {
        vol.check_finite(&dir.display().to_string())?;
    }
    Ok(vol)
}

#[cfg(not(feature = "hdf5"))]
fn read_hdf5(path: &Path, _ds: Option<&str>, _opts: &ReadOptions) -> Result<Volume> {
    Err(Error::invalid(format!(
        "{}: this build has no HDF5 support; rebuild with `cargo build --features hdf5` (needs libhdf5-dev)",
        path.display()
    )))
}

#[cfg(not(feature = "hdf5"))]
fn write_hdf5(path: &Path, _ds: &str, _vol: &Volume, _dtype: OutputDtype) -> Result<()> {
    read_hdf5(path, None, &ReadOptions::default()).map(|_| ())
}

#[cfg(feature = "hdf5")]
fn read_hdf5(path: &Path, ds: Option<&str>, opts: &ReadOptions) -> Result<Volume> {
    super::hdf5_io::read_hdf5(path, ds, opts)
}

#[cfg(feature = "hdf5")]
fn write_hdf5(path: &Path, ds: &str, vol: &Volume, dtype: OutputDtype) -> Result<()> {
    super::hdf5_io::write_hdf5(path, ds, vol, dtype)
}

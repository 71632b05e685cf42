//! HDF5 datasets as streams (feature `hdf5`): hyperslab reads of any region, and a
//! chunked writer (temporary file renamed by `finish`). The voxel size lives in the
//! dataset attribute `element_size_um` (z, y, x), metadata JSON in `rln_metadata`, as in
//! [`crate::imaging::io`]. A 4D dataset is channels first; `--channel` picks one.

use super::{check_region_finite, Region, VolumeInfo, VolumeReader, VolumeWriter, WriterSpec};
use crate::error::{Error, Result};
use crate::fsutil::{check_output_dir, temp_path_for};
use crate::imaging::format::to_u16;
use crate::imaging::format::{OutputDtype, ReadOptions};
use hdf5::types::{TypeDescriptor, VarLenUnicode};
use hdf5_metno as hdf5;
use std::path::{Path, PathBuf};

fn h5err(path: &Path, what: &str, e: hdf5::Error) -> Error {
    Error::format(path, format!("HDF5 {what}: {e}"))
}

fn find_3d(g: &hdf5::Group, prefix: &str, out: &mut Vec<String>) {
    for name in g.member_names().unwrap_or_default() {
        let full = format!("{prefix}/{name}");
        if let Ok(ds) = g.dataset(&name) {
            if ds.ndim() == 3 {
                out.push(full);
            }
        } else if let Ok(sub) = g.group(&name) {
            find_3d(&sub, &full, out);
        }
    }
}

/// The dataset a volume is read from: `dataset` when named, else the file's only 3D
/// dataset (an error naming them when there are several, or none). Both HDF5 readers
/// (this streaming one and the whole-volume `crate::imaging::io`) choose through it.
pub(crate) fn select_dataset(file: &hdf5::File, path: &Path, dataset: Option<&str>) -> Result<(String, hdf5::Dataset)> {
    let name = match dataset {
        Some(d) => d.to_string(),
        None => {
            let mut found = Vec::new();
            find_3d(file, "", &mut found);
            match found.len() {
                1 => found.remove(0),
                0 => {
                    return Err(Error::format(
                        path,
                        "no 3D dataset in the file; name one as FILE.h5:/dataset",
                    ))
                }
                _ => {
                    return Err(Error::invalid(format!(
                        "{}: several 3D datasets ({}); choose one as FILE.h5:/dataset",
                        path.display(),
                        found.join(", ")
                    )))
                }
            }
        }
    };
    let ds = file
        .dataset(&name)
        .map_err(|e| Error::format(path, format!("dataset {name}: {e}")))?;
    Ok((name, ds))
}

/// The voxel size (µm, z, y, x; attribute `element_size_um`) and metadata JSON
/// (attribute `rln_metadata`) of a dataset, where present and readable.
pub(crate) fn read_attributes(ds: &hdf5::Dataset) -> (Option<[f64; 3]>, Option<String>) {
    let voxel_size = ds
        .attr("element_size_um")
        .and_then(|a| a.read_raw::<f64>())
        .ok()
        .filter(|v| v.len() == 3)
        .map(|v| [v[0], v[1], v[2]]);
    let metadata = ds
        .attr("rln_metadata")
        .and_then(|a| a.read_scalar::<VarLenUnicode>())
        .ok()
        .map(|s| s.as_str().to_string());
    (voxel_size, metadata)
}

/// Writes the attributes [`read_attributes`] reads (`tmp`: the file, for messages).
pub(crate) fn write_attributes(
    ds: &hdf5::Dataset,
    voxel_size: Option<[f64; 3]>,
    metadata: Option<&str>,
    tmp: &Path,
) -> Result<()> {
    let e = |e| h5err(tmp, "write attributes", e);
    if let Some(vs) = voxel_size {
        ds.new_attr::<f64>()
            .shape(3)
            .create("element_size_um")
            .and_then(|a| a.write_raw(&vs))
            .map_err(e)?;
    }
    if let Some(m) = metadata {
        let s: VarLenUnicode = m.parse().map_err(|err| Error::invalid(format!("metadata: {err}")))?;
        ds.new_attr::<VarLenUnicode>()
            .create("rln_metadata")
            .and_then(|a| a.write_scalar(&s))
            .map_err(e)?;
    }
    Ok(())
}

/// One dataset of an HDF5 file read by hyperslabs.
pub struct Hdf5Reader {
    path: PathBuf,
    name: String,
    ds: hdf5::Dataset,
    /// Channel index of a 4D (c, z, y, x) dataset.
    channel: Option<usize>,
    info: VolumeInfo,
    unit: [usize; 3],
    check_finite: bool,
}

impl Hdf5Reader {
    pub fn open(path: &Path, dataset: Option<&str>, opts: &ReadOptions) -> Result<Self> {
        if std::fs::metadata(path).map_err(|e| Error::io(path, e))?.len() == 0 {
            return Err(Error::format(path, "file is empty"));
        }
        let file = hdf5::File::open(path).map_err(|e| h5err(path, "open", e))?;
        close_on_exec(&file);
        let (name, ds) = select_dataset(&file, path, dataset)?;
        let dtype = match ds.dtype().and_then(|t| t.to_descriptor()) {
            Ok(TypeDescriptor::Integer(s)) => format!("i{}", s as usize * 8),
            Ok(TypeDescriptor::Unsigned(s)) => format!("u{}", s as usize * 8),
            Ok(TypeDescriptor::Float(s)) => format!("f{}", s as usize * 8),
            Ok(other) => {
                return Err(Error::format(
                    path,
                    format!("dataset {name} holds {other:?} values; a volume needs integers or floats"),
                ))
            }
            Err(e) => return Err(h5err(path, &format!("type of {name}"), e)),
        };
        let shape = ds.shape();
        let (dims, channel) = match shape.len() {
            3 => ([shape[0], shape[1], shape[2]], None),
            4 => match opts.channel {
                Some(c) if c < shape[0] => ([shape[1], shape[2], shape[3]], Some(c)),
                _ => {
                    return Err(Error::invalid(format!(
                        "{}:{name}: 4D dataset {shape:?} (channels first); choose a channel with --channel 0..{}",
                        path.display(),
                        shape[0].saturating_sub(1)
                    )))
                }
            },
            2 if opts.allow_2d => ([1, shape[0], shape[1]], None),
            2 => {
                return Err(Error::invalid(format!(
                    "{}:{name}: input is 2D ({}×{}); RLN needs a 3D stack",
                    path.display(),
                    shape[0],
                    shape[1]
                )))
            }
            _ => {
                return Err(Error::invalid(format!(
                    "{}:{name}: dataset has shape {shape:?}; RLN needs a 3D stack",
                    path.display()
                )))
            }
        };
        if dims[0] <= 1 && !opts.allow_2d {
            return Err(Error::invalid(format!(
                "{}:{name}: input is 2D ({}×{}); RLN needs a 3D stack",
                path.display(),
                dims[1],
                dims[2]
            )));
        }
        let unit = match ds.chunk() {
            Some(c) if c.len() == shape.len() => {
                let n = c.len();
                [c[n - 3], c[n - 2], c[n - 1]]
            }
            _ => [1, dims[1], dims[2]],
        };
        let (voxel_size, metadata) = read_attributes(&ds);
        Ok(Hdf5Reader {
            path: path.to_path_buf(),
            name,
            ds,
            channel,
            info: VolumeInfo {
                dims,
                voxel_size,
                dtype,
                metadata,
            },
            unit,
            check_finite: opts.check_finite,
        })
    }
}

impl Hdf5Reader {
    /// The dataset's path in the file (e.g. "/group/vol").
    pub fn dataset_name(&self) -> &str {
        &self.name
    }
}

impl VolumeReader for Hdf5Reader {
    fn info(&self) -> &VolumeInfo {
        &self.info
    }
    fn read_unit(&self) -> [usize; 3] {
        self.unit
    }
    fn read_region(&self, region: Region, dst: &mut [f32]) -> Result<()> {
        region.check_buffer(self.info.dims, dst.len(), &self.path.display().to_string())?;
        let [z, y, x] = region.start;
        let e = region.end();
        let what = format!(
            "reading {}:{} region {:?}+{:?}",
            self.path.display(),
            self.name,
            region.start,
            region.shape
        );
        let arr: ndarray::Array3<f32> = match (self.info.dims[0], self.channel) {
            (_, Some(c)) => self.ds.read_slice((c, z..e[0], y..e[1], x..e[2])),
            _ if self.ds.ndim() == 2 => self
                .ds
                .read_slice::<f32, _, ndarray::Ix2>((y..e[1], x..e[2]))
                .map(|a| a.insert_axis(ndarray::Axis(0))),
            _ => self.ds.read_slice((z..e[0], y..e[1], x..e[2])),
        }
        .map_err(|e| Error::format(&self.path, format!("{what}: {e}")))?;
        for (d, v) in dst.iter_mut().zip(arr.iter()) {
            *d = *v;
        }
        if self.check_finite {
            check_region_finite(dst, region, &self.path.display().to_string())?;
        }
        Ok(())
    }
}

/// Marks an open HDF5 file's descriptor close-on-exec. libhdf5 opens files without
/// O_CLOEXEC and locks them (flock), so a process spawned while one is open (a Slurm
/// helper, a test running the CLI) inherits the descriptor and the lock: the file stays
/// locked until that child exits, and opening it again fails with errno 11 (seen in CI).
/// A fork between libhdf5's open and this call can still leak it: nothing closes that window.
pub(crate) fn close_on_exec(file: &hdf5::File) {
    #[cfg(unix)]
    {
        // only the default (sec2) driver's handle is a plain int descriptor
        if !matches!(
            file.access_plist().map(|p| p.driver()),
            Ok(hdf5::file::FileDriver::Sec2)
        ) {
            return;
        }
        let mut handle: *mut std::ffi::c_void = std::ptr::null_mut();
        // SAFETY: a valid file id; under the crate's global HDF5 lock like its own calls
        let status = hdf5::sync::sync(|| unsafe {
            hdf5_metno_sys::h5f::H5Fget_vfd_handle(file.id(), hdf5_metno_sys::h5p::H5P_DEFAULT, &mut handle)
        });
        if status >= 0 && !handle.is_null() {
            // SAFETY: for sec2 the handle points at the descriptor (an int) owned by the file
            unsafe {
                let fd = *(handle as *const libc::c_int);
                let flags = libc::fcntl(fd, libc::F_GETFD);
                if flags >= 0 {
                    libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC);
                }
            }
        }
    }
    #[cfg(not(unix))]
    let _ = file;
}

/// A chunked 3D dataset written by regions into a temporary file, renamed by `finish`.
pub struct Hdf5Writer {
    path: PathBuf,
    tmp: PathBuf,
    file: Option<hdf5::File>,
    /// Dropped before the file is closed: HDF5 keeps a file (and its lock) open while any
    /// of its objects is, and a reader opening the renamed file could find it locked.
    ds: Option<hdf5::Dataset>,
    spec: WriterSpec,
    chunks: [usize; 3],
    finished: bool,
}

impl Hdf5Writer {
    pub fn create(path: &Path, dataset: &str, spec: &WriterSpec) -> Result<Self> {
        super::check_spec(spec, path)?;
        check_output_dir(path)?;
        let tmp = temp_path_for(path);
        let c = spec.chunks.unwrap_or(super::zarr::DEFAULT_CHUNKS);
        let chunks = [0, 1, 2].map(|i| c[i].min(spec.dims[i]).max(1));
        let made = (|| -> Result<(hdf5::File, hdf5::Dataset)> {
            let e = |e| h5err(&tmp, "create", e);
            let file = hdf5::File::create(&tmp).map_err(e)?;
            close_on_exec(&file);
            let ds = match spec.dtype {
                OutputDtype::F32 => file.new_dataset::<f32>().chunk(chunks).shape(spec.dims).create(dataset),
                OutputDtype::U16 => file.new_dataset::<u16>().chunk(chunks).shape(spec.dims).create(dataset),
                OutputDtype::F16 => file
                    .new_dataset::<half::f16>()
                    .chunk(chunks)
                    .shape(spec.dims)
                    .create(dataset),
            }
            .map_err(e)?;
            write_attributes(&ds, spec.voxel_size, spec.metadata.as_deref(), &tmp)?;
            Ok((file, ds))
        })();
        match made {
            Ok((file, ds)) => Ok(Hdf5Writer {
                path: path.to_path_buf(),
                tmp,
                file: Some(file),
                ds: Some(ds),
                spec: spec.clone(),
                chunks,
                finished: false,
            }),
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                Err(e)
            }
        }
    }
}

impl VolumeWriter for Hdf5Writer {
    fn dims(&self) -> [usize; 3] {
        self.spec.dims
    }
    fn write_unit(&self) -> [usize; 3] {
        self.chunks
    }
    fn write_region(&self, region: Region, data: &[f32]) -> Result<()> {
        super::check_write(
            region,
            data,
            self.spec.dims,
            self.spec.dtype,
            &self.path.display().to_string(),
        )?;
        let [z, y, x] = region.start;
        let e = region.end();
        let sel = (z..e[0], y..e[1], x..e[2]);
        let shape = (region.shape[0], region.shape[1], region.shape[2]);
        let shape_err = |err: ndarray::ShapeError| Error::Shape(err.to_string());
        let ds = self
            .ds
            .as_ref()
            .ok_or_else(|| Error::invalid(format!("{}: the HDF5 writer has finished", self.path.display())))?;
        match self.spec.dtype {
            OutputDtype::F32 => ds.write_slice(ndarray::ArrayView3::from_shape(shape, data).map_err(shape_err)?, sel),
            OutputDtype::U16 => {
                let v: Vec<u16> = data.iter().map(|&v| to_u16(v)).collect();
                ds.write_slice(ndarray::ArrayView3::from_shape(shape, &v[..]).map_err(shape_err)?, sel)
            }
            OutputDtype::F16 => {
                let v: Vec<half::f16> = data.iter().map(|&v| half::f16::from_f32(v)).collect();
                ds.write_slice(ndarray::ArrayView3::from_shape(shape, &v[..]).map_err(shape_err)?, sel)
            }
        }
        .map_err(|e| h5err(&self.tmp, "write", e))
    }
    fn finish(mut self: Box<Self>) -> Result<()> {
        self.ds = None;
        if let Some(f) = self.file.take() {
            f.flush().map_err(|e| h5err(&self.tmp, "flush", e))?;
            f.close().map_err(|e| h5err(&self.tmp, "close", e))?;
        }
        std::fs::rename(&self.tmp, &self.path).map_err(|e| Error::io(&self.path, e))?;
        self.finished = true;
        Ok(())
    }
}

impl Drop for Hdf5Writer {
    fn drop(&mut self) {
        if !self.finished {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

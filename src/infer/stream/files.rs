//! Where `infer_file` gets its readers and writers, and what it knows of output stores.
//!
//! TEMPORARY: until the format readers and writers of `imaging::stream` land
//! (`stream::open_reader`, `create_writer`, `stream::zarr::*`), files are read whole
//! through `read_volume` into a [`MemoryVolume`] and written whole by `write_volume` in
//! `finish` — correct, but not bounded in memory — and chunked stores are refused.
//! Everything above this module sees only `VolumeReader` / `VolumeWriter`.

use crate::error::{Error, Result};
use crate::imaging::io::{write_volume, OutputDtype};
use crate::imaging::stream::{copy_intersection, MemoryVolume, Region, VolumeInfo, VolumeReader, VolumeWriter, WriterSpec};
use crate::imaging::volume::Volume;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Whether `path` names a chunked store (OME-Zarr), the only output block mode,
/// `--resume` and `--create-only` work with.
pub fn is_store(path: &Path) -> bool {
    let s = path.to_string_lossy().to_ascii_lowercase();
    let s = s.trim_end_matches('/');
    s.ends_with(".zarr") || s.ends_with(".n5")
}

/// A short name of a path's format, for summaries.
pub fn format_name(path: &Path) -> &'static str {
    let s = path.to_string_lossy().to_ascii_lowercase();
    let s = s.trim_end_matches('/');
    if s.ends_with(".zarr") {
        "ome-zarr"
    } else if s.ends_with(".tif") || s.ends_with(".tiff") {
        "tiff"
    } else if s.contains(".h5") || s.contains(".hdf5") {
        "hdf5"
    } else if path.is_dir() {
        "slices"
    } else {
        "unknown"
    }
}

/// Opens an input volume for reading regions.
pub fn open_input(path: &Path, read: &crate::imaging::io::ReadOptions) -> Result<Box<dyn VolumeReader>> {
    if is_store(path) {
        return Err(no_store(path));
    }
    let v = crate::imaging::io::read_volume_with(path, read)?;
    Ok(Box::new(WholeReader::new(v)))
}

/// Creates the output volume.
pub fn create_output(path: &Path, spec: &WriterSpec) -> Result<Box<dyn VolumeWriter>> {
    if is_store(path) {
        return Err(no_store(path));
    }
    Ok(Box::new(WholeFileWriter {
        path: path.to_path_buf(),
        dims: spec.dims,
        dtype: spec.dtype,
        voxel_size: spec.voxel_size,
        metadata: spec.metadata.clone(),
        data: Mutex::new(vec![0.0; spec.dims.iter().product()]),
    }))
}

/// Opens an existing store to write chunks into (block mode, `--resume`).
pub fn open_existing_store(path: &Path) -> Result<Box<dyn VolumeWriter>> {
    Err(no_store(path))
}

/// Marks a store complete (after a full run).
pub fn mark_store_complete(path: &Path) -> Result<()> {
    Err(no_store(path))
}

fn no_store(path: &Path) -> Error {
    Error::invalid(format!(
        "{}: chunked stores (OME-Zarr) are not readable or writable in this build yet; use TIFF or HDF5",
        path.display()
    ))
}

/// A volume read whole (temporary, see the module doc).
struct WholeReader {
    mem: MemoryVolume,
    info: VolumeInfo,
}

impl WholeReader {
    fn new(v: Volume) -> Self {
        let info = VolumeInfo {
            dims: v.dims,
            voxel_size: v.voxel_size,
            dtype: "f32".into(),
            metadata: v.metadata.clone(),
        };
        let mem = MemoryVolume::new(v.dims, v.data).expect("a Volume's data matches its dims");
        WholeReader { mem, info }
    }
}

impl VolumeReader for WholeReader {
    fn info(&self) -> &VolumeInfo {
        &self.info
    }
    fn read_unit(&self) -> [usize; 3] {
        self.mem.read_unit()
    }
    fn read_region(&self, region: Region, dst: &mut [f32]) -> Result<()> {
        self.mem.read_region(region, dst)
    }
}

/// A file written whole in `finish` (temporary name, then rename: `write_volume`).
struct WholeFileWriter {
    path: PathBuf,
    dims: [usize; 3],
    dtype: OutputDtype,
    voxel_size: Option<[f64; 3]>,
    metadata: Option<String>,
    data: Mutex<Vec<f32>>,
}

impl VolumeWriter for WholeFileWriter {
    fn dims(&self) -> [usize; 3] {
        self.dims
    }
    fn write_unit(&self) -> [usize; 3] {
        [1, self.dims[1], self.dims[2]]
    }
    fn write_region(&self, region: Region, data: &[f32]) -> Result<()> {
        region.check_fits(self.dims, "output")?;
        let mut all = self.data.lock().unwrap_or_else(|e| e.into_inner());
        copy_intersection(data, region, &mut all, Region::whole(self.dims));
        Ok(())
    }
    fn finish(self: Box<Self>) -> Result<()> {
        let data = self.data.into_inner().unwrap_or_else(|e| e.into_inner());
        let mut v = Volume::new(self.dims, data)?;
        v.voxel_size = self.voxel_size;
        v.metadata = self.metadata;
        write_volume(&self.path, &v, self.dtype)
    }
}

//! Volumes as streams: readers and writers of 3D regions, so that nothing above them
//! assumes a whole volume is in memory (`infer`, `convert`, block mode on a cluster).
//!
//! A [`VolumeReader`] hands out any region of its volume as f32; a [`VolumeWriter`]
//! takes regions aligned to its [`VolumeWriter::write_unit`] and makes them durable.
//! Both are `Send + Sync` and take `&self`, so the streaming pipeline can read and
//! write from several threads; an implementation that needs state (a TIFF slab cache,
//! a buffer of pages not yet complete) keeps it behind its own lock.
//!
//! Formats: TIFF/BigTIFF stacks and folders of 2D slices (read by slabs of pages,
//! written plane by plane in z order), HDF5 datasets (hyperslabs, feature `hdf5`),
//! OME-Zarr / NGFF 0.4 (Zarr v2) and 0.5 (Zarr v3, sharding) through `zarrs`, and
//! [`MemoryVolume`] for tests and the library's in-memory path.

use crate::error::{Error, Result};
use crate::imaging::format::{split_dataset_path, OutputDtype, ReadOptions};
use std::path::Path;
use std::sync::Mutex;

pub mod convert;
pub mod folder;
#[cfg(feature = "hdf5")]
pub mod hdf5;
pub mod tiff;
pub mod zarr;

/// The formats [`open_reader`] and [`create_writer`] tell apart by path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// `.tif` / `.tiff` (classic or BigTIFF).
    Tiff,
    /// A folder of 2D TIFF slices, read in name order.
    SliceFolder,
    /// `file.h5[:/dataset]` / `.hdf5` (feature `hdf5`).
    Hdf5,
    /// An OME-Zarr store: a folder named `*.zarr`, or any folder holding `.zgroup`,
    /// `.zarray` or `zarr.json`.
    Zarr,
}

impl Format {
    /// The format of `path` (with an optional `:/dataset` suffix for HDF5). Existing
    /// folders are Zarr stores when they hold Zarr metadata, else folders of slices.
    pub fn of(path: &Path) -> Result<Format> {
        let (file, _) = split_dataset_path(path);
        let ext = file
            .extension()
            .map(|e| e.to_string_lossy().to_lowercase())
            .unwrap_or_default();
        if zarr::looks_like_store(&file) || ext == "zarr" {
            return Ok(Format::Zarr);
        }
        if file.is_dir() {
            return Ok(Format::SliceFolder);
        }
        match ext.as_str() {
            "tif" | "tiff" => Ok(Format::Tiff),
            "h5" | "hdf5" => Ok(Format::Hdf5),
            _ => Err(Error::invalid(format!(
                "{}: unknown volume format: use .tif/.tiff, .h5/.hdf5[:/dataset], an OME-Zarr store \
                 (a folder named *.zarr or *.ome.zarr) or a folder of 2D TIFF slices",
                path.display()
            ))),
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Format::Tiff => "TIFF",
            Format::SliceFolder => "folder of slices",
            Format::Hdf5 => "HDF5",
            Format::Zarr => "OME-Zarr",
        }
    }
}

/// Opens `path` for reading regions: a TIFF/BigTIFF stack, a folder of 2D slices, an
/// HDF5 dataset (`file.h5:/ds`, feature `hdf5`) or level 0 of an OME-Zarr store.
pub fn open_reader(path: &Path, opts: &ReadOptions) -> Result<Box<dyn VolumeReader>> {
    let (file, ds) = split_dataset_path(path);
    if !file.exists() {
        return Err(Error::io(
            &file,
            std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or folder"),
        ));
    }
    Ok(match Format::of(path)? {
        Format::Tiff => Box::new(tiff::TiffReader::open(&file, opts)?),
        Format::SliceFolder => Box::new(folder::SliceFolderReader::open(&file, opts)?),
        Format::Zarr => Box::new(zarr::ZarrReader::open(&file, opts)?),
        #[cfg(feature = "hdf5")]
        Format::Hdf5 => Box::new(hdf5::Hdf5Reader::open(
            &file,
            opts.dataset.clone().or(ds).as_deref(),
            opts,
        )?),
        #[cfg(not(feature = "hdf5"))]
        Format::Hdf5 => {
            let _ = ds;
            return Err(no_hdf5(&file));
        }
    })
}

/// Creates the output `path` (format by extension; `*.zarr` is OME-Zarr with the
/// defaults of [`zarr::ZarrWriteOptions`]). Nothing exists under the final name of a
/// TIFF or HDF5 file before [`VolumeWriter::finish`]; a Zarr store exists from the start
/// but is marked complete only by `finish`.
pub fn create_writer(path: &Path, spec: &WriterSpec) -> Result<Box<dyn VolumeWriter>> {
    let (file, ds) = split_dataset_path(path);
    check_spec(spec, &file)?;
    Ok(match Format::of(path)? {
        Format::Tiff => Box::new(tiff::TiffWriter::create(
            &file,
            spec,
            crate::imaging::tiff_io::BIGTIFF_THRESHOLD,
        )?),
        Format::Zarr => Box::new(zarr::ZarrWriter::create(
            &file,
            spec,
            &zarr::ZarrWriteOptions::default(),
        )?),
        #[cfg(feature = "hdf5")]
        Format::Hdf5 => Box::new(hdf5::Hdf5Writer::create(&file, ds.as_deref().unwrap_or("/data"), spec)?),
        #[cfg(not(feature = "hdf5"))]
        Format::Hdf5 => {
            let _ = ds;
            return Err(no_hdf5(&file));
        }
        Format::SliceFolder => {
            return Err(Error::invalid(format!(
                "{} is a folder: give a .tif, .h5 or .zarr name for the output",
                file.display()
            )))
        }
    })
}

#[cfg(not(feature = "hdf5"))]
fn no_hdf5(path: &Path) -> Error {
    Error::invalid(format!(
        "{}: this build has no HDF5 support; rebuild with `cargo build --release --features hdf5` (needs libhdf5-dev)",
        path.display()
    ))
}

/// The checks every writer makes on its spec.
pub(crate) fn check_spec(spec: &WriterSpec, path: &Path) -> Result<()> {
    if spec.dims.contains(&0) {
        return Err(Error::invalid(format!(
            "{}: cannot write an empty volume {:?}",
            path.display(),
            spec.dims
        )));
    }
    if let Some(c) = spec.chunks {
        if c.contains(&0) {
            return Err(Error::invalid(format!(
                "{}: chunk shape {c:?} has a zero side",
                path.display()
            )));
        }
    }
    crate::imaging::volume::check_voxel_size(spec.voxel_size, &path.display().to_string())
}

/// What every writer checks before it writes `data` into `region` of a `dims` volume
/// stored as `dtype` in `what`: the region lies inside, `data` fills it exactly, and every
/// value is representable (finite; within u16's range, or f16's).
pub(crate) fn check_write(
    region: Region,
    data: &[f32],
    dims: [usize; 3],
    dtype: crate::imaging::format::OutputDtype,
    what: &str,
) -> Result<()> {
    region.check_buffer(dims, data.len(), what)?;
    crate::imaging::format::check_output_range(data, dtype, region.start, region.shape, what)
}

/// An error naming the first non-finite voxel of `data` (region `region`) read from `what`.
pub(crate) fn check_region_finite(data: &[f32], region: Region, what: &str) -> Result<()> {
    match data.iter().position(|v| !v.is_finite()) {
        None => Ok(()),
        Some(i) => {
            let [_, h, w] = region.shape;
            let (x, y, z) = (i % w, (i / w) % h, i / (w * h));
            Err(Error::invalid(format!(
                "{what}: voxel (z, y, x) = ({}, {}, {}) is {}; the input must be finite",
                region.start[0] + z,
                region.start[1] + y,
                region.start[2] + x,
                data[i]
            )))
        }
    }
}

/// Regions of shape `unit` (cut at the border) tiling `region`, in z, y, x raster order.
pub fn unit_regions(region: Region, unit: [usize; 3]) -> Vec<Region> {
    let unit = unit.map(|u| u.max(1));
    let mut out = Vec::new();
    let end = region.end();
    let mut z = region.start[0];
    while z < end[0] {
        let mut y = region.start[1];
        while y < end[1] {
            let mut x = region.start[2];
            while x < end[2] {
                let s = [z, y, x];
                out.push(Region::new(s, [0, 1, 2].map(|i| unit[i].min(end[i] - s[i]))));
                x += unit[2];
            }
            y += unit[1];
        }
        z += unit[0];
    }
    out
}

/// A box of voxels: `start` (z, y, x) and `shape` (z, y, x); data are z-major.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct Region {
    pub start: [usize; 3],
    pub shape: [usize; 3],
}

impl Region {
    pub fn new(start: [usize; 3], shape: [usize; 3]) -> Self {
        Region { start, shape }
    }
    /// The whole of a volume of `dims`.
    pub fn whole(dims: [usize; 3]) -> Self {
        Region {
            start: [0; 3],
            shape: dims,
        }
    }
    /// Exclusive end (z, y, x).
    pub fn end(&self) -> [usize; 3] {
        [0, 1, 2].map(|i| self.start[i] + self.shape[i])
    }
    pub fn voxels(&self) -> usize {
        self.shape.iter().product()
    }
    /// Whether the region lies inside a volume of `dims` (and is not empty).
    pub fn fits(&self, dims: [usize; 3]) -> bool {
        (0..3).all(|i| self.shape[i] > 0 && self.start[i] + self.shape[i] <= dims[i])
    }
    /// An error naming the region and the volume when it does not fit.
    pub fn check_fits(&self, dims: [usize; 3], what: &str) -> Result<()> {
        if self.fits(dims) {
            Ok(())
        } else {
            Err(Error::invalid(format!(
                "{what}: region {:?}+{:?} is empty or outside the volume {dims:?}",
                self.start, self.shape
            )))
        }
    }

    /// [`Region::check_fits`], and that a buffer of `len` values holds the region exactly
    /// (what every reader and writer checks before touching its file).
    pub fn check_buffer(&self, dims: [usize; 3], len: usize, what: &str) -> Result<()> {
        self.check_fits(dims, what)?;
        if len != self.voxels() {
            return Err(Error::Shape(format!(
                "{what}: region {:?} needs {} values, the buffer has {len}",
                self.shape,
                self.voxels()
            )));
        }
        Ok(())
    }
}

/// What a reader knows about its volume besides the voxels.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct VolumeInfo {
    /// (z, y, x) size in voxels.
    pub dims: [usize; 3],
    /// (z, y, x) voxel size in µm, when the file records it.
    pub voxel_size: Option<[f64; 3]>,
    /// The file's own sample type ("u16", "f32", ...), for messages and defaults.
    pub dtype: String,
    /// Free-form JSON carried from the input to the output (e.g. OME-Zarr `omero`).
    pub metadata: Option<String>,
}

/// Reads regions of one 3D volume as f32.
pub trait VolumeReader: Send + Sync {
    fn info(&self) -> &VolumeInfo;
    fn dims(&self) -> [usize; 3] {
        self.info().dims
    }
    /// The region shape reads are cheapest in (a chunk; for TIFF one plane or one
    /// strip band). The pipeline aligns its reads to it where it can.
    fn read_unit(&self) -> [usize; 3];
    /// Fills `dst` (z-major, `region.shape`) with the voxels of `region`. A voxel that
    /// is not finite is an error naming its position.
    fn read_region(&self, region: Region, dst: &mut [f32]) -> Result<()>;
}

/// How an output volume is created.
#[derive(Clone, Debug)]
pub struct WriterSpec {
    pub dims: [usize; 3],
    pub dtype: OutputDtype,
    /// Chunk shape of chunked formats (z, y, x); `None`: the format's default.
    pub chunks: Option<[usize; 3]>,
    pub voxel_size: Option<[f64; 3]>,
    /// JSON carried over from the input and the run's provenance.
    pub metadata: Option<String>,
}

/// Writes regions of one 3D volume. Regions given to [`write_region`](Self::write_region)
/// are aligned to [`write_unit`](Self::write_unit) (or end at the volume's border) and
/// each voxel is written once.
pub trait VolumeWriter: Send + Sync {
    fn dims(&self) -> [usize; 3];
    /// The unit whole regions must be aligned to (a chunk; for TIFF `[1, H, W]`).
    fn write_unit(&self) -> [usize; 3];
    /// Writes `data` (z-major, `region.shape`) into `region`.
    fn write_region(&self, region: Region, data: &[f32]) -> Result<()>;
    /// Makes the output complete: flushes, renames a temporary file into place, or
    /// marks a store complete. Without it the output does not exist under its name.
    fn finish(self: Box<Self>) -> Result<()>;
}

/// Copies `src` (shape `src_region.shape`) into `dst` (shape `dst_region.shape`) where
/// the two regions intersect; both are z-major and positioned in one volume.
pub fn copy_intersection(src: &[f32], src_region: Region, dst: &mut [f32], dst_region: Region) {
    let lo = [0, 1, 2].map(|i| src_region.start[i].max(dst_region.start[i]));
    let hi = [0, 1, 2].map(|i| src_region.end()[i].min(dst_region.end()[i]));
    if (0..3).any(|i| lo[i] >= hi[i]) {
        return;
    }
    let [_, sh, sw] = src_region.shape;
    let [_, dh, dw] = dst_region.shape;
    let n = hi[2] - lo[2];
    for z in lo[0]..hi[0] {
        for y in lo[1]..hi[1] {
            let s = ((z - src_region.start[0]) * sh + (y - src_region.start[1])) * sw + (lo[2] - src_region.start[2]);
            let d = ((z - dst_region.start[0]) * dh + (y - dst_region.start[1])) * dw + (lo[2] - dst_region.start[2]);
            dst[d..d + n].copy_from_slice(&src[s..s + n]);
        }
    }
}

/// A volume held in memory, as a reader and (through a lock) as a writer: for tests,
/// and for the library's in-memory path.
pub struct MemoryVolume {
    info: VolumeInfo,
    unit: [usize; 3],
    data: Mutex<Vec<f32>>,
}

impl MemoryVolume {
    pub fn new(dims: [usize; 3], data: Vec<f32>) -> Result<Self> {
        if dims.iter().product::<usize>() != data.len() {
            return Err(Error::Shape(format!(
                "{dims:?} needs {} values, got {}",
                dims.iter().product::<usize>(),
                data.len()
            )));
        }
        Ok(MemoryVolume {
            info: VolumeInfo {
                dims,
                voxel_size: None,
                dtype: "f32".into(),
                metadata: None,
            },
            unit: [1, dims[1], dims[2]],
            data: Mutex::new(data),
        })
    }
    pub fn zeros(dims: [usize; 3]) -> Self {
        Self::new(dims, vec![0.0; dims.iter().product()]).expect("shape matches")
    }
    /// A volume read whole (its voxel size and metadata kept).
    pub fn from_volume(v: crate::imaging::volume::Volume) -> Self {
        let mut m = Self::new(v.dims, v.data).expect("a volume's data match its dims");
        m.info.voxel_size = v.voxel_size;
        m.info.metadata = v.metadata;
        m
    }
    /// Pretends to be chunked in `unit` (tests of chunk alignment).
    pub fn with_unit(mut self, unit: [usize; 3]) -> Self {
        self.unit = unit;
        self
    }
    pub fn into_data(self) -> Vec<f32> {
        self.data.into_inner().unwrap_or_else(|e| e.into_inner())
    }
}

impl VolumeReader for MemoryVolume {
    fn info(&self) -> &VolumeInfo {
        &self.info
    }
    fn read_unit(&self) -> [usize; 3] {
        self.unit
    }
    fn read_region(&self, region: Region, dst: &mut [f32]) -> Result<()> {
        region.check_buffer(self.info.dims, dst.len(), "memory volume")?;
        let data = self.data.lock().unwrap_or_else(|e| e.into_inner());
        copy_intersection(&data, Region::whole(self.info.dims), dst, region);
        Ok(())
    }
}

impl VolumeWriter for MemoryVolume {
    fn dims(&self) -> [usize; 3] {
        self.info.dims
    }
    fn write_unit(&self) -> [usize; 3] {
        self.unit
    }
    fn write_region(&self, region: Region, data: &[f32]) -> Result<()> {
        region.check_buffer(self.info.dims, data.len(), "memory volume")?;
        let mut all = self.data.lock().unwrap_or_else(|e| e.into_inner());
        copy_intersection(data, region, &mut all, Region::whole(self.info.dims));
        Ok(())
    }
    fn finish(self: Box<Self>) -> Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regions_round_trip_through_memory_volume() {
        let dims = [3, 5, 7];
        let data: Vec<f32> = (0..105).map(|i| i as f32).collect();
        let v = MemoryVolume::new(dims, data.clone()).unwrap();
        let r = Region::new([1, 2, 3], [2, 2, 4]);
        let mut part = vec![0.0; r.voxels()];
        v.read_region(r, &mut part).unwrap();
        // voxel (1+z, 2+y, 3+x)
        for z in 0..2 {
            for y in 0..2 {
                for x in 0..4 {
                    assert_eq!(part[(z * 2 + y) * 4 + x], (((1 + z) * 5 + 2 + y) * 7 + 3 + x) as f32);
                }
            }
        }
        let out = MemoryVolume::zeros(dims);
        out.write_region(r, &part).unwrap();
        let got = out.into_data();
        assert_eq!(got.iter().filter(|&&x| x != 0.0).count(), 16);
        assert_eq!(got[(2 * 5 + 3) * 7 + 6], data[(2 * 5 + 3) * 7 + 6]);
        assert!(v.read_region(Region::new([2, 0, 0], [2, 1, 1]), &mut [0.0; 2]).is_err());
    }
}

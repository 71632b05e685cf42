//! Folders of 2D TIFF slices as streams: the `.tif`/`.tiff` files of a folder, sorted by
//! name, are the z planes; a region reads only the slices it covers, through a cache of
//! at most [`ReadOptions::cache_planes`] planes.

use super::tiff::{BandCache, TiffReader, DEFAULT_CACHE_PLANES};
use super::{check_region_finite, Region, VolumeInfo, VolumeReader};
use crate::error::{Error, Result};
use crate::imaging::format::ReadOptions;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// A folder of 2D TIFF slices read by regions.
pub struct SliceFolderReader {
    dir: PathBuf,
    files: Vec<PathBuf>,
    info: VolumeInfo,
    slice_opts: ReadOptions,
    check_finite: bool,
    cache: Mutex<BandCache>,
    planes_decoded: AtomicU64,
}

/// The slice files of `dir`: `.tif`/`.tiff`, not hidden, sorted by name.
pub fn slice_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_file()
                && !p.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.'))
                && matches!(
                    p.extension().map(|e| e.to_string_lossy().to_lowercase()).as_deref(),
                    Some("tif" | "tiff")
                )
        })
        .collect();
    files.sort();
    Ok(files)
}

impl SliceFolderReader {
    /// Lists the slices and reads the first one's header (size, voxel size, metadata).
    pub fn open(dir: &Path, opts: &ReadOptions) -> Result<Self> {
        let files = slice_files(dir)?;
        if files.is_empty() {
            return Err(Error::invalid(format!(
                "{}: folder holds no .tif/.tiff slices",
                dir.display()
            )));
        }
        let slice_opts = ReadOptions {
            allow_2d: true,
            check_finite: false,
            cache_planes: Some(1),
            ..opts.clone()
        };
        let first = TiffReader::open(&files[0], &slice_opts)?;
        let fi = first.info().clone();
        if fi.dims[0] != 1 {
            return Err(Error::invalid(format!(
                "{}: is a 3D stack ({} pages): a folder is read as 2D slices, one per file; give the stack itself, or a folder of 2D images",
                files[0].display(),
                fi.dims[0]
            )));
        }
        let (h, w) = (fi.dims[1], fi.dims[2]);
        if files.len() <= 1 && !opts.allow_2d {
            return Err(Error::invalid(format!(
                "{}: folder holds a single 2D slice ({h}×{w}); RLN needs a 3D stack",
                dir.display()
            )));
        }
        let planes = opts.cache_planes.unwrap_or(DEFAULT_CACHE_PLANES).max(1);
        Ok(SliceFolderReader {
            dir: dir.to_path_buf(),
            info: VolumeInfo {
                dims: [files.len(), h, w],
                ..fi
            },
            files,
            slice_opts,
            check_finite: opts.check_finite,
            cache: Mutex::new(BandCache::new(planes.saturating_mul(h * w))),
            planes_decoded: AtomicU64::new(0),
        })
    }

    /// Slices decoded so far.
    pub fn planes_decoded(&self) -> u64 {
        self.planes_decoded.load(Ordering::Relaxed)
    }

    fn plane(&self, z: usize) -> Result<Arc<Vec<f32>>> {
        if let Some(p) = self.cache.lock().unwrap_or_else(|e| e.into_inner()).get((z, 0)) {
            return Ok(p);
        }
        let f = &self.files[z];
        let r = TiffReader::open(f, &self.slice_opts)?;
        let [_, h, w] = self.info.dims;
        if r.info().dims != [1, h, w] {
            let d = r.info().dims;
            return Err(Error::format(
                f,
                format!(
                    "slice is {}×{}{} but {} is {h}×{w}; all slices must have one size and one page",
                    d[1],
                    d[2],
                    if d[0] > 1 {
                        format!(" with {} pages", d[0])
                    } else {
                        String::new()
                    },
                    self.files[0].display()
                ),
            ));
        }
        let mut data = vec![0.0; h * w];
        r.read_region(Region::whole([1, h, w]), &mut data)?;
        let data = Arc::new(data);
        self.planes_decoded.fetch_add(1, Ordering::Relaxed);
        self.cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert((z, 0), data.clone());
        Ok(data)
    }
}

impl VolumeReader for SliceFolderReader {
    fn info(&self) -> &VolumeInfo {
        &self.info
    }
    fn read_unit(&self) -> [usize; 3] {
        [1, self.info.dims[1], self.info.dims[2]]
    }
    fn read_region(&self, region: Region, dst: &mut [f32]) -> Result<()> {
        region.check_buffer(self.info.dims, dst.len(), &self.dir.display().to_string())?;
        for dz in 0..region.shape[0] {
            let z = region.start[0] + dz;
            let plane = self.plane(z)?;
            let whole = Region::new([z, 0, 0], [1, self.info.dims[1], self.info.dims[2]]);
            let part = Region::new(
                [z, region.start[1], region.start[2]],
                [1, region.shape[1], region.shape[2]],
            );
            let n = part.voxels();
            super::copy_intersection(&plane, whole, &mut dst[dz * n..(dz + 1) * n], part);
        }
        if self.check_finite {
            check_region_finite(dst, region, &self.dir.display().to_string())?;
        }
        Ok(())
    }
}

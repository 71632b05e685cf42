//! `rln-engine convert`: copies a volume between TIFF/BigTIFF, folders of slices, HDF5
//! and OME-Zarr by regions, so memory stays bounded whatever the volume: a slab of the
//! output's unit depth (a TIFF input's cache holds that many planes) plus one output
//! unit (chunk or shard) per thread; into a TIFF output, a slab of whole planes of the
//! input's chunk depth.

use super::zarr::{self, ZarrWriteOptions};
use super::{create_writer, open_reader, unit_regions, Format, Region, VolumeWriter, WriterSpec};
use crate::error::{Error, Result};
use crate::imaging::format::{split_dataset_path, OutputDtype, ReadOptions};
use rayon::prelude::*;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// How to convert.
#[derive(Clone, Debug, Default)]
pub struct ConvertOptions {
    /// Output sample type; `None`: the input's when it is u16, f16 or f32 (u8 → u16,
    /// anything else → f32).
    pub dtype: Option<OutputDtype>,
    /// Output chunk shape (z, y, x) of Zarr and HDF5 outputs.
    pub chunks: Option<[usize; 3]>,
    /// Zarr version, compression and sharding of a Zarr output.
    pub zarr: ZarrWriteOptions,
    /// Extra multiscale levels (2× averages) of a Zarr output.
    pub pyramid: usize,
    /// Replace an existing output.
    pub overwrite: bool,
    /// Channel choice and the like, passed to the reader.
    pub read: ReadOptions,
}

/// What a conversion did.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ConvertSummary {
    pub dims: [usize; 3],
    pub voxels: u64,
    pub seconds: f64,
    pub format_in: String,
    pub format_out: String,
    pub dtype_in: String,
    pub dtype_out: OutputDtype,
    pub voxel_size: Option<[f64; 3]>,
}

/// The output type `convert` picks for an input sample type.
pub fn default_dtype(input: &str) -> OutputDtype {
    match input {
        "u8" | "u16" => OutputDtype::U16,
        "f16" => OutputDtype::F16,
        _ => OutputDtype::F32,
    }
}

/// The absolute, symlink-free form of a path that may not exist yet.
fn canonical(path: &Path) -> PathBuf {
    if let Ok(p) = path.canonicalize() {
        return p;
    }
    let parent = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    match (parent.canonicalize(), path.file_name()) {
        (Ok(p), Some(n)) => p.join(n),
        _ => path.to_path_buf(),
    }
}

/// Refuses an output that is the input (same path, a link to it, or inside it).
pub fn check_not_input(input: &Path, output: &Path) -> Result<()> {
    let (i, o) = (canonical(input), canonical(output));
    let same_file = {
        #[cfg(unix)]
        {
            use std::os::unix::fs::MetadataExt;
            match (std::fs::metadata(&i), std::fs::metadata(&o)) {
                (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
                _ => false,
            }
        }
        #[cfg(not(unix))]
        false
    };
    if i == o || same_file || o.starts_with(&i) || i.starts_with(&o) {
        return Err(Error::invalid(format!(
            "output {} is (or contains, or lies inside) the input {}; choose another output name",
            output.display(),
            input.display()
        )));
    }
    Ok(())
}

/// Converts `input` into `output` (formats from the paths, see [`Format::of`]).
pub fn convert(input: &Path, output: &Path, opts: &ConvertOptions) -> Result<ConvertSummary> {
    let t0 = Instant::now();
    let (in_file, _) = split_dataset_path(input);
    let (out_file, _) = split_dataset_path(output);
    check_not_input(&in_file, &out_file)?;
    let fmt_in = Format::of(input)?;
    let fmt_out = Format::of(output)?;
    if fmt_in == Format::Zarr && zarr::looks_like_store(&in_file) {
        let attrs_complete = zarr::is_complete(&in_file)?;
        if !attrs_complete && written_by_engine(&in_file) {
            return Err(Error::invalid(format!(
                "{}: this store was not completed (an interrupted or block-wise run not yet finalized); finish it first",
                in_file.display()
            )));
        }
    }
    if fmt_out == Format::SliceFolder {
        return Err(Error::invalid(format!(
            "{}: writing folders of slices is not supported; write a .tif, .h5 or .zarr",
            out_file.display()
        )));
    }
    if opts.pyramid > 0 && fmt_out != Format::Zarr {
        return Err(Error::invalid(
            "--pyramid needs an OME-Zarr output (a name ending in .zarr)",
        ));
    }
    if out_file.exists() {
        if !opts.overwrite {
            return Err(Error::invalid(format!(
                "{} already exists; pass --overwrite to replace it or choose another name",
                out_file.display()
            )));
        }
        if out_file.is_dir() {
            if !zarr::looks_like_store(&out_file) {
                return Err(Error::invalid(format!(
                    "{} is a folder but not a Zarr store; not removing it: choose another name",
                    out_file.display()
                )));
            }
            std::fs::remove_dir_all(&out_file).map_err(|e| Error::io(&out_file, e))?;
        }
        // files are replaced by the final rename, so a failed conversion keeps the old one
    }

    let probe = open_reader(input, &opts.read)?;
    let info = probe.info().clone();
    drop(probe);
    let dtype = opts.dtype.unwrap_or_else(|| default_dtype(&info.dtype));
    let spec = WriterSpec {
        dims: info.dims,
        dtype,
        chunks: opts.chunks,
        voxel_size: info.voxel_size,
        metadata: info.metadata.clone(),
    };
    let writer: Box<dyn VolumeWriter> = match fmt_out {
        Format::Zarr => Box::new(zarr::ZarrWriter::create(&out_file, &spec, &opts.zarr)?),
        _ => {
            if opts.zarr.shard.is_some() {
                return Err(Error::invalid("--shard applies to Zarr v3 outputs only"));
            }
            create_writer(output, &spec)?
        }
    };
    let unit = writer.write_unit();
    let plane_bytes = info.dims[1] * info.dims[2] * 4;
    // whole-plane outputs (TIFF) take slabs of the input's chunk depth, if 2 GB allow
    let whole_planes = unit[1] == info.dims[1] && unit[2] == info.dims[2];
    let cache_planes = if whole_planes { 1 } else { unit[0] };
    let reader = open_reader(
        input,
        &ReadOptions {
            cache_planes: Some(cache_planes),
            ..opts.read.clone()
        },
    )?;
    let slab_depth = if whole_planes {
        let want = reader.read_unit()[0].max(unit[0]).max(1);
        want.min((2usize << 30) / plane_bytes.max(1)).max(1)
    } else {
        unit[0]
    };
    let pb = crate::imaging::progress::bar(info.dims[0] as u64, "converting");
    let mut z = 0;
    while z < info.dims[0] {
        let depth = slab_depth.min(info.dims[0] - z);
        let slab = Region::new([z, 0, 0], [depth, info.dims[1], info.dims[2]]);
        let blocks = unit_regions(slab, [depth, unit[1], unit[2]]);
        blocks.par_iter().try_for_each(|&r| -> Result<()> {
            let mut buf = vec![0.0f32; r.voxels()];
            reader.read_region(r, &mut buf)?;
            writer.write_region(r, &buf)
        })?;
        z += depth;
        pb.set_position(z as u64);
    }
    pb.finish_and_clear();
    drop(reader);
    writer.finish()?;
    if opts.pyramid > 0 {
        zarr::write_pyramid(&out_file, opts.pyramid)?;
    }
    Ok(ConvertSummary {
        dims: info.dims,
        voxels: info.dims.iter().map(|&d| d as u64).product(),
        seconds: t0.elapsed().as_secs_f64(),
        format_in: fmt_in.name().into(),
        format_out: fmt_out.name().into(),
        dtype_in: info.dtype,
        dtype_out: dtype,
        voxel_size: info.voxel_size,
    })
}

/// Whether a store carries the engine's `rln_engine` attribute.
fn written_by_engine(store: &Path) -> bool {
    let p = if store.join("zarr.json").is_file() {
        store.join("zarr.json")
    } else {
        store.join(".zattrs")
    };
    std::fs::read_to_string(p)
        .map(|s| s.contains("\"rln_engine\""))
        .unwrap_or(false)
}

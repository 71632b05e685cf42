//! `rln-engine convert`: parse, call `imaging::stream::convert::convert`, print.

use anyhow::{Context, Result};
use clap::Args;
use rln_engine::imaging::io::{OutputDtype, ReadOptions};
use rln_engine::imaging::stream::convert::{convert as run_convert, ConvertOptions};
use rln_engine::imaging::stream::zarr::{ZarrCompression, ZarrVersion, ZarrWriteOptions};
use std::path::PathBuf;

use super::args::parse_dims;

/// What `convert --help` adds under the options.
const CONVERT_HELP: &str = "\
Formats by name: .tif/.tiff (classic or BigTIFF; BigTIFF is written past 4 GB), a folder
of 2D TIFF slices (input only), file.h5[:/dataset] (builds with --features hdf5), and
OME-Zarr stores (a folder named *.zarr / *.ome.zarr; NGFF 0.4 = Zarr v2 and 0.5 = Zarr v3
with sharding are read; axes must end in z, y, x).

Memory: a slab of input planes as deep as one output chunk (TIFF and slice inputs) plus
one chunk per thread; into a TIFF, a slab of whole planes of the input's chunk depth;
--pyramid about 8 chunks per thread. Turn a large TIFF series into a chunked store once,
then run infer on the store:

  rln-engine convert stack.tif stack.ome.zarr --chunks 16,512,512 --pyramid 4

In Zarr inputs a chunk file that is missing reads as the fill value (Zarr spec); a store
this engine started but did not finish is refused.";

/// Streams a volume from one format into another with bounded memory.
#[derive(Args, Debug)]
#[command(after_help = CONVERT_HELP)]
pub struct ConvertArgs {
    /// Input volume: TIFF stack, folder of slices, file.h5[:/dataset] or OME-Zarr store.
    pub input: PathBuf,
    /// Output: name.tif, name.h5[:/dataset] or name.ome.zarr. Never the input.
    pub output: PathBuf,
    /// Output sample type (f32, u16, f16). Default: the input's (u8 → u16, others → f32).
    /// Values the type cannot hold are an error, never clamped.
    #[arg(long)]
    pub dtype: Option<OutputDtype>,
    /// Chunk shape z,y,x of Zarr/HDF5 outputs (default 64,256,256, cut to the volume).
    #[arg(long, value_parser = parse_dims)]
    pub chunks: Option<[usize; 3]>,
    /// Zarr version of a Zarr output: 2 (OME-NGFF 0.4, the default: every OME-Zarr
    /// reader opens it) or 3 (OME-Zarr 0.5).
    #[arg(long, default_value = "2")]
    pub zarr_version: ZarrVersion,
    /// Shard shape z,y,x (Zarr v3 only; a multiple of --chunks): fewer, larger files.
    #[arg(long, value_parser = parse_dims)]
    pub shard: Option<[usize; 3]>,
    /// Chunk compression of a Zarr output: zstd or blosc (blosc-zstd, byte shuffle).
    #[arg(long, default_value = "zstd")]
    pub compression: ZarrCompression,
    /// Add N multiscale levels (2× averages) to a Zarr output, for viewers.
    #[arg(long, default_value_t = 0)]
    pub pyramid: usize,
    /// Channel to keep from multi-channel inputs.
    #[arg(long)]
    pub channel: Option<usize>,
    /// Replace an existing output.
    #[arg(long)]
    pub overwrite: bool,
    /// Print a JSON summary instead of a sentence.
    #[arg(long)]
    pub json: bool,
}

pub fn convert(a: &ConvertArgs) -> Result<()> {
    let opts = ConvertOptions {
        dtype: a.dtype,
        chunks: a.chunks,
        zarr: ZarrWriteOptions {
            version: a.zarr_version,
            compression: a.compression,
            shard: a.shard,
        },
        pyramid: a.pyramid,
        overwrite: a.overwrite,
        read: ReadOptions {
            channel: a.channel,
            ..Default::default()
        },
    };
    let s = run_convert(&a.input, &a.output, &opts)
        .with_context(|| format!("converting {} to {}", a.input.display(), a.output.display()))?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&s)?);
    } else {
        println!(
            "{} ({}, {}×{}×{} {}) → {} ({}, {:?}) in {:.1} s ({:.1} Mvoxel/s)",
            a.input.display(),
            s.format_in,
            s.dims[0],
            s.dims[1],
            s.dims[2],
            s.dtype_in,
            a.output.display(),
            s.format_out,
            s.dtype_out,
            s.seconds,
            s.voxels as f64 / s.seconds.max(1e-9) / 1e6
        );
    }
    Ok(())
}

//! Where `infer_file` gets its readers and writers, and what it knows of output stores:
//! thin names over `imaging::stream` (formats) and `imaging::stream::zarr` (stores), so
//! that everything above sees only `VolumeReader` / `VolumeWriter`.

use crate::error::{Error, Result};
use crate::imaging::io::ReadOptions;
use crate::imaging::stream::{self, zarr, Format, VolumeReader, VolumeWriter, WriterSpec};
use std::path::Path;

/// Whether `path` names a chunked store (OME-Zarr), the only output block mode,
/// `--resume` and `--create-only` work with.
pub fn is_store(path: &Path) -> bool {
    Format::of(path).is_ok_and(|f| f == Format::Zarr)
}

/// A short name of a path's format, for summaries.
pub fn format_name(path: &Path) -> &'static str {
    match Format::of(path) {
        Ok(Format::Zarr) => "ome-zarr",
        Ok(Format::Tiff) => "tiff",
        Ok(Format::Hdf5) => "hdf5",
        Ok(Format::SliceFolder) => "slices",
        Err(_) => "unknown",
    }
}

/// Opens an input volume for reading regions (`read`: channel / time point selection).
/// An OME-Zarr input this engine created but did not finish (an interrupted run, or
/// blocks not all done) is refused: its missing chunks would read as zeros.
pub fn open_input(path: &Path, read: &ReadOptions) -> Result<Box<dyn VolumeReader>> {
    if is_store(path) && zarr::looks_like_store(path) && zarr::is_unfinished(path)? {
        return Err(Error::invalid(format!(
            "{}: this store was not completed (an interrupted `infer`, or blocks not all done): its missing chunks would read as zeros; finish it first (`infer --resume`, the remaining --block runs, then `finalize`)",
            path.display()
        )));
    }
    stream::open_reader(path, read)
}

/// Creates the output volume (a TIFF or HDF5 file appears under its name only in
/// `finish`; a store is marked complete by `finish`).
pub fn create_output(path: &Path, spec: &WriterSpec) -> Result<Box<dyn VolumeWriter>> {
    stream::create_writer(path, spec)
}

/// Opens an existing store to write chunks into (block mode, `--resume`); its `finish`
/// does not mark it complete.
pub fn open_existing_store(path: &Path) -> Result<Box<dyn VolumeWriter>> {
    zarr::open_existing_writer(path)
}

/// Marks a store complete (after a full run).
pub fn mark_store_complete(path: &Path) -> Result<()> {
    zarr::mark_complete(path)
}

//! HDF5 datasets (cargo feature `hdf5`) as whole volumes in memory: one 3D dataset per
//! volume, chunked, with the voxel size in the attribute `element_size_um` (z, y, x) and
//! metadata JSON in `rln_metadata`. Reading, dataset choice and attributes are those of
//! the streaming reader (`crate::imaging::stream::hdf5`).

use super::format::{OutputDtype, ReadOptions};
use super::stream::hdf5::{write_attributes, Hdf5Reader};
use super::stream::{Region, VolumeReader};
use super::volume::Volume;
use crate::error::{Error, Result};
use crate::fsutil::{check_output_dir, temp_path_for};
use hdf5_metno as hdf5;
use std::path::Path;

fn h5err(path: &Path, e: hdf5::Error) -> Error {
    Error::format(path, format!("HDF5: {e}"))
}

/// A whole dataset in memory, read through the streaming reader
/// ([`crate::imaging::stream::hdf5::Hdf5Reader`]), so that both paths choose the dataset
/// (the named one, else the file's only 3D dataset), a 4D dataset's channel, and read
/// the attributes the same way.
pub fn read_hdf5(path: &Path, dataset: Option<&str>, opts: &ReadOptions) -> Result<Volume> {
    // finiteness is checked on the whole volume below, with the whole-volume message
    let reader = Hdf5Reader::open(
        path,
        dataset,
        &ReadOptions {
            check_finite: false,
            ..opts.clone()
        },
    )?;
    let info = reader.info();
    let whole = Region::whole(info.dims);
    let mut data = vec![0f32; whole.voxels()];
    reader.read_region(whole, &mut data)?;
    let mut v = Volume::new(info.dims, data)?;
    v.voxel_size = info.voxel_size;
    v.metadata = info.metadata.clone();
    if opts.check_finite {
        v.check_finite(&format!("{}:{}", path.display(), reader.dataset_name()))?;
    }
    Ok(v)
}

pub fn write_hdf5(path: &Path, dataset: &str, vol: &Volume, dtype: OutputDtype) -> Result<()> {
    check_output_dir(path)?;
    vol.check_voxel_size(&path.display().to_string())?;
    if vol.dims.contains(&0) {
        return Err(Error::invalid(format!(
            "cannot write an empty volume ({})",
            vol.shape_str()
        )));
    }
    let tmp = temp_path_for(path);
    let result = (|| -> Result<()> {
        let file = hdf5::File::create(&tmp).map_err(|e| h5err(&tmp, e))?;
        super::stream::hdf5::close_on_exec(&file);
        // about 1 MiB chunks of whole planes where possible
        let [nz, ny, nx] = vol.dims;
        let cz = (((1 << 18) / (ny * nx).max(1)).max(1)).min(nz);
        let cy = if cz == 1 {
            ny.min(((1 << 18) / nx.max(1)).max(1))
        } else {
            ny
        };
        let chunk = [cz, cy, nx];
        let builder_err = |e| h5err(&tmp, e);
        let ds = match dtype {
            OutputDtype::F32 => {
                let ds = file
                    .new_dataset::<f32>()
                    .chunk(chunk)
                    .shape(vol.dims)
                    .create(dataset)
                    .map_err(builder_err)?;
                ds.write_raw(&vol.data).map_err(builder_err)?;
                ds
            }
            OutputDtype::U16 => {
                let d: Vec<u16> = vol.data.iter().map(|&v| super::format::to_u16(v)).collect();
                let ds = file
                    .new_dataset::<u16>()
                    .chunk(chunk)
                    .shape(vol.dims)
                    .create(dataset)
                    .map_err(builder_err)?;
                ds.write_raw(&d).map_err(builder_err)?;
                ds
            }
            OutputDtype::F16 => {
                let d: Vec<half::f16> = vol.data.iter().map(|&v| half::f16::from_f32(v)).collect();
                let ds = file
                    .new_dataset::<half::f16>()
                    .chunk(chunk)
                    .shape(vol.dims)
                    .create(dataset)
                    .map_err(builder_err)?;
                ds.write_raw(&d).map_err(builder_err)?;
                ds
            }
        };
        write_attributes(&ds, vol.voxel_size, vol.metadata.as_deref(), &tmp)?;
        file.close().map_err(builder_err)?;
        std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

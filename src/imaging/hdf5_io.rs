//! HDF5 datasets (cargo feature `hdf5`): one 3D dataset per volume, chunked, with the
//! voxel size in the attribute `element_size_um` (z, y, x) and metadata JSON in `rln_metadata`.

use super::format::{OutputDtype, ReadOptions};
use super::volume::Volume;
use crate::error::{Error, Result};
use crate::fsutil::{check_output_dir, temp_path_for};
use hdf5::types::VarLenUnicode;
use hdf5_metno as hdf5;
use std::path::Path;

fn h5err(path: &Path, e: hdf5::Error) -> Error {
    Error::format(path, format!("HDF5: {e}"))
}

fn find_3d_datasets(g: &hdf5::Group, prefix: &str, out: &mut Vec<String>) {
    for name in g.member_names().unwrap_or_default() {
        let full = format!("{prefix}/{name}");
        if let Ok(ds) = g.dataset(&name) {
            if ds.ndim() == 3 {
                out.push(full);
            }
        } else if let Ok(sub) = g.group(&name) {
            find_3d_datasets(&sub, &full, out);
        }
    }
}

pub fn read_hdf5(path: &Path, dataset: Option<&str>, opts: &ReadOptions) -> Result<Volume> {
    if std::fs::metadata(path).map_err(|e| Error::io(path, e))?.len() == 0 {
        return Err(Error::format(path, "file is empty"));
    }
    let file = hdf5::File::open(path).map_err(|e| h5err(path, e))?;
    let name = match dataset {
        Some(d) => d.to_string(),
        None => {
            let mut found = Vec::new();
            find_3d_datasets(&file, "", &mut found);
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
    let shape = ds.shape();
    let dims: [usize; 3] = match shape.len() {
        3 => [shape[0], shape[1], shape[2]],
        2 if opts.allow_2d => [1, shape[0], shape[1]],
        2 => {
            return Err(Error::invalid(format!(
                "{}:{name}: input is 2D ({}×{}); RLN needs a 3D stack",
                path.display(),
                shape[0],
                shape[1]
            )))
        }
        4 => match opts.channel {
            Some(c) if c < shape[0] => {
                let all: Vec<f32> = ds.read_raw().map_err(|e| h5err(path, e))?;
                let n = shape[1] * shape[2] * shape[3];
                let mut v = Volume::new([shape[1], shape[2], shape[3]], all[c * n..(c + 1) * n].to_vec())?;
                read_attrs(&ds, &mut v, path)?;
                if opts.check_finite {
                    v.check_finite(&format!("{}:{name}", path.display()))?;
                }
                return Ok(v);
            }
            _ => {
                return Err(Error::invalid(format!(
                    "{}:{name}: 4D dataset {:?} (channels first); choose a channel with --channel 0..{}",
                    path.display(),
                    shape,
                    shape[0].saturating_sub(1)
                )))
            }
        },
        _ => {
            return Err(Error::invalid(format!(
                "{}:{name}: dataset has shape {shape:?}; a 3D volume is needed",
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
    let data: Vec<f32> = ds.read_raw().map_err(|e| h5err(path, e))?;
    let mut v = Volume::new(dims, data)?;
    read_attrs(&ds, &mut v, path)?;
    if opts.check_finite {
        v.check_finite(&format!("{}:{name}", path.display()))?;
    }
    Ok(v)
}

fn read_attrs(ds: &hdf5::Dataset, v: &mut Volume, path: &Path) -> Result<()> {
    if let Ok(a) = ds.attr("element_size_um") {
        let vs: Vec<f64> = a.read_raw().map_err(|e| h5err(path, e))?;
        if vs.len() == 3 {
            v.voxel_size = Some([vs[0], vs[1], vs[2]]);
            v.unit = "micron".into();
        }
    }
    if let Ok(a) = ds.attr("rln_metadata") {
        if let Ok(s) = a.read_scalar::<VarLenUnicode>() {
            v.metadata = Some(s.as_str().to_string());
        }
    }
    Ok(())
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
        if let Some(vs) = vol.voxel_size {
            ds.new_attr::<f64>()
                .shape(3)
                .create("element_size_um")
                .and_then(|a| a.write_raw(&vs))
                .map_err(builder_err)?;
        }
        if let Some(m) = &vol.metadata {
            let s: VarLenUnicode = m.parse().map_err(|e| Error::invalid(format!("metadata: {e}")))?;
            ds.new_attr::<VarLenUnicode>()
                .create("rln_metadata")
                .and_then(|a| a.write_scalar(&s))
                .map_err(builder_err)?;
        }
        file.close().map_err(builder_err)?;
        std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

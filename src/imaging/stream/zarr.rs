//! OME-Zarr stores (NGFF 0.4 on Zarr v2, NGFF 0.5 on Zarr v3 with or without sharding)
//! read and written by region through the `zarrs` crate.
//!
//! Reading: level 0 of the store's first multiscale image (or a bare 3D array); any
//! chunking; axes must end in z, y, x, and leading t/c axes must have size 1 (a c axis
//! may be chosen with `--channel`). The level's `scale` (times the multiscale's own) is
//! the voxel size, in µm when the axes name a unit (µm assumed when they do not).
//! A chunk file that is absent is the array's fill value, as the Zarr specification says
//! (a store written only in part reads as zeros there: check [`is_complete`]); a chunk
//! file that is present but cannot be decoded is an error naming the region.
//!
//! Writing: default **NGFF 0.4 / Zarr v2** ([`ZarrVersion::default`]): every reader our
//! users have opens it (zarr-python 2 and 3, ome-zarr-py, napari, Fiji's n5-zarr and
//! MoBIE, PetaKit5D, neuroglancer), while 0.5 / Zarr v3 readers are still arriving in
//! some of them; at our default chunk of 64×256×256 voxels a 131 Gvoxel volume is 32 000
//! chunk files, few enough that v3's sharding is not needed. `--zarr-version 3` writes
//! NGFF 0.5 (optionally sharded) for tools that want it. Chunks are compressed with zstd
//! (or blosc-zstd with byte shuffle). The root attribute `rln_engine: {complete}` is
//! false until [`VolumeWriter::finish`] (or [`mark_complete`]) sets it, so a store left
//! by an interrupted run is recognisable.
//!
//! The NGFF JSON is read and written with serde_json directly rather than through the
//! `ome_zarr_metadata` crate: that crate stores scales as f32 (a 0.1 µm voxel size would
//! come back as 0.10000000149) and rejects multiscales with fields it does not know,
//! which stores written by other tools have.

use super::{check_region_finite, unit_regions, Region, VolumeInfo, VolumeReader, VolumeWriter, WriterSpec};
use crate::error::{Error, Result};
use crate::fsutil::write_atomic;
use crate::imaging::format::to_u16;
use crate::imaging::format::{OutputDtype, ReadOptions};
use rayon::prelude::*;
use serde_json::{json, Map, Value};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use zarrs::array::{Array, ArraySubset};
use zarrs::filesystem::FilesystemStore;

/// The Zarr (and NGFF) version of a written store.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum ZarrVersion {
    /// NGFF 0.4 on Zarr v2: the default (see the module docs for why).
    #[default]
    V2,
    /// NGFF 0.5 on Zarr v3.
    V3,
}

impl std::str::FromStr for ZarrVersion {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "2" | "v2" | "0.4" => Ok(ZarrVersion::V2),
            "3" | "v3" | "0.5" => Ok(ZarrVersion::V3),
            _ => Err(Error::invalid(format!(
                "unknown Zarr version {s:?}: use 2 (OME-NGFF 0.4) or 3 (OME-Zarr 0.5)"
            ))),
        }
    }
}

/// The compressor of written chunks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ZarrCompression {
    /// zstd level 3: fast, and standard in Zarr v3 and numcodecs.
    #[default]
    Zstd,
    /// blosc with zstd inside and byte shuffle (what PetaKit5D and many v2 tools write).
    Blosc,
}

impl std::str::FromStr for ZarrCompression {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "zstd" => Ok(ZarrCompression::Zstd),
            "blosc" => Ok(ZarrCompression::Blosc),
            _ => Err(Error::invalid(format!("unknown compression {s:?}: use zstd or blosc"))),
        }
    }
}

/// How a store is written besides the [`WriterSpec`].
#[derive(Clone, Debug, Default)]
pub struct ZarrWriteOptions {
    pub version: ZarrVersion,
    pub compression: ZarrCompression,
    /// Zarr v3 only: shard shape (a multiple of the chunk shape); writes then go by whole
    /// shards ([`VolumeWriter::write_unit`]).
    pub shard: Option<[usize; 3]>,
}

/// Default chunk shape (z, y, x): 4 Mvoxel (8 MB as u16), cut to the volume.
pub const DEFAULT_CHUNKS: [usize; 3] = [64, 256, 256];

/// Whether `path` is a folder holding Zarr metadata (a group or an array, v2 or v3).
pub fn looks_like_store(path: &Path) -> bool {
    path.is_dir()
        && [".zgroup", ".zarray", "zarr.json"]
            .iter()
            .any(|f| path.join(f).is_file())
}

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::format(path, format!("not valid JSON: {e}")))
}

fn write_json(path: &Path, v: &Value) -> Result<()> {
    let text = serde_json::to_string_pretty(v).map_err(|e| Error::invalid(format!("JSON: {e}")))?;
    write_atomic(path, text.as_bytes())
}

/// The root node of a store: its Zarr version and its attributes.
struct Root {
    version: ZarrVersion,
    /// Whether the root is itself an array (a bare array, no NGFF metadata).
    is_array: bool,
    attrs: Map<String, Value>,
}

fn read_root(store: &Path) -> Result<Root> {
    let v3 = store.join("zarr.json");
    if v3.is_file() {
        let j = read_json(&v3)?;
        let is_array = j.get("node_type").and_then(Value::as_str) == Some("array");
        let attrs = j
            .get("attributes")
            .and_then(Value::as_object)
            .cloned()
            .unwrap_or_default();
        return Ok(Root {
            version: ZarrVersion::V3,
            is_array,
            attrs,
        });
    }
    let is_array = store.join(".zarray").is_file();
    if !is_array && !store.join(".zgroup").is_file() {
        return Err(Error::format(
            store,
            "not a Zarr store: no zarr.json, .zgroup or .zarray (missing metadata; was the store copied whole?)",
        ));
    }
    let za = store.join(".zattrs");
    let attrs = if za.is_file() {
        read_json(&za)?.as_object().cloned().unwrap_or_default()
    } else {
        Map::new()
    };
    Ok(Root {
        version: ZarrVersion::V2,
        is_array,
        attrs,
    })
}

fn write_root_attrs(store: &Path, version: ZarrVersion, attrs: Map<String, Value>) -> Result<()> {
    match version {
        ZarrVersion::V2 => write_json(&store.join(".zattrs"), &Value::Object(attrs)),
        ZarrVersion::V3 => {
            let p = store.join("zarr.json");
            let mut j = if p.is_file() {
                read_json(&p)?
            } else {
                json!({"zarr_format": 3, "node_type": "group"})
            };
            j["attributes"] = Value::Object(attrs);
            write_json(&p, &j)
        }
    }
}

/// The multiscales list of a root's attributes (0.4: top level; 0.5: under `ome`).
fn multiscales(root: &Root) -> Option<&Vec<Value>> {
    root.attrs
        .get("multiscales")
        .or_else(|| root.attrs.get("ome").and_then(|o| o.get("multiscales")))
        .and_then(Value::as_array)
}

fn multiscales_mut(attrs: &mut Map<String, Value>) -> Option<&mut Vec<Value>> {
    if attrs.contains_key("multiscales") {
        attrs.get_mut("multiscales").and_then(Value::as_array_mut)
    } else {
        attrs
            .get_mut("ome")
            .and_then(|o| o.get_mut("multiscales"))
            .and_then(Value::as_array_mut)
    }
}

/// Sets (or reads) the `rln_engine.complete` root attribute.
fn rln_state(attrs: &Map<String, Value>) -> Option<bool> {
    attrs
        .get("rln_engine")
        .and_then(|r| r.get("complete"))
        .and_then(Value::as_bool)
}

/// Marks the store complete (root attribute `rln_engine: {complete: true}`), atomically.
pub fn mark_complete(store: &Path) -> Result<()> {
    let mut root = read_root(store)?;
    let entry = root.attrs.entry("rln_engine").or_insert_with(|| json!({}));
    if !entry.is_object() {
        *entry = json!({});
    }
    entry["complete"] = Value::Bool(true);
    entry["engine_version"] = Value::String(env!("CARGO_PKG_VERSION").into());
    write_root_attrs(store, root.version, root.attrs)
}

/// Whether the store carries `rln_engine: {complete: true}` (false for a store this
/// engine did not finish, and for stores written by other tools).
pub fn is_complete(store: &Path) -> Result<bool> {
    Ok(rln_state(&read_root(store)?.attrs) == Some(true))
}

/// Whether the store was created by this engine and not finished (`rln_engine:
/// {complete: false}`): its chunks not yet written would read as fill values.
pub fn is_unfinished(store: &Path) -> Result<bool> {
    Ok(rln_state(&read_root(store)?.attrs) == Some(false))
}

/// A sample type a store may hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Dt {
    U8,
    U16,
    U32,
    I8,
    I16,
    I32,
    F16,
    F32,
    F64,
}

impl Dt {
    fn name(self) -> &'static str {
        match self {
            Dt::U8 => "u8",
            Dt::U16 => "u16",
            Dt::U32 => "u32",
            Dt::I8 => "i8",
            Dt::I16 => "i16",
            Dt::I32 => "i32",
            Dt::F16 => "f16",
            Dt::F32 => "f32",
            Dt::F64 => "f64",
        }
    }
    /// From an array's metadata (v2 `dtype` such as `<u2`, v3 `data_type` such as `uint16`).
    fn parse(meta: &Value) -> std::result::Result<Dt, String> {
        let s = meta
            .get("data_type")
            .or_else(|| meta.get("dtype"))
            .map(|v| v.as_str().map(str::to_string).unwrap_or_else(|| v.to_string()))
            .unwrap_or_default();
        let key = s.trim_start_matches(['<', '>', '|', '=']);
        Ok(match key {
            "u1" | "uint8" => Dt::U8,
            "u2" | "uint16" => Dt::U16,
            "u4" | "uint32" => Dt::U32,
            "i1" | "int8" => Dt::I8,
            "i2" | "int16" => Dt::I16,
            "i4" | "int32" => Dt::I32,
            "f2" | "float16" => Dt::F16,
            "f4" | "float32" => Dt::F32,
            "f8" | "float64" => Dt::F64,
            _ => return Err(s),
        })
    }
    fn output(self) -> Option<OutputDtype> {
        match self {
            Dt::U16 => Some(OutputDtype::U16),
            Dt::F16 => Some(OutputDtype::F16),
            Dt::F32 => Some(OutputDtype::F32),
            _ => None,
        }
    }
}

/// One array of a store, with the leading (t/c) indices fixed: reads and writes 3D regions.
struct LevelArray {
    store: PathBuf,
    array: Array<FilesystemStore>,
    /// The array's path inside the store ("/0").
    name: String,
    meta: Value,
    dt: Dt,
    /// Fixed indices of the leading axes (t, c).
    lead: Vec<u64>,
    dims: [usize; 3],
    /// The chunk shape (the inner chunk of a sharded array) and the shard shape.
    chunks: [usize; 3],
    shard: [usize; 3],
}

fn zerr(store: &Path, what: &str, e: impl std::fmt::Display) -> Error {
    Error::format(store, format!("{what}: {e}"))
}

fn meta_path(store: &Path, name: &str, version: ZarrVersion) -> PathBuf {
    let dir = store.join(name.trim_start_matches('/'));
    match version {
        ZarrVersion::V2 => dir.join(".zarray"),
        ZarrVersion::V3 => dir.join("zarr.json"),
    }
}

fn shape3(v: Option<&Value>) -> Option<Vec<usize>> {
    v?.as_array()?.iter().map(|x| x.as_u64().map(|x| x as usize)).collect()
}

impl LevelArray {
    fn open(store: &Path, name: &str, version: ZarrVersion, lead: Vec<u64>) -> Result<Self> {
        let mp = meta_path(store, name, version);
        if !mp.is_file() {
            return Err(Error::format(
                store,
                format!("array {name} has no metadata ({} is missing)", mp.display()),
            ));
        }
        let meta = read_json(&mp)?;
        let dt = Dt::parse(&meta).map_err(|s| {
            Error::format(
                store,
                format!("array {name} holds {s} samples; readable types are u8/u16/u32, i8/i16/i32, f16/f32/f64"),
            )
        })?;
        let fs = Arc::new(FilesystemStore::new(store).map_err(|e| zerr(store, "opening the store", e))?);
        let array = Array::open(fs, name).map_err(|e| zerr(store, &format!("array {name}"), e))?;
        let shape: Vec<usize> = array.shape().iter().map(|&s| s as usize).collect();
        let n = shape.len();
        if n < 3 {
            return Err(Error::invalid(format!(
                "{}: array {name} is {n}D ({}); RLN needs a 3D stack (z, y, x)",
                store.display(),
                shape.iter().map(|s| s.to_string()).collect::<Vec<_>>().join("×")
            )));
        }
        let dims = [shape[n - 3], shape[n - 2], shape[n - 1]];
        // chunk (or shard) shape from the metadata; the inner chunk of sharding_indexed
        let outer = shape3(
            meta.get("chunks")
                .or_else(|| meta.pointer("/chunk_grid/configuration/chunk_shape")),
        )
        .filter(|c| c.len() == n)
        .ok_or_else(|| Error::format(store, format!("array {name}: no regular chunk shape in its metadata")))?;
        let inner = meta
            .get("codecs")
            .and_then(Value::as_array)
            .and_then(|c| {
                c.iter()
                    .find(|c| c.get("name").and_then(Value::as_str) == Some("sharding_indexed"))
            })
            .and_then(|c| shape3(c.pointer("/configuration/chunk_shape")))
            .filter(|c| c.len() == n)
            .unwrap_or_else(|| outer.clone());
        let last3 = |v: &[usize]| [v[n - 3], v[n - 2], v[n - 1]];
        Ok(LevelArray {
            store: store.to_path_buf(),
            array,
            name: name.to_string(),
            meta,
            dt,
            lead,
            dims,
            chunks: last3(&inner),
            shard: last3(&outer),
        })
    }

    fn subset(&self, r: Region) -> ArraySubset {
        let mut ranges: Vec<std::ops::Range<u64>> = self.lead.iter().map(|&i| i..i + 1).collect();
        for a in 0..3 {
            ranges.push(r.start[a] as u64..(r.start[a] + r.shape[a]) as u64);
        }
        ArraySubset::new_with_ranges(&ranges)
    }

    fn read(&self, r: Region, dst: &mut [f32]) -> Result<()> {
        let s = self.subset(r);
        let err = |e: zarrs::array::ArrayError| {
            Error::format(
                &self.store,
                format!(
                    "array {}: reading region {:?}+{:?}: {e} (a truncated or corrupt chunk file?)",
                    self.name, r.start, r.shape
                ),
            )
        };
        macro_rules! get {
            ($t:ty, $conv:expr) => {{
                let v: Vec<$t> = self.array.retrieve_array_subset::<Vec<$t>>(&s).map_err(err)?;
                if v.len() != dst.len() {
                    return Err(Error::format(
                        &self.store,
                        format!(
                            "array {}: read {} values, expected {}",
                            self.name,
                            v.len(),
                            dst.len()
                        ),
                    ));
                }
                for (d, x) in dst.iter_mut().zip(v) {
                    *d = $conv(x);
                }
            }};
        }
        match self.dt {
            Dt::U8 => get!(u8, |x| x as f32),
            Dt::U16 => get!(u16, |x| x as f32),
            Dt::U32 => get!(u32, |x| x as f32),
            Dt::I8 => get!(i8, |x| x as f32),
            Dt::I16 => get!(i16, |x| x as f32),
            Dt::I32 => get!(i32, |x| x as f32),
            Dt::F16 => get!(half::f16, |x: half::f16| x.to_f32()),
            Dt::F32 => get!(f32, |x| x),
            Dt::F64 => get!(f64, |x| x as f32),
        }
        Ok(())
    }

    fn write(&self, r: Region, data: &[f32]) -> Result<()> {
        let s = self.subset(r);
        let err = |e: zarrs::array::ArrayError| {
            Error::format(
                &self.store,
                format!("array {}: writing region {:?}+{:?}: {e}", self.name, r.start, r.shape),
            )
        };
        match self.dt {
            Dt::U16 => self
                .array
                .store_array_subset(&s, data.iter().map(|&v| to_u16(v)).collect::<Vec<u16>>()),
            Dt::F16 => self.array.store_array_subset(
                &s,
                data.iter().map(|&v| half::f16::from_f32(v)).collect::<Vec<half::f16>>(),
            ),
            Dt::F32 => self.array.store_array_subset(&s, data.to_vec()),
            other => {
                return Err(Error::invalid(format!(
                    "{}: array {} holds {} samples; the engine writes u16, f16 or f32",
                    self.store.display(),
                    self.name,
                    other.name()
                )))
            }
        }
        .map_err(err)
    }
}

/// Unit name → µm factor (NGFF units are UDUNITS names).
fn unit_factor(unit: Option<&str>) -> Option<f64> {
    match unit {
        None => Some(1.0),
        Some(u) => match u.to_ascii_lowercase().as_str() {
            "micrometer" | "micron" | "um" | "µm" => Some(1.0),
            "nanometer" | "nm" => Some(1e-3),
            "angstrom" => Some(1e-4),
            "millimeter" | "mm" => Some(1e3),
            "centimeter" | "cm" => Some(1e4),
            "meter" | "m" => Some(1e6),
            _ => None,
        },
    }
}

/// Level 0 of a store: its array name, the leading indices, and the voxel size.
struct Level0 {
    name: String,
    voxel_size: Option<[f64; 3]>,
}

fn axis_name(a: &Value) -> String {
    a.get("name")
        .and_then(Value::as_str)
        .or_else(|| a.as_str())
        .unwrap_or("?")
        .to_ascii_lowercase()
}

fn scale_of(transforms: Option<&Value>) -> Option<Vec<f64>> {
    transforms?
        .as_array()?
        .iter()
        .find(|t| t.get("type").and_then(Value::as_str) == Some("scale"))
        .and_then(|t| t.get("scale")?.as_array()?.iter().map(Value::as_f64).collect())
}

/// Finds level 0 and checks its axes; `shape` is read from the array later.
fn level0(store: &Path, root: &Root, channel: Option<usize>) -> Result<(Level0, Option<Vec<Value>>)> {
    if root.is_array {
        return Ok((
            Level0 {
                name: "/".into(),
                voxel_size: None,
            },
            None,
        ));
    }
    let ms = multiscales(root).and_then(|m| m.first()).ok_or_else(|| {
        Error::format(
            store,
            "group has no OME-NGFF `multiscales` metadata; open the array inside it (e.g. STORE.zarr/0) or add the metadata",
        )
    })?;
    let ds = ms
        .get("datasets")
        .and_then(Value::as_array)
        .and_then(|d| d.first())
        .ok_or_else(|| Error::format(store, "multiscales has no datasets"))?;
    let path = ds
        .get("path")
        .and_then(Value::as_str)
        .ok_or_else(|| Error::format(store, "multiscales dataset 0 has no path"))?;
    let axes: Vec<Value> = ms.get("axes").and_then(Value::as_array).cloned().unwrap_or_default();
    let names: Vec<String> = axes.iter().map(axis_name).collect();
    let n = names.len();
    if n < 3 || names[n - 3..] != ["z", "y", "x"] {
        return Err(Error::invalid(format!(
            "{}: axes are [{}]; RLN needs a 3D stack whose last axes are z, y, x (leading t/c of size 1)",
            store.display(),
            names.join(", ")
        )));
    }
    let mut scale = scale_of(ds.get("coordinateTransformations")).unwrap_or_else(|| vec![1.0; n]);
    if let Some(outer) = scale_of(ms.get("coordinateTransformations")) {
        for (s, o) in scale.iter_mut().zip(outer) {
            *s *= o;
        }
    }
    let units: Vec<Option<f64>> = axes[n - 3..]
        .iter()
        .map(|a| unit_factor(a.get("unit").and_then(Value::as_str)))
        .collect();
    let voxel_size = if scale.len() == n && units.iter().all(Option::is_some) {
        let vs = [0, 1, 2].map(|i| scale[n - 3 + i] * units[i].unwrap_or(1.0));
        Some(vs)
    } else {
        None
    };
    let _ = channel;
    Ok((
        Level0 {
            name: format!("/{}", path.trim_matches('/')),
            voxel_size,
        },
        Some(axes),
    ))
}

/// Level 0 of an OME-Zarr store (or a bare 3D array) read by regions.
pub struct ZarrReader {
    level: LevelArray,
    info: VolumeInfo,
    check_finite: bool,
}

impl ZarrReader {
    pub fn open(store: &Path, opts: &ReadOptions) -> Result<Self> {
        let root = read_root(store)?;
        let (l0, axes) = level0(store, &root, opts.channel)?;
        let mut level = LevelArray::open(store, &l0.name, root.version, vec![])?;
        let shape: Vec<usize> = level.array.shape().iter().map(|&s| s as usize).collect();
        let n = shape.len();
        let names: Vec<String> = match &axes {
            Some(a) if a.len() == n => a.iter().map(axis_name).collect(),
            Some(a) => {
                return Err(Error::format(
                    store,
                    format!(
                        "multiscales names {} axes but array {} has {n} dimensions {shape:?}",
                        a.len(),
                        l0.name
                    ),
                ))
            }
            // a bare array: dimension names if any, else the last three are z, y, x
            None => (0..n)
                .map(|i| ["t", "c", "z", "y", "x"][5 - n.min(5) + i.min(4)].to_string())
                .collect(),
        };
        let mut lead = Vec::new();
        for i in 0..n.saturating_sub(3) {
            let (name, size) = (&names[i], shape[i]);
            let idx = if size == 1 {
                0
            } else if name == "c" {
                match opts.channel {
                    Some(c) if c < size => c,
                    Some(c) => {
                        return Err(Error::invalid(format!(
                            "{}: channel {c} does not exist (the store has {size} channels)",
                            store.display()
                        )))
                    }
                    None => {
                        return Err(Error::invalid(format!(
                        "{}: the store has {size} channels (axis c, shape {shape:?}); choose one with --channel 0..{}",
                        store.display(),
                        size - 1
                    )))
                    }
                }
            } else {
                return Err(Error::invalid(format!(
                    "{}: axis {name} has {size} entries (shape {shape:?}); RLN takes one 3D stack: save a single {}",
                    store.display(),
                    if name == "t" {
                        "time point"
                    } else {
                        "entry of that axis"
                    }
                )));
            };
            lead.push(idx as u64);
        }
        level.lead = lead;
        if level.dims[0] <= 1 && !opts.allow_2d {
            return Err(Error::invalid(format!(
                "{}: input is 2D ({}×{}); RLN needs a 3D stack",
                store.display(),
                level.dims[1],
                level.dims[2]
            )));
        }
        let metadata = match root.attrs.get("rln_metadata") {
            Some(Value::String(s)) => Some(s.clone()),
            Some(other) => Some(other.to_string()),
            None => {
                let omero = root
                    .attrs
                    .get("omero")
                    .or_else(|| root.attrs.get("ome").and_then(|o| o.get("omero")));
                omero.map(|o| json!({ "omero": o }).to_string())
            }
        };
        let info = VolumeInfo {
            dims: level.dims,
            voxel_size: l0.voxel_size,
            dtype: level.dt.name().into(),
            metadata,
        };
        Ok(ZarrReader {
            level,
            info,
            check_finite: opts.check_finite,
        })
    }

    /// The chunk shape reads decode whole (the inner chunk of a sharded array).
    pub fn chunks(&self) -> [usize; 3] {
        self.level.chunks
    }
}

impl VolumeReader for ZarrReader {
    fn info(&self) -> &VolumeInfo {
        &self.info
    }
    fn read_unit(&self) -> [usize; 3] {
        self.level.chunks
    }
    fn read_region(&self, region: Region, dst: &mut [f32]) -> Result<()> {
        region.check_buffer(self.info.dims, dst.len(), &self.level.store.display().to_string())?;
        self.level.read(region, dst)?;
        if self.check_finite {
            check_region_finite(dst, region, &self.level.store.display().to_string())?;
        }
        Ok(())
    }
}

/// The NGFF axes of a z, y, x volume, with µm units when the voxel size is known.
fn ngff_axes(with_unit: bool) -> Value {
    Value::Array(
        ["z", "y", "x"]
            .iter()
            .map(|n| {
                let mut a = json!({"name": n, "type": "space"});
                if with_unit {
                    a["unit"] = json!("micrometer");
                }
                a
            })
            .collect(),
    )
}

fn dataset_entry(path: &str, scale: [f64; 3]) -> Value {
    json!({"path": path, "coordinateTransformations": [{"type": "scale", "scale": scale}]})
}

/// The array metadata (`.zarray` or `zarr.json`) of a new level.
fn array_meta(
    version: ZarrVersion,
    dims: [usize; 3],
    chunks: [usize; 3],
    shard: Option<[usize; 3]>,
    dtype: OutputDtype,
    comp: ZarrCompression,
) -> Value {
    let bytes = dtype.bytes();
    match version {
        ZarrVersion::V2 => {
            let dt = match dtype {
                OutputDtype::U16 => "<u2",
                OutputDtype::F16 => "<f2",
                OutputDtype::F32 => "<f4",
            };
            let compressor = match comp {
                ZarrCompression::Zstd => json!({"id": "zstd", "level": 3}),
                ZarrCompression::Blosc => {
                    json!({"id": "blosc", "cname": "zstd", "clevel": 5, "shuffle": 1, "blocksize": 0})
                }
            };
            json!({
                "zarr_format": 2, "shape": dims, "chunks": chunks, "dtype": dt, "compressor": compressor,
                "fill_value": 0, "order": "C", "filters": null, "dimension_separator": "/"
            })
        }
        ZarrVersion::V3 => {
            let dt = match dtype {
                OutputDtype::U16 => "uint16",
                OutputDtype::F16 => "float16",
                OutputDtype::F32 => "float32",
            };
            let compressor = match comp {
                ZarrCompression::Zstd => json!({"name": "zstd", "configuration": {"level": 3, "checksum": false}}),
                ZarrCompression::Blosc => {
                    json!({"name": "blosc", "configuration": {"cname": "zstd", "clevel": 5, "shuffle": "shuffle", "typesize": bytes, "blocksize": 0}})
                }
            };
            let bytes_codec = json!({"name": "bytes", "configuration": {"endian": "little"}});
            let (grid, codecs) = match shard {
                Some(s) => (
                    s,
                    json!([{"name": "sharding_indexed", "configuration": {
                        "chunk_shape": chunks,
                        "codecs": [bytes_codec, compressor],
                        "index_codecs": [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}],
                        "index_location": "end"
                    }}]),
                ),
                None => (chunks, json!([bytes_codec, compressor])),
            };
            json!({
                "zarr_format": 3, "node_type": "array", "shape": dims, "data_type": dt,
                "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": grid}},
                "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
                "fill_value": 0, "codecs": codecs, "dimension_names": ["z", "y", "x"], "attributes": {}
            })
        }
    }
}

/// Writes level 0 of an OME-Zarr store by regions aligned to its chunks (or shards).
pub struct ZarrWriter {
    level: LevelArray,
    dtype: OutputDtype,
    /// Whether `finish` marks the store complete (a store made by `create`) or leaves
    /// that to `mark_complete` (an existing store written by blocks).
    marks_complete: bool,
}

impl ZarrWriter {
    /// Creates the store at `store` (which must not exist, or be an empty folder): root
    /// group with NGFF multiscales (one level, `0`), axes z, y, x, the voxel size as the
    /// level's scale, the input's metadata, and `rln_engine: {complete: false}`.
    pub fn create(store: &Path, spec: &WriterSpec, opts: &ZarrWriteOptions) -> Result<Self> {
        super::check_spec(spec, store)?;
        crate::fsutil::check_output_dir(store)?;
        if store.exists() {
            let empty = store.is_dir()
                && std::fs::read_dir(store)
                    .map(|mut d| d.next().is_none())
                    .unwrap_or(false);
            if !empty {
                return Err(Error::invalid(format!(
                    "{} already exists; remove it or choose another output name (convert: --overwrite)",
                    store.display()
                )));
            }
        }
        let dims = spec.dims;
        let chunks = {
            let c = spec.chunks.unwrap_or(DEFAULT_CHUNKS);
            [0, 1, 2].map(|i| c[i].min(dims[i]).max(1))
        };
        let shard = match (opts.shard, opts.version) {
            (None, _) => None,
            (Some(_), ZarrVersion::V2) => {
                return Err(Error::invalid(
                    "sharding needs Zarr v3: add --zarr-version 3 or drop --shard",
                ));
            }
            (Some(s), ZarrVersion::V3) => {
                if (0..3).any(|i| s[i] == 0 || s[i] % chunks[i] != 0) {
                    return Err(Error::invalid(format!(
                        "shard shape {s:?} must be a multiple of the chunk shape {chunks:?}"
                    )));
                }
                Some(s)
            }
        };
        std::fs::create_dir_all(store.join("0")).map_err(|e| Error::io(store, e))?;
        let result = (|| {
            let meta = array_meta(opts.version, dims, chunks, shard, spec.dtype, opts.compression);
            let scale = spec.voxel_size.unwrap_or([1.0; 3]);
            let mut ms = json!({
                "name": store.file_stem().map(|s| s.to_string_lossy().trim_end_matches(".ome").to_string()).unwrap_or_default(),
                "axes": ngff_axes(spec.voxel_size.is_some()),
                "datasets": [dataset_entry("0", scale)],
                "metadata": {"method": "rln-engine", "version": env!("CARGO_PKG_VERSION")}
            });
            let mut attrs = Map::new();
            let omero = spec
                .metadata
                .as_deref()
                .and_then(|m| serde_json::from_str::<Value>(m).ok())
                .and_then(|v| v.get("omero").cloned());
            match opts.version {
                ZarrVersion::V2 => {
                    ms["version"] = json!("0.4");
                    write_json(&store.join(".zgroup"), &json!({"zarr_format": 2}))?;
                    attrs.insert("multiscales".into(), json!([ms]));
                    if let Some(o) = omero {
                        attrs.insert("omero".into(), o);
                    }
                    write_json(&store.join("0").join(".zarray"), &meta)?;
                    write_json(
                        &store.join("0").join(".zattrs"),
                        &json!({"_ARRAY_DIMENSIONS": ["z", "y", "x"]}),
                    )?;
                }
                ZarrVersion::V3 => {
                    let mut ome = json!({"version": "0.5", "multiscales": [ms]});
                    if let Some(o) = omero {
                        ome["omero"] = o;
                    }
                    attrs.insert("ome".into(), ome);
                    write_json(&store.join("0").join("zarr.json"), &meta)?;
                }
            }
            if let Some(m) = &spec.metadata {
                attrs.insert("rln_metadata".into(), Value::String(m.clone()));
            }
            attrs.insert(
                "rln_engine".into(),
                json!({"complete": false, "engine_version": env!("CARGO_PKG_VERSION")}),
            );
            write_root_attrs(store, opts.version, attrs)?;
            LevelArray::open(store, "/0", opts.version, vec![])
        })();
        match result {
            Ok(level) => Ok(ZarrWriter {
                level,
                dtype: spec.dtype,
                marks_complete: true,
            }),
            Err(e) => {
                let _ = std::fs::remove_dir_all(store);
                Err(e)
            }
        }
    }

    /// The chunk shape (inner chunk when sharded).
    pub fn chunks(&self) -> [usize; 3] {
        self.level.chunks
    }
}

/// Opens level 0 of an existing store for writing more of it (block mode): writes
/// chunks, never truncates or rewrites metadata; `finish` flushes but does not mark the
/// store complete (call [`mark_complete`] once every block is done).
pub fn open_existing_writer(store: &Path) -> Result<Box<dyn VolumeWriter>> {
    let root = read_root(store)?;
    let (l0, _) = level0(store, &root, None)?;
    let level = LevelArray::open(store, &l0.name, root.version, vec![])?;
    if level.array.shape().len() != 3 {
        return Err(Error::invalid(format!(
            "{}: level 0 is not a 3D array; the engine writes z, y, x stores",
            store.display()
        )));
    }
    let dtype = level.dt.output().ok_or_else(|| {
        Error::invalid(format!(
            "{}: level 0 holds {} samples; the engine writes u16, f16 or f32",
            store.display(),
            level.dt.name()
        ))
    })?;
    Ok(Box::new(ZarrWriter {
        level,
        dtype,
        marks_complete: false,
    }))
}

impl VolumeWriter for ZarrWriter {
    fn dims(&self) -> [usize; 3] {
        self.level.dims
    }
    /// The chunk shape, or the shard shape of a sharded array: whole units are written
    /// without reading anything back, so writers of different units never meet.
    fn write_unit(&self) -> [usize; 3] {
        self.level.shard
    }
    fn write_region(&self, region: Region, data: &[f32]) -> Result<()> {
        super::check_write(
            region,
            data,
            self.level.dims,
            self.dtype,
            &self.level.store.display().to_string(),
        )?;
        self.level.write(region, data)
    }
    fn finish(self: Box<Self>) -> Result<()> {
        if self.marks_complete {
            mark_complete(&self.level.store)?;
        }
        Ok(())
    }
}

/// Adds `levels` NGFF multiscale levels (1, 2, …), each a 2× average of the one before
/// along every axis longer than one voxel, computed chunk by chunk (memory: a few
/// chunks per thread), then lists them in the multiscales metadata.
pub fn write_pyramid(store: &Path, levels: usize) -> Result<()> {
    if levels == 0 {
        return Ok(());
    }
    let mut root = read_root(store)?;
    let version = root.version;
    let (l0, _) = level0(store, &root, None)?;
    let base = LevelArray::open(store, &l0.name, version, vec![])?;
    if base.array.shape().len() != 3 {
        return Err(Error::invalid(format!(
            "{}: a pyramid needs a 3D level 0",
            store.display()
        )));
    }
    let dtype = base.dt.output().ok_or_else(|| {
        Error::invalid(format!(
            "{}: level 0 holds {} samples; pyramids are made of u16, f16 or f32",
            store.display(),
            base.dt.name()
        ))
    })?;
    let datasets = multiscales(&root)
        .and_then(|m| m.first())
        .and_then(|m| m.get("datasets"))
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let base_scale =
        scale_of(datasets.first().and_then(|d| d.get("coordinateTransformations"))).unwrap_or_else(|| vec![1.0; 3]);
    let mut entries = vec![datasets
        .first()
        .cloned()
        .unwrap_or_else(|| dataset_entry("0", [1.0; 3]))];
    let mut src = base;
    let mut factor = [1.0f64; 3];
    for l in 1..=levels {
        let step = src.dims.map(|d| if d > 1 { 2 } else { 1 });
        let dims = [0, 1, 2].map(|i| src.dims[i].div_ceil(step[i]));
        for i in 0..3 {
            factor[i] *= step[i] as f64;
        }
        let name = format!("{l}");
        let dir = store.join(&name);
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        }
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        let mut meta = src.meta.clone();
        meta["shape"] = json!(dims);
        write_json(&meta_path(store, &name, version), &meta)?;
        let dst = LevelArray::open(store, &format!("/{name}"), version, vec![])?;
        let pb = crate::imaging::progress::bar(0, &format!("level {l}"));
        let units = unit_regions(Region::whole(dims), dst.shard);
        pb.set_length(units.len() as u64);
        units.par_iter().try_for_each(|&r| -> Result<()> {
            let s_start = [0, 1, 2].map(|i| r.start[i] * step[i]);
            let s_shape = [0, 1, 2].map(|i| (r.shape[i] * step[i]).min(src.dims[i] - s_start[i]));
            let sr = Region::new(s_start, s_shape);
            let mut buf = vec![0.0f32; sr.voxels()];
            src.read(sr, &mut buf)?;
            let out = downsample(&buf, s_shape, r.shape, step);
            let out: Vec<f32> = match dtype {
                OutputDtype::U16 => out.into_iter().map(f32::round).collect(),
                _ => out,
            };
            dst.write(r, &out)?;
            pb.inc(1);
            Ok(())
        })?;
        pb.finish_and_clear();
        let scale = [0, 1, 2].map(|i| base_scale.get(i).copied().unwrap_or(1.0) * factor[i]);
        entries.push(dataset_entry(&name, scale));
        src = dst;
    }
    if let Some(ms) = multiscales_mut(&mut root.attrs).and_then(|m| m.first_mut()) {
        ms["datasets"] = Value::Array(entries);
    }
    write_root_attrs(store, version, root.attrs)
}

/// Averages blocks of `step` voxels of `src` (shape `s`) into `dst` shape `d`; blocks cut
/// by the border average the voxels they have.
fn downsample(src: &[f32], s: [usize; 3], d: [usize; 3], step: [usize; 3]) -> Vec<f32> {
    let mut out = vec![0.0f32; d.iter().product()];
    for z in 0..d[0] {
        for y in 0..d[1] {
            for x in 0..d[2] {
                let (mut sum, mut n) = (0.0f64, 0usize);
                for sz in z * step[0]..((z + 1) * step[0]).min(s[0]) {
                    for sy in y * step[1]..((y + 1) * step[1]).min(s[1]) {
                        for sx in x * step[2]..((x + 1) * step[2]).min(s[2]) {
                            sum += src[(sz * s[1] + sy) * s[2] + sx] as f64;
                            n += 1;
                        }
                    }
                }
                out[(z * d[1] + y) * d[2] + x] = (sum / n.max(1) as f64) as f32;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn downsample_averages_blocks_and_partial_borders() {
        // 3×1×3 → 2×1×2 by 2×1×2 blocks
        let src: Vec<f32> = (0..9).map(|i| i as f32).collect();
        let out = downsample(&src, [3, 1, 3], [2, 1, 2], [2, 1, 2]);
        // block (0,0): voxels 0,1,3,4 → 2; (0,1): 2,5 → 3.5; (1,0): 6,7 → 6.5; (1,1): 8
        assert_eq!(out, vec![2.0, 3.5, 6.5, 8.0]);
    }

    #[test]
    fn dtype_names_of_both_zarr_versions_parse() {
        assert_eq!(Dt::parse(&json!({"dtype": "<u2"})), Ok(Dt::U16));
        assert_eq!(Dt::parse(&json!({"data_type": "float16"})), Ok(Dt::F16));
        assert!(Dt::parse(&json!({"data_type": "bool"})).is_err());
        assert!(Dt::parse(&json!({"dtype": "<c8"})).is_err());
    }
}

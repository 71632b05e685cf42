//! Reading and writing safetensors files with errors that name the file and the tensor.

use crate::error::{Error, Result};
use crate::fsutil::write_atomic;
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// A safetensors file read into memory.
pub struct TensorFile {
    pub path: PathBuf,
    bytes: Vec<u8>,
}

/// A tensor converted to f64, with its stored shape.
#[derive(Clone, Debug)]
pub struct HostTensor {
    pub shape: Vec<usize>,
    pub data: Vec<f64>,
}

impl TensorFile {
    pub fn open(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        // validate the header once, so later lookups only fail for missing names
        SafeTensors::deserialize(&bytes).map_err(|e| {
            Error::format(
                path,
                format!("not a valid safetensors file ({e}); is it truncated or of another format?"),
            )
        })?;
        Ok(TensorFile {
            path: path.to_path_buf(),
            bytes,
        })
    }

    /// A file already in memory (e.g. embedded in the binary); `label` names it in errors.
    pub fn from_bytes(label: &str, bytes: Vec<u8>) -> Result<Self> {
        SafeTensors::deserialize(&bytes).map_err(|e| {
            Error::format(
                label,
                format!("not a valid safetensors file ({e}); is it truncated or of another format?"),
            )
        })?;
        Ok(TensorFile {
            path: PathBuf::from(label),
            bytes,
        })
    }

    fn st(&self) -> SafeTensors<'_> {
        SafeTensors::deserialize(&self.bytes).expect("validated in open")
    }

    pub fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.st().names().into_iter().map(|s| s.to_string()).collect();
        v.sort();
        v
    }

    pub fn contains(&self, name: &str) -> bool {
        self.st().tensor(name).is_ok()
    }

    /// The `__metadata__` map of the header (empty if none).
    pub fn metadata(&self) -> HashMap<String, String> {
        SafeTensors::read_metadata(&self.bytes)
            .ok()
            .and_then(|(_, m)| m.metadata().clone())
            .unwrap_or_default()
    }

    /// Reads tensor `name` (f16, bf16, f32 or f64) as f64 values.
    pub fn get(&self, name: &str) -> Result<HostTensor> {
        let st = self.st();
        let view = st
            .tensor(name)
            .map_err(|_| Error::format(&self.path, format!("tensor '{name}' is missing")))?;
        let raw = view.data();
        let data: Vec<f64> = match view.dtype() {
            Dtype::F32 => raw
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()) as f64)
                .collect(),
            Dtype::F64 => raw
                .chunks_exact(8)
                .map(|b| f64::from_le_bytes(b.try_into().unwrap()))
                .collect(),
            Dtype::F16 => raw
                .chunks_exact(2)
                .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f64())
                .collect(),
            Dtype::BF16 => raw
                .chunks_exact(2)
                .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f64())
                .collect(),
            other => {
                return Err(Error::format(
                    &self.path,
                    format!("tensor '{name}' has dtype {other:?}; expected a floating-point tensor"),
                ))
            }
        };
        Ok(HostTensor {
            shape: view.shape().to_vec(),
            data,
        })
    }

    /// Reads tensor `name` and checks that it has exactly `len` values (any shape whose
    /// product is `len`, so that [] and [1] both pass for one value).
    pub fn get_len(&self, name: &str, len: usize) -> Result<HostTensor> {
        let t = self.get(name)?;
        if t.data.len() != len {
            return Err(Error::format(
                &self.path,
                format!(
                    "tensor '{name}' has shape {:?} ({} values); expected {len} values",
                    t.shape,
                    t.data.len()
                ),
            ));
        }
        Ok(t)
    }
}

/// The same safetensors file with its JSON header's keys in sorted order: the crate
/// writes the metadata map in hash order, so two saves of one model differed in bytes.
/// Sorted, identical content gives identical files (`cmp` verifies a resumed run).
fn with_sorted_header(bytes: Vec<u8>) -> Vec<u8> {
    let n = u64::from_le_bytes(bytes[..8].try_into().expect("serialize writes an 8-byte length")) as usize;
    let header: BTreeMap<String, serde_json::Value> =
        serde_json::from_slice(&bytes[8..8 + n]).expect("serialize writes a JSON object");
    // nested objects (the metadata map, each tensor's entry) sorted too
    fn sorted(v: serde_json::Value) -> serde_json::Value {
        match v {
            serde_json::Value::Object(m) => {
                let b: BTreeMap<String, serde_json::Value> = m.into_iter().map(|(k, v)| (k, sorted(v))).collect();
                serde_json::Value::Object(b.into_iter().collect())
            }
            other => other,
        }
    }
    let header: BTreeMap<String, serde_json::Value> = header.into_iter().map(|(k, v)| (k, sorted(v))).collect();
    let mut text = serde_json::to_vec(&header).expect("JSON values serialize");
    // safetensors pads the header with spaces to a multiple of 8 bytes
    text.resize(text.len().next_multiple_of(8), b' ');
    let mut out = Vec::with_capacity(8 + text.len() + bytes.len() - 8 - n);
    out.extend_from_slice(&(text.len() as u64).to_le_bytes());
    out.extend_from_slice(&text);
    out.extend_from_slice(&bytes[8 + n..]);
    out
}

/// Tensors to write, by name, as f32, plus header metadata.
#[derive(Default)]
pub struct TensorWriter {
    tensors: BTreeMap<String, (Vec<usize>, Vec<u8>, Dtype)>,
    pub metadata: HashMap<String, String>,
}

impl TensorWriter {
    pub fn add_f32(&mut self, name: &str, shape: Vec<usize>, data: &[f32]) {
        assert_eq!(
            shape.iter().product::<usize>(),
            data.len(),
            "tensor {name}: shape and data disagree"
        );
        let bytes: Vec<u8> = data.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.tensors.insert(name.to_string(), (shape, bytes, Dtype::F32));
    }
    pub fn add_f64(&mut self, name: &str, shape: Vec<usize>, data: &[f64]) {
        assert_eq!(
            shape.iter().product::<usize>(),
            data.len(),
            "tensor {name}: shape and data disagree"
        );
        let bytes: Vec<u8> = data.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.tensors.insert(name.to_string(), (shape, bytes, Dtype::F64));
    }
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let views: Vec<(String, TensorView<'_>)> = self
            .tensors
            .iter()
            .map(|(k, (shape, bytes, dt))| {
                (
                    k.clone(),
                    TensorView::new(*dt, shape.clone(), bytes).expect("sizes checked in add"),
                )
            })
            .collect();
        let meta = if self.metadata.is_empty() {
            None
        } else {
            Some(self.metadata.clone())
        };
        let bytes = safetensors::serialize(views, meta)
            .map_err(|e| Error::invalid(format!("safetensors serialization: {e}")))?;
        Ok(with_sorted_header(bytes))
    }
    /// Writes the file atomically (temporary name, then rename).
    pub fn write(&self, path: &Path) -> Result<()> {
        write_atomic(path, &self.to_bytes()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Metadata maps are hash maps: two writers holding the same content iterate them in
    /// different orders, and the files must still be byte-identical (and valid).
    #[test]
    fn identical_content_gives_identical_bytes() {
        let make = |order: &[usize]| {
            let mut w = TensorWriter::default();
            w.add_f32("b.weight", vec![2, 3], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
            w.add_f64("a.bias", vec![2], &[0.5, -0.5]);
            for &i in order {
                w.metadata.insert(format!("key{i}"), format!("value {i}"));
            }
            w.to_bytes().unwrap()
        };
        let a = make(&[0, 1, 2, 3, 4, 5, 6, 7, 8, 9]);
        let b = make(&[9, 3, 7, 1, 5, 0, 8, 2, 6, 4]);
        assert!(a == b, "the same tensors and metadata serialized to different bytes");
        let st = SafeTensors::deserialize(&a).unwrap();
        assert_eq!(st.tensor("b.weight").unwrap().shape(), &[2, 3]);
        let n = u64::from_le_bytes(a[..8].try_into().unwrap()) as usize;
        assert_eq!(n % 8, 0, "header not padded to 8 bytes");
        let (_, meta) = SafeTensors::read_metadata(&a).unwrap();
        assert_eq!(meta.metadata().as_ref().unwrap()["key7"], "value 7");
    }
}

//! Property tests of the readers on mutated bytes of valid files (issue 14): the TIFF
//! reader and the model loader must return an error or a value for any bytes, never
//! panic, and never abort on a huge allocation a corrupt header asks for (an abort
//! would kill this test process). 200 cases each; PROPTEST_CASES overrides.

use proptest::prelude::*;
use rln_engine::imaging::{read_volume, write_volume, OutputDtype, Volume};
use rln_engine::model::Model;
use std::path::PathBuf;

fn valid_tiff() -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("v.tif");
    let data: Vec<f32> = (0..4 * 8 * 8).map(|i| (i % 17) as f32 * 3.5).collect();
    let mut v = Volume::new([4, 8, 8], data).unwrap();
    v.voxel_size = Some([0.2, 0.1, 0.1]);
    write_volume(&p, &v, OutputDtype::U16).unwrap();
    std::fs::read(&p).unwrap()
}

fn valid_model() -> Vec<u8> {
    std::fs::read(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/rln-synthetic-widefield.safetensors")).unwrap()
}

/// Overwrites, each (position as a fraction of the length, byte, run length), then an
/// optional truncation: mutations that reach headers, offsets and counts alike.
fn mutations() -> impl Strategy<Value = (Vec<(f64, u8, usize)>, Option<f64>)> {
    (
        prop::collection::vec((0.0f64..1.0, any::<u8>(), 1usize..9), 1..6),
        prop::option::weighted(0.2, 0.0f64..1.0),
    )
}

fn mutate(base: &[u8], (edits, cut): &(Vec<(f64, u8, usize)>, Option<f64>), header_bias: bool) -> Vec<u8> {
    let mut b = base.to_vec();
    for &(pos, byte, run) in edits {
        // half of the edits land in the first 512 bytes, where the headers are
        let span = if header_bias && byte % 2 == 0 {
            b.len().min(512)
        } else {
            b.len()
        };
        let at = ((pos * span as f64) as usize).min(b.len() - 1);
        for x in b.iter_mut().skip(at).take(run) {
            *x = byte;
        }
    }
    if let Some(c) = cut {
        b.truncate((c * b.len() as f64) as usize);
    }
    b
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn tiff_reader_never_panics_on_mutated_files(m in mutations()) {
        thread_local!(static BASE: Vec<u8> = valid_tiff());
        let bytes = BASE.with(|b| mutate(b, &m, true));
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.tif");
        std::fs::write(&p, &bytes).unwrap();
        if let Ok(v) = read_volume(&p) {
            prop_assert_eq!(v.data.len(), v.dims.iter().product::<usize>());
        }
    }

    #[test]
    fn model_loader_never_panics_on_mutated_files(m in mutations()) {
        thread_local!(static BASE: Vec<u8> = valid_model());
        let bytes = BASE.with(|b| mutate(b, &m, true));
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.safetensors");
        std::fs::write(&p, &bytes).unwrap();
        if let Ok(model) = Model::<f32>::load(&p) {
            prop_assert!(model.params.count() > 0);
        }
    }
}

/// The mutations above rarely hit the exact bytes of a size; these set them directly:
/// page dimensions and strip byte counts far beyond the file.
#[test]
fn tiff_headers_declaring_huge_pages_are_errors() {
    let base = valid_tiff();
    // classic little-endian TIFF: find the first IFD and set ImageWidth/ImageLength
    let ifd = u32::from_le_bytes(base[4..8].try_into().unwrap()) as usize;
    let n = u16::from_le_bytes(base[ifd..ifd + 2].try_into().unwrap()) as usize;
    for value in [65_535u32, 1_000_000, u32::MAX] {
        let mut b = base.clone();
        for e in 0..n {
            let at = ifd + 2 + e * 12;
            let tag = u16::from_le_bytes(b[at..at + 2].try_into().unwrap());
            let typ = u16::from_le_bytes(b[at + 2..at + 4].try_into().unwrap());
            if tag == 256 || tag == 257 || tag == 278 {
                if typ == 3 {
                    b[at + 8..at + 10].copy_from_slice(&(value.min(65_535) as u16).to_le_bytes());
                } else {
                    b[at + 8..at + 12].copy_from_slice(&value.to_le_bytes());
                }
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("big.tif");
        std::fs::write(&p, &b).unwrap();
        let e = read_volume(&p).expect_err("a page larger than the file must be refused");
        let msg = e.to_string();
        assert!(msg.contains("big.tif"), "{msg}");
    }
}

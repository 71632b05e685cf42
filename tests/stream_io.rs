//! Streaming formats (imaging::stream): every reader and writer round-trips random
//! volumes of odd sizes with anisotropic chunks, region reads equal slices of the whole,
//! the TIFF reader stays within its cache bound, corrupt files and bad stores give clear
//! errors, `convert` round-trips through TIFF and both Zarr versions, and the Python
//! `zarr` / `ome-zarr` packages read the engine's stores.

use rand::prelude::*;
use rand_chacha::ChaCha8Rng;
use rln_engine::imaging::io::{OutputDtype, ReadOptions};
use rln_engine::imaging::stream::tiff::{TiffReader, TiffWriter};
use rln_engine::imaging::stream::zarr::{self, ZarrCompression, ZarrVersion, ZarrWriteOptions, ZarrWriter};
use rln_engine::imaging::stream::{
    create_writer, open_reader, unit_regions, Region, VolumeReader, VolumeWriter, WriterSpec,
};
use std::path::{Path, PathBuf};
use std::process::Command;

const DIMS: [usize; 3] = [7, 13, 11];
const VOXEL: [f64; 3] = [0.3, 0.065, 0.07];
const META: &str = r#"{"omero":{"name":"sample"},"note":"a=b"}"#;

/// Random voxels the dtype holds exactly after its own rounding: integers for u16,
/// spread floats for f16/f32 (the f16 check compares with f16 rounding).
fn random_volume(dims: [usize; 3], dtype: OutputDtype, seed: u64) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let n = dims.iter().product();
    (0..n)
        .map(|_| match dtype {
            OutputDtype::U16 => rng.random_range(0..=65535u32) as f32,
            OutputDtype::F16 => rng.random_range(-60000.0f32..60000.0),
            OutputDtype::F32 => rng.random_range(-1e6f32..1e6) * rng.random::<f32>(),
        })
        .collect()
}

/// What the dtype stores for `v`.
fn stored(v: f32, dtype: OutputDtype) -> f32 {
    match dtype {
        OutputDtype::F32 => v,
        OutputDtype::U16 => v.round(),
        OutputDtype::F16 => half::f16::from_f32(v).to_f32(),
    }
}

fn spec(dims: [usize; 3], dtype: OutputDtype, chunks: Option<[usize; 3]>) -> WriterSpec {
    WriterSpec {
        dims,
        dtype,
        chunks,
        voxel_size: Some(VOXEL),
        metadata: Some(META.into()),
    }
}

fn slice_of(data: &[f32], dims: [usize; 3], r: Region) -> Vec<f32> {
    let mut out = vec![0.0; r.voxels()];
    rln_engine::imaging::stream::copy_intersection(data, Region::whole(dims), &mut out, r);
    out
}

/// Writes `data` through `w` in units of its write unit, in a shuffled order.
fn write_shuffled(w: &dyn VolumeWriter, data: &[f32], unit: [usize; 3], seed: u64) {
    let dims = w.dims();
    let mut units = unit_regions(Region::whole(dims), unit);
    units.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
    for r in units {
        w.write_region(r, &slice_of(data, dims, r)).unwrap();
    }
}

fn read_all(r: &dyn VolumeReader) -> Vec<f32> {
    let mut v = vec![0.0; r.dims().iter().product()];
    r.read_region(Region::whole(r.dims()), &mut v).unwrap();
    v
}

/// Random regions read from `r` equal the same slices of `whole`.
fn check_regions(r: &dyn VolumeReader, whole: &[f32], seed: u64) {
    let dims = r.dims();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    for _ in 0..12 {
        let start = dims.map(|d| rng.random_range(0..d));
        let shape = [0, 1, 2].map(|i| rng.random_range(1..=dims[i] - start[i]));
        let reg = Region::new(start, shape);
        let mut got = vec![f32::NAN; reg.voxels()];
        r.read_region(reg, &mut got).unwrap();
        assert_eq!(got, slice_of(whole, dims, reg), "region {reg:?}");
    }
    // a buffer one value short, or a region reaching past the volume, is an error
    let reg = Region::new([0, 0, 0], [1, 1, 2]);
    let e = r.read_region(reg, &mut [0.0; 1]).unwrap_err();
    assert!(e.to_string().contains("needs 2 values, the buffer has 1"), "{e}");
    let past = Region::new([dims[0] - 1, 0, 0], [2, 1, 1]);
    let e = r.read_region(past, &mut [0.0; 2]).unwrap_err();
    assert!(e.to_string().contains("outside the volume"), "{e}");
}

/// TIFF keeps the voxel size as rationals of denominator 10⁶ (relative error ~3e-8);
/// Zarr and HDF5 keep the f64.
const TIFF_VOXEL_TOL: f64 = 1e-6;
const EXACT_VOXEL_TOL: f64 = 1e-12;

fn assert_voxel_size(got: Option<[f64; 3]>, tol: f64) {
    let g = got.expect("voxel size carried over");
    for i in 0..3 {
        assert!((g[i] / VOXEL[i] - 1.0).abs() < tol, "voxel size {g:?}");
    }
}

#[test]
fn tiff_writer_takes_regions_in_any_order_and_round_trips_each_dtype() {
    let dir = tempfile::tempdir().unwrap();
    for (k, dtype) in [OutputDtype::F32, OutputDtype::U16, OutputDtype::F16]
        .into_iter()
        .enumerate()
    {
        let data = random_volume(DIMS, dtype, k as u64);
        let p = dir.path().join(format!("v{k}.tif"));
        let w = create_writer(&p, &spec(DIMS, dtype, None)).unwrap();
        // blocks smaller than a plane, shuffled: pages still come out in z order
        write_shuffled(w.as_ref(), &data, [2, 5, 4], 7 + k as u64);
        assert!(!p.exists(), "no file under the final name before finish");
        w.finish().unwrap();
        let r = open_reader(&p, &ReadOptions::default()).unwrap();
        assert_eq!(r.dims(), DIMS);
        let want: Vec<f32> = data.iter().map(|&v| stored(v, dtype)).collect();
        let got = read_all(r.as_ref());
        assert_eq!(got, want, "{dtype:?}");
        check_regions(r.as_ref(), &want, 3);
        assert_voxel_size(r.info().voxel_size, TIFF_VOXEL_TOL);
        assert_eq!(r.info().metadata.as_deref(), Some(META));
        // the in-memory reader of main sees the same file
        let v = rln_engine::imaging::read_volume(&p).unwrap();
        assert_eq!(v.data, want);
    }
}

#[test]
fn tiff_writer_holds_only_incomplete_planes_and_refuses_an_unfinished_volume() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("order.tif");
    let data = random_volume(DIMS, OutputDtype::F32, 11);
    let w = TiffWriter::create(&p, &spec(DIMS, OutputDtype::F32, None), u64::MAX).unwrap();
    // planes in z order, each in two halves: at most one plane waits at a time
    for z in 0..DIMS[0] {
        for (y0, ny) in [(0, 6), (6, 7)] {
            let r = Region::new([z, y0, 0], [1, ny, DIMS[2]]);
            w.write_region(r, &slice_of(&data, DIMS, r)).unwrap();
        }
    }
    assert_eq!(w.peak_pending_planes(), 1);
    Box::new(w).finish().unwrap();

    let p2 = dir.path().join("short.tif");
    let w = create_writer(&p2, &spec(DIMS, OutputDtype::F32, None)).unwrap();
    let r = Region::new([0, 0, 0], [3, DIMS[1], DIMS[2]]);
    w.write_region(r, &slice_of(&data, DIMS, r)).unwrap();
    let err = w.finish().unwrap_err().to_string();
    assert!(err.contains("3 of 7 planes"), "{err}");
    assert!(
        std::fs::read_dir(dir.path()).unwrap().count() == 1,
        "temporary file left behind"
    );
    // values a u16 file cannot hold are errors naming the voxel, never clamped
    let w = create_writer(&p2, &spec([1, 1, 2], OutputDtype::U16, None)).unwrap();
    let err = w
        .write_region(Region::whole([1, 1, 2]), &[3.0, 70000.0])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("70000") && err.contains("(0, 0, 1)") && err.contains("f32"),
        "{err}"
    );
}

/// A u16 stack written with `rows` rows per strip.
fn write_striped_tiff(path: &Path, dims: [usize; 3], rows: u32, data: &[f32]) {
    let mut f = std::fs::File::create(path).unwrap();
    let mut enc = tiff::encoder::TiffEncoder::new(&mut f).unwrap();
    let plane = dims[1] * dims[2];
    for z in 0..dims[0] {
        let mut img = enc
            .new_image::<tiff::encoder::colortype::Gray16>(dims[2] as u32, dims[1] as u32)
            .unwrap();
        img.rows_per_strip(rows).unwrap();
        let page: Vec<u16> = data[z * plane..(z + 1) * plane].iter().map(|&v| v as u16).collect();
        img.write_data(&page).unwrap();
    }
}

#[test]
fn tiff_reader_decodes_only_the_strips_a_region_needs_within_its_cache_bound() {
    let dir = tempfile::tempdir().unwrap();
    let dims = [20, 64, 48];
    let data = random_volume(dims, OutputDtype::U16, 5);
    let p = dir.path().join("strips.tif");
    write_striped_tiff(&p, dims, 4, &data);
    let opts = ReadOptions {
        cache_planes: Some(8),
        ..Default::default()
    };
    let r = TiffReader::open(&p, &opts).unwrap();
    assert_eq!(r.band_rows(), 4);
    assert_eq!(r.read_unit(), [1, 4, 48]);
    // rows 10..20 of planes 4..12 touch strips 2..=4 (rows 8..20): 3 bands × 8 planes
    let reg = Region::new([4, 10, 5], [8, 10, 30]);
    let mut got = vec![0.0; reg.voxels()];
    r.read_region(reg, &mut got).unwrap();
    assert_eq!(got, slice_of(&data, dims, reg));
    let s = r.stats();
    assert_eq!((s.bands_decoded, s.rows_decoded), (24, 96), "{s:?}");
    // again: all from the cache
    r.read_region(reg, &mut got).unwrap();
    assert_eq!(r.stats().bands_decoded, 24);

    // whole volume by slabs of 2 planes with a 2-plane cache: each strip decoded once,
    // never more than 2 planes' worth held
    let opts = ReadOptions {
        cache_planes: Some(2),
        ..Default::default()
    };
    let r = TiffReader::open(&p, &opts).unwrap();
    let mut all = vec![0.0; data.len()];
    for z in (0..dims[0]).step_by(2) {
        let reg = Region::new([z, 0, 0], [2, 64, 48]);
        let n = reg.voxels();
        // two column halves: the second reuses the bands of the first
        for (x0, nx) in [(0, 20), (20, 28)] {
            let part = Region::new([z, 0, x0], [2, 64, nx]);
            let mut buf = vec![0.0; part.voxels()];
            r.read_region(part, &mut buf).unwrap();
            rln_engine::imaging::stream::copy_intersection(&buf, part, &mut all[z * 64 * 48..z * 64 * 48 + n], reg);
        }
    }
    assert_eq!(all, data);
    let s = r.stats();
    assert_eq!(s.rows_decoded, (dims[0] * dims[1]) as u64, "{s:?}");
    assert!(s.peak_cached_voxels <= 2 * 64 * 48, "{s:?}");
}

/// A classic TIFF whose one page declares `w`×`h` u16 pixels in one strip of `count`
/// bytes at offset 8 (the file itself is a few hundred bytes).
fn lying_tiff(w: u32, h: u32, count: u32) -> Vec<u8> {
    let mut b = b"II*\0".to_vec();
    let data_len = 64u32;
    b.extend((8 + data_len).to_le_bytes()); // IFD after 64 bytes of "data"
    b.extend(vec![0u8; data_len as usize]);
    let entries: [(u16, u16, u32); 9] = [
        (256, 4, w),
        (257, 4, h),
        (258, 3, 16),
        (259, 3, 1),
        (262, 3, 1),
        (273, 4, 8),
        (277, 3, 1),
        (278, 4, h),
        (279, 4, count),
    ];
    b.extend((entries.len() as u16).to_le_bytes());
    for (tag, ty, v) in entries {
        b.extend(tag.to_le_bytes());
        b.extend(ty.to_le_bytes());
        b.extend(1u32.to_le_bytes());
        if ty == 3 {
            b.extend((v as u16).to_le_bytes());
            b.extend([0, 0]);
        } else {
            b.extend(v.to_le_bytes());
        }
    }
    b.extend(0u32.to_le_bytes());
    b
}

#[test]
fn tiff_with_huge_declared_pages_or_truncated_data_is_an_error_not_an_abort() {
    let dir = tempfile::tempdir().unwrap();
    let opts = ReadOptions {
        allow_2d: true,
        ..Default::default()
    };
    // 40000×40000 u16 = 3.2 GB declared in a 200-byte file
    let p = dir.path().join("huge.tif");
    std::fs::write(&p, lying_tiff(40_000, 40_000, 3_200_000_000)).unwrap();
    let err = open_reader(&p, &opts).err().expect("must fail").to_string();
    assert!(
        err.contains("declares") && err.contains("truncated or its header is corrupt"),
        "{err}"
    );
    // a plausible page size but a strip running past the end of the file
    let p = dir.path().join("short-strip.tif");
    std::fs::write(&p, lying_tiff(4, 4, 5000)).unwrap();
    let err = open_reader(&p, &opts).err().expect("must fail").to_string();
    assert!(err.contains("page 0 declares data at bytes 8..5008"), "{err}");
    // a real stack cut in half: the error names the page, at open or at the read
    let data = random_volume([6, 32, 32], OutputDtype::U16, 1);
    let p = dir.path().join("cut.tif");
    write_striped_tiff(&p, [6, 32, 32], 32, &data);
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    let res = open_reader(&p, &ReadOptions::default()).and_then(|r| {
        let mut v = vec![0.0; 6 * 32 * 32];
        r.read_region(Region::whole([6, 32, 32]), &mut v)
    });
    let err = res.expect_err("must fail").to_string();
    assert!(err.contains("page") && err.contains("cut.tif"), "{err}");
}

#[test]
fn folder_of_slices_reads_regions_through_a_bounded_plane_cache() {
    let dir = tempfile::tempdir().unwrap();
    let dims = [6, 9, 10];
    let data = random_volume(dims, OutputDtype::F32, 9);
    for z in 0..dims[0] {
        let v = rln_engine::imaging::Volume::new([1, 9, 10], data[z * 90..(z + 1) * 90].to_vec()).unwrap();
        rln_engine::imaging::write_volume(dir.path().join(format!("s{z:03}.tif")), &v, OutputDtype::F32).unwrap();
    }
    let opts = ReadOptions {
        cache_planes: Some(2),
        ..Default::default()
    };
    let r = rln_engine::imaging::stream::folder::SliceFolderReader::open(dir.path(), &opts).unwrap();
    assert_eq!(r.dims(), dims);
    check_regions(&r, &data, 4);
    assert_eq!(read_all(&r), data);
    // through the dispatch too
    let r2 = open_reader(dir.path(), &ReadOptions::default()).unwrap();
    assert_eq!(read_all(r2.as_ref()), data);
    // a slice of another size is named
    let odd = rln_engine::imaging::Volume::new([1, 9, 11], vec![0.0; 99]).unwrap();
    rln_engine::imaging::write_volume(dir.path().join("s999.tif"), &odd, OutputDtype::F32).unwrap();
    let r3 = open_reader(dir.path(), &ReadOptions::default()).unwrap();
    let mut v = vec![0.0; 7 * 90];
    let err = r3
        .read_region(Region::whole([7, 9, 10]), &mut v)
        .unwrap_err()
        .to_string();
    assert!(err.contains("s999.tif") && err.contains("9×11"), "{err}");
}

#[test]
fn zarr_v2_and_v3_round_trip_every_dtype_with_anisotropic_chunks_and_shards() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (ZarrVersion::V2, ZarrCompression::Zstd, None),
        (ZarrVersion::V2, ZarrCompression::Blosc, None),
        (ZarrVersion::V3, ZarrCompression::Zstd, None),
        (ZarrVersion::V3, ZarrCompression::Blosc, Some([6, 10, 8])),
    ];
    let mut k = 0;
    for (version, compression, shard) in cases {
        for dtype in [OutputDtype::F32, OutputDtype::U16, OutputDtype::F16] {
            k += 1;
            let data = random_volume(DIMS, dtype, 100 + k);
            let p = dir.path().join(format!("s{k}.ome.zarr"));
            let opts = ZarrWriteOptions {
                version,
                compression,
                shard,
            };
            let w = ZarrWriter::create(&p, &spec(DIMS, dtype, Some([3, 5, 4])), &opts).unwrap();
            let unit = w.write_unit();
            assert_eq!(unit, shard.unwrap_or([3, 5, 4]));
            write_shuffled(&w, &data, unit, k);
            assert!(!zarr::is_complete(&p).unwrap(), "complete before finish");
            Box::new(w).finish().unwrap();
            assert!(zarr::is_complete(&p).unwrap());
            let r = open_reader(&p, &ReadOptions::default()).unwrap();
            let what = format!("{version:?} {compression:?} {shard:?} {dtype:?}");
            assert_eq!(r.dims(), DIMS, "{what}");
            assert_eq!(r.read_unit(), [3, 5, 4], "{what}");
            let want: Vec<f32> = data.iter().map(|&v| stored(v, dtype)).collect();
            assert_eq!(read_all(r.as_ref()), want, "{what}");
            check_regions(r.as_ref(), &want, k);
            assert_voxel_size(r.info().voxel_size, EXACT_VOXEL_TOL);
            assert_eq!(r.info().metadata.as_deref(), Some(META), "{what}");
        }
    }
}

#[test]
fn zarr_store_written_in_part_is_not_complete_and_blocks_can_finish_it() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("part.zarr");
    let data = random_volume(DIMS, OutputDtype::F32, 3);
    let w = create_writer(&p, &spec(DIMS, OutputDtype::F32, Some([4, 7, 6]))).unwrap();
    let units = unit_regions(Region::whole(DIMS), w.write_unit());
    let (first, rest) = units.split_at(3);
    for &r in first {
        w.write_region(r, &slice_of(&data, DIMS, r)).unwrap();
    }
    drop(w); // killed before finish
    assert!(!zarr::is_complete(&p).unwrap());
    // missing chunks read as the fill value (0)
    let r = open_reader(&p, &ReadOptions::default()).unwrap();
    let got = read_all(r.as_ref());
    let last = *rest.last().unwrap();
    assert!(slice_of(&got, DIMS, last).iter().all(|&v| v == 0.0));
    // convert refuses the unfinished store
    let err = rln_engine::imaging::stream::convert::convert(&p, &dir.path().join("x.tif"), &Default::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("not completed"), "{err}");
    // the rest written through the existing-store writer, then marked complete
    let w = zarr::open_existing_writer(&p).unwrap();
    for &r in rest {
        w.write_region(r, &slice_of(&data, DIMS, r)).unwrap();
    }
    w.finish().unwrap();
    assert!(!zarr::is_complete(&p).unwrap(), "block writers never mark complete");
    zarr::mark_complete(&p).unwrap();
    assert!(zarr::is_complete(&p).unwrap());
    assert_eq!(
        read_all(open_reader(&p, &ReadOptions::default()).unwrap().as_ref()),
        data
    );
    // creating over an existing store is refused
    let err = create_writer(&p, &spec(DIMS, OutputDtype::F32, None))
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("already exists"), "{err}");
}

/// A v2 OME-Zarr store with one uncompressed chunk holding the whole array.
fn raw_store(dir: &Path, name: &str, axes: &[&str], shape: &[usize], dtype: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::create_dir_all(p.join("0")).unwrap();
    std::fs::write(p.join(".zgroup"), r#"{"zarr_format": 2}"#).unwrap();
    let axes_json: Vec<String> = axes.iter().map(|a| format!(r#"{{"name": "{a}"}}"#)).collect();
    let scale: Vec<String> = shape.iter().map(|_| "0.5".to_string()).collect();
    std::fs::write(
        p.join(".zattrs"),
        format!(
            r#"{{"multiscales": [{{"version": "0.4", "axes": [{}], "datasets": [{{"path": "0", "coordinateTransformations": [{{"type": "scale", "scale": [{}]}}]}}]}}]}}"#,
            axes_json.join(","),
            scale.join(",")
        ),
    )
    .unwrap();
    std::fs::write(
        p.join("0/.zarray"),
        format!(
            r#"{{"zarr_format": 2, "shape": {shape:?}, "chunks": {shape:?}, "dtype": "{dtype}", "compressor": null, "fill_value": 0, "order": "C", "filters": null, "dimension_separator": "/"}}"#
        ),
    )
    .unwrap();
    let key: Vec<&str> = shape.iter().map(|_| "0").collect();
    let chunk = p.join("0").join(key.join("/"));
    std::fs::create_dir_all(chunk.parent().unwrap()).unwrap();
    std::fs::write(chunk, bytes).unwrap();
    p
}

fn u16_bytes(v: &[u16]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

#[test]
fn foreign_stores_with_leading_axes_bad_types_2d_arrays_or_broken_chunks_give_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let opts = ReadOptions::default();
    let vals: Vec<u16> = (0..2 * 3 * 4 * 5).map(|i| i as u16).collect();
    // c, z, y, x with two channels: choose one
    let p = raw_store(
        d,
        "c2.zarr",
        &["c", "z", "y", "x"],
        &[2, 3, 4, 5],
        "<u2",
        &u16_bytes(&vals),
    );
    let err = open_reader(&p, &opts).err().unwrap().to_string();
    assert!(err.contains("2 channels") && err.contains("--channel"), "{err}");
    let r = open_reader(
        &p,
        &ReadOptions {
            channel: Some(1),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(r.dims(), [3, 4, 5]);
    assert_eq!(r.info().voxel_size, Some([0.5, 0.5, 0.5]));
    let got = read_all(r.as_ref());
    assert_eq!(got, (60..120).map(|i| i as f32).collect::<Vec<_>>());
    // t of size 1 is fine, t of 2 is not
    let p = raw_store(
        d,
        "t1.zarr",
        &["t", "z", "y", "x"],
        &[1, 3, 4, 5],
        "<u2",
        &u16_bytes(&vals[..60]),
    );
    assert_eq!(read_all(open_reader(&p, &opts).unwrap().as_ref())[59], 59.0);
    let p = raw_store(
        d,
        "t2.zarr",
        &["t", "z", "y", "x"],
        &[2, 3, 4, 5],
        "<u2",
        &u16_bytes(&vals),
    );
    let err = open_reader(&p, &opts).err().unwrap().to_string();
    assert!(err.contains("axis t has 2") && err.contains("time point"), "{err}");
    // axes in another order
    let p = raw_store(
        d,
        "xyz.zarr",
        &["x", "y", "z"],
        &[3, 4, 5],
        "<u2",
        &u16_bytes(&vals[..60]),
    );
    let err = open_reader(&p, &opts).err().unwrap().to_string();
    assert!(err.contains("axes are [x, y, z]") && err.contains("z, y, x"), "{err}");
    // 2D
    let p = raw_store(d, "yx.zarr", &["y", "x"], &[4, 5], "<u2", &u16_bytes(&vals[..20]));
    let err = open_reader(&p, &opts).err().unwrap().to_string();
    assert!(err.contains("axes are [y, x]") && err.contains("3D"), "{err}");
    // wrong sample type
    let p = raw_store(d, "bool.zarr", &["z", "y", "x"], &[3, 4, 5], "|b1", &[0u8; 60]);
    let err = open_reader(&p, &opts).err().unwrap().to_string();
    assert!(err.contains("|b1") && err.contains("readable types"), "{err}");
    // truncated chunk file
    let p = raw_store(
        d,
        "cut.zarr",
        &["z", "y", "x"],
        &[3, 4, 5],
        "<u2",
        &u16_bytes(&vals[..30]),
    );
    let r = open_reader(&p, &opts).unwrap();
    let mut v = vec![0.0; 60];
    let err = r.read_region(Region::whole([3, 4, 5]), &mut v).unwrap_err().to_string();
    assert!(err.contains("truncated or corrupt chunk"), "{err}");
    // compressed chunk cut short
    let w = create_writer(&d.join("z.zarr"), &spec(DIMS, OutputDtype::F32, Some([7, 13, 11]))).unwrap();
    w.write_region(Region::whole(DIMS), &random_volume(DIMS, OutputDtype::F32, 1))
        .unwrap();
    w.finish().unwrap();
    let chunk = d.join("z.zarr/0/0/0/0");
    let b = std::fs::read(&chunk).unwrap();
    std::fs::write(&chunk, &b[..b.len() / 3]).unwrap();
    let r = open_reader(&d.join("z.zarr"), &opts).unwrap();
    let mut v = vec![0.0; 7 * 13 * 11];
    let err = r.read_region(Region::whole(DIMS), &mut v).unwrap_err().to_string();
    assert!(err.contains("region [0, 0, 0]+[7, 13, 11]"), "{err}");
    // a group without NGFF metadata, and a folder named .zarr without any metadata
    let p = d.join("bare.zarr");
    std::fs::create_dir_all(&p).unwrap();
    std::fs::write(p.join(".zgroup"), r#"{"zarr_format": 2}"#).unwrap();
    let err = open_reader(&p, &opts).err().unwrap().to_string();
    assert!(err.contains("no OME-NGFF `multiscales`"), "{err}");
    std::fs::remove_file(p.join(".zgroup")).unwrap();
    let err = open_reader(&p, &opts).err().unwrap().to_string();
    assert!(err.contains("not a Zarr store"), "{err}");
}

/// `infer` on bad inputs: a store left unfinished by a run (its missing chunks would
/// read as zeros), a 2D array, an unreadable sample type, and two views of different
/// shapes each end with a clear message and a non-zero exit, writing nothing.
#[test]
fn infer_refuses_unfinished_stores_2d_arrays_bad_types_and_mismatched_views() {
    use rln_engine::model::{Model, ModelConfig, Variant};
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let model = "models/rln-synthetic-widefield.safetensors";
    let infer = |args: &[&dyn AsRef<std::ffi::OsStr>]| {
        let o = output_of(
            Command::new(bin())
                .arg("infer")
                .args(args.iter().map(|a| a.as_ref()))
                .arg("--device")
                .arg("cpu"),
        );
        (o.status.code(), String::from_utf8_lossy(&o.stderr).into_owned())
    };
    let vals: Vec<u16> = (0..20 * 40 * 40).map(|i| (100 + (i * 7919) % 1000) as u16).collect();
    let good = raw_store(
        d,
        "good.zarr",
        &["z", "y", "x"],
        &[20, 40, 40],
        "<u2",
        &u16_bytes(&vals),
    );
    // an unfinished store: what `infer --create-only` leaves before its blocks run
    let part = d.join("part.zarr");
    let (code, err) = infer(&[&model, &good, &"-o", &part, &"--create-only", &"--chunks", &"20,40,40"]);
    assert_eq!(code, Some(0), "{err}");
    let out = d.join("out.tif");
    let (code, err) = infer(&[&model, &part, &"-o", &out]);
    assert!(
        code != Some(0) && err.contains("not completed") && err.contains("--resume"),
        "{err}"
    );
    assert!(!out.exists());
    // 2D
    let p = raw_store(d, "yx.zarr", &["y", "x"], &[40, 40], "<u2", &u16_bytes(&vals[..1600]));
    let (code, err) = infer(&[&model, &p, &"-o", &out]);
    assert!(code != Some(0) && err.contains("3D"), "{err}");
    // a sample type no reader takes
    let p = raw_store(d, "bool.zarr", &["z", "y", "x"], &[20, 40, 40], "|b1", &[0u8; 32000]);
    let (code, err) = infer(&[&model, &p, &"-o", &out]);
    assert!(
        code != Some(0) && err.contains("|b1") && err.contains("readable types"),
        "{err}"
    );
    // views of different shapes for a dual-view model
    let dual = d.join("dual.safetensors");
    Model::<f32>::init(
        ModelConfig {
            variant: Variant::DualConcat,
            ..ModelConfig::default()
        },
        3,
    )
    .save(&dual)
    .unwrap();
    let other = raw_store(
        d,
        "other.zarr",
        &["z", "y", "x"],
        &[20, 40, 38],
        "<u2",
        &u16_bytes(&vals[..20 * 40 * 38]),
    );
    let (code, err) = infer(&[&dual, &good, &"--input2", &other, &"-o", &out]);
    assert!(
        code != Some(0) && err.contains("differ in size") && err.contains("[20, 40, 38]"),
        "{err}"
    );
    assert!(!out.exists());
    for e in std::fs::read_dir(d).unwrap() {
        let n = e.unwrap().file_name().to_string_lossy().into_owned();
        assert!(!n.starts_with("out"), "an output appeared: {n}");
    }
}

/// libhdf5 opens files without close-on-exec; the library marks them close-on-exec right
/// after (`imaging::stream::hdf5::close_on_exec`), but a child spawned by another test in
/// that instant would inherit the descriptor and HDF5's lock. So the HDF5 tests hold this
/// lock while they run and every spawn here takes it for the spawn alone.
static SPAWN: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn spawn_lock() -> std::sync::MutexGuard<'static, ()> {
    SPAWN.lock().unwrap_or_else(|e| e.into_inner())
}

/// `Command::output`, spawning under [`SPAWN`].
fn output_of(cmd: &mut Command) -> std::process::Output {
    use std::process::Stdio;
    let child = {
        let _g = spawn_lock();
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    child.wait_with_output().unwrap()
}

fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_rln-engine"))
}

fn run_convert(args: &[&str]) -> (bool, String) {
    let out = output_of(Command::new(bin()).arg("convert").args(args));
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn convert_cli_round_trips_tiff_through_zarr_v2_and_v3_and_refuses_to_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let s = |p: &str| d.join(p).to_string_lossy().into_owned();
    let data = random_volume(DIMS, OutputDtype::U16, 77);
    let w = create_writer(&d.join("a.tif"), &spec(DIMS, OutputDtype::U16, None)).unwrap();
    write_shuffled(w.as_ref(), &data, [1, 13, 11], 1);
    w.finish().unwrap();

    let (ok, log) = run_convert(&[&s("a.tif"), &s("b.zarr"), "--chunks", "3,5,4"]);
    assert!(ok, "{log}");
    let (ok, log) = run_convert(&[
        &s("b.zarr"),
        &s("c.ome.zarr"),
        "--zarr-version",
        "3",
        "--chunks",
        "2,4,4",
        "--shard",
        "4,8,8",
        "--pyramid",
        "2",
    ]);
    assert!(ok, "{log}");
    let (ok, log) = run_convert(&[&s("c.ome.zarr"), &s("d.tif")]);
    assert!(ok, "{log}");
    let r = open_reader(&d.join("d.tif"), &ReadOptions::default()).unwrap();
    assert_eq!(r.info().dtype, "u16");
    assert_eq!(read_all(r.as_ref()), data);
    assert_voxel_size(r.info().voxel_size, TIFF_VOXEL_TOL);
    assert_eq!(r.info().metadata.as_deref(), Some(META));
    // the store of v2 has the NGFF 0.4 layout, the v3 one NGFF 0.5 with levels 1 and 2
    assert!(d.join("b.zarr/.zgroup").is_file() && d.join("b.zarr/0/.zarray").is_file());
    let root: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("c.ome.zarr/zarr.json")).unwrap()).unwrap();
    let ds = &root["attributes"]["ome"]["multiscales"][0]["datasets"];
    assert_eq!(ds.as_array().unwrap().len(), 3);
    let s2 = ds[2]["coordinateTransformations"][0]["scale"].as_array().unwrap();
    assert!(
        (s2[1].as_f64().unwrap() / (4.0 * VOXEL[1]) - 1.0).abs() < TIFF_VOXEL_TOL,
        "{s2:?}"
    );
    let l1: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("c.ome.zarr/1/zarr.json")).unwrap()).unwrap();
    assert_eq!(l1["shape"], serde_json::json!([4, 7, 6]));
    // level 1 voxel (1, 2, 3) is the rounded mean of level 0's 2×2×2 block at (2, 4, 6)
    let l1r = zarr_level(&d.join("c.ome.zarr"), 1);
    let mut sum = 0.0;
    for (z, y, x) in (0..8).map(|i| (2 + i / 4, 4 + (i / 2) % 2, 6 + i % 2)) {
        sum += data[(z * DIMS[1] + y) * DIMS[2] + x];
    }
    assert_eq!(l1r[(1 * 7 + 2) * 6 + 3], (sum / 8.0f32).round());

    // refusals
    let (ok, log) = run_convert(&[&s("a.tif"), &s("a.tif")]);
    assert!(!ok && log.contains("input"), "{log}");
    let (ok, log) = run_convert(&[
        &s("a.tif"),
        &format!("{}/../{}/a.tif", s(""), d.file_name().unwrap().to_string_lossy()),
    ]);
    assert!(!ok && log.contains("input"), "{log}");
    let (ok, log) = run_convert(&[&s("a.tif"), &s("d.tif")]);
    assert!(!ok && log.contains("--overwrite"), "{log}");
    let (ok, log) = run_convert(&[&s("a.tif"), &s("d.tif"), "--overwrite", "--dtype", "f32"]);
    assert!(ok, "{log}");
    assert_eq!(
        open_reader(&d.join("d.tif"), &ReadOptions::default())
            .unwrap()
            .info()
            .dtype,
        "f32"
    );
    let (ok, log) = run_convert(&[&s("a.tif"), &s("e.tif"), "--pyramid", "1"]);
    assert!(!ok && log.contains("--pyramid needs an OME-Zarr output"), "{log}");
    assert!(!d.join("e.tif").exists());
}

/// Level `l` of an engine store (3D), read through the store's own metadata.
fn zarr_level(store: &Path, l: usize) -> Vec<f32> {
    // a copy of the store whose level 0 is level l, so the ordinary reader opens it
    let tmp = tempfile::tempdir().unwrap();
    let copy = tmp.path().join("level.zarr");
    let ok = output_of(Command::new("cp").arg("-r").arg(store).arg(&copy))
        .status
        .success();
    assert!(ok);
    std::fs::remove_dir_all(copy.join("0")).unwrap();
    std::fs::rename(copy.join(l.to_string()), copy.join("0")).unwrap();
    read_all(open_reader(&copy, &ReadOptions::default()).unwrap().as_ref())
}

/// The test tooling's Python (tools/install-python-venv.sh), if it exists.
fn venv_python() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("RLN_PYTHON") {
        return Some(PathBuf::from(p));
    }
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/py-venv/bin/python");
    p.is_file().then_some(p)
}

const PY_CHECK: &str = r#"
import json, sys
import numpy as np
import zarr
from ome_zarr.io import parse_url
from ome_zarr.reader import Reader, Multiscales
path = sys.argv[1]
nodes = list(Reader(parse_url(path))())
img = next(n for n in nodes if n.load(Multiscales))
ms = img.metadata
scale = [t for t in ms["coordinateTransformations"][0] if t["type"] == "scale"][0]["scale"]
axes = [a["name"] if isinstance(a, dict) else a for a in ms["axes"]]
a = zarr.open_group(path, mode="r")["0"][...]
b = np.asarray(img.data[0])
print(json.dumps({"shape": list(a.shape), "dtype": str(a.dtype), "scale": scale, "axes": axes,
                  "sum": float(a.astype(np.float64).sum()), "v": float(a[1, 2, 3]),
                  "same": bool(np.array_equal(a, b))}))
"#;

#[test]
fn python_zarr_and_ome_zarr_read_the_engines_stores_of_both_versions() {
    let Some(py) = venv_python() else {
        eprintln!("SKIPPED python_zarr_and_ome_zarr_read_the_engines_stores: no venv; run tools/install-python-venv.sh (CI does)");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    for (k, (version, dtype, np)) in [
        (ZarrVersion::V2, OutputDtype::U16, "uint16"),
        (ZarrVersion::V3, OutputDtype::F16, "float16"),
        (ZarrVersion::V3, OutputDtype::F32, "float32"),
    ]
    .into_iter()
    .enumerate()
    {
        let data = random_volume(DIMS, dtype, 500 + k as u64);
        let want: Vec<f32> = data.iter().map(|&v| stored(v, dtype)).collect();
        let p = dir.path().join(format!("py{k}.ome.zarr"));
        let shard = (k == 2).then_some([6, 10, 8]);
        let w = ZarrWriter::create(
            &p,
            &spec(DIMS, dtype, Some([3, 5, 4])),
            &ZarrWriteOptions {
                version,
                shard,
                ..Default::default()
            },
        )
        .unwrap();
        write_shuffled(&w, &data, w.write_unit(), 2);
        Box::new(w).finish().unwrap();
        let out = output_of(Command::new(&py).args(["-c", PY_CHECK]).arg(&p));
        assert!(
            out.status.success(),
            "{version:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(j["shape"], serde_json::json!(DIMS), "{j}");
        assert_eq!(j["dtype"], np, "{j}");
        assert_eq!(j["axes"], serde_json::json!(["z", "y", "x"]), "{j}");
        assert_eq!(j["same"], true, "{j}");
        for i in 0..3 {
            assert!((j["scale"][i].as_f64().unwrap() - VOXEL[i]).abs() < 1e-12, "{j}");
        }
        let sum: f64 = want.iter().map(|&v| v as f64).sum();
        assert!(
            (j["sum"].as_f64().unwrap() - sum).abs() <= 1e-9 * sum.abs().max(1.0),
            "{j} vs {sum}"
        );
        assert_eq!(j["v"].as_f64().unwrap() as f32, want[(13 + 2) * 11 + 3], "{j}");
    }
}

/// A process spawned while an HDF5 output is being written must not inherit its descriptor
/// (libhdf5 opens without close-on-exec and flocks the file): before `close_on_exec`, the
/// finished file stayed locked while such a child lived and opening it failed (errno 11).
#[cfg(all(feature = "hdf5", unix))]
#[test]
fn hdf5_outputs_are_not_inherited_by_spawned_processes() {
    let _spawns = spawn_lock();
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("v.h5");
    let target = PathBuf::from(format!("{}:/vol", p.display()));
    let data = random_volume(DIMS, OutputDtype::F32, 77);
    let w = create_writer(&target, &spec(DIMS, OutputDtype::F32, Some([3, 5, 4]))).unwrap();
    let mut child = Command::new("sleep").arg("60").spawn().unwrap();
    write_shuffled(w.as_ref(), &data, [3, 5, 4], 0);
    let finished = w.finish();
    let opened = open_reader(&target, &ReadOptions::default());
    child.kill().unwrap();
    child.wait().unwrap();
    finished.unwrap();
    let r = opened.unwrap();
    assert_eq!(read_all(r.as_ref()), data);
}

#[cfg(feature = "hdf5")]
#[test]
fn hdf5_hyperslab_reader_and_chunked_writer_round_trip() {
    let _spawns = spawn_lock();
    let dir = tempfile::tempdir().unwrap();
    for (k, dtype) in [OutputDtype::F32, OutputDtype::U16, OutputDtype::F16]
        .into_iter()
        .enumerate()
    {
        let data = random_volume(DIMS, dtype, 900 + k as u64);
        let p = dir.path().join(format!("v{k}.h5"));
        let target = PathBuf::from(format!("{}:/group/vol", p.display()));
        let w = create_writer(&target, &spec(DIMS, dtype, Some([3, 5, 4]))).unwrap();
        assert_eq!(w.write_unit(), [3, 5, 4]);
        write_shuffled(w.as_ref(), &data, [3, 5, 4], k as u64);
        assert!(!p.exists());
        w.finish().unwrap();
        let r = open_reader(&target, &ReadOptions::default()).unwrap();
        assert_eq!(r.read_unit(), [3, 5, 4]);
        let want: Vec<f32> = data.iter().map(|&v| stored(v, dtype)).collect();
        assert_eq!(read_all(r.as_ref()), want, "{dtype:?}");
        check_regions(r.as_ref(), &want, 8);
        assert_voxel_size(r.info().voxel_size, EXACT_VOXEL_TOL);
        assert_eq!(r.info().metadata.as_deref(), Some(META));
        // and convert to Zarr and back equals it
        let z = dir.path().join(format!("v{k}.zarr"));
        rln_engine::imaging::stream::convert::convert(&target, &z, &Default::default()).unwrap();
        let back = dir.path().join(format!("back{k}.h5"));
        rln_engine::imaging::stream::convert::convert(&z, &back, &Default::default()).unwrap();
        assert_eq!(
            read_all(open_reader(&back, &ReadOptions::default()).unwrap().as_ref()),
            want
        );
    }
}

//! Volume I/O: TIFF round trips (u8 read, f32/u16/f16 write+read, BigTIFF), ImageJ
//! metadata, tifffile interoperability, folders of slices, HDF5 (feature), bad input.

mod imaging_common;
use imaging_common::python_has;
use rln_engine::imaging::io::{
    read_volume, read_volume_with, write_volume, write_volume_with, OutputDtype, ReadOptions, WriteOptions,
};
use rln_engine::imaging::stream::{open_reader, Region};
use rln_engine::imaging::Volume;
use std::path::Path;
use tiff::encoder::{colortype, TiffEncoder};
use tiff::tags::Tag;

fn sample(dims: [usize; 3]) -> Volume {
    let n = dims.iter().product();
    let mut v = Volume::new(dims, (0..n).map(|i| ((i * 7919) % 4001) as f32 * 0.25).collect()).unwrap();
    v.voxel_size = Some([0.3, 0.065, 0.07]);
    v.metadata = Some(r#"{"model":"gaussian","note":"a=b"}"#.into());
    v
}

fn no_leftovers(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

#[test]
fn f32_u16_f16_round_trips_keep_data_voxel_size_and_metadata() {
    let dir = tempfile::tempdir().unwrap();
    let v = sample([5, 12, 9]);
    for (dtype, tol) in [
        (OutputDtype::F32, 0.0f32),
        (OutputDtype::U16, 0.5),
        (OutputDtype::F16, 0.5),
    ] {
        let p = dir.path().join(format!("v_{dtype:?}.tif"));
        write_volume(&p, &v, dtype).unwrap();
        let r = read_volume(&p).unwrap();
        assert_eq!(r.dims, v.dims);
        let err = r
            .data
            .iter()
            .zip(&v.data)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(err <= tol, "{dtype:?}: max error {err}");
        let vs = r.voxel_size.unwrap();
        for a in 0..3 {
            assert!(
                (vs[a] / v.voxel_size.unwrap()[a] - 1.0).abs() < 1e-6,
                "{dtype:?} voxel size {vs:?}"
            );
        }
        assert_eq!(r.metadata, v.metadata, "{dtype:?}");
    }
    // u16 rounds; values it cannot hold are errors naming the voxel and the way out, never clamped
    let w = Volume::new([2, 1, 3], vec![-0.4, 1.4, 1.6, 65535.4, 0.0, 3.0]).unwrap();
    let p = dir.path().join("round.tif");
    write_volume(&p, &w, OutputDtype::U16).unwrap();
    let r = read_volume(&p).unwrap();
    assert_eq!(r.data, vec![0.0, 1.0, 2.0, 65535.0, 0.0, 3.0]);
    for (bad, dtype, what) in [
        (70000.0f32, OutputDtype::U16, "70000"),
        (-5.0, OutputDtype::U16, "-5"),
        (f32::NAN, OutputDtype::U16, "NaN"),
        (1e5, OutputDtype::F16, "100000"),
    ] {
        let w = Volume::new([2, 1, 3], vec![1.0, 2.0, 3.0, 4.0, bad, 6.0]).unwrap();
        let p = dir.path().join("bad.tif");
        let err = write_volume(&p, &w, dtype).unwrap_err().to_string();
        assert!(err.contains("(1, 0, 1)") && err.contains(what), "{err}");
        assert!(what == "NaN" || err.contains("f32"), "{err}");
        assert!(!p.exists());
    }
}

#[test]
fn bigtiff_is_written_past_the_threshold_and_read_back() {
    let dir = tempfile::tempdir().unwrap();
    let v = sample([4, 10, 11]);
    let p = dir.path().join("big.tif");
    let opts = WriteOptions {
        bigtiff_threshold: 0,
        ..WriteOptions::new(OutputDtype::F32)
    };
    write_volume_with(&p, &v, &opts).unwrap();
    let head = std::fs::read(&p).unwrap();
    assert_eq!(u16::from_le_bytes([head[2], head[3]]), 43, "not a BigTIFF");
    let r = read_volume(&p).unwrap();
    assert_eq!(r.data, v.data);
    assert_eq!(r.voxel_size.map(|s| (s[0] * 1e6).round()), Some(0.3e6));
    // the default threshold keeps small files classic
    let q = dir.path().join("small.tif");
    write_volume(&q, &v, OutputDtype::F32).unwrap();
    let head = std::fs::read(&q).unwrap();
    assert_eq!(u16::from_le_bytes([head[2], head[3]]), 42);
}

#[test]
fn eight_bit_imagej_stack_and_folder_of_slices_are_read() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("u8.tif");
    {
        let f = std::fs::File::create(&p).unwrap();
        let mut enc = TiffEncoder::new(f).unwrap();
        for z in 0..3u8 {
            let mut img = enc.new_image::<colortype::Gray8>(4, 2).unwrap();
            if z == 0 {
                img.encoder()
                    .write_tag(
                        Tag::ImageDescription,
                        "ImageJ=1.53t\nimages=3\nslices=3\nunit=nm\nspacing=250\nloop=false\n",
                    )
                    .unwrap();
            }
            img.x_resolution(tiff::encoder::Rational { n: 1, d: 40 }); // 40 nm pixels
            img.y_resolution(tiff::encoder::Rational { n: 1, d: 50 });
            let data: Vec<u8> = (0..8).map(|i| z * 10 + i).collect();
            img.write_data(&data).unwrap();
        }
    }
    let v = read_volume(&p).unwrap();
    assert_eq!(v.dims, [3, 2, 4]);
    assert_eq!(v.at(2, 1, 3), 27.0);
    let vs = v.voxel_size.unwrap();
    assert!(
        (vs[0] - 0.25).abs() < 1e-9 && (vs[1] - 0.05).abs() < 1e-9 && (vs[2] - 0.04).abs() < 1e-9,
        "{vs:?}"
    );

    // a folder of 2D slices, read in name order
    let folder = dir.path().join("slices");
    std::fs::create_dir(&folder).unwrap();
    for (i, name) in ["s10.tif", "s02.tif", "s01.tif"].iter().enumerate() {
        let s = Volume::new([1, 3, 5], vec![i as f32; 15]).unwrap();
        let opts = WriteOptions::new(OutputDtype::F32);
        write_volume_with(folder.join(name), &s, &opts).unwrap();
    }
    let v = read_volume(&folder).unwrap();
    assert_eq!(v.dims, [3, 3, 5]);
    assert_eq!((v.at(0, 0, 0), v.at(1, 0, 0), v.at(2, 0, 0)), (2.0, 1.0, 0.0));
}

#[test]
fn written_files_open_in_tifffile_with_imagej_metadata() {
    let dir = tempfile::tempdir().unwrap();
    let v = sample([6, 8, 7]);
    for (dtype, np) in [
        (OutputDtype::F32, "float32"),
        (OutputDtype::U16, "uint16"),
        (OutputDtype::F16, "float16"),
    ] {
        let p = dir.path().join(format!("t_{np}.tif"));
        write_volume(&p, &v, dtype).unwrap();
        if python_has("tifffile") {
            let script = format!(
                "import tifffile\nt = tifffile.TiffFile({:?})\na = t.asarray()\nm = t.imagej_metadata\n\
                 x = t.pages[0].tags['XResolution'].value\n\
                 print(a.shape, a.dtype, t.is_imagej, m['spacing'], m['unit'], m['images'], round(x[1] / x[0], 6), float(a[5, 7, 6]))",
                p.to_str().unwrap()
            );
            let out = std::process::Command::new("python3")
                .args(["-c", &script])
                .output()
                .unwrap();
            let s = String::from_utf8_lossy(&out.stdout);
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
            let x = v.at(5, 7, 6);
            let want_last = match dtype {
                OutputDtype::F32 => x,
                OutputDtype::U16 => x.round(),
                OutputDtype::F16 => half::f16::from_f32(x).to_f32(),
            };
            let expect = format!("(6, 8, 7) {np} True 0.3 micron 6 0.07 {:?}", want_last as f64);
            assert_eq!(s.trim(), expect, "tifffile sees something else");
        } else {
            // without tifffile: check the tags it relies on
            let f = std::fs::File::open(&p).unwrap();
            let mut d = tiff::decoder::Decoder::new(f).unwrap();
            let desc = d.get_tag_ascii_string(Tag::ImageDescription).unwrap();
            assert!(
                desc.starts_with("ImageJ=1.11a\nimages=6\nslices=6\nunit=micron\nspacing=0.3\n"),
                "{desc}"
            );
            let bits = d.get_tag_u32(Tag::BitsPerSample).unwrap();
            let fmt = d.get_tag_u32(Tag::SampleFormat).unwrap();
            assert_eq!(
                (bits, fmt),
                match dtype {
                    OutputDtype::F32 => (32, 3),
                    OutputDtype::U16 => (16, 1),
                    OutputDtype::F16 => (16, 3),
                }
            );
        }
    }
}

#[test]
fn bad_input_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // 2D image
    let p = d.join("flat.tif");
    write_volume(&p, &Volume::new([1, 20, 30], vec![1.0; 600]).unwrap(), OutputDtype::F32).unwrap();
    let e = read_volume(&p).unwrap_err().to_string();
    assert!(e.contains("2D (20×30)") && e.contains("3D stack"), "{e}");
    assert!(read_volume_with(
        &p,
        &ReadOptions {
            allow_2d: true,
            ..Default::default()
        }
    )
    .is_ok());
    // truncated file
    let good = d.join("good.tif");
    write_volume(&good, &sample([4, 16, 16]), OutputDtype::F32).unwrap();
    let bytes = std::fs::read(&good).unwrap();
    let t = d.join("trunc.tif");
    std::fs::write(&t, &bytes[..bytes.len() / 2]).unwrap();
    let e = read_volume(&t).unwrap_err().to_string();
    assert!(
        e.contains("trunc.tif") && (e.contains("truncated") || e.contains("page")),
        "{e}"
    );
    // empty file
    let em = d.join("empty.tif");
    std::fs::write(&em, b"").unwrap();
    assert!(read_volume(&em).unwrap_err().to_string().contains("empty"));
    // NaN voxel: position reported
    let mut v = sample([3, 4, 5]);
    let i = v.index(2, 1, 3);
    v.data[i] = f32::NAN;
    let p = d.join("nan.tif");
    // the engine's writers refuse non-finite voxels, so the file is made by hand
    let e = write_volume(&p, &v, OutputDtype::F32).unwrap_err().to_string();
    assert!(e.contains("(2, 1, 3)") && e.contains("NaN") && !p.exists(), "{e}");
    {
        let mut enc = TiffEncoder::new(std::fs::File::create(&p).unwrap()).unwrap();
        for z in 0..3 {
            enc.write_image::<colortype::Gray32Float>(5, 4, &v.data[z * 20..(z + 1) * 20])
                .unwrap();
        }
    }
    let e = read_volume(&p).unwrap_err().to_string();
    assert!(e.contains("z=2, y=1, x=3") && e.contains("NaN"), "{e}");
    // RGB without a channel, then with one
    let rgb = d.join("rgb.tif");
    {
        let f = std::fs::File::create(&rgb).unwrap();
        let mut enc = TiffEncoder::new(f).unwrap();
        for _ in 0..2 {
            enc.write_image::<colortype::RGB8>(2, 2, &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12])
                .unwrap();
        }
    }
    let e = read_volume(&rgb).unwrap_err().to_string();
    assert!(e.contains("--channel") && e.contains("3 samples"), "{e}");
    let g = read_volume_with(
        &rgb,
        &ReadOptions {
            channel: Some(1),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(g.data[..4], [2.0, 5.0, 8.0, 11.0]);
    // non-positive voxel size: refused when writing (no file left) and when reading
    let mut v = sample([3, 4, 5]);
    v.voxel_size = Some([0.0, 0.1, 0.1]);
    let out = d.join("sub");
    std::fs::create_dir(&out).unwrap();
    let e = write_volume(out.join("bad.tif"), &v, OutputDtype::F32)
        .unwrap_err()
        .to_string();
    assert!(e.contains("voxel size") && e.contains("positive"), "{e}");
    assert!(no_leftovers(&out).is_empty(), "{:?}", no_leftovers(&out));
    let p = d.join("negspacing.tif");
    {
        let f = std::fs::File::create(&p).unwrap();
        let mut enc = TiffEncoder::new(f).unwrap();
        for z in 0..2 {
            let mut img = enc.new_image::<colortype::Gray16>(2, 2).unwrap();
            if z == 0 {
                img.encoder()
                    .write_tag(
                        Tag::ImageDescription,
                        "ImageJ=1.53t\nimages=2\nslices=2\nunit=micron\nspacing=-0.5\n",
                    )
                    .unwrap();
            }
            img.write_data(&[1, 2, 3, 4]).unwrap();
        }
    }
    let e = read_volume(&p).unwrap_err().to_string();
    assert!(e.contains("voxel size") && e.contains("positive"), "{e}");
    // missing output folder: nothing written anywhere
    let e = write_volume(d.join("nope/x.tif"), &sample([2, 3, 3]), OutputDtype::F32)
        .unwrap_err()
        .to_string();
    assert!(e.contains("does not exist"), "{e}");
    // unknown extension
    assert!(write_volume(d.join("x.png"), &sample([2, 3, 3]), OutputDtype::F32)
        .unwrap_err()
        .to_string()
        .contains("unknown volume format"));
}

#[cfg(feature = "hdf5")]
#[test]
fn hdf5_round_trip_keeps_data_voxel_size_and_metadata() {
    let dir = tempfile::tempdir().unwrap();
    let v = sample([5, 12, 9]);
    for (dtype, tol) in [
        (OutputDtype::F32, 0.0f32),
        (OutputDtype::U16, 0.5),
        (OutputDtype::F16, 0.5),
    ] {
        let p = dir.path().join(format!("v_{dtype:?}.h5"));
        let spec = format!("{}:/group/vol", p.display());
        write_volume(&spec, &v, dtype).unwrap();
        for path in [spec.clone(), p.display().to_string()] {
            let r = read_volume(&path).unwrap();
            assert_eq!(r.dims, v.dims);
            let err = r
                .data
                .iter()
                .zip(&v.data)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f32, f32::max);
            assert!(err <= tol, "{dtype:?}: {err}");
            assert_eq!(r.voxel_size, v.voxel_size);
            assert_eq!(r.metadata, v.metadata);
        }
    }
    let e = read_volume(format!("{}:/missing", dir.path().join("v_F32.h5").display()))
        .unwrap_err()
        .to_string();
    assert!(e.contains("missing"), "{e}");
}

/// The whole-volume reader (`read_volume`) and the streaming one (`open_reader`) choose
/// an HDF5 dataset through one function: the same dataset, data, attributes, channel
/// of a 4D dataset, and the same refusals.
#[cfg(feature = "hdf5")]
#[test]
fn hdf5_whole_and_streaming_readers_select_the_same_dataset() {
    use hdf5_metno as hdf5;
    use rln_engine::imaging::stream::{open_reader, Region};
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("several.h5");
    let a: Vec<f32> = (0..4 * 6 * 5).map(|i| i as f32).collect();
    let b: Vec<f32> = a.iter().map(|v| 1000.0 - 2.0 * v).collect();
    {
        let f = hdf5::File::create(&p).unwrap();
        f.new_dataset::<f32>()
            .shape([4, 6, 5])
            .create("a")
            .unwrap()
            .write_raw(&a)
            .unwrap();
        let ds = f
            .create_group("g")
            .unwrap()
            .new_dataset::<f32>()
            .shape([4, 6, 5])
            .create("b")
            .unwrap();
        ds.write_raw(&b).unwrap();
        ds.new_attr::<f64>()
            .shape(3)
            .create("element_size_um")
            .unwrap()
            .write_raw(&[0.3, 0.1, 0.1])
            .unwrap();
        let both: Vec<f32> = a.iter().chain(&b).copied().collect();
        f.new_dataset::<f32>()
            .shape([2, 4, 6, 5])
            .create("c4")
            .unwrap()
            .write_raw(&both)
            .unwrap();
        f.new_dataset::<f32>()
            .shape([6, 5])
            .create("flat")
            .unwrap()
            .write_raw(&a[..30])
            .unwrap();
    }
    let whole = |path: String, opts: &ReadOptions| read_volume_with(&path, opts);
    let streamed = |path: String, opts: &ReadOptions| -> rln_engine::Result<(Vec<f32>, Option<[f64; 3]>)> {
        let r = open_reader(Path::new(&path), opts)?;
        let mut v = vec![0f32; r.info().dims.iter().product()];
        r.read_region(Region::whole(r.info().dims), &mut v)?;
        Ok((v, r.info().voxel_size))
    };
    let at = |ds: &str| format!("{}{ds}", p.display());
    let plain = ReadOptions::default();
    // two 3D datasets (the 4D and 2D ones do not count): both refuse, naming them
    let e1 = whole(at(""), &plain).unwrap_err().to_string();
    let e2 = streamed(at(""), &plain).unwrap_err().to_string();
    assert!(e1.contains("several 3D datasets (/a, /g/b)"), "{e1}");
    assert_eq!(e1, e2);
    // a named dataset: the same values and voxel size
    let v = whole(at(":/g/b"), &plain).unwrap();
    assert_eq!((v.dims, &v.data, v.voxel_size), ([4, 6, 5], &b, Some([0.3, 0.1, 0.1])));
    assert_eq!(
        streamed(at(":/g/b"), &plain).unwrap(),
        (b.clone(), Some([0.3, 0.1, 0.1]))
    );
    // a 4D dataset is channels first: --channel 1 is b; without a channel both refuse
    let ch1 = ReadOptions {
        channel: Some(1),
        ..Default::default()
    };
    assert_eq!(whole(at(":/c4"), &ch1).unwrap().data, b);
    assert_eq!(streamed(at(":/c4"), &ch1).unwrap().0, b);
    let e1 = whole(at(":/c4"), &plain).unwrap_err().to_string();
    assert!(e1.contains("choose a channel with --channel 0..1"), "{e1}");
    assert_eq!(e1, streamed(at(":/c4"), &plain).unwrap_err().to_string());
    // a 2D dataset: the same clear refusal
    let e1 = whole(at(":/flat"), &plain).unwrap_err().to_string();
    assert!(e1.contains("input is 2D (6×5); RLN needs a 3D stack"), "{e1}");
    assert_eq!(e1, streamed(at(":/flat"), &plain).unwrap_err().to_string());
}

/// An 8×8 float stack whose page p holds the value p + 1, with `desc` as ImageDescription.
fn described_stack(path: &Path, pages: usize, desc: &str) {
    let f = std::fs::File::create(path).unwrap();
    let mut enc = TiffEncoder::new(f).unwrap();
    for p in 0..pages {
        let mut img = enc.new_image::<colortype::Gray32Float>(8, 8).unwrap();
        if p == 0 {
            img.encoder().write_tag(Tag::ImageDescription, desc).unwrap();
        }
        img.write_data(&[(p + 1) as f32; 64]).unwrap();
    }
}

fn plane_values(v: &Volume) -> Vec<f32> {
    (0..v.dims[0]).map(|z| v.data[z * 64]).collect()
}

/// Issue 14: time points and channels declared by ImageJ or OME-XML are never read as
/// z planes; --time / --channel pick the right pages in each page order.
#[test]
fn imagej_and_ome_axes_are_read_not_guessed() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // the whole-file reader, checked against the streaming reader (which `infer` uses):
    // same planes, or both refuse
    let pick = |p: &Path, channel: Option<usize>, time: Option<usize>| {
        let opts = ReadOptions {
            channel,
            time,
            allow_2d: true,
            ..Default::default()
        };
        let whole = read_volume_with(p, &opts);
        let streamed = open_reader(p, &opts).and_then(|r| {
            let mut data = vec![f32::NAN; r.dims().iter().product()];
            r.read_region(Region::whole(r.dims()), &mut data)?;
            Ok((r.dims(), data))
        });
        match (&whole, &streamed) {
            (Ok(v), Ok((dims, data))) => assert!(v.dims == *dims && v.data == *data, "{p:?} {channel:?} {time:?}"),
            (Err(_), Err(_)) => {}
            _ => panic!("{p:?} {channel:?} {time:?}: whole-file {whole:?} but streamed {streamed:?}"),
        }
        whole
    };
    // ImageJ: channel fastest, then z, then time
    let tzyx = d.join("tzyx.tif");
    described_stack(&tzyx, 8, "ImageJ=1.54f\nimages=8\nslices=4\nframes=2\n");
    let e = read_volume(&tzyx).unwrap_err().to_string();
    assert!(e.contains("2 time points") && e.contains("--time 0..1"), "{e}");
    assert_eq!(plane_values(&pick(&tzyx, None, Some(1)).unwrap()), [5.0, 6.0, 7.0, 8.0]);
    let e = pick(&tzyx, None, Some(2)).unwrap_err().to_string();
    assert!(e.contains("time point 2 does not exist"), "{e}");
    let czyx = d.join("czyx.tif");
    described_stack(
        &czyx,
        8,
        "ImageJ=1.54f\nimages=8\nchannels=2\nslices=4\nhyperstack=true\n",
    );
    assert!(read_volume(&czyx).unwrap_err().to_string().contains("--channel 0..1"));
    assert_eq!(plane_values(&pick(&czyx, Some(1), None).unwrap()), [2.0, 4.0, 6.0, 8.0]);
    // a time series of single planes (TYX): one time point is a 2D image
    let tyx = d.join("tyx.tif");
    described_stack(&tyx, 5, "ImageJ=1.54f\nimages=5\nframes=5\n");
    assert!(read_volume(&tyx).unwrap_err().to_string().contains("5 time points"));
    assert_eq!(plane_values(&pick(&tyx, None, Some(2)).unwrap()), [3.0]);
    let e = read_volume_with(
        &tyx,
        &ReadOptions {
            time: Some(2),
            ..Default::default()
        },
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("2D"), "{e}");
    // OME-XML, two page orders
    let ome = |order: &str| {
        format!(
            r#"<?xml version="1.0"?><OME xmlns="http://www.openmicroscopy.org/Schemas/OME/2016-06"><Image ID="Image:0"><Pixels ID="Pixels:0" DimensionOrder="{order}" Type="float" SizeX="8" SizeY="8" SizeZ="2" SizeC="1" SizeT="3"/></Image></OME>"#
        )
    };
    let zct = d.join("zct.ome.tif");
    described_stack(&zct, 6, &ome("XYZCT"));
    assert!(read_volume(&zct).unwrap_err().to_string().contains("3 time points"));
    assert_eq!(plane_values(&pick(&zct, None, Some(2)).unwrap()), [5.0, 6.0]);
    let tzc = d.join("tzc.ome.tif");
    described_stack(&tzc, 6, &ome("XYTZC"));
    assert_eq!(plane_values(&pick(&tzc, None, Some(2)).unwrap()), [3.0, 6.0]);
    // a channel or time point of a plain stack: only 0 exists
    let plain = d.join("plain.tif");
    write_volume(&plain, &sample([3, 8, 8]), OutputDtype::F32).unwrap();
    assert!(pick(&plain, Some(0), Some(0)).is_ok());
    let e = pick(&plain, Some(5), None).unwrap_err().to_string();
    assert!(e.contains("channel 5 does not exist"), "{e}");
    // a folder is read as 2D slices only
    let stacks = d.join("stacks");
    std::fs::create_dir(&stacks).unwrap();
    write_volume(stacks.join("a.tif"), &sample([3, 8, 8]), OutputDtype::F32).unwrap();
    write_volume(stacks.join("b.tif"), &sample([3, 8, 8]), OutputDtype::F32).unwrap();
    let e = read_volume(&stacks).unwrap_err().to_string();
    assert!(e.contains("a.tif") && e.contains("3D stack"), "{e}");
}

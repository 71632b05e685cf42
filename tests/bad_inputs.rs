//! Bad inputs over every subcommand (issue 14): file classes (missing, empty, truncated,
//! corrupt, 2D, time series and channels, wrong kind or dtype, NaN, a header declaring
//! huge pages), outputs that are inputs (also through `x/../`, symbolic and hard
//! links), and option values (zero, negative, huge, malformed, not for this device).
//!
//! Every case runs the real binary in a folder of its own holding copies of the
//! fixtures, and is classified as one of: clear error (non-zero exit, a message naming
//! the problem, no output left, neither final nor partial), unclear error, wrong result
//! (exit 0 where an error was due), data loss (a fixture changed), panic (exit 101 or
//! "panicked"), abort (killed by a signal) or hang (still running after the time limit).
//! The table is printed; the test fails unless every case it asserts is a clear error
//! and every control (a good command) succeeds.
//!
//! `RLN_BAD_INPUTS_BIN=/path/to/rln-engine` measures another binary (e.g. main's, for the
//! table before the fixes); then the assertions are skipped and only the table printed.

use rln_engine::imaging::{write_volume, OutputDtype, Volume};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A command that does not finish in this time counts as a hang.
const HANG_AFTER: Duration = Duration::from_secs(30);

const MODEL: &str = "model.safetensors";

fn smooth_volume(dims: [usize; 3]) -> Volume {
    let [nz, ny, nx] = dims;
    let mut data = Vec::with_capacity(nz * ny * nx);
    for z in 0..nz {
        for y in 0..ny {
            for x in 0..nx {
                let r2 = ((z as f32 - nz as f32 / 2.0).powi(2) + (y as f32 - 12.0).powi(2) + (x as f32 - 20.0).powi(2))
                    / 20.0;
                data.push(100.0 + 900.0 * (-r2).exp() + ((x * 7 + y * 3 + z) % 11) as f32);
            }
        }
    }
    let mut v = Volume::new(dims, data).unwrap();
    v.voxel_size = Some([0.2, 0.1, 0.1]);
    v
}

/// An ImageJ stack of `pages` 8×8 float pages with the description's axes lines.
fn imagej_stack(path: &Path, pages: usize, axes: &str, rgb: bool) {
    use tiff::encoder::{colortype, TiffEncoder};
    use tiff::tags::Tag;
    let f = std::fs::File::create(path).unwrap();
    let mut enc = TiffEncoder::new(f).unwrap();
    for p in 0..pages {
        if rgb {
            let mut img = enc.new_image::<colortype::RGB8>(8, 8).unwrap();
            if p == 0 && !axes.is_empty() {
                img.encoder().write_tag(Tag::ImageDescription, axes).unwrap();
            }
            img.write_data(&[p as u8; 8 * 8 * 3]).unwrap();
        } else {
            let mut img = enc.new_image::<colortype::Gray32Float>(8, 8).unwrap();
            if p == 0 && !axes.is_empty() {
                img.encoder().write_tag(Tag::ImageDescription, axes).unwrap();
            }
            // a flat page (p + 1) with a bright spot in its middle, so that every page
            // is a plausible bead plane (psf --measured finds a peak above background)
            let mut page = [(p + 1) as f32; 64];
            page[3 * 8 + 4] += 100.0;
            img.write_data(&page).unwrap();
        }
    }
}

/// A BigTIFF whose two directories declare 200000×200000 float32 pages: 320 GB in a
/// file of a few hundred bytes.
fn huge_bigtiff() -> Vec<u8> {
    let mut b: Vec<u8> = b"II\x2b\x00\x08\x00\x00\x00".to_vec();
    b.extend_from_slice(&16u64.to_le_bytes());
    let entries: [(u16, u16, u64); 10] = [
        (256, 4, 200_000),          // ImageWidth, LONG
        (257, 4, 200_000),          // ImageLength
        (258, 3, 32),               // BitsPerSample, SHORT
        (259, 3, 1),                // Compression: none
        (262, 3, 1),                // BlackIsZero
        (273, 16, 8),               // StripOffsets, LONG8
        (277, 3, 1),                // SamplesPerPixel
        (278, 4, 200_000),          // RowsPerStrip
        (279, 16, 160_000_000_000), // StripByteCounts, LONG8
        (339, 3, 3),                // SampleFormat: IEEE float
    ];
    for page in 0..2u64 {
        let ifd_len = 8 + entries.len() as u64 * 20 + 8;
        b.extend_from_slice(&(entries.len() as u64).to_le_bytes());
        for (tag, typ, val) in entries {
            b.extend_from_slice(&tag.to_le_bytes());
            b.extend_from_slice(&typ.to_le_bytes());
            b.extend_from_slice(&1u64.to_le_bytes());
            b.extend_from_slice(&val.to_le_bytes());
        }
        let next = if page == 0 { 16 + ifd_len } else { 0 };
        b.extend_from_slice(&next.to_le_bytes());
    }
    b
}

/// A safetensors file whose header declares a 200000×200000 tensor over 16 bytes of data.
fn huge_safetensors() -> Vec<u8> {
    let header = br#"{"h1.fp.conv1.weight":{"dtype":"F32","shape":[200000,200000],"data_offsets":[0,160000000000]}}"#;
    let mut h = header.to_vec();
    h.resize(h.len().next_multiple_of(8), b' ');
    let mut b = (h.len() as u64).to_le_bytes().to_vec();
    b.extend_from_slice(&h);
    b.extend_from_slice(&[0u8; 16]);
    b
}

/// The fixtures every case folder starts with.
fn make_fixtures(dir: &Path) {
    let good = smooth_volume([16, 32, 32]);
    write_volume(dir.join("good.tif"), &good, OutputDtype::F32).unwrap();
    let psf = rln_engine::imaging::psf::generate(&rln_engine::imaging::psf::PsfSpec::Gaussian(
        rln_engine::imaging::psf::GaussianPsf::from_fwhm([0.6, 0.25, 0.25], [0.2, 0.1, 0.1], Some([9, 9, 9])),
    ))
    .unwrap();
    write_volume(dir.join("psf.tif"), &psf, OutputDtype::F32).unwrap();
    let model = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/rln-synthetic-widefield.safetensors");
    let model_bytes = std::fs::read(&model).unwrap();
    std::fs::write(dir.join(MODEL), &model_bytes).unwrap();
    std::fs::write(
        dir.join("trunc_model.safetensors"),
        &model_bytes[..model_bytes.len() / 2],
    )
    .unwrap();
    let mut corrupt = model_bytes.clone();
    for (i, b) in corrupt.iter_mut().enumerate().skip(8).take(64) {
        *b = (i * 37 % 251) as u8;
    }
    std::fs::write(dir.join("corrupt_model.safetensors"), &corrupt).unwrap();
    std::fs::write(dir.join("huge_model.safetensors"), huge_safetensors()).unwrap();
    std::fs::write(dir.join("empty_model.safetensors"), b"").unwrap();
    // volumes
    let good_bytes = std::fs::read(dir.join("good.tif")).unwrap();
    std::fs::write(dir.join("empty.tif"), b"").unwrap();
    std::fs::write(dir.join("trunc.tif"), &good_bytes[..good_bytes.len() / 3]).unwrap();
    let mut c = good_bytes.clone();
    for (i, b) in c.iter_mut().enumerate().skip(2).take(40) {
        *b = (i * 91 % 256) as u8;
    }
    std::fs::write(dir.join("corrupt.tif"), &c).unwrap();
    std::fs::write(dir.join("text.tif"), b"this is not an image\n").unwrap();
    write_volume(dir.join("flat.tif"), &smooth_volume([1, 32, 32]), OutputDtype::F32).unwrap();
    let mut nan = smooth_volume([16, 32, 32]);
    nan.data[1000] = f32::NAN;
    {
        // the engine's writers refuse non-finite voxels: the tiff crate writes this one
        use tiff::encoder::{colortype, TiffEncoder};
        let mut enc = TiffEncoder::new(std::fs::File::create(dir.join("nan.tif")).unwrap()).unwrap();
        for z in 0..16 {
            enc.write_image::<colortype::Gray32Float>(32, 32, &nan.data[z * 1024..(z + 1) * 1024])
                .unwrap();
        }
    }
    std::fs::write(dir.join("huge.tif"), huge_bigtiff()).unwrap();
    imagej_stack(
        &dir.join("tyx.tif"),
        5,
        "ImageJ=1.54f\nimages=5\nframes=5\nloop=false\n",
        false,
    );
    imagej_stack(
        &dir.join("tzyx.tif"),
        8,
        "ImageJ=1.54f\nimages=8\nslices=4\nframes=2\n",
        false,
    );
    imagej_stack(
        &dir.join("czyx.tif"),
        8,
        "ImageJ=1.54f\nimages=8\nchannels=2\nslices=4\nhyperstack=true\n",
        false,
    );
    imagej_stack(
        &dir.join("ome_t.tif"),
        3,
        r#"<?xml version="1.0" encoding="UTF-8"?><OME xmlns="http://www.openmicroscopy.org/Schemas/OME/2016-06"><Image ID="Image:0"><Pixels ID="Pixels:0" DimensionOrder="XYZCT" Type="float" SizeX="8" SizeY="8" SizeZ="1" SizeC="1" SizeT="3"></Pixels></Image></OME>"#,
        false,
    );
    imagej_stack(&dir.join("rgb.tif"), 4, "", true);
    std::fs::create_dir(dir.join("stacks")).unwrap();
    write_volume(dir.join("stacks/a.tif"), &smooth_volume([4, 32, 32]), OutputDtype::F32).unwrap();
    write_volume(dir.join("stacks/b.tif"), &smooth_volume([4, 32, 32]), OutputDtype::F32).unwrap();
    std::fs::create_dir(dir.join("emptydir")).unwrap();
    std::fs::create_dir(dir.join("x")).unwrap();
    #[cfg(unix)]
    std::os::unix::fs::symlink("good.tif", dir.join("link.tif")).unwrap();
    std::fs::hard_link(dir.join("good.tif"), dir.join("hard.tif")).unwrap();
}

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let (src, dst) = (e.path(), to.join(e.file_name()));
        let ft = e.file_type().unwrap();
        if ft.is_symlink() {
            #[cfg(unix)]
            std::os::unix::fs::symlink(std::fs::read_link(&src).unwrap(), &dst).unwrap();
        } else if ft.is_dir() {
            copy_tree(&src, &dst);
        } else if e.file_name() == "hard.tif" {
            std::fs::hard_link(to.join("good.tif"), &dst).unwrap();
        } else {
            std::fs::copy(&src, &dst).unwrap();
        }
    }
}

/// Every file's bytes, by path relative to `dir` (links read through).
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Ok(b) = std::fs::read(&p) {
                out.insert(p.strip_prefix(dir).unwrap().to_path_buf(), b);
            }
        }
    }
    out
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Outcome {
    ClearError,
    UnclearError,
    WrongResult,
    DataLoss,
    Panic,
    Abort,
    Hang,
    /// A control (good command) that succeeded.
    Ok,
    /// A control that failed.
    ControlFailed,
}

struct Case {
    class: &'static str,
    args: String,
    /// Words of which the error message must hold one (lowercase); empty: a control
    /// that must succeed.
    expect: &'static [&'static str],
    /// Outputs that must not exist afterwards (beside no partial or lock files).
    outputs: &'static [&'static str],
    /// Measured but not asserted: the fix belongs to another piece of issue 14.
    elsewhere: bool,
}

fn case(class: &'static str, args: &str, expect: &'static [&'static str]) -> Case {
    Case {
        class,
        args: args.to_string(),
        expect,
        outputs: &["out.tif", "out.safetensors", "synth_out"],
        elsewhere: false,
    }
}

fn control(args: &str) -> Case {
    Case {
        class: "control",
        args: args.to_string(),
        expect: &[],
        outputs: &[],
        elsewhere: false,
    }
}

const NOFILE: &[&str] = &["no such file", "not found", "does not exist"];
const BADFILE: &[&str] = &["truncated", "corrupt", "not a", "invalid", "empty", "format"];
const OVERWRITE: &[&str] = &["same file", "destroy", "choose another output"];
const TRAIN: &str =
    "train --steps 2 --epoch-steps 1 --batch 1 --crop 16 --synth-count 1 --synth-val-count 0 --synth-size 16,32,32";

fn cases() -> Vec<Case> {
    let infer = |rest: &str| format!("infer {MODEL} {rest}");
    let mut v = vec![
        // controls: a good command of each kind succeeds (the harness can tell)
        control(&infer("good.tif -o ok.tif --device cpu")),
        control("rl good.tif --psf psf.tif --iterations 2 -o ok.tif"),
        control("eval good.tif good.tif"),
        control("psf --measured tzyx.tif --time 1 --crop 3,5,5 --psf-dz 0.2 --psf-dxy 0.1 -o ok.tif"),
        control("synth --psf psf.tif --size 16,32,32 -o synth_ok"),
        control(&format!("{TRAIN} --synth-psf psf.tif -o ok.safetensors")),
        // infer: the model file
        case(
            "model: missing",
            "infer nomodel.safetensors good.tif -o out.tif --device cpu",
            NOFILE,
        ),
        case(
            "model: empty",
            &infer("good.tif -o out.tif --device cpu").replace(MODEL, "empty_model.safetensors"),
            BADFILE,
        ),
        case(
            "model: truncated",
            &infer("good.tif -o out.tif --device cpu").replace(MODEL, "trunc_model.safetensors"),
            BADFILE,
        ),
        case(
            "model: corrupt",
            &infer("good.tif -o out.tif --device cpu").replace(MODEL, "corrupt_model.safetensors"),
            BADFILE,
        ),
        case(
            "model: huge tensor declared",
            &infer("good.tif -o out.tif --device cpu").replace(MODEL, "huge_model.safetensors"),
            BADFILE,
        ),
        case(
            "model: a volume",
            "infer good.tif good.tif -o out.tif --device cpu",
            BADFILE,
        ),
        // infer: the input volume
        case("volume: missing", &infer("nothere.tif -o out.tif --device cpu"), NOFILE),
        case("volume: empty", &infer("empty.tif -o out.tif --device cpu"), &["empty"]),
        case(
            "volume: truncated",
            &infer("trunc.tif -o out.tif --device cpu"),
            BADFILE,
        ),
        case(
            "volume: corrupt",
            &infer("corrupt.tif -o out.tif --device cpu"),
            BADFILE,
        ),
        case(
            "volume: not an image",
            &infer("text.tif -o out.tif --device cpu"),
            BADFILE,
        ),
        case("volume: 2D", &infer("flat.tif -o out.tif --device cpu"), &["2d"]),
        case("volume: NaN voxel", &infer("nan.tif -o out.tif --device cpu"), &["nan"]),
        case(
            "volume: huge pages declared",
            &infer("huge.tif -o out.tif --device cpu"),
            BADFILE,
        ),
        case(
            "volume: ImageJ TYX",
            &infer("tyx.tif -o out.tif --device cpu"),
            &["time point", "--time"],
        ),
        case(
            "volume: ImageJ TZYX",
            &infer("tzyx.tif -o out.tif --device cpu"),
            &["--time"],
        ),
        case(
            "volume: ImageJ CZYX",
            &infer("czyx.tif -o out.tif --device cpu"),
            &["--channel"],
        ),
        case(
            "volume: OME T=3",
            &infer("ome_t.tif -o out.tif --device cpu"),
            &["--time"],
        ),
        case("volume: RGB", &infer("rgb.tif -o out.tif --device cpu"), &["--channel"]),
        case(
            "volume: folder of 3D stacks",
            &infer("stacks -o out.tif --device cpu"),
            &["3d stack"],
        ),
        case(
            "volume: empty folder",
            &infer("emptydir -o out.tif --device cpu"),
            &["no .tif"],
        ),
        case(
            "volume: a model file",
            &infer("model.safetensors -o out.tif --device cpu"),
            &["unknown volume format"],
        ),
        // infer: outputs that are inputs
        case(
            "overwrite: infer -o input",
            &infer("good.tif -o good.tif --device cpu"),
            OVERWRITE,
        ),
        case(
            "overwrite: infer -o x/../input",
            &infer("good.tif -o ./x/../good.tif --device cpu"),
            OVERWRITE,
        ),
        case(
            "overwrite: infer -o symlink",
            &infer("good.tif -o link.tif --device cpu"),
            OVERWRITE,
        ),
        case(
            "overwrite: infer -o hard link",
            &infer("good.tif -o hard.tif --device cpu"),
            OVERWRITE,
        ),
        case(
            "overwrite: infer -o model",
            &infer("good.tif -o model.safetensors --device cpu"),
            &["same file", "extension"],
        ),
        // infer: options
        case(
            "option: --tile 0,0,0",
            &infer("good.tif -o out.tif --device cpu --tile 0,0,0"),
            &["--tile"],
        ),
        case(
            "option: --tile -1",
            &infer("good.tif -o out.tif --device cpu --tile=-1"),
            &["invalid"],
        ),
        case(
            "option: --tile abc",
            &infer("good.tif -o out.tif --device cpu --tile abc"),
            &["invalid"],
        ),
        case(
            "option: --threads 10000",
            &infer("good.tif -o out.tif --device cpu --threads 10000"),
            &["--threads"],
        ),
        case(
            "option: --memory 0",
            &infer("good.tif -o out.tif --device cpu --memory 0"),
            &["positive"],
        ),
        case(
            "option: --memory NaN",
            &infer("good.tif -o out.tif --device cpu --memory NaN"),
            &["positive", "not a size"],
        ),
        case(
            "option: --fp16 on the CPU",
            &infer("good.tif -o out.tif --device cpu --fp16"),
            &["--fp16"],
        ),
        case(
            "option: --bf16 on the CPU",
            &infer("good.tif -o out.tif --device cpu --bf16"),
            &["--bf16"],
        ),
        case(
            "option: --bf16 with --fp16",
            &infer("good.tif -o out.tif --bf16 --fp16"),
            &["cannot be used with"],
        ),
        case(
            "option: --channel 5 of one",
            &infer("good.tif -o out.tif --device cpu --channel 5"),
            &["channel 5"],
        ),
        case(
            "option: --time 3 of one",
            &infer("good.tif -o out.tif --device cpu --time 3"),
            &["time point 3"],
        ),
        case(
            "option: --output-dtype xyz",
            &infer("good.tif -o out.tif --device cpu --output-dtype xyz"),
            &["unknown output type"],
        ),
        case(
            "output: unknown extension",
            &infer("good.tif -o out.png --device cpu"),
            &["extension"],
        ),
        case(
            "output: missing folder",
            &infer("good.tif -o nodir/out.tif --device cpu"),
            &["does not exist"],
        ),
        case("output: a folder", &infer("good.tif -o x --device cpu"), &["folder"]),
        // rl
        case("rl: input missing", "rl nothere.tif --psf psf.tif -o out.tif", NOFILE),
        case("rl: input 2D", "rl flat.tif --psf psf.tif -o out.tif", &["2d"]),
        case("rl: input huge pages", "rl huge.tif --psf psf.tif -o out.tif", BADFILE),
        case("rl: input TYX", "rl tyx.tif --psf psf.tif -o out.tif", &["--time"]),
        case("rl: PSF missing", "rl good.tif --psf nopsf.tif -o out.tif", NOFILE),
        case("rl: PSF corrupt", "rl good.tif --psf corrupt.tif -o out.tif", BADFILE),
        case(
            "overwrite: rl -o input",
            "rl good.tif --psf psf.tif --iterations 2 -o good.tif",
            OVERWRITE,
        ),
        case(
            "overwrite: rl -o PSF",
            "rl good.tif --psf psf.tif --iterations 2 -o psf.tif",
            OVERWRITE,
        ),
        case(
            "rl: --channel 5 of one",
            "rl good.tif --psf psf.tif --iterations 2 --channel 5 -o out.tif",
            &["channel 5"],
        ),
        case(
            "rl: --iterations -1",
            "rl good.tif --psf psf.tif --iterations=-1 -o out.tif",
            &["invalid"],
        ),
        case(
            "rl: --threads 10000",
            "rl good.tif --psf psf.tif --iterations 2 -o out.tif --threads 10000",
            &["--threads"],
        ),
        // psf
        case("psf: bead missing", "psf --measured nobead.tif -o out.tif", NOFILE),
        case("psf: bead TYX", "psf --measured tyx.tif -o out.tif", &["--time"]),
        case("psf: bead huge pages", "psf --measured huge.tif -o out.tif", BADFILE),
        case(
            "psf: bead folder of stacks",
            "psf --measured stacks -o out.tif",
            &["3d stack"],
        ),
        case(
            "overwrite: psf --measured b -o b",
            "psf --measured good.tif -o good.tif",
            OVERWRITE,
        ),
        case(
            "psf: --nx abc",
            "psf --model gaussian --fwhm 0.6,0.25,0.25 --nx abc -o out.tif",
            &["invalid"],
        ),
        // synth
        case(
            "synth: PSF missing",
            "synth --psf nopsf.tif --size 16,32,32 -o synth_out",
            NOFILE,
        ),
        case(
            "synth: PSF TYX",
            "synth --psf tyx.tif --size 16,32,32 -o synth_out",
            &["--time"],
        ),
        case(
            "synth: PSF huge pages",
            "synth --psf huge.tif --size 16,32,32 -o synth_out",
            BADFILE,
        ),
        case(
            "synth: -o a file",
            "synth --psf psf.tif --size 16,32,32 -o good.tif",
            &["is a file"],
        ),
        case(
            "synth: --count abc",
            "synth --psf psf.tif --count abc -o synth_out",
            &["invalid"],
        ),
        // eval
        case("eval: missing", "eval good.tif nothere.tif", NOFILE),
        case("eval: 2D", "eval good.tif flat.tif", &["2d"]),
        case("eval: TYX", "eval good.tif tyx.tif", &["--time"]),
        case(
            "eval: shapes differ",
            "eval good.tif psf.tif",
            &["shape", "size", "differ"],
        ),
        // train
        case(
            "train: PSF missing",
            &format!("{TRAIN} --synth-psf nopsf.tif -o out.safetensors"),
            NOFILE,
        ),
        case(
            "train: PSF TYX",
            &format!("{TRAIN} --synth-psf tyx.tif -o out.safetensors"),
            &["--time"],
        ),
        case(
            "train: PSF huge pages",
            &format!("{TRAIN} --synth-psf huge.tif -o out.safetensors"),
            BADFILE,
        ),
        case(
            "train: --init corrupt",
            &format!("{TRAIN} --synth-psf psf.tif --init corrupt_model.safetensors -o out.safetensors"),
            BADFILE,
        ),
        case(
            "overwrite: train --init W -o W",
            &format!("{TRAIN} --synth-psf psf.tif --init {MODEL} -o {MODEL}"),
            OVERWRITE,
        ),
        case(
            "overwrite: train --log X -o X",
            &format!("{TRAIN} --synth-psf psf.tif --log out.safetensors -o out.safetensors"),
            &["same file"],
        ),
        case(
            "overwrite: train --checkpoint X -o X",
            &format!("{TRAIN} --synth-psf psf.tif --checkpoint out.safetensors -o out.safetensors"),
            &["same file"],
        ),
        case(
            "overwrite: train --log PSF",
            &format!("{TRAIN} --synth-psf psf.tif --log psf.tif -o out.safetensors"),
            OVERWRITE,
        ),
        case(
            "train: --resume missing",
            &format!("{TRAIN} --synth-psf psf.tif --resume nockpt.safetensors -o out.safetensors"),
            &["no such checkpoint", "no such file"],
        ),
        case(
            "train: --data missing",
            "train --data nodata --steps 2 -o out.safetensors",
            NOFILE,
        ),
        case(
            "train: --seed abc",
            &format!("{TRAIN} --synth-psf psf.tif -o out.safetensors --seed abc"),
            &["invalid"],
        ),
        case(
            "train: --threads 10000",
            &format!("{TRAIN} --synth-psf psf.tif -o out.safetensors --threads 10000"),
            &["--threads"],
        ),
        case(
            "train: --precision mixed on the CPU",
            &format!("{TRAIN} --synth-psf psf.tif -o out.safetensors --device cpu --precision mixed"),
            &["--precision mixed is a cuda option"],
        ),
        case(
            "train: -o unknown extension",
            &format!("{TRAIN} --synth-psf psf.tif -o out.tif"),
            &["extension"],
        ),
        // import-tf
        case(
            "import-tf: missing",
            "import-tf nothere.safetensors --div-eps 1e-4 -o out.safetensors",
            NOFILE,
        ),
        case(
            "import-tf: corrupt",
            "import-tf corrupt_model.safetensors --div-eps 1e-4 -o out.safetensors",
            BADFILE,
        ),
        case(
            "overwrite: import-tf W -o W",
            &format!("import-tf {MODEL} --div-eps 1e-4 -o {MODEL}"),
            OVERWRITE,
        ),
        // compare, conformance, bench
        case(
            "compare: model missing",
            "compare --model nomodel.safetensors --count 1 --size 16,32,32",
            NOFILE,
        ),
        case(
            "compare: PSF TYX",
            &format!("compare --model {MODEL} --psf tyx.tif --count 1 --size 16,32,32 --rl-max 6"),
            &["--time"],
        ),
        case(
            "compare: PSF huge pages",
            &format!("compare --model {MODEL} --psf huge.tif --count 1 --size 16,32,32 --rl-max 6"),
            BADFILE,
        ),
        case(
            "conformance: vectors missing",
            &format!("conformance --model {MODEL} --vectors novectors.safetensors"),
            NOFILE,
        ),
        case(
            "conformance: --fp16 on the CPU",
            &format!("conformance --model {MODEL} --vectors novectors.safetensors --fp16"),
            &["--fp16"],
        ),
        case(
            "bench: --fp16 on the CPU",
            "bench --fp16 --min-time 0 --min-runs 1",
            &["--fp16"],
        ),
    ];
    // the numerics piece of issue 14 owns these; measured here, asserted there
    for (class, args) in [
        (
            "compare: --rl-min 5 --rl-max 1",
            format!("compare --model {MODEL} --count 1 --size 34,66,66 --rl-min 5 --rl-max 1"),
        ),
        (
            "compare: --count 0",
            format!("compare --model {MODEL} --count 0 --size 34,66,66"),
        ),
        (
            "train: --synth-count 0",
            format!(
                "{} --synth-psf psf.tif -o out.safetensors",
                TRAIN.replace("--synth-count 1", "--synth-count 0")
            ),
        ),
        (
            "train: --batch 0",
            format!(
                "{} --synth-psf psf.tif -o out.safetensors",
                TRAIN.replace("--batch 1", "--batch 0")
            ),
        ),
        (
            "train: --lr=-1",
            format!("{TRAIN} --synth-psf psf.tif -o out.safetensors --lr=-1"),
        ),
        (
            "synth: --background NaN",
            "synth --psf psf.tif --size 16,32,32 --background NaN -o synth_out".to_string(),
        ),
        (
            "psf: --dtype u16",
            "psf --model gaussian --fwhm 0.6,0.25,0.25 --dxy 0.1 --dz 0.2 --nx 15 --nz 15 --dtype u16 -o out.tif"
                .to_string(),
        ),
    ] {
        let mut c = case(class, &args, &["error"]);
        c.elsewhere = true;
        v.push(c);
    }
    v
}

struct Run {
    outcome: Outcome,
    code: Option<i32>,
    stderr: String,
    secs: f64,
}

fn run_case(bin: &Path, fixtures: &Path, dir: &Path, c: &Case) -> Run {
    copy_tree(fixtures, dir);
    let before = snapshot(dir);
    let t = Instant::now();
    let mut child = Command::new(bin)
        .args(c.args.split_whitespace())
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the binary runs");
    let mut stderr_pipe = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut stderr_pipe, &mut s);
        s
    });
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break Some(s);
        }
        if t.elapsed() > HANG_AFTER {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let secs = t.elapsed().as_secs_f64();
    let stderr = reader.join().unwrap_or_default();
    let after = snapshot(dir);
    let lost = before.iter().any(|(p, b)| after.get(p) != Some(b));
    let leftovers = after.keys().any(|p| {
        let s = p.to_string_lossy();
        s.contains(".partial-")
            || s.ends_with(".lock")
            || (!before.contains_key(p) && c.outputs.iter().any(|o| s.starts_with(o)))
    });
    let code = status.and_then(|s| s.code());
    let outcome = match status {
        None => Outcome::Hang,
        Some(_) if code.is_none() || code == Some(134) => Outcome::Abort,
        Some(_) if code == Some(101) || stderr.contains("panicked") => Outcome::Panic,
        Some(_) if lost => Outcome::DataLoss,
        Some(s) if c.expect.is_empty() => {
            if s.success() {
                Outcome::Ok
            } else {
                Outcome::ControlFailed
            }
        }
        Some(s) if s.success() => Outcome::WrongResult,
        Some(_) => {
            let low = stderr.to_lowercase();
            if c.expect.iter().any(|w| low.contains(w)) && !leftovers {
                Outcome::ClearError
            } else {
                Outcome::UnclearError
            }
        }
    };
    Run {
        outcome,
        code,
        stderr,
        secs,
    }
}

#[test]
fn bad_inputs_get_clear_errors_and_never_lose_data() {
    let other_bin = std::env::var_os("RLN_BAD_INPUTS_BIN").map(PathBuf::from);
    let bin = other_bin
        .clone()
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_rln-engine")));
    let root = tempfile::tempdir().unwrap();
    let fixtures = root.path().join("fixtures");
    std::fs::create_dir(&fixtures).unwrap();
    make_fixtures(&fixtures);
    let cases = cases();
    let mut counts: BTreeMap<Outcome, usize> = BTreeMap::new();
    let mut failures = Vec::new();
    for (i, c) in cases.iter().enumerate() {
        let r = run_case(&bin, &fixtures, &root.path().join(format!("case{i:03}")), c);
        let last_line = r
            .stderr
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("")
            .to_string();
        println!(
            "{:<14} {:<40} exit {:<5} {:>5.1} s  {}{}",
            format!("{:?}", r.outcome),
            c.class,
            r.code.map_or("-".into(), |c| c.to_string()),
            r.secs,
            last_line.chars().take(150).collect::<String>(),
            if c.elsewhere { "  [numerics piece]" } else { "" }
        );
        if c.class != "control" {
            *counts.entry(r.outcome).or_default() += 1;
        }
        let good = if c.expect.is_empty() {
            r.outcome == Outcome::Ok
        } else {
            r.outcome == Outcome::ClearError
        };
        if !good && !c.elsewhere {
            failures.push(format!("{} ({}): {:?}\n{}", c.class, c.args, r.outcome, r.stderr));
        }
        // the overwrite refusals name one file in its two roles, on purpose
        let two_roles = last_line.contains("same file");
        if let Some(path) = repeated_path(&last_line).filter(|_| !two_roles) {
            failures.push(format!(
                "{} ({}): the error names {path} twice:\n{last_line}",
                c.class, c.args
            ));
        }
    }
    let n = |o| counts.get(&o).copied().unwrap_or(0);
    println!(
        "\n| cases tried | clear errors | unclear errors | wrong results (exit 0) | data loss | panics | aborts | hangs |\n\
         |---|---|---|---|---|---|---|---|\n| {} | {} | {} | {} | {} | {} | {} | {} |",
        cases.iter().filter(|c| c.class != "control").count(),
        n(Outcome::ClearError),
        n(Outcome::UnclearError),
        n(Outcome::WrongResult),
        n(Outcome::DataLoss),
        n(Outcome::Panic),
        n(Outcome::Abort),
        n(Outcome::Hang)
    );
    if other_bin.is_some() {
        println!("(measured {}: assertions skipped)", bin.display());
        return;
    }
    assert!(
        failures.is_empty(),
        "{} case(s) failed:\n{}",
        failures.len(),
        failures.join("\n---\n")
    );
}

/// A file the error line names twice ("infer a.tif → b.tif: a.tif: truncated"), which
/// layers of error context produce when each adds the path: the first such, if any.
fn repeated_path(line: &str) -> Option<String> {
    let files: Vec<&str> = line
        .split_whitespace()
        .map(|w| w.trim_matches(|c: char| matches!(c, ':' | ',' | '(' | ')' | '"' | '\'' | '`')))
        .filter(|w| {
            w.rsplit_once('.').is_some_and(|(stem, ext)| {
                !stem.is_empty()
                    && ext.len() >= 2
                    && ext.chars().all(|c| c.is_ascii_alphanumeric())
                    && !ext.chars().all(|c| c.is_ascii_digit())
            })
        })
        .collect();
    files
        .iter()
        .enumerate()
        .find(|(i, w)| files[..*i].contains(w))
        .map(|(_, w)| w.to_string())
}

#[test]
fn repeated_paths_are_found() {
    assert_eq!(
        repeated_path("error: infer a.tif → b.tif: a.tif: not a readable TIFF: truncated").as_deref(),
        Some("a.tif")
    );
    assert_eq!(repeated_path("error: a.tif: not a readable TIFF (0.5 of 1.0 MB)"), None);
    assert_eq!(
        repeated_path("error: model.safetensors: missing tensor h1.fp.conv1"),
        None
    );
}

/// Issue 14 item 6: while one `rl` writes out.tif, a second one to the same output fails
/// at once naming the lock; SIGTERM ends the first with status 130 and leaves neither the
/// output nor its lock nor a partial file.
#[cfg(unix)]
#[test]
fn a_second_writer_is_refused_and_an_interrupted_run_leaves_nothing() {
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_rln-engine"));
    let root = tempfile::tempdir().unwrap();
    let d = root.path();
    write_volume(d.join("good.tif"), &smooth_volume([16, 32, 32]), OutputDtype::F32).unwrap();
    let psf = rln_engine::imaging::psf::generate(&rln_engine::imaging::psf::PsfSpec::Gaussian(
        rln_engine::imaging::psf::GaussianPsf::from_fwhm([0.6, 0.25, 0.25], [0.2, 0.1, 0.1], Some([9, 9, 9])),
    ))
    .unwrap();
    write_volume(d.join("psf.tif"), &psf, OutputDtype::F32).unwrap();
    let rl = |iterations: &str| {
        let mut c = Command::new(&bin);
        c.args([
            "rl",
            "good.tif",
            "--psf",
            "psf.tif",
            "--iterations",
            iterations,
            "-o",
            "out.tif",
        ])
        .current_dir(d)
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
        c
    };
    let mut first = rl("1000000").spawn().unwrap();
    let t = Instant::now();
    while !d.join(".out.tif.lock").exists() {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "the first run never took its lock"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let second = rl("2").output().unwrap();
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(
        !second.status.success() && err.contains("another process is writing"),
        "{err}"
    );
    let killed = Command::new("kill")
        .args(["-TERM", &first.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let status = first.wait().unwrap();
    assert_eq!(
        status.code(),
        Some(130),
        "SIGTERM must end the run through the cleanup handler"
    );
    let left: Vec<String> = std::fs::read_dir(d)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n != "good.tif" && n != "psf.tif")
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

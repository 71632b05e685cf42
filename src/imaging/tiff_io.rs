//! TIFF stacks through the `tiff` crate: multi-page 8/16/32-bit integer and 16/32/64-bit
//! float grayscale (classic TIFF and BigTIFF), ImageJ voxel size and hyperstack
//! metadata; writing float32, uint16 or float16 with ImageJ metadata.

use super::io::{OutputDtype, ReadOptions};
use super::volume::{check_voxel_size, Volume};
use crate::error::{Error, Result};
use crate::fsutil::write_atomic_with;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;
use tiff::decoder::{ifd::Value, Decoder, DecodingResult, Limits};
use tiff::encoder::colortype::{self, ColorType};
use tiff::encoder::{Rational, TiffEncoder, TiffKind};
use tiff::tags::{PhotometricInterpretation, ResolutionUnit, SampleFormat, Tag};

/// Files whose estimated size reaches this are written as BigTIFF (classic TIFF offsets
/// are 32-bit). 4 GB less a safety margin for the directories.
pub const BIGTIFF_THRESHOLD: u64 = 4_000_000_000;

/// Float16 grayscale: SampleFormat=3 (IEEEFP) with BitsPerSample=16, as tifffile and Fiji read it.
pub(crate) struct GrayF16;
impl ColorType for GrayF16 {
    type Inner = u16;
    const TIFF_VALUE: PhotometricInterpretation = PhotometricInterpretation::BlackIsZero;
    const BITS_PER_SAMPLE: &'static [u16] = &[16];
    const SAMPLE_FORMAT: &'static [SampleFormat] = &[SampleFormat::IEEEFP];
    fn horizontal_predict(row: &[u16], result: &mut Vec<u16>) {
        // never called: the writer uses no predictor
        result.extend_from_slice(row);
    }
}

/// The ImageJ `key=value` lines of an ImageDescription that starts with `ImageJ=`.
#[derive(Debug, Default, Clone)]
pub(crate) struct ImageJMeta {
    pub images: Option<usize>,
    pub channels: Option<usize>,
    pub slices: Option<usize>,
    pub frames: Option<usize>,
    pub spacing: Option<f64>,
    pub unit: Option<String>,
    pub rln_metadata: Option<String>,
}

pub(crate) fn parse_imagej(desc: &str) -> Option<ImageJMeta> {
    if !desc.starts_with("ImageJ=") {
        return None;
    }
    let mut m = ImageJMeta::default();
    for line in desc.lines() {
        let Some((k, v)) = line.split_once('=') else {
            continue;
        };
        let v = v.trim();
        match k.trim() {
            "images" => m.images = v.parse().ok(),
            "channels" => m.channels = v.parse().ok(),
            "slices" => m.slices = v.parse().ok(),
            "frames" => m.frames = v.parse().ok(),
            "spacing" => m.spacing = v.parse().ok(),
            "unit" => m.unit = Some(v.to_string()),
            "rln_metadata" => m.rln_metadata = Some(v.to_string()),
            _ => {}
        }
    }
    Some(m)
}

/// Factor from a length unit's name to µm (None: not a length, e.g. "pixel").
pub(crate) fn unit_to_micron(unit: &str) -> Option<f64> {
    let u = unit.trim().trim_matches('"').to_lowercase();
    match u.as_str() {
        "micron" | "microns" | "um" | "µm" | "μm" | "\\u00b5m" | "micrometer" | "micrometre" => Some(1.0),
        "nm" | "nanometer" | "nanometre" => Some(1e-3),
        "mm" | "millimeter" | "millimetre" => Some(1e3),
        "cm" | "centimeter" | "centimetre" => Some(1e4),
        "m" | "meter" | "metre" => Some(1e6),
        "inch" | "in" => Some(25_400.0),
        _ => None,
    }
}

pub(crate) fn tiff_err(path: &Path, what: &str, e: tiff::TiffError) -> Error {
    match e {
        tiff::TiffError::IoError(io) if io.kind() == std::io::ErrorKind::UnexpectedEof => {
            Error::format(path, format!("{what}: file is truncated ({io})"))
        }
        other => Error::format(path, format!("{what}: {other} (truncated or not a TIFF stack?)")),
    }
}

pub(crate) fn rational(v: Option<Value>) -> Option<f64> {
    match v? {
        Value::Rational(n, d) if d != 0 => Some(n as f64 / d as f64),
        Value::RationalBig(n, d) if d != 0 => Some(n as f64 / d as f64),
        Value::Rational(..) | Value::RationalBig(..) => Some(f64::NAN),
        Value::Float(f) => Some(f as f64),
        Value::Double(f) => Some(f),
        _ => None,
    }
}

/// Samples of one decoded page as f32, keeping sample `channel` of `spp` per pixel.
pub(crate) fn page_to_f32(img: DecodingResult, spp: usize, channel: usize, out: &mut Vec<f32>) {
    macro_rules! take {
        ($v:expr, $conv:expr) => {{
            let v = $v;
            if spp == 1 {
                out.extend(v.iter().map($conv));
            } else {
                out.extend(v.iter().skip(channel).step_by(spp).map($conv));
            }
        }};
    }
    match img {
        DecodingResult::U8(v) => take!(v, |&s| s as f32),
        DecodingResult::U16(v) => take!(v, |&s| s as f32),
        DecodingResult::U32(v) => take!(v, |&s| s as f32),
        DecodingResult::U64(v) => take!(v, |&s| s as f32),
        DecodingResult::I8(v) => take!(v, |&s| s as f32),
        DecodingResult::I16(v) => take!(v, |&s| s as f32),
        DecodingResult::I32(v) => take!(v, |&s| s as f32),
        DecodingResult::I64(v) => take!(v, |&s| s as f32),
        DecodingResult::F16(v) => take!(v, |s| s.to_f32()),
        DecodingResult::F32(v) => take!(v, |&s| s),
        DecodingResult::F64(v) => take!(v, |&s| s as f32),
    }
}

pub(crate) fn decoded_len(img: &DecodingResult) -> usize {
    match img {
        DecodingResult::U8(v) => v.len(),
        DecodingResult::U16(v) => v.len(),
        DecodingResult::U32(v) => v.len(),
        DecodingResult::U64(v) => v.len(),
        DecodingResult::I8(v) => v.len(),
        DecodingResult::I16(v) => v.len(),
        DecodingResult::I32(v) => v.len(),
        DecodingResult::I64(v) => v.len(),
        DecodingResult::F16(v) => v.len(),
        DecodingResult::F32(v) => v.len(),
        DecodingResult::F64(v) => v.len(),
    }
}

/// Reads a TIFF stack as a volume (2D files only with `opts.allow_2d`).
pub fn read_tiff(path: &Path, opts: &ReadOptions) -> Result<Volume> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let file_len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    if file_len == 0 {
        return Err(Error::format(path, "file is empty"));
    }
    let mut dec = Decoder::new(std::io::BufReader::with_capacity(1 << 20, file))
        .map_err(|e| tiff_err(path, "not a readable TIFF", e))?
        .with_limits(Limits::unlimited());
    let (w, h) = dec.dimensions().map_err(|e| tiff_err(path, "first page", e))?;
    let (w, h) = (w as usize, h as usize);
    let desc = dec.get_tag_ascii_string(Tag::ImageDescription).ok();
    let ij = desc.as_deref().and_then(parse_imagej);
    let xres = rational(dec.find_tag(Tag::XResolution).ok().flatten());
    let yres = rational(dec.find_tag(Tag::YResolution).ok().flatten());
    let res_unit: Option<u16> = dec.find_tag_unsigned(Tag::ResolutionUnit).ok().flatten();
    let spp: usize = dec
        .find_tag_unsigned::<u16>(Tag::SamplesPerPixel)
        .ok()
        .flatten()
        .unwrap_or(1) as usize;

    // hyperstack layout: ImageJ pages are ordered c fastest, then z, then t
    let ij_channels = ij.as_ref().and_then(|m| m.channels).unwrap_or(1).max(1);
    let (slices, frames) = match &ij {
        Some(m) => (m.slices.unwrap_or(0), m.frames.unwrap_or(0)),
        None => (0, 0),
    };
    if slices > 1 && frames > 1 {
        return Err(Error::invalid(format!(
            "{}: ImageJ hyperstack with {slices} slices × {frames} time points; RLN takes one 3D stack: \
             save a single time point",
            path.display()
        )));
    }
    let sample_channel = if spp > 1 {
        match opts.channel {
            None => {
                return Err(Error::invalid(format!(
                    "{}: image has {spp} samples per pixel (RGB or multi-channel); choose one with --channel 0..{}",
                    path.display(),
                    spp - 1
                )))
            }
            Some(c) if c >= spp => {
                return Err(Error::invalid(format!(
                    "{}: channel {c} does not exist (the image has {spp} samples per pixel)",
                    path.display()
                )))
            }
            Some(c) => c,
        }
    } else {
        0
    };
    let page_channel = if ij_channels > 1 {
        if spp > 1 {
            return Err(Error::invalid(format!(
                "{}: both ImageJ channels and multi-sample pixels",
                path.display()
            )));
        }
        match opts.channel {
            None => {
                return Err(Error::invalid(format!(
                    "{}: ImageJ stack has {ij_channels} channels; choose one with --channel 0..{}",
                    path.display(),
                    ij_channels - 1
                )))
            }
            Some(c) if c >= ij_channels => {
                return Err(Error::invalid(format!(
                    "{}: channel {c} does not exist (the stack has {ij_channels} channels)",
                    path.display()
                )))
            }
            Some(c) => Some(c),
        }
    } else {
        None
    };

    let mut data: Vec<f32> = Vec::new();
    let mut page = 0usize;
    let mut kept = 0usize;
    loop {
        let (pw, ph) = dec
            .dimensions()
            .map_err(|e| tiff_err(path, &format!("page {page}"), e))?;
        if (pw as usize, ph as usize) != (w, h) {
            return Err(Error::format(
                path,
                format!("page {page} is {ph}×{pw} but page 0 is {h}×{w}; a stack needs pages of one size"),
            ));
        }
        let keep = page_channel.is_none_or(|c| page % ij_channels == c);
        if keep {
            let img = dec
                .read_image()
                .map_err(|e| tiff_err(path, &format!("page {page}"), e))?;
            let n = decoded_len(&img);
            if n != w * h * spp {
                return Err(Error::format(
                    path,
                    format!("page {page} holds {n} samples, expected {}", w * h * spp),
                ));
            }
            page_to_f32(img, spp, sample_channel, &mut data);
            kept += 1;
        }
        page += 1;
        if !dec.more_images() {
            break;
        }
        dec.next_image()
            .map_err(|e| tiff_err(path, &format!("page {page}"), e))?;
    }
    // ImageJ writes stacks over 4 GB as one directory followed by contiguous planes
    if page == 1 {
        if let Some(n) = ij.as_ref().and_then(|m| m.images).filter(|&n| n > 1) {
            let extra = read_imagej_contiguous(path, &mut dec, w, h, n, spp)?;
            if page_channel.is_some() || spp > 1 {
                return Err(Error::invalid(format!(
                    "{}: multi-channel contiguous ImageJ stacks are not supported",
                    path.display()
                )));
            }
            data.extend(extra);
            kept = n;
        }
    }
    let nz = kept;
    if nz <= 1 && !opts.allow_2d {
        return Err(Error::invalid(format!(
            "{}: input is 2D ({h}×{w}); RLN needs a 3D stack (a multi-page TIFF, a folder of slices, or an HDF5 dataset)",
            path.display()
        )));
    }
    let mut vol = Volume::new([nz, h, w], data)?;

    // voxel size: XResolution/YResolution are pixels per unit; ImageJ keeps the unit and z spacing in the description
    let factor = match ij.as_ref().and_then(|m| m.unit.as_deref()) {
        Some(u) => unit_to_micron(u),
        None => match res_unit {
            Some(2) => Some(25_400.0),
            Some(3) => Some(1e4),
            _ => None,
        },
    };
    if let (Some(f), Some(xr), Some(yr)) = (factor, xres, yres) {
        let dz = ij.as_ref().and_then(|m| m.spacing).unwrap_or(1.0);
        let vs = [dz * f, f / yr, f / xr];
        check_voxel_size(Some(vs), &path.display().to_string())?;
        vol.voxel_size = Some(vs);
    } else if let Some(sp) = ij.as_ref().and_then(|m| m.spacing) {
        if !(sp.is_finite() && sp > 0.0) {
            check_voxel_size(Some([sp, 1.0, 1.0]), &path.display().to_string())?;
        }
    }
    vol.unit = "micron".into();
    vol.metadata = ij.and_then(|m| m.rln_metadata).map(|s| s.replace("\\u003d", "="));
    if opts.check_finite {
        vol.check_finite(&path.display().to_string())?;
    }
    Ok(vol)
}

fn read_imagej_contiguous<R: Read + Seek>(
    path: &Path,
    dec: &mut Decoder<R>,
    w: usize,
    h: usize,
    n: usize,
    spp: usize,
) -> Result<Vec<f32>> {
    dec.seek_to_image(0).map_err(|e| tiff_err(path, "page 0", e))?;
    let offsets = dec
        .get_tag_u64_vec(Tag::StripOffsets)
        .map_err(|e| tiff_err(path, "strip offsets", e))?;
    let bits = dec
        .find_tag_unsigned::<u16>(Tag::BitsPerSample)
        .ok()
        .flatten()
        .unwrap_or(8) as usize;
    let fmt = dec
        .find_tag_unsigned::<u16>(Tag::SampleFormat)
        .ok()
        .flatten()
        .unwrap_or(1);
    let comp = dec
        .find_tag_unsigned::<u16>(Tag::Compression)
        .ok()
        .flatten()
        .unwrap_or(1);
    if comp != 1 || spp != 1 {
        return Err(Error::format(
            path,
            "contiguous ImageJ stack must be uncompressed grayscale",
        ));
    }
    let bpp = bits / 8;
    let plane = w * h * bpp;
    let start = offsets[0] + plane as u64;
    let r = dec.inner();
    let mut order = [0u8; 2];
    r.seek(SeekFrom::Start(0))
        .and_then(|_| r.read_exact(&mut order))
        .map_err(|e| Error::io(path, e))?;
    let little = &order == b"II";
    r.seek(SeekFrom::Start(start)).map_err(|e| Error::io(path, e))?;
    let mut buf = vec![0u8; plane * (n - 1)];
    r.read_exact(&mut buf).map_err(|_| {
        Error::format(
            path,
            format!("file is truncated: ImageJ says {n} planes of {plane} bytes"),
        )
    })?;
    let out: Vec<f32> = match (bits, fmt) {
        (8, _) => buf.iter().map(|&b| b as f32).collect(),
        (16, 3) => buf
            .chunks_exact(2)
            .map(|c| half::f16::from_bits(if little { u16::from_le_bytes([c[0], c[1]]) } else { u16::from_be_bytes([c[0], c[1]]) }).to_f32())
            .collect(),
        (16, _) => buf
            .chunks_exact(2)
            .map(|c| if little { u16::from_le_bytes([c[0], c[1]]) } else { u16::from_be_bytes([c[0], c[1]]) } as f32)
            .collect(),
        (32, 3) => buf
            .chunks_exact(4)
            .map(|c| {
                let a = [c[0], c[1], c[2], c[3]];
                if little { f32::from_le_bytes(a) } else { f32::from_be_bytes(a) }
            })
            .collect(),
        _ => return Err(Error::format(path, format!("contiguous ImageJ stack of {bits}-bit samples is not supported"))),
    };
    Ok(out)
}

/// The ImageJ description this crate writes.
fn imagej_description(vol: &Volume) -> String {
    let (mut lo, mut hi) = (f32::INFINITY, f32::NEG_INFINITY);
    for &v in vol.data.iter().filter(|v| v.is_finite()) {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if lo > hi {
        (lo, hi) = (0.0, 0.0);
    }
    let nz = vol.dims[0];
    let mut d = format!("ImageJ=1.11a\nimages={nz}\nslices={nz}\n");
    if let Some(vs) = vol.voxel_size {
        d += &format!("unit=micron\nspacing={}\n", vs[0]);
    }
    d += &format!("loop=false\nmin={lo}\nmax={hi}\n");
    if let Some(m) = &vol.metadata {
        // one line; '=' escaped so that ImageJ-style key=value parsers keep the JSON whole
        let one_line: String = m.replace('\n', " ").replace('=', "\\u003d");
        d += &format!("rln_metadata={one_line}\n");
    }
    d
}

pub(crate) fn resolution(pixels_per_unit: f64) -> Rational {
    let mut d: u64 = 1_000_000;
    while d > 1 && (pixels_per_unit * d as f64).round() > u32::MAX as f64 {
        d /= 10;
    }
    let n = (pixels_per_unit * d as f64).round().clamp(1.0, u32::MAX as f64) as u32;
    Rational { n, d: d as u32 }
}

/// Bytes a stack would take on disk (data plus generous room for directories).
pub fn estimated_tiff_size(vol: &Volume, dtype: OutputDtype) -> u64 {
    let data = vol.len() as u64 * dtype.bytes() as u64;
    data + vol.dims[0] as u64 * 512 + 64 * 1024 + vol.metadata.as_ref().map_or(0, |m| m.len() as u64)
}

/// Writes `vol` as an ImageJ-compatible TIFF stack; BigTIFF when the estimated file size
/// reaches `bigtiff_threshold` bytes.
pub fn write_tiff(path: &Path, vol: &Volume, dtype: OutputDtype, bigtiff_threshold: u64) -> Result<()> {
    if vol.dims.contains(&0) {
        return Err(Error::invalid(format!(
            "cannot write an empty volume ({}) to {}",
            vol.shape_str(),
            path.display()
        )));
    }
    if vol.dims[1] > u32::MAX as usize || vol.dims[2] > u32::MAX as usize {
        return Err(Error::invalid("plane too large for TIFF"));
    }
    vol.check_voxel_size(&path.display().to_string())?;
    let big = estimated_tiff_size(vol, dtype) >= bigtiff_threshold;
    write_atomic_with(path, |w| {
        let r = if big {
            let mut enc = TiffEncoder::new_big(w).map_err(|e| Error::format(path, e.to_string()))?;
            write_pages(&mut enc, vol, dtype)
        } else {
            let mut enc = TiffEncoder::new(w).map_err(|e| Error::format(path, e.to_string()))?;
            write_pages(&mut enc, vol, dtype)
        };
        r.map_err(|e| match e {
            tiff::TiffError::IoError(io) => Error::io(path, io),
            other => Error::format(path, format!("writing TIFF: {other}")),
        })
    })
}

fn write_pages<W: Write + Seek, K: TiffKind>(
    enc: &mut TiffEncoder<W, K>,
    vol: &Volume,
    dtype: OutputDtype,
) -> tiff::TiffResult<()> {
    match dtype {
        OutputDtype::F32 => write_pages_as::<W, K, colortype::Gray32Float>(enc, vol, |v| v),
        OutputDtype::U16 => write_pages_as::<W, K, colortype::Gray16>(enc, vol, to_u16),
        OutputDtype::F16 => write_pages_as::<W, K, GrayF16>(enc, vol, |v| half::f16::from_f32(v).to_bits()),
    }
}

/// Rounds to the nearest integer and clamps to [0, 65535] (NaN → 0). Writers check the
/// range first ([`super::io::check_output_range`]), so the clamp never changes a value.
pub fn to_u16(v: f32) -> u16 {
    if v.is_nan() {
        0
    } else {
        v.round().clamp(0.0, 65535.0) as u16
    }
}

fn write_pages_as<W: Write + Seek, K: TiffKind, C: ColorType>(
    enc: &mut TiffEncoder<W, K>,
    vol: &Volume,
    conv: impl Fn(f32) -> C::Inner,
) -> tiff::TiffResult<()>
where
    [C::Inner]: tiff::encoder::TiffValue,
{
    let [nz, ny, nx] = vol.dims;
    let desc = imagej_description(vol);
    let mut buf: Vec<C::Inner> = Vec::with_capacity(ny * nx);
    for z in 0..nz {
        let mut img = enc.new_image::<C>(nx as u32, ny as u32)?;
        if z == 0 {
            img.encoder().write_tag(Tag::ImageDescription, desc.as_str())?;
        }
        if let Some(vs) = vol.voxel_size {
            img.resolution_unit(ResolutionUnit::None);
            img.x_resolution(resolution(1.0 / vs[2]));
            img.y_resolution(resolution(1.0 / vs[1]));
        }
        buf.clear();
        buf.extend(vol.data[z * ny * nx..(z + 1) * ny * nx].iter().map(|&v| conv(v)));
        img.write_data(&buf)?;
    }
    Ok(())
}

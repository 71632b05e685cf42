//! TIFF stacks through the `tiff` crate: multi-page 8/16/32-bit integer and 16/32/64-bit
//! float grayscale (classic TIFF and BigTIFF), ImageJ voxel size and hyperstack
//! metadata; writing float32, uint16 or float16 with ImageJ metadata.
//!
//! Written stacks keep all planes' samples contiguous, before the directories, as ImageJ
//! writes them: ImageJ and tifffile read an `images=N` stack as N back-to-back planes
//! from the first plane's offset (see `write_pages_as`). Values a type cannot hold are
//! refused before writing ([`super::io::check_representable`]).

pub use super::format::to_u16;
use super::format::{OutputDtype, ReadOptions};
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

/// The hyperstack axes a TIFF declares in its ImageDescription (ImageJ `channels=`,
/// `slices=`, `frames=`; OME-XML `SizeC`, `SizeZ`, `SizeT`, `DimensionOrder`) and how its
/// pages are ordered, so that time points and channels are never taken as z planes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeclaredAxes {
    /// Channels stored as separate pages (samples of one pixel are not counted).
    pub channels: usize,
    pub slices: usize,
    pub frames: usize,
    /// Page order, fastest first, as letters of "ZCT".
    pub order: [u8; 3],
    /// "ImageJ", "OME" or "" (no declaration: every page is a z plane).
    pub source: &'static str,
}

impl DeclaredAxes {
    fn plain() -> Self {
        DeclaredAxes {
            channels: 1,
            slices: 0,
            frames: 1,
            order: *b"CZT",
            source: "",
        }
    }

    /// Pages between consecutive (channel, z plane, time point), from the page order
    /// (each axis' stride is the product of the sizes of the faster ones).
    pub(crate) fn strides(&self) -> (usize, usize, usize) {
        let (mut sc, mut sz, mut st, mut stride) = (0, 0, 0, 1);
        for axis in self.order {
            match axis {
                b'C' => sc = stride,
                b'Z' => sz = stride,
                _ => st = stride,
            }
            stride *= match axis {
                b'C' => self.channels,
                b'Z' => self.slices,
                _ => self.frames,
            }
            .max(1);
        }
        (sc, sz, st)
    }

    /// The (channel, time point) of page `page`.
    fn channel_and_time(&self, page: usize) -> (usize, usize) {
        let slices = self.slices.max(1);
        let (mut c, mut t, mut stride) = (0, 0, 1);
        for axis in self.order {
            let n = match axis {
                b'C' => self.channels,
                b'Z' => slices,
                _ => self.frames,
            }
            .max(1);
            let i = (page / stride) % n;
            match axis {
                b'C' => c = i,
                b'T' => t = i,
                _ => {}
            }
            stride *= n;
        }
        (c, t)
    }
}

fn xml_attr(elem: &str, name: &str) -> Option<usize> {
    let key = format!(" {name}=\"");
    let i = elem.find(&key)? + key.len();
    elem[i..].split('"').next()?.trim().parse().ok()
}

/// Reads the declared axes from an ImageDescription; `spp` samples per pixel (OME counts
/// interleaved samples in SizeC).
pub fn tiff_axes(desc: Option<&str>, spp: usize) -> DeclaredAxes {
    let Some(desc) = desc else {
        return DeclaredAxes::plain();
    };
    if let Some(m) = parse_imagej(desc) {
        // ImageJ pages: channel fastest, then z, then time
        let (channels, frames) = (m.channels.unwrap_or(1).max(1), m.frames.unwrap_or(1).max(1));
        return DeclaredAxes {
            channels,
            slices: m.slices.or(m.images.map(|n| n / (channels * frames))).unwrap_or(0),
            frames,
            order: *b"CZT",
            source: "ImageJ",
        };
    }
    if desc.contains("<OME") {
        if let Some(start) = desc.find("<Pixels ") {
            let elem = &desc[start..start + desc[start..].find('>').unwrap_or(desc.len() - start)];
            let size_c = xml_attr(elem, "SizeC").unwrap_or(1).max(1);
            let order = elem
                .find(" DimensionOrder=\"XY")
                .map(|i| &elem[i + " DimensionOrder=\"XY".len()..])
                .and_then(|r| r.get(..3))
                .map(|o| o.as_bytes().try_into().unwrap_or(*b"ZCT"))
                .filter(|o: &[u8; 3]| {
                    let mut v = o.to_vec();
                    v.sort();
                    v == b"CTZ"
                })
                .unwrap_or(*b"ZCT");
            return DeclaredAxes {
                channels: if spp > 1 { (size_c / spp).max(1) } else { size_c },
                slices: xml_attr(elem, "SizeZ").unwrap_or(0),
                frames: xml_attr(elem, "SizeT").unwrap_or(1).max(1),
                order,
                source: "OME",
            };
        }
    }
    DeclaredAxes::plain()
}

/// Bytes of memory reading may use: what /proc/meminfo says is available (elsewhere, or
/// when unreadable, 64 GiB), so that a header declaring absurd sizes is an error, not an
/// allocation abort.
pub fn memory_budget() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            let line = s.lines().find(|l| l.starts_with("MemAvailable:"))?.to_string();
            line.split_whitespace().nth(1)?.parse::<u64>().ok()
        })
        .map(|kb| kb * 1024)
        .unwrap_or(64 << 30)
}

/// Refuses a page whose declared size cannot be in the file (`file_len` bytes; compressed
/// data may expand, by at most `MAX_EXPANSION` here) or would not fit in memory together
/// with the `kept_bytes` already read, before anything is allocated.
pub fn check_declared_size(
    path: &Path,
    page: usize,
    dims: (u64, u64),
    samples: u64,
    bits: u64,
    compressed: bool,
    file_len: u64,
    kept_bytes: u64,
) -> Result<()> {
    /// Deflate's and LZW's worst-case ratios are about 1000 and 2700.
    const MAX_EXPANSION: u64 = 4096;
    let (w, h) = dims;
    let stored = (w as u128) * (h as u128) * (samples as u128) * (bits.max(1) as u128) / 8;
    let limit = file_len as u128 * if compressed { MAX_EXPANSION as u128 } else { 1 };
    if stored > limit {
        return Err(Error::format(
            path,
            format!(
                "page {page} declares {h}×{w} pixels of {samples}×{bits} bits ({}) but the file holds {file_len} bytes: \
                 it is truncated or corrupt",
                human_bytes(stored)
            ),
        ));
    }
    let budget = memory_budget() as u128;
    let need = stored + (w as u128) * (h as u128) * 4 + kept_bytes as u128;
    if need > budget {
        return Err(Error::invalid(format!(
            "{}: page {page} ({h}×{w}) needs {} with the {} read before it, more than the {} of memory available; \
             read a smaller region (crop the stack) or use a machine with more memory",
            path.display(),
            human_bytes(need),
            human_bytes(kept_bytes as u128),
            human_bytes(budget)
        )));
    }
    Ok(())
}

fn human_bytes(b: u128) -> String {
    let g = b as f64 / (1u64 << 30) as f64;
    if g >= 1.0 {
        format!("{g:.1} GiB")
    } else {
        format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64)
    }
}

/// Which channel and time point to keep of a stack with `axes` (and `spp` samples per
/// pixel): (sample index within a pixel, page channel, page time point), or an error
/// naming the option that picks one.
pub(crate) fn choose_channel_and_time(
    path: &Path,
    axes: &DeclaredAxes,
    spp: usize,
    opts: &ReadOptions,
) -> Result<(usize, usize, usize)> {
    let pick = |what: &str, n: usize, given: Option<usize>, option: &str| -> Result<usize> {
        match given {
            None if n > 1 => Err(Error::invalid(format!(
                "{}: the {} stack has {n} {what}s; RLN takes one 3D stack: choose one with {option} 0..{}",
                path.display(),
                if axes.source.is_empty() { "TIFF" } else { axes.source },
                n - 1
            ))),
            Some(c) if c >= n.max(1) => Err(Error::invalid(format!(
                "{}: {what} {c} does not exist ({option} counts from 0; the stack has {n} {what}{})",
                path.display(),
                if n == 1 { "" } else { "s" }
            ))),
            given => Ok(given.unwrap_or(0)),
        }
    };
    if spp > 1 && axes.channels > 1 {
        return Err(Error::invalid(format!(
            "{}: both {} channels and multi-sample pixels; split the channels first",
            path.display(),
            axes.source
        )));
    }
    let (sample, channel) = if spp > 1 {
        if opts.channel.is_none() {
            return Err(Error::invalid(format!(
                "{}: image has {spp} samples per pixel (RGB or multi-channel); choose one with --channel 0..{}",
                path.display(),
                spp - 1
            )));
        }
        (pick("channel", spp, opts.channel, "--channel")?, 0)
    } else {
        (0, pick("channel", axes.channels, opts.channel, "--channel")?)
    };
    let time = pick("time point", axes.frames, opts.time, "--time")?;
    Ok((sample, channel, time))
}

/// The tiff crate's limits: buffers within the memory budget, tag values within the
/// file (a corrupt count then fails as an error instead of a huge allocation).
fn read_limits(file_len: u64) -> Limits {
    let budget = usize::try_from(memory_budget()).unwrap_or(usize::MAX);
    let mut l = Limits::unlimited();
    l.decoding_buffer_size = budget;
    l.intermediate_buffer_size = budget;
    l.ifd_value_size = usize::try_from(file_len.saturating_mul(8).saturating_add(1 << 20)).unwrap_or(usize::MAX);
    l
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
        .with_limits(read_limits(file_len));
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

    let axes = tiff_axes(desc.as_deref(), spp);
    let (sample_channel, page_channel, page_time) = choose_channel_and_time(path, &axes, spp, opts)?;
    let selects_pages = axes.channels > 1 || axes.frames > 1;
    let bits: u64 = dec
        .find_tag_unsigned::<u16>(Tag::BitsPerSample)
        .ok()
        .flatten()
        .unwrap_or(8) as u64;
    let compressed = dec
        .find_tag_unsigned::<u16>(Tag::Compression)
        .ok()
        .flatten()
        .unwrap_or(1)
        != 1;

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
        let keep = !selects_pages || axes.channel_and_time(page) == (page_channel, page_time);
        if keep {
            check_declared_size(
                path,
                page,
                (w as u64, h as u64),
                spp as u64,
                bits,
                compressed,
                file_len,
                data.len() as u64 * 4,
            )?;
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
            if selects_pages || spp > 1 {
                return Err(Error::invalid(format!(
                    "{}: multi-channel contiguous ImageJ stacks are not supported",
                    path.display()
                )));
            }
            let extra = read_imagej_contiguous(path, &mut dec, w, h, n, spp)?;
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
    let first = *offsets
        .first()
        .ok_or_else(|| Error::format(path, "page 0 has no strip offsets"))?;
    let start = first.saturating_add(plane as u64);
    let declared = (plane as u128) * (n as u128 - 1);
    let file_len = std::fs::metadata(path).map_err(|e| Error::io(path, e))?.len();
    if start as u128 + declared > file_len as u128 {
        return Err(Error::format(
            path,
            format!("file is truncated: ImageJ says {n} planes of {plane} bytes but the file holds {file_len} bytes"),
        ));
    }
    check_declared_size(
        path,
        1,
        (w as u64, h as u64 * (n as u64 - 1)),
        1,
        bits as u64,
        false,
        file_len,
        0,
    )?;
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

/// Writes the stack the way ImageJ does: all planes' samples first, contiguous and in z
/// order (one strip per plane), then one directory per plane pointing into that block.
///
/// Why: ImageJ (and Fiji) read a stack whose first directory says `images=N` from the
/// first plane's offset as N back-to-back planes and ignore the other directories, and
/// tifffile does the same whenever the second directory lies beyond N planes' bytes
/// (always for 2 planes, or for planes smaller than a directory). Planes interleaved with
/// directories were read there as garbage (±3e38, NaN for thin volumes).
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
    let plane = ny * nx;
    let plane_bytes = (plane * std::mem::size_of::<C::Inner>()) as u64;
    let mut buf: Vec<C::Inner> = Vec::with_capacity(plane);
    let sample_format: Vec<u16> = C::SAMPLE_FORMAT.iter().map(|s| s.to_u16()).collect();
    let mut data_start = 0u64;
    for z in 0..nz {
        let mut dir = enc.image_directory()?;
        if z == 0 {
            // the data block first, so that no directory or tag value lands inside it
            for p in 0..nz {
                buf.clear();
                buf.extend(vol.data[p * plane..(p + 1) * plane].iter().map(|&v| conv(v)));
                let off = dir.write_data(&buf[..])?;
                if p == 0 {
                    data_start = off;
                }
            }
            dir.write_tag(Tag::ImageDescription, desc.as_str())?;
        }
        dir.write_tag(Tag::ImageWidth, nx as u32)?;
        dir.write_tag(Tag::ImageLength, ny as u32)?;
        dir.write_tag(Tag::BitsPerSample, C::BITS_PER_SAMPLE)?;
        dir.write_tag(Tag::Compression, tiff::tags::CompressionMethod::None.to_u16())?;
        dir.write_tag(Tag::PhotometricInterpretation, C::TIFF_VALUE.to_u16())?;
        dir.write_tag(
            Tag::StripOffsets,
            K::convert_offset(data_start + z as u64 * plane_bytes)?,
        )?;
        dir.write_tag(Tag::SamplesPerPixel, C::BITS_PER_SAMPLE.len() as u16)?;
        dir.write_tag(Tag::RowsPerStrip, ny as u32)?;
        dir.write_tag(Tag::StripByteCounts, K::convert_offset(plane_bytes)?)?;
        dir.write_tag(Tag::SampleFormat, &sample_format[..])?;
        if let Some(vs) = vol.voxel_size {
            dir.write_tag(Tag::XResolution, resolution(1.0 / vs[2]))?;
            dir.write_tag(Tag::YResolution, resolution(1.0 / vs[1]))?;
            dir.write_tag(Tag::ResolutionUnit, ResolutionUnit::None.to_u16())?;
        }
        dir.finish()?;
    }
    Ok(())
}

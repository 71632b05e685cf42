//! TIFF/BigTIFF stacks as streams: a reader that decodes only the pages a region needs
//! (and, where a page is stored in several strips, only the strips of the region's rows),
//! through a small bounded cache; and a writer that takes regions in any order but writes
//! pages in z order, holding only the planes not yet complete.
//!
//! The reader checks every page's declared size against the file's length before it
//! allocates anything, so a corrupt header declaring huge pages is an error, never an
//! allocation abort. ImageJ stacks over 4 GB (one directory followed by contiguous planes)
//! are read by seeking to the rows needed. Hyperstacks (ImageJ or OME-XML channels and
//! time points as pages, in any page order; RGB samples) stream too: the chosen channel
//! and time point are every `page_stride`-th page, with the axis rules of the whole-file
//! reader (`tiff_io::choose_channel_and_time`), and tests check both readers agree.

use super::{check_region_finite, Region, VolumeInfo, VolumeReader, VolumeWriter, WriterSpec};
use crate::error::{Error, Result};
use crate::fsutil::{check_output_dir, temp_path_for};
use crate::imaging::format::{OutputDtype, ReadOptions};
use crate::imaging::tiff_io::{
    choose_channel_and_time, decoded_len, page_to_f32, parse_imagej, rational, resolution, tiff_axes, tiff_err, to_u16,
    unit_to_micron,
};
use crate::imaging::volume::check_voxel_size;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use tiff::decoder::{ChunkType, Decoder, Limits};
use tiff::tags::Tag;

/// Planes (or their strip bands) the read cache holds when [`ReadOptions::cache_planes`]
/// does not say: enough for a slab of chunk depth when converting, small beside a plane
/// of the paper's 46 Mvoxel.
pub const DEFAULT_CACHE_PLANES: usize = 16;

/// Largest decompression ratio a page's declared size may imply against the file's
/// length (Deflate cannot exceed ~1032:1; LZW and PackBits are far below).
const MAX_COMPRESSION_RATIO: u64 = 1100;

/// What a reader decoded so far (tests check the cache bound with it).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TiffReadStats {
    /// Strip bands (or whole pages, where a page is one band) decoded.
    pub bands_decoded: u64,
    /// Rows decoded, summed over bands; `rows_decoded / H` is the planes' worth decoded.
    pub rows_decoded: u64,
    /// The most voxels the cache held at once.
    pub peak_cached_voxels: usize,
}

/// A band-of-rows cache bounded in voxels, least recently used out first.
pub(crate) struct BandCache {
    map: HashMap<(usize, usize), Arc<Vec<f32>>>,
    order: VecDeque<(usize, usize)>,
    voxels: usize,
    capacity: usize,
    peak: Arc<AtomicUsize>,
}

impl BandCache {
    pub(crate) fn new(capacity_voxels: usize) -> Self {
        BandCache {
            map: HashMap::new(),
            order: VecDeque::new(),
            voxels: 0,
            capacity: capacity_voxels,
            peak: Arc::new(AtomicUsize::new(0)),
        }
    }
    pub(crate) fn get(&mut self, key: (usize, usize)) -> Option<Arc<Vec<f32>>> {
        let v = self.map.get(&key)?.clone();
        if let Some(i) = self.order.iter().position(|k| *k == key) {
            self.order.remove(i);
            self.order.push_back(key);
        }
        Some(v)
    }
    pub(crate) fn insert(&mut self, key: (usize, usize), band: Arc<Vec<f32>>) {
        if band.len() > self.capacity || self.map.contains_key(&key) {
            return;
        }
        while self.voxels + band.len() > self.capacity {
            let Some(old) = self.order.pop_front() else { break };
            if let Some(b) = self.map.remove(&old) {
                self.voxels -= b.len();
            }
        }
        self.voxels += band.len();
        self.order.push_back(key);
        self.map.insert(key, band);
        self.peak.fetch_max(self.voxels, Ordering::Relaxed);
    }
}

/// How the pages of a file are laid out.
#[derive(Clone, Copy, Debug)]
enum Layout {
    /// One directory per page; a page is decoded in bands of `band_rows` rows (its strips),
    /// or whole (`band_rows == H`, also for tiled pages).
    Pages { band_rows: usize },
    /// ImageJ's over-4-GB layout: uncompressed planes one after another from `offset`.
    Contiguous {
        offset: u64,
        bits: usize,
        float: bool,
        little: bool,
    },
}

type FileDecoder = Decoder<std::io::BufReader<File>>;

/// A TIFF/BigTIFF stack read by regions (see the module docs).
pub struct TiffReader {
    path: PathBuf,
    info: VolumeInfo,
    file_len: u64,
    layout: Layout,
    /// The pages of the (channel, time point) kept: z plane z is page
    /// `page_base + z · page_stride`.
    page_stride: usize,
    page_base: usize,
    /// Samples per pixel and the one kept.
    spp: usize,
    sample_channel: usize,
    /// Bytes per decoded sample.
    sample_bytes: usize,
    check_finite: bool,
    limits_bytes: usize,
    decoders: Mutex<Vec<FileDecoder>>,
    /// Pages whose strip offsets and byte counts were checked against the file length.
    checked_pages: Mutex<std::collections::HashSet<usize>>,
    cache: Mutex<BandCache>,
    peak_cached: Arc<AtomicUsize>,
    bands_decoded: AtomicU64,
    rows_decoded: AtomicU64,
}

fn open_decoder(path: &Path, limits_bytes: usize) -> Result<FileDecoder> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let mut limits = Limits::default();
    limits.decoding_buffer_size = limits_bytes;
    limits.intermediate_buffer_size = limits_bytes.max(1 << 20);
    limits.ifd_value_size = 256 << 20;
    Ok(Decoder::new(std::io::BufReader::with_capacity(1 << 20, file))
        .map_err(|e| tiff_err(path, "not a readable TIFF", e))?
        .with_limits(limits))
}

impl TiffReader {
    /// Opens `path`, walks its page directories (reading no image data) and checks that
    /// the first page's declared size fits the file.
    pub fn open(path: &Path, opts: &ReadOptions) -> Result<Self> {
        let file_len = std::fs::metadata(path).map_err(|e| Error::io(path, e))?.len();
        if file_len == 0 {
            return Err(Error::format(path, "file is empty"));
        }
        // directories only: data buffers are limited once the page size is known
        let mut dec = open_decoder(path, 1 << 20)?;
        let (w, h) = dec.dimensions().map_err(|e| tiff_err(path, "first page", e))?;
        let (w, h) = (w as usize, h as usize);
        let desc = dec.get_tag_ascii_string(Tag::ImageDescription).ok();
        let ij = desc.as_deref().and_then(parse_imagej);
        let xres = rational(dec.find_tag(Tag::XResolution).ok().flatten());
        let yres = rational(dec.find_tag(Tag::YResolution).ok().flatten());
        let res_unit: Option<u16> = dec.find_tag_unsigned(Tag::ResolutionUnit).ok().flatten();
        // the first value: BitsPerSample and SampleFormat hold one per sample (RGB: three)
        let tag_u16 = |dec: &mut FileDecoder, t: Tag, default: u16| {
            dec.find_tag(t)
                .ok()
                .flatten()
                .and_then(|v| v.into_u16_vec().ok())
                .and_then(|v| v.first().copied())
                .unwrap_or(default)
        };
        let spp = tag_u16(&mut dec, Tag::SamplesPerPixel, 1).max(1) as usize;
        let bits = tag_u16(&mut dec, Tag::BitsPerSample, 1) as usize;
        let sample_format = tag_u16(&mut dec, Tag::SampleFormat, 1);
        let compression = tag_u16(&mut dec, Tag::Compression, 1);
        let planar = tag_u16(&mut dec, Tag::PlanarConfiguration, 1);
        if !matches!(bits, 8 | 16 | 32 | 64) {
            return Err(Error::format(
                path,
                format!("{bits}-bit samples are not supported (8, 16, 32 or 64 bits)"),
            ));
        }
        if spp > 1 && planar == 2 {
            return Err(Error::format(
                path,
                "planar multi-sample pages cannot be streamed; save one channel per file (e.g. Fiji: Image > Color > Split Channels)",
            ));
        }
        let sample_bytes = bits / 8;
        let dtype = match (sample_format, bits) {
            (3, b) => format!("f{b}"),
            (2, b) => format!("i{b}"),
            (_, b) => format!("u{b}"),
        };

        // ImageJ/OME channels and time points are pages of their own: the (channel, time
        // point) chosen is every page `page_base + z · page_stride`
        let axes = tiff_axes(desc.as_deref(), spp);
        let (sample_channel, page_channel, page_time) = choose_channel_and_time(path, &axes, spp, opts)?;

        // the declared page size against the file before anything of that size exists
        let page_bytes = (w as u128) * (h as u128) * (spp as u128) * (sample_bytes as u128);
        let bound = if compression == 1 {
            file_len as u128
        } else {
            file_len as u128 * MAX_COMPRESSION_RATIO as u128
        };
        if page_bytes == 0 || page_bytes > bound {
            return Err(Error::format(
                path,
                format!(
                    "page 0 declares {w}×{h} pixels of {spp}×{bits} bits ({page_bytes} bytes){} but the file holds only {file_len} bytes: \
                     the file is truncated or its header is corrupt",
                    if compression == 1 { "" } else { ", compressed" }
                ),
            ));
        }
        let band_rows = match dec.get_chunk_type() {
            ChunkType::Strip => (dec.chunk_dimensions().1 as usize).clamp(1, h),
            ChunkType::Tile => h,
        };
        check_page_chunks(path, &mut dec, 0, file_len)?;

        let mut pages = 1usize;
        while dec.more_images() {
            dec.next_image()
                .map_err(|e| tiff_err(path, &format!("page {pages}"), e))?;
            let (pw, ph) = dec
                .dimensions()
                .map_err(|e| tiff_err(path, &format!("page {pages}"), e))?;
            if (pw as usize, ph as usize) != (w, h) {
                return Err(Error::format(
                    path,
                    format!("page {pages} is {ph}×{pw} but page 0 is {h}×{w}; a stack needs pages of one size"),
                ));
            }
            pages += 1;
        }
        let mut layout = Layout::Pages { band_rows };
        let (sc, page_stride, st) = axes.strides();
        let others = axes.channels * axes.frames;
        let mut nz = if axes.slices > 0 { axes.slices } else { pages / others };
        let page_base = page_channel * sc + page_time * st;
        if pages == 1 {
            if let Some(n) = ij.as_ref().and_then(|m| m.images).filter(|&n| n > 1) {
                if others > 1 || spp > 1 || compression != 1 {
                    return Err(Error::format(
                        path,
                        "contiguous ImageJ stacks must be uncompressed single-channel grayscale of one time point",
                    ));
                }
                dec.seek_to_image(0).map_err(|e| tiff_err(path, "page 0", e))?;
                let offset = dec
                    .get_tag_u64_vec(Tag::StripOffsets)
                    .map_err(|e| tiff_err(path, "strip offsets", e))?[0];
                let need = offset as u128 + n as u128 * (w * h * sample_bytes) as u128;
                if need > file_len as u128 {
                    return Err(Error::format(
                        path,
                        format!("file is truncated: ImageJ says {n} planes of {h}×{w}×{bits} bits ({need} bytes), the file has {file_len}"),
                    ));
                }
                let mut order = [0u8; 2];
                read_exact_at(&File::open(path).map_err(|e| Error::io(path, e))?, &mut order, 0)
                    .map_err(|e| Error::io(path, e))?;
                let little = &order == b"II";
                layout = Layout::Contiguous {
                    offset,
                    bits,
                    float: sample_format == 3,
                    little,
                };
                nz = n;
            }
        }
        if matches!(layout, Layout::Pages { .. }) && (nz == 0 || page_base + (nz - 1) * page_stride >= pages) {
            return Err(Error::format(
                path,
                format!(
                    "{pages} pages do not hold the {} stack's {} channel(s) × {nz} z plane(s) × {} time point(s)",
                    axes.source, axes.channels, axes.frames
                ),
            ));
        }
        if nz <= 1 && !opts.allow_2d {
            return Err(Error::invalid(format!(
                "{}: input is 2D ({h}×{w}); RLN needs a 3D stack (a multi-page TIFF, a folder of slices, an HDF5 dataset or an OME-Zarr store)",
                path.display()
            )));
        }

        // voxel size: X/YResolution are pixels per unit; ImageJ keeps the unit and the z spacing in its description
        let factor = match ij.as_ref().and_then(|m| m.unit.as_deref()) {
            Some(u) => unit_to_micron(u),
            None => match res_unit {
                Some(2) => Some(25_400.0),
                Some(3) => Some(1e4),
                _ => None,
            },
        };
        let mut voxel_size = None;
        if let (Some(f), Some(xr), Some(yr)) = (factor, xres, yres) {
            let dz = ij.as_ref().and_then(|m| m.spacing).unwrap_or(1.0);
            let vs = [dz * f, f / yr, f / xr];
            check_voxel_size(Some(vs), &path.display().to_string())?;
            voxel_size = Some(vs);
        }
        let metadata = ij.and_then(|m| m.rln_metadata).map(|s| s.replace("\\u003d", "="));
        let band = match layout {
            Layout::Pages { band_rows } => band_rows,
            Layout::Contiguous { .. } => 1,
        };
        let limits_bytes = w * band * spp * sample_bytes + 4096;
        let cache_planes = opts.cache_planes.unwrap_or(DEFAULT_CACHE_PLANES).max(1);
        let cache = BandCache::new(cache_planes.saturating_mul(w * h).max(w * band));
        let peak_cached = cache.peak.clone();
        let dec = open_decoder(path, limits_bytes)?;
        Ok(TiffReader {
            path: path.to_path_buf(),
            info: VolumeInfo {
                dims: [nz, h, w],
                voxel_size,
                dtype,
                metadata,
            },
            file_len,
            layout,
            page_stride,
            page_base,
            spp,
            sample_channel,
            sample_bytes,
            check_finite: opts.check_finite,
            limits_bytes,
            decoders: Mutex::new(vec![dec]),
            checked_pages: Mutex::new([0].into_iter().collect()),
            cache: Mutex::new(cache),
            peak_cached,
            bands_decoded: AtomicU64::new(0),
            rows_decoded: AtomicU64::new(0),
        })
    }

    pub fn stats(&self) -> TiffReadStats {
        TiffReadStats {
            bands_decoded: self.bands_decoded.load(Ordering::Relaxed),
            rows_decoded: self.rows_decoded.load(Ordering::Relaxed),
            peak_cached_voxels: self.peak_cached.load(Ordering::Relaxed),
        }
    }

    /// Rows per decoded band (a page's strip height; H for single-strip or tiled pages).
    pub fn band_rows(&self) -> usize {
        match self.layout {
            Layout::Pages { band_rows } => band_rows,
            Layout::Contiguous { .. } => self.info.dims[1],
        }
    }

    /// Band `band` of plane `z`, from the cache or decoded.
    fn band(&self, z: usize, band: usize) -> Result<Arc<Vec<f32>>> {
        if let Some(b) = self.cache.lock().unwrap_or_else(|e| e.into_inner()).get((z, band)) {
            return Ok(b);
        }
        let data = Arc::new(self.decode_band(z, band)?);
        self.cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert((z, band), data.clone());
        Ok(data)
    }

    fn decode_band(&self, z: usize, band: usize) -> Result<Vec<f32>> {
        let [_, h, w] = self.info.dims;
        let Layout::Pages { band_rows } = self.layout else {
            unreachable!("contiguous stacks are read without bands")
        };
        let page = self.page_base + z * self.page_stride;
        let rows = band_rows.min(h - band * band_rows);
        let mut dec = match self.decoders.lock().unwrap_or_else(|e| e.into_inner()).pop() {
            Some(d) => d,
            None => open_decoder(&self.path, self.limits_bytes)?,
        };
        let what = format!("page {page}");
        dec.seek_to_image(page).map_err(|e| tiff_err(&self.path, &what, e))?;
        if !self
            .checked_pages
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&page)
        {
            check_page_chunks(&self.path, &mut dec, page, self.file_len)?;
            self.checked_pages
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(page);
        }
        let img = if band_rows == h {
            dec.read_image()
        } else {
            dec.read_chunk(band as u32)
        }
        .map_err(|e| tiff_err(&self.path, &what, e))?;
        let n = decoded_len(&img);
        if n != w * rows * self.spp {
            return Err(Error::format(
                &self.path,
                format!(
                    "{what}: band {band} holds {n} samples, expected {}",
                    w * rows * self.spp
                ),
            ));
        }
        let mut out = Vec::with_capacity(w * rows);
        page_to_f32(img, self.spp, self.sample_channel, &mut out);
        self.decoders.lock().unwrap_or_else(|e| e.into_inner()).push(dec);
        self.bands_decoded.fetch_add(1, Ordering::Relaxed);
        self.rows_decoded.fetch_add(rows as u64, Ordering::Relaxed);
        Ok(out)
    }

    /// Rows `y0..y0+ny`, columns `x0..x0+nx` of plane `z` of a contiguous ImageJ stack.
    fn read_contiguous(
        &self,
        z: usize,
        y0: usize,
        ny: usize,
        x0: usize,
        nx: usize,
        dst: &mut [f32],
        dst_stride: usize,
    ) -> Result<()> {
        let Layout::Contiguous {
            offset,
            bits,
            float,
            little,
        } = self.layout
        else {
            unreachable!()
        };
        let [_, h, w] = self.info.dims;
        let b = self.sample_bytes;
        let mut raw = vec![0u8; w * b];
        let file = File::open(&self.path).map_err(|e| Error::io(&self.path, e))?;
        for r in 0..ny {
            let at = offset + (((z * h) + y0 + r) * w * b) as u64;
            read_exact_at(&file, &mut raw, at).map_err(|e| Error::io(&self.path, e))?;
            let row = &mut dst[r * dst_stride..r * dst_stride + nx];
            for (i, v) in row.iter_mut().enumerate() {
                let c = &raw[(x0 + i) * b..(x0 + i + 1) * b];
                *v = match (bits, float) {
                    (8, _) => c[0] as f32,
                    (16, f) => {
                        let u = if little {
                            u16::from_le_bytes([c[0], c[1]])
                        } else {
                            u16::from_be_bytes([c[0], c[1]])
                        };
                        if f {
                            half::f16::from_bits(u).to_f32()
                        } else {
                            u as f32
                        }
                    }
                    (32, f) => {
                        let a = [c[0], c[1], c[2], c[3]];
                        let u = if little {
                            u32::from_le_bytes(a)
                        } else {
                            u32::from_be_bytes(a)
                        };
                        if f {
                            f32::from_bits(u)
                        } else {
                            u as f32
                        }
                    }
                    _ => {
                        return Err(Error::format(
                            &self.path,
                            format!("contiguous ImageJ stack of {bits}-bit samples is not supported"),
                        ))
                    }
                };
            }
        }
        self.rows_decoded.fetch_add(ny as u64, Ordering::Relaxed);
        Ok(())
    }
}

fn read_exact_at(file: &File, buf: &mut [u8], at: u64) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        std::os::unix::fs::FileExt::read_exact_at(file, buf, at)
    }
    #[cfg(not(unix))]
    {
        use std::io::Read;
        let mut f = file.try_clone()?;
        f.seek(SeekFrom::Start(at))?;
        f.read_exact(buf)
    }
}

/// Checks the current page's strip/tile offsets and byte counts against the file length.
fn check_page_chunks(path: &Path, dec: &mut FileDecoder, page: usize, file_len: u64) -> Result<()> {
    let (off_tag, cnt_tag) = match dec.get_chunk_type() {
        ChunkType::Strip => (Tag::StripOffsets, Tag::StripByteCounts),
        ChunkType::Tile => (Tag::TileOffsets, Tag::TileByteCounts),
    };
    let offsets = dec
        .get_tag_u64_vec(off_tag)
        .map_err(|e| tiff_err(path, &format!("page {page} offsets"), e))?;
    let counts = dec
        .get_tag_u64_vec(cnt_tag)
        .map_err(|e| tiff_err(path, &format!("page {page} byte counts"), e))?;
    let mut total: u128 = 0;
    for (o, c) in offsets.iter().zip(&counts) {
        if (*o as u128) + (*c as u128) > file_len as u128 {
            return Err(Error::format(
                path,
                format!("page {page} declares data at bytes {o}..{} but the file holds only {file_len} bytes: it is truncated or corrupt", *o as u128 + *c as u128),
            ));
        }
        total += *c as u128;
    }
    if total > file_len as u128 {
        return Err(Error::format(
            path,
            format!("page {page} declares {total} bytes of data, more than the file's {file_len}"),
        ));
    }
    Ok(())
}

impl VolumeReader for TiffReader {
    fn info(&self) -> &VolumeInfo {
        &self.info
    }
    fn read_unit(&self) -> [usize; 3] {
        [1, self.band_rows(), self.info.dims[2]]
    }
    fn read_region(&self, region: Region, dst: &mut [f32]) -> Result<()> {
        region.check_buffer(self.info.dims, dst.len(), &self.path.display().to_string())?;
        let [rz, ry, rx] = region.shape;
        let [z0, y0, x0] = region.start;
        let w = self.info.dims[2];
        for dz in 0..rz {
            let z = z0 + dz;
            let plane = &mut dst[dz * ry * rx..(dz + 1) * ry * rx];
            if let Layout::Contiguous { .. } = self.layout {
                self.read_contiguous(z, y0, ry, x0, rx, plane, rx)?;
                continue;
            }
            let br = self.band_rows();
            for band in y0 / br..=(y0 + ry - 1) / br {
                let data = self.band(z, band)?;
                let lo = (band * br).max(y0);
                let hi = ((band + 1) * br).min(y0 + ry);
                for y in lo..hi {
                    let s = (y - band * br) * w + x0;
                    plane[(y - y0) * rx..(y - y0 + 1) * rx].copy_from_slice(&data[s..s + rx]);
                }
            }
        }
        if self.check_finite {
            check_region_finite(dst, region, &self.path.display().to_string())?;
        }
        Ok(())
    }
}

/// A plane some of whose voxels have arrived.
struct PendingPlane {
    data: Vec<f32>,
    filled: usize,
}

struct WriterState {
    next_z: usize,
    pending: BTreeMap<usize, PendingPlane>,
    peak_pending: usize,
    /// A write failed: the file is incomplete and `finish` must refuse it.
    failed: bool,
}

/// Writes a TIFF stack (ImageJ-compatible; BigTIFF when large) under a temporary name,
/// renamed into place by [`VolumeWriter::finish`].
///
/// Layout: the header, then every plane's samples back to back in z order, then the
/// page directories. ImageJ (and tifffile for `images=N` files) read an ImageJ stack as
/// N contiguous planes from the first page's offset, whatever the other directories say;
/// directories interleaved with the planes made them read garbage (issue 14, thin
/// volumes). Planes are written as soon as they and all planes before them are
/// complete, the directories (a few hundred bytes each) at `finish`.
pub struct TiffWriter {
    path: PathBuf,
    tmp: PathBuf,
    file: File,
    spec: WriterSpec,
    description: String,
    big: bool,
    /// Offset of plane 0's first sample.
    data_start: u64,
    plane_bytes: u64,
    state: Mutex<WriterState>,
    finished: bool,
}

impl TiffWriter {
    /// Creates the temporary file; BigTIFF when the estimated size reaches `bigtiff_threshold`.
    pub fn create(path: &Path, spec: &WriterSpec, bigtiff_threshold: u64) -> Result<Self> {
        super::check_spec(spec, path)?;
        check_output_dir(path)?;
        let [nz, ny, nx] = spec.dims;
        if ny > u32::MAX as usize || nx > u32::MAX as usize {
            return Err(Error::invalid(format!(
                "{}: planes of {ny}×{nx} are too large for TIFF",
                path.display()
            )));
        }
        let plane_bytes = (ny * nx * spec.dtype.bytes()) as u64;
        let estimate = nz as u64 * plane_bytes
            + nz as u64 * 512
            + 64 * 1024
            + spec.metadata.as_ref().map_or(0, |m| m.len() as u64);
        let big = estimate >= bigtiff_threshold;
        if !big && plane_bytes > u32::MAX as u64 {
            return Err(Error::invalid(format!(
                "{}: a plane of {plane_bytes} bytes needs BigTIFF",
                path.display()
            )));
        }
        let tmp = temp_path_for(path);
        let file = File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
        // the header; the first directory's offset is filled in by `finish`
        let header: Vec<u8> = if big {
            [
                &b"II"[..],
                &43u16.to_le_bytes(),
                &8u16.to_le_bytes(),
                &0u16.to_le_bytes(),
                &0u64.to_le_bytes(),
            ]
            .concat()
        } else {
            [&b"II"[..], &42u16.to_le_bytes(), &0u32.to_le_bytes()].concat()
        };
        if let Err(e) = file.write_all_at(&header, 0) {
            let _ = std::fs::remove_file(&tmp);
            return Err(Error::io(&tmp, e));
        }
        let mut description = format!("ImageJ=1.11a\nimages={nz}\nslices={nz}\n");
        if let Some(vs) = spec.voxel_size {
            description += &format!("unit=micron\nspacing={}\n", vs[0]);
        }
        description += "loop=false\n";
        if let Some(m) = &spec.metadata {
            // one line; '=' escaped so that ImageJ-style key=value parsers keep the JSON whole
            description += &format!("rln_metadata={}\n", m.replace('\n', " ").replace('=', "\\u003d"));
        }
        Ok(TiffWriter {
            path: path.to_path_buf(),
            tmp,
            file,
            spec: spec.clone(),
            description,
            big,
            data_start: header.len() as u64,
            plane_bytes,
            state: Mutex::new(WriterState {
                next_z: 0,
                pending: BTreeMap::new(),
                peak_pending: 0,
                failed: false,
            }),
            finished: false,
        })
    }

    /// The most planes that were waiting for their missing voxels at once.
    pub fn peak_pending_planes(&self) -> usize {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).peak_pending
    }

    /// Writes plane `z`'s samples at their place in the contiguous data block.
    fn write_plane(&self, z: usize, plane: &[f32]) -> Result<()> {
        let bytes: Vec<u8> = match self.spec.dtype {
            OutputDtype::F32 => plane.iter().flat_map(|v| v.to_le_bytes()).collect(),
            OutputDtype::U16 => plane.iter().flat_map(|&v| to_u16(v).to_le_bytes()).collect(),
            OutputDtype::F16 => plane
                .iter()
                .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
                .collect(),
        };
        self.file
            .write_all_at(&bytes, self.data_start + z as u64 * self.plane_bytes)
            .map_err(|e| Error::io(&self.tmp, e))
    }

    /// The page directories of all planes, to be written at `pos` (even).
    fn directories(&self, pos: u64) -> Vec<u8> {
        let [nz, ny, nx] = self.spec.dims;
        let (bits, format) = match self.spec.dtype {
            OutputDtype::F32 => (32u16, 3u16),
            OutputDtype::U16 => (16, 1),
            OutputDtype::F16 => (16, 3),
        };
        let short = |v: u16| (3u16, 1u64, v.to_le_bytes().to_vec());
        let long = |v: u32| (4u16, 1u64, v.to_le_bytes().to_vec());
        let offset = |v: u64| {
            if self.big {
                (16u16, 1u64, v.to_le_bytes().to_vec())
            } else {
                (4u16, 1u64, (v as u32).to_le_bytes().to_vec())
            }
        };
        let rational = |r: tiff::encoder::Rational| (5u16, 1u64, [r.n.to_le_bytes(), r.d.to_le_bytes()].concat());
        let (entry_len, inline, count_len) = if self.big { (20u64, 8usize, 8u64) } else { (12, 4, 2) };
        let mut out = Vec::new();
        for z in 0..nz {
            let mut entries: Vec<(u16, (u16, u64, Vec<u8>))> = vec![
                (256, long(nx as u32)),
                (257, long(ny as u32)),
                (258, short(bits)),
                (259, short(1)),
                (262, short(1)),
                (273, offset(self.data_start + z as u64 * self.plane_bytes)),
                (277, short(1)),
                (278, long(ny as u32)),
                (279, offset(self.plane_bytes)),
                (339, short(format)),
            ];
            if z == 0 {
                let mut d = self.description.as_bytes().to_vec();
                d.push(0);
                entries.push((270, (2, d.len() as u64, d)));
            }
            if let Some(vs) = self.spec.voxel_size {
                entries.push((282, rational(resolution(1.0 / vs[2]))));
                entries.push((283, rational(resolution(1.0 / vs[1]))));
                entries.push((296, short(1)));
            }
            entries.sort_by_key(|e| e.0);
            let start = pos + out.len() as u64;
            let table = count_len + entries.len() as u64 * entry_len + if self.big { 8 } else { 4 };
            let mut extra_at = start + table;
            let mut table_bytes = Vec::new();
            let mut extra = Vec::new();
            if self.big {
                table_bytes.extend((entries.len() as u64).to_le_bytes());
            } else {
                table_bytes.extend((entries.len() as u16).to_le_bytes());
            }
            for (tag, (typ, count, value)) in &entries {
                table_bytes.extend(tag.to_le_bytes());
                table_bytes.extend(typ.to_le_bytes());
                if self.big {
                    table_bytes.extend(count.to_le_bytes());
                } else {
                    table_bytes.extend((*count as u32).to_le_bytes());
                }
                if value.len() <= inline {
                    let mut v = value.clone();
                    v.resize(inline, 0);
                    table_bytes.extend(v);
                } else {
                    if self.big {
                        table_bytes.extend(extra_at.to_le_bytes());
                    } else {
                        table_bytes.extend((extra_at as u32).to_le_bytes());
                    }
                    extra.extend(value);
                    if extra.len() % 2 == 1 {
                        extra.push(0);
                    }
                    extra_at = start + table + extra.len() as u64;
                }
            }
            let next = if z + 1 < nz {
                start + table + extra.len() as u64
            } else {
                0
            };
            if self.big {
                table_bytes.extend(next.to_le_bytes());
            } else {
                table_bytes.extend((next as u32).to_le_bytes());
            }
            out.extend(table_bytes);
            out.extend(extra);
        }
        out
    }
}

impl VolumeWriter for TiffWriter {
    fn dims(&self) -> [usize; 3] {
        self.spec.dims
    }
    /// Whole planes; smaller regions are accepted too (in any order), and a page is
    /// written once all its voxels and those of the pages before it have arrived.
    fn write_unit(&self) -> [usize; 3] {
        [1, self.spec.dims[1], self.spec.dims[2]]
    }
    fn write_region(&self, region: Region, data: &[f32]) -> Result<()> {
        super::check_write(
            region,
            data,
            self.spec.dims,
            self.spec.dtype,
            &self.path.display().to_string(),
        )?;
        let [_, ny, nx] = self.spec.dims;
        let [rz, ry, rx] = region.shape;
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if st.failed {
            return Err(Error::invalid(format!(
                "{}: an earlier write failed",
                self.path.display()
            )));
        }
        for dz in 0..rz {
            let z = region.start[0] + dz;
            if z < st.next_z {
                return Err(Error::invalid(format!(
                    "{}: plane {z} was already written",
                    self.path.display()
                )));
            }
            let p = st.pending.entry(z).or_insert_with(|| PendingPlane {
                data: vec![0.0; ny * nx],
                filled: 0,
            });
            for dy in 0..ry {
                let d = (region.start[1] + dy) * nx + region.start[2];
                let s = (dz * ry + dy) * rx;
                p.data[d..d + rx].copy_from_slice(&data[s..s + rx]);
            }
            p.filled += ry * rx;
        }
        st.peak_pending = st.peak_pending.max(st.pending.len());
        while let Some(p) = st.pending.get(&st.next_z) {
            if p.filled < ny * nx {
                break;
            }
            let z = st.next_z;
            let p = st.pending.remove(&z).expect("present");
            if let Err(e) = self.write_plane(z, &p.data) {
                st.failed = true;
                return Err(e);
            }
            st.next_z += 1;
        }
        Ok(())
    }
    fn finish(mut self: Box<Self>) -> Result<()> {
        let st = self.state.get_mut().unwrap_or_else(|e| e.into_inner());
        let nz = self.spec.dims[0];
        if st.failed || st.next_z != nz {
            return Err(Error::invalid(format!(
                "{}: only {} of {nz} planes were complete; nothing was written",
                self.path.display(),
                st.next_z
            )));
        }
        let ifd_pos = self.data_start + nz as u64 * self.plane_bytes;
        let ifd_pos = ifd_pos + ifd_pos % 2;
        if !self.big && ifd_pos > u32::MAX as u64 {
            return Err(Error::invalid(format!(
                "{}: over 4 GB; raise the BigTIFF threshold's estimate",
                self.path.display()
            )));
        }
        let dirs = self.directories(ifd_pos);
        let first: Vec<u8> = if self.big {
            ifd_pos.to_le_bytes().to_vec()
        } else {
            (ifd_pos as u32).to_le_bytes().to_vec()
        };
        let first_at = if self.big { 8 } else { 4 };
        (|| {
            self.file.write_all_at(&dirs, ifd_pos)?;
            self.file.write_all_at(&first, first_at)?;
            self.file.sync_all()
        })()
        .map_err(|e| Error::io(&self.tmp, e))?;
        std::fs::rename(&self.tmp, &self.path).map_err(|e| Error::io(&self.path, e))?;
        self.finished = true;
        Ok(())
    }
}

impl Drop for TiffWriter {
    fn drop(&mut self) {
        if !self.finished {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn band_cache_stays_within_its_bound_and_evicts_least_recent() {
        let mut c = BandCache::new(10);
        for k in 0..5 {
            c.insert((k, 0), Arc::new(vec![k as f32; 4]));
        }
        // 10 voxels hold two bands of 4
        assert_eq!(c.peak.load(Ordering::Relaxed), 8);
        assert!(c.get((4, 0)).is_some() && c.get((3, 0)).is_some() && c.get((2, 0)).is_none());
        c.get((3, 0));
        c.insert((9, 0), Arc::new(vec![0.0; 4]));
        assert!(c.get((3, 0)).is_some() && c.get((4, 0)).is_none());
    }
}

//! Labelled PNG montages of volumes (the demo's and `compare --png`'s panels): one column
//! per volume, its label drawn with the 5×7 bitmap font, central XY and XZ slices.

use crate::error::{Error, Result};
use crate::imaging::normalize::percentiles;
use crate::imaging::volume::Volume;
use std::path::Path;

/// One PNG: each volume's label on top (5×7 bitmap font), its central XY slice below it,
/// its central XZ slice at the bottom (z stretched to the voxel aspect), one column per
/// volume, each scaled to its 0.1–99.9 percentiles.
pub fn write_montage(path: &Path, vols: &[(&str, &Volume)]) -> Result<()> {
    let d = vols[0].1.dims;
    let aspect = vols[0]
        .1
        .voxel_size
        .map(|v| (v[0] / v[1]).clamp(1.0, 8.0))
        .unwrap_or(1.0);
    let zrows = ((d[0] as f64 * aspect).round() as usize).max(1);
    let gap = 4;
    let width = vols.len() * d[2] + (vols.len() - 1) * gap;
    // label strip: text at scale 2 (1 when the panel is too narrow for any), dark on white
    let scale = if d[2] >= 60 { 2 } else { 1 };
    let strip = crate::imaging::bitmap_text::text_height(scale) + 2 * gap;
    let height = strip + d[1] + gap + zrows;
    let mut img = vec![255u8; width * height];
    for (k, (label, _)) in vols.iter().enumerate() {
        let x0 = k * (d[2] + gap);
        crate::imaging::bitmap_text::draw_text(&mut img, width, x0 + 1, gap, x0 + d[2], label, scale, 0);
    }
    for (k, (_, v)) in vols.iter().enumerate() {
        let pv = percentiles(&v.data, &[0.1, 99.9])?;
        let (lo, hi) = (pv[0] as f32, (pv[1] as f32).max(pv[0] as f32 + 1e-12));
        let g = |val: f32| (((val - lo) / (hi - lo)).clamp(0.0, 1.0) * 255.0).round() as u8;
        let x0 = k * (d[2] + gap);
        let zc = d[0] / 2;
        for y in 0..d[1] {
            for x in 0..d[2] {
                img[(strip + y) * width + x0 + x] = g(v.at(zc, y, x));
            }
        }
        let yc = d[1] / 2;
        for r in 0..zrows {
            let z = ((r as f64 + 0.5) / aspect) as usize;
            for x in 0..d[2] {
                img[(strip + d[1] + gap + r) * width + x0 + x] = g(v.at(z.min(d[0] - 1), yc, x));
            }
        }
    }
    crate::fsutil::write_atomic_with(path, |w| {
        let mut enc = png::Encoder::new(w, width as u32, height as u32);
        enc.set_color(png::ColorType::Grayscale);
        enc.set_depth(png::BitDepth::Eight);
        let mut wr = enc.write_header().map_err(|e| Error::invalid(format!("PNG: {e}")))?;
        wr.write_image_data(&img)
            .map_err(|e| Error::invalid(format!("PNG: {e}")))?;
        wr.finish().map_err(|e| Error::invalid(format!("PNG: {e}")))
    })
}

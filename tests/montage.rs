//! The PNG montage of `demo` (and the real-data comparison): every panel is labelled.

use rln_engine::demo::write_montage;
use rln_engine::imaging::bitmap_text::{draw_text, text_height};
use rln_engine::imaging::Volume;

#[test]
fn montage_panels_carry_their_labels() {
    let dims = [8, 70, 64];
    let n: usize = dims.iter().product();
    let a = Volume::new(dims, (0..n).map(|i| (i % 97) as f32).collect()).unwrap();
    let b = Volume::new(dims, (0..n).map(|i| (i % 13) as f32).collect()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.png");
    write_montage(&path, &[("input", &a), ("RLD 12 it.", &b)]).unwrap();
    let dec = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&path).unwrap()));
    let mut r = dec.read_info().unwrap();
    let mut buf = vec![0u8; r.output_buffer_size()];
    let info = r.next_frame(&mut buf).unwrap();
    let (w, h) = (info.width as usize, info.height as usize);
    let gap = 4;
    let strip = text_height(2) + 2 * gap;
    assert_eq!(h, strip + 70 + gap + 8, "label strip above the slices");
    // each panel's strip holds exactly its label, drawn as the font draws it
    for (k, label) in ["input", "RLD 12 it."].iter().enumerate() {
        let x0 = k * (64 + gap);
        let mut want = vec![255u8; w * strip];
        draw_text(&mut want, w, x0 + 1, gap, x0 + 64, label, 2, 0);
        for y in 0..strip {
            for x in x0..x0 + 64 {
                assert_eq!(buf[y * w + x], want[y * w + x], "{label}: pixel ({y}, {x})");
            }
        }
        let dark = (0..strip)
            .flat_map(|y| (x0..x0 + 64).map(move |x| (y, x)))
            .filter(|&(y, x)| buf[y * w + x] == 0)
            .count();
        assert!(dark > 50, "{label}: {dark} dark pixels");
    }
}

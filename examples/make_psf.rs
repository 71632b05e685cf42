use rln_engine::imaging::io::{write_volume, OutputDtype};
use rln_engine::imaging::psf::{generate, GibsonLanni, PsfSpec};
fn main() {
    let spec = PsfSpec::GibsonLanni(GibsonLanni {
        wavelength: 0.52,
        dxy: 0.1,
        dz: 0.2,
        nx: 65,
        nz: 33,
        ..GibsonLanni::default()
    });
    let t = std::time::Instant::now();
    let v = generate(&spec).unwrap();
    eprintln!("{:?} in {:.1}s sum {}", v.dims, t.elapsed().as_secs_f64(), v.sum());
    let c = v.dims.map(|d| d / 2);
    eprintln!(
        "peak {} center {}",
        v.data.iter().cloned().fold(f32::NAN, f32::max),
        v.at(c[0], c[1], c[2])
    );
    write_volume(std::env::args().nth(1).unwrap(), &v, OutputDtype::F32).unwrap();
}

//! `psf`, `synth`, `rl`, `eval`: the imaging toolkit's commands (parsing and printing only;
//! the work is in `rln_engine::imaging`).

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use rln_engine::imaging::metrics::{self, Normalize};
use rln_engine::imaging::psf::{self, ConfocalPsf, GaussianPsf, GibsonLanni, MeasuredOptions, PsfSpec};
use rln_engine::imaging::rl::{BackProjector, Boundary, RlConfig};
use rln_engine::imaging::synth::{self, Family, SynthConfig};
use rln_engine::imaging::{progress, read_volume_with, write_volume, OutputDtype, ReadOptions, Volume};
use std::path::PathBuf;
use std::time::Instant;

/// Parses "A,B,C" (z, y, x) or a single value used for all three.
fn triple<T: std::str::FromStr + Copy>(s: &str) -> Result<[T; 3], String> {
    let v: Vec<T> = s
        .split(',')
        .map(|p| p.trim().parse::<T>().map_err(|_| format!("{p:?} is not a number")))
        .collect::<Result<_, _>>()?;
    match v.len() {
        1 => Ok([v[0]; 3]),
        3 => Ok([v[0], v[1], v[2]]),
        _ => Err(format!("expected Z,Y,X or one value, got {s:?}")),
    }
}
fn triple_usize(s: &str) -> Result<[usize; 3], String> {
    triple(s)
}
fn triple_f64(s: &str) -> Result<[f64; 3], String> {
    triple(s)
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum Dtype {
    F32,
    U16,
    F16,
}
impl From<Dtype> for OutputDtype {
    fn from(d: Dtype) -> Self {
        match d {
            Dtype::F32 => OutputDtype::F32,
            Dtype::U16 => OutputDtype::U16,
            Dtype::F16 => OutputDtype::F16,
        }
    }
}

fn read_opts(channel: Option<usize>, time: Option<usize>) -> ReadOptions {
    ReadOptions {
        channel,
        time,
        ..Default::default()
    }
}

fn vs_str(v: &Volume) -> String {
    match v.voxel_size {
        Some(s) => format!("{}×{}×{} µm", s[0], s[1], s[2]),
        None => "unknown".into(),
    }
}

// ---------------------------------------------------------------- psf

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum PsfModel {
    /// A 3D Gaussian: --fwhm, or the widefield approximation for --na/--wavelength/--ni.
    Gaussian,
    /// Scalar widefield model of Gibson & Lanni (Aguet et al. 2009), psfmodels' parameters.
    GibsonLanni,
    /// Excitation × emission (pinhole-filtered) Gibson–Lanni PSFs.
    Confocal,
}

#[derive(Args, Debug)]
pub struct PsfArgs {
    /// Output file (.tif/.tiff, or .h5[:/dataset] with the hdf5 feature).
    #[arg(short, long)]
    pub output: PathBuf,
    #[arg(long, value_enum, default_value_t = PsfModel::GibsonLanni)]
    pub model: PsfModel,
    /// Regenerate exactly the PSF a model was trained for (recorded in its metadata).
    #[arg(long, value_name = "MODEL", conflicts_with = "measured")]
    pub from_model: Option<PathBuf>,
    /// Clean a measured bead stack instead of computing a model: background subtracted,
    /// centered on its centroid, cropped (--crop), normalized to sum 1.
    #[arg(long, value_name = "BEAD.tif")]
    pub measured: Option<PathBuf>,
    /// Gaussian: full width at half maximum in µm, "Z,Y,X" (or one value).
    #[arg(long, value_parser = triple_f64)]
    pub fwhm: Option<[f64; 3]>,
    /// Numerical aperture [1.4].
    #[arg(long)]
    pub na: Option<f64>,
    /// Emission wavelength in µm [0.6].
    #[arg(long)]
    pub wavelength: Option<f64>,
    /// Confocal: excitation wavelength in µm [0.488].
    #[arg(long, default_value_t = 0.488)]
    pub ex_wavelength: f64,
    /// Confocal: pinhole diameter in Airy units (0: point pinhole; ≥ 50: open).
    #[arg(long, default_value_t = 1.0)]
    pub pinhole: f64,
    /// Sample refractive index [1.47].
    #[arg(long)]
    pub ns: Option<f64>,
    /// Immersion medium index, actual [1.515].
    #[arg(long)]
    pub ni: Option<f64>,
    /// Immersion medium index, design [1.515].
    #[arg(long)]
    pub ni0: Option<f64>,
    /// Coverslip index, actual [1.515].
    #[arg(long)]
    pub ng: Option<f64>,
    /// Coverslip index, design [1.515].
    #[arg(long)]
    pub ng0: Option<f64>,
    /// Coverslip thickness, actual, µm [170].
    #[arg(long)]
    pub tg: Option<f64>,
    /// Coverslip thickness, design, µm [170].
    #[arg(long)]
    pub tg0: Option<f64>,
    /// Working distance (immersion thickness), design, µm [150].
    #[arg(long)]
    pub ti0: Option<f64>,
    /// Depth of the point source above the coverslip, µm [0].
    #[arg(long)]
    pub pz: Option<f64>,
    /// Lateral voxel size, µm [0.05].
    #[arg(long)]
    pub dxy: Option<f64>,
    /// Axial voxel size, µm [0.05].
    #[arg(long)]
    pub dz: Option<f64>,
    /// Lateral size in voxels (nx × nx) [51].
    #[arg(long)]
    pub nx: Option<usize>,
    /// Number of planes [51].
    #[arg(long)]
    pub nz: Option<usize>,
    /// Sub-pixels per pixel and axis for pixel integration [3].
    #[arg(long)]
    pub oversample: Option<usize>,
    /// Measured: background to subtract (default: median of the stack's outer faces).
    #[arg(long)]
    pub background: Option<f32>,
    /// Measured: output size "Z,Y,X" (odd).
    #[arg(long, value_parser = triple_usize)]
    pub crop: Option<[usize; 3]>,
    /// Measured: channel of a multi-channel stack.
    #[arg(long)]
    pub channel: Option<usize>,
    /// Measured: time point of a stack with several (ImageJ frames, OME SizeT).
    #[arg(long)]
    pub time: Option<usize>,
    #[arg(long, value_enum, default_value_t = Dtype::F32)]
    pub dtype: Dtype,
}

fn gibson_lanni_of(a: &PsfArgs) -> GibsonLanni {
    let d = GibsonLanni::default();
    GibsonLanni {
        na: a.na.unwrap_or(d.na),
        wavelength: a.wavelength.unwrap_or(d.wavelength),
        ns: a.ns.unwrap_or(d.ns),
        ni: a.ni.unwrap_or(d.ni),
        ni0: a.ni0.unwrap_or(d.ni0),
        ng: a.ng.unwrap_or(d.ng),
        ng0: a.ng0.unwrap_or(d.ng0),
        tg: a.tg.unwrap_or(d.tg),
        tg0: a.tg0.unwrap_or(d.tg0),
        ti0: a.ti0.unwrap_or(d.ti0),
        pz: a.pz.unwrap_or(d.pz),
        dxy: a.dxy.unwrap_or(d.dxy),
        dz: a.dz.unwrap_or(d.dz),
        nx: a.nx.unwrap_or(d.nx),
        nz: a.nz.unwrap_or(d.nz),
        oversample: a.oversample.unwrap_or(d.oversample),
    }
}

pub fn psf(a: &PsfArgs) -> Result<()> {
    progress::enable(true);
    let mut inputs = Vec::new();
    inputs.extend(a.measured.as_deref().map(|p| ("the bead stack --measured", p)));
    inputs.extend(a.from_model.as_deref().map(|p| ("the model --from-model", p)));
    let out = super::args::Output {
        role: "the output -o",
        path: &a.output,
        extensions: super::args::VOLUME_EXTENSIONS,
    };
    let _guard = super::args::guard_outputs(&[out], &inputs)?;
    let t = Instant::now();
    let vol = if let Some(mp) = &a.from_model {
        let model = rln_engine::model::Model::<f32>::load(mp).with_context(|| format!("loading {}", mp.display()))?;
        rln_engine::compare::model_psf(&model)
            .with_context(|| format!("the PSF of {}", mp.display()))?
            .1
    } else if let Some(bead_path) = &a.measured {
        let bead = read_volume_with(bead_path, &read_opts(a.channel, a.time))?;
        let vs = match (a.dz, a.dxy) {
            (Some(z), Some(xy)) => Some([z, xy, xy]),
            _ => None,
        };
        let opts = MeasuredOptions {
            background: a.background,
            crop: a.crop,
            voxel_size: vs,
            source: Some(bead_path.display().to_string()),
        };
        psf::clean_measured(&bead, &opts).with_context(|| format!("cleaning {}", bead_path.display()))?
    } else {
        let spec = match a.model {
            PsfModel::GibsonLanni => PsfSpec::GibsonLanni(gibson_lanni_of(a)),
            PsfModel::Confocal => PsfSpec::Confocal(ConfocalPsf {
                optics: gibson_lanni_of(a),
                ex_wavelength: a.ex_wavelength,
                pinhole_au: a.pinhole,
            }),
            PsfModel::Gaussian => {
                let gl = gibson_lanni_of(a);
                let vs = [gl.dz, gl.dxy, gl.dxy];
                let shape = match (a.nz, a.nx) {
                    (Some(z), Some(x)) => Some([z, x, x]),
                    (None, None) => None,
                    _ => bail!("give both --nz and --nx for a Gaussian PSF, or neither (automatic ±4σ)"),
                };
                match a.fwhm {
                    Some(f) => PsfSpec::Gaussian(GaussianPsf::from_fwhm(f, vs, shape)),
                    None => PsfSpec::Gaussian(GaussianPsf::from_optics(gl.na, gl.wavelength, gl.ni, vs, shape)?),
                }
            }
        };
        psf::generate(&spec)?
    };
    write_volume(&a.output, &vol, a.dtype.into())?;
    let f = psf::fwhm_voxels(&vol);
    let fw = match vol.voxel_size {
        Some(v) => format!("{:.3}×{:.3}×{:.3} µm", f[0] * v[0], f[1] * v[1], f[2] * v[2]),
        None => format!("{:.2}×{:.2}×{:.2} voxels", f[0], f[1], f[2]),
    };
    println!(
        "wrote {} ({}, voxel {}, FWHM z×y×x {fw}, {:.2} s)",
        a.output.display(),
        vol.shape_str(),
        vs_str(&vol),
        t.elapsed().as_secs_f64()
    );
    Ok(())
}

// ---------------------------------------------------------------- synth

#[derive(Args, Debug)]
pub struct SynthArgs {
    /// The PSF the inputs are blurred with (its voxel size is the volumes' voxel size).
    #[arg(long)]
    pub psf: PathBuf,
    /// Output folder: DIR/input/synth_NNNN.tif and DIR/ground_truth/synth_NNNN.tif.
    #[arg(short, long)]
    pub output: PathBuf,
    /// Number of pairs.
    #[arg(long, default_value_t = 1)]
    pub count: usize,
    /// Ground-truth size "Z,Y,X" (the authors': 128,128,128).
    #[arg(long, value_parser = triple_usize, default_value = "128,128,128")]
    pub size: [usize; 3],
    /// Seed; pair i uses an independent stream derived from (seed, i).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Photons per unit of ground truth (Poisson noise).
    #[arg(long, default_value_t = 5.0)]
    pub photons: f64,
    /// Gaussian read noise σ in photons.
    #[arg(long, default_value_t = 0.5)]
    pub read_noise: f64,
    /// Constant background of the scene.
    #[arg(long, default_value_t = 30.0)]
    pub background: f32,
    /// Families to draw (comma separated): spheres, shells, dots, rods, plates, blocks, filaments [all].
    #[arg(long, value_delimiter = ',')]
    pub families: Vec<String>,
    /// Family to leave out (repeatable), e.g. to hold it out of training.
    #[arg(long)]
    pub exclude_family: Vec<String>,
    /// Axial downsampling of the input (1: isotropic).
    #[arg(long, default_value_t = 1)]
    pub anisotropic_factor: usize,
    /// With --anisotropic-factor > 1: keep the input at its reduced depth instead of
    /// interpolating it back to the ground truth's size.
    #[arg(long)]
    pub no_upsample: bool,
    /// Channel of a multi-channel --psf file, from 0.
    #[arg(long)]
    pub channel: Option<usize>,
    /// Time point of a --psf file with several, from 0.
    #[arg(long)]
    pub time: Option<usize>,
}

pub fn synth(a: &SynthArgs) -> Result<()> {
    progress::enable(true);
    if a.output.is_file() {
        bail!(
            "-o {} is a file: synth writes a folder (DIR/input/, DIR/ground_truth/)",
            a.output.display()
        );
    }
    let psf = read_volume_with(&a.psf, &read_opts(a.channel, a.time))
        .with_context(|| format!("reading PSF {}", a.psf.display()))?;
    let mut families: Vec<Family> = if a.families.is_empty() {
        Family::ALL.to_vec()
    } else {
        a.families.iter().map(|s| s.parse()).collect::<Result<_, _>>()?
    };
    for x in &a.exclude_family {
        let f: Family = x.parse()?;
        families.retain(|g| *g != f);
    }
    let cfg = SynthConfig {
        size: a.size,
        photons: a.photons,
        read_noise: a.read_noise,
        background: a.background,
        families,
        anisotropic_factor: a.anisotropic_factor,
        upsample_input: !a.no_upsample,
        ..Default::default()
    };
    let t = Instant::now();
    let names = synth::write_dataset(&cfg, &psf, &a.output, a.count, a.seed)?;
    println!(
        "wrote {} pairs of {} to {}/{{input,ground_truth}} ({:.1} s)",
        names.len(),
        Volume::zeros(cfg.size).shape_str(),
        a.output.display(),
        t.elapsed().as_secs_f64()
    );
    Ok(())
}

// ---------------------------------------------------------------- rl

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum BackProjectorArg {
    Matched,
    WienerButterworth,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum BoundaryArg {
    /// free for matched, mirror for wiener-butterworth
    Auto,
    Free,
    Mirror,
}

#[derive(Args, Debug)]
pub struct RlArgs {
    /// The volume to deconvolve.
    pub input: PathBuf,
    /// The PSF (any size up to the image's; its center is voxel dims/2).
    #[arg(long)]
    pub psf: PathBuf,
    /// Number of RL iterations.
    #[arg(long, default_value_t = 50)]
    pub iterations: usize,
    /// Output volume (.tif/.tiff or .h5[:/dataset]).
    #[arg(short, long)]
    pub output: PathBuf,
    /// Constant background in the image model y = PSF ⊛ x + background.
    #[arg(long, default_value_t = 0.0)]
    pub background: f32,
    /// matched: classical RL; wiener-butterworth: Guo et al. 2020's unmatched back projector (few iterations).
    #[arg(long, value_enum, default_value_t = BackProjectorArg::Matched)]
    pub back_projector: BackProjectorArg,
    /// Wiener–Butterworth: Wiener parameter.
    #[arg(long, default_value_t = 0.1)]
    pub alpha: f64,
    /// Wiener–Butterworth: gain at the resolution cutoff.
    #[arg(long, default_value_t = 0.3)]
    pub beta: f64,
    /// Wiener–Butterworth: Butterworth order.
    #[arg(long, default_value_t = 10.0)]
    pub order: f64,
    /// Edges: free (object may extend past the image; Bertero–Boccacci) or mirror (data reflected).
    #[arg(long, value_enum, default_value_t = BoundaryArg::Auto)]
    pub boundary: BoundaryArg,
    #[arg(long, value_enum, default_value_t = Dtype::F32)]
    pub dtype: Dtype,
    /// Channel of a multi-channel input.
    #[arg(long)]
    pub channel: Option<usize>,
    /// Time point of an input with several (ImageJ frames, OME SizeT), from 0.
    #[arg(long)]
    pub time: Option<usize>,
}

pub fn rl(a: &RlArgs) -> Result<()> {
    progress::enable(true);
    let out = super::args::Output {
        role: "the output -o",
        path: &a.output,
        extensions: super::args::VOLUME_EXTENSIONS,
    };
    let _guard = super::args::guard_outputs(&[out], &[("the input volume", &a.input), ("the PSF --psf", &a.psf)])?;
    let input = read_volume_with(&a.input, &read_opts(a.channel, a.time))?;
    let psf = read_volume_with(&a.psf, &ReadOptions::default())
        .with_context(|| format!("reading PSF {}", a.psf.display()))?;
    let cfg = RlConfig {
        iterations: a.iterations,
        background: a.background,
        back_projector: match a.back_projector {
            BackProjectorArg::Matched => BackProjector::Matched,
            BackProjectorArg::WienerButterworth => BackProjector::WienerButterworth {
                alpha: a.alpha,
                beta: a.beta,
                order: a.order,
            },
        },
        boundary: match a.boundary {
            BoundaryArg::Auto => Boundary::Auto,
            BoundaryArg::Free => Boundary::Free,
            BoundaryArg::Mirror => Boundary::Mirror,
        },
    };
    let t = Instant::now();
    let out = rln_engine::imaging::rl::richardson_lucy(&input, &psf, &cfg)?;
    let secs = t.elapsed().as_secs_f64();
    write_volume(&a.output, &out, a.dtype.into())?;
    println!(
        "wrote {} ({}, {} iterations in {:.2} s, {:.3e} voxel-iterations/s on {} threads)",
        a.output.display(),
        out.shape_str(),
        a.iterations,
        secs,
        out.len() as f64 * a.iterations as f64 / secs.max(1e-9),
        rln_engine::threads()
    );
    Ok(())
}

// ---------------------------------------------------------------- eval

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum NormalizeArg {
    None,
    Percentile,
    Affine,
}

#[derive(Args, Debug)]
pub struct EvalArgs {
    /// The ground-truth volume.
    pub ground_truth: PathBuf,
    /// The volume to score (same shape).
    pub prediction: PathBuf,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    /// affine: ground truth percentile-normalized, prediction fitted to it by least-squares
    /// scale and offset; percentile: both normalized; none: raw values.
    #[arg(long, value_enum, default_value_t = NormalizeArg::Affine)]
    pub normalize: NormalizeArg,
    /// Data range for PSNR/SSIM (default: max − min of the normalized ground truth).
    #[arg(long)]
    pub data_range: Option<f64>,
    /// Channel of multi-channel inputs.
    #[arg(long)]
    pub channel: Option<usize>,
    /// Time point of inputs with several (ImageJ frames, OME SizeT), from 0.
    #[arg(long)]
    pub time: Option<usize>,
}

pub fn eval(a: &EvalArgs) -> Result<()> {
    let gt = read_volume_with(&a.ground_truth, &read_opts(a.channel, a.time))?;
    let pred = read_volume_with(&a.prediction, &read_opts(a.channel, a.time))?;
    let norm = match a.normalize {
        NormalizeArg::None => Normalize::None,
        NormalizeArg::Percentile => Normalize::Percentile,
        NormalizeArg::Affine => Normalize::Affine,
    };
    let m = metrics::evaluate(&gt, &pred, norm, a.data_range)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&m)?);
    } else {
        println!("PSNR   {:.4} dB", m.psnr);
        println!("SSIM   {:.6}", m.ssim);
        println!("NRMSE  {:.6}", m.nrmse);
        println!("r      {:.6}", m.pearson_r);
        println!(
            "({}, normalize {:?}, data range {})",
            Volume::zeros(m.shape).shape_str(),
            m.normalize,
            m.data_range
        );
    }
    Ok(())
}

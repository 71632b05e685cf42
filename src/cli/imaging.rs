//! `psf`, `synth`, `rl`, `eval`: the imaging toolkit's commands (parsing and printing only;
//! the work is in `rln_engine::imaging`).

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use rln_engine::imaging::metrics::{self, Normalize};
use rln_engine::imaging::psf::{self, CentreRule, ConfocalPsf, GaussianPsf, GibsonLanni, MeasuredOptions, PsfSpec};
use rln_engine::imaging::radial_otf::{RadialOtf, RadialOtfOptions};
use rln_engine::imaging::rl::{BackProjector, BackgroundMode, Boundary, RlConfig};
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
    let v: [f64; 3] = triple(s)?;
    if v.iter().all(|x| x.is_finite()) {
        Ok(v)
    } else {
        Err(format!("{s:?}: give finite numbers"))
    }
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

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum CentreArg {
    Centroid,
    Peak,
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
    /// Clean a measured bead stack (or instrument PSF) instead of computing a model: each
    /// plane's background subtracted, a noise floor of --noise-floor σ, only the support
    /// connected to the peak kept, centred to a sub-voxel, resampled (linear interpolation)
    /// to the data's voxel size (--dz/--dxy or --like DATA), optionally radially averaged,
    /// cropped to the support (or --crop), normalized to sum 1. Prints FWHM and the mass removed.
    #[arg(long, value_name = "BEAD.tif")]
    pub measured: Option<PathBuf>,
    /// Measured: the data file whose voxel size the PSF is resampled to (from its metadata).
    #[arg(long, value_name = "DATA", requires = "measured")]
    pub like: Option<PathBuf>,
    /// Measured: the bead stack's own axial voxel size, µm, when its file has none.
    #[arg(long, requires = "measured", value_parser = super::finite_f64)]
    pub psf_dz: Option<f64>,
    /// Measured: the bead stack's own lateral voxel size, µm, when its file has none.
    #[arg(long, requires = "measured", value_parser = super::finite_f64)]
    pub psf_dxy: Option<f64>,
    /// Measured: noise floor in σ of the background (0: keep all above the background).
    #[arg(long, default_value_t = 3.0, value_parser = super::finite_f64)]
    pub noise_floor: f64,
    /// Measured: average over rings about the optical axis (axially symmetric PSF, as cudaDecon's OTF).
    #[arg(long)]
    pub radial: bool,
    /// Measured: the centre is the core's centroid, or the peak refined by a parabola (cudaDecon).
    #[arg(long, value_enum, default_value_t = CentreArg::Centroid)]
    pub centre: CentreArg,
    /// Measured: write the PSF cudaDecon effectively deconvolves with instead of cleaning
    /// the bead in space: the radially averaged OTF of the raw stack (as `rl --radial-otf`
    /// and cudaDecon's radialft make it: one background, ring average of the spectrum with
    /// the bead moved to its parabola-fitted peak, kr = 0 re-fitted), interpolated onto the
    /// frequencies of a grid in the data's voxels (--dz/--dxy or --like), inverse-transformed,
    /// centred, normalized to sum 1. The grid is the bead's field in the data's voxels (made
    /// odd) or --crop Z,Y,X. The small negative ripples of the inverse (reported) are set to
    /// 0: RL needs a non-negative PSF. No noise floor: the ring average removes the noise.
    #[arg(long, requires = "measured", conflicts_with_all = ["radial", "noise_floor", "centre"])]
    pub via_radial_otf: bool,
    /// Measured: planes (of the bead) added to its fitted z centre, on either route (the
    /// PSF moves by a sub-voxel along z). cudaDecon's radialft (pycudadecon 0.5.1) centres
    /// 0.6 planes past the parabola-fitted peak: give 0.6 (with --centre peak when cleaning
    /// in space) to match its results. Also spelled --otf-z-offset, as in `rl`.
    #[arg(long, alias = "otf-z-offset", requires = "measured", default_value_t = 0.0, value_parser = super::finite_f64)]
    pub z_centre_offset: f64,
    /// --via-radial-otf: the kr = 0 column is re-fitted from kr = 1..N (radialft's --fixorigin; 0: off).
    #[arg(long, requires = "via_radial_otf", default_value_t = 10)]
    pub otf_fix_origin: usize,
    /// Gaussian: full width at half maximum in µm, "Z,Y,X" (or one value).
    #[arg(long, value_parser = triple_f64)]
    pub fwhm: Option<[f64; 3]>,
    /// Numerical aperture [1.4].
    #[arg(long, value_parser = super::finite_f64)]
    pub na: Option<f64>,
    /// Emission wavelength in µm [0.6].
    #[arg(long, value_parser = super::finite_f64)]
    pub wavelength: Option<f64>,
    /// Confocal: excitation wavelength in µm [0.488].
    #[arg(long, value_parser = super::finite_f64, default_value_t = 0.488)]
    pub ex_wavelength: f64,
    /// Confocal: pinhole diameter in Airy units (0: point pinhole; ≥ 50: open).
    #[arg(long, value_parser = super::finite_f64, default_value_t = 1.0)]
    pub pinhole: f64,
    /// Sample refractive index [1.47].
    #[arg(long, value_parser = super::finite_f64)]
    pub ns: Option<f64>,
    /// Immersion medium index, actual [1.515].
    #[arg(long, value_parser = super::finite_f64)]
    pub ni: Option<f64>,
    /// Immersion medium index, design [1.515].
    #[arg(long, value_parser = super::finite_f64)]
    pub ni0: Option<f64>,
    /// Coverslip index, actual [1.515].
    #[arg(long, value_parser = super::finite_f64)]
    pub ng: Option<f64>,
    /// Coverslip index, design [1.515].
    #[arg(long, value_parser = super::finite_f64)]
    pub ng0: Option<f64>,
    /// Coverslip thickness, actual, µm [170].
    #[arg(long, value_parser = super::finite_f64)]
    pub tg: Option<f64>,
    /// Coverslip thickness, design, µm [170].
    #[arg(long, value_parser = super::finite_f64)]
    pub tg0: Option<f64>,
    /// Working distance (immersion thickness), design, µm [150].
    #[arg(long, value_parser = super::finite_f64)]
    pub ti0: Option<f64>,
    /// Depth of the point source above the coverslip, µm [0].
    #[arg(long, value_parser = super::finite_f64)]
    pub pz: Option<f64>,
    /// Lateral voxel size, µm [0.05] (measured: the data's, to resample to).
    #[arg(long, value_parser = super::finite_f64)]
    pub dxy: Option<f64>,
    /// Axial voxel size, µm [0.05] (measured: the data's, to resample to).
    #[arg(long, value_parser = super::finite_f64)]
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
    /// Measured: one background for every plane (default: each plane's border median).
    #[arg(long, value_parser = super::finite_f32)]
    pub background: Option<f32>,
    /// Measured: output size "Z,Y,X" (odd; any with --via-radial-otf).
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
        // the model's PSF record fixes everything; other PSF options would be ignored
        let given: Vec<&str> = [
            ("--fwhm", a.fwhm.is_some()),
            ("--na", a.na.is_some()),
            ("--wavelength", a.wavelength.is_some()),
            ("--ns", a.ns.is_some()),
            ("--ni", a.ni.is_some()),
            ("--ni0", a.ni0.is_some()),
            ("--ng", a.ng.is_some()),
            ("--ng0", a.ng0.is_some()),
            ("--tg", a.tg.is_some()),
            ("--tg0", a.tg0.is_some()),
            ("--ti0", a.ti0.is_some()),
            ("--pz", a.pz.is_some()),
            ("--dxy", a.dxy.is_some()),
            ("--dz", a.dz.is_some()),
            ("--nx", a.nx.is_some()),
            ("--nz", a.nz.is_some()),
            ("--oversample", a.oversample.is_some()),
            ("--background", a.background.is_some()),
            ("--crop", a.crop.is_some()),
            ("--channel", a.channel.is_some()),
            ("--measured", a.measured.is_some()),
        ]
        .into_iter()
        .filter_map(|(n, g)| g.then_some(n))
        .collect();
        if !given.is_empty() {
            bail!(
                "--from-model regenerates the PSF recorded in the model; {} would be ignored: drop {}",
                given.join(", "),
                if given.len() == 1 { "it" } else { "them" }
            );
        }
        let model = rln_engine::model::Model::<f32>::load(mp).context("--from-model")?;
        rln_engine::compare::model_psf(&model)
            .with_context(|| format!("the PSF of {}", mp.display()))?
            .1
    } else if let Some(bead_path) = &a.measured {
        measured_psf(a, bead_path)?
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

/// `psf --measured --via-radial-otf`: the spatial PSF of the bead's radial OTF on the data's grid.
fn psf_via_radial_otf(
    a: &PsfArgs,
    bead_path: &std::path::Path,
    bead: &Volume,
    own: Option<[f64; 3]>,
    target: Option<[f64; 3]>,
) -> Result<Volume> {
    let bead_voxel = own.or(bead.voxel_size).with_context(|| {
        format!(
            "{} records no voxel size; give the bead's own --psf-dz and --psf-dxy",
            bead_path.display()
        )
    })?;
    let data_voxel = target.unwrap_or(bead_voxel);
    let opts = RadialOtfOptions {
        background: a.background.map(f64::from),
        fix_origin: a.otf_fix_origin,
        z_centre_offset: a.z_centre_offset,
    };
    let otf = RadialOtf::from_bead(bead, bead_voxel, &opts)
        .with_context(|| format!("making the radial OTF of {}", bead_path.display()))?;
    let (mut vol, r) = otf
        .to_psf(data_voxel, a.crop)
        .with_context(|| format!("the PSF of {}'s radial OTF", bead_path.display()))?;
    println!(
        "PSF of the radial OTF of {} ({} at {}×{}×{} µm, z centre {:+} planes) on {} at {}×{}×{} µm; \
         negative ripples {:.2}% of the positive mass (lowest {:.2}% of the peak) set to 0",
        bead_path.display(),
        bead.shape_str(),
        bead_voxel[0],
        bead_voxel[1],
        bead_voxel[2],
        a.z_centre_offset,
        vol.shape_str(),
        data_voxel[0],
        data_voxel[1],
        data_voxel[2],
        100.0 * r.negative_mass,
        -100.0 * r.min_over_peak
    );
    vol.metadata = Some(
        serde_json::json!({
            "model": "measured",
            "route": "radial-otf",
            "source": bead_path.display().to_string(),
            "source_voxel_size": bead_voxel,
            "input_shape": bead.dims,
            "z_centre_offset": a.z_centre_offset,
            "otf_fix_origin": a.otf_fix_origin,
            "background": a.background,
            "negative_mass_clipped": r.negative_mass,
        })
        .to_string(),
    );
    Ok(vol)
}

/// `psf --measured`: reads the bead, cleans it, prints what cleaning found.
fn measured_psf(a: &PsfArgs, bead_path: &std::path::Path) -> Result<Volume> {
    let bead = read_volume_with(bead_path, &read_opts(a.channel, a.time))?;
    let own = match (a.psf_dz, a.psf_dxy) {
        (Some(z), Some(xy)) => Some([z, xy, xy]),
        (None, None) => None,
        _ => bail!("give both --psf-dz and --psf-dxy (the bead stack's own voxel size), or neither"),
    };
    let target = match (&a.like, a.dz, a.dxy) {
        (Some(_), Some(_), _) | (Some(_), _, Some(_)) => {
            bail!("give the data's voxel size by --like or by --dz/--dxy, not both")
        }
        (Some(data), None, None) => {
            let d = read_volume_with(data, &ReadOptions::default())
                .with_context(|| format!("reading {} for its voxel size", data.display()))?;
            Some(d.voxel_size.with_context(|| {
                format!(
                    "{} records no voxel size; give the data's --dz and --dxy instead",
                    data.display()
                )
            })?)
        }
        (None, Some(z), Some(xy)) => Some([z, xy, xy]),
        (None, None, None) => None,
        _ => bail!("give both --dz and --dxy (the data's voxel size), or neither"),
    };
    if a.via_radial_otf {
        return psf_via_radial_otf(a, bead_path, &bead, own, target);
    }
    let opts = MeasuredOptions {
        background: a.background,
        noise_floor_sigmas: a.noise_floor,
        radial: a.radial,
        centre: match a.centre {
            CentreArg::Centroid => CentreRule::Centroid,
            CentreArg::Peak => CentreRule::Peak,
        },
        z_centre_offset: a.z_centre_offset,
        crop: a.crop,
        voxel_size: own,
        target_voxel_size: target,
        source: Some(bead_path.display().to_string()),
    };
    let (vol, r) = psf::clean_measured(&bead, &opts).with_context(|| format!("cleaning {}", bead_path.display()))?;
    let (bmin, bmax) = r
        .plane_background
        .iter()
        .fold((f32::MAX, f32::MIN), |(l, h), &v| (l.min(v), h.max(v)));
    println!(
        "background {bmin:.1}…{bmax:.1} per plane, noise σ {:.2}, floor {:.2}; support {} voxels; \
         mass outside the support (removed) {:.1}%",
        r.noise_sigma,
        r.noise_floor,
        r.support_voxels,
        100.0 * r.mass_outside_support
    );
    println!(
        "mass beyond 20 px of the centre {:.1}% → {:.1}%; on the first or last plane {:.1}% → {:.1}% (one background for all planes → cleaned)",
        100.0 * r.mass_beyond_20px_before,
        100.0 * r.mass_beyond_20px_after,
        100.0 * r.edge_plane_mass_before,
        100.0 * r.edge_plane_mass_after
    );
    if let (Some(s), Some(t)) = (r.source_voxel_size, target) {
        if s != t {
            println!(
                "resampled from {}×{}×{} µm to {}×{}×{} µm (linear interpolation)",
                s[0], s[1], s[2], t[0], t[1], t[2]
            );
        }
    }
    Ok(vol)
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
    #[arg(long, value_parser = super::finite_f64, default_value_t = 5.0)]
    pub photons: f64,
    /// Gaussian read noise σ in photons.
    #[arg(long, value_parser = super::finite_f64, default_value_t = 0.5)]
    pub read_noise: f64,
    /// Constant background of the scene.
    #[arg(long, value_parser = super::finite_f32, default_value_t = 30.0)]
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
    let psf = read_volume_with(&a.psf, &read_opts(a.channel, a.time)).context("--psf")?;
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
    /// free for matched, mirror for wiener-butterworth; periodic with --otf / --radial-otf
    Auto,
    Free,
    Mirror,
    Periodic,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum BackgroundModeArg {
    Model,
    Subtract,
}

/// `--iterations N` or `--iterations auto`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Iterations {
    Fixed(usize),
    Auto,
}

fn iterations_arg(s: &str) -> Result<Iterations, String> {
    if s.eq_ignore_ascii_case("auto") {
        return Ok(Iterations::Auto);
    }
    s.parse()
        .map(Iterations::Fixed)
        .map_err(|_| format!("{s:?} is neither a number of iterations nor \"auto\""))
}

#[derive(Args, Debug)]
pub struct RlArgs {
    /// The volume to deconvolve.
    pub input: PathBuf,
    /// The PSF (any size up to the image's; its center is voxel dims/2), or with
    /// --radial-otf the raw bead stack.
    #[arg(long, required_unless_present = "otf", conflicts_with = "otf")]
    pub psf: Option<PathBuf>,
    /// Make a radially averaged OTF of the raw bead stack --psf the way cudaDecon's radialft
    /// does (one background, ring average of its spectrum, kr = 0 fixed by a line fit) and
    /// deconvolve with it interpolated onto the data's frequency grid: the bead may be
    /// stepped unlike the data. Matched back projector; periodic edges unless --boundary
    /// free or mirror (the domain then grows by the bead's field, at most the image's size).
    /// Needs the bead's and the data's voxel sizes (from their files, or --psf-voxel / --voxel).
    #[arg(long, requires = "psf")]
    pub radial_otf: bool,
    /// A cudaDecon OTF file (radialft's output: kr rows × (re, im) kz pairs) to deconvolve
    /// with instead of a PSF; give the bead's voxel size with --psf-voxel. Edges as with
    /// --radial-otf.
    #[arg(long)]
    pub otf: Option<PathBuf>,
    /// The bead's voxel size DZ,DXY in µm, where its file records none (--radial-otf, --otf).
    #[arg(long, value_delimiter = ',', value_parser = super::finite_f64)]
    pub psf_voxel: Option<Vec<f64>>,
    /// The data's voxel size DZ,DXY in µm, where the input records none (--radial-otf, --otf).
    #[arg(long, value_delimiter = ',', value_parser = super::finite_f64)]
    pub voxel: Option<Vec<f64>>,
    /// --radial-otf: planes added to the bead's fitted z centre. cudaDecon's radialft (as
    /// shipped in pycudadecon 0.5.1) adds 0.6; give 0.6 to reproduce its results exactly.
    #[arg(long, default_value_t = 0.0, value_parser = super::finite_f64)]
    pub otf_z_offset: f64,
    /// --radial-otf: the kr = 0 column is re-fitted from kr = 1..N (radialft's --fixorigin; 0: off).
    #[arg(long, default_value_t = 10)]
    pub otf_fix_origin: usize,
    /// Number of RL iterations, or "auto": stop at the first iteration that changes the
    /// estimate by less than --stop-change (relative L2), at most --max-iterations.
    #[arg(long, default_value = "50", value_parser = iterations_arg)]
    pub iterations: Iterations,
    /// With --iterations auto: the relative change ‖x_k − x_{k−1}‖/‖x_{k−1}‖ that ends the run.
    #[arg(long, default_value_t = 0.01, value_parser = super::finite_f64)]
    pub stop_change: f64,
    /// With --iterations auto: the most iterations run.
    #[arg(long, default_value_t = 200)]
    pub max_iterations: usize,
    /// Biggs–Andrews acceleration (as cudaDecon): fewer iterations for the same sharpening.
    #[arg(long)]
    pub accelerate: bool,
    /// model: y = PSF ⊛ x + background; subtract: y ← max(y − background, 0) first (cudaDecon).
    #[arg(long, value_enum, default_value_t = BackgroundModeArg::Model)]
    pub background_mode: BackgroundModeArg,
    /// Blend the x and y edges over this many voxels so the image wraps smoothly (cudaDecon's
    /// napodize, 15 there; use with --boundary periodic).
    #[arg(long, default_value_t = 0)]
    pub apodize: usize,
    /// Print every iteration's relative change (and acceleration factor).
    #[arg(long)]
    pub verbose: bool,
    /// Output volume (.tif/.tiff or .h5[:/dataset]).
    #[arg(short, long)]
    pub output: PathBuf,
    /// Constant background in the image model y = PSF ⊛ x + background.
    #[arg(long, value_parser = super::finite_f32, default_value_t = 0.0)]
    pub background: f32,
    /// matched: classical RL; wiener-butterworth: Guo et al. 2020's unmatched back projector (few iterations).
    #[arg(long, value_enum, default_value_t = BackProjectorArg::Matched)]
    pub back_projector: BackProjectorArg,
    /// Wiener–Butterworth: Wiener parameter.
    #[arg(long, value_parser = super::finite_f64, default_value_t = 0.1)]
    pub alpha: f64,
    /// Wiener–Butterworth: gain at the resolution cutoff.
    #[arg(long, value_parser = super::finite_f64, default_value_t = 0.3)]
    pub beta: f64,
    /// Wiener–Butterworth: Butterworth order.
    #[arg(long, value_parser = super::finite_f64, default_value_t = 10.0)]
    pub order: f64,
    /// Edges: free (object may extend past the image; Bertero–Boccacci), mirror (data
    /// reflected), or periodic (FFT on the image itself, as cudaDecon; with --apodize).
    /// All three work with a PSF and with an OTF (--otf, --radial-otf).
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

/// A voxel size (z, y, x µm) from a DZ,DXY option or else from the file's metadata.
fn voxel_from(option: Option<&[f64]>, recorded: Option<[f64; 3]>, what: &str, flag: &str) -> Result<[f64; 3]> {
    match (option, recorded) {
        (Some(v), _) => {
            if v.len() != 2 {
                bail!("{flag} takes two numbers, DZ,DXY (µm); got {}", v.len());
            }
            if v.iter().any(|x| !(*x > 0.0)) {
                bail!("{flag} {v:?}: voxel sizes must be positive (µm)");
            }
            Ok([v[0], v[1], v[1]])
        }
        (None, Some(r)) => Ok(r),
        (None, None) => bail!("{what} records no voxel size: give it with {flag} DZ,DXY (µm)"),
    }
}

pub fn rl(a: &RlArgs) -> Result<()> {
    progress::enable(true);
    let out = super::args::Output {
        role: "the output -o",
        path: &a.output,
        extensions: super::args::VOLUME_EXTENSIONS,
    };
    let mut inputs = vec![("the input volume", a.input.as_path())];
    if let Some(p) = &a.psf {
        inputs.push(("the PSF --psf", p.as_path()));
    }
    if let Some(p) = &a.otf {
        inputs.push(("the OTF --otf", p.as_path()));
    }
    let _guard = super::args::guard_outputs(&[out], &inputs)?;
    let input = read_volume_with(&a.input, &read_opts(a.channel, a.time))?;
    let (iterations, stop_change) = match a.iterations {
        Iterations::Fixed(n) => (n, None),
        Iterations::Auto => (a.max_iterations, Some(a.stop_change)),
    };
    let cfg = RlConfig {
        iterations,
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
            BoundaryArg::Periodic => Boundary::Periodic,
        },
        accelerate: a.accelerate,
        background_mode: match a.background_mode {
            BackgroundModeArg::Model => BackgroundMode::Model,
            BackgroundModeArg::Subtract => BackgroundMode::Subtract,
        },
        apodize: a.apodize,
        stop_change,
    };
    let t = Instant::now();
    let (out, stats) = match (&a.psf, &a.otf) {
        (Some(path), None) if !a.radial_otf => {
            let psf = read_volume_with(path, &ReadOptions::default()).context("--psf")?;
            if let Some(note) = psf::check_voxel_sizes_match(&psf, &input)
                .with_context(|| format!("PSF {} and data {}", path.display(), a.input.display()))?
            {
                eprintln!("note: {note}");
            }
            rln_engine::imaging::rl::richardson_lucy_traced(&input, &psf, &cfg)?
        }
        _ => {
            let data_voxel = voxel_from(a.voxel.as_deref(), input.voxel_size, "the data", "--voxel")?;
            let otf = match (&a.psf, &a.otf) {
                (Some(bead_path), _) => {
                    let bead = read_volume_with(bead_path, &ReadOptions::default())
                        .with_context(|| format!("reading bead stack {}", bead_path.display()))?;
                    let bead_voxel =
                        voxel_from(a.psf_voxel.as_deref(), bead.voxel_size, "the bead stack", "--psf-voxel")?;
                    let opts = RadialOtfOptions {
                        background: None,
                        fix_origin: a.otf_fix_origin,
                        z_centre_offset: a.otf_z_offset,
                    };
                    RadialOtf::from_bead(&bead, bead_voxel, &opts)
                        .with_context(|| format!("making the radial OTF of {}", bead_path.display()))?
                }
                (None, Some(otf_path)) => {
                    let v = voxel_from(a.psf_voxel.as_deref(), None, "a cudaDecon OTF file", "--psf-voxel")?;
                    RadialOtf::read_cudadecon(otf_path, v[0], v[2])?
                }
                (None, None) => unreachable!("clap requires --psf or --otf"),
            };
            rln_engine::imaging::rl::richardson_lucy_otf(&input, &otf, data_voxel, &cfg)?
        }
    };
    let secs = t.elapsed().as_secs_f64();
    out.check_finite("RL result")?;
    if a.verbose {
        for (i, s) in stats.iter().enumerate() {
            println!("iteration {:>3}: change {:.4e}, λ {:.3}", i + 1, s.change, s.lambda);
        }
    }
    write_volume(&a.output, &out, a.dtype.into())?;
    let last = stats.last().map(|s| s.change).unwrap_or(0.0);
    let why = match stop_change {
        Some(t) if last < t => format!(" (stopped: change {last:.2e} < {t})"),
        Some(_) => format!(" (reached --max-iterations; last change {last:.2e})"),
        None => format!(" (last change {last:.2e})"),
    };
    println!(
        "wrote {} ({}, {} iterations{}{why} in {:.2} s, {:.3e} voxel-iterations/s on {} threads)",
        a.output.display(),
        out.shape_str(),
        stats.len(),
        if a.accelerate { ", accelerated" } else { "" },
        secs,
        out.len() as f64 * stats.len() as f64 / secs.max(1e-9),
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
    #[arg(long, value_parser = super::finite_f64)]
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

/// `montage`: volumes side by side in one labelled PNG, with each one's flux.
#[derive(Args, Debug)]
pub struct MontageArgs {
    /// Panels as LABEL=FILE, one column each, in order (e.g. "raw=im.tif" "RLN=out.tif");
    /// all of one shape after --crop.
    #[arg(required = true, num_args = 1..)]
    pub panels: Vec<String>,
    /// The PNG to write: each panel's label above its central XY slice and its central XZ
    /// slice (z stretched to the voxel aspect), each scaled to its 0.1–99.9 percentiles.
    #[arg(short, long)]
    pub output: PathBuf,
    /// Only this box of every volume: "Z0,Y0,X0,DZ,DY,DX" (e.g. the planes cudaDecon keeps).
    #[arg(long, value_delimiter = ',')]
    pub crop: Option<Vec<usize>>,
    /// Each panel's zero of intensity (camera offset or background), one per panel or one for
    /// all: its flux is the sum of (value − level), reported relative to the first panel's.
    /// Default 0 (a background-subtracted result's zero).
    #[arg(long, value_delimiter = ',', value_parser = super::finite_f64)]
    pub flux_level: Vec<f64>,
    /// Voxel size "Z,Y,X" µm for the XZ aspect when the first file records none.
    #[arg(long, value_delimiter = ',', value_parser = super::finite_f64)]
    pub voxel_size: Option<Vec<f64>>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn montage(a: &MontageArgs) -> Result<()> {
    let panels: Vec<(String, PathBuf)> = a
        .panels
        .iter()
        .map(|p| match p.split_once('=') {
            Some((label, file)) if !label.is_empty() && !file.is_empty() => {
                Ok((label.to_string(), PathBuf::from(file)))
            }
            _ => bail!("panel {p:?}: give LABEL=FILE (e.g. \"RLN=out.tif\")"),
        })
        .collect::<Result<_>>()?;
    let levels = match a.flux_level.len() {
        0 => vec![0.0; panels.len()],
        1 => vec![a.flux_level[0]; panels.len()],
        n if n == panels.len() => a.flux_level.clone(),
        n => bail!(
            "--flux-level: {n} levels for {} panels (give one, or one per panel)",
            panels.len()
        ),
    };
    if a.crop.as_ref().is_some_and(|c| c.len() != 6) {
        bail!("--crop: give six numbers \"Z0,Y0,X0,DZ,DY,DX\"");
    }
    if a.voxel_size
        .as_ref()
        .is_some_and(|v| v.len() != 3 || v.iter().any(|&x| x <= 0.0))
    {
        bail!("--voxel-size: give three positive sizes \"Z,Y,X\" in µm");
    }
    rln_engine::fsutil::check_output_file(&a.output, "--output", &["png"])?;
    let inputs: Vec<(&str, &std::path::Path)> = panels.iter().map(|(l, f)| (l.as_str(), f.as_path())).collect();
    rln_engine::fsutil::refuse_overwriting_inputs(&[("--output", &a.output)], &inputs)?;
    let mut vols = Vec::with_capacity(panels.len());
    for (label, file) in &panels {
        let mut v = read_volume_with(file, &ReadOptions::default())?;
        if let Some(c) = &a.crop {
            v = v
                .crop([c[0], c[1], c[2]], [c[3], c[4], c[5]])
                .with_context(|| format!("--crop of panel {label} ({}, {})", file.display(), v.shape_str()))?;
        }
        v.check_finite(&format!("panel {label} ({})", file.display()))?;
        if let Some((first, f0)) = vols.first().map(|v: &Volume| v.dims).zip(panels.first()) {
            if v.dims != first {
                bail!(
                    "panel {label} ({}) is {} but panel {} ({}) is {}: give volumes of one shape (or --crop)",
                    file.display(),
                    v.shape_str(),
                    f0.0,
                    f0.1.display(),
                    Volume::zeros(first).shape_str()
                );
            }
        }
        vols.push(v);
    }
    if let Some(vs) = &a.voxel_size {
        if vols[0].voxel_size.is_none() {
            vols[0].voxel_size = Some([vs[0], vs[1], vs[2]]);
        }
    }
    let flux: Vec<f64> = vols
        .iter()
        .zip(&levels)
        .map(|(v, &l)| v.data.iter().map(|&x| x as f64 - l).sum())
        .collect();
    let named: Vec<(&str, &Volume)> = panels.iter().map(|(l, _)| l.as_str()).zip(&vols).collect();
    rln_engine::imaging::montage::write_montage(&a.output, &named)?;
    let rows: Vec<serde_json::Value> = panels
        .iter()
        .zip(&flux)
        .zip(&levels)
        .map(|(((label, file), &f), &l)| {
            serde_json::json!({"label": label, "file": file.display().to_string(), "flux_level": l,
                "flux": f, "flux_ratio_to_first": f / flux[0]})
        })
        .collect();
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(
                &serde_json::json!({"output": a.output.display().to_string(), "panels": rows})
            )?
        );
    } else {
        for r in &rows {
            println!(
                "{:<24} flux above {:>8.2}: {:.6e} ({:.4} of the first panel's)",
                r["label"].as_str().unwrap_or(""),
                r["flux_level"].as_f64().unwrap_or(0.0),
                r["flux"].as_f64().unwrap_or(0.0),
                r["flux_ratio_to_first"].as_f64().unwrap_or(f64::NAN)
            );
        }
        eprintln!("wrote {}", a.output.display());
    }
    Ok(())
}

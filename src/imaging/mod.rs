//! Imaging: volume I/O, PSF models, synthetic training data, Richardson–Lucy
//! deconvolution, image-quality metrics.
//!
//! - [`volume::Volume`]: the z,y,x stack every function here takes and returns.
//! - [`io`]: [`io::read_volume`] / [`io::write_volume`] for TIFF, folders of slices, HDF5
//!   (dispatching to [`tiff_io`] and `hdf5_io`, which sit below it with [`format`](mod@format), the
//!   types every reader and writer shares).
//! - [`stream`]: the same formats plus OME-Zarr read and written by region, for volumes
//!   larger than memory ([`stream::open_reader`], [`stream::create_writer`], `convert`).
//! - [`normalize`]: percentile normalization of rln-spec.md §6.
//! - [`psf`]: Gaussian, Gibson–Lanni, confocal and measured PSFs ([`psf::PsfSpec`], [`psf::generate`]).
//! - [`synth`]: the authors' phantoms plus filaments, blurred and noised ([`synth::make_pair`]).
//! - [`rl`]: FFT Richardson–Lucy with the Wiener–Butterworth back projector ([`rl::RlPlan`]).
//! - [`acquisition`]: camera offset, gain, read noise, photon level of a raw volume (`train --like`).
//! - [`measured_psf`]: cleaning measured PSFs (noise floor, resampling, radial averaging).
//! - [`metrics`]: PSNR, SSIM (scikit-image's), NRMSE, Pearson r.

pub mod acquisition;
pub mod bitmap_text;
pub mod fft;
pub mod format;
#[cfg(feature = "hdf5")]
mod hdf5_io;
pub mod io;
pub mod measured_psf;
pub mod metrics;
pub mod montage;
pub mod normalize;
pub mod progress;
pub mod psf;
pub mod radial_otf;
pub mod rl;
pub mod stream;
pub mod synth;
pub mod tiff_io;
pub mod volume;

pub use io::{read_volume, read_volume_with, write_volume, write_volume_with, OutputDtype, ReadOptions, WriteOptions};
pub use volume::Volume;

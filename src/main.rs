//! rln-engine: the command line. Each subcommand parses its arguments, calls the
//! library, and prints; see `rln-engine --help`.

mod cli;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(name = "rln-engine", version, about = "Richardson–Lucy Network deconvolution: train, infer, and everything around it", long_about = None)]
struct Cli {
    /// CPU threads for parallel work (0: one per core).
    #[arg(long, global = true, default_value_t = 0)]
    threads: usize,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Deconvolve a synthetic volume with the shipped model and with Richardson–Lucy, and compare.
    Demo(cli::demo::DemoArgs),
    /// Convert the authors' TensorFlow-named weights into an rln-engine model file.
    ImportTf(cli::core::ImportTfArgs),
    /// Compare the engine with test vectors from the authors' TensorFlow graph.
    Conformance(cli::core::ConformanceArgs),
    /// Train an RLN model on pairs from a folder or on synthetic data made for a PSF.
    Train(cli::train::TrainArgs),
    /// Deconvolve a volume of any size with a trained model (tiled crop and stitch).
    Infer(cli::infer::InferArgs),
    /// Split one volume over a Slurm job array: create the store, write (and submit) the batch scripts.
    Plan(cli::slurm::PlanArgs),
    /// Check that every block of a store is done, write pyramid levels, mark it complete.
    Finalize(cli::slurm::FinalizeArgs),
    /// Compare RLN with Richardson–Lucy (at its best iteration count) on held-out synthetic volumes.
    Compare(cli::compare::CompareArgs),
    /// Measure throughput (voxels/s) of the network and the other main paths.
    Bench(cli::core::BenchArgs),
    /// Make a point spread function (Gaussian, Gibson–Lanni widefield, confocal) or clean a measured one.
    Psf(cli::imaging::PsfArgs),
    /// Make synthetic training pairs (phantoms blurred by a PSF, with noise).
    Synth(cli::imaging::SynthArgs),
    /// Classical Richardson–Lucy deconvolution.
    Rl(cli::imaging::RlArgs),
    /// Stream a volume between TIFF, folders of slices, HDF5 and OME-Zarr with bounded memory.
    Convert(cli::convert::ConvertArgs),
    /// Image-quality metrics of a prediction against a ground truth (PSNR, SSIM, NRMSE, Pearson r).
    Eval(cli::imaging::EvalArgs),
    /// Volumes side by side in one labelled PNG (central XY and XZ slices), with each one's flux.
    Montage(cli::imaging::MontageArgs),
}

/// Restores the default action of SIGPIPE, so that a closed stdout
/// (`rln-engine infer --help | head -1`, `rln-engine bench | head`) ends the process
/// quietly like any Unix filter (killed by SIGPIPE, status 141 in a shell) instead of
/// `println!` panicking on the EPIPE error that Rust's ignored SIGPIPE turns each write
/// into. Called first, before clap prints help. Files are written under temporary
/// names and renamed when complete, so a run ended this way leaves no half-written
/// file under a final name (its `.NAME.partial-PID` is removed by the next run).
fn exit_quietly_on_closed_stdout() {
    #[cfg(unix)]
    // SAFETY: called at the start of main, before any other thread exists; SIG_DFL is
    // a valid disposition for SIGPIPE.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

fn main() {
    exit_quietly_on_closed_stdout();
    let cli = Cli::parse();
    if let Err(e) = cli::args::check_threads(cli.threads) {
        eprintln!("error: {e:#}");
        std::process::exit(2);
    }
    rln_engine::fsutil::install_interrupt_cleanup();
    rln_engine::set_threads(cli.threads);
    rln_engine::imaging::progress::enable(true);
    let result = match &cli.cmd {
        Cmd::Demo(a) => cli::demo::demo(a),
        Cmd::ImportTf(a) => cli::core::import_tf(a),
        Cmd::Conformance(a) => cli::core::conformance(a),
        Cmd::Bench(a) => cli::core::bench(a),
        Cmd::Train(a) => cli::train::train(a),
        Cmd::Infer(a) => cli::infer::infer(a),
        Cmd::Plan(a) => cli::slurm::plan(a),
        Cmd::Finalize(a) => cli::slurm::finalize(a),
        Cmd::Compare(a) => cli::compare::compare(a),
        Cmd::Psf(a) => cli::imaging::psf(a),
        Cmd::Synth(a) => cli::imaging::synth(a),
        Cmd::Rl(a) => cli::imaging::rl(a),
        Cmd::Eval(a) => cli::imaging::eval(a),
        Cmd::Montage(a) => cli::imaging::montage(a),
        Cmd::Convert(a) => cli::convert::convert(a),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

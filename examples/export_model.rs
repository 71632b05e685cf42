//! Writes the model held in a model or training-checkpoint file alone (weights, running
//! statistics and config, without the optimizer state), e.g. to ship the weights a run
//! had at one of its checkpoints:
//!
//!   cargo run --release --example export_model -- run.ckpt.safetensors model.safetensors ["how it was made"]
//!
//! A checkpoint at step N of a run equals the final model of the same command with
//! `--steps N` (batches and learning rate depend only on the step and the seed).
use anyhow::{bail, Context, Result};
use rln_engine::model::Model;
use std::path::PathBuf;

fn main() -> Result<()> {
    let args: Vec<PathBuf> = std::env::args_os().skip(1).map(PathBuf::from).collect();
    let (input, output, provenance) = match args.as_slice() {
        [i, o] => (i, o, None),
        [i, o, p] => (i, o, Some(p.to_string_lossy().into_owned())),
        _ => bail!("usage: export_model MODEL_OR_CHECKPOINT OUTPUT.safetensors [PROVENANCE]"),
    };
    let mut m = Model::<f32>::load(input).with_context(|| format!("loading {}", input.display()))?;
    // a checkpoint records no provenance of its own: say which run and step it is
    if let Some(p) = provenance {
        m.config.provenance = p;
    }
    m.save(output)
        .with_context(|| format!("writing {}", output.display()))?;
    eprintln!(
        "wrote {} ({} variant)",
        output.display(),
        format!("{:?}", m.config.variant).to_lowercase()
    );
    Ok(())
}

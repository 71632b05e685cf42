//! `rln-engine train`: parse (clap, in main), one library call
//! ([`rln_engine::train::command::train`], shared with the bindings), print its summary.

pub use rln_engine::train::command::TrainArgs;

/// Trains as the flags say; progress goes to stderr, the summary to stdout.
pub fn train(a: &TrainArgs) -> anyhow::Result<()> {
    let summary = rln_engine::train::command::train(a)?;
    println!("{summary}");
    Ok(())
}

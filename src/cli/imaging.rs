//! `psf`, `synth`, `rl`, `eval`: the imaging toolkit's commands.

use anyhow::{bail, Result};
use clap::Args;

#[derive(Args, Debug)]
pub struct PsfArgs {}
#[derive(Args, Debug)]
pub struct SynthArgs {}
#[derive(Args, Debug)]
pub struct RlArgs {}
#[derive(Args, Debug)]
pub struct EvalArgs {}

pub fn psf(_: &PsfArgs) -> Result<()> {
    bail!("psf: not implemented yet")
}
pub fn synth(_: &SynthArgs) -> Result<()> {
    bail!("synth: not implemented yet")
}
pub fn rl(_: &RlArgs) -> Result<()> {
    bail!("rl: not implemented yet")
}
pub fn eval(_: &EvalArgs) -> Result<()> {
    bail!("eval: not implemented yet")
}

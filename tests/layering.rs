//! The crate's layers point down (shared/engineering.md, issue 15 item 5), checked on the
//! source text: every `crate::X` / `rln_engine::X` / `super::…` path of a library file
//! names a module of its own layer's module or of a lower layer, the upper layers reach
//! the backends only through their public face, and the import circles that were broken
//! stay broken. Unit tests at the end of a file (`#[cfg(test)] mod tests`) and comments
//! are not scanned: a test may compose layers (e.g. the emulated CUDA backend under the
//! trainer) without making the library depend on them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Layers from the bottom; a module may use its own and lower layers only. Modules of
/// one layer do not use each other (train and infer are independent uses of the network).
const LAYERS: &[&[&str]] = &[
    &["error"],
    &["real", "fsutil"],
    &["tensor", "model", "imaging", "args"],
    &["backend"],
    &["net"],
    &["train", "infer", "conformance"],
    &["bench", "compare", "slurm"],
    &["demo"],
    &["cli", "main"],
];

/// Upward uses that are known and accepted, each with its reason. Only these (none now:
/// the CUDA predictor's `TilePredictor` impl lives in infer/cuda.rs, above the network it
/// runs).
const ALLOWED_UPWARD: &[(&str, &str, &str)] = &[];

/// Names at the crate root that are not modules (functions and re-exports of lib.rs).
const ROOT_ITEMS: &[&str] = &[
    "Result",
    "Error",
    "threads",
    "set_threads",
    "isa_variants",
    "simd_variants",
];

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The library code of a file: without its unit-test module and without comments.
fn library_code(text: &str) -> String {
    let cut = text.find("#[cfg(test)]\nmod tests").unwrap_or(text.len());
    text[..cut]
        .lines()
        .map(|l| match l.find("//") {
            Some(i) => &l[..i],
            None => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Every source file (relative to src/, with `/`) and its library code.
fn sources() -> BTreeMap<String, String> {
    let mut files = Vec::new();
    rust_files(&src(), &mut files);
    files
        .into_iter()
        .map(|p| {
            let rel = p.strip_prefix(src()).unwrap().to_string_lossy().replace('\\', "/");
            (rel, library_code(&std::fs::read_to_string(&p).unwrap()))
        })
        .collect()
}

/// The top-level module a file belongs to (`backend/cuda/train.rs` → `backend`).
fn top_module(rel: &str) -> String {
    rel.split('/').next().unwrap().trim_end_matches(".rs").to_string()
}

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|l| l.contains(&module))
}

/// The top-level modules a file's code names through `crate::` or `rln_engine::`.
fn used_modules(code: &str) -> Vec<String> {
    let mut out = Vec::new();
    for prefix in ["crate::", "rln_engine::"] {
        let mut rest = code;
        while let Some(i) = rest.find(prefix) {
            let before = rest[..i].chars().last();
            rest = &rest[i + prefix.len()..];
            if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
                continue; // e.g. `my_crate::`
            }
            let name: String = rest.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
            if !name.is_empty() {
                out.push(name);
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

#[test]
fn every_module_has_a_layer() {
    for rel in sources().keys() {
        let m = top_module(rel);
        if m == "lib" {
            continue;
        }
        assert!(
            layer_of(&m).is_some(),
            "src/{rel}: module {m} is in no layer of tests/layering.rs"
        );
    }
}

#[test]
fn layers_point_down() {
    let mut bad = Vec::new();
    for (rel, code) in sources() {
        let me = top_module(&rel);
        let Some(mine) = layer_of(&me) else { continue };
        for used in used_modules(&code) {
            if used == me || ROOT_ITEMS.contains(&used.as_str()) {
                continue;
            }
            let Some(theirs) = layer_of(&used) else {
                bad.push(format!("src/{rel}: uses crate::{used}, which is in no layer"));
                continue;
            };
            if theirs < mine {
                continue;
            }
            if ALLOWED_UPWARD.iter().any(|(f, m, _)| *f == rel && *m == used) {
                continue;
            }
            bad.push(format!(
                "src/{rel} ({me}, layer {mine}) uses crate::{used} (layer {theirs}): layers point down only"
            ));
        }
    }
    assert!(bad.is_empty(), "{}", bad.join("\n"));
    // the exceptions are still needed (a stale one would hide a new use)
    let src = sources();
    for (f, m, why) in ALLOWED_UPWARD {
        let code = src
            .get(*f)
            .unwrap_or_else(|| panic!("allowed exception for a missing file {f}"));
        assert!(
            used_modules(code).iter().any(|u| u == m),
            "src/{f} no longer uses {m}: remove its exception ({why})"
        );
    }
}

/// The upper layers (train, infer, bench, conformance) use the backends through their
/// public face only: the items of `backend` itself (the `Backend` trait the training loop
/// and the benchmarks are generic over, `GradMode`, the loss terms) and what
/// `backend::cpu` and `backend::cuda` export at their top (`CpuBackend`, `CpuReal`,
/// `isa`; `CudaTrainBackend`, `CudaPredictor`, `CudaOptions`, `available`, …: choosing a
/// device is the caller's). They never name a submodule of a backend (`cpu::pointwise`,
/// `cpu::simd`, `cuda::launch`, `cuda::device`, `cuda::train`, …): those are the
/// backends' internals. Not importing `backend` at all is impossible by design: the
/// `Backend` trait has associated tensor types, so a loop that runs on any backend is
/// generic over it, as `net` is.
#[test]
fn upper_layers_use_only_the_backends_public_face() {
    let mut internals: Vec<(String, String)> = Vec::new(); // (backend, submodule)
    for backend in ["cpu", "cuda"] {
        for e in std::fs::read_dir(src().join("backend").join(backend)).unwrap() {
            let name = e
                .unwrap()
                .file_name()
                .to_string_lossy()
                .trim_end_matches(".rs")
                .to_string();
            if name != "mod" {
                internals.push((backend.to_string(), name));
            }
        }
    }
    assert!(
        internals.iter().any(|(b, m)| b == "cuda" && m == "launch"),
        "{internals:?}"
    );
    let mut bad = Vec::new();
    for (rel, code) in sources() {
        let upper = ["train/", "infer/", "bench", "conformance"]
            .iter()
            .any(|p| rel.starts_with(p));
        if !upper {
            continue;
        }
        for (backend, sub) in &internals {
            // `backend::cuda::launch…` (a path or `use … as`) and `backend::cuda::{self, launch, …}`
            let path = format!("backend::{backend}::{sub}");
            let direct = code.match_indices(&path).any(|(i, _)| {
                let next = code[i + path.len()..].chars().next();
                !next.is_some_and(|c| c.is_alphanumeric() || c == '_')
            });
            let group = format!("backend::{backend}::{{");
            let in_group = code.match_indices(&group).any(|(i, _)| {
                let items = &code[i + group.len()..];
                let items = &items[..items.find('}').unwrap_or(items.len())];
                items.split(',').any(|it| {
                    let first = it.trim().split(|c: char| !(c.is_alphanumeric() || c == '_')).next();
                    let first = first.unwrap_or("");
                    first == sub
                })
            });
            if direct || in_group {
                bad.push(format!(
                    "src/{rel} uses backend::{backend}::{sub}, an internal of the {backend} backend"
                ));
            }
        }
    }
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}

/// The circles issue 15 named stay broken: the scalar type knows nothing of the CPU
/// backend's SIMD vectors; CLI subcommands share parsing through `cli/args.rs`, never
/// through each other; the volume format modules sit below their dispatchers (`io`,
/// `stream`), sharing their types through `imaging/format.rs`.
#[test]
fn the_broken_import_circles_stay_broken() {
    let src = sources();
    let mut bad = Vec::new();
    let code = |f: &str| src.get(f).unwrap_or_else(|| panic!("src/{f} is missing"));
    if code("real.rs").contains("backend") {
        bad.push("src/real.rs names the backend (real.rs <-> backend/cpu/simd.rs)".to_string());
    }
    for (rel, c) in &src {
        if let Some(name) = rel.strip_prefix("cli/") {
            if name == "mod.rs" || name == "args.rs" {
                continue;
            }
            for sib in [
                "compare", "convert", "core", "demo", "imaging", "infer", "slurm", "train",
            ] {
                if c.contains(&format!("super::{sib}::")) || c.contains(&format!("cli::{sib}::")) {
                    bad.push(format!(
                        "src/{rel} uses cli/{sib}.rs: shared CLI code belongs in cli/args.rs"
                    ));
                }
            }
        }
        let format_module = ["imaging/tiff_io.rs", "imaging/hdf5_io.rs", "imaging/format.rs"].contains(&rel.as_str())
            || rel.starts_with("imaging/stream/");
        if format_module {
            for up in ["super::io::", "imaging::io::", "super::super::io::"] {
                if c.contains(up) {
                    bad.push(format!(
                        "src/{rel} uses the dispatcher imaging/io.rs ({up}): formats sit below it"
                    ));
                }
            }
        }
        if rel == "imaging/format.rs" {
            for m in ["tiff_io", "hdf5_io", "stream", "io::"] {
                if c.contains(&format!("super::{m}")) || c.contains(&format!("imaging::{m}")) {
                    bad.push(format!(
                        "src/imaging/format.rs uses {m}: it is below every format module"
                    ));
                }
            }
        }
    }
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}

/// `backend/` holds the backends only: the benchmarks and the conformance runner are
/// users of them and live in `bench/` and `conformance/`.
#[test]
fn backends_hold_no_benchmarks_or_conformance() {
    for f in [
        "backend/cuda/bench.rs",
        "backend/cuda/train_bench.rs",
        "backend/cuda/conformance.rs",
    ] {
        assert!(!src().join(f).exists(), "src/{f} belongs outside backend/");
    }
    let src = sources();
    for (rel, c) in &src {
        if rel.starts_with("backend/") {
            for up in ["crate::train", "crate::bench", "crate::conformance", "crate::cli"] {
                assert!(!c.contains(up), "src/{rel} uses {up}");
            }
        }
    }
}

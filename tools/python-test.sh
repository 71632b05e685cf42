#!/usr/bin/env bash
# Builds the Python package (python/: the pyo3 extension and the pure-Python modules) into
# the test venv of tools/install-python-venv.sh, the way a user installs it
# (`pip install ./python`, maturin as the PEP 517 backend), and runs its pytest suite
# (python/tests). The Rust build shares target/ (CARGO_TARGET_DIR) with `cargo test`, so
# only the extension crate and the engine library it links are compiled again.
# Extra arguments go to pytest (e.g. -k dask).
set -euo pipefail
cd "$(dirname "$0")/.."
py=$(tools/install-python-venv.sh | tail -n 1)
# the build backend (maturin, from the requirements) runs from the venv's bin/
export PATH="$(dirname "$py"):$PATH"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"
# the CLI the tests compare the bindings against
cargo build --release --bin rln-engine
"$py" -m pip install --quiet --disable-pip-version-check --no-build-isolation --no-deps --force-reinstall ./python
export RLN_ENGINE_BIN="$CARGO_TARGET_DIR/release/rln-engine"
"$py" -m pytest -q python/tests "$@"

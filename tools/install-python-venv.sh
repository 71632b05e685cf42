#!/usr/bin/env bash
# Creates (or reuses) the Python venv of the test tooling at target/py-venv with the
# packages of tools/python-requirements.txt, and prints the venv's python on the last
# line. Tests that need Python look for target/py-venv/bin/python (or $RLN_PYTHON)
# and skip visibly when it is absent; .ci/run calls this script so CI always has it.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${RLN_PY_VENV:-target/py-venv}
req=tools/python-requirements.txt
stamp="$venv/.requirements-installed"
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv" >&2
fi
if [ ! -f "$stamp" ] || ! cmp -s "$req" "$stamp"; then
    "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$req" >&2
    cp "$req" "$stamp"
fi
echo "$(cd "$venv" && pwd)/bin/python"

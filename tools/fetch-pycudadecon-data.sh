#!/usr/bin/env bash
# Fetches the real lattice light-sheet test data that pycudadecon 0.5.1 ships in its sdist
# (im_deskewed.tif 88×320×481 at dz 0.3 µm, its measured PSF psf.tif at 0.1 µm, cudaDecon's
# 10-iteration result im_decon.tif, and otf.tif) from PyPI through pip, into an ignored
# folder; only those files are unpacked. Prints the data folder on the last line.
# tests/real_data.rs reads it (or $RLN_REAL_DATA) and skips visibly when it is absent.
set -euo pipefail
cd "$(dirname "$0")/.."
root=${RLN_REAL_DATA_ROOT:-target/real-data}
dest="$root/pycudadecon-0.5.1/tests/test_data"
files="im_deskewed.tif im_decon.tif psf.tif otf.tif"
sdist="$root/pycudadecon-0.5.1.tar.gz"
sha=244a2d0fe3d663aca4c9ded6e51eb39dc9610b9f3a0546fafb9eb9c9595da048
have=1
for f in $files; do [ -f "$dest/$f" ] || have=0; done
if [ "$have" = 0 ]; then
    mkdir -p "$root"
    if [ ! -f "$sdist" ]; then
        python3 -m pip download --quiet --disable-pip-version-check --no-deps --no-binary :all: \
            pycudadecon==0.5.1 -d "$root" >&2
    fi
    echo "$sha  $sdist" | sha256sum -c --quiet - >&2 || {
        echo "$sdist: unexpected checksum (not pycudadecon 0.5.1's sdist?)" >&2
        exit 1
    }
    members=""
    for f in $files; do members="$members pycudadecon-0.5.1/tests/test_data/$f"; done
    # shellcheck disable=SC2086
    tar xzf "$sdist" -C "$root" $members pycudadecon-0.5.1/LICENSE
fi
echo "$(cd "$dest" && pwd)"

#!/usr/bin/env bash
# GPU check for one short lease (issue 25): runs eval/gpu_check.py, after installing a carried
# bitsandbytes wheel, on a CUDA machine that has torch + transformers and nothing downloadable.
#
#   bash eval/gpu_check.sh [--out DIR] [gpu_check.py flags]   # on the GPU machine (DIR defaults to $OUT)
#   bash eval/gpu_check.sh --smoke --out DIR                   # tiny model on CPU, same code (tests)
#   bash eval/gpu_check.sh --fetch-wheel                       # HERE, before the lease: bitsandbytes wheel
#                                                              # into .whl/ if it fits the 64 MiB that travels
#
# Python: $PYTHON, else .venv/bin/python when the checkout has one, else python3 (the GPU image's).
# The README ("On a GPU") holds the one `run` call that a GPU session makes with this script.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ -x "$ROOT/.venv/bin/python" ]; then PY=$ROOT/.venv/bin/python
else PY=python3
fi
LIMIT=$((64 * 1024 * 1024))  # what travels to the device machine: working tree + carried paths

if [ "${1:-}" = "--fetch-wheel" ]; then
    # The manylinux wheel of the version we pin, for the GPU image's CPython 3.12 (no deps: torch,
    # numpy and packaging, its only requirements, are on the image).
    ver=$(sed -n 's/^bitsandbytes==//p' "$ROOT/constraints.txt")
    [ -n "$ver" ] || { echo "gpu_check: error: no bitsandbytes== pin in constraints.txt" >&2; exit 2; }
    mkdir -p "$ROOT/.whl"
    rm -f "$ROOT"/.whl/bitsandbytes-*.whl "$ROOT/.whl/bitsandbytes.skip"
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$ROOT/.whl" "bitsandbytes==$ver"
    whl=$(ls "$ROOT"/.whl/bitsandbytes-*.whl)
    wbytes=$(stat -c %s "$whl")
    # The tree that travels: tracked + untracked-not-ignored files (+ shared/ when the checkout has one).
    tbytes=$(cd "$ROOT" && git ls-files -z -co --exclude-standard | du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1)
    [ -d "$ROOT/shared" ] && tbytes=$((tbytes + $(du -sb "$ROOT/shared" | cut -f1)))
    mib() { echo "$(( ($1 + 524288) / 1048576 ))"; }
    if [ $((wbytes + tbytes)) -gt $LIMIT ]; then
        rm -f "$whl"
        echo "not run: wheel $(mib "$wbytes") MiB (+ $(mib "$tbytes") MiB working tree) > 64 MiB limit" \
            | tee "$ROOT/.whl/bitsandbytes.skip"
    else
        echo "fits: $(basename "$whl") $(mib "$wbytes") MiB + working tree $(mib "$tbytes") MiB <= 64 MiB; carry .whl"
    fi
    exit 0
fi

smoke=0
for a in "$@"; do [ "$a" = "--smoke" ] && smoke=1; done
if [ $smoke = 0 ] && ls "$ROOT"/.whl/bitsandbytes-*.whl >/dev/null 2>&1 \
        && ! "$PY" -c 'import bitsandbytes' >/dev/null 2>&1; then
    # Install the carried wheel beside the image's packages (not into them): --target + PYTHONPATH.
    site=$(mktemp -d /tmp/gpu_check_site.XXXXXX)
    if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "$ROOT"/.whl/bitsandbytes-*.whl; then
        export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
    else
        echo "gpu_check: the bitsandbytes wheel did not install; the NF4 stage will say why" >&2
    fi
fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
exec "$PY" "$ROOT/eval/gpu_check.py" "$@"

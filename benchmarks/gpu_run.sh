#!/usr/bin/env bash
# The GPU path in one command: install twins-deploy offline, then verify, bench and export svt-s and
# pcpvt-s on torch CUDA inside a time budget (benchmarks/gpu_run.py does the work and says how).
#
#   benchmarks/gpu_run.sh                          # on the GPU machine, after benchmarks/gpu_wheels.sh here
#   DRY_RUN=1 OUT=/tmp/run benchmarks/gpu_run.sh   # the same steps on the CPU: tiny models, one batch size
#
# Writes gpu-run.json, gpu-run.md and gpu-run.log (and install.log) under $OUT (default ./gpu-run).
# BUDGET_S (default 420) is the whole run's time, the install included; PYTHON (default python3).
# The machine has no network: the project is built from this tree with the setuptools wheel in
# .whl/build and installed with --no-index --no-deps into a folder of its own, beside the image's
# packages. If that fails, the run goes on from the source tree and the report says so. A dry run
# installs nothing (CI has no .whl/): it runs the source tree.
set -uo pipefail

started=$(date +%s)
repo=$(cd "$(dirname "$0")/.." && pwd)
out=${OUT:-$PWD/gpu-run}
python=${PYTHON:-python3}
mkdir -p "$out"
cd "$repo" || exit 1

if [[ "${DRY_RUN:-0}" == 1 ]]; then
    install="skipped (dry run): the source tree runs as it is"
    export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
    dry_run=(--dry-run)
else
    site=/tmp/twins-deploy-site
    shopt -s nullglob
    runtime_wheels=(.whl/*.whl)  # none today: gpu_wheels.sh says why
    shopt -u nullglob
    if "$python" -m pip install --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
            --find-links .whl/build . "${runtime_wheels[@]}" >"$out/install.log" 2>&1; then
        install="ok: pip install --no-index --no-deps --target $site (the tree${runtime_wheels:+ and ${#runtime_wheels[@]} wheels}) in $(($(date +%s) - started)) s"
        export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
    else
        install="FAILED ($(tail -n 1 "$out/install.log" | cut -c 1-200)): ran from the source tree, see install.log"
        export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
    fi
    dry_run=()
fi
echo "install: $install"

export PYTHONUNBUFFERED=1
"$python" benchmarks/gpu_run.py --out "$out" --started "$started" --budget-s "${BUDGET_S:-420}" \
    --install "$install" "${dry_run[@]}" 2>&1 | tee "$out/gpu-run.log"

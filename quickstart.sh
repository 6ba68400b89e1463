#!/usr/bin/env bash
# Sets up .venv if needed, then runs the main job on the embedded default.
# Until training lands this is the fastest real job: the balanced-learning
# diagnostics (PNG figures in runs/quickstart/) and the static-shape op timings.
set -euo pipefail
cd "$(dirname "$0")"
python=$(scripts/ensure_venv.sh)
export TF_CPP_MIN_LOG_LEVEL=2 TF_ENABLE_ONEDNN_OPTS=0
"$python" -m libra_jax.diagnostics --out runs/quickstart
"$python" benchmarks/bench_nms.py
"$python" benchmarks/bench_roi_align.py
"$python" benchmarks/bench_samplers.py

#!/usr/bin/env bash
# Sets up .venv if needed, then runs the main job on the embedded default: trains Libra Faster R-CNN
# (a small ResNet-18) on the synthetic shapes dataset, evaluates it and prints the COCO metrics.
# Extra arguments are passed to train.py (e.g. --config.total_steps=200).
set -euo pipefail
cd "$(dirname "$0")"
python=$(scripts/ensure_venv.sh)
export TF_CPP_MIN_LOG_LEVEL=2 TF_ENABLE_ONEDNN_OPTS=0
"$python" train.py --config=configs/shapes_libra_faster_rcnn.py --workdir=runs/quickstart "$@"

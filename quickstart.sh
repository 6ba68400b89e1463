#!/usr/bin/env bash
# Sets up .venv if needed, then runs the main job on the embedded default: trains Libra Faster R-CNN
# (a small ResNet-18) on the synthetic shapes dataset, evaluates it, prints the COCO metrics, and draws
# its detections on six validation images (runs/quickstart/predictions/*.png).
# Extra arguments are passed to train.py (e.g. --config.total_steps=200).
set -euo pipefail
cd "$(dirname "$0")"
python=$(scripts/ensure_venv.sh)
export TF_CPP_MIN_LOG_LEVEL=2 TF_ENABLE_ONEDNN_OPTS=0
config=configs/shapes_libra_faster_rcnn.py
"$python" train.py --config=$config --workdir=runs/quickstart "$@"
"$python" -m libra_jax.predict --config=$config --workdir=runs/quickstart --out=runs/quickstart/predictions \
  --eval_images=6

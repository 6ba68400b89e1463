"""Libra Faster R-CNN, ResNet-101 FPN, 1x schedule, COCO (mmdetection model zoo: 40.1 box AP).

    python train.py --config=configs/libra_faster_rcnn_r101_fpn_1x_coco.py --workdir=runs/libra_faster_rcnn_r101 \\
        --config.data.tfds_data_dir=/data/tfds

Expected cost. mmdetection (8 V100 GPUs, 2 images each): 6.5 GB per GPU, 14.4 images/s in
inference. Not measured here yet; `python benchmarks/run.py` measures R-50 (61.0 M parameters
here against R-50's 42.0 M: `python -m libra_jax.tools.summary --config=<this file>`).
"""

from configs import base_faster_rcnn


def get_config():
  return base_faster_rcnn.get_config(libra=True, depth=101)

"""Libra Faster R-CNN, ResNet-50 FPN, 1x schedule, COCO (mmdetection model zoo: 38.3 box AP).

    python train.py --config=configs/libra_faster_rcnn_r50_fpn_1x_coco.py --workdir=runs/libra_faster_rcnn_r50 \\
        --config.data.tfds_data_dir=/data/tfds

Expected cost. mmdetection (8 V100 GPUs, 2 images each): 4.6 GB per GPU, 19.0 images/s in
inference. Here, on this project's 2-core CPU machine (2026-11-28, `python benchmarks/run.py`,
800 x 1344, batch 1): a train step 48.2 s and 4.7 GB peak, an inference step 5.5 s
(1.3 GB); the 87,960 steps of 16 images of the 1x schedule are for accelerators.
"""

from configs import base_faster_rcnn


def get_config():
  return base_faster_rcnn.get_config(libra=True)

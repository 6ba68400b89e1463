"""Faster R-CNN baseline, ResNet-50 FPN, 1x schedule, COCO (random sampling, FPN only, L1).

    python train.py --config=configs/faster_rcnn_r50_fpn_1x_coco.py --workdir=runs/faster_rcnn_r50 \\
        --config.data.tfds_data_dir=/data/tfds

mmdetection's model zoo gives 37.4 box AP for its Faster R-CNN R-50-FPN 1x. Here, on this
project's 2-core CPU machine (2026-11-28, `python benchmarks/run.py`, 800 x 1344, batch 1): a
train step 51.6 s and 4.2 GB peak, an inference step 5.3 s.
"""

from configs import base_faster_rcnn


def get_config():
  return base_faster_rcnn.get_config(libra=False)

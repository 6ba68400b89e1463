"""Libra RetinaNet, ResNet-50 FPN, 1x schedule, COCO (mmdetection model zoo: 37.6 box AP).

    python train.py --config=configs/libra_retinanet_r50_fpn_1x_coco.py --workdir=runs/libra_retinanet_r50 \\
        --config.data.tfds_data_dir=/data/tfds

Expected cost. mmdetection (8 V100 GPUs, 2 images each): 4.2 GB per GPU, 17.7 images/s in
inference. Here, the RetinaNet baseline (the same network without the BFP) on this project's
2-core CPU machine (2026-11-28, 800 x 1344, batch 1): a train step 34.1 s and 4.0 GB peak, an
inference step 5.0 s.
"""

from configs import base_retinanet


def get_config():
  return base_retinanet.get_config(libra=True)

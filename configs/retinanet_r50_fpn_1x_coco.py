"""RetinaNet baseline, ResNet-50 FPN, 1x schedule, COCO (FPN only, L1).

    python train.py --config=configs/retinanet_r50_fpn_1x_coco.py --workdir=runs/retinanet_r50 \\
        --config.data.tfds_data_dir=/data/tfds

mmdetection's model zoo gives 36.5 box AP for its RetinaNet R-50-FPN 1x. Here, on this project's
2-core CPU machine (2026-11-28, 800 x 1344, batch 1): a train step 34.1 s and 4.0 GB peak, an
inference step 5.0 s.
"""

from configs import base_retinanet


def get_config():
  return base_retinanet.get_config(libra=False)

"""Libra Faster R-CNN, ResNeXt-101 64x4d FPN, 1x schedule, COCO (mmdetection model zoo: 42.7 box AP).

    python train.py --config=configs/libra_faster_rcnn_x101_64x4d_fpn_1x_coco.py --workdir=runs/libra_x101 \\
        --config.data.tfds_data_dir=/data/tfds

Expected cost. mmdetection (8 V100 GPUs, 2 images each): 10.8 GB per GPU, 8.5 images/s in
inference. Not measured here yet.

mmdetection initialises this backbone from open-mmlab://resnext101_64x4d; torchvision's
resnext101_64x4d (IMAGENET1K_V1) has the same architecture and state-dict names.
"""

from configs import base_faster_rcnn


def get_config():
  config = base_faster_rcnn.get_config(libra=True, depth=101)
  config.model.backbone.update(groups=64, base_width=4)
  config.backbone_checkpoint = "checkpoints/resnext101_64x4d-173b62eb.pth"
  return config

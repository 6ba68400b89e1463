"""Libra Faster R-CNN, ResNeXt-101 64x4d FPN, 1x schedule, COCO (mmdetection model zoo: 42.7 box AP).

mmdetection initialises this backbone from open-mmlab://resnext101_64x4d; torchvision's
resnext101_64x4d (IMAGENET1K_V1) has the same architecture and state-dict names.
"""

from configs import base_faster_rcnn


def get_config():
  config = base_faster_rcnn.get_config(libra=True, depth=101)
  config.model.backbone.update(groups=64, base_width=4)
  config.backbone_checkpoint = "checkpoints/resnext101_64x4d-173b62eb.pth"
  return config

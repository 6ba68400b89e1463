"""Faster R-CNN baseline, ResNet-50 FPN, 1x schedule, COCO (random sampling, FPN only, L1)."""

from configs import base_faster_rcnn


def get_config():
  return base_faster_rcnn.get_config(libra=False)

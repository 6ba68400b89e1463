"""Libra Faster R-CNN, ResNet-101 FPN, 1x schedule, COCO (mmdetection model zoo: 40.1 box AP)."""

from configs import base_faster_rcnn


def get_config():
  return base_faster_rcnn.get_config(libra=True, depth=101)

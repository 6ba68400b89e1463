"""Libra Faster R-CNN, ResNet-50 FPN, 1x schedule, COCO (mmdetection model zoo: 38.3 box AP)."""

from configs import base_faster_rcnn


def get_config():
  return base_faster_rcnn.get_config(libra=True)

"""Libra RetinaNet, ResNet-50 FPN, 1x schedule, COCO (mmdetection model zoo: 37.6 box AP)."""

from configs import base_retinanet


def get_config():
  return base_retinanet.get_config(libra=True)

"""RetinaNet baseline, ResNet-50 FPN, 1x schedule, COCO (FPN only, L1)."""

from configs import base_retinanet


def get_config():
  return base_retinanet.get_config(libra=False)

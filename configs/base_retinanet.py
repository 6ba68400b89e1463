"""RetinaNet R-50-FPN on COCO; ``libra=True`` adds the BFP and balanced L1 (beta 0.11).

Numbers from mmdetection 3.3.0 ``configs/libra_rcnn/libra-retinanet_r50_fpn_1x_coco.py``
and ``retinanet_r50_fpn.py`` (../shared/LIBRA_SPEC.md section 1.6).
"""

import ml_collections

from configs import common


def model_config(libra: bool = True, num_classes: int = 80, depth: int = 50) -> ml_collections.ConfigDict:
  """The ``config.model`` section."""
  model = ml_collections.ConfigDict()
  model.type = "retinanet"
  model.num_classes = num_classes
  model.dtype = "float32"
  model.backbone = dict(depth=depth, groups=1, base_width=64, base_channels=64, frozen_stages=1)
  model.neck = dict(out_channels=256, num_outs=5, start_level=1, add_extra_convs="on_input",
                    bfp=dict(refine_level=1, refine_type="non_local") if libra else None)
  model.anchors = dict(scales=(4.0, 4.0 * 2 ** (1 / 3), 4.0 * 2 ** (2 / 3)), ratios=(0.5, 1.0, 2.0),
                       strides=(8, 16, 32, 64, 128))
  model.head = dict(
      feat_channels=256, stacked_convs=4, prior_prob=0.01,
      loss_cls=dict(name="sigmoid_focal", gamma=2.0, alpha=0.25, loss_weight=1.0),
      loss_bbox=(dict(name="balanced_l1", alpha=0.5, gamma=1.5, beta=0.11, loss_weight=1.0) if libra
                 else dict(name="l1", loss_weight=1.0)))
  model.train = dict(assigner=dict(pos_iou_thr=0.5, neg_iou_thr=0.4, min_pos_iou=0.0, match_low_quality=True,
                                   ignore_iof_thr=-1.0))
  # own_padding: each image computes as if padded only to its own multiple of 32, as mmdetection's test does.
  model.test = dict(nms_pre=1000, score_thr=0.05, iou_threshold=0.5, max_per_img=100, min_bbox_size=0.0,
                    own_padding=True)
  return model


def get_config(libra: bool = True, depth: int = 50) -> ml_collections.ConfigDict:
  return common.coco_config(model_config(libra, depth=depth), lr_per_16=0.01, depth=depth)

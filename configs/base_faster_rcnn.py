"""Faster R-CNN R-50-FPN on COCO with the three Libra R-CNN parts as switches.

Every number is the reference's (mmdetection 3.3.0 ``configs/libra_rcnn`` and
its bases; ../shared/LIBRA_SPEC.md sections 1.1-1.7). ``get_config(libra=True)``
is Libra Faster R-CNN; ``libra=False`` the Faster R-CNN baseline. The switches
``model.neck.bfp`` (None or the BFP settings), ``model.train.rcnn.sampler.type``
(``"libra"`` or ``"random"``) and ``model.rcnn.loss_bbox`` (``balanced_l1`` or
``l1``) can also be set one by one, which is what the ablation does.
"""

import ml_collections

from configs import common


def model_config(libra: bool = True, num_classes: int = 80, depth: int = 50) -> ml_collections.ConfigDict:
  """The ``config.model`` section."""
  model = ml_collections.ConfigDict()
  model.type = "faster_rcnn"
  model.num_classes = num_classes
  model.dtype = "float32"
  model.backbone = dict(depth=depth, groups=1, base_width=64, base_channels=64, frozen_stages=1)
  model.neck = dict(out_channels=256, num_outs=5, start_level=0, add_extra_convs=None,
                    bfp=dict(refine_level=2, refine_type="non_local") if libra else None)
  model.anchors = dict(scales=(8.0,), ratios=(0.5, 1.0, 2.0), strides=(4, 8, 16, 32, 64))
  model.rpn = dict(feat_channels=256,
                   loss_cls=dict(name="sigmoid_cross_entropy", loss_weight=1.0),
                   loss_bbox=dict(name="l1", loss_weight=1.0))
  model.rcnn = dict(
      # sampling_ratio 0: mmcv's adaptive RoIAlign grid, as the reference; a fixed ratio (e.g. 2) is faster.
      fc_channels=1024, roi_size=7, sampling_ratio=0, roi_strides=(4, 8, 16, 32), finest_scale=56,
      target_stds=(0.1, 0.1, 0.2, 0.2),
      loss_cls=dict(name="cross_entropy", loss_weight=1.0),
      loss_bbox=(dict(name="balanced_l1", alpha=0.5, gamma=1.5, beta=1.0, loss_weight=1.0) if libra
                 else dict(name="l1", loss_weight=1.0)))
  rcnn_sampler = (dict(type="libra", num=512, pos_fraction=0.25, floor_thr=0.0, floor_fraction=0.0, num_bins=3)
                  if libra else dict(type="random", num=512, pos_fraction=0.25, neg_pos_ub=-1))
  model.train = dict(
      rpn=dict(assigner=dict(pos_iou_thr=0.7, neg_iou_thr=0.3, min_pos_iou=0.3, match_low_quality=True,
                             ignore_iof_thr=-1.0),
               sampler=dict(num=256, pos_fraction=0.5, neg_pos_ub=5 if libra else -1)),
      rpn_proposal=dict(nms_pre=2000, max_per_img=1000, iou_threshold=0.7, min_bbox_size=0.0),
      rcnn=dict(assigner=dict(pos_iou_thr=0.5, neg_iou_thr=0.5, min_pos_iou=0.5, match_low_quality=False,
                              ignore_iof_thr=-1.0),
                sampler=rcnn_sampler, target_stds=(0.1, 0.1, 0.2, 0.2)))
  # own_padding: each image computes as if padded only to its own multiple of 32, as mmdetection's test does.
  model.test = dict(
      own_padding=True,
      rpn_proposal=dict(nms_pre=1000, max_per_img=1000, iou_threshold=0.7, min_bbox_size=0.0),
      # pre_nms_top_k: the static cap on (RoI, class) pairs entering NMS (the reference has none).
      rcnn=dict(score_thr=0.05, iou_threshold=0.5, max_per_img=100, pre_nms_top_k=2000))
  return model


def get_config(libra: bool = True, depth: int = 50) -> ml_collections.ConfigDict:
  return common.coco_config(model_config(libra, depth=depth), lr_per_16=0.02, depth=depth)

"""RetinaNet head: conv towers, focal-loss targets and losses, and detections.

Parameters mirror mmdetection's ``RetinaHead``: ``cls_convs/{i}/conv``,
``reg_convs/{i}/conv``, ``retina_cls`` and ``retina_reg``. Targets and
detections are pure functions of one image; :func:`retina_loss` gives the
losses of a batch.
"""

import functools
import math
from typing import Any, Dict, NamedTuple, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from libra_jax import losses

from libra_jax.models.layers import ConvModuleList, SharedFilterConv
from libra_jax.models.own_padding import OwnArea
from libra_jax.models.postprocess import Detections, drop_small, nms_detections
from libra_jax.ops import boxes as box_ops
from libra_jax.ops import conv as conv_ops
from libra_jax.ops.assign import max_iou_assign


class RetinaHead(nn.Module):
  """Two towers of ``stacked_convs`` 3x3 convs + ReLU, then 3x3 class and box convs per level.

  Attributes:
    num_classes: C (sigmoid per class, no background logit).
    num_anchors: A per location (9).
    feat_channels: tower width (256).
    stacked_convs: tower depth (4).
    prior_prob: initial foreground probability of the class logits (0.01).
    dtype: computation dtype.
  """
  num_classes: int
  num_anchors: int = 9
  feat_channels: int = 256
  stacked_convs: int = 4
  prior_prob: float = 0.01
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, features: Sequence[jnp.ndarray], area: Optional[OwnArea] = None,
               strides: Sequence[int] = ()) -> Tuple[jnp.ndarray, jnp.ndarray]:
    """Levels ``[B, H_l, W_l, C_in]`` -> ``(logits [B, N, num_classes], deltas [B, N, 4])``.

    With ``area`` (and the levels' ``strides``), every 3x3 conv reads zeros outside each image's own area.
    """
    init = nn.initializers.normal(0.01)
    cls_convs = ConvModuleList(self.feat_channels, kernel_init=init, dtype=self.dtype, name="cls_convs")
    reg_convs = ConvModuleList(self.feat_channels, kernel_init=init, dtype=self.dtype, name="reg_convs")
    prior_bias = -math.log((1 - self.prior_prob) / self.prior_prob)
    retina_cls = SharedFilterConv(self.num_anchors * self.num_classes, 3, name="retina_cls", kernel_init=init,
                                  bias_init=nn.initializers.constant(prior_bias), dtype=self.dtype)
    retina_reg = SharedFilterConv(self.num_anchors * 4, 3, name="retina_reg", kernel_init=init, dtype=self.dtype)
    if area is None:
      inside = tuple
    else:
      inside = lambda maps: tuple(area.zero_outside(x, stride=s) for x, s in zip(maps, strides))
    # Layer by layer over every level: each layer's filter runs on the levels together (SharedFilterConv).
    cls_maps, reg_maps = tuple(features), tuple(features)
    for i in range(self.stacked_convs):
      cls_maps = cls_convs(inside(cls_maps), i, use_relu=True)
      reg_maps = reg_convs(inside(reg_maps), i, use_relu=True)
    batch = features[0].shape[0]
    logits = [y.reshape(batch, -1, self.num_classes) for y in retina_cls(inside(cls_maps))]
    deltas = [y.reshape(batch, -1, 4) for y in retina_reg(inside(reg_maps))]
    # The focal loss's gradient is costly per element: computed once, not in each reader of the class conv's
    # Winograd backward (conv.materialize_cotangent).
    return (conv_ops.materialize_cotangent(jnp.concatenate(logits, axis=1).astype(jnp.float32)),
            jnp.concatenate(deltas, axis=1).astype(jnp.float32))


class RetinaTargets(NamedTuple):
  """Per-anchor targets of one image (``[N]`` unless noted)."""
  labels: jnp.ndarray         # int32 class, num_classes for background
  label_weights: jnp.ndarray  # float32 1 for positives and negatives
  deltas: jnp.ndarray         # [N, 4] encoded matched gt
  matched_boxes: jnp.ndarray  # [N, 4]
  delta_weights: jnp.ndarray  # float32 1 for positives
  num_pos: jnp.ndarray        # float32 scalar, max(#positives, 1)


def retina_targets(anchors, anchor_valid, gt_boxes, gt_labels, gt_valid, ignore_boxes, ignore_valid,
                   num_classes: int, cfg: Dict) -> RetinaTargets:
  """Every valid anchor assigned (no sampling: mmdetection's ``PseudoSampler``).

  Args:
    anchors: ``[N, 4]``; anchor_valid: ``[N]`` bool.
    gt_boxes: ``[G, 4]``; gt_labels: ``[G]`` int32; gt_valid: ``[G]`` bool.
    ignore_boxes, ignore_valid: crowd regions ``[G, 4]``, ``[G]``.
    num_classes: C.
    cfg: ``assigner`` (``max_iou_assign`` keywords).
  """
  gt_inds, _ = max_iou_assign(anchors, gt_boxes, gt_valid, ignore_boxes=ignore_boxes,
                              ignore_valid=ignore_valid, **cfg["assigner"])
  gt_inds = jnp.where(anchor_valid, gt_inds, -1)
  positive = gt_inds > 0
  matched = jnp.maximum(gt_inds - 1, 0)
  matched_boxes = gt_boxes[matched]
  unit = jnp.array([0.0, 0.0, 1.0, 1.0])
  deltas = box_ops.encode_deltas(jnp.where(positive[:, None], anchors, unit),
                                 jnp.where(positive[:, None], matched_boxes, unit))
  return RetinaTargets(labels=jnp.where(positive, gt_labels[matched], num_classes).astype(jnp.int32),
                       label_weights=(gt_inds >= 0).astype(jnp.float32), deltas=deltas,
                       matched_boxes=matched_boxes, delta_weights=positive.astype(jnp.float32),
                       num_pos=jnp.maximum(jnp.sum(positive), 1).astype(jnp.float32))


def retina_loss(cls_logits, deltas, anchors, anchor_valid, gt_boxes, gt_labels, gt_valid, ignore_valid,
                example_valid, train_cfg: Dict, loss_cfg: Dict, axis_name: Optional[str] = None
                ) -> Dict[str, jnp.ndarray]:
  """RetinaNet losses of a batch: each image's anchor targets, then the focal and box losses.

  Both losses are normalized by the number of positive anchors of the global
  batch (summed over ``axis_name`` too), so each device's losses are its
  share of the global-batch loss.

  Args:
    cls_logits: ``[B, N, C]`` float32 class logits; deltas: ``[B, N, 4]`` float32.
    anchors: ``[N, 4]`` xyxy pixels, all levels (the same for every image).
    anchor_valid: ``[B, N]`` bool, anchors on each image's own padded area.
    gt_boxes: ``[B, G, 4]`` xyxy pixels; gt_labels: ``[B, G]`` int32;
      gt_valid: ``[B, G]`` bool.
    ignore_valid: ``[B, G]`` bool, the rows of ``gt_boxes`` that are crowd regions.
    example_valid: ``[B]`` float32, 0 for padding examples.
    train_cfg: ``assigner`` (see :func:`retina_targets`).
    loss_cfg: the model's ``head`` section: ``loss_cls`` and ``loss_bbox`` configs.
    axis_name: the data-parallel mesh axis, or None.

  Returns:
    float32 scalars ``loss_cls``, ``loss_bbox`` and the diagnostic
    ``num_pos_anchors`` (positive anchors per example).
  """
  targets = jax.vmap(functools.partial(retina_targets, anchors=anchors, num_classes=cls_logits.shape[-1],
                                       cfg=train_cfg))(
      anchor_valid=anchor_valid, gt_boxes=gt_boxes, gt_labels=gt_labels, gt_valid=gt_valid, ignore_boxes=gt_boxes,
      ignore_valid=ignore_valid)
  num_pos = jnp.maximum(losses.global_sum(jnp.sum(targets.num_pos * example_valid), axis_name), 1.0)
  label_weights = targets.label_weights * example_valid[:, None]
  delta_weights = targets.delta_weights * example_valid[:, None]
  loss_cls = losses.build_loss(loss_cfg["loss_cls"])(cls_logits, targets.labels, label_weights[..., None], num_pos)
  loss_bbox = losses.box_regression_loss(losses.build_loss(loss_cfg["loss_bbox"]), deltas, anchors[None],
                                         targets.deltas, targets.matched_boxes, delta_weights, num_pos)
  return {"loss_cls": loss_cls, "loss_bbox": loss_bbox,
          "num_pos_anchors": jnp.sum(targets.num_pos * example_valid) / cls_logits.shape[0]}


def retina_detections(cls_logits, deltas, anchors_per_level: Sequence[jnp.ndarray], anchor_valid, image_shape,
                      nms_pre: int, score_thr: float, iou_threshold: float, max_per_img: int,
                      min_bbox_size: float = 0.0) -> Detections:
  """Detections of one image: per level the best ``nms_pre`` (anchor, class) pairs above
  ``score_thr``, decoded and clipped; tiny boxes dropped; per-class NMS; best ``max_per_img``.

  Args:
    cls_logits: ``[N, C]``; deltas: ``[N, 4]``; anchor_valid: ``[N]`` bool.
    anchors_per_level: the ``[N_l, 4]`` anchors of each level.
    image_shape: ``[2]`` (h, w).
  """
  num_classes = cls_logits.shape[-1]
  scores = jnp.where(anchor_valid[:, None], jax.nn.sigmoid(cls_logits), -jnp.inf)
  scores = jnp.where(scores > score_thr, scores, -jnp.inf)
  kept_scores, kept_boxes, kept_classes = [], [], []
  start = 0
  for anchors in anchors_per_level:
    stop = start + anchors.shape[0]
    flat = scores[start:stop].reshape(-1)
    top_scores, top = jax.lax.top_k(flat, min(nms_pre, flat.shape[0]))
    anchor_index = top // num_classes
    kept_scores.append(top_scores)
    kept_boxes.append(box_ops.decode_deltas(anchors[anchor_index], deltas[start:stop][anchor_index],
                                            max_shape=image_shape))
    kept_classes.append((top % num_classes).astype(jnp.int32))
    start = stop
  scores, boxes = jnp.concatenate(kept_scores), jnp.concatenate(kept_boxes)
  classes = jnp.concatenate(kept_classes)
  return nms_detections(boxes, drop_small(boxes, scores, min_bbox_size), classes, iou_threshold, max_per_img)

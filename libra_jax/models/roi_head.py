"""The R-CNN stage: RoI sampling and targets, the shared-2fc box head, its losses, detections.

``roi_head/bbox_head/{shared_fcs/0, shared_fcs/1, fc_cls, fc_reg}`` mirror
mmdetection's ``Shared2FCBBoxHead``. RoI features are flattened in PyTorch's
channel-major order (C, 7, 7), so ``shared_fcs.0`` converts by the generic
dense rule.
"""

import functools
from typing import Any, Dict, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from libra_jax import losses
from libra_jax.models import params
from libra_jax.models.postprocess import Detections, nms_detections
from libra_jax.ops import boxes as box_ops
from libra_jax.ops.assign import max_iou_assign
from libra_jax.ops.sample import SAMPLERS


class BBoxHead(nn.Module):
  """Flatten -> fc + ReLU -> fc + ReLU -> class logits (C + 1) and class-specific deltas (4C).

  Attributes:
    num_classes: C object classes; logit C is background.
    fc_channels: width of the two shared layers (1024).
    dtype: computation dtype.
  """
  num_classes: int
  fc_channels: int = 1024
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, roi_features: jnp.ndarray):
    """``[K, S, S, C]`` -> ``(logits [K, num_classes + 1], deltas [K, 4 num_classes])``, float32."""
    x = jnp.transpose(roi_features, (0, 3, 1, 2)).reshape(roi_features.shape[0], -1).astype(self.dtype)
    dense = lambda features, init, name: params.Dense(features, kernel_init=init, dtype=self.dtype,
                                                      param_dtype=jnp.float32, name=name)
    shared = _Numbered(name="shared_fcs")
    x = nn.relu(shared(x, 0, self.fc_channels, self.dtype))
    x = nn.relu(shared(x, 1, self.fc_channels, self.dtype))
    logits = dense(self.num_classes + 1, nn.initializers.normal(0.01), "fc_cls")(x)
    deltas = dense(4 * self.num_classes, nn.initializers.normal(0.001), "fc_reg")(x)
    return logits.astype(jnp.float32), deltas.astype(jnp.float32)


class _Numbered(nn.Module):
  """Dense layers named ``"0"``, ``"1"``, ... (an ``nn.ModuleList`` of Linear)."""

  @nn.compact
  def __call__(self, x, index: int, features: int, dtype):
    return params.Dense(features, kernel_init=nn.initializers.xavier_uniform(), dtype=dtype,
                        param_dtype=jnp.float32, name=str(index))(x)


class RoIHead(nn.Module):
  """Container that gives the box head mmdetection's ``roi_head.bbox_head`` prefix."""
  num_classes: int
  fc_channels: int = 1024
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, roi_features):
    return BBoxHead(self.num_classes, self.fc_channels, self.dtype, name="bbox_head")(roi_features)


class SampledRoIs(NamedTuple):
  """The ``S`` RoIs sampled for one image and their targets."""
  rois: jnp.ndarray           # [S, 4] xyxy pixels
  valid: jnp.ndarray          # [S] bool (false only when there were fewer candidates than S)
  labels: jnp.ndarray         # [S] int32 class, num_classes for background
  is_positive: jnp.ndarray    # [S] bool
  deltas: jnp.ndarray         # [S, 4] encoded matched gt (positives only meaningful)
  matched_boxes: jnp.ndarray  # [S, 4] matched gt boxes (positives only meaningful)
  max_iou: jnp.ndarray        # [S] IoU with the best gt


def sample_rois(key, proposals, proposal_valid, gt_boxes, gt_labels, gt_valid, ignore_boxes, ignore_valid,
                num_classes: int, cfg: Dict) -> SampledRoIs:
  """Assigns the proposals of one image (gts added as proposals) and samples ``cfg.sampler.num``.

  The gts are prepended to the candidates and assigned to themselves with IoU
  1 (mmdetection's ``add_gt_as_proposals``). The sampler is chosen by name
  from :data:`~libra_jax.ops.sample.SAMPLERS`: ``"random"`` (baseline) or
  ``"libra"`` (instance-balanced positives + IoU-balanced negatives).

  Args:
    key: PRNG key.
    proposals: ``[P, 4]``; proposal_valid: ``[P]`` bool.
    gt_boxes: ``[G, 4]``; gt_labels: ``[G]`` int32; gt_valid: ``[G]`` bool.
    ignore_boxes, ignore_valid: ``[G, 4]``, ``[G]`` crowd regions.
    num_classes: C.
    cfg: ``assigner`` (``max_iou_assign`` keywords), ``sampler`` (``type``,
      ``num``, ``pos_fraction`` and the sampler's own keywords),
      ``target_stds``.
  """
  num_gts = gt_boxes.shape[0]
  num = cfg["sampler"]["num"]
  # With fewer candidate rows than samples (tiny configs), invalid rows fill the sample.
  filler = max(num - num_gts - proposals.shape[0], 0)
  candidates = jnp.concatenate([gt_boxes, proposals, jnp.zeros((filler, 4), proposals.dtype)], axis=0)
  candidate_valid = jnp.concatenate([gt_valid, proposal_valid, jnp.zeros((filler,), bool)])
  gt_inds, max_iou = max_iou_assign(candidates, gt_boxes, gt_valid, ignore_boxes=ignore_boxes,
                                    ignore_valid=ignore_valid, **cfg["assigner"])
  own = jnp.arange(1, num_gts + 1, dtype=jnp.int32)
  gt_inds = gt_inds.at[:num_gts].set(jnp.where(gt_valid, own, -1))
  max_iou = max_iou.at[:num_gts].set(jnp.where(gt_valid, 1.0, 0.0))
  gt_inds = jnp.where(candidate_valid, gt_inds, -1)
  max_iou = jnp.where(candidate_valid, max_iou, 0.0)

  hparams = dict(cfg["sampler"])
  sampler = SAMPLERS.get(hparams.pop("type"))
  positives, negatives = sampler(key, gt_inds, max_iou=max_iou, valid=candidate_valid, **hparams)

  # Positives first, then negatives, then the rest: the first `num` rows are the sample.
  order = jnp.argsort(jnp.where(positives, 0, jnp.where(negatives, 1, 2)), stable=True)[:num]
  is_positive = positives[order]
  valid = is_positive | negatives[order]
  rois = candidates[order]
  matched_gt = jnp.maximum(gt_inds[order] - 1, 0)
  matched_boxes = gt_boxes[matched_gt]
  labels = jnp.where(is_positive, gt_labels[matched_gt], num_classes).astype(jnp.int32)
  unit = jnp.array([0.0, 0.0, 1.0, 1.0])
  deltas = box_ops.encode_deltas(jnp.where(is_positive[:, None], rois, unit),
                                 jnp.where(is_positive[:, None], matched_boxes, unit), stds=cfg["target_stds"])
  return SampledRoIs(rois=rois, valid=valid, labels=labels, is_positive=is_positive, deltas=deltas,
                     matched_boxes=matched_boxes, max_iou=max_iou[order])


def rcnn_loss(cls_logits, reg_deltas, sampled: SampledRoIs, example_valid, cfg: Dict,
              axis_name: Optional[str] = None) -> Dict[str, jnp.ndarray]:
  """R-CNN losses of a batch given its sampled RoIs and the box head's outputs on them.

  Both losses are normalized by the number of sampled RoIs of the global batch
  (summed over ``axis_name`` too), so each device's losses are its share of
  the global-batch loss.

  Args:
    cls_logits: ``[B, S, C + 1]`` float32 class logits (C is background).
    reg_deltas: ``[B, S, 4C]`` float32 class-specific deltas.
    sampled: :class:`SampledRoIs` with a leading batch axis ``[B, S, ...]``.
    example_valid: ``[B]`` float32, 0 for padding examples.
    cfg: the model's ``rcnn`` section: ``loss_cls``, ``loss_bbox`` (loss
      configs) and ``target_stds``.
    axis_name: the data-parallel mesh axis, or None.

  Returns:
    float32 scalars: ``loss_cls``, ``loss_bbox``, and the diagnostics
    ``num_pos_rois`` (sampled positives per example), ``mean_pos_iou`` (their
    mean IoU with their gt) and ``rcnn_accuracy`` (over the valid samples).
  """
  num_classes = cls_logits.shape[-1] - 1
  roi_weights = sampled.valid * example_valid[:, None]
  num_rois = jnp.maximum(losses.global_sum(jnp.sum(roi_weights), axis_name), 1.0)
  loss_cls = losses.build_loss(cfg["loss_cls"])(cls_logits, sampled.labels, roi_weights, num_rois)
  pos_weights = (sampled.is_positive * example_valid[:, None]).astype(jnp.float32)
  own_deltas = jax.vmap(functools.partial(class_deltas, num_classes=num_classes))(reg_deltas, sampled.labels)
  loss_bbox = losses.box_regression_loss(losses.build_loss(cfg["loss_bbox"]), own_deltas, sampled.rois,
                                         sampled.deltas, sampled.matched_boxes, pos_weights, num_rois,
                                         stds=cfg["target_stds"])
  predicted = jnp.argmax(cls_logits, axis=-1)
  return {"loss_cls": loss_cls, "loss_bbox": loss_bbox,
          "num_pos_rois": jnp.sum(pos_weights) / cls_logits.shape[0],
          "mean_pos_iou": _masked_mean(sampled.max_iou, pos_weights > 0),
          "rcnn_accuracy": _masked_mean((predicted == sampled.labels).astype(jnp.float32), roi_weights > 0)}


def _masked_mean(values, mask):
  """Mean of ``values`` where ``mask``; 0 where nothing is masked in."""
  return jnp.sum(jnp.where(mask, values, 0.0)) / jnp.maximum(jnp.sum(mask), 1)


def class_deltas(deltas, labels, num_classes: int):
  """Deltas ``[K, 4C]`` of each row's own class -> ``[K, 4]`` (background rows, weighted 0, read the last class)."""
  per_class = deltas.reshape(deltas.shape[0], num_classes, 4)
  return jnp.take_along_axis(per_class, jnp.clip(labels, 0, num_classes - 1)[:, None, None], axis=1)[:, 0]


def detect_boxes(boxes_per_class, class_scores, candidate_valid, score_thr: float, iou_threshold: float,
                 max_per_img: int, pre_nms_top_k: int) -> Detections:
  """Per-class score threshold and NMS, then the best ``max_per_img`` of one image.

  mmdetection runs NMS on every (RoI, class) pair above ``score_thr``, a
  data-dependent number (up to 80,000 for 1,000 RoIs and 80 classes). With
  static shapes we keep the ``pre_nms_top_k`` best pairs above the threshold
  first; a pair outside them could only matter if more than ``pre_nms_top_k
  - max_per_img`` better pairs were suppressed.

  Args:
    boxes_per_class: ``[K, C, 4]`` decoded boxes.
    class_scores: ``[K, C]`` probabilities of the object classes.
    candidate_valid: ``[K]`` bool.
    score_thr, iou_threshold, max_per_img: test settings (0.05, 0.5, 100).
    pre_nms_top_k: pairs kept for NMS.
  """
  num_rois, num_classes = class_scores.shape
  scores = jnp.where(candidate_valid[:, None] & (class_scores > score_thr), class_scores, -jnp.inf).reshape(-1)
  scores, top = jax.lax.top_k(scores, min(pre_nms_top_k, scores.shape[0]))
  boxes = boxes_per_class.reshape(-1, 4)[top]
  classes = (top % num_classes).astype(jnp.int32)
  return nms_detections(boxes, scores, classes, iou_threshold, max_per_img)

"""Region proposal network: head, training targets and losses, proposals.

The head is a Flax module (``rpn_conv``, ``rpn_cls``, ``rpn_reg`` as in
mmdetection); targets and proposal generation are pure functions of one image,
vmapped over the batch (by :func:`rpn_loss` and the detector), and
:func:`rpn_loss` gives the losses of a batch. Anchor rows run over
levels, then (y, x, anchor) as in :mod:`libra_jax.ops.anchors`, which is also
the order in which the head's NHWC outputs flatten.
"""

import functools
from typing import Any, Dict, NamedTuple, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from libra_jax import losses
from libra_jax.models.layers import SharedFilterConv, conv2d
from libra_jax.models.own_padding import OwnArea
from libra_jax.models.postprocess import drop_small, nms_detections
from libra_jax.ops import boxes as box_ops
from libra_jax.ops.assign import max_iou_assign
from libra_jax.ops.sample import random_positives_negatives


class RPNHead(nn.Module):
  """Shared 3x3 conv + ReLU, then 1x1 objectness (A) and 1x1 deltas (4A) per level.

  Attributes:
    num_anchors: A, anchors per location.
    feat_channels: channels of the shared conv.
    dtype: computation dtype.
  """
  num_anchors: int = 3
  feat_channels: int = 256
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, features: Sequence[jnp.ndarray], area: Optional[OwnArea] = None,
               strides: Sequence[int] = ()) -> Tuple[jnp.ndarray, jnp.ndarray]:
    """Levels ``[B, H_l, W_l, C]`` -> ``(logits [B, N], deltas [B, N, 4])``, N = sum H_l W_l A.

    With ``area`` (and the levels' ``strides``), the 3x3 conv reads zeros outside each image's own area.
    """
    init = nn.initializers.normal(0.01)
    shared = SharedFilterConv(self.feat_channels, 3, name="rpn_conv", kernel_init=init, dtype=self.dtype)
    cls = conv2d(self.num_anchors, 1, name="rpn_cls", kernel_init=init, dtype=self.dtype)
    reg = conv2d(4 * self.num_anchors, 1, name="rpn_reg", kernel_init=init, dtype=self.dtype)
    if area is not None:
      features = [area.zero_outside(x, strides[level]) for level, x in enumerate(features)]
    logits, deltas = [], []
    for x in shared(features):  # the 3x3 conv's one filter on every level together (SharedFilterConv)
      x = nn.relu(x)
      batch = x.shape[0]
      logits.append(cls(x).reshape(batch, -1))
      deltas.append(reg(x).reshape(batch, -1, 4))
    return (jnp.concatenate(logits, axis=1).astype(jnp.float32),
            jnp.concatenate(deltas, axis=1).astype(jnp.float32))


class RPNTargets(NamedTuple):
  """Per-anchor training targets of one image (all ``[N]`` unless noted)."""
  labels: jnp.ndarray         # float32 objectness target (1 positive, 0 negative)
  label_weights: jnp.ndarray  # float32 1 for sampled anchors
  deltas: jnp.ndarray         # [N, 4] float32 encoded gt boxes (stds 1)
  delta_weights: jnp.ndarray  # float32 1 for sampled positives
  num_samples: jnp.ndarray    # int32 scalar, sampled positives + negatives


def rpn_targets(key, anchors, anchor_valid, gt_boxes, gt_valid, ignore_boxes, ignore_valid,
                cfg: Dict) -> RPNTargets:
  """Assigns and samples anchors of one image for the RPN losses.

  Args:
    key: PRNG key for the sampler.
    anchors: ``[N, 4]`` xyxy pixels, all levels.
    anchor_valid: ``[N]`` bool, anchors on the image's own padded area.
    gt_boxes: ``[G, 4]``; gt_valid: ``[G]`` bool.
    ignore_boxes: ``[G, 4]`` crowd regions; ignore_valid: ``[G]`` bool.
    cfg: ``assigner`` (``max_iou_assign`` keywords) and ``sampler``
      (``num``, ``pos_fraction``, ``neg_pos_ub``).
  """
  gt_inds, _ = max_iou_assign(anchors, gt_boxes, gt_valid, ignore_boxes=ignore_boxes,
                              ignore_valid=ignore_valid, **cfg["assigner"])
  positives, negatives = random_positives_negatives(key, gt_inds, valid=anchor_valid, **cfg["sampler"])
  matched = gt_boxes[jnp.maximum(gt_inds - 1, 0)]
  # Unassigned rows encode against a unit box so no NaN appears where the weight is 0.
  safe_anchors = jnp.where(positives[:, None], anchors, jnp.array([0.0, 0.0, 1.0, 1.0]))
  safe_matched = jnp.where(positives[:, None], matched, jnp.array([0.0, 0.0, 1.0, 1.0]))
  deltas = box_ops.encode_deltas(safe_anchors, safe_matched)
  sampled = positives | negatives
  return RPNTargets(labels=positives.astype(jnp.float32), label_weights=sampled.astype(jnp.float32),
                    deltas=deltas, delta_weights=positives.astype(jnp.float32),
                    num_samples=jnp.maximum(jnp.sum(sampled, dtype=jnp.int32), 1))


def rpn_loss(keys, logits, deltas, anchors, anchor_valid, gt_boxes, gt_valid, ignore_valid, example_valid,
             train_cfg: Dict, loss_cfg: Dict, axis_name: Optional[str] = None) -> Dict[str, jnp.ndarray]:
  """RPN losses of a batch: each image's anchor targets, then the objectness and box losses.

  Both losses are normalized by the number of sampled anchors of the global
  batch (summed over ``axis_name`` too), so each device's losses are its
  share of the global-batch loss.

  Args:
    keys: ``[B]`` PRNG keys for the anchor sampler.
    logits: ``[B, N]`` float32 objectness logits; deltas: ``[B, N, 4]`` float32.
    anchors: ``[N, 4]`` xyxy pixels, all levels (the same for every image).
    anchor_valid: ``[B, N]`` bool, anchors on each image's own padded area.
    gt_boxes: ``[B, G, 4]`` xyxy pixels; gt_valid: ``[B, G]`` bool.
    ignore_valid: ``[B, G]`` bool, the rows of ``gt_boxes`` that are crowd regions.
    example_valid: ``[B]`` float32, 0 for padding examples.
    train_cfg: ``assigner`` and ``sampler`` (see :func:`rpn_targets`).
    loss_cfg: the model's ``rpn`` section: ``loss_cls`` and ``loss_bbox`` (a
      ``"deltas"`` loss) configs.
    axis_name: the data-parallel mesh axis, or None.

  Returns:
    float32 scalars ``loss_rpn_cls``, ``loss_rpn_bbox`` and the diagnostic
    ``rpn_num_pos`` (sampled positive anchors per example).
  """
  targets = jax.vmap(functools.partial(rpn_targets, anchors=anchors, cfg=train_cfg))(
      key=keys, anchor_valid=anchor_valid, gt_boxes=gt_boxes, gt_valid=gt_valid, ignore_boxes=gt_boxes,
      ignore_valid=ignore_valid)
  num_samples = losses.global_sum(jnp.sum(targets.num_samples * example_valid), axis_name)
  label_weights = targets.label_weights * example_valid[:, None]
  delta_weights = targets.delta_weights * example_valid[:, None]
  loss_cls = losses.build_loss(loss_cfg["loss_cls"])(logits, targets.labels, label_weights, num_samples)
  loss_bbox = losses.build_loss(loss_cfg["loss_bbox"])(deltas, targets.deltas, delta_weights[..., None], num_samples)
  return {"loss_rpn_cls": loss_cls, "loss_rpn_bbox": loss_bbox,
          "rpn_num_pos": jnp.sum(targets.delta_weights) / logits.shape[0]}


class Proposals(NamedTuple):
  """Fixed-size proposals of one image."""
  boxes: jnp.ndarray   # [P, 4] xyxy pixels, clipped to the image
  scores: jnp.ndarray  # [P] objectness probabilities, descending
  valid: jnp.ndarray   # [P] bool


def rpn_proposals(logits, deltas, anchors_per_level: Sequence[jnp.ndarray], anchor_valid, image_shape,
                  nms_pre: int, max_per_img: int, iou_threshold: float,
                  min_bbox_size: float = 0.0) -> Proposals:
  """Proposals of one image: per-level top-k, decode, clip, drop tiny, per-level NMS.

  mmdetection's ``RPNHead._predict_by_feat_single``: each level keeps its
  ``nms_pre`` best anchors by objectness; the kept deltas are decoded against
  their anchors and clipped to ``image_shape``; boxes with width or height
  ``<= min_bbox_size`` are dropped; NMS runs per level and the best
  ``max_per_img`` survivors across levels are returned. Anchors off the
  image's padded area (``anchor_valid`` false, only present in our larger
  padding buckets) are never proposed.

  Args:
    logits: ``[N]`` objectness logits of all levels.
    deltas: ``[N, 4]``.
    anchors_per_level: the ``[N_l, 4]`` anchors of each level (static sizes).
    anchor_valid: ``[N]`` bool.
    image_shape: ``[2]`` (h, w) of the resized image.
    nms_pre, max_per_img, iou_threshold, min_bbox_size: as in the spec.

  Returns:
    :class:`Proposals` with ``P = max_per_img`` rows.
  """
  scores = jnp.where(anchor_valid, jax.nn.sigmoid(logits), -jnp.inf)
  kept_scores, kept_boxes, kept_levels = [], [], []
  start = 0
  for level, anchors in enumerate(anchors_per_level):
    stop = start + anchors.shape[0]
    level_scores, top = jax.lax.top_k(scores[start:stop], min(nms_pre, stop - start))
    kept_scores.append(level_scores)
    kept_boxes.append(box_ops.decode_deltas(anchors[top], deltas[start:stop][top], max_shape=image_shape))
    kept_levels.append(jnp.full(top.shape, level, jnp.int32))
    start = stop
  scores = jnp.concatenate(kept_scores)
  boxes = jnp.concatenate(kept_boxes)
  levels = jnp.concatenate(kept_levels)
  kept = nms_detections(boxes, drop_small(boxes, scores, min_bbox_size), levels, iou_threshold, max_per_img)
  return Proposals(boxes=kept.boxes, scores=kept.scores, valid=kept.valid)

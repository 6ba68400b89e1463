"""MaxIoU assignment of candidate boxes (anchors or proposals) to ground truth.

Static-shape form of mmdetection's ``MaxIoUAssigner``: ground truth comes padded
to a fixed number of rows with a validity mask, and padded rows never match.

The overlaps are laid out ``[N candidates, G gts]`` and every argmax is written
as plain max/min reductions: XLA:CPU reduces a ``[G, N]`` matrix over its
major axis, and computes any argmax (a two-operand reduction), several times
slower than a row or column max of ``[N, G]``. For the RPN at 800x1344
(268,569 anchors, 100 gt rows) the assignment went from 135-155 to 52-65 ms.
"""

from typing import Tuple, Union

import jax.numpy as jnp
from jax import lax

from libra_jax.ops.boxes import iou


def _ignored_candidates(boxes, ignore_boxes, ignore_valid, ignore_iof_thr):
  """``[N]`` bool: candidates covered by an ignore region by more than the threshold."""
  overlap = _materialized(jnp.where(ignore_valid[None, :], iou(boxes, ignore_boxes, mode="iof"), -1.0))
  return jnp.max(overlap, axis=1, initial=-1.0) > ignore_iof_thr


def _materialized(overlaps):
  """``overlaps`` computed into memory before it is reduced.

  XLA:CPU runs a reduction that has the IoU arithmetic fused into it 3-4x
  slower than the arithmetic and the reduction apart (``[268569, 100]``:
  43 ms fused, 10 + 5 ms apart). The barrier changes no value.
  """
  return lax.optimization_barrier(overlaps)


def _first_index_of_max(values, maxima, axis: int):
  """``jnp.argmax(values, axis)`` (the first index on ties) of a 2-D ``values``, given its maxima along ``axis``."""
  size = values.shape[axis]
  index = lax.broadcasted_iota(jnp.int32, values.shape, axis)
  return jnp.min(jnp.where(values == jnp.expand_dims(maxima, axis), index, size), axis=axis)


def max_iou_assign(boxes, gt_boxes, gt_valid, pos_iou_thr: float,
                   neg_iou_thr: Union[float, Tuple[float, float]], min_pos_iou: float,
                   match_low_quality: bool = True, gt_max_assign_all: bool = True,
                   ignore_boxes=None, ignore_valid=None,
                   ignore_iof_thr: float = -1.0) -> Tuple[jnp.ndarray, jnp.ndarray]:
  """Assign each candidate to its best-overlapping ground-truth box.

  Rules, in order (mmdetection's ``assign_wrt_overlaps``):
  1. ``max_iou[j]`` = best IoU of candidate j over the valid gts.
  2. Negative (0) where ``0 <= max_iou < neg_iou_thr`` (or ``lo <= max_iou < hi``
     for a pair).
  3. Positive (best gt + 1) where ``max_iou >= pos_iou_thr``.
  4. With ``match_low_quality``: every valid gt i whose best IoU over all
     candidates is ``>= min_pos_iou`` claims the candidates reaching that best
     IoU (all ties with ``gt_max_assign_all``, else the first); later gts
     overwrite earlier ones, and this may override rules 2 and 3.
  Candidates covered by an ignore region (IoF above ``ignore_iof_thr > 0``) get
  IoU -1 with every gt and so stay -1 unless rule 4 applies. With no valid gt
  every candidate is negative and ``max_iou`` is 0.

  Args:
    boxes: ``[N, 4]`` float candidates, xyxy pixels.
    gt_boxes: ``[G, 4]`` float ground truth, xyxy pixels (padded rows allowed).
    gt_valid: ``[G]`` bool, false for padding rows.
    pos_iou_thr, neg_iou_thr, min_pos_iou: thresholds as above.
    match_low_quality, gt_max_assign_all: rule 4 switches.
    ignore_boxes: optional ``[I, 4]`` ignore (crowd) regions, xyxy pixels.
    ignore_valid: ``[I]`` bool, required with ``ignore_boxes``.
    ignore_iof_thr: IoF threshold; ``<= 0`` disables ignoring.

  Returns:
    ``gt_inds [N] int32``: 0 negative, k >= 1 matched to gt k - 1, -1 neither;
    ``max_iou [N] float32``: the IoU with the best gt (-1 for ignored
    candidates, 0 when there is no valid gt).
  """
  boxes = jnp.asarray(boxes, jnp.float32)
  gt_boxes = jnp.asarray(gt_boxes, jnp.float32)
  gt_valid = jnp.asarray(gt_valid, bool)
  overlaps = jnp.where(gt_valid[None, :], iou(boxes, gt_boxes), -1.0)
  if ignore_boxes is not None and ignore_iof_thr > 0:
    if ignore_valid is None:
      raise ValueError("ignore_boxes needs ignore_valid (a [I] bool mask)")
    ignored = _ignored_candidates(boxes, jnp.asarray(ignore_boxes, jnp.float32),
                                  jnp.asarray(ignore_valid, bool), ignore_iof_thr)
    overlaps = jnp.where(ignored[:, None], -1.0, overlaps)
  overlaps = _materialized(overlaps)

  max_iou = jnp.max(overlaps, axis=1)
  best_gt = _first_index_of_max(overlaps, max_iou, axis=1)
  gt_inds = jnp.full(max_iou.shape, -1, jnp.int32)
  if isinstance(neg_iou_thr, (tuple, list)):
    low, high = neg_iou_thr
    is_negative = (max_iou >= low) & (max_iou < high)
  else:
    is_negative = (max_iou >= 0) & (max_iou < neg_iou_thr)
  gt_inds = jnp.where(is_negative, 0, gt_inds)
  gt_inds = jnp.where(max_iou >= pos_iou_thr, best_gt + 1, gt_inds)

  if match_low_quality:
    gt_best = jnp.max(overlaps, axis=0)
    claims = gt_valid & (gt_best >= min_pos_iou)
    if gt_max_assign_all:
      claimed = claims[None, :] & (overlaps == gt_best[None, :])
    else:
      first_best = _first_index_of_max(overlaps, gt_best, axis=0)
      claimed = claims[None, :] & (jnp.arange(boxes.shape[0])[:, None] == first_best[None, :])
    # The last claiming gt wins (later gts overwrite earlier ones); -1 where none claims.
    last_claim = jnp.max(jnp.where(claimed, jnp.arange(gt_boxes.shape[0], dtype=jnp.int32)[None, :], -1), axis=1)
    gt_inds = jnp.where(last_claim >= 0, last_claim + 1, gt_inds)

  has_gt = jnp.any(gt_valid)
  gt_inds = jnp.where(has_gt, gt_inds, 0)
  max_iou = jnp.where(has_gt, max_iou, 0.0)
  return gt_inds, max_iou

"""Box geometry: overlaps and the (dx, dy, dw, dh) delta coder.

Every box is ``xyxy`` in absolute pixels with width ``x2 - x1`` (no +1), as in
mmdetection 3.x. All functions are pure ``jnp`` and broadcast over leading
batch dimensions, so they work unchanged under ``jit``, ``vmap`` and ``grad``.
"""

from typing import Optional, Sequence, Union

import jax.numpy as jnp
import numpy as np

# mmdetection clamps unions (and enclosing areas) at this value before dividing.
OVERLAP_EPS = 1e-6

ArrayLike = Union[jnp.ndarray, np.ndarray]


def box_area(boxes: ArrayLike) -> jnp.ndarray:
  """Areas of ``boxes [..., 4]`` in square pixels -> ``[...]``.

  Degenerate boxes (``x2 < x1`` or ``y2 < y1``) have area 0, not a negative or
  spuriously positive product.
  """
  boxes = jnp.asarray(boxes)
  width = jnp.maximum(boxes[..., 2] - boxes[..., 0], 0.0)
  height = jnp.maximum(boxes[..., 3] - boxes[..., 1], 0.0)
  return width * height


def _intersection(boxes1, boxes2, aligned):
  """Intersection areas, pairwise ``[..., N, M]`` or elementwise ``[..., N]``."""
  if not aligned:
    boxes1 = boxes1[..., :, None, :]
    boxes2 = boxes2[..., None, :, :]
  top_left = jnp.maximum(boxes1[..., :2], boxes2[..., :2])
  bottom_right = jnp.minimum(boxes1[..., 2:], boxes2[..., 2:])
  wh = jnp.maximum(bottom_right - top_left, 0.0)
  return wh[..., 0] * wh[..., 1]


def _enclosing_area(boxes1, boxes2, aligned):
  """Area of the smallest box enclosing each pair (the GIoU hull)."""
  if not aligned:
    boxes1 = boxes1[..., :, None, :]
    boxes2 = boxes2[..., None, :, :]
  top_left = jnp.minimum(boxes1[..., :2], boxes2[..., :2])
  bottom_right = jnp.maximum(boxes1[..., 2:], boxes2[..., 2:])
  wh = jnp.maximum(bottom_right - top_left, 0.0)
  return wh[..., 0] * wh[..., 1]


def _pair_areas(boxes1, boxes2, aligned):
  area1, area2 = box_area(boxes1), box_area(boxes2)
  if not aligned:
    area1 = area1[..., :, None]
    area2 = area2[..., None, :]
  return area1, area2


def iou(boxes1: ArrayLike, boxes2: ArrayLike, mode: str = "iou",
        aligned: bool = False) -> jnp.ndarray:
  """Intersection over union (or over foreground) of two sets of boxes.

  Args:
    boxes1: ``[..., N, 4]`` float, xyxy pixels.
    boxes2: ``[..., M, 4]`` float, xyxy pixels (``M == N`` when ``aligned``).
    mode: ``"iou"`` divides the intersection by the union; ``"iof"`` divides
      it by the area of ``boxes1`` (the overlap of a candidate with a crowd or
      ignore region, mmdetection's ``ignore_wrt_candidates``).
    aligned: compare ``boxes1[..., i]`` with ``boxes2[..., i]`` only.

  Returns:
    ``[..., N, M]`` (or ``[..., N]`` when ``aligned``) in [0, 1]. The
    denominator is clamped at 1e-6 as in mmdetection, so degenerate boxes give
    0, never NaN.
  """
  if mode not in ("iou", "iof"):
    raise ValueError(f"iou mode must be 'iou' or 'iof', got {mode!r}")
  boxes1, boxes2 = jnp.asarray(boxes1), jnp.asarray(boxes2)
  inter = _intersection(boxes1, boxes2, aligned)
  area1, area2 = _pair_areas(boxes1, boxes2, aligned)
  denominator = area1 + area2 - inter if mode == "iou" else area1
  denominator = jnp.broadcast_to(denominator, inter.shape)
  return inter / jnp.maximum(denominator, OVERLAP_EPS)


def giou(boxes1: ArrayLike, boxes2: ArrayLike, aligned: bool = False) -> jnp.ndarray:
  """Generalized IoU: ``iou - (hull - union) / hull``, in [-1, 1].

  Args:
    boxes1: ``[..., N, 4]`` float, xyxy pixels.
    boxes2: ``[..., M, 4]`` float, xyxy pixels (``M == N`` when ``aligned``).
    aligned: compare ``boxes1[..., i]`` with ``boxes2[..., i]`` only (what the
      GIoU loss uses).

  Returns:
    ``[..., N, M]`` (or ``[..., N]`` when ``aligned``). Union and hull are
    clamped at 1e-6, so degenerate pairs give finite values.
  """
  boxes1, boxes2 = jnp.asarray(boxes1), jnp.asarray(boxes2)
  inter = _intersection(boxes1, boxes2, aligned)
  area1, area2 = _pair_areas(boxes1, boxes2, aligned)
  union = jnp.maximum(area1 + area2 - inter, OVERLAP_EPS)
  hull = jnp.maximum(_enclosing_area(boxes1, boxes2, aligned), OVERLAP_EPS)
  return inter / union - (hull - union) / hull


def _centers_and_sizes(boxes):
  center = (boxes[..., :2] + boxes[..., 2:]) * 0.5
  size = boxes[..., 2:] - boxes[..., :2]
  return center, size


def encode_deltas(boxes: ArrayLike, gt_boxes: ArrayLike,
                  means: Sequence[float] = (0.0, 0.0, 0.0, 0.0),
                  stds: Sequence[float] = (1.0, 1.0, 1.0, 1.0)) -> jnp.ndarray:
  """Regression targets that move ``boxes`` onto ``gt_boxes``.

  mmdetection's ``DeltaXYWHBBoxCoder.encode``: with centres ``c`` and sizes
  ``s`` of the box (p) and the target (g),
  ``d = ((g_cx - p_cx) / p_w, (g_cy - p_cy) / p_h, log(g_w / p_w),
  log(g_h / p_h))``, then ``(d - means) / stds``.

  Args:
    boxes: ``[..., 4]`` float, xyxy pixels, positive width and height.
    gt_boxes: ``[..., 4]`` float, xyxy pixels, positive width and height.
    means, stds: 4 floats each.

  Returns:
    ``[..., 4]`` float32 deltas (dx, dy, dw, dh).
  """
  boxes = jnp.asarray(boxes, jnp.float32)
  gt_boxes = jnp.asarray(gt_boxes, jnp.float32)
  box_center, box_size = _centers_and_sizes(boxes)
  gt_center, gt_size = _centers_and_sizes(gt_boxes)
  d_center = (gt_center - box_center) / box_size
  d_size = jnp.log(gt_size / box_size)
  deltas = jnp.concatenate([d_center, d_size], axis=-1)
  return (deltas - jnp.asarray(means, jnp.float32)) / jnp.asarray(stds, jnp.float32)


def decode_deltas(boxes: ArrayLike, deltas: ArrayLike,
                  means: Sequence[float] = (0.0, 0.0, 0.0, 0.0),
                  stds: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
                  max_shape: Optional[Union[Sequence[int], ArrayLike]] = None,
                  wh_ratio_clip: float = 16 / 1000) -> jnp.ndarray:
  """Apply deltas to boxes: mmdetection's ``DeltaXYWHBBoxCoder.decode``.

  ``d' = d * stds + means``; ``dw, dh`` are clamped to ``±|log(wh_ratio_clip)|``
  (4.135 for the default); the centre moves by ``size * (dx, dy)`` and the size
  is scaled by ``exp(dw, dh)``. With ``max_shape = (h, w)`` the result is
  clipped to x in [0, w] and y in [0, h] (not w - 1).

  Args:
    boxes: ``[..., 4]`` float, xyxy pixels.
    deltas: ``[..., 4 * K]`` float: K boxes per input box (class-specific
      deltas of K classes), each decoded against the same box.
    means, stds: 4 floats each.
    max_shape: optional ``(h, w)`` of the image (a tuple or a ``[2]`` array,
      which may be traced, e.g. one image's ``image_shape`` under vmap).
    wh_ratio_clip: the largest allowed size ratio change is
      ``1 / wh_ratio_clip``.

  Returns:
    ``[..., 4 * K]`` float32 decoded xyxy boxes.
  """
  boxes = jnp.asarray(boxes, jnp.float32)
  deltas = jnp.asarray(deltas, jnp.float32)
  if deltas.shape[-1] % 4:
    raise ValueError(f"deltas last dimension must be a multiple of 4, got {deltas.shape}")
  num_per_box = deltas.shape[-1] // 4
  deltas = deltas.reshape(deltas.shape[:-1] + (num_per_box, 4))
  deltas = deltas * jnp.asarray(stds, jnp.float32) + jnp.asarray(means, jnp.float32)
  center, size = _centers_and_sizes(boxes[..., None, :])
  max_ratio = abs(float(np.log(wh_ratio_clip)))
  d_size = jnp.clip(deltas[..., 2:], -max_ratio, max_ratio)
  new_center = center + size * deltas[..., :2]
  new_size = size * jnp.exp(d_size)
  decoded = jnp.concatenate([new_center - new_size * 0.5, new_center + new_size * 0.5], axis=-1)
  if max_shape is not None:
    height_width = jnp.asarray(max_shape, jnp.float32)
    upper = jnp.stack([height_width[..., 1], height_width[..., 0]] * 2, axis=-1)
    decoded = jnp.clip(decoded, 0.0, upper)
  return decoded.reshape(decoded.shape[:-2] + (4 * num_per_box,))

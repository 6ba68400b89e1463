"""Fixed-size detections: tiny-box filtering and grouped NMS with padded outputs."""

from typing import NamedTuple

import jax.numpy as jnp

from libra_jax.ops.nms import batched_nms


class Detections(NamedTuple):
  """Fixed-size detections of one image (or a batch, with a leading axis)."""
  boxes: jnp.ndarray    # [D, 4] xyxy pixels of the resized image
  scores: jnp.ndarray   # [D]
  classes: jnp.ndarray  # [D] int32 contiguous class index (-1 in padding rows)
  valid: jnp.ndarray    # [D] bool


def drop_small(boxes, scores, min_size: float):
  """``scores [N]`` with -inf where ``boxes [N, 4]`` are not wider and taller than ``min_size``."""
  width, height = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
  return jnp.where((width > min_size) & (height > min_size), scores, -jnp.inf)


def nms_detections(boxes, scores, classes, iou_threshold: float, max_per_img: int) -> Detections:
  """NMS within each class of ``[N]`` candidates; the best ``max_per_img`` survivors, zero-padded.

  Candidates with score -inf (or NaN) are never kept.
  """
  keep, count = batched_nms(boxes, scores, classes, iou_threshold, max_per_img)
  valid = jnp.arange(max_per_img) < count
  safe = jnp.maximum(keep, 0)
  return Detections(boxes=jnp.where(valid[:, None], boxes[safe], 0.0),
                    scores=jnp.where(valid, scores[safe], 0.0),
                    classes=jnp.where(valid, classes[safe], -1).astype(jnp.int32), valid=valid)

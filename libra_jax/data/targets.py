"""The numpy side of a batch: sizes, scales, ids and padded ground truth, from the metadata table."""

from typing import Dict

import numpy as np

from libra_jax.data.metadata import ImageTable
from libra_jax.data.plan import PlannedBatch


def annotate(table: ImageTable, resized_height: np.ndarray, resized_width: np.ndarray, batch: PlannedBatch,
             max_instances: int) -> Dict[str, np.ndarray]:
  """Everything of the batch contract except ``image``, for the ``B`` examples of ``batch``.

  Args:
    table: the metadata of the examples ``batch.rows`` index.
    resized_height, resized_width: ``[N]`` int32, each table row's size after
      the keep-ratio resize, pixels.
    batch: rows, flips and validity of the batch.
    max_instances: ground-truth rows ``G`` per image.

  Returns:
    ``image_shape`` int32 ``[B, 2]`` (h, w) resized; ``scale`` float32
    ``[B, 2]`` (sy, sx) resized / original; ``image_id`` int64 ``[B]`` (-1 in
    invalid slots); ``boxes`` float32 ``[B, G, 4]`` xyxy in resized pixels,
    mirrored where flipped (x1' = w - x2, x2' = w - x1), zeros in padding
    rows; ``labels`` int32 ``[B, G]``, -1 in padding rows; ``is_crowd`` bool
    ``[B, G]``; ``valid`` bool ``[B]``. The first ``G`` boxes of an image are
    kept, non-crowd ones first.
  """
  rows = batch.rows
  size = len(rows)
  new_h, new_w = resized_height[rows], resized_width[rows]
  scale_y = new_h / table.height[rows].astype(np.float64)
  scale_x = new_w / table.width[rows].astype(np.float64)
  boxes = np.zeros((size, max_instances, 4), np.float32)
  labels = np.full((size, max_instances), -1, np.int32)
  is_crowd = np.zeros((size, max_instances), bool)
  for slot in np.flatnonzero(batch.valid):
    first, last = table.row_splits[rows[slot]], table.row_splits[rows[slot] + 1]
    count = min(last - first, max_instances)
    factors = np.array([scale_x[slot], scale_y[slot], scale_x[slot], scale_y[slot]])
    scaled = table.boxes[first:first + count].astype(np.float64) * factors
    if batch.flips[slot]:
      scaled = np.stack([new_w[slot] - scaled[:, 2], scaled[:, 1], new_w[slot] - scaled[:, 0], scaled[:, 3]], 1)
    boxes[slot, :count] = scaled
    labels[slot, :count] = table.labels[first:first + count]
    is_crowd[slot, :count] = table.is_crowd[first:first + count]
  return {
      "image_shape": np.stack([new_h, new_w], 1).astype(np.int32),
      "scale": np.stack([scale_y, scale_x], 1).astype(np.float32),
      "image_id": np.where(batch.valid, table.image_id[rows], -1).astype(np.int64),
      "boxes": boxes,
      "labels": labels,
      "is_crowd": is_crowd,
      "valid": batch.valid.copy(),
  }

"""Exact greedy non-maximum suppression with static shapes.

Both functions return the same kept set as the classic sequential algorithm
(torchvision / mmcv ``nms``): visit boxes by descending score, ties broken by
the lower original index, and keep a box unless an already kept box overlaps
it with IoU strictly greater than ``iou_threshold``.

Instead of one step per box, the sorted boxes are processed in tiles of
``TILE_SIZE`` = T. For each tile, (a) every box overlapping a box kept in an
earlier tile is dropped with one ``[T, N]`` IoU block, then (b) suppression
inside the tile is resolved by a fixed-point iteration over a ``[T, T]`` block.
All shapes are static, so ``nms`` and ``batched_nms`` work under ``jit``
(``max_output`` static, thresholds may be traced) and ``vmap``. The tiles go
in score order, so the loop stops once ``max_output`` boxes are kept or no
valid box is left: the result is the same, and RPN proposals (1,000 kept of
several thousand) skip most of the later tiles.
"""

from typing import Optional, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

from libra_jax.ops.boxes import OVERLAP_EPS, box_area

ArrayLike = Union[jnp.ndarray, np.ndarray]

# Boxes per tile, T (inputs shorter than T use one tile of N rounded up to 8).
# The [T, N] blocks cost N^2 IoU pairs in all, the tiles' own blocks and
# sweeps about N * T * (1 + sweeps), in N / T sequential steps. On CPU (benchmarks/bench_nms.py, 2,000 and 5,000 clustered boxes)
# T = 32 and 64 were fastest, 128 about 10-15% slower and 256 30-50% slower;
# 128 halves the sequential steps of 64, which should matter more than the
# extra in-tile work on accelerators (not measured).
TILE_SIZE = 128


def _resolve_tile(candidate: jnp.ndarray, suppresses: jnp.ndarray) -> jnp.ndarray:
  """Greedy keep flags inside one tile.

  Args:
    candidate: ``[T]`` bool, boxes still eligible after suppression by earlier
      tiles, in score order.
    suppresses: ``[T, T]`` bool, ``suppresses[i, j]`` when box ``i`` comes
      before box ``j`` and would remove it if kept.

  Returns:
    ``[T]`` bool, the greedy keep flags.

  The greedy rule is ``keep[j] = candidate[j] and not any(keep[i] and
  suppresses[i, j])``. Every ``suppresses[i, j]`` has ``i < j``, so the rule
  fixes ``keep[0]`` first and then each ``keep[j]`` from ``keep[:j]`` alone:
  it has exactly one solution, the greedy one. Applying the rule to all boxes
  at once from any start reproduces that solution for ``keep[:j + 1]`` after
  at most ``j + 1`` sweeps (by induction on ``j``), so the iteration below
  stops within ``T + 1`` sweeps, and it only stops at a fixed point, which is
  that unique solution.
  """

  def sweep(state):
    keep, _ = state
    new_keep = candidate & ~jnp.any(keep[:, None] & suppresses, axis=0)
    return new_keep, jnp.any(new_keep != keep)

  # The "changed" flag starts True but is derived from `candidate` so that,
  # under shard_map, it has the same per-device type as the flags computed in
  # the loop.
  first = jnp.any(candidate) | True
  keep, _ = jax.lax.while_loop(lambda state: state[1], sweep, (candidate, first))
  return keep


def _iou_exceeds(boxes, coords, areas, iou_threshold):
  """Which pairs overlap by more than ``iou_threshold``.

  The arithmetic of ``boxes.iou`` (intersection over the union clamped at
  ``OVERLAP_EPS``, same operation order, so the same float32 values), with
  the second set given as coordinate rows. On CPU, inside the tile loop, this
  layout ran 3-6x faster than ``boxes.iou`` on ``[N, 4]`` inputs, whose
  slices of the size-4 axis vectorise poorly.

  Args:
    boxes: ``[T, 4]`` float, xyxy pixels.
    coords: ``[4, M]`` float, rows x1, y1, x2, y2 of the second set.
    areas: ``[M]`` float, ``box_area`` of the second set.
    iou_threshold: float scalar.

  Returns:
    ``[T, M]`` bool, IoU strictly greater than ``iou_threshold``.
  """
  x1, y1, x2, y2 = (boxes[:, k, None] for k in range(4))
  width = jnp.maximum(jnp.minimum(x2, coords[2]) - jnp.maximum(x1, coords[0]), 0.0)
  height = jnp.maximum(jnp.minimum(y2, coords[3]) - jnp.maximum(y1, coords[1]), 0.0)
  inter = width * height
  union = box_area(boxes)[:, None] + areas - inter
  return inter / jnp.maximum(union, OVERLAP_EPS) > iou_threshold


def _greedy_keep(boxes: jnp.ndarray, valid: jnp.ndarray, groups: Optional[jnp.ndarray],
                 iou_threshold, max_output: int) -> jnp.ndarray:
  """Greedy keep flags of boxes already sorted by descending score, as far as the first ``max_output`` kept.

  The tiles are visited in order and the loop ends after the tile that
  brings the kept count to ``max_output``, or before a tile holding no valid
  box at or after its start: no later box can be among the first
  ``max_output`` kept. Flags past that point stay False.

  Args:
    boxes: ``[N, 4]`` float, xyxy pixels, in visiting order.
    valid: ``[N]`` bool, boxes allowed to be kept.
    groups: ``[N]`` int group ids (only boxes of the same group suppress each
      other), or None for a single group.
    iou_threshold: float scalar, possibly traced.
    max_output: static int, how many kept boxes are wanted.

  Returns:
    ``[N]`` bool keep flags; the first ``max_output`` True ones (all, if
    fewer) are those of the greedy algorithm over all ``N``.
  """
  num_boxes = boxes.shape[0]
  tile = min(TILE_SIZE, -(-num_boxes // 8) * 8)
  num_tiles = -(-num_boxes // tile)
  pad = num_tiles * tile - num_boxes
  # Padded boxes are all-zero (IoU 0 with anything) and never valid.
  boxes = jnp.pad(boxes, ((0, pad), (0, 0)))
  valid = jnp.pad(valid, (0, pad))
  if groups is not None:
    groups = jnp.pad(groups, (0, pad))
  coords, areas = boxes.T, box_area(boxes)
  earlier = jnp.arange(tile)[:, None] < jnp.arange(tile)[None, :]

  def process_tile(t, keep):
    start = t * tile
    tile_boxes = jax.lax.dynamic_slice_in_dim(boxes, start, tile)
    tile_coords = jax.lax.dynamic_slice_in_dim(coords, start, tile, axis=1)
    tile_areas = jax.lax.dynamic_slice_in_dim(areas, start, tile)
    cross = _iou_exceeds(tile_boxes, coords, areas, iou_threshold)
    inner = earlier & _iou_exceeds(tile_boxes, tile_coords, tile_areas, iou_threshold)
    if groups is not None:
      tile_groups = jax.lax.dynamic_slice_in_dim(groups, start, tile)
      cross &= tile_groups[:, None] == groups
      inner &= tile_groups[:, None] == tile_groups
    # Boxes of tiles not processed yet are still False in `keep`, so only
    # boxes kept in earlier tiles suppress here.
    suppressed = jnp.any(cross & keep, axis=1)
    candidate = jax.lax.dynamic_slice_in_dim(valid, start, tile) & ~suppressed
    return jax.lax.dynamic_update_slice_in_dim(keep, _resolve_tile(candidate, inner), start, 0)

  # One past the last valid box: tiles starting there or later keep nothing.
  valid_end = jnp.max(jnp.where(valid, jnp.arange(valid.shape[0]) + 1, 0))

  def more(state):
    t, _, kept = state
    return (t < num_tiles) & (kept < max_output) & (t * tile < valid_end)

  def step(state):
    t, keep, kept = state
    keep = process_tile(t, keep)
    return t + 1, keep, jnp.sum(keep, dtype=jnp.int32)

  # The kept count starts from `valid` so that, under shard_map, it has the per-device type the loop gives it.
  start = (jnp.int32(0), jnp.zeros_like(valid), jnp.sum(jnp.zeros_like(valid), dtype=jnp.int32))
  _, keep, _ = jax.lax.while_loop(more, step, start)
  return keep[:num_boxes]


def _nms(boxes, scores, groups, iou_threshold, max_output, score_threshold):
  """Shared body of ``nms`` and ``batched_nms`` (see their docstrings)."""
  boxes = jnp.asarray(boxes)
  boxes = boxes.astype(jnp.promote_types(boxes.dtype, jnp.float32))
  scores = jnp.asarray(scores)
  if boxes.ndim != 2 or boxes.shape[1] != 4:
    raise ValueError(f"boxes must be [N, 4], got {boxes.shape}")
  if scores.shape != boxes.shape[:1]:
    raise ValueError(f"scores must be [N] = {boxes.shape[:1]}, got {scores.shape}")
  if groups is not None and groups.shape != boxes.shape[:1]:
    raise ValueError(f"idxs must be [N] = {boxes.shape[:1]}, got {groups.shape}")
  max_output = int(max_output)
  if max_output < 0:
    raise ValueError(f"max_output must be >= 0, got {max_output}")
  if boxes.shape[0] == 0:
    return jnp.full((max_output,), -1, jnp.int32), jnp.zeros((), jnp.int32)

  # NaN compares False, so NaN and -inf scores are never valid.
  lower = -jnp.inf if score_threshold is None else score_threshold
  valid = scores > lower
  # Stable sort on the negated score: descending score, lower index first.
  # Invalid boxes go last, where they cannot suppress anything anyway.
  order = jnp.argsort(-jnp.where(valid, scores, -jnp.inf), stable=True)
  if groups is not None:
    groups = groups[order]
  keep = _greedy_keep(boxes[order], valid[order], groups, iou_threshold, max_output)

  (positions,) = jnp.nonzero(keep, size=max_output, fill_value=0)
  count = jnp.minimum(jnp.sum(keep, dtype=jnp.int32), max_output)
  indices = jnp.where(jnp.arange(max_output) < count, order[positions], -1)
  return indices.astype(jnp.int32), count


def nms(boxes: ArrayLike, scores: ArrayLike, iou_threshold, max_output: int,
        score_threshold=None) -> Tuple[jnp.ndarray, jnp.ndarray]:
  """Exact greedy NMS over one set of boxes.

  Args:
    boxes: ``[N, 4]`` float, xyxy pixels (``N`` may be 0).
    scores: ``[N]`` float. Boxes scored NaN or -inf are never kept: use either
      to pad inputs to a fixed size.
    iou_threshold: float scalar, may be traced. A box is suppressed by a kept
      box when their IoU is strictly greater than this.
    max_output: static Python int >= 0, the length of the result; may exceed
      ``N``.
    score_threshold: optional float scalar (may be traced). Only boxes with
      ``score > score_threshold`` (strictly, as mmdetection's ``score_thr``)
      take part; the others are never kept and suppress nothing.

  Returns:
    ``(indices, count)``: ``indices [max_output]`` int32, the original indices
    of the kept boxes by descending score (ties by lower index), padded with
    -1; ``count`` int32 scalar, the number of valid entries,
    ``min(#kept, max_output)``.
  """
  return _nms(boxes, scores, None, iou_threshold, max_output, score_threshold)


def batched_nms(boxes: ArrayLike, scores: ArrayLike, idxs: ArrayLike, iou_threshold,
                max_output: int, score_threshold=None) -> Tuple[jnp.ndarray, jnp.ndarray]:
  """Exact greedy NMS run independently within each group (class or level).

  mmdetection's ``batched_nms`` without its coordinate-offset trick: a box is
  only ever suppressed by a kept box with the same group id, however much
  boxes of different groups overlap. The per-group results are merged by
  descending score, ties by lower index.

  Args:
    boxes: ``[N, 4]`` float, xyxy pixels (``N`` may be 0).
    scores: ``[N]`` float; NaN and -inf scores are never kept.
    idxs: ``[N]`` int group id of each box.
    iou_threshold: float scalar, may be traced; suppression needs IoU strictly
      greater than it.
    max_output: static Python int >= 0, the length of the result.
    score_threshold: optional float scalar; only boxes with
      ``score > score_threshold`` take part.

  Returns:
    ``(indices, count)`` as for ``nms``: ``indices [max_output]`` int32
    original indices padded with -1, and ``count`` int32 scalar.
  """
  return _nms(boxes, scores, jnp.asarray(idxs), iou_threshold, max_output, score_threshold)

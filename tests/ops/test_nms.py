"""Tests of libra_jax.ops.nms against a plain sequential greedy NMS."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from libra_jax.ops.nms import TILE_SIZE, batched_nms, nms

# Thresholds are passed as arrays so that one compilation per shape serves
# every threshold.
_nms = jax.jit(nms, static_argnames="max_output")
_batched_nms = jax.jit(batched_nms, static_argnames="max_output")

# Hand-made cases are padded to this many boxes with -inf scores (the
# documented padding), so they share one compilation.
_SMALL = 8


def _iou_row(box, boxes):
  """float32 IoU of one box [4] with boxes [N, 4], as boxes.iou computes it."""
  area = lambda b: np.maximum(b[..., 2] - b[..., 0], 0) * np.maximum(b[..., 3] - b[..., 1], 0)
  width = np.maximum(np.minimum(box[2], boxes[:, 2]) - np.maximum(box[0], boxes[:, 0]), 0)
  height = np.maximum(np.minimum(box[3], boxes[:, 3]) - np.maximum(box[1], boxes[:, 1]), 0)
  inter = width * height
  union = area(box) + area(boxes) - inter
  return inter / np.maximum(union, np.float32(1e-6))


def reference_nms(boxes, scores, iou_threshold, score_threshold=None, groups=None):
  """Sequential greedy NMS: the kept original indices, best score first."""
  boxes = np.asarray(boxes, np.float32)
  scores = np.asarray(scores, np.float32)
  groups = np.zeros(len(scores), np.int64) if groups is None else np.asarray(groups)
  removed = np.isnan(scores) | (scores == -np.inf)
  if score_threshold is not None:
    removed |= ~(scores > score_threshold)
  kept = []
  for i in np.argsort(-scores, kind="stable"):
    if removed[i]:
      continue
    kept.append(int(i))
    overlapping = _iou_row(boxes[i], boxes) > np.float32(iou_threshold)
    removed |= overlapping & (groups == groups[i])
  return kept


def clustered(num_boxes, num_centers, seed, jitter=6.0, tie_levels=None):
  """Boxes jittered around a few centres, so suppression chains abound."""
  rng = np.random.default_rng(seed)
  centers = rng.uniform(0, 300, (num_centers, 2))[rng.integers(0, num_centers, num_boxes)]
  centers = centers + rng.normal(0, jitter, (num_boxes, 2))
  sizes = rng.uniform(10, 60, (num_boxes, 2))
  boxes = np.concatenate([centers - sizes / 2, centers + sizes / 2], axis=1)
  scores = rng.uniform(0, 1, num_boxes)
  if tie_levels:
    scores = np.floor(scores * tie_levels) / tie_levels
  return boxes.astype(np.float32), scores.astype(np.float32)


def sliding_row(num_boxes, seed, step=2.0, width=10.0):
  """A row of boxes each shifted by ``step``: every pair of neighbours
  overlaps (IoU 2/3 for the defaults) and boxes two steps apart overlap less
  (IoU 3/7), so which box survives depends on the whole chain of decisions."""
  x1 = np.arange(num_boxes, dtype=np.float32) * step
  boxes = np.stack([x1, np.zeros_like(x1), x1 + width, np.full_like(x1, width)], axis=1)
  scores = np.random.default_rng(seed).uniform(0, 1, num_boxes).astype(np.float32)
  return boxes, scores


def run_nms(boxes, scores, iou_threshold, max_output=None, score_threshold=None):
  max_output = len(scores) if max_output is None else max_output
  if score_threshold is not None:
    score_threshold = jnp.float32(score_threshold)
  indices, count = _nms(boxes, scores, jnp.float32(iou_threshold), max_output=max_output,
                        score_threshold=score_threshold)
  return np.asarray(indices), int(count)


def run_small(boxes, scores, iou_threshold, **kwargs):
  """Pads a hand-made case to _SMALL boxes; returns the kept indices."""
  boxes = np.asarray(boxes, np.float32)
  num_pad = _SMALL - len(boxes)
  boxes = np.concatenate([boxes, np.zeros((num_pad, 4), np.float32)])
  scores = np.concatenate([np.asarray(scores, np.float32), np.full(num_pad, -np.inf, np.float32)])
  indices, count = run_nms(boxes, scores, iou_threshold, **kwargs)
  return indices[:count].tolist()


def check_result(indices, count, expected, max_output):
  expected = expected[:max_output]
  assert indices.shape == (max_output,) and indices.dtype == np.int32
  assert count == len(expected)
  np.testing.assert_array_equal(indices[:count], expected)
  np.testing.assert_array_equal(indices[count:], -1)


# Hand-made cases.


def test_overlapping_pair_and_separate_box():
  boxes = [[0, 0, 10, 10], [1, 0, 11, 10], [20, 20, 30, 30]]
  # IoU(0, 1) = 90 / 110 = 0.82; box 2 overlaps nothing.
  assert run_small(boxes, [0.9, 0.8, 0.7], 0.5) == [0, 2]
  assert run_small(boxes, [0.8, 0.9, 0.7], 0.5) == [1, 2]
  assert run_small(boxes, [0.7, 0.8, 0.9], 0.5) == [2, 1]
  assert run_small(boxes, [0.9, 0.8, 0.7], 0.85) == [0, 1, 2]


def test_suppressed_box_does_not_suppress():
  # a = box 1 (best), b = box 2, c = box 0. IoU(a, b) = IoU(b, c) = 60 / 140
  # = 0.43 and IoU(a, c) = 20 / 180 = 0.11. At 0.4, a removes b, and c
  # survives because b, which would have removed it, is gone.
  boxes = [[8, 0, 18, 10], [0, 0, 10, 10], [4, 0, 14, 10]]
  scores = [0.7, 0.9, 0.8]
  assert run_small(boxes, scores, 0.4) == [1, 0]
  assert reference_nms(boxes, scores, 0.4) == [1, 0]
  # At 0.45 nothing overlaps enough.
  assert run_small(boxes, scores, 0.45) == [1, 2, 0]


def test_iou_equal_to_threshold_is_not_suppressed():
  boxes = [[0, 0, 10, 10], [0, 0, 10, 5]]  # IoU exactly 50 / 100.
  assert run_small(boxes, [0.9, 0.8], 0.5) == [0, 1]
  assert run_small(boxes, [0.9, 0.8], 0.49) == [0]


def test_score_ties_go_to_the_lower_index():
  same = [0, 0, 10, 10]
  boxes = [same, same, [50, 50, 60, 60], same]
  assert run_small(boxes, [0.5, 0.5, 0.5, 0.7], 0.5) == [3, 2]
  assert run_small(boxes, [0.5, 0.5, 0.5, 0.5], 0.5) == [0, 2]
  assert run_small(boxes, [0.4, 0.5, 0.5, 0.4], 0.5) == [1, 2]
  # A row where all scores tie is visited left to right: 0 removes 1, 2 is
  # kept (IoU(0, 2) = 3 / 7), and so on.
  row, _ = sliding_row(5, seed=0)
  assert run_small(row, np.ones(5), 0.5) == [0, 2, 4]


def test_nan_and_minus_inf_scores_are_never_kept_and_suppress_nothing():
  same = [0, 0, 10, 10]
  boxes = [same, same, same, [50, 50, 60, 60]]
  assert run_small(boxes, [np.nan, -np.inf, 0.1, np.nan], 0.5) == [2]
  assert run_small(boxes, [np.nan, np.nan, -np.inf, -np.inf], 0.5) == []
  # +inf is an ordinary (best) score.
  assert run_small(boxes, [0.3, np.inf, 0.2, -np.inf], 0.5) == [1]


def test_score_threshold_is_strict():
  boxes = [[0, 0, 10, 10], [20, 0, 30, 10], [40, 0, 50, 10], [60, 0, 70, 10]]
  scores = [0.5, 0.3, 0.2, np.nan]
  assert run_small(boxes, scores, 0.5, score_threshold=0.3) == [0]
  assert run_small(boxes, scores, 0.5, score_threshold=0.25) == [0, 1]
  assert run_small(boxes, scores, 0.5, score_threshold=-1.0) == [0, 1, 2]


# Random cases against the reference.


@pytest.mark.parametrize("num_boxes", [1, 37, TILE_SIZE, 300, 1000])
def test_matches_reference_on_clustered_boxes(num_boxes):
  for seed in range(2):
    boxes, scores = clustered(num_boxes, num_centers=max(1, num_boxes // 20), seed=seed)
    for threshold in (0.3, 0.7):
      indices, count = run_nms(boxes, scores, threshold)
      check_result(indices, count, reference_nms(boxes, scores, threshold), num_boxes)


def test_matches_reference_on_sliding_rows_and_ties():
  num_boxes = 300
  for seed in range(3):
    boxes, scores = sliding_row(num_boxes, seed)
    for threshold in (0.3, 0.5, 0.7):
      indices, count = run_nms(boxes, scores, threshold)
      check_result(indices, count, reference_nms(boxes, scores, threshold), num_boxes)
    boxes, scores = clustered(num_boxes, num_centers=10, seed=seed, tie_levels=4)
    indices, count = run_nms(boxes, scores, 0.5)
    check_result(indices, count, reference_nms(boxes, scores, 0.5), num_boxes)


@pytest.mark.parametrize("max_output", [5, 400])
def test_max_output_truncates_or_pads(max_output):
  boxes, scores = clustered(300, num_centers=30, seed=3)
  expected = reference_nms(boxes, scores, 0.5)
  assert 5 < len(expected) < 300
  indices, count = run_nms(boxes, scores, 0.5, max_output=max_output)
  check_result(indices, count, expected, max_output)


def test_score_threshold_matches_reference():
  boxes, scores = clustered(300, num_centers=15, seed=4)
  for score_threshold in (0.0, 0.3, 0.9):
    indices, count = run_nms(boxes, scores, 0.5, score_threshold=score_threshold)
    expected = reference_nms(boxes, scores, 0.5, score_threshold=score_threshold)
    check_result(indices, count, expected, 300)


def test_padding_with_invalid_scores_changes_nothing():
  boxes, scores = clustered(37, num_centers=3, seed=5)
  pad_boxes, _ = clustered(TILE_SIZE - 37, num_centers=3, seed=5)
  pad_scores = np.where(np.arange(TILE_SIZE - 37) % 2, np.nan, -np.inf).astype(np.float32)
  indices, count = run_nms(np.concatenate([boxes, pad_boxes]),
                           np.concatenate([scores, pad_scores]), 0.5)
  expected = reference_nms(boxes, scores, 0.5)
  check_result(indices, count, expected, TILE_SIZE)


def test_empty_input():
  indices, count = nms(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), 0.5, 4)
  check_result(np.asarray(indices), int(count), [], 4)
  indices, count = batched_nms(np.zeros((0, 4), np.float32), np.zeros(0, np.float32),
                               np.zeros(0, np.int32), 0.5, 2)
  check_result(np.asarray(indices), int(count), [], 2)


def test_bad_shapes_raise():
  with pytest.raises(ValueError, match="boxes"):
    nms(np.zeros((3, 5), np.float32), np.zeros(3, np.float32), 0.5, 4)
  with pytest.raises(ValueError, match="scores"):
    nms(np.zeros((3, 4), np.float32), np.zeros(4, np.float32), 0.5, 4)
  with pytest.raises(ValueError, match="idxs"):
    batched_nms(np.zeros((3, 4), np.float32), np.zeros(3, np.float32), np.zeros(2, np.int32),
                0.5, 4)
  with pytest.raises(ValueError, match="max_output"):
    nms(np.zeros((3, 4), np.float32), np.zeros(3, np.float32), 0.5, -1)


# batched_nms.


def test_batched_nms_matches_per_group_reference():
  boxes, scores = clustered(300, num_centers=10, seed=6)
  groups = np.random.default_rng(6).integers(0, 4, 300).astype(np.int32)
  for threshold in (0.3, 0.6):
    indices, count = _batched_nms(boxes, scores, groups, jnp.float32(threshold), max_output=300)
    per_group = [i for g in range(4) for i in reference_nms(boxes[groups == g],
                                                            scores[groups == g], threshold)
                 for i in [np.flatnonzero(groups == g)[i]]]
    merged = sorted(per_group, key=lambda i: (-scores[i], i))
    assert merged == reference_nms(boxes, scores, threshold, groups=groups)
    check_result(np.asarray(indices), int(count), merged, 300)


def test_batched_nms_groups_never_suppress_each_other():
  same = np.array([[0, 0, 10, 10]] * 4, np.float32)
  scores = np.array([0.9, 0.8, 0.7, 0.6], np.float32)
  idxs = np.array([0, 1, 0, 2], np.int32)
  indices, count = _batched_nms(same, scores, idxs, jnp.float32(0.5), max_output=6)
  check_result(np.asarray(indices), int(count), [0, 1, 3], 6)
  # One group: plain NMS.
  indices, count = _batched_nms(same, scores, np.zeros(4, np.int32), jnp.float32(0.5),
                                max_output=6)
  check_result(np.asarray(indices), int(count), [0], 6)


# Transformations.


def test_threshold_is_traced_under_jit():
  boxes, scores = clustered(TILE_SIZE, num_centers=8, seed=7)
  cache_size = _nms._cache_size()
  for threshold in (0.2, 0.45, 0.8):
    indices, count = run_nms(boxes, scores, threshold)
    check_result(indices, count, reference_nms(boxes, scores, threshold), TILE_SIZE)
  assert _nms._cache_size() <= cache_size + 1


def test_vmap_over_images_equals_a_loop():
  data = [clustered(TILE_SIZE, num_centers=8, seed=seed) for seed in range(3)]
  boxes = np.stack([b for b, _ in data])
  scores = np.stack([s for _, s in data])
  scores[1, :40] = np.nan
  thresholds = np.array([0.3, 0.5, 0.7], np.float32)
  run = jax.jit(jax.vmap(functools.partial(nms, max_output=150)))
  indices, counts = run(boxes, scores, thresholds)
  for image in range(3):
    expected = reference_nms(boxes[image], scores[image], thresholds[image])
    check_result(np.asarray(indices[image]), int(counts[image]), expected, 150)


@pytest.mark.parametrize("max_output", [20, 150, 400])
def test_images_whose_loops_end_at_different_tiles_under_vmap(max_output):
  # Three tiles and a bit per image. The loop ends once max_output boxes are kept or no valid box is left, which
  # happens at different tiles for each image (one image keeps few boxes, one has only its first 50 valid, one
  # needs every tile); the vmapped loop runs until the last image is done and must leave the others' flags alone.
  num_boxes = 3 * TILE_SIZE + 5
  data = [clustered(num_boxes, num_centers=centers, seed=seed) for seed, centers in ((11, 4), (12, 60), (13, 200))]
  boxes = np.stack([b for b, _ in data])
  scores = np.stack([s for _, s in data])
  scores[1, np.argsort(-scores[1])[50:]] = -np.inf
  run = jax.jit(jax.vmap(functools.partial(nms, max_output=max_output), in_axes=(0, 0, None)))
  indices, counts = run(boxes, scores, jnp.float32(0.5))
  for image in range(3):
    expected = reference_nms(boxes[image], scores[image], 0.5)
    check_result(np.asarray(indices[image]), int(counts[image]), expected, max_output)

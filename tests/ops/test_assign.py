"""Tests of libra_jax.ops.assign.max_iou_assign."""

import jax
import numpy as np
import pytest

from libra_jax.ops.assign import max_iou_assign

SETTINGS = {
    "rpn": dict(pos_iou_thr=0.7, neg_iou_thr=0.3, min_pos_iou=0.3, match_low_quality=True),
    "rcnn": dict(pos_iou_thr=0.5, neg_iou_thr=0.5, min_pos_iou=0.5, match_low_quality=False),
    "retina": dict(pos_iou_thr=0.5, neg_iou_thr=0.4, min_pos_iou=0.0, match_low_quality=True),
}


def padded(gt_boxes, rows):
  boxes = np.zeros((rows, 4), np.float32)
  boxes[:len(gt_boxes)] = gt_boxes
  return boxes, np.arange(rows) < len(gt_boxes)


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_matches_mmdetection_assigner(load_ref, name):
  ref = load_ref("max_iou_assigner")
  gt_boxes, gt_valid = padded(ref["gts"], 16)
  assign = jax.jit(lambda b, g, v: max_iou_assign(b, g, v, **SETTINGS[name]))
  gt_inds, max_iou = assign(ref["priors"], gt_boxes, gt_valid)
  np.testing.assert_array_equal(gt_inds, ref[f"{name}_gt_inds"])
  np.testing.assert_allclose(max_iou, ref[f"{name}_max_overlaps"], rtol=1e-6)
  labels = np.where(gt_inds > 0, ref["gt_labels"][np.maximum(np.asarray(gt_inds) - 1, 0)], -1)
  np.testing.assert_array_equal(labels, ref[f"{name}_labels"])


def hand_case():
  gts = np.array([[0, 0, 10, 10], [20, 0, 30, 10]], np.float32)
  boxes = np.array([
      [0, 0, 10, 10],    # IoU 1 with gt 0
      [0, 0, 10, 5],     # IoU 0.5 with gt 0
      [0, 0, 10, 2],     # IoU 0.2 with gt 0
      [50, 50, 60, 60],  # no overlap
      [20, 0, 30, 4],    # IoU 0.4 with gt 1, gt 1's best
      [20, 0, 30, 4],    # the same box again: a tie for gt 1's best
  ], np.float32)
  return boxes, gts


def test_hand_case_thresholds_and_low_quality_ties():
  boxes, gts = hand_case()
  gt_boxes, gt_valid = padded(gts, 4)
  gt_inds, max_iou = max_iou_assign(boxes, gt_boxes, gt_valid, 0.7, 0.3, 0.3)
  # 0.5 lies between the thresholds (-1); gt 1's best (0.4 < 0.7) claims both tied boxes.
  np.testing.assert_array_equal(gt_inds, [1, -1, 0, 0, 2, 2])
  np.testing.assert_allclose(max_iou, [1.0, 0.5, 0.2, 0.0, 0.4, 0.4], rtol=1e-6)
  first_only, _ = max_iou_assign(boxes, gt_boxes, gt_valid, 0.7, 0.3, 0.3, gt_max_assign_all=False)
  np.testing.assert_array_equal(first_only, [1, -1, 0, 0, 2, -1])
  no_low_quality, _ = max_iou_assign(boxes, gt_boxes, gt_valid, 0.7, 0.3, 0.3, match_low_quality=False)
  np.testing.assert_array_equal(no_low_quality, [1, -1, 0, 0, -1, -1])
  # min_pos_iou above gt 1's best IoU: no claim.
  strict, _ = max_iou_assign(boxes, gt_boxes, gt_valid, 0.7, 0.3, 0.45)
  np.testing.assert_array_equal(strict, [1, -1, 0, 0, -1, -1])
  # A (low, high) negative range: 0.2 is negative only if low <= 0.2.
  ranged, _ = max_iou_assign(boxes, gt_boxes, gt_valid, 0.7, (0.1, 0.3), 0.3)
  np.testing.assert_array_equal(ranged, [1, -1, 0, -1, 2, 2])


def test_later_gt_overrides_earlier_low_quality_claim():
  # Two identical gts both claim the same best box; the later one wins, as in the reference loop.
  gts = np.array([[0, 0, 10, 10], [0, 0, 10, 10]], np.float32)
  boxes = np.array([[0, 0, 10, 6], [40, 40, 50, 50]], np.float32)
  gt_inds, _ = max_iou_assign(boxes, gts, np.array([True, True]), 0.7, 0.3, 0.3)
  np.testing.assert_array_equal(gt_inds, [2, 0])


def test_padded_gt_rows_never_match():
  boxes, gts = hand_case()
  # The padding row is a real-looking box on top of box 3; it must be ignored.
  gt_boxes = np.concatenate([gts, [[50, 50, 60, 60]]]).astype(np.float32)
  gt_inds, max_iou = max_iou_assign(boxes, gt_boxes, np.array([True, True, False]), 0.7, 0.3, 0.3)
  assert int(gt_inds[3]) == 0 and float(max_iou[3]) == 0.0
  assert not np.any(np.asarray(gt_inds) == 3)


def test_no_valid_gt_makes_everything_negative():
  boxes, gts = hand_case()
  gt_inds, max_iou = max_iou_assign(boxes, gts, np.array([False, False]), 0.5, 0.4, 0.0)
  np.testing.assert_array_equal(gt_inds, np.zeros(6))
  np.testing.assert_array_equal(max_iou, np.zeros(6))


def test_ignore_regions_by_iof():
  boxes, gts = hand_case()
  gt_boxes, gt_valid = padded(gts, 2)
  crowd = np.array([[45, 45, 70, 70], [0, 0, 0, 0]], np.float32)  # covers box 3 fully; pad row
  crowd_valid = np.array([True, False])
  gt_inds, max_iou = max_iou_assign(boxes, gt_boxes, gt_valid, 0.7, 0.3, 0.3, ignore_boxes=crowd,
                                    ignore_valid=crowd_valid, ignore_iof_thr=0.5)
  np.testing.assert_array_equal(gt_inds, [1, -1, 0, -1, 2, 2])
  assert float(max_iou[3]) == -1.0
  # The reference default (-1) does not ignore anything.
  unignored, _ = max_iou_assign(boxes, gt_boxes, gt_valid, 0.7, 0.3, 0.3, ignore_boxes=crowd,
                                ignore_valid=crowd_valid, ignore_iof_thr=-1)
  assert int(unignored[3]) == 0
  with pytest.raises(ValueError, match="ignore_valid"):
    max_iou_assign(boxes, gt_boxes, gt_valid, 0.7, 0.3, 0.3, ignore_boxes=crowd, ignore_iof_thr=0.5)


def test_vmap_over_a_batch_equals_per_image():
  boxes, gts = hand_case()
  batch_gts = np.stack([padded(gts, 3)[0], padded(gts[:1], 3)[0]])
  batch_valid = np.stack([padded(gts, 3)[1], padded(gts[:1], 3)[1]])
  assign = jax.vmap(lambda b, g, v: max_iou_assign(b, g, v, 0.7, 0.3, 0.3), in_axes=(None, 0, 0))
  gt_inds, _ = assign(boxes, batch_gts, batch_valid)
  for i in range(2):
    single, _ = max_iou_assign(boxes, batch_gts[i], batch_valid[i], 0.7, 0.3, 0.3)
    np.testing.assert_array_equal(gt_inds[i], single)


def reference_assign(boxes, gt_boxes, gt_valid, pos_iou_thr, neg_iou_thr, min_pos_iou, match_low_quality,
                     gt_max_assign_all):
  """mmdetection's assignment rules as loops over the valid gts, in NumPy float32."""
  gts = np.flatnonzero(gt_valid)
  if len(gts) == 0:
    return np.zeros(len(boxes), np.int32)
  area = lambda b: (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
  overlaps = np.zeros((len(gts), len(boxes)), np.float32)
  for row, g in enumerate(gts):
    wh = np.maximum(np.minimum(boxes[:, 2:], gt_boxes[g, 2:]) - np.maximum(boxes[:, :2], gt_boxes[g, :2]), 0)
    inter = wh[:, 0] * wh[:, 1]
    overlaps[row] = inter / np.maximum(area(boxes) + area(gt_boxes[g:g + 1]) - inter, np.float32(1e-6))
  max_iou, best = overlaps.max(0), overlaps.argmax(0)
  gt_inds = np.full(len(boxes), -1, np.int32)
  gt_inds[(max_iou >= 0) & (max_iou < neg_iou_thr)] = 0
  gt_inds[max_iou >= pos_iou_thr] = gts[best[max_iou >= pos_iou_thr]] + 1
  if match_low_quality:
    for row, g in enumerate(gts):
      best_of_gt = overlaps[row].max()
      if best_of_gt >= min_pos_iou:
        if gt_max_assign_all:
          gt_inds[overlaps[row] == best_of_gt] = g + 1
        else:
          gt_inds[overlaps[row].argmax()] = g + 1
  return gt_inds


@pytest.mark.parametrize("gt_max_assign_all", [True, False])
@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_matches_the_loop_rules_on_boxes_with_many_exact_ties(name, gt_max_assign_all):
  # Boxes on a 16-pixel integer grid, many of them repeated, so that IoUs tie exactly between candidates and
  # between gts; every intersection and union is an exact integer, so float32 gives the same IoUs everywhere.
  # Gts repeat too, so that gts tie for a candidate.
  rng = np.random.default_rng(7)

  def grid_boxes(count, draws):
    corners = rng.integers(0, 12, (count, 2))
    unique = np.concatenate([corners, corners + rng.integers(1, 6, (count, 2))], 1).astype(np.float32)
    return unique[rng.integers(0, count, draws)]

  boxes, gt_boxes = grid_boxes(300, 600), grid_boxes(6, 12)
  gt_valid = rng.random(12) < 0.75
  settings = dict(SETTINGS[name], gt_max_assign_all=gt_max_assign_all)
  gt_inds, _ = jax.jit(lambda b, g, v: max_iou_assign(b, g, v, **settings))(boxes, gt_boxes, gt_valid)
  np.testing.assert_array_equal(gt_inds, reference_assign(boxes, gt_boxes, gt_valid, **settings))

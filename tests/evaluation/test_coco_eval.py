"""Tests of libra_jax.evaluation.coco_eval with pycocotools' own COCOeval."""

import numpy as np
import pytest

from libra_jax.evaluation import coco_eval
from libra_jax.models.postprocess import Detections


def make_batch(boxes, labels, scale=(1.0, 1.0), valid=(True, True), image_shape=(100, 120), crowd=None):
  boxes = np.asarray(boxes, np.float32)
  batch_size, rows = boxes.shape[:2]
  return dict(image_id=np.arange(1, batch_size + 1), valid=np.asarray(valid),
              scale=np.tile(np.asarray(scale, np.float32), (batch_size, 1)),
              image_shape=np.tile(np.asarray(image_shape, np.int32), (batch_size, 1)),
              boxes=boxes, labels=np.asarray(labels, np.int32),
              is_crowd=np.zeros((batch_size, rows), bool) if crowd is None else np.asarray(crowd))


def make_detections(boxes, scores, classes):
  scores = np.asarray(scores, np.float32)
  return Detections(boxes=np.asarray(boxes, np.float32), scores=scores, classes=np.asarray(classes, np.int32),
                    valid=scores > 0)


GT = [[[10, 10, 50, 50], [60, 20, 100, 60], [0, 0, 0, 0]],
      [[5, 5, 45, 45], [50, 50, 90, 90], [0, 0, 0, 0]]]
LABELS = [[0, 0, -1], [0, 0, -1]]


def evaluate(batch, detections, category_ids=(7,), names=("shape",)):
  accumulator = coco_eval.CocoAccumulator(category_ids, names)
  accumulator.add(batch, detections)
  return accumulator, accumulator.evaluate()


def test_ground_truth_as_detections_gives_ap_one():
  batch = make_batch(GT, LABELS)
  detections = make_detections(GT, [[0.9, 0.8, 0], [0.7, 0.6, 0]], [[0, 0, -1], [0, 0, -1]])
  accumulator, metrics = evaluate(batch, detections)
  assert metrics["AP"] == pytest.approx(1.0) and metrics["AP50"] == pytest.approx(1.0)
  # The results stay in COCO's results format after evaluation.
  assert all(set(r) == {"image_id", "category_id", "bbox", "score"} for r in accumulator.results)
  assert metrics["AR100"] == pytest.approx(1.0)


def test_misses_and_duplicates_by_hand():
  batch = make_batch(GT, LABELS)
  # Scores: 0.9 TP (image 1), 0.8 TP (image 2), 0.7 duplicate of the 0.9 box (FP), 0.6 TP; image 2's
  # second gt is missed. Recall 1/4, 2/4, 2/4, 3/4 with precision 1, 1, 2/3, 3/4: the interpolated
  # precision is 1 up to recall 0.5 (51 of COCO's 101 recall points) and 0.75 up to 0.75 (25 points),
  # so AP = (51 + 25 * 0.75) / 101 at every IoU threshold.
  detections = make_detections([[[10, 10, 50, 50], [10, 10, 50, 50], [60, 20, 100, 60]],
                                [[5, 5, 45, 45], [0, 0, 0, 0], [0, 0, 0, 0]]],
                               [[0.9, 0.7, 0.6], [0.8, 0, 0]], [[0, 0, 0], [0, -1, -1]])
  _, metrics = evaluate(batch, detections)
  expected = (51 + 25 * 0.75) / 101
  assert metrics["AP"] == pytest.approx(expected, abs=1e-6)
  assert metrics["AP50"] == pytest.approx(expected, abs=1e-6)
  assert metrics["AR100"] == pytest.approx(0.75)


def test_coordinates_and_category_ids_map_back_to_the_original_image():
  # Resized by 0.5: a resized box [10, 10, 30, 30] is [20, 20, 60, 60] in the original, xywh [20, 20, 40, 40].
  batch = make_batch([[[10, 10, 30, 30]]], [[1]], scale=(0.5, 0.5), valid=(True,), image_shape=(50, 60))
  detections = make_detections([[[10, 10, 30, 40]]], [[0.5]], [[1]])
  accumulator, _ = evaluate(batch, detections, category_ids=(3, 7), names=("a", "b"))
  gt = accumulator.ground_truth()
  assert gt["images"] == [{"id": 1, "height": 100, "width": 120}]
  assert gt["annotations"][0]["bbox"] == [20.0, 20.0, 40.0, 40.0] and gt["annotations"][0]["category_id"] == 7
  assert gt["annotations"][0]["area"] == 1600.0
  # Detections are clipped to the original image (height 100).
  assert accumulator.results[0]["bbox"] == [20.0, 20.0, 40.0, 60.0]
  assert accumulator.results[0]["category_id"] == 7


def test_padding_examples_and_rows_never_reach_the_results():
  batch = make_batch(GT, LABELS, valid=(True, False))
  detections = make_detections(GT, [[0.9, 0.8, 0], [0.7, 0.6, 0]], [[0, 0, -1], [0, 0, -1]])
  accumulator, metrics = evaluate(batch, detections)
  assert [image["id"] for image in accumulator.ground_truth()["images"]] == [1]
  assert len(accumulator.ground_truth()["annotations"]) == 2 and len(accumulator.results) == 2
  assert metrics["AP"] == pytest.approx(1.0)
  with pytest.raises(ValueError, match="twice"):
    accumulator.add(batch, detections)


def test_crowd_regions_are_ignored_not_missed():
  crowd = [[False, True, False], [False, False, False]]
  batch = make_batch(GT, LABELS, crowd=crowd)
  # Only the non-crowd gts detected: recall is complete, AP 1.
  detections = make_detections([[[10, 10, 50, 50], [0, 0, 0, 0], [0, 0, 0, 0]], GT[1]],
                               [[0.9, 0, 0], [0.7, 0.6, 0]], [[0, -1, -1], [0, 0, -1]])
  accumulator, metrics = evaluate(batch, detections)
  assert sum(a["iscrowd"] for a in accumulator.ground_truth()["annotations"]) == 1
  assert metrics["AP"] == pytest.approx(1.0)


def test_no_detections_gives_zero():
  batch = make_batch(GT, LABELS)
  detections = make_detections(np.zeros((2, 3, 4)), np.zeros((2, 3)), -np.ones((2, 3)))
  _, metrics = evaluate(batch, detections)
  assert set(metrics) == set(coco_eval.METRIC_NAMES) and all(v == 0.0 for v in metrics.values())

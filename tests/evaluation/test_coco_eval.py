"""Tests of libra_jax.evaluation.coco_eval: hand-derived metrics, and faster-coco-eval against pycocotools."""

import numpy as np
import pytest

from libra_jax.evaluation import coco_eval
from libra_jax.models.postprocess import Detections


def make_batch(batch_size, scale=(1.0, 1.0), valid=None, image_shape=(100, 120)):
  return dict(image_id=np.arange(1, batch_size + 1),
              valid=np.ones(batch_size, bool) if valid is None else np.asarray(valid),
              scale=np.tile(np.asarray(scale, np.float32), (batch_size, 1)),
              image_shape=np.tile(np.asarray(image_shape, np.int32), (batch_size, 1)))


def make_detections(boxes, scores, classes):
  scores = np.asarray(scores, np.float32)
  return Detections(boxes=np.asarray(boxes, np.float32), scores=scores, classes=np.asarray(classes, np.int32),
                    valid=scores > 0)


def make_ground_truth(boxes_per_image, category_id=7, crowd=None, areas=None, size=(100, 120)):
  """COCO ground truth of images 1..N from xyxy boxes (original pixels)."""
  images, annotations = [], []
  for index, boxes in enumerate(boxes_per_image):
    images.append({"id": index + 1, "height": size[0], "width": size[1]})
    for row, (x1, y1, x2, y2) in enumerate(boxes):
      annotations.append({"id": len(annotations) + 1, "image_id": index + 1, "category_id": category_id,
                          "bbox": [x1, y1, x2 - x1, y2 - y1],
                          "area": float((x2 - x1) * (y2 - y1)) if areas is None else areas[index][row],
                          "iscrowd": int(crowd[index][row]) if crowd else 0})
  return {"images": images, "annotations": annotations, "categories": [{"id": category_id, "name": "shape"}]}


GT = [[[10, 10, 50, 50], [60, 20, 100, 60]], [[5, 5, 45, 45], [50, 50, 90, 90]]]
# The same boxes as a padded [2, 3, 4] array (the third row is padding).
GT_PADDED = [GT[0] + [[0, 0, 0, 0]], GT[1] + [[0, 0, 0, 0]]]


def evaluate(ground_truth, batch, detections, category_ids=(7,)):
  accumulator = coco_eval.CocoAccumulator(ground_truth, category_ids)
  accumulator.add(batch, detections)
  return accumulator, accumulator.evaluate()


def test_ground_truth_as_detections_gives_ap_one():
  detections = make_detections(GT_PADDED, [[0.9, 0.8, 0], [0.7, 0.6, 0]], [[0, 0, -1], [0, 0, -1]])
  accumulator, metrics = evaluate(make_ground_truth(GT), make_batch(2), detections)
  assert metrics["AP"] == pytest.approx(1.0) and metrics["AP50"] == pytest.approx(1.0)
  # The results stay in COCO's results format after evaluation.
  assert all(set(r) == {"image_id", "category_id", "bbox", "score"} for r in accumulator.results)
  assert metrics["AR100"] == pytest.approx(1.0)


def test_misses_and_duplicates_by_hand():
  # Scores: 0.9 TP (image 1), 0.8 TP (image 2), 0.7 duplicate of the 0.9 box (FP), 0.6 TP; image 2's
  # second gt is missed. Recall 1/4, 2/4, 2/4, 3/4 with precision 1, 1, 2/3, 3/4: the interpolated
  # precision is 1 up to recall 0.5 (51 of COCO's 101 recall points) and 0.75 up to 0.75 (25 points),
  # so AP = (51 + 25 * 0.75) / 101 at every IoU threshold.
  detections = make_detections([[[10, 10, 50, 50], [10, 10, 50, 50], [60, 20, 100, 60]],
                                [[5, 5, 45, 45], [0, 0, 0, 0], [0, 0, 0, 0]]],
                               [[0.9, 0.7, 0.6], [0.8, 0, 0]], [[0, 0, 0], [0, -1, -1]])
  _, metrics = evaluate(make_ground_truth(GT), make_batch(2), detections)
  expected = (51 + 25 * 0.75) / 101
  assert metrics["AP"] == pytest.approx(expected, abs=1e-6)
  assert metrics["AP50"] == pytest.approx(expected, abs=1e-6)
  assert metrics["AR100"] == pytest.approx(0.75)


def test_coordinates_and_category_ids_map_back_to_the_original_image():
  # Resized by 0.5: a resized box [10, 10, 30, 40] is [20, 20, 60, 80] in the original, clipped to the image
  # height 100 -> xywh [20, 20, 40, 60]; class 1 is category id 7.
  ground_truth = make_ground_truth([[[20, 20, 60, 80]]])
  batch = make_batch(1, scale=(0.5, 0.5), image_shape=(50, 60))
  detections = make_detections([[[10, 10, 30, 40]]], [[0.5]], [[1]])
  accumulator, metrics = evaluate(ground_truth, batch, detections, category_ids=(3, 7))
  assert accumulator.results == [{"image_id": 1, "category_id": 7, "bbox": [20.0, 20.0, 40.0, 60.0], "score": 0.5}]
  assert metrics["AP"] == pytest.approx(1.0)
  # Clipping: a box past the bottom edge (resized y2 = 60 -> 120 > 100) is cut at the image height.
  accumulator, _ = evaluate(ground_truth, batch, make_detections([[[10, 10, 30, 60]]], [[0.5]], [[1]]), (3, 7))
  assert accumulator.results[0]["bbox"] == [20.0, 20.0, 40.0, 80.0]


def test_padding_examples_and_rows_never_reach_the_results():
  detections = make_detections(GT_PADDED, [[0.9, 0.8, 0], [0.7, 0.6, 0]], [[0, 0, -1], [0, 0, -1]])
  batch = make_batch(2, valid=(True, False))
  accumulator, metrics = evaluate(make_ground_truth(GT), batch, detections)
  assert [r["image_id"] for r in accumulator.results] == [1, 1]
  # COCOeval covers the evaluated image only: image 2's objects are not counted as missed.
  assert accumulator.missing_images() == 1 and metrics["AP"] == pytest.approx(1.0)
  with pytest.raises(ValueError, match="twice"):
    accumulator.add(batch, detections)


def test_an_image_outside_the_ground_truth_is_an_error():
  accumulator = coco_eval.CocoAccumulator(make_ground_truth(GT[:1]), (7,))
  detections = make_detections(GT_PADDED, [[0.9, 0.8, 0], [0.7, 0.6, 0]], [[0, 0, -1], [0, 0, -1]])
  with pytest.raises(ValueError, match="image 2 is not in the ground truth"):
    accumulator.add(make_batch(2), detections)


def test_crowd_regions_are_ignored_not_missed():
  ground_truth = make_ground_truth(GT, crowd=[[False, True], [False, False]])
  # Only the non-crowd gts detected: recall is complete, AP 1.
  detections = make_detections([[[10, 10, 50, 50], [0, 0, 0, 0], [0, 0, 0, 0]], GT_PADDED[1]],
                               [[0.9, 0, 0], [0.7, 0.6, 0]], [[0, -1, -1], [0, 0, -1]])
  _, metrics = evaluate(ground_truth, make_batch(2), detections)
  assert metrics["AP"] == pytest.approx(1.0)


def test_object_sizes_come_from_the_ground_truth_area():
  # 40 x 40 boxes (1,600 px^2, COCO "medium") whose annotated areas are 900 px^2 ("small", below 32^2).
  ground_truth = make_ground_truth(GT, areas=[[900.0, 900.0], [900.0, 900.0]])
  detections = make_detections(GT_PADDED, [[0.9, 0.8, 0], [0.7, 0.6, 0]], [[0, 0, -1], [0, 0, -1]])
  _, metrics = evaluate(ground_truth, make_batch(2), detections)
  assert metrics["APs"] == pytest.approx(1.0) and metrics["APm"] == -1.0


def test_no_detections_gives_zero():
  detections = make_detections(np.zeros((2, 3, 4)), np.zeros((2, 3)), -np.ones((2, 3)))
  _, metrics = evaluate(make_ground_truth(GT), make_batch(2), detections)
  assert set(metrics) == set(coco_eval.METRIC_NAMES) and all(v == 0.0 for v in metrics.values())


def edge_case_set(seed=0):
  """Ground truth and results with every case COCOeval treats specially, over 3 categories and 6 images:
  crowd regions, annotated areas that differ from the box (small, medium and large objects), an image without
  objects that gets detections, an image without detections, 130 detections on one image (past maxDets 100),
  a category without ground truth, ties in score, boxes touching the image border."""
  rng = np.random.default_rng(seed)
  images, annotations, results = [], [], []
  for image_id in range(1, 7):
    images.append({"id": image_id, "height": 300, "width": 400})
    count = 0 if image_id == 3 else int(rng.integers(2, 9))
    for _ in range(count):
      w, h = np.exp(rng.uniform(np.log(6), np.log(250), 2))
      x, y = rng.uniform(0, 400 - w), rng.uniform(0, 300 - h)
      annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": int(rng.integers(1, 3)),
                          "bbox": [x, y, w, h], "area": float(w * h * rng.uniform(0.5, 1.0)),
                          "iscrowd": int(rng.uniform() < 0.15)})
    if image_id == 4:
      continue
    mine = [a for a in annotations if a["image_id"] == image_id]
    for a in mine:  # noisy copies of the objects, some duplicated, some of the wrong class
      for _ in range(int(rng.integers(1, 4))):
        x, y, w, h = np.asarray(a["bbox"]) + rng.normal(0, 0.08, 4) * np.tile(a["bbox"][2:], 2)
        results.append({"image_id": image_id, "category_id": int(rng.choice([a["category_id"], 3])),
                        "bbox": [float(max(x, 0.0)), float(max(y, 0.0)), float(abs(w)), float(abs(h))],
                        "score": float(np.round(rng.uniform(0.05, 1.0), 2))})
    for _ in range(130 if image_id == 5 else 12):  # clutter
      x, y = rng.uniform(0, 350), rng.uniform(0, 250)
      results.append({"image_id": image_id, "category_id": int(rng.integers(1, 4)),
                      "bbox": [x, y, float(rng.uniform(2, 400 - x)), float(rng.uniform(2, 300 - y))],
                      "score": float(np.round(rng.uniform(0.05, 1.0), 2))})
  categories = [{"id": c, "name": f"c{c}"} for c in (1, 2, 3)]
  return {"images": images, "annotations": annotations, "categories": categories}, results


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_fast_evaluator_gives_pycocotools_statistics(seed):
  ground_truth, results = edge_case_set(seed)
  assert sum(r["image_id"] == 5 for r in results) > 130
  for image_ids in (None, [1, 2, 3, 5]):
    fast = coco_eval.coco_metrics(ground_truth, results, image_ids)
    reference = coco_eval.reference_coco_metrics(ground_truth, results, image_ids)
    assert fast == reference
    assert 0 < fast["AP"] < 1 and fast["AR1"] < fast["AR10"] <= fast["AR100"]


def test_the_command_prints_the_table_or_json_and_rejects_files_in_one_line(tmp_path, capsys):
  import json
  from libra_jax.errors import DataError
  ground_truth, results = edge_case_set()
  (tmp_path / "gt.json").write_text(json.dumps(ground_truth))
  (tmp_path / "results.json").write_text(json.dumps(results))
  files = [f"--annotations={tmp_path / 'gt.json'}", f"--results={tmp_path / 'results.json'}"]
  assert coco_eval.main(files + ["--json"]) == 0
  printed = json.loads(capsys.readouterr().out)
  assert list(printed) == list(coco_eval.METRIC_NAMES) and printed == coco_eval.reference_coco_metrics(ground_truth,
                                                                                                        results)
  assert coco_eval.main(files) == 0
  table = capsys.readouterr().out.splitlines()
  assert len(table) == 12 and table[0].startswith(" Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all")
  assert table[0].endswith(f"= {printed['AP']:.3f}") and table[11].endswith(f"= {printed['ARl']:.3f}")
  (tmp_path / "other.json").write_text(json.dumps(results + [dict(results[0], image_id=99)]))
  with pytest.raises(DataError, match="detections of 1 images that .* does not list \\(e.g. image_id 99\\)"):
    coco_eval.main([files[0], f"--results={tmp_path / 'other.json'}"])
  (tmp_path / "cut.json").write_text(json.dumps(results)[:100])
  with pytest.raises(DataError, match="cut.json is not valid JSON"):
    coco_eval.main([files[0], f"--results={tmp_path / 'cut.json'}"])

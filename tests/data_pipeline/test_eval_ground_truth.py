"""Ground truth for COCOeval: a COCO folder's own annotation file, or the TFDS split's records."""

import json
import logging

import numpy as np
import pytest
import tensorflow_datasets as tfds

import mini_coco
from data_support import small_config
from libra_jax.data import pipeline
from libra_jax.evaluation import ground_truth
from libra_jax.evaluation.coco_eval import CocoAccumulator
from libra_jax.models.postprocess import Detections


def truth_of(data_config):
  """The eval split's ground truth, and its batches from the input pipeline."""
  info = pipeline.dataset_info(data_config)
  batches = list(pipeline.eval_batches(data_config, 4))
  table = pipeline.eval_batches(data_config, 4).table
  return info, ground_truth.eval_ground_truth(data_config, table, info.category_ids, info.class_names), batches


def boxes_as_detections(batch):
  """The batch's own ground truth (resized pixels) as detections with score 1."""
  labels = batch["labels"]
  return Detections(boxes=batch["boxes"], scores=np.where(labels >= 0, 1.0, 0.0).astype(np.float32),
                    classes=np.maximum(labels, 0), valid=labels >= 0)


def test_a_folder_is_evaluated_against_its_own_annotation_file(folder, folder_config):
  # max_instances 1 truncates v1's two boxes in the batches, not in the evaluation.
  data_config = folder_config(max_instances=1)
  info, truth, batches = truth_of(data_config)
  written = json.loads(open(folder.val_annotations).read())
  assert truth["annotations"] == [{k: a[k] for k in ("id", "image_id", "category_id", "bbox", "area", "iscrowd")}
                                  for a in written["annotations"]]
  assert [c["id"] for c in truth["categories"]] == [1, 18, 90]
  # Boxes through the pipeline (resized, padded) and back to the file's pixels and ids: AP 1.
  accumulator = CocoAccumulator(truth, info.category_ids)
  for batch in batches:
    accumulator.add(batch, boxes_as_detections(batch))
  assert {r["category_id"] for r in accumulator.results} == {1, 18, 90}
  metrics = accumulator.evaluate()
  # v1's second box (max_instances 1) is a crowd region: ignored, so every counted object is found.
  assert metrics["AP"] == pytest.approx(1.0) and metrics["AR100"] == pytest.approx(1.0)


def test_tfds_coco_ground_truth_is_built_from_the_split(coco2017_dir):
  data_config = small_config("coco/2017", tfds_data_dir=coco2017_dir, max_instances=1)
  info, truth, batches = truth_of(data_config)
  assert sorted(image["id"] for image in truth["images"]) == [501, 502, 503, 504, 505]
  expected = sorted((case.image_id, category_id, tuple(bbox), int(crowd))
                    for case in mini_coco.VAL for category_id, bbox, crowd in case.boxes)
  got = sorted((a["image_id"], a["category_id"], tuple(np.round(a["bbox"], 3)), a["iscrowd"])
               for a in truth["annotations"])
  assert got == expected
  accumulator = CocoAccumulator(truth, info.category_ids)
  for batch in batches:
    accumulator.add(batch, boxes_as_detections(batch))
  assert accumulator.evaluate()["AP"] == pytest.approx(1.0)


def test_shapes_areas_are_the_drawn_shapes_not_the_boxes(shapes_dir):
  data_config = small_config("shapes", tfds_data_dir=shapes_dir, eval_split="validation[:8]")
  _, truth, _ = truth_of(data_config)
  # The records read directly with TFDS: the same areas per image, in the same order.
  builder = tfds.builder("shapes/easy", data_dir=shapes_dir)
  records = {int(e["image/id"]): e["objects"] for e in
             tfds.as_numpy(builder.as_dataset(split="validation[:8]", decoders={"image": tfds.decode.SkipDecoding()}))}
  for image_id, objects in records.items():
    areas = [a["area"] for a in truth["annotations"] if a["image_id"] == image_id]
    np.testing.assert_allclose(sorted(areas), sorted(objects["area"]), rtol=1e-6)
  box_areas = np.array([a["bbox"][2] * a["bbox"][3] for a in truth["annotations"]])
  areas = np.array([a["area"] for a in truth["annotations"]])
  # Ellipses and triangles fill less than their boxes.
  assert np.all(areas <= box_areas * 1.001) and np.any(areas < 0.9 * box_areas)


def test_unusable_annotations_are_left_out_and_counted(tmp_path, caplog):
  path = tmp_path / "instances.json"
  path.write_text(json.dumps({
      "images": [{"id": 1, "file_name": "a.jpg", "height": 60, "width": 80}],
      "categories": [{"id": 3, "name": "a"}],
      "annotations": [
          {"id": 5, "image_id": 1, "category_id": 3, "bbox": [1, 2, 10, 20], "area": 150.0, "iscrowd": 1},
          {"image_id": 1, "category_id": 3, "bbox": [4, 4, 8, 8]},
          {"id": 7, "image_id": 1, "category_id": 3, "bbox": [1, 2, -1, 3]},
          {"id": 8, "image_id": 1, "category_id": 3, "bbox": [1, 2, "3"]},
          {"id": 9, "image_id": 1, "category_id": 4, "bbox": [1, 2, 3, 4]},
          {"id": 10, "category_id": 3, "bbox": [1, 2, 3, 4]},
      ]}))
  with caplog.at_level(logging.WARNING):
    truth = ground_truth.from_annotation_file(path, [3], ["a"])
  assert "4 annotations have no usable bbox" in caplog.text
  assert truth["annotations"] == [
      {"id": 5, "image_id": 1, "category_id": 3, "bbox": [1.0, 2.0, 10.0, 20.0], "area": 150.0, "iscrowd": 1},
      # No id, area or iscrowd: a fresh id, the box's area, not crowd.
      {"id": 11, "image_id": 1, "category_id": 3, "bbox": [4.0, 4.0, 8.0, 8.0], "area": 64.0, "iscrowd": 0}]
  (tmp_path / "broken.json").write_text("{")
  with pytest.raises(ValueError, match="cannot read the annotation file"):
    ground_truth.from_annotation_file(tmp_path / "broken.json", [3], ["a"])

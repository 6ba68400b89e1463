"""COCO-format ground truth for COCOeval: the dataset's own annotation file, or one built from the TFDS split.

A COCO-format folder (``data.dataset="coco_folder"``) is evaluated against its
annotation JSON as it is, like mmdetection's ``CocoMetric``: every annotation
counts, with its own ``area`` (COCO sizes objects by segmentation area) and
``iscrowd``. Other datasets (``coco/2017`` from TFDS, shapes) get their ground
truth from the split's metadata table, which holds every box of at least one
pixel a side with its ``objects/area`` and crowd flag, so nothing is lost to
``max_instances`` and no original JSON is needed.
"""

import json
import logging
import math
import pathlib
from typing import Any, Callable, Dict, List, Sequence

import numpy as np

from libra_jax.data.metadata import ImageTable
from libra_jax.errors import DataError

_log = logging.getLogger(__name__)

GroundTruth = Dict[str, List[Dict[str, Any]]]

# The annotation file of each coco_folder split (``config.data`` keys).
FOLDER_ANNOTATIONS = {"train": "train_annotations", "validation": "val_annotations"}


def from_table(table: ImageTable, category_ids: Sequence[int], class_names: Sequence[str]) -> GroundTruth:
  """Ground truth of the decodable images of ``table``: xywh boxes in original pixels, areas and crowd flags."""
  images, annotations = [], []
  for row in np.flatnonzero(table.decodable):
    image_id = int(table.image_id[row])
    images.append({"id": image_id, "height": int(table.height[row]), "width": int(table.width[row])})
    for k in range(table.row_splits[row], table.row_splits[row + 1]):
      x1, y1, x2, y2 = (float(v) for v in table.boxes[k])
      annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                          "category_id": int(category_ids[table.labels[k]]), "bbox": [x1, y1, x2 - x1, y2 - y1],
                          "area": float(table.area[k]), "iscrowd": int(table.is_crowd[k])})
  return {"images": images, "annotations": annotations, "categories": _categories(category_ids, class_names)}


def from_annotation_file(path, category_ids: Sequence[int], class_names: Sequence[str]) -> GroundTruth:
  """A COCO annotation file as ground truth.

  Annotations COCOeval cannot read (a ``bbox`` that is not four finite
  numbers with non-negative size, a category the dataset does not have, no
  integer ``image_id``) are left out, counted and logged; a missing ``area`` becomes the box's,
  a missing ``iscrowd`` 0 and a missing ``id`` a fresh one.
  """
  try:
    data = json.loads(pathlib.Path(path).read_text())
  except (OSError, json.JSONDecodeError) as error:
    raise DataError(f"cannot read the annotation file {path} for evaluation: {error}") from error
  known = set(int(c) for c in category_ids)
  images = [{"id": int(i["id"]), "height": int(i.get("height") or 0), "width": int(i.get("width") or 0)}
            for i in data.get("images", [])]
  used_ids = {a["id"] for a in data.get("annotations", []) if isinstance(a.get("id"), int)}
  next_id = max(used_ids, default=0) + 1
  annotations, left_out = [], 0
  for annotation in data.get("annotations", []):
    bbox = annotation.get("bbox")
    if (not _readable_box(bbox) or annotation.get("category_id") not in known
        or not isinstance(annotation.get("image_id"), int)):
      left_out += 1
      continue
    entry = {"id": annotation.get("id"), "image_id": annotation["image_id"],
             "category_id": int(annotation["category_id"]), "bbox": [float(v) for v in bbox],
             "area": annotation.get("area"), "iscrowd": int(bool(annotation.get("iscrowd", 0)))}
    if not isinstance(entry["id"], int):
      entry["id"], next_id = next_id, next_id + 1
    if not isinstance(entry["area"], (int, float)) or not math.isfinite(entry["area"]):
      entry["area"] = entry["bbox"][2] * entry["bbox"][3]
    annotations.append(entry)
  if left_out:
    _log.warning("%s: %d annotations have no usable bbox, an unknown category or no image id; evaluation leaves "
                 "them out", path, left_out)
  return {"images": images, "annotations": annotations, "categories": _categories(category_ids, class_names)}


def merge(parts: Sequence[GroundTruth]) -> GroundTruth:
  """One ground truth from those of disjoint sets of images (e.g. each process's share of a split).

  Annotation ids are numbered afresh, 1 upwards, in the order of ``parts``.
  """
  images = [image for part in parts for image in part["images"]]
  annotations = [dict(a, id=i + 1) for i, a in enumerate(a for part in parts for a in part["annotations"])]
  return {"images": images, "annotations": annotations, "categories": parts[0]["categories"]}


def eval_ground_truth(data_config, table: ImageTable, category_ids: Sequence[int], class_names: Sequence[str],
                      gather: Callable[[GroundTruth], List[GroundTruth]] = lambda part: [part]) -> GroundTruth:
  """The ground truth to evaluate ``data_config.eval_split`` against.

  ``table`` is this process's share of the split's metadata; ``gather``
  collects every process's part (``runtime.gather_objects`` in a run of
  several) when the ground truth is built from the tables.
  """
  if data_config.dataset == "coco_folder":
    split = data_config.eval_split.split("[")[0]
    return from_annotation_file(data_config[FOLDER_ANNOTATIONS[split]], category_ids, class_names)
  return merge(gather(from_table(table, category_ids, class_names)))


def _readable_box(bbox) -> bool:
  if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
    return False
  if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in bbox):
    return False
  return bbox[2] >= 0 and bbox[3] >= 0


def _categories(category_ids: Sequence[int], class_names: Sequence[str]) -> List[Dict[str, Any]]:
  return [{"id": int(c), "name": str(n)} for c, n in zip(category_ids, class_names)]

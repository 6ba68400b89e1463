"""COCO-style evaluation of fixed-size detections with pycocotools' own COCOeval.

Ground truth is collected from the same evaluation batches (boxes mapped back
to original image pixels with each example's ``scale``), so a TFDS split
evaluates without its original annotation file. Padding examples
(``valid=False``) and padding rows never reach the results.
"""

import contextlib
import io
from typing import Any, Dict, Iterable, List, Mapping, Sequence

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def _original_size(image_shape, scale):
  """(h, w) of the original image from the resized size and the (sy, sx) factors."""
  return np.round(np.asarray(image_shape, np.float64) / np.asarray(scale, np.float64)).astype(np.int64)


def _to_original_xywh(boxes, scale, size):
  """xyxy boxes of the resized image -> xywh in original pixels, clipped to the image."""
  sy, sx = float(scale[0]), float(scale[1])
  boxes = np.asarray(boxes, np.float64) / np.array([sx, sy, sx, sy])
  boxes[:, 0::2] = np.clip(boxes[:, 0::2], 0, size[1])
  boxes[:, 1::2] = np.clip(boxes[:, 1::2], 0, size[0])
  return np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)


class CocoAccumulator:
  """Collects ground truth and detections batch by batch, then runs COCOeval.

  Args:
    category_ids: the dataset's category id of each contiguous class index.
    class_names: a name per class.
  """

  def __init__(self, category_ids: Sequence[int], class_names: Sequence[str]):
    self.category_ids = [int(c) for c in category_ids]
    self.categories = [{"id": c, "name": str(n)} for c, n in zip(self.category_ids, class_names)]
    self.images: List[Dict[str, Any]] = []
    self.annotations: List[Dict[str, Any]] = []
    self.results: List[Dict[str, Any]] = []
    self._seen = set()

  def add(self, batch: Mapping[str, np.ndarray], detections) -> None:
    """Adds one batch (numpy, DESIGN.md contract) and its detections (numpy ``Detections``)."""
    for i in np.flatnonzero(np.asarray(batch["valid"])):
      image_id = int(batch["image_id"][i])
      if image_id in self._seen:
        raise ValueError(f"image {image_id} was evaluated twice")
      self._seen.add(image_id)
      scale, size = batch["scale"][i], _original_size(batch["image_shape"][i], batch["scale"][i])
      self.images.append({"id": image_id, "height": int(size[0]), "width": int(size[1])})
      gt_rows = np.flatnonzero(np.asarray(batch["labels"][i]) >= 0)
      for row, box in zip(gt_rows, _to_original_xywh(batch["boxes"][i][gt_rows], scale, size)):
        self.annotations.append({"id": len(self.annotations) + 1, "image_id": image_id,
                                 "category_id": self.category_ids[int(batch["labels"][i][row])],
                                 "bbox": [float(v) for v in box], "area": float(box[2] * box[3]),
                                 "iscrowd": int(bool(batch["is_crowd"][i][row]))})
      kept = np.flatnonzero(np.asarray(detections.valid[i]))
      for row, box in zip(kept, _to_original_xywh(detections.boxes[i][kept], scale, size)):
        self.results.append({"image_id": image_id, "category_id": self.category_ids[int(detections.classes[i][row])],
                             "bbox": [float(v) for v in box], "score": float(detections.scores[i][row])})

  def ground_truth(self) -> Dict[str, Any]:
    return {"images": self.images, "annotations": self.annotations, "categories": self.categories}

  def evaluate(self) -> Dict[str, float]:
    """COCOeval bbox metrics (``METRIC_NAMES``); all 0 when there is no detection."""
    return coco_metrics(self.ground_truth(), self.results)


def coco_metrics(ground_truth: Dict[str, Any], results: List[Dict[str, Any]]) -> Dict[str, float]:
  """pycocotools COCOeval (bbox) of ``results`` against a COCO-format ``ground_truth`` dict."""
  if not results:
    return {name: 0.0 for name in METRIC_NAMES}
  with contextlib.redirect_stdout(io.StringIO()):
    coco = COCO()
    coco.dataset = ground_truth
    coco.createIndex()
    # loadRes adds fields (area, id, segmentation) to the dicts it gets: give it copies.
    evaluator = COCOeval(coco, coco.loadRes([dict(r) for r in results]), "bbox")
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
  return {name: float(value) for name, value in zip(METRIC_NAMES, evaluator.stats)}


def evaluate_batches(predict, batches: Iterable[Mapping[str, np.ndarray]], category_ids: Sequence[int],
                     class_names: Sequence[str]) -> Dict[str, float]:
  """Runs ``predict(batch) -> Detections`` over ``batches`` and returns the COCO metrics."""
  accumulator = CocoAccumulator(category_ids, class_names)
  for batch in batches:
    accumulator.add(batch, predict(batch))
  return accumulator.evaluate()

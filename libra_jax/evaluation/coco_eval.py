"""COCO-style evaluation of fixed-size detections with pycocotools' own COCOeval.

Detections are mapped back to original image pixels with each example's
``scale``, clipped, and written in COCO's results format with the dataset's
own category ids. Padding examples (``valid=False``) and padding rows never
reach the results. The ground truth comes from ``ground_truth``.
"""

import contextlib
import io
import logging
from typing import Any, Dict, List, Mapping, Optional, Sequence, Set

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from libra_jax.errors import DataError

_log = logging.getLogger(__name__)

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
  """Collects detections batch by batch in COCO's results format, then runs COCOeval against ``ground_truth``.

  Args:
    ground_truth: COCO-format ``{"images", "annotations", "categories"}``
      (``ground_truth.eval_ground_truth``).
    category_ids: the dataset's category id of each contiguous class index.

  COCOeval covers the images that were added (``params.imgIds``), so a
  slice of a split, or a split with unreadable images, is scored on what was
  evaluated; ground-truth images that were not are counted in
  ``missing_images()`` and logged.
  """

  def __init__(self, ground_truth: Dict[str, Any], category_ids: Sequence[int]):
    self.ground_truth = ground_truth
    self.category_ids = [int(c) for c in category_ids]
    self.results: List[Dict[str, Any]] = []
    self.image_ids: Set[int] = set()
    self._known = {int(image["id"]) for image in ground_truth["images"]}

  def add(self, batch: Mapping[str, np.ndarray], detections) -> None:
    """Adds one batch's detections (numpy ``Detections``).

    ``batch`` needs ``image_id``, ``image_shape``, ``scale`` and ``valid`` of the batch contract.
    """
    for i in np.flatnonzero(np.asarray(batch["valid"])):
      image_id = int(batch["image_id"][i])
      self._claim(image_id)
      scale, size = batch["scale"][i], _original_size(batch["image_shape"][i], batch["scale"][i])
      kept = np.flatnonzero(np.asarray(detections.valid[i]))
      for row, box in zip(kept, _to_original_xywh(detections.boxes[i][kept], scale, size)):
        self.results.append({"image_id": image_id, "category_id": self.category_ids[int(detections.classes[i][row])],
                             "bbox": [float(v) for v in box], "score": float(detections.scores[i][row])})

  def extend(self, results: Sequence[Dict[str, Any]], image_ids: Sequence[int]) -> None:
    """Adds what another accumulator collected (its ``results`` and ``image_ids``), e.g. another process's."""
    for image_id in image_ids:
      self._claim(int(image_id))
    self.results.extend(results)

  def _claim(self, image_id: int) -> None:
    if image_id in self.image_ids:
      raise ValueError(f"image {image_id} was evaluated twice")
    if image_id not in self._known:
      raise DataError(f"image {image_id} is not in the ground truth: the annotation file does not describe the "
                      f"prepared dataset (prepare it again)")
    self.image_ids.add(image_id)

  def missing_images(self) -> int:
    """Ground-truth images not evaluated (unreadable, or outside the evaluated slice)."""
    return len(self._known - self.image_ids)

  def evaluate(self) -> Dict[str, float]:
    """COCOeval bbox metrics (``METRIC_NAMES``) over the added images; all 0 when there is no detection."""
    if self.missing_images():
      _log.info("COCOeval covers the %d evaluated images; %d images of the ground truth were not evaluated",
                len(self.image_ids), self.missing_images())
    return coco_metrics(self.ground_truth, self.results, self.image_ids)


def coco_metrics(ground_truth: Dict[str, Any], results: List[Dict[str, Any]],
                 image_ids: Optional[Sequence[int]] = None) -> Dict[str, float]:
  """pycocotools COCOeval (bbox) of ``results`` against a COCO-format ``ground_truth`` dict.

  ``image_ids``: the images to score (default: all of the ground truth's).
  """
  if not results:
    return {name: 0.0 for name in METRIC_NAMES}
  # pycocotools prints as it goes. The redirect is process-wide: while COCOeval runs in the training loop's
  # background thread, the main thread logs to stderr (tqdm, logging), not stdout.
  with contextlib.redirect_stdout(io.StringIO()):
    coco = COCO()
    coco.dataset = ground_truth
    coco.createIndex()
    # loadRes adds fields (area, id, segmentation) to the dicts it gets: give it copies.
    evaluator = COCOeval(coco, coco.loadRes([dict(r) for r in results]), "bbox")
    if image_ids is not None:
      evaluator.params.imgIds = sorted(int(i) for i in image_ids)
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
  return {name: float(value) for name, value in zip(METRIC_NAMES, evaluator.stats)}

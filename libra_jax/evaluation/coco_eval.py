"""COCO-style evaluation of fixed-size detections: COCOeval's numbers, computed by faster-coco-eval.

Detections are mapped back to original image pixels with each example's
``scale``, clipped, and written in COCO's results format with the dataset's
own category ids. Padding examples (``valid=False``) and padding rows never
reach the results. The ground truth comes from ``ground_truth``.

The metrics are COCOeval's (bbox): ``coco_metrics`` runs faster-coco-eval, a
C++ implementation of the same algorithm, about 10x faster than pycocotools'
at val2017's size with the same twelve statistics; ``reference_coco_metrics``
runs pycocotools' own COCOeval, which the tests and
``benchmarks/bench_coco_eval.py`` compare with.

As a command, mmdetection-style::

    python -m libra_jax.evaluation.coco_eval --annotations=GT.json --results=RESULTS.json [--json]

prints COCO's table of the twelve statistics (or one JSON object with
``AP AP50 AP75 APs APm APl AR1 AR10 AR100 ARs ARm ARl``).
"""

import contextlib
import io
import json
import logging
import pathlib
from typing import Any, Dict, List, Mapping, Optional, Sequence, Set

import faster_coco_eval
import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from libra_jax import cli
from libra_jax.errors import DataError

_log = logging.getLogger(__name__)

METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
# COCOeval's summary line of each statistic.
_SUMMARY = (("Average Precision", "AP", "0.50:0.95", "all", 100), ("Average Precision", "AP", "0.50", "all", 100),
            ("Average Precision", "AP", "0.75", "all", 100), ("Average Precision", "AP", "0.50:0.95", "small", 100),
            ("Average Precision", "AP", "0.50:0.95", "medium", 100),
            ("Average Precision", "AP", "0.50:0.95", "large", 100),
            ("Average Recall", "AR", "0.50:0.95", "all", 1), ("Average Recall", "AR", "0.50:0.95", "all", 10),
            ("Average Recall", "AR", "0.50:0.95", "all", 100), ("Average Recall", "AR", "0.50:0.95", "small", 100),
            ("Average Recall", "AR", "0.50:0.95", "medium", 100), ("Average Recall", "AR", "0.50:0.95", "large", 100))


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
  """COCOeval (bbox) statistics of ``results`` against a COCO-format ``ground_truth`` dict, by faster-coco-eval.

  ``image_ids``: the images to score (default: all of the ground truth's).
  """
  return _cocoeval(faster_coco_eval.COCO, faster_coco_eval.COCOeval_faster, ground_truth, results, image_ids,
                   print_function=lambda *args: None)


def reference_coco_metrics(ground_truth: Dict[str, Any], results: List[Dict[str, Any]],
                           image_ids: Optional[Sequence[int]] = None) -> Dict[str, float]:
  """``coco_metrics`` by pycocotools' own COCOeval: the reference the tests and the benchmark compare with."""
  return _cocoeval(COCO, COCOeval, ground_truth, results, image_ids)


def _cocoeval(coco_class, cocoeval_class, ground_truth, results, image_ids, **options) -> Dict[str, float]:
  if not results:
    return {name: 0.0 for name in METRIC_NAMES}
  # pycocotools prints as it goes. The redirect is process-wide: while COCOeval runs in the training loop's
  # background thread, the main thread logs to stderr (tqdm, logging), not stdout.
  with contextlib.redirect_stdout(io.StringIO()):
    coco = coco_class()
    coco.dataset = ground_truth
    coco.createIndex()
    # loadRes adds fields (area, id, segmentation) to the dicts it gets: give it copies.
    evaluator = cocoeval_class(coco, coco.loadRes([dict(r) for r in results]), "bbox", **options)
    if image_ids is not None:
      evaluator.params.imgIds = sorted(int(i) for i in image_ids)
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
  return {name: float(value) for name, value in zip(METRIC_NAMES, evaluator.stats)}


def format_table(metrics: Mapping[str, float]) -> str:
  """COCOeval's summary: one line per statistic, as pycocotools prints it."""
  lines = []
  for name, (title, short, iou, area, detections) in zip(METRIC_NAMES, _SUMMARY):
    lines.append(f" {title:<18} ({short}) @[ IoU={iou:<9} | area={area:>6s} | maxDets={detections:>3d} ] = "
                 f"{metrics[name]:0.3f}")
  return "\n".join(lines)


def _read_json(path: str, what: str):
  try:
    return json.loads(pathlib.Path(path).read_text())
  except FileNotFoundError:
    raise DataError(f"{what} {path} does not exist") from None
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
    raise DataError(f"{what} {path} is not valid JSON ({error})") from None


def read_files(annotations_path: str, results_path: str):
  """``(ground truth, results)`` of a COCO annotation file and a COCO results file, checked for what COCOeval needs."""
  ground_truth = _read_json(annotations_path, "the annotation file")
  if not isinstance(ground_truth, dict) or not all(isinstance(ground_truth.get(key), list)
                                                   for key in ("images", "annotations", "categories")):
    raise DataError(f"the annotation file {annotations_path} is not COCO's format: expected an object with lists "
                    f"'images', 'annotations' and 'categories'")
  results = _read_json(results_path, "the results file")
  fields = {"image_id", "category_id", "bbox", "score"}
  if not isinstance(results, list) or not all(isinstance(r, dict) and fields <= set(r) for r in results):
    raise DataError(f"the results file {results_path} is not COCO's results format: expected a list of objects "
                    f"with {', '.join(sorted(fields))}")
  known = {image["id"] for image in ground_truth["images"]}
  unknown = sorted({r["image_id"] for r in results} - known)
  if unknown:
    raise DataError(f"the results file {results_path} has detections of {len(unknown)} images that "
                    f"{annotations_path} does not list (e.g. image_id {unknown[0]}): are they of another split?")
  return ground_truth, results


def main(argv) -> int:
  parser = cli.ArgumentParser(prog="python -m libra_jax.evaluation.coco_eval", config=None,
                              description="COCO's bbox metrics of a results file against an annotation file.")
  parser.add_argument("--annotations", required=True, help="COCO annotation file (ground truth), e.g. "
                      "instances_val2017.json")
  parser.add_argument("--results", required=True, help="COCO results file: a list of {image_id, category_id, "
                      "bbox (x, y, w, h), score}")
  parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
  args = parser.parse_args(argv)
  metrics = coco_metrics(*read_files(args.annotations, args.results))
  print(json.dumps(metrics) if args.json else format_table(metrics))
  return 0


if __name__ == "__main__":
  cli.run(main)

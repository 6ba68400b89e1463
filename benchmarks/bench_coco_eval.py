"""Host-side cost of COCO evaluation at COCO val2017's size: 5,000 images, 100 detections each.

Run ``python benchmarks/bench_coco_eval.py [--images N] [--reference]``; it
prints the dict ``bench_coco_eval`` returns: seconds to convert the
fixed-size detections to COCO's results format (``CocoAccumulator.add``) and
seconds of COCOeval (load, evaluate, accumulate, summarize) as evaluation runs
it (faster-coco-eval); with ``--reference`` also pycocotools' own, and whether
the twelve statistics are equal. The ground truth mimics
val2017: 7.3 objects per image over 80 categories, 1 % crowd regions, sizes
from 8 to 400 px; detections are jittered copies of the objects plus
clutter, 100 per image as the test settings keep.
"""

import json
import time

import numpy as np

from libra_jax import cli
from libra_jax.evaluation.coco_eval import CocoAccumulator, reference_coco_metrics
from libra_jax.models.postprocess import Detections

NUM_CLASSES = 80
HEIGHT, WIDTH = 480, 640


def synthetic_ground_truth(num_images: int, rng: np.random.Generator):
  """COCO-format ground truth; also each image's ``[n, 4]`` xyxy boxes and ``[n]`` labels."""
  images, annotations, objects = [], [], []
  for image_id in range(1, num_images + 1):
    count = rng.poisson(7.3)
    sizes = np.exp(rng.uniform(np.log(8), np.log(400), (count, 2)))
    corners = rng.uniform(0, 1, (count, 2)) * (np.array([WIDTH, HEIGHT]) - sizes)
    boxes = np.concatenate([corners, corners + sizes], axis=1)
    labels = rng.integers(0, NUM_CLASSES, count)
    images.append({"id": image_id, "height": HEIGHT, "width": WIDTH})
    for box, label in zip(boxes, labels):
      annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": int(label) + 1,
                          "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]],
                          "area": float((box[2] - box[0]) * (box[3] - box[1]) * 0.7),
                          "iscrowd": int(rng.uniform() < 0.01)})
    objects.append((boxes, labels))
  categories = [{"id": c + 1, "name": f"class {c}"} for c in range(NUM_CLASSES)]
  return {"images": images, "annotations": annotations, "categories": categories}, objects


def synthetic_detections(objects, per_image: int, rng: np.random.Generator) -> Detections:
  """``[N, per_image]`` detections: three jittered copies of each object, then random clutter."""
  count = len(objects)
  boxes = np.zeros((count, per_image, 4), np.float32)
  classes = rng.integers(0, NUM_CLASSES, (count, per_image)).astype(np.int32)
  for i, (gt_boxes, labels) in enumerate(objects):
    corners = rng.uniform(0, [WIDTH, HEIGHT, WIDTH, HEIGHT], (per_image, 4))
    boxes[i] = np.concatenate([np.minimum(corners[:, :2], corners[:, 2:]), np.maximum(corners[:, :2], corners[:, 2:])],
                              axis=1)
    copies = np.repeat(gt_boxes, 3, axis=0)[:per_image]
    sides = np.tile(copies[:, 2:] - copies[:, :2], 2)
    boxes[i, :len(copies)] = copies + rng.normal(0, 0.1, copies.shape) * sides
    classes[i, :len(copies)] = np.repeat(labels, 3)[:per_image]
  scores = rng.uniform(0.05, 1.0, (count, per_image)).astype(np.float32)
  return Detections(boxes=boxes, scores=scores, classes=classes, valid=np.ones((count, per_image), bool))


def bench_coco_eval(num_images: int = 5000, per_image: int = 100, batch_size: int = 8, seed: int = 0,
                    reference: bool = False):
  """Seconds of the results conversion and of COCOeval for ``num_images`` images (``reference``: pycocotools' too)."""
  rng = np.random.default_rng(seed)
  ground_truth, objects = synthetic_ground_truth(num_images, rng)
  detections = synthetic_detections(objects, per_image, rng)
  accumulator = CocoAccumulator(ground_truth, list(range(1, NUM_CLASSES + 1)))
  start = time.perf_counter()
  for first in range(0, num_images, batch_size):
    rows = slice(first, min(first + batch_size, num_images))
    size = rows.stop - rows.start
    batch = {"image_id": np.arange(rows.start + 1, rows.stop + 1), "valid": np.ones(size, bool),
             "image_shape": np.tile([HEIGHT, WIDTH], (size, 1)), "scale": np.ones((size, 2), np.float32)}
    accumulator.add(batch, Detections(*(field[rows] for field in detections)))
  convert_s = time.perf_counter() - start
  start = time.perf_counter()
  metrics = accumulator.evaluate()
  result = {"images": num_images, "detections": len(accumulator.results),
            "annotations": len(ground_truth["annotations"]), "convert_s": round(convert_s, 2),
            "cocoeval_s": round(time.perf_counter() - start, 2), "AP": round(metrics["AP"], 3)}
  if reference:
    start = time.perf_counter()
    expected = reference_coco_metrics(ground_truth, accumulator.results, sorted(accumulator.image_ids))
    result.update(reference_cocoeval_s=round(time.perf_counter() - start, 2), same_statistics=expected == metrics)
  return result


def main(argv) -> int:
  parser = cli.ArgumentParser(prog="python benchmarks/bench_coco_eval.py", description=__doc__.split("\n")[0],
                              config=None)
  parser.add_argument("--images", type=int, default=5000)
  parser.add_argument("--reference", action="store_true", help="also time pycocotools' COCOeval and compare")
  args = parser.parse_args(argv)
  if args.images < 1:
    parser.error(f"--images must be at least 1, got {args.images}")
  print(json.dumps(bench_coco_eval(args.images, reference=args.reference)))
  return 0


if __name__ == "__main__":
  cli.run(main)

"""Throughput of the training input pipeline, in images per second, on this machine.

Two cases, one JSON line each:
  shapes: the synthetic default (about 170 x 140 JPEGs into 160 x 192 buckets).
  coco_sized: 640 x 480 (and 480 x 640) JPEGs in a COCO-format folder, resized
    to COCO's 1333 x 800 scale into its 800 x 1088 / 1088 x 800 buckets.

    python benchmarks/bench_input.py [--batches=40] [--tfds_data_dir=DIR]
    python benchmarks/bench_input.py --config=FILE[:arg] [--config.KEY=VALUE ...] [--batches=40]

Datasets are prepared in a temporary directory unless ``--tfds_data_dir`` is
given. With ``--config``, one case instead: the training stream of that
experiment's ``config.data``, in batches of its ``global_batch_size`` (one
process). The time to read the metadata (``setup_seconds``) is reported apart.
"""

import io
import json
import pathlib
import tempfile
import time

import numpy as np
from PIL import Image

from libra_jax import cli
from libra_jax.data import default_data_config, pipeline, shapes

COCO_SIZED_IMAGES = 64
WARMUP_BATCHES = 3


def write_coco_sized_folder(root: pathlib.Path, count: int) -> dict:
  """A COCO-format folder of ``count`` shapes images upscaled to 640 x 480 (every fourth one portrait)."""
  paths = {}
  for split in ("train", "val"):
    image_dir = root / split
    image_dir.mkdir(parents=True)
    images, annotations = [], []
    for index in range(count):
      rng = np.random.default_rng([7, index])
      image, boxes, labels, _ = shapes.render_example(rng, shapes.Shapes.BUILDER_CONFIGS[0])
      size = (480, 640) if index % 4 == 3 else (640, 480)
      factors = np.array([size[0] / image.shape[1], size[1] / image.shape[0]] * 2)
      buffer = io.BytesIO()
      Image.fromarray(image).resize(size, Image.BILINEAR).save(buffer, format="JPEG", quality=90)
      (image_dir / f"{index:06d}.jpg").write_bytes(buffer.getvalue())
      images.append({"id": index + 1, "file_name": f"{index:06d}.jpg", "width": size[0], "height": size[1]})
      for box, label in zip(boxes * factors, labels):
        annotations.append({"id": len(annotations) + 1, "image_id": index + 1, "category_id": int(label) + 1,
                            "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]],
                            "area": float((box[2] - box[0]) * (box[3] - box[1])), "iscrowd": 0})
    categories = [{"id": i + 1, "name": name} for i, name in enumerate(shapes.CLASS_NAMES)]
    annotation_path = root / f"instances_{split}.json"
    annotation_path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    paths[f"{split}_annotations"], paths[f"{split}_images"] = str(annotation_path), str(image_dir)
  return paths


def measure(name: str, data_config, batch_size: int, batches: int) -> dict:
  began = time.perf_counter()
  stream = pipeline.train_batches(data_config, batch_size, seed=0)
  for _ in range(WARMUP_BATCHES):
    next(stream)
  setup = time.perf_counter() - began
  began = time.perf_counter()
  shapes_seen = set()
  for _ in range(batches):
    shapes_seen.add(next(stream)["image"].shape[1:3])
  elapsed = time.perf_counter() - began
  return {"benchmark": "input_pipeline", "case": name, "batch_size": batch_size, "batches": batches,
          "buckets": sorted(shapes_seen), "images_per_sec": round(batches * batch_size / elapsed, 1),
          "setup_seconds": round(setup, 2)}


def main(argv) -> int:
  parser = cli.ArgumentParser(prog="python benchmarks/bench_input.py", description=__doc__.split("\n")[0],
                              config="optional")
  parser.add_argument("--batches", type=int, default=40)
  parser.add_argument("--tfds_data_dir", default=None, help="without --config: where the two datasets are prepared")
  args = parser.parse_args(argv)
  if args.batches < 1:
    parser.error(f"--batches must be at least 1, got {args.batches}")
  if args.config is not None:
    pipeline.dataset_info(args.config.data)
    print(json.dumps(measure(args.config.data.dataset, args.config.data, args.config.global_batch_size,
                             args.batches)), flush=True)
    return 0
  with tempfile.TemporaryDirectory() as scratch:
    data_dir = args.tfds_data_dir or str(pathlib.Path(scratch) / "tfds")
    data = default_data_config("shapes")
    data.tfds_data_dir = data_dir
    pipeline.dataset_info(data)  # prepares shapes if needed, outside the timing
    print(json.dumps(measure("shapes", data, 8, args.batches)), flush=True)
    data = default_data_config("coco_folder")
    data.update(tfds_data_dir=data_dir, **write_coco_sized_folder(pathlib.Path(scratch) / "coco_sized",
                                                                  COCO_SIZED_IMAGES))
    pipeline.dataset_info(data)
    print(json.dumps(measure("coco_sized", data, 2, args.batches)), flush=True)
  return 0


if __name__ == "__main__":
  cli.run(main)

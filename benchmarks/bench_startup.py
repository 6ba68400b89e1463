"""Start-up time of training on a COCO-format folder: the first start, and a restart, each in a fresh process.

A start prepares the folder as a TFDS dataset (first start only), reads the
split's metadata (image sizes from the headers, boxes; stored next to the
dataset, so a restart reads the stored table), plans the batches and delivers
the first one. Each phase is timed inside a fresh Python process, and the
process's whole wall time (imports included) is given beside them. One JSON
line per start:

    python benchmarks/bench_startup.py [--images=20000] [--workdir=DIR]

The folder holds ``--images`` 96 x 72 JPEGs (every fourth one portrait), each
with one box; it is written to ``--workdir`` (a temporary directory by
default), outside the timing.
"""

import io
import json
import pathlib
import subprocess
import sys
import tempfile
import time

import numpy as np
from PIL import Image

from libra_jax import cli

# Runs in the fresh process: argv[1] is the data config's fields as JSON.
START = """
import json, sys, time
began = time.perf_counter()
from libra_jax.data import default_data_config, pipeline
data = default_data_config("coco_folder")
data.update(json.loads(sys.argv[1]))
imported = time.perf_counter()
pipeline.dataset_info(data)
prepared = time.perf_counter()
batches = pipeline.train_batches(data, 2, seed=0)
planned = time.perf_counter()
next(batches)
delivered = time.perf_counter()
print(json.dumps({"import_seconds": imported - began, "prepare_seconds": prepared - imported,
                  "metadata_and_plan_seconds": planned - prepared, "first_batch_seconds": delivered - planned}))
"""


def write_folder(root: pathlib.Path, count: int) -> dict:
  """A COCO-format folder of ``count`` small noise JPEGs, one box each, as both its train and val split."""
  image_dir = root / "images"
  image_dir.mkdir(parents=True)
  rng = np.random.default_rng(0)
  images, annotations = [], []
  for index in range(count):
    width, height = (72, 96) if index % 4 == 3 else (96, 72)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), np.uint8)).save(buffer, format="JPEG", quality=80)
    (image_dir / f"{index:06d}.jpg").write_bytes(buffer.getvalue())
    images.append({"id": index + 1, "file_name": f"{index:06d}.jpg", "width": width, "height": height})
    annotations.append({"id": index + 1, "image_id": index + 1, "category_id": 1, "bbox": [8, 8, 40, 30],
                        "area": 1200.0, "iscrowd": 0})
  path = root / "instances.json"
  path.write_text(json.dumps({"images": images, "annotations": annotations,
                              "categories": [{"id": 1, "name": "thing"}]}))
  return {"train_annotations": str(path), "train_images": str(image_dir), "val_annotations": str(path),
          "val_images": str(image_dir)}


def timed_start(data_fields: dict) -> dict:
  began = time.perf_counter()
  finished = subprocess.run([sys.executable, "-c", START, json.dumps(data_fields)], capture_output=True, text=True)
  if finished.returncode != 0:
    raise RuntimeError(f"the timed start failed:\n{finished.stderr[-3000:]}")
  phases = json.loads(finished.stdout.strip().splitlines()[-1])
  return {"process_seconds": round(time.perf_counter() - began, 2), **{k: round(v, 2) for k, v in phases.items()}}


def main(argv) -> int:
  parser = cli.ArgumentParser(prog="python benchmarks/bench_startup.py", description=__doc__.split("\n")[0],
                              config=None)
  parser.add_argument("--images", type=int, default=20_000)
  parser.add_argument("--workdir", default=None, help="a new directory for the folder and the prepared dataset")
  args = parser.parse_args(argv)
  if args.images < 2:
    parser.error(f"--images must be at least 2, got {args.images}")
  if args.workdir and pathlib.Path(args.workdir).exists():
    parser.error(f"--workdir {args.workdir} exists; give a new directory, so that the first start is a first start")
  with tempfile.TemporaryDirectory() as scratch:
    root = pathlib.Path(args.workdir or scratch)
    fields = dict(write_folder(root / "folder", args.images), tfds_data_dir=str(root / "tfds"),
                  scale=[96, 96], buckets=[[96, 96]], min_size=8)
    for start in ("first", "restart"):
      print(json.dumps({"benchmark": "startup", "start": start, "images": args.images, **timed_start(fields)}),
            flush=True)
  return 0


if __name__ == "__main__":
  cli.run(main)

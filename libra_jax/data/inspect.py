"""Look at what the input pipeline yields: counts, drops and repairs, bucket use, padding, speed, pictures.

    python -m libra_jax.data.inspect --config=configs/shapes_libra_faster_rcnn.py \\
        [--split=train|validation] [--num_batches=N] [--batch_size=B] [--out=DIR] [--json]

``--config=FILE[:arg]`` and ``--config.KEY=VALUE`` name the experiment as in
every command (README: "One command line"); its ``.data`` is what is read. ``--split=train`` reads the
training stream, ``validation`` the evaluation one. ``--out`` writes one PNG
per batch: the images de-normalized, boxes in green (crowd regions in red)
with their class names, padding slots dimmed. ``--json`` prints the report as
one JSON object.
"""

import collections
import contextlib
import json
import pathlib
import sys
import time
from typing import Dict, List, Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw

from libra_jax import cli
from libra_jax.data import pipeline

BOX_COLOUR = (0, 255, 0)
CROWD_COLOUR = (255, 0, 0)


def draw_batch(batch: Dict[str, np.ndarray], mean: Sequence[float], std: Sequence[float],
               class_names: List[str]) -> Image.Image:
  """A grid of the batch's images (padded bucket shape) with their ground truth drawn."""
  size, height, width = batch["image"].shape[:3]
  columns = int(np.ceil(np.sqrt(size)))
  rows = -(-size // columns)
  grid = Image.new("RGB", (columns * width, rows * height))
  for slot in range(size):
    pixels = np.clip(batch["image"][slot] * np.asarray(std) + np.asarray(mean), 0, 255).astype(np.uint8)
    if not batch["valid"][slot]:
      pixels = pixels // 3
    tile = Image.fromarray(pixels)
    draw = ImageDraw.Draw(tile)
    for box, label, crowd in zip(batch["boxes"][slot], batch["labels"][slot], batch["is_crowd"][slot]):
      if label < 0:
        continue
      colour = CROWD_COLOUR if crowd else BOX_COLOUR
      draw.rectangle(box.tolist(), outline=colour)
      draw.text((float(box[0]) + 2, float(box[1]) + 1), class_names[label], fill=colour)
    if not batch["valid"][slot]:
      draw.text((4, 4), "padding", fill=(255, 255, 255))
    grid.paste(tile, ((slot % columns) * width, (slot // columns) * height))
  return grid


def inspect(data_config, split: str, num_batches: int, batch_size: int, seed: int = 0,
            out: Optional[pathlib.Path] = None) -> Dict[str, object]:
  """Reads up to ``num_batches`` batches of ``split`` ("train" or "validation") and reports on them."""
  began = time.perf_counter()
  if split == "train":
    batches = pipeline.train_batches(data_config, batch_size, seed=seed)
  else:
    batches = pipeline.eval_batches(data_config, batch_size)
  class_names = pipeline.dataset_info(data_config).class_names
  setup = time.perf_counter() - began
  images = instances = crowd = 0
  used = padded = 0
  buckets = collections.Counter()
  count = 0
  began = time.perf_counter()
  for batch in batches:
    valid = batch["valid"]
    images += int(valid.sum())
    real = (batch["labels"] >= 0) & valid[:, None]
    instances += int((real & ~batch["is_crowd"]).sum())
    crowd += int((real & batch["is_crowd"]).sum())
    height, width = batch["image"].shape[1:3]
    buckets[f"{height}x{width}"] += 1
    used += int(np.prod(batch["image_shape"][valid], axis=1).sum())
    padded += int(valid.sum()) * height * width
    if out is not None:
      out.mkdir(parents=True, exist_ok=True)
      draw_batch(batch, data_config.mean, data_config.std, class_names).save(out / f"{split}_{count:04d}.png")
    count += 1
    if count == num_batches:
      break
  elapsed = time.perf_counter() - began
  return {"dataset": data_config.dataset, "split": split, "batches": count, "images": images,
          "instances": instances, "crowd": crowd, "truncated": batches.stats["truncated"],
          "dropped": batches.stats["dropped"], "repaired": batches.stats["repaired"], "buckets": dict(buckets),
          "padding_fraction": 1.0 - used / padded if padded else 0.0,
          "images_per_sec": images / elapsed if elapsed > 0 else 0.0, "setup_seconds": setup}


def _print_report(report: Dict[str, object]) -> None:
  print(f"{report['dataset']} {report['split']}: {report['batches']} batches, {report['images']} images, "
        f"{report['instances']} instances (+{report['crowd']} crowd), {report['truncated']} truncated")
  for kind in ("dropped", "repaired"):
    for reason, count in report[kind].items():
      print(f"  {kind} {reason}: {count}")
  print("  buckets: " + ", ".join(f"{shape} x{count}" for shape, count in report["buckets"].items()))
  print(f"  padding {report['padding_fraction']:.1%}, {report['images_per_sec']:.1f} images/s "
        f"(setup {report['setup_seconds']:.1f} s)")


def main(argv) -> int:
  parser = cli.ArgumentParser(prog="python -m libra_jax.data.inspect", description=__doc__.split("\n")[0])
  parser.add_argument("--split", choices=("train", "validation"), default="train")
  parser.add_argument("--num_batches", type=int, default=10)
  parser.add_argument("--batch_size", type=int, default=8)
  parser.add_argument("--out", type=pathlib.Path, help="directory for PNG grids of the batches")
  parser.add_argument("--json", action="store_true", help="print the report as one JSON object")
  args = parser.parse_args(argv)
  for name in ("num_batches", "batch_size"):
    if getattr(args, name) < 1:
      parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
  # TFDS prints while it prepares a dataset; keep stdout for the report alone.
  with contextlib.redirect_stdout(sys.stderr):
    report = inspect(args.config.data, args.split, args.num_batches, args.batch_size,
                     seed=args.config.get("seed", 0), out=args.out)
  if args.json:
    print(json.dumps(report))
  else:
    _print_report(report)
  return 0


if __name__ == "__main__":
  cli.run(main)

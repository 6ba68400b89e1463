"""Detect objects in image files and draw them.

``python -m libra_jax.predict --config=configs/<name>.py (--workdir=DIR | --checkpoint=FILE) --out=OUT IMAGE...``

Each image is resized and normalized as in evaluation, padded to its bucket,
run through the jit-compiled detector, and its detections are mapped back to
the image's own pixels. ``OUT/<name>.png`` shows them (class name and score)
on the image at its own size; ``OUT/detections.json`` lists them per file as
``{"box": [x1, y1, x2, y2], "score", "class", "class_name"}``. An unreadable
or corrupt image gets a one-line error naming the file and is skipped.
"""

import argparse
import json
import pathlib
import sys
from typing import Dict, List, Tuple

import jax
import numpy as np
from PIL import Image, ImageDraw, UnidentifiedImageError

from libra_jax.data import pipeline
from libra_jax.models.detectors import build_detector
from libra_jax.training import loop
from libra_jax.tools.summary import load_config


def read_rgb(path) -> np.ndarray:
  """``[H, W, 3]`` uint8 RGB of an image file (grayscale, palette, RGBA and CMYK converted)."""
  with Image.open(path) as image:
    image.load()
    return np.asarray(image.convert("RGB"))


def resized_size(height: int, width: int, scale) -> Tuple[int, int]:
  """mmcv's keep-ratio rule, as in the input pipeline."""
  factor = min(max(scale) / max(height, width), min(scale) / min(height, width))
  return int(height * factor + 0.5), int(width * factor + 0.5)


def prepare(image: np.ndarray, data_config) -> Dict[str, np.ndarray]:
  """One image as a batch of one in the input contract (no ground truth)."""
  height, width = image.shape[:2]
  new_h, new_w = resized_size(height, width, data_config.scale)
  resized = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.BILINEAR), np.float32)
  normalized = (resized - np.asarray(data_config.mean, np.float32)) / np.asarray(data_config.std, np.float32)
  bucket = next((b for b in data_config.buckets if (b[1] >= b[0]) == (new_w >= new_h)), data_config.buckets[0])
  padded = np.zeros((1, bucket[0], bucket[1], 3), np.float32)
  padded[0, :new_h, :new_w] = normalized
  rows = data_config.max_instances
  return dict(image=padded, image_shape=np.array([[new_h, new_w]], np.int32),
              scale=np.array([[new_h / height, new_w / width]], np.float32),
              boxes=np.zeros((1, rows, 4), np.float32), labels=np.full((1, rows), -1, np.int32),
              is_crowd=np.zeros((1, rows), bool), valid=np.ones((1,), bool))


def draw(image: np.ndarray, detections: List[Dict], path) -> None:
  """Writes ``image`` with its detections (box, class name, score) as a PNG."""
  canvas = Image.fromarray(image)
  pen = ImageDraw.Draw(canvas)
  palette = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240)]
  for det in detections:
    color = palette[det["class"] % len(palette)]
    pen.rectangle(det["box"], outline=color, width=2)
    pen.text((det["box"][0] + 2, det["box"][1] + 1), f"{det['class_name']} {det['score']:.2f}", fill=color)
  canvas.save(path, format="PNG")


def predict_files(config, variables, paths, out_dir) -> Dict[str, List[Dict]]:
  """Detections of each readable image in ``paths``; writes the PNGs and ``detections.json``."""
  model = build_detector(config.model)
  info = pipeline.dataset_info(config.data)
  infer = jax.jit(lambda v, b: model.apply(v, b, train=False))
  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  results = {}
  for path in map(pathlib.Path, paths):
    try:
      image = read_rgb(path)
    except (OSError, UnidentifiedImageError, ValueError) as error:
      print(f"error: {path}: cannot read the image ({error}); skipped", file=sys.stderr)
      continue
    batch = prepare(image, config.data)
    output = jax.tree.map(np.asarray, infer(variables, batch))
    sy, sx = batch["scale"][0]
    height, width = image.shape[:2]
    detections = []
    for row in np.flatnonzero(output.valid[0]):
      x1, y1, x2, y2 = output.boxes[0, row] / np.array([sx, sy, sx, sy])
      box = [float(np.clip(x1, 0, width)), float(np.clip(y1, 0, height)), float(np.clip(x2, 0, width)),
             float(np.clip(y2, 0, height))]
      label = int(output.classes[0, row])
      detections.append({"box": box, "score": float(output.scores[0, row]), "class": label,
                         "class_name": info.class_names[label]})
    draw(image, detections, out_dir / f"{path.stem}.png")
    results[str(path)] = detections
  (out_dir / "detections.json").write_text(json.dumps(results, indent=1))
  return results


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", required=True)
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument("--workdir", help="a training work directory (its latest checkpoint)")
  source.add_argument("--checkpoint", help="a weights file (.pth, .safetensors, .npz)")
  parser.add_argument("--out", required=True, help="directory for the PNGs and detections.json")
  parser.add_argument("images", nargs="+")
  args = parser.parse_args(argv)
  config = load_config(args.config)
  model = build_detector(config.model)
  variables = loop.load_trained_variables(config, model, args.workdir, args.checkpoint)
  results = predict_files(config, variables, args.images, args.out)
  print(f"{sum(len(v) for v in results.values())} detections in {len(results)} images -> {args.out}")


if __name__ == "__main__":
  main()

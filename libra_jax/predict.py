"""Detect objects in image files and draw them.

``python -m libra_jax.predict --config=configs/<name>.py [--config.KEY=VALUE ...] (--workdir=DIR | --checkpoint=FILE)
--out=OUT [--eval_images=N] [IMAGE...]``

The config and its overrides are those the model was trained with (README: "One command line").

Each image is decoded, resized, normalized and padded to its bucket by the
input pipeline's own functions (``libra_jax.data.images``), so the model sees
the pixels evaluation gives it: 16-bit PNGs are scaled to 8 bits, grayscale,
palette, alpha and CMYK images become RGB, and no size limit other than
training's applies; images of one bucket go through the jit-compiled, data-parallel
detector ``config.eval_batch_size`` at a time (the evaluation's step, so with
``--workdir`` the compilation comes from the run's cache), and their
detections are mapped back to the image's own pixels. ``OUT/<stem>.png`` shows
them (class name and score) on the image at its own size (``<stem>-<8 hex
digits>.png`` when two inputs share a file name, e.g. ``a/x.png`` and
``b/x.png``);
``OUT/detections.json`` lists them per image as ``{"box": [x1, y1, x2, y2],
"score", "class", "class_name"}``, those scoring at least ``--min_score``
(0.3; the model keeps those above its test threshold, 0.05 for the COCO
configs). ``--eval_images=N`` adds the first N images
of the config's evaluation split. An unreadable or corrupt image gets a
one-line error naming the file and is skipped.
"""

import collections
import hashlib
import json
import pathlib
import sys
from typing import Dict, List, Sequence, Tuple

import jax
import numpy as np
import tensorflow_datasets as tfds
from PIL import Image, ImageDraw

from libra_jax import cli, runtime
from libra_jax.data import geometry, images, pipeline, sources
from libra_jax.data.tf_runtime import tf
from libra_jax.evaluation import driver
from libra_jax.evaluation.predict_step import make_predict_step
from libra_jax.models.detectors import build_detector


def decode_rgb(encoded: bytes) -> np.ndarray:
  """``[H, W, 3]`` uint8 RGB of an encoded image, decoded as the input pipeline decodes it (``images.decode``).

  Raises ``ValueError`` with the decoder's message on data it cannot decode.
  """
  try:
    return images.decode(tf.constant(encoded)).numpy()
  except tf.errors.OpError as error:
    raise ValueError(getattr(error, "message", str(error)).strip().splitlines()[0]) from None


def read_rgb(path) -> np.ndarray:
  """``decode_rgb`` of an image file."""
  return decode_rgb(pathlib.Path(path).read_bytes())


def prepare(image: np.ndarray, data_config) -> Dict[str, np.ndarray]:
  """One image as a batch of one in the input contract (no ground truth), by the pipeline's own transforms."""
  height, width = image.shape[:2]
  new_h, new_w = (int(n) for n in geometry.resized_size(height, width, data_config.scale))
  bucket = data_config.buckets[max(int(geometry.bucket_index(new_h, new_w, data_config.buckets)), 0)]
  padded = images.preprocess(tf.constant(image), new_h, new_w, tf.constant(False), bucket[0], bucket[1],
                             data_config.mean, data_config.std).numpy()[None]
  rows = data_config.max_instances
  return dict(image=padded, image_shape=np.array([[new_h, new_w]], np.int32),
              scale=np.array([[new_h / height, new_w / width]], np.float32),
              boxes=np.zeros((1, rows, 4), np.float32), labels=np.full((1, rows), -1, np.int32),
              is_crowd=np.zeros((1, rows), bool), valid=np.ones((1,), bool))


# Box and label colour of class ``c``: ``PALETTE[c % len(PALETTE)]``.
PALETTE = ((230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240))


def draw(image: np.ndarray, detections: List[Dict], path) -> None:
  """Writes ``image`` with its detections (box, class name, score) as a PNG."""
  canvas = Image.fromarray(image)
  pen = ImageDraw.Draw(canvas)
  for det in detections:
    color = PALETTE[det["class"] % len(PALETTE)]
    pen.rectangle(det["box"], outline=color, width=2)
    pen.text((det["box"][0] + 2, det["box"][1] + 1), f"{det['class_name']} {det['score']:.2f}", fill=color)
  canvas.save(path, format="PNG")


def detect(config, variables, images: Sequence[np.ndarray], class_names: Sequence[str]) -> List[List[Dict]]:
  """Detections of each ``[H, W, 3]`` uint8 image, in its own pixels (``predict_files``'s JSON entries)."""
  model = build_detector(config.model)
  mesh = runtime.make_mesh()
  step = make_predict_step(model, mesh)
  compilation = runtime.CompilationLog("detection step")
  batch_size = config.eval_batch_size
  prepared = [prepare(image, config.data) for image in images]
  by_bucket = collections.defaultdict(list)
  for index, batch in enumerate(prepared):
    by_bucket[batch["image"].shape[1:3]].append(index)
  found: List[List[Dict]] = [[] for _ in images]
  for indices in by_bucket.values():
    for first in range(0, len(indices), batch_size):
      chunk = indices[first:first + batch_size]
      batch = {key: np.concatenate([prepared[i][key] for i in chunk] +
                                   [np.zeros_like(prepared[chunk[0]][key])] * (batch_size - len(chunk)))
               for key in prepared[chunk[0]]}
      batch["labels"][len(chunk):] = -1
      with compilation.around(batch["image"]):
        output = step(variables, runtime.to_global(batch, mesh))
      output = jax.tree.map(np.asarray, output)
      for slot, index in enumerate(chunk):
        found[index] = _in_original_pixels(output, slot, batch["scale"][slot], images[index].shape[:2], class_names)
  return found


def _in_original_pixels(output, slot: int, scale, size, class_names) -> List[Dict]:
  """Slot ``slot``'s valid detections as JSON entries, boxes divided by ``scale`` and clipped to ``size`` (h, w)."""
  sy, sx = (float(v) for v in scale)
  height, width = size
  detections = []
  for row in np.flatnonzero(output.valid[slot]):
    x1, y1, x2, y2 = output.boxes[slot, row] / np.array([sx, sy, sx, sy])
    box = [float(np.clip(x1, 0, width)), float(np.clip(y1, 0, height)), float(np.clip(x2, 0, width)),
           float(np.clip(y2, 0, height))]
    label = int(output.classes[slot, row])
    detections.append({"box": box, "score": float(output.scores[slot, row]), "class": label,
                       "class_name": class_names[label]})
  return detections


def read_files(paths) -> List[Tuple[str, np.ndarray]]:
  """``(path, RGB image)`` of each readable file; a one-line error on stderr for each other one."""
  readable = []
  for path in map(pathlib.Path, paths):
    try:
      readable.append((str(path), read_rgb(path)))
    except (OSError, ValueError) as error:
      print(f"error: {path}: cannot read the image ({error}); skipped", file=sys.stderr)
  return readable


def drawing_names(names: Sequence[str]) -> List[str]:
  """The PNG file name of each input: its stem, or stem plus 8 hex digits of its whole name where stems collide."""
  stems = collections.Counter(pathlib.Path(name).stem for name in names)
  return [f"{pathlib.Path(name).stem}.png" if stems[pathlib.Path(name).stem] == 1 else
          f"{pathlib.Path(name).stem}-{hashlib.sha1(name.encode('utf-8')).hexdigest()[:8]}.png" for name in names]


def read_eval_images(data_config, count: int) -> List[Tuple[str, np.ndarray]]:
  """``(file name, RGB image)`` of the first ``count`` images of ``data_config.eval_split``."""
  builder = sources.prepared_builder(data_config)
  dataset = builder.as_dataset(split=data_config.eval_split, decoders={"image": tfds.decode.SkipDecoding()})
  named = []
  for example in tfds.as_numpy(dataset.take(count)):
    name = example["image/filename"].decode("utf-8", "replace")
    try:
      named.append((name, decode_rgb(example["image"])))
    except ValueError as error:
      print(f"error: {name}: cannot read the image ({error}); skipped", file=sys.stderr)
  return named


def predict_images(config, variables, named_images: Sequence[Tuple[str, np.ndarray]], out_dir,
                   min_score: float = 0.0) -> Dict[str, List[Dict]]:
  """Detects, draws ``out_dir/<stem>.png`` per image and writes ``out_dir/detections.json``; returns the JSON.

  Only detections scoring at least ``min_score`` are drawn and listed (the
  model itself keeps those above its test ``score_thr``).
  """
  info = pipeline.dataset_info(config.data)
  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  found = detect(config, variables, [image for _, image in named_images], info.class_names) if named_images else []
  results = {}
  drawings = drawing_names([name for name, _ in named_images])
  for (name, image), detections, drawing in zip(named_images, found, drawings):
    detections = [d for d in detections if d["score"] >= min_score]
    draw(image, detections, out_dir / drawing)
    results[name] = detections
  (out_dir / "detections.json").write_text(json.dumps(results, indent=1))
  return results


def predict_files(config, variables, paths, out_dir) -> Dict[str, List[Dict]]:
  """``predict_images`` of the readable files among ``paths``."""
  return predict_images(config, variables, read_files(paths), out_dir)


def main(argv) -> int:
  parser = cli.ArgumentParser(prog="python -m libra_jax.predict", description=__doc__.split("\n")[0])
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument("--workdir", help="a training work directory (its latest checkpoint)")
  source.add_argument("--checkpoint", help="a weights file (.pth, .safetensors, .npz)")
  parser.add_argument("--out", required=True, help="directory for the PNGs and detections.json")
  parser.add_argument("--eval_images", type=int, default=0, help="also the first N images of the evaluation split")
  parser.add_argument("--min_score", type=float, default=0.3,
                      help="draw and list detections scoring at least this (default 0.3; 0 keeps all)")
  parser.add_argument("images", nargs="*")
  args = parser.parse_args(argv)
  if not args.images and args.eval_images <= 0:
    parser.error("give image files, or --eval_images=N")
  if args.eval_images < 0:
    parser.error(f"--eval_images must be >= 0, got {args.eval_images}")
  config = args.config
  if args.workdir:
    cli.check_workdir(args.workdir, must_exist=True)
    runtime.enable_compilation_cache(config, args.workdir)
  model = build_detector(config.model)
  variables = jax.device_put(driver.load_trained_variables(config, model, args.workdir, args.checkpoint),
                             runtime.replicated(runtime.make_mesh()))
  named = read_files(args.images) + (read_eval_images(config.data, args.eval_images) if args.eval_images else [])
  results = predict_images(config, variables, named, args.out, args.min_score)
  print(f"{sum(len(v) for v in results.values())} detections in {len(results)} images -> {args.out}")
  return 0


if __name__ == "__main__":
  cli.run(main)

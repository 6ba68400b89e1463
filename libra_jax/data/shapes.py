"""``shapes``: a synthetic detection dataset, generated deterministically by a TFDS builder.

Ellipses, rectangles and triangles of varied sizes, aspect ratios and
colours on shaded, striped and noisy backgrounds, in landscape and portrait
images of 112-192 pixels a side, stored with the features of TFDS's
``coco/2017`` (JPEG image, normalized ``[ymin, xmin, ymax, xmax]`` boxes,
``label``, ``is_crowd``, ``area``, ids) so the same pipeline reads both.

Configs: ``shapes/easy`` (1-4 objects of 16-64 px, little overlap) and
``shapes/hard`` (3-10 objects of 8-32 px, more overlap, distractor strokes
and dots, stronger noise). Each has 2000 training and 200 validation images
and prepares in a few seconds.
"""

import dataclasses
import io
from typing import List, Tuple

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image, ImageDraw

from libra_jax.data import tf_runtime  # noqa: F401  (TensorFlow without accelerators)
from libra_jax.data.features import detection_features

CLASS_NAMES = ("ellipse", "rectangle", "triangle")
# Image sides, pixels: the long side and the short side are drawn independently.
LONG_SIDE = (144, 192)
SHORT_SIDE = (112, 160)
LANDSCAPE_FRACTION = 0.6
# Least RGB distance between an object's colour and the background's base colour.
MIN_CONTRAST = 90.0
PLACEMENT_TRIES = 30
JPEG_QUALITY = 95


@dataclasses.dataclass
class ShapesConfig(tfds.core.BuilderConfig):
  """One variant: object counts and sizes (pixels), overlap, clutter and noise, split sizes."""
  seed: int = 0
  num_objects: Tuple[int, int] = (1, 4)
  object_size: Tuple[int, int] = (16, 64)
  max_cover: float = 0.25  # most of any object's box another object's box may overlap
  clutter: int = 0  # distractor strokes and dots per image
  noise_std: float = 8.0
  train_images: int = 2000
  validation_images: int = 200


def _background(rng: np.random.Generator, height: int, width: int, noise_std: float):
  """A base colour (``[3]``) plus a linear shade, stripes and noise: ``[height, width, 3]`` float64 in 0..255.

  Returns the image and the base colour.
  """
  base = rng.uniform(0, 255, 3)
  y, x = np.mgrid[0:height, 0:width].astype(np.float64)
  shade = rng.uniform(-40, 40) * x / width + rng.uniform(-40, 40) * y / height
  angle, period = rng.uniform(0, np.pi), rng.uniform(8, 40)
  stripes = rng.uniform(0, 20) * np.sin(2 * np.pi * (x * np.cos(angle) + y * np.sin(angle)) / period)
  noise = rng.normal(0.0, noise_std, (height, width, 3))
  return np.clip(base + (shade + stripes)[..., None] + noise, 0, 255), base


def _contrasting_colour(rng: np.random.Generator, base: np.ndarray) -> Tuple[int, int, int]:
  for _ in range(PLACEMENT_TRIES):
    colour = rng.integers(0, 256, 3)
    if np.linalg.norm(colour - base) >= MIN_CONTRAST:
      return tuple(int(c) for c in colour)
  return tuple(int(c) for c in 255 - base)


def _covers_too_much(box: np.ndarray, others: List[np.ndarray], max_cover: float) -> bool:
  """Whether ``box`` and any of ``others`` (xyxy) overlap by more than ``max_cover`` of either's area."""
  for other in others:
    width = min(box[2], other[2]) - max(box[0], other[0])
    height = min(box[3], other[3]) - max(box[1], other[1])
    overlap = max(width, 0) * max(height, 0)
    smaller = min((box[2] - box[0]) * (box[3] - box[1]), (other[2] - other[0]) * (other[3] - other[1]))
    if overlap > max_cover * smaller:
      return True
  return False


def _draw_shape(draw: ImageDraw.ImageDraw, label: int, box: np.ndarray, colour, rng: np.random.Generator) -> float:
  """Draws class ``label`` filling ``box`` (xyxy pixels); returns its area in square pixels."""
  x0, y0, x1, y1 = (int(v) for v in box)
  width, height = x1 - x0, y1 - y0
  if label == 0:
    draw.ellipse([x0, y0, x1 - 1, y1 - 1], fill=colour)
    return np.pi / 4 * width * height
  if label == 1:
    draw.rectangle([x0, y0, x1 - 1, y1 - 1], fill=colour)
    return float(width * height)
  middle = x0 + (width - 1) / 2
  points = [(middle, y0), (x0, y1 - 1), (x1 - 1, y1 - 1)] if rng.random() < 0.5 else \
      [(x0, y0), (x1 - 1, y0), (middle, y1 - 1)]
  draw.polygon(points, fill=colour)
  return width * height / 2


def _draw_clutter(draw: ImageDraw.ImageDraw, rng: np.random.Generator, count: int, height: int, width: int):
  """Lines and dots that belong to no class."""
  for _ in range(count):
    colour = tuple(int(c) for c in rng.integers(0, 256, 3))
    if rng.random() < 0.5:
      points = [(float(rng.uniform(0, width)), float(rng.uniform(0, height))) for _ in range(2)]
      draw.line(points, fill=colour, width=int(rng.integers(1, 4)))
    else:
      x, y, radius = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(1, 3)
      draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=colour)


def render_example(rng: np.random.Generator, config: ShapesConfig):
  """One synthetic image with its objects.

  Returns:
    image: ``[H, W, 3]`` uint8 RGB.
    boxes: ``[N, 4]`` float32, xyxy in pixels.
    labels: ``[N]`` int64 in ``0..len(CLASS_NAMES)-1``.
    areas: ``[N]`` float64, the drawn shapes' areas in square pixels.
  """
  long_side, short_side = int(rng.integers(*LONG_SIDE, endpoint=True)), int(rng.integers(*SHORT_SIDE, endpoint=True))
  short_side = min(short_side, long_side)
  height, width = (short_side, long_side) if rng.random() < LANDSCAPE_FRACTION else (long_side, short_side)
  background, base = _background(rng, height, width, config.noise_std)
  image = Image.fromarray(background.astype(np.uint8))
  draw = ImageDraw.Draw(image)
  _draw_clutter(draw, rng, config.clutter, height, width)
  boxes, labels, areas = [], [], []
  for _ in range(int(rng.integers(*config.num_objects, endpoint=True))):
    size = rng.uniform(*config.object_size)
    aspect = np.sqrt(rng.uniform(0.75, 1.33))
    box_w, box_h = min(int(round(size * aspect)), width - 1), min(int(round(size / aspect)), height - 1)
    for _ in range(PLACEMENT_TRIES):
      x0, y0 = int(rng.integers(0, width - box_w + 1)), int(rng.integers(0, height - box_h + 1))
      box = np.array([x0, y0, x0 + box_w, y0 + box_h], np.float32)
      if not _covers_too_much(box, boxes, config.max_cover):
        label = int(rng.integers(0, len(CLASS_NAMES)))
        areas.append(_draw_shape(draw, label, box, _contrasting_colour(rng, base), rng))
        boxes.append(box)
        labels.append(label)
        break
  return (np.asarray(image), np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(labels, np.int64),
          np.asarray(areas, np.float64))


class Shapes(tfds.core.GeneratorBasedBuilder):
  """Synthetic shapes for detection, with the features of TFDS's ``coco/2017``."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}
  BUILDER_CONFIGS = [
      ShapesConfig(name="easy", description="1-4 objects of 16-64 px, little overlap.", seed=0),
      ShapesConfig(name="hard", description="3-10 objects of 8-32 px, overlaps, clutter and noise.", seed=1,
                   num_objects=(3, 10), object_size=(8, 32), max_cover=0.5, clutter=8, noise_std=16.0),
  ]

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=detection_features(tfds.features.ClassLabel(names=CLASS_NAMES)),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Generated: nothing to download.
    return {"train": self._generate_examples(0, self.builder_config.train_images),
            "validation": self._generate_examples(1, self.builder_config.validation_images)}

  def _generate_examples(self, split_seed: int, num_images: int):
    for index in range(num_images):
      rng = np.random.default_rng([self.builder_config.seed, split_seed, index])
      image, boxes, labels, areas = render_example(rng, self.builder_config)
      height, width = image.shape[:2]
      image_id = split_seed * 1_000_000 + index + 1
      buffer = io.BytesIO()
      Image.fromarray(image).save(buffer, format="JPEG", quality=JPEG_QUALITY)
      yield image_id, {
          "image": buffer.getvalue(),
          "image/filename": f"{image_id:07d}.jpg",
          "image/id": image_id,
          "objects": {
              "id": image_id * 100 + np.arange(len(labels)),
              "area": np.round(areas).astype(np.int64),
              "bbox": [tfds.features.BBox(ymin=y0 / height, xmin=x0 / width, ymax=y1 / height, xmax=x1 / width)
                       for x0, y0, x1, y1 in boxes.tolist()],
              "label": labels,
              "is_crowd": np.zeros(len(labels), bool),
          },
      }

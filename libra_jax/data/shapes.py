"""``shapes``: a synthetic detection dataset, generated deterministically by a TFDS builder.

Circles, squares and triangles of varied sizes and colours on noisy,
shaded backgrounds, in landscape and portrait images of 120-192 pixels per
side, with COCO's TFDS features (normalized ``[ymin, xmin, ymax, xmax]``
boxes, ``label``, ``is_crowd``, ``area``), so the same pipeline reads it and
``coco/2017``. Two configs: ``shapes/easy`` (1-4 objects of 16-64 px) and
``shapes/hard`` (3-10 objects of 8-40 px, overlaps and clutter strokes).
Preparing it takes seconds; ``dataset_info`` prepares it on first use.
"""

import dataclasses
import io

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image, ImageDraw

CLASS_NAMES = ("circle", "square", "triangle")


@dataclasses.dataclass
class ShapesConfig(tfds.core.BuilderConfig):
  """Object count and size ranges (pixels) of one variant."""
  num_objects: tuple = (1, 4)
  object_size: tuple = (16, 64)
  clutter_strokes: int = 0
  noise_std: float = 12.0
  train_images: int = 2000
  validation_images: int = 200


def _background(rng, height, width, noise_std):
  base = rng.integers(0, 256, 3).astype(np.float64)
  shade = np.linspace(0.0, rng.uniform(-50, 50), width)[None, :, None] + \
      np.linspace(0.0, rng.uniform(-50, 50), height)[:, None, None]
  noise = rng.normal(0.0, noise_std, (height, width, 3))
  return np.clip(base + shade + noise, 0, 255).astype(np.uint8)


def render_example(rng: np.random.Generator, config: ShapesConfig):
  """One image ``[H, W, 3]`` uint8 with its boxes ``[N, 4]`` (xyxy pixels) and labels ``[N]``."""
  long_side, short_side = int(rng.integers(160, 193)), int(rng.integers(120, 161))
  height, width = (short_side, long_side) if rng.random() < 0.6 else (long_side, short_side)
  image = Image.fromarray(_background(rng, height, width, config.noise_std))
  draw = ImageDraw.Draw(image)
  for _ in range(config.clutter_strokes):
    points = [tuple(int(v) for v in rng.integers(0, (width, height))) for _ in range(2)]
    draw.line(points, fill=tuple(int(c) for c in rng.integers(0, 256, 3)), width=int(rng.integers(1, 4)))
  boxes, labels = [], []
  for _ in range(int(rng.integers(config.num_objects[0], config.num_objects[1] + 1))):
    size = int(rng.integers(config.object_size[0], config.object_size[1] + 1))
    x0, y0 = int(rng.integers(0, width - size)), int(rng.integers(0, height - size))
    label = int(rng.integers(0, len(CLASS_NAMES)))
    color = tuple(int(c) for c in rng.integers(0, 256, 3))
    x1, y1 = x0 + size, y0 + size
    if label == 0:
      draw.ellipse([x0, y0, x1 - 1, y1 - 1], fill=color)
    elif label == 1:
      draw.rectangle([x0, y0, x1 - 1, y1 - 1], fill=color)
    else:
      draw.polygon([(x0 + size / 2, y0), (x0, y1 - 1), (x1 - 1, y1 - 1)], fill=color)
    boxes.append([x0, y0, x1, y1])
    labels.append(label)
  return np.asarray(image), np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(labels, np.int64)


class Shapes(tfds.core.GeneratorBasedBuilder):
  """Synthetic shapes detection dataset (COCO-style features)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}
  BUILDER_CONFIGS = [
      ShapesConfig(name="easy", description="1-4 objects of 16-64 px."),
      ShapesConfig(name="hard", description="3-10 objects of 8-40 px, overlaps and clutter.", num_objects=(3, 10),
                   object_size=(8, 40), clutter_strokes=6, noise_std=20.0),
  ]

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(encoding_format="png"),
            "image/filename": tfds.features.Text(),
            "image/id": np.int64,
            "objects": tfds.features.Sequence({
                "id": np.int64,
                "area": np.int64,
                "bbox": tfds.features.BBoxFeature(),
                "label": tfds.features.ClassLabel(names=CLASS_NAMES),
                "is_crowd": np.bool_,
            }),
        }),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    return {"train": self._generate_examples(0, self.builder_config.train_images),
            "validation": self._generate_examples(1, self.builder_config.validation_images)}

  def _generate_examples(self, split_seed: int, num_images: int):
    for index in range(num_images):
      rng = np.random.default_rng([split_seed, index, len(self.builder_config.name)])
      image, boxes, labels = render_example(rng, self.builder_config)
      height, width = image.shape[:2]
      image_id = split_seed * 1_000_000 + index + 1
      normalized = boxes[:, [1, 0, 3, 2]] / np.array([height, width, height, width], np.float32)
      buffer = io.BytesIO()
      Image.fromarray(image).save(buffer, format="PNG")
      yield image_id, {
          "image": buffer.getvalue(),
          "image/filename": f"{image_id:07d}.png",
          "image/id": image_id,
          "objects": {
              "id": image_id * 100 + np.arange(len(labels)),
              "area": ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).astype(np.int64),
              "bbox": [tfds.features.BBox(*map(float, np.clip(row, 0.0, 1.0))) for row in normalized],
              "label": labels,
              "is_crowd": np.zeros(len(labels), bool),
          },
      }

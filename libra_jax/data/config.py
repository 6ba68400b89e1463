"""``config.data``: which dataset, and how images and ground truth become static-shape batches."""

import ml_collections
from ml_collections import config_dict

from libra_jax.data import geometry
from libra_jax.errors import ConfigError

# COCO's reference preprocessing (LIBRA_SPEC.md section 1.1).
COCO_SCALE = (1333, 800)
# One bucket per orientation for the widest resized images, and one each for the 4:3 and 3:2 images that most of
# COCO's are: padding is about 5% of the pixels instead of 19% with the first pair alone, for six compilations of
# each step function instead of two (benchmarks/bucket_study.py; README "Buckets").
COCO_BUCKETS = ((800, 1344), (1344, 800), (800, 1216), (1216, 800), (800, 1088), (1088, 800))
MEAN_RGB = (123.675, 116.28, 103.53)
STD_RGB = (58.395, 57.12, 57.375)

# The synthetic shapes images (112-192 px a side) resize into at most 160 x 192 pixels.
SHAPES_SCALE = (192, 160)
SHAPES_BUCKETS = ((160, 192), (192, 160))


def default_data_config(dataset: str = "shapes") -> ml_collections.ConfigDict:
  """Defaults of ``config.data`` for ``dataset``; configs start from it and change what they need.

  Keys:
    dataset: "shapes", "shapes_hard", "coco/2017" (or any TFDS detection
      dataset with COCO's features), or "coco_folder".
    tfds_data_dir: where TFDS datasets live (None: TFDS's default,
      ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``).
    train_annotations, train_images, val_annotations, val_images: a COCO
      annotation JSON and its image directory per split (coco_folder only).
    train_split, eval_split: TFDS split names, or a slice of one
      ("validation[:500]").
    scale: (long_max, short_max) of the keep-ratio resize, pixels.
    buckets: padded (H, W) shapes, multiples of 32; each batch has one.
    max_instances: ground-truth rows per image; extra instances are dropped
      (crowd regions first) and counted.
    min_size: training skips images whose shorter side is below this, pixels.
    flip_prob: probability of a horizontal flip in training.
    mean, std: RGB normalization, in 0..255 pixel units.
  """
  config = ml_collections.ConfigDict()
  config.dataset = dataset
  config.tfds_data_dir = config_dict.placeholder(str)
  config.train_annotations = config_dict.placeholder(str)
  config.train_images = config_dict.placeholder(str)
  config.val_annotations = config_dict.placeholder(str)
  config.val_images = config_dict.placeholder(str)
  config.train_split = "train"
  config.eval_split = "validation"
  shapes = dataset.startswith("shapes")
  config.scale = SHAPES_SCALE if shapes else COCO_SCALE
  config.buckets = SHAPES_BUCKETS if shapes else COCO_BUCKETS
  config.max_instances = 16 if shapes else 100
  config.min_size = 32
  config.flip_prob = 0.5
  config.mean = MEAN_RGB
  config.std = STD_RGB
  return config


def check_data_config(data_config) -> None:
  """Raises ``ValueError`` naming the first key of ``config.data`` that cannot work."""
  geometry.check_buckets(data_config.scale, data_config.buckets)
  if data_config.max_instances < 1:
    raise ConfigError(f"data.max_instances must be at least 1, got {data_config.max_instances}")
  if not 0.0 <= data_config.flip_prob <= 1.0:
    raise ConfigError(f"data.flip_prob must be in [0, 1], got {data_config.flip_prob}")
  if data_config.min_size < 0:
    raise ConfigError(f"data.min_size must be >= 0, got {data_config.min_size}")
  if len(data_config.mean) != 3 or len(data_config.std) != 3 or min(data_config.std) <= 0:
    raise ConfigError(f"data.mean and data.std must be 3 RGB values with std > 0, got {data_config.mean} and "
                      f"{data_config.std}")

"""Input: TFDS sources (COCO, the synthetic ``shapes``) and the static-shape tf.data pipeline."""

import ml_collections


def default_data_config(dataset: str = "shapes") -> ml_collections.ConfigDict:
  """``config.data`` for ``dataset``: COCO's reference preprocessing, or sizes fitting the shapes images.

  Keys: ``dataset``, ``tfds_data_dir``, ``train_split``, ``eval_split``,
  ``scale`` (long, short) of the keep-ratio resize, ``buckets`` (padded
  (H, W) shapes, multiples of 32; one landscape, one portrait),
  ``max_instances``, ``flip_prob``, ``mean`` / ``std`` (RGB),
  ``shuffle_buffer``, ``cache`` (keep decoded examples in memory).
  """
  config = ml_collections.ConfigDict()
  config.dataset = dataset
  config.tfds_data_dir = ""
  config.train_split = "train"
  config.eval_split = "validation"
  config.max_instances = 100
  config.flip_prob = 0.5
  config.mean = (123.675, 116.28, 103.53)
  config.std = (58.395, 57.12, 57.375)
  if dataset.startswith("shapes"):
    config.scale = (192, 160)
    config.buckets = ((160, 192), (192, 160))
    config.shuffle_buffer = 2000
    config.cache = True
    config.max_instances = 16
  else:
    config.scale = (1333, 800)
    config.buckets = ((800, 1344), (1344, 800))
    config.shuffle_buffer = 1000
    config.cache = False
  return config

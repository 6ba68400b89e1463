"""tf.data input pipeline: TFDS detection datasets -> static-shape batches (DESIGN.md contract).

Train: decode; boxes to xyxy pixels with bad ones repaired or dropped
(counted); crowd boxes kept as ignore rows; images without a usable box
dropped (counted); random horizontal flip; keep-ratio resize; normalize; pad
to the image's aspect-ratio bucket; pad the gt to ``max_instances`` (extra
rows truncated, counted); batched per bucket. Eval: the same without flip or
dropping, every image once, the last batch of each bucket filled with
``valid=False`` examples.

Batch ``k`` of the train stream depends only on the seed and ``k`` (the order
is fixed per epoch by the seed), so ``start_batch`` resumes exactly.
"""

import logging
import os
from typing import Dict, Iterator, Optional

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from libra_jax.data import sources  # noqa: E402

tf.config.set_visible_devices([], "GPU")
for _kind in ("TPU",):
  try:
    tf.config.set_visible_devices([], _kind)
  except (RuntimeError, ValueError):
    pass

REPAIR_KEYS = ("boxes_nonfinite", "boxes_clipped", "boxes_empty", "instances_truncated", "images_without_gt")
dataset_info = sources.dataset_info

_log = logging.getLogger(__name__)


def _resized_size(height, width, scale):
  """mmcv's keep-ratio rescale: factor min(long / max(h, w), short / min(h, w)), sizes int(x * f + 0.5)."""
  long_edge, short_edge = float(max(scale)), float(min(scale))
  h, w = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
  factor = tf.minimum(long_edge / tf.maximum(h, w), short_edge / tf.minimum(h, w))
  return tf.cast(h * factor + 0.5, tf.int32), tf.cast(w * factor + 0.5, tf.int32)


def clean_boxes(example):
  """Normalized yxyx -> xyxy pixels of the original image; repairs and per-example counts."""
  image = example["image"]
  height, width = tf.shape(image)[0], tf.shape(image)[1]
  size = tf.cast(tf.stack([width, height, width, height]), tf.float32)
  boxes = tf.gather(tf.cast(example["objects"]["bbox"], tf.float32), [1, 0, 3, 2], axis=1) * size
  finite = tf.reduce_all(tf.math.is_finite(boxes), axis=1)
  boxes = tf.where(finite[:, None], boxes, 0.0)
  clipped = tf.clip_by_value(boxes, 0.0, size)
  was_clipped = tf.reduce_any(tf.not_equal(clipped, boxes), axis=1) & finite
  nonempty = (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])
  keep = finite & nonempty
  labels = tf.cast(example["objects"]["label"], tf.int32)
  crowd = tf.cast(example["objects"]["is_crowd"], tf.bool)
  counts = {
      "boxes_nonfinite": tf.reduce_sum(tf.cast(~finite, tf.int32)),
      "boxes_clipped": tf.reduce_sum(tf.cast(was_clipped, tf.int32)),
      "boxes_empty": tf.reduce_sum(tf.cast(finite & ~nonempty, tf.int32)),
  }
  return {
      "image": image, "image_id": example["image/id"],
      "boxes": tf.boolean_mask(clipped, keep), "labels": tf.boolean_mask(labels, keep),
      "is_crowd": tf.boolean_mask(crowd, keep), "counts": counts,
  }


def _flip(example, key):
  """Horizontal flip of image and boxes with probability given by ``key`` (a stateless draw)."""
  image, boxes = example["image"], example["boxes"]
  width = tf.cast(tf.shape(image)[1], tf.float32)
  flipped_boxes = tf.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], axis=1)
  return dict(example, image=tf.cond(key, lambda: image[:, ::-1], lambda: image),
              boxes=tf.cond(key, lambda: flipped_boxes, lambda: boxes))


def _bucket_index(height, width, buckets):
  """0 for landscape (w >= h) buckets, 1 for portrait, by the bucket shapes' own orientation."""
  landscape = [i for i, (h, w) in enumerate(buckets) if w >= h]
  portrait = [i for i, (h, w) in enumerate(buckets) if w < h] or landscape
  return tf.where(width >= height, landscape[0], portrait[0])


def _resize_pad(example, data_config):
  """Resize keeping the ratio, normalize, pad image and gt to static shapes."""
  image = example["image"]
  height, width = tf.shape(image)[0], tf.shape(image)[1]
  new_h, new_w = _resized_size(height, width, data_config.scale)
  resized = tf.image.resize(tf.cast(image, tf.float32), tf.stack([new_h, new_w]), method="bilinear",
                            antialias=False)
  sy = tf.cast(new_h, tf.float32) / tf.cast(height, tf.float32)
  sx = tf.cast(new_w, tf.float32) / tf.cast(width, tf.float32)
  normalized = (resized - tf.constant(data_config.mean, tf.float32)) / tf.constant(data_config.std, tf.float32)
  bucket = _bucket_index(new_h, new_w, data_config.buckets)
  max_h = max(h for h, _ in data_config.buckets)
  max_w = max(w for _, w in data_config.buckets)
  padded = tf.image.pad_to_bounding_box(normalized, 0, 0, max_h, max_w)
  rows = data_config.max_instances
  boxes = example["boxes"] * tf.stack([sx, sy, sx, sy])
  count = tf.shape(boxes)[0]
  kept = tf.minimum(count, rows)
  pad = rows - kept
  counts = dict(example["counts"], instances_truncated=count - kept)
  return {
      "image": padded, "bucket": bucket,
      "image_shape": tf.stack([new_h, new_w]), "scale": tf.stack([sy, sx]),
      "image_id": tf.cast(example["image_id"], tf.int64),
      "boxes": tf.pad(boxes[:rows], [[0, pad], [0, 0]]),
      "labels": tf.pad(example["labels"][:rows], [[0, pad]], constant_values=-1),
      "is_crowd": tf.pad(example["is_crowd"][:rows], [[0, pad]]),
      "valid": tf.constant(True), "counts": counts,
  }


def _crop_to_bucket(batch, buckets):
  """Cuts the padded images of a one-bucket batch down to that bucket's shape."""
  shapes = tf.constant(buckets, tf.int32)
  height, width = shapes[batch["bucket"][0], 0], shapes[batch["bucket"][0], 1]
  return dict(batch, image=batch["image"][:, :height, :width])


def _check_buckets(data_config):
  for h, w in data_config.buckets:
    if h % 32 or w % 32:
      raise ValueError(f"bucket {(h, w)} must have sides that are multiples of 32")
  long_edge, short_edge = max(data_config.scale), min(data_config.scale)
  landscape = [b for b in data_config.buckets if b[1] >= b[0]]
  portrait = [b for b in data_config.buckets if b[1] < b[0]] or landscape
  if not landscape or min(b[1] for b in landscape) < long_edge or min(b[0] for b in landscape) < short_edge:
    raise ValueError(f"landscape buckets {landscape} cannot hold images resized to scale {data_config.scale}")
  if min(b[0] for b in portrait) < long_edge or min(b[1] for b in portrait) < short_edge:
    if portrait is not landscape:
      raise ValueError(f"portrait buckets {portrait} cannot hold images resized to scale {data_config.scale}")


def _decoded(data_config, split: str, shard_index: int, num_shards: int) -> tf.data.Dataset:
  """This host's part of ``split`` (TFDS split slicing: each host reads only its records), in file order."""
  builder = sources.prepared_builder(data_config)
  return builder.as_dataset(split=sources.host_split(builder, split, shard_index, num_shards), shuffle_files=False,
                            read_config=sources.deterministic_read_config())


def _options() -> tf.data.Options:
  options = tf.data.Options()
  options.deterministic = True
  options.experimental_optimization.map_parallelization = True
  return options


class CountingIterator:
  """Numpy batches from a tf.data pipeline, adding up the repair counters the batches carry.

  ``stats`` maps each reason (``REPAIR_KEYS``) to its count so far; a line
  is logged whenever a count grows.
  """

  def __init__(self, dataset: tf.data.Dataset, description: str):
    self._iterator = iter(dataset.as_numpy_iterator())
    self.description = description
    self.stats = {key: 0 for key in REPAIR_KEYS}
    self.images = 0

  def __iter__(self):
    return self

  def __next__(self) -> Dict[str, np.ndarray]:
    batch = next(self._iterator)
    counts = batch.pop("counts")
    batch.pop("bucket")
    self.images += int(np.sum(batch["valid"]))
    for key in REPAIR_KEYS:
      new = self.stats[key] + int(np.sum(counts[key]))
      if new > self.stats[key]:
        _log.info("%s: %s: %d so far (in %d images)", self.description, key.replace("_", " "), new, self.images)
      self.stats[key] = new
    return batch


def _drop_counter(dataset: tf.data.Dataset) -> tf.data.Dataset:
  """Drops images with no usable gt, carrying the running count of drops in the kept ones."""

  def count(dropped, example):
    usable = tf.reduce_any(~example["is_crowd"])
    dropped_now = dropped + tf.cast(~usable, tf.int32)
    counts = dict(example["counts"], images_without_gt=tf.where(usable, dropped_now, 0))
    return tf.where(usable, 0, dropped_now), (dict(example, counts=counts), usable)

  return dataset.scan(tf.constant(0, tf.int32), count).filter(lambda example, usable: usable).map(
      lambda example, usable: example)


def train_batches(data_config, batch_size: int, seed: int, start_batch: int = 0, shard_index: int = 0,
                  num_shards: int = 1) -> CountingIterator:
  """Endless training batches of this host, from batch ``start_batch`` on.

  Args:
    data_config: ``config.data``.
    batch_size: images per batch on this host.
    seed: fixes the order of every epoch and every flip.
    start_batch: the first batch to yield (the input position of a resumed run).
    shard_index, num_shards: this host's part of the split.
  """
  _check_buckets(data_config)
  dataset = _decoded(data_config, data_config.train_split, shard_index, num_shards)
  dataset = dataset.map(clean_boxes, num_parallel_calls=tf.data.AUTOTUNE)
  dataset = _drop_counter(dataset)
  dataset = dataset.cache() if data_config.cache else dataset
  dataset = dataset.shuffle(data_config.shuffle_buffer, seed=seed, reshuffle_each_iteration=True).repeat()
  flip_seed = seed * 1_000_003 + shard_index
  dataset = dataset.enumerate().map(
      lambda index, example: _flip(example, tf.random.stateless_uniform(
          [], seed=tf.stack([tf.constant(flip_seed, tf.int64), index])) < data_config.flip_prob),
      num_parallel_calls=tf.data.AUTOTUNE)
  dataset = dataset.map(lambda example: _resize_pad(example, data_config), num_parallel_calls=tf.data.AUTOTUNE)
  dataset = dataset.group_by_window(key_func=lambda example: tf.cast(example["bucket"], tf.int64),
                                    reduce_func=lambda _, window: window.batch(batch_size, drop_remainder=True),
                                    window_size=batch_size)
  dataset = dataset.map(lambda batch: _crop_to_bucket(batch, data_config.buckets))
  dataset = dataset.skip(start_batch).prefetch(2).with_options(_options())
  return CountingIterator(dataset, f"{data_config.dataset} train")


def eval_batches(data_config, batch_size: int, shard_index: int = 0, num_shards: int = 1) -> CountingIterator:
  """Every image of this host's part of the eval split once, in batches of one bucket each.

  The last batch of each bucket is filled with ``valid=False`` copies of its
  last image.
  """
  _check_buckets(data_config)
  dataset = _decoded(data_config, data_config.eval_split, shard_index, num_shards)
  dataset = dataset.map(clean_boxes, num_parallel_calls=tf.data.AUTOTUNE)
  dataset = dataset.map(lambda example: dict(example, counts=dict(example["counts"], images_without_gt=0)))
  dataset = dataset.map(lambda example: _resize_pad(example, data_config), num_parallel_calls=tf.data.AUTOTUNE)

  dataset = dataset.group_by_window(key_func=lambda example: tf.cast(example["bucket"], tf.int64),
                                    reduce_func=lambda _, window: window.batch(batch_size),
                                    window_size=batch_size)
  dataset = dataset.map(lambda batch: _crop_to_bucket(_pad_batch(batch, batch_size), data_config.buckets))
  dataset = dataset.prefetch(2)
  return CountingIterator(dataset.with_options(_options()), f"{data_config.dataset} eval")


def _pad_batch(batch, batch_size: int):
  """Fills a short batch to ``batch_size`` with ``valid=False`` copies of its first example."""
  count = tf.shape(batch["valid"])[0]
  missing = batch_size - count

  def fill(value, key):
    first = tf.repeat(value[:1], missing, axis=0)
    if key == "valid":
      first = tf.zeros_like(first)
    return tf.concat([value, first], axis=0)

  return {key: (fill(value, key) if key != "counts" else value) for key, value in batch.items()}

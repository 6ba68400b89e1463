"""Tests of the input pipeline on the real shapes TFDS dataset (prepared once per session)."""

import itertools

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from libra_jax.data import default_data_config, pipeline, sources


@pytest.fixture(scope="session")
def shapes_config(tmp_path_factory):
  config = default_data_config("shapes")
  config.tfds_data_dir = str(tmp_path_factory.mktemp("tfds"))
  return config


def take(iterator, count):
  return list(itertools.islice(iterator, count))


def test_shapes_prepares_and_describes_itself(shapes_config):
  info = pipeline.dataset_info(shapes_config)
  assert info.num_classes == 3 and info.class_names == ["circle", "square", "triangle"]
  assert info.category_ids == [1, 2, 3] and info.num_examples == {"train": 2000, "validation": 200}


def test_train_batches_follow_the_batch_contract(shapes_config):
  batches = take(pipeline.train_batches(shapes_config, 4, seed=0), 6)
  buckets = set()
  for batch in batches:
    height, width = batch["image"].shape[1:3]
    buckets.add((height, width))
    assert (height, width) in shapes_config.buckets
    assert batch["image"].dtype == np.float32 and batch["image"].shape[0] == 4
    assert batch["image_shape"].dtype == np.int32 and batch["boxes"].shape == (4, 16, 4)
    assert batch["labels"].dtype == np.int32 and batch["is_crowd"].dtype == bool and batch["valid"].all()
    for i in range(4):
      h, w = batch["image_shape"][i]
      # Keep-ratio resize to (192, 160): the long side is 192 or the short side 160.
      assert max(h, w) == 192 or min(h, w) == 160
      assert (h <= height) and (w <= width) and not batch["image"][i, h:].any() and not batch["image"][i, :, w:].any()
      real = batch["labels"][i] >= 0
      assert real.any() and np.all(batch["labels"][i][real] < 3)
      assert np.all(batch["boxes"][i][~real] == 0) and np.all(batch["labels"][i][~real] == -1)
      boxes = batch["boxes"][i][real]
      assert np.all(boxes[:, 2:] > boxes[:, :2]) and np.all(boxes[:, 2] <= w + 1e-3) and np.all(boxes[:, 3] <= h + 1e-3)
  assert len(buckets) == 2


def original_examples(config, split):
  builder = tfds.builder("shapes/easy", data_dir=config.tfds_data_dir)
  return {int(ex["image/id"]): ex for ex in tfds.as_numpy(builder.as_dataset(split=split))}


def test_resize_and_box_scaling_by_hand(shapes_config):
  originals = original_examples(shapes_config, "validation")
  batch = next(pipeline.eval_batches(shapes_config, 4))
  for i in np.flatnonzero(batch["valid"]):
    example = originals[int(batch["image_id"][i])]
    h, w = example["image"].shape[:2]
    factor = min(192 / max(h, w), 160 / min(h, w))
    expected = (int(h * factor + 0.5), int(w * factor + 0.5))
    assert tuple(batch["image_shape"][i]) == expected
    np.testing.assert_allclose(batch["scale"][i], [expected[0] / h, expected[1] / w], rtol=1e-6)
    yxyx = example["objects"]["bbox"]
    boxes = np.stack([yxyx[:, 1] * w, yxyx[:, 0] * h, yxyx[:, 3] * w, yxyx[:, 2] * h], axis=1)
    boxes *= [expected[1] / w, expected[0] / h, expected[1] / w, expected[0] / h]
    np.testing.assert_allclose(batch["boxes"][i][:len(boxes)], boxes, rtol=1e-5, atol=1e-3)


def test_flip_mirrors_boxes_in_the_resized_image(shapes_config):
  never, always = shapes_config.copy_and_resolve_references(), shapes_config.copy_and_resolve_references()
  never.flip_prob, always.flip_prob = 0.0, 1.0
  plain = next(pipeline.train_batches(never, 4, seed=3))
  flipped = next(pipeline.train_batches(always, 4, seed=3))
  np.testing.assert_array_equal(plain["image_id"], flipped["image_id"])
  for i in range(4):
    width = plain["image_shape"][i][1]
    real = plain["labels"][i] >= 0
    b = plain["boxes"][i][real]
    np.testing.assert_allclose(flipped["boxes"][i][real], np.stack([width - b[:, 2], b[:, 1], width - b[:, 0], b[:, 3]], 1),
                               atol=1e-4)
    np.testing.assert_allclose(flipped["image"][i, :, :width], plain["image"][i, :, :width][:, ::-1], atol=1e-3)


def test_order_is_deterministic_and_resumes_exactly(shapes_config):
  first = take(pipeline.train_batches(shapes_config, 4, seed=7), 5)
  again = take(pipeline.train_batches(shapes_config, 4, seed=7), 5)
  resumed = take(pipeline.train_batches(shapes_config, 4, seed=7, start_batch=3), 2)
  other = next(pipeline.train_batches(shapes_config, 4, seed=8))
  for a, b in zip(first, again):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  for a, b in zip(first[3:], resumed):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  assert not np.array_equal(first[0]["image_id"], other["image_id"])


def eval_ids(config, batch_size, shard_index=0, num_shards=1):
  ids, padding = [], 0
  for batch in pipeline.eval_batches(config, batch_size, shard_index, num_shards):
    assert batch["image"].shape[0] == batch_size
    ids += batch["image_id"][batch["valid"]].tolist()
    padding += int((~batch["valid"]).sum())
  return ids, padding


def test_eval_sees_every_image_once_and_shards_partition_it(shapes_config):
  ids, padding = eval_ids(shapes_config, 8)
  assert len(ids) == 200 and len(set(ids)) == 200 and padding > 0
  first, _ = eval_ids(shapes_config, 8, 0, 2)
  second, _ = eval_ids(shapes_config, 8, 1, 2)
  assert not set(first) & set(second) and sorted(first + second) == sorted(ids)


def test_bad_boxes_are_repaired_or_dropped_and_counted():
  example = {
      "image": tf.zeros((10, 20, 3), tf.uint8), "image/id": tf.constant(5, tf.int64),
      "objects": {
          # yxyx normalized: fine; partly outside (x2 = 1.5); zero-area; NaN.
          "bbox": tf.constant([[0.1, 0.1, 0.5, 0.5], [0.2, 0.5, 0.8, 1.5], [0.3, 0.3, 0.3, 0.6],
                               [np.nan, 0.0, 0.5, 0.5]], tf.float32),
          "label": tf.constant([0, 1, 2, 0], tf.int64), "is_crowd": tf.constant([False, True, False, False]),
      },
  }
  cleaned = pipeline.clean_boxes(example)
  np.testing.assert_allclose(cleaned["boxes"], [[2, 1, 10, 5], [10, 2, 20, 8]], atol=1e-5)
  np.testing.assert_array_equal(cleaned["labels"], [0, 1])
  np.testing.assert_array_equal(cleaned["is_crowd"], [False, True])
  assert {k: int(v) for k, v in cleaned["counts"].items()} == {"boxes_nonfinite": 1, "boxes_clipped": 1,
                                                                "boxes_empty": 1}


def test_missing_datasets_say_how_to_prepare_them(tmp_path):
  config = default_data_config("coco/2017")
  config.tfds_data_dir = str(tmp_path)
  with pytest.raises(FileNotFoundError, match="tfds build coco/2017"):
    pipeline.dataset_info(config)
  config.dataset = "no_such_dataset"
  with pytest.raises(FileNotFoundError, match="unknown dataset"):
    pipeline.dataset_info(config)


def test_buckets_must_hold_the_resized_images(shapes_config):
  config = shapes_config.copy_and_resolve_references()
  config.buckets = ((160, 160), (192, 160))
  with pytest.raises(ValueError, match="landscape buckets"):
    next(pipeline.train_batches(config, 2, seed=0))
  config.buckets = ((160, 190), (192, 160))
  with pytest.raises(ValueError, match="multiples of 32"):
    next(pipeline.train_batches(config, 2, seed=0))


def test_coco_category_table():
  ids = [c for c, _ in sources.COCO_CATEGORIES]
  # The 80 official ids: 1..90 without the ten unused ones.
  assert ids == [i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]

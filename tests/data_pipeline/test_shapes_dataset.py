"""The synthetic shapes dataset: generation, preparation on first use, and the default pipeline on it."""

import numpy as np
import tensorflow_datasets as tfds

from data_support import as_hosts
from libra_jax.data import default_data_config, pipeline, shapes


def test_rendering_is_deterministic_and_boxes_fit_the_image():
  for config in shapes.Shapes.BUILDER_CONFIGS:
    for index in range(20):
      image, boxes, labels, areas = shapes.render_example(np.random.default_rng([config.seed, 0, index]), config)
      again = shapes.render_example(np.random.default_rng([config.seed, 0, index]), config)
      np.testing.assert_array_equal(image, again[0])
      np.testing.assert_array_equal(boxes, again[1])
      height, width = image.shape[:2]
      assert image.dtype == np.uint8 and image.shape[2] == 3
      assert min(height, width) >= shapes.SHORT_SIDE[0] and max(height, width) <= shapes.LONG_SIDE[1]
      assert 1 <= len(labels) <= config.num_objects[1] and len(boxes) == len(labels) == len(areas)
      assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= width).all() and (boxes[:, 3] <= height).all()
      sides = np.concatenate([boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]])
      # Sides are size * sqrt(aspect) with aspect in [0.75, 1.33]: within [0.86, 1.16] of the size range.
      assert sides.min() >= 0.86 * config.object_size[0] - 1 and sides.max() <= 1.16 * config.object_size[1] + 1
      assert set(labels) <= {0, 1, 2}


def test_shapes_prepares_on_first_use_and_feeds_the_default_pipeline(shapes_dir):
  # The session fixture's first pipeline call on an empty directory prepared it.
  assert tfds.builder("shapes/easy", data_dir=shapes_dir).is_prepared()
  data = default_data_config("shapes")
  data.tfds_data_dir = shapes_dir
  info = pipeline.dataset_info(data)
  assert info.class_names == list(shapes.CLASS_NAMES) and info.category_ids == [1, 2, 3]
  assert info.num_examples == {"train": 2000, "validation": 200}
  batches = pipeline.train_batches(data, batch_size=8, seed=0)
  assert batches.stats == {"dropped": {}, "repaired": {}, "truncated": 0} and batches.num_images == 2000
  for _ in range(3):
    batch = next(batches)
    assert batch["image"].shape[1:3] in ((160, 192), (192, 160))
    assert (batch["image_shape"].max(1) == 192).any() or (batch["image_shape"].min(1) == 160).any()
    assert ((batch["labels"] >= 0).sum(1) >= 1).all()
    # A batch of padding slots in the same bucket has every key, dtype and shape of a real one (what a fresh
    # process compiles the steps for, libra_jax.training.precompile).
    padding = pipeline.padding_batch(data, 8, *batch["image"].shape[1:3])
    assert {k: (v.dtype, v.shape) for k, v in padding.items()} == {k: (v.dtype, v.shape) for k, v in batch.items()}
    assert not padding["valid"].any() and (padding["labels"] == -1).all()


def test_two_hosts_partition_the_training_images_and_step_together(shapes_dir):
  data = default_data_config("shapes")
  data.tfds_data_dir = shapes_dir
  streams = as_hosts(2, lambda i, all_hosts: pipeline.train_batches(data, 8, seed=0, shard_index=i, num_shards=2,
                                                                    all_hosts=all_hosts))
  # Each host read the metadata of its own 1000 images only, and the two halves make the split.
  tables = [set(s.table.image_id.tolist()) for s in streams]
  assert [s.num_images for s in streams] == [len(t) for t in tables] == [1000, 1000]
  assert not tables[0] & tables[1] and tables[0] | tables[1] == set(range(1, 2001))
  for _ in range(4):
    step = [next(s) for s in streams]
    assert step[0]["image"].shape == step[1]["image"].shape
    for host, batch in enumerate(step):
      assert set(batch["image_id"].tolist()) <= tables[host]


def test_the_devices_not_the_processes_fix_each_global_batch(shapes_dir):
  """1 host with 2 data shards (2 devices) and 2 hosts with one each yield the same global batches."""
  data = default_data_config("shapes")
  data.tfds_data_dir = shapes_dir
  alone = pipeline.train_batches(data, 8, seed=3, start_batch=5, shards_per_host=2)
  pair = as_hosts(2, lambda i, all_hosts: pipeline.train_batches(data, 4, seed=3, start_batch=5, shard_index=i,
                                                                 num_shards=2, all_hosts=all_hosts))
  for _ in range(3):
    whole, parts = next(alone), [next(s) for s in pair]
    for key in ("image_id", "image", "boxes", "labels"):
      np.testing.assert_array_equal(whole[key], np.concatenate([p[key] for p in parts]))


def test_shapes_evaluation_sees_every_image_once(shapes_dir):
  data = default_data_config("shapes")
  data.tfds_data_dir = shapes_dir
  ids = np.concatenate([b["image_id"][b["valid"]] for b in pipeline.eval_batches(data, 16)])
  assert sorted(ids) == list(range(1_000_001, 1_000_201))

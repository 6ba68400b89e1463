"""Evaluation batches: every image once, padding slots marked invalid, shards agreeing on shapes."""

import numpy as np
import pytest

from data_support import as_hosts
from libra_jax.data import pipeline

VAL_IDS = [501, 502, 503, 504, 505]


def test_every_image_comes_once_unflipped_with_padding_marked(folder_config):
  batches = pipeline.eval_batches(folder_config(flip_prob=1.0), batch_size=2)
  collected = list(batches)
  # Landscape: 501, 503, 504, 505 -> 2 batches; portrait: 502 and one padding slot.
  assert batches.num_batches == len(collected) == 3
  ids = np.concatenate([b["image_id"][b["valid"]] for b in collected])
  assert sorted(ids) == VAL_IDS
  last = collected[-1]
  assert last["image"].shape == (2, 128, 96, 3)
  np.testing.assert_array_equal(last["valid"], [True, False])
  assert last["image_id"][1] == -1 and (last["labels"][1] == -1).all() and not last["boxes"][1].any()
  assert not last["image"][1].any()  # nothing decoded for a padding slot
  for batch in collected:
    slot = np.flatnonzero(batch["image_id"] == 501)
    if len(slot):
      # v1: person [10, 10, 30, 20] -> [10, 10, 40, 30], unflipped, then its crowd region.
      np.testing.assert_allclose(batch["boxes"][slot[0], 0], [10 * 107 / 80, 10 * 4 / 3, 40 * 107 / 80, 30 * 4 / 3],
                                 rtol=1e-5)
      np.testing.assert_array_equal(batch["is_crowd"][slot[0], :2], [False, True])
      np.testing.assert_allclose(batch["scale"][slot[0]], [4 / 3, 107 / 80], rtol=1e-6)


def test_images_without_boxes_are_kept(folder_config):
  ids = np.concatenate([b["image_id"][b["valid"]] for b in pipeline.eval_batches(folder_config(), 2)])
  assert 503 in ids


@pytest.mark.parametrize("num_shards", [2, 3])
def test_shards_partition_the_images_and_agree_on_shapes(folder_config, num_shards):
  shards = as_hosts(num_shards, lambda i, all_hosts: list(pipeline.eval_batches(
      folder_config(), 2, shard_index=i, num_shards=num_shards, all_hosts=all_hosts)))
  assert len({len(s) for s in shards}) == 1
  for step in zip(*shards):
    assert len({b["image"].shape for b in step}) == 1
  ids = np.concatenate([b["image_id"][b["valid"]] for s in shards for b in s])
  assert sorted(ids) == VAL_IDS


def test_a_slice_of_the_split_can_be_evaluated(folder_config):
  batches = list(pipeline.eval_batches(folder_config(eval_split="validation[:3]"), 2))
  ids = np.concatenate([b["image_id"][b["valid"]] for b in batches])
  assert len(ids) == len(set(ids)) == 3 and set(ids) <= set(VAL_IDS)
  again = np.concatenate([b["image_id"][b["valid"]] for b in pipeline.eval_batches(folder_config(), 2)])
  rest = np.concatenate([b["image_id"][b["valid"]]
                         for b in pipeline.eval_batches(folder_config(eval_split="validation[3:]"), 2)])
  assert sorted(np.concatenate([ids, rest])) == sorted(again)

"""Training batches from the mini COCO folder: contract, resize and flip by hand, determinism, resume, counters."""

import logging
import time

import numpy as np
import pytest

import mini_coco
from data_support import TEST_BUCKETS, TEST_MAX_INSTANCES
from libra_jax.data import pipeline

# An 80 x 60 image resizes to 107 x 80: sx = 107 / 80 = 1.3375, sy = 80 / 60 = 4/3 (conftest.TEST_SCALE).
SX, SY = 107 / 80, 80 / 60
# Image 101: person [10, 20, 30, 15] -> xyxy [10, 20, 40, 35]; crowd dog [40, 5, 20, 20] -> [40, 5, 60, 25].
A_PERSON = [10 * SX, 20 * SY, 40 * SX, 35 * SY]  # [13.375, 26.667, 53.5, 46.667]
A_CROWD = [40 * SX, 5 * SY, 60 * SX, 25 * SY]  # [53.5, 6.667, 80.25, 33.333]
# Mirrored in the 107-pixel-wide resized image: x1' = 107 - x2, x2' = 107 - x1.
A_PERSON_FLIPPED = [107 - 40 * SX, 20 * SY, 107 - 10 * SX, 35 * SY]  # [53.5, 26.667, 93.625, 46.667]
A_CROWD_FLIPPED = [107 - 60 * SX, 5 * SY, 107 - 40 * SX, 25 * SY]  # [26.75, 6.667, 53.5, 33.333]
# Image 101 is solid RGB (200, 100, 50); normalized with the spec's mean and std.
A_PIXEL = [(200 - 123.675) / 58.395, (100 - 116.28) / 57.12, (50 - 103.53) / 57.375]
USABLE_IDS = {101, 102, 103, 104, 107, 108, 110, 111, 112, 113, 114}


def _batches(iterator, count):
  return [next(iterator) for _ in range(count)]


def _find(iterator, image_id, limit=40):
  for _ in range(limit):
    batch = next(iterator)
    slots = np.flatnonzero(batch["image_id"] == image_id)
    if len(slots):
      return batch, slots[0]
  raise AssertionError(f"image {image_id} not in {limit} batches")


def test_batches_follow_the_contract(folder_config):
  batches = _batches(pipeline.train_batches(folder_config(), batch_size=3, seed=0), 8)
  for batch in batches:
    size, height, width = batch["image"].shape[:3]
    assert (height, width) in TEST_BUCKETS and size == 3
    expected = {"image": (np.float32, (3, height, width, 3)), "image_shape": (np.int32, (3, 2)),
                "scale": (np.float32, (3, 2)), "image_id": (np.int64, (3,)),
                "boxes": (np.float32, (3, TEST_MAX_INSTANCES, 4)), "labels": (np.int32, (3, TEST_MAX_INSTANCES)),
                "is_crowd": (np.bool_, (3, TEST_MAX_INSTANCES)), "valid": (np.bool_, (3,))}
    assert {k: (v.dtype.type, v.shape) for k, v in batch.items()} == expected
    assert batch["valid"].all() and set(batch["image_id"]) <= USABLE_IDS
    assert np.isfinite(batch["image"]).all()
    for slot in range(3):
      h, w = batch["image_shape"][slot]
      assert not batch["image"][slot, h:].any() and not batch["image"][slot, :, w:].any()
      padding = batch["labels"][slot] < 0
      assert not batch["boxes"][slot][padding].any() and not batch["is_crowd"][slot][padding].any()
      boxes = batch["boxes"][slot][~padding]
      assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
      assert (boxes >= 0).all() and (boxes[:, [0, 2]] <= w).all() and (boxes[:, [1, 3]] <= h).all()
      assert (batch["labels"][slot][~padding] < 3).all()


@pytest.mark.parametrize("flip_prob, person, crowd", [(0.0, A_PERSON, A_CROWD),
                                                      (1.0, A_PERSON_FLIPPED, A_CROWD_FLIPPED)])
def test_resize_and_flip_move_boxes_as_computed_by_hand(folder_config, flip_prob, person, crowd):
  batch, slot = _find(pipeline.train_batches(folder_config(flip_prob=flip_prob), 2, seed=0), 101)
  np.testing.assert_array_equal(batch["image_shape"][slot], [80, 107])
  np.testing.assert_allclose(batch["scale"][slot], [SY, SX], rtol=1e-6)
  np.testing.assert_allclose(batch["boxes"][slot, :2], [person, crowd], rtol=1e-5)
  np.testing.assert_array_equal(batch["labels"][slot], [0, 1, -1, -1])
  np.testing.assert_array_equal(batch["is_crowd"][slot], [False, True, False, False])
  image = batch["image"][slot]
  np.testing.assert_allclose(image[:80, :107], np.broadcast_to(A_PIXEL, (80, 107, 3)), atol=1e-5)
  assert image.shape == (96, 128, 3) and not image[80:].any() and not image[:, 107:].any()


def test_flipped_images_mirror_the_unflipped_ones(folder_config):
  plain, slot = _find(pipeline.train_batches(folder_config(flip_prob=0.0), 2, seed=0), 114)
  mirrored, other = _find(pipeline.train_batches(folder_config(flip_prob=1.0), 2, seed=0), 114)
  np.testing.assert_allclose(mirrored["image"][other, :80, :107], plain["image"][slot, :80, 106::-1], atol=1e-5)


def test_a_portrait_image_fills_the_portrait_bucket(folder_config):
  batch, slot = _find(pipeline.train_batches(folder_config(flip_prob=0.0), 2, seed=0), 102)
  # 60 x 80 -> factor 4/3: 80 x 107 (w x h); box [5, 10, 20, 30] -> xyxy [5, 10, 25, 40].
  assert batch["image"].shape[1:3] == (128, 96)
  np.testing.assert_array_equal(batch["image_shape"][slot], [107, 80])
  np.testing.assert_allclose(batch["boxes"][slot, 0], [5 * 4 / 3, 10 * 107 / 80, 25 * 4 / 3, 40 * 107 / 80],
                             rtol=1e-5)
  assert batch["labels"][slot, 0] == mini_coco.FOLDER_LABEL[90]


def test_extra_instances_are_truncated_and_crowd_only_images_kept(folder_config):
  batch, slot = _find(pipeline.train_batches(folder_config(flip_prob=0.0), 2, seed=0), 114)
  # Boxes [5i, 5i, 10, 10] for i < 6; the first four stay.
  expected = [[5 * i * SX, 5 * i * SY, (5 * i + 10) * SX, (5 * i + 10) * SY] for i in range(4)]
  np.testing.assert_allclose(batch["boxes"][slot], expected, rtol=1e-5)
  batch, slot = _find(pipeline.train_batches(folder_config(flip_prob=0.0), 2, seed=0), 113)
  np.testing.assert_array_equal(batch["is_crowd"][slot], [True, False, False, False])
  np.testing.assert_allclose(batch["boxes"][slot, 0], [0, 0, 40 * SX, 30 * SY], rtol=1e-5)


def test_the_same_seed_gives_the_same_batches(folder_config):
  first = _batches(pipeline.train_batches(folder_config(), 2, seed=3), 12)
  again = _batches(pipeline.train_batches(folder_config(), 2, seed=3), 12)
  other = _batches(pipeline.train_batches(folder_config(), 2, seed=4), 12)
  for a, b in zip(first, again):
    assert all(np.array_equal(a[key], b[key]) for key in a)
  assert any(not np.array_equal(a["image_id"], b["image_id"]) for a, b in zip(first, other))


def test_every_usable_image_comes_in_one_pass(folder_config):
  ids = np.concatenate([b["image_id"] for b in _batches(pipeline.train_batches(folder_config(), 2, seed=0), 12)])
  assert set(ids) == USABLE_IDS


@pytest.mark.parametrize("start", [1, 5, 9])
def test_resuming_yields_exactly_the_rest_of_the_stream(folder_config, start):
  full = _batches(pipeline.train_batches(folder_config(), 2, seed=1), start + 6)
  resumed = _batches(pipeline.train_batches(folder_config(), 2, seed=1, start_batch=start), 6)
  for a, b in zip(full[start:], resumed):
    assert all(np.array_equal(a[key], b[key]) for key in a)


def test_resuming_far_ahead_reads_no_skipped_image(folder_config):
  # Ten million batches could not be decoded in this time; the plan jumps there directly.
  began = time.perf_counter()
  batch = next(pipeline.train_batches(folder_config(), 2, seed=1, start_batch=10_000_000))
  assert time.perf_counter() - began < 30
  assert set(batch["image_id"]) <= USABLE_IDS


def test_every_repair_and_drop_is_counted_and_logged(folder_config, caplog):
  with caplog.at_level(logging.INFO, logger="libra_jax.data"):
    batches = pipeline.train_batches(folder_config(), 2, seed=0)
  assert batches.stats == {
      "dropped": {"image_path_escapes": 1, "image_unreadable": 1, "box_unknown_category": 1, "box_nonfinite": 1,
                  "image_undecodable": 1, "box_too_small": 1, "image_no_gt": 1, "image_too_small": 1},
      "repaired": {"box_clipped": 1, "image_grayscale": 1, "image_alpha": 1, "image_cmyk": 1},
      "truncated": 2}
  assert batches.num_images == len(USABLE_IDS)
  text = caplog.text
  for line in ["../escape.jpg: file name escapes the image directory; skipped, 1 of 16 images",
               "o_garbage.jpg: not a readable image file",
               "i_unknown_category.jpg: unknown category id (category id 99); dropped, 1 of",
               "j_nan.jpg: non-finite box coordinates",
               "h_outside.jpg: box partly outside the image; clipped to the image, 1 of",
               "e_truncated.jpg: cannot decode (",
               "skipped, 1 of 14 images",
               "c_gray.jpg: grayscale image; converted to RGB, 1 of 14 images",
               "d_rgba.png: image with an alpha channel; converted to RGB (alpha dropped)",
               "k_cmyk.jpg: CMYK image; converted to RGB",
               "g_zero_area.jpg: box narrower or shorter than 1 pixel; dropped, 1 of",
               "f_empty.jpg: no usable box; skipped in training, 1 of 14 images",
               "n_tiny.jpg: shorter side below data.min_size; skipped in training",
               "m_many.jpg: more instances than data.max_instances; extra instances dropped (crowd first), 2 of"]:
    assert line in text, line

"""TFDS's real coco/2017 builder, prepared offline from COCO-named zips of the mini dataset, through the pipeline."""

import numpy as np

import mini_coco
from data_support import small_config
from libra_jax.data import pipeline, sources

# What TFDS's builder can take of the mini dataset (no escaping name, unknown category, NaN or outside box).
TRAIN_IDS = {c.image_id for c in mini_coco.TRAIN if c.tfds_ok}
USABLE_IDS = {101, 102, 103, 104, 107, 112, 113, 114}


def test_the_table_holds_cocos_80_official_ids():
  ids = [category_id for category_id, _ in sources.COCO_CATEGORIES]
  # 1..90 without the ten ids COCO never uses.
  assert ids == [i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]


def test_labels_map_back_to_coco_category_ids(coco2017_dir):
  info = pipeline.dataset_info(small_config("coco/2017", tfds_data_dir=coco2017_dir))
  assert info.num_classes == 80
  assert info.num_examples == {"train": len(TRAIN_IDS), "validation": 5, "test": 1}
  for category_id, label in mini_coco.COCO_LABEL.items():
    assert info.category_ids[label] == category_id
  assert info.class_names[16] == "dog"


def test_training_batches_carry_coco_labels_and_counts(coco2017_dir):
  batches = pipeline.train_batches(small_config("coco/2017", tfds_data_dir=coco2017_dir, flip_prob=0.0), 2, seed=0)
  assert batches.stats == {
      "dropped": {"image_undecodable": 2, "box_too_small": 1, "image_no_gt": 1, "image_too_small": 1},
      "repaired": {"image_grayscale": 1, "image_alpha": 1, "image_cmyk": 1}, "truncated": 2}
  seen = {}
  for _ in range(10):
    batch = next(batches)
    for slot, image_id in enumerate(batch["image_id"]):
      seen[int(image_id)] = (batch["labels"][slot], batch["boxes"][slot])
  assert set(seen) == USABLE_IDS
  labels, boxes = seen[101]
  np.testing.assert_array_equal(labels, [mini_coco.COCO_LABEL[1], mini_coco.COCO_LABEL[18], -1, -1])
  # person [10, 20, 30, 15] in an 80 x 60 image resized to 107 x 80.
  np.testing.assert_allclose(boxes[0], [10 * 107 / 80, 20 * 4 / 3, 40 * 107 / 80, 35 * 4 / 3], rtol=1e-5)
  assert seen[102][0][0] == mini_coco.COCO_LABEL[90]


def test_evaluation_covers_the_validation_split(coco2017_dir):
  batches = list(pipeline.eval_batches(small_config("coco/2017", tfds_data_dir=coco2017_dir), 4))
  ids = np.concatenate([b["image_id"][b["valid"]] for b in batches])
  assert sorted(ids) == [501, 502, 503, 504, 505]

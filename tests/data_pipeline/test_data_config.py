"""config.data defaults and the resize / bucket geometry, against hand-computed numbers."""

import numpy as np
import pytest
from ml_collections import config_dict

from libra_jax.data import config, default_data_config, geometry


def test_coco_defaults_follow_the_spec():
  data = default_data_config("coco/2017")
  assert data.dataset == "coco/2017"
  assert tuple(data.scale) == (1333, 800)
  assert tuple(map(tuple, data.buckets)) == ((800, 1344), (1344, 800), (800, 1216), (1216, 800), (800, 1088),
                                             (1088, 800))
  assert tuple(data.mean) == (123.675, 116.28, 103.53)
  assert tuple(data.std) == (58.395, 57.12, 57.375)
  assert (data.max_instances, data.flip_prob, data.min_size) == (100, 0.5, 32)
  assert (data.train_split, data.eval_split) == ("train", "validation")
  assert data.tfds_data_dir is None and data.train_annotations is None
  config.check_data_config(data)


def test_shapes_is_the_default_and_its_buckets_hold_its_scale():
  data = default_data_config()
  assert data.dataset == "shapes"
  assert tuple(map(tuple, data.buckets)) == ((160, 192), (192, 160))
  config.check_data_config(data)


def test_paths_can_be_set_like_the_command_line_does():
  data = default_data_config("coco_folder")
  data.tfds_data_dir = "/data/tfds"
  data.val_images = "/data/val2017"
  assert isinstance(data.get_ref("train_images"), config_dict.FieldReference)
  assert (data.tfds_data_dir, data.val_images) == ("/data/tfds", "/data/val2017")


@pytest.mark.parametrize("height, width, expected", [
    # 640 x 480: factor min(1333 / 640, 800 / 480) = 5/3; 640 * 5/3 = 1066.67 -> 1067, 480 * 5/3 = 800.
    (480, 640, (800, 1067)),
    (640, 480, (1067, 800)),
    # 500 x 375: factor min(2.666, 2.1333) = 2.1333; 500 * 2.1333 = 1066.67 -> 1067, 375 * 2.1333 = 800.
    (375, 500, (800, 1067)),
    # 1000 x 200: factor min(1.333, 4) = 1.333; 200 * 1.333 = 266.6 -> 267.
    (200, 1000, (267, 1333)),
    # 1333 x 800 already fits exactly.
    (800, 1333, (800, 1333)),
])
def test_resize_follows_mmcv_rounding(height, width, expected):
  assert tuple(int(v) for v in geometry.resized_size(height, width, (1333, 800))) == expected


def test_resize_keeps_an_empty_image_empty():
  assert tuple(int(v) for v in geometry.resized_size(0, 0, (1333, 800))) == (0, 0)


def test_images_go_to_the_bucket_of_their_orientation():
  buckets = ((800, 1344), (1344, 800))
  np.testing.assert_array_equal(geometry.bucket_index([800, 1067, 800], [1067, 800, 800], buckets), [0, 1, 0])
  assert geometry.bucket_index(900, 1400, buckets) == -1


@pytest.mark.parametrize("scale, buckets, message", [
    ((1333, 800), ((800, 1344), (1344, 810)), "multiples of 32"),
    ((1333, 800), ((800, 1312), (1344, 800)), "landscape"),
    ((1333, 800), ((800, 1344),), "portrait"),
    ((1333, 800), (), "empty"),
])
def test_buckets_that_cannot_hold_the_scale_are_refused(scale, buckets, message):
  with pytest.raises(ValueError, match=message):
    geometry.check_buckets(scale, buckets)


def test_one_square_bucket_may_hold_both_orientations():
  geometry.check_buckets((1333, 800), ((1344, 1344),))


@pytest.mark.parametrize("key, value", [("max_instances", 0), ("flip_prob", 1.5), ("std", (1.0, 0.0, 1.0)),
                                        ("min_size", -1)])
def test_bad_values_are_refused_by_name(key, value):
  data = default_data_config("coco/2017")
  data[key] = value
  with pytest.raises(ValueError, match=key):
    config.check_data_config(data)


def test_dataset_names_map_to_tfds_names():
  from libra_jax.data import sources
  names = {name: sources.tfds_name(default_data_config(name)) for name in ("shapes", "shapes_hard", "coco/2017")}
  assert names == {"shapes": "shapes/easy", "shapes_hard": "shapes/hard", "coco/2017": "coco/2017"}

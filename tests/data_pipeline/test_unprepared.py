"""What a user sees when the dataset is not there: errors that say how to get it."""

import re

import pytest

from data_support import small_config
from libra_jax.data import pipeline
from libra_jax.errors import DataError


def test_unprepared_coco_says_how_to_prepare_it(tmp_path):
  with pytest.raises(FileNotFoundError) as error:
    pipeline.train_batches(small_config("coco/2017", tfds_data_dir=str(tmp_path)), 2, seed=0)
  message = str(error.value)
  assert "tfds build coco/2017" in message and "--manual_dir" in message and "train2017.zip" in message
  assert "tfds_data_dir" in message


def test_coco_folder_names_the_missing_paths(tmp_path, folder):
  data = small_config("coco_folder", tfds_data_dir=str(tmp_path), train_annotations=folder.train_annotations,
                      train_images=folder.train_images, val_annotations=str(tmp_path / "missing.json"))
  with pytest.raises(FileNotFoundError) as error:
    pipeline.dataset_info(data)
  assert "data.val_annotations" in str(error.value) and "data.val_images=None" in str(error.value)
  assert "train_annotations" not in str(error.value)


def test_unknown_dataset_lists_the_choices(tmp_path):
  with pytest.raises(FileNotFoundError, match="shapes, shapes_hard, coco_folder"):
    pipeline.dataset_info(small_config("no_such_dataset", tfds_data_dir=str(tmp_path)))


def test_a_missing_split_is_named(folder_config):
  with pytest.raises(ValueError, match="no split 'test'"):
    pipeline.eval_batches(folder_config(eval_split="test"), 2)


def test_bad_shard_arguments_are_refused(folder_config):
  with pytest.raises(ValueError, match="shard_index"):
    pipeline.train_batches(folder_config(), 2, seed=0, shard_index=2, num_shards=2)


@pytest.mark.parametrize("text, message", [
    ('{"images": [', "is not valid JSON"),
    ("[]", "a COCO annotation file is a JSON object with images, annotations and categories; this one's root is a list"),
    ('{"images": [], "annotations": [], "categories": [{"id": 1}]}', "lists no images"),
])
def test_an_annotation_file_that_is_not_coco_is_named(tmp_path, folder, text, message):
  (tmp_path / "bad.json").write_text(text)
  data = small_config("coco_folder", tfds_data_dir=str(tmp_path / "tfds"), train_annotations=str(tmp_path / "bad.json"),
                      train_images=folder.train_images, val_annotations=folder.val_annotations,
                      val_images=folder.val_images)
  with pytest.raises(DataError, match=f"bad.json.*{re.escape(message)}|bad.json {re.escape(message)}"):
    pipeline.dataset_info(data)

"""The coco_folder builder on the mini COCO-format folder: classes, ids, and what preparing it repaired or dropped."""

import os
import pathlib

import mini_coco
from libra_jax.data import coco_folder, pipeline, sources


def test_categories_map_to_contiguous_labels_in_order_of_id(folder_config):
  info = pipeline.dataset_info(folder_config())
  assert info.num_classes == 3
  assert info.class_names == ["person", "dog", "toothbrush"]
  assert info.category_ids == [1, 18, 90]
  # 16 entries listed; the escaping name and the garbage file are not stored.
  assert info.num_examples == {"train": 14, "validation": 5}


def test_preparing_counts_every_bad_entry(folder_config):
  builder = sources.prepared_builder(folder_config())
  report = builder.info.metadata["reports"]["train"]
  assert report["counts"] == {"image_path_escapes": 1, "image_unreadable": 1, "box_unknown_category": 1,
                              "box_nonfinite": 1, "box_clipped": 1}
  assert report["names"]["image_path_escapes"] == ["../escape.jpg"]
  assert report["names"]["box_clipped"] == ["h_outside.jpg"]
  assert report["totals"]["images"] == len(mini_coco.TRAIN)
  assert builder.info.metadata["reports"]["validation"]["counts"] == {}


def test_the_same_paths_reuse_the_prepared_dataset(folder_config):
  first = sources.prepared_builder(folder_config())
  again = sources.prepared_builder(folder_config(max_instances=7))
  assert first.data_dir == again.data_dir


def test_a_changed_added_or_removed_image_file_prepares_the_folder_again(folder_config):
  name = lambda: coco_folder.folder_config(folder_config()).name
  original = name()
  image_dir = pathlib.Path(folder_config().train_images)
  image = sorted(p for p in image_dir.rglob("*") if p.is_file())[0]
  status = image.stat()
  try:
    os.utime(image, ns=(status.st_atime_ns, status.st_mtime_ns + 1_000_000_000))
    assert name() != original
  finally:
    os.utime(image, ns=(status.st_atime_ns, status.st_mtime_ns))
  assert name() == original
  added = image_dir / "added_later.jpg"
  added.write_bytes(image.read_bytes())
  try:
    assert name() != original
  finally:
    added.unlink()
  assert name() == original

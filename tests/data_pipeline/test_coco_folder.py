"""The coco_folder builder on the mini COCO-format folder: classes, ids, and what preparing it repaired or dropped."""

import mini_coco
from libra_jax.data import pipeline, sources


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

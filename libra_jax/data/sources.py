"""Where examples come from: TFDS builders by name, prepared on demand or with instructions."""

import dataclasses
from typing import Dict, List, Tuple

import tensorflow_datasets as tfds

from libra_jax.data import shapes  # noqa: F401  (registers the ``shapes`` builder)

# Our dataset names -> TFDS names. Any other TFDS detection dataset with COCO's features can be named directly.
ALIASES = {"shapes": "shapes/easy", "shapes_hard": "shapes/hard"}
# Datasets generated locally in seconds: prepared on first use.
GENERATED = ("shapes/easy", "shapes/hard")

# The 80 COCO categories in the order of TFDS's coco/2017 labels 0..79, with their official ids.
COCO_CATEGORIES: Tuple[Tuple[int, str], ...] = (
    (1, "person"), (2, "bicycle"), (3, "car"), (4, "motorcycle"), (5, "airplane"), (6, "bus"), (7, "train"),
    (8, "truck"), (9, "boat"), (10, "traffic light"), (11, "fire hydrant"), (13, "stop sign"),
    (14, "parking meter"), (15, "bench"), (16, "bird"), (17, "cat"), (18, "dog"), (19, "horse"), (20, "sheep"),
    (21, "cow"), (22, "elephant"), (23, "bear"), (24, "zebra"), (25, "giraffe"), (27, "backpack"),
    (28, "umbrella"), (31, "handbag"), (32, "tie"), (33, "suitcase"), (34, "frisbee"), (35, "skis"),
    (36, "snowboard"), (37, "sports ball"), (38, "kite"), (39, "baseball bat"), (40, "baseball glove"),
    (41, "skateboard"), (42, "surfboard"), (43, "tennis racket"), (44, "bottle"), (46, "wine glass"), (47, "cup"),
    (48, "fork"), (49, "knife"), (50, "spoon"), (51, "bowl"), (52, "banana"), (53, "apple"), (54, "sandwich"),
    (55, "orange"), (56, "broccoli"), (57, "carrot"), (58, "hot dog"), (59, "pizza"), (60, "donut"), (61, "cake"),
    (62, "chair"), (63, "couch"), (64, "potted plant"), (65, "bed"), (67, "dining table"), (70, "toilet"),
    (72, "tv"), (73, "laptop"), (74, "mouse"), (75, "remote"), (76, "keyboard"), (77, "cell phone"),
    (78, "microwave"), (79, "oven"), (80, "toaster"), (81, "sink"), (82, "refrigerator"), (84, "book"),
    (85, "clock"), (86, "vase"), (87, "scissors"), (88, "teddy bear"), (89, "hair drier"), (90, "toothbrush"))


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What evaluation and configs need to know about a dataset."""
  name: str
  num_classes: int
  class_names: List[str]
  category_ids: List[int]   # the dataset's own category id of each contiguous label
  num_examples: Dict[str, int]


def tfds_name(data_config) -> str:
  return ALIASES.get(data_config.dataset, data_config.dataset)


def prepared_builder(data_config) -> tfds.core.DatasetBuilder:
  """The TFDS builder of ``config.data``; generated datasets are prepared on first use."""
  name = tfds_name(data_config)
  if name == "coco_folder":
    raise NotImplementedError("the coco_folder source is not available yet; convert the folder to a TFDS "
                              "dataset with COCO's features, or use coco/2017")
  try:
    builder = tfds.builder(name, data_dir=data_config.tfds_data_dir or None)
  except tfds.core.registered.DatasetNotFoundError as error:
    raise FileNotFoundError(f"unknown dataset {data_config.dataset!r}: use shapes, shapes_hard or a TFDS "
                            f"detection dataset such as coco/2017") from error
  if not builder.is_prepared():
    if name in GENERATED:
      builder.download_and_prepare()
    else:
      raise FileNotFoundError(
          f"dataset {name} is not prepared in {builder.data_dir}: run `tfds build {name} "
          f"--data_dir={data_config.tfds_data_dir or '~/tensorflow_datasets'}` (for coco/2017 without "
          f"downloading, put COCO's zips in --manual_dir), or pass --config.data.tfds_data_dir=DIR where it is")
  return builder


def host_split(builder, split: str, shard_index: int, num_shards: int) -> str:
  """This host's slice of ``split`` (TFDS slicing such as ``validation[:64]`` allowed); a clear error for a
  split the dataset lacks."""
  if split.split("[")[0] not in builder.info.splits:
    raise FileNotFoundError(f"dataset {builder.name} has no split {split!r}; it has {sorted(builder.info.splits)}")
  if num_shards == 1:
    return split
  return tfds.even_splits(split, n=num_shards, drop_remainder=False)[shard_index]


def deterministic_read_config() -> tfds.ReadConfig:
  return tfds.ReadConfig(shuffle_seed=0, interleave_cycle_length=1, try_autocache=False)


def dataset_info(data_config) -> DatasetInfo:
  """Class names, category ids and split sizes of ``config.data``'s dataset (preparing ``shapes`` if needed)."""
  builder = prepared_builder(data_config)
  label = builder.info.features["objects"]["label"]
  if builder.name == "coco":
    category_ids, class_names = [c for c, _ in COCO_CATEGORIES], [n for _, n in COCO_CATEGORIES]
  else:
    category_ids, class_names = list(range(1, label.num_classes + 1)), list(label.names)
  return DatasetInfo(name=tfds_name(data_config), num_classes=label.num_classes, class_names=class_names,
                     category_ids=category_ids,
                     num_examples={name: split.num_examples for name, split in builder.info.splits.items()})

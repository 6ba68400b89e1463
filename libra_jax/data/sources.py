"""Which TFDS builder ``config.data`` names, prepared: generated and local datasets on first use, others by hand.

``shapes`` / ``shapes_hard`` (this package's generator) and ``coco_folder``
(a COCO-format folder) are prepared automatically, in seconds for shapes;
``coco/2017`` and other TFDS datasets must be prepared by the user, and the
error says how.
"""

import dataclasses
from typing import Dict, List, Tuple

import tensorflow_datasets as tfds

from libra_jax.data import coco_folder, shapes  # noqa: F401  (registers the builders)
from libra_jax.errors import DataError

ALIASES = {"shapes": "shapes/easy", "shapes_hard": "shapes/hard"}

# The 80 COCO categories in the order of TFDS's coco labels 0..79, with their official ids.
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
  """What configs and evaluation need to know about a dataset.

  Attributes:
    name: the TFDS name, e.g. "coco/2017".
    num_classes: object classes (labels ``0..num_classes-1``).
    class_names: name of each label.
    category_ids: the dataset's own category id of each label (COCO's
      non-contiguous ids for COCO), for evaluation results.
    num_examples: images per split.
  """
  name: str
  num_classes: int
  class_names: List[str]
  category_ids: List[int]
  num_examples: Dict[str, int]


def tfds_name(data_config) -> str:
  return ALIASES.get(data_config.dataset, data_config.dataset)


def prepared_builder(data_config) -> tfds.core.DatasetBuilder:
  """The prepared TFDS builder of ``config.data``; ``FileNotFoundError`` saying how to prepare it if it is not."""
  name = tfds_name(data_config)
  data_dir = data_config.tfds_data_dir
  if name == "coco_folder":
    builder = coco_folder.CocoFolder(config=coco_folder.folder_config(data_config), data_dir=data_dir)
    if not builder.is_prepared():
      builder.download_and_prepare()
    return builder
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as error:
    raise FileNotFoundError(f"unknown dataset {data_config.dataset!r}: use shapes, shapes_hard, coco_folder or a "
                            f"TFDS detection dataset such as coco/2017") from error
  if builder.is_prepared():
    return builder
  if name in ALIASES.values():
    builder.download_and_prepare()
    return builder
  where = data_dir or "~/tensorflow_datasets"
  raise FileNotFoundError(
      f"dataset {name} is not prepared in {builder.data_dir}. Prepare it with `tfds build {name} "
      f"--data_dir={where}` (downloads it), or put its files in a folder and run `tfds build {name} "
      f"--data_dir={where} --manual_dir=FOLDER` (for coco/2017: train2017.zip, val2017.zip, test2017.zip, "
      f"annotations_trainval2017.zip and image_info_test2017.zip from cocodataset.org), or point "
      f"--config.data.tfds_data_dir at the directory where it is prepared")


def category_table(builder: tfds.core.DatasetBuilder) -> Tuple[List[int], List[str]]:
  """Category id and name of each label of ``builder``'s dataset."""
  names = list(builder.info.features["objects"]["label"].names)
  if builder.name == "coco":
    official = [name for _, name in COCO_CATEGORIES]
    if names != official:
      raise DataError(f"{builder.info.full_name} has labels {names[:5]}... but COCO's 80 categories are "
                      f"{official[:5]}...; prepare it from COCO's own annotation files")
    return [category_id for category_id, _ in COCO_CATEGORIES], names
  if builder.name == "coco_folder":
    return list(builder.info.metadata["category_ids"]), names
  return list(range(1, len(names) + 1)), names


def dataset_info(data_config) -> DatasetInfo:
  """Classes, category ids and split sizes of ``config.data``'s dataset (preparing it where automatic)."""
  builder = prepared_builder(data_config)
  category_ids, class_names = category_table(builder)
  return DatasetInfo(name=builder.info.full_name.rsplit("/", 1)[0], num_classes=len(class_names),
                     class_names=class_names, category_ids=category_ids,
                     num_examples={name: split.num_examples for name, split in builder.info.splits.items()})

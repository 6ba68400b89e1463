"""The light metadata of a prepared dataset: one pass that reads each image's header and keeps its size and boxes.

Everything the batch plan and the targets need — image ids, file names,
image sizes, boxes in pixels, labels, crowd flags, where each record lies —
comes from this pass, so training decodes only the images it uses, in any
order. Sizes come from the image headers (``image_header``), without decoding
a pixel. The pass also finds what the images and boxes need: unreadable,
unsupported or cut-off image files (skipped), grayscale / alpha / CMYK /
palette images (converted to RGB by the decoder), boxes smaller than one
pixel (dropped, as mmdetection's ``CocoDataset`` does); each is counted in the
table's ``report``. An image whose damage only decoding shows stops the
pipeline when it is decoded, with ``decode_problem`` naming it.

Tables are kept per (dataset directory, split, slice) for the life of the
process, so evaluating every epoch reads the split once, and on disk next to
the dataset (``metadata_cache``), so that a restart, or another process of the
same run, reads the stored table instead of the split.
"""

import dataclasses
import logging
import re
from typing import Dict, List, Optional, Tuple

import numpy as np
import tensorflow_datasets as tfds
import tqdm

from libra_jax.data import image_header, images, metadata_cache, records
from libra_jax.data.report import Report
from libra_jax.data.tf_runtime import tf
from libra_jax.errors import DataError

# Boxes narrower or shorter than this (pixels) are dropped. The tolerance
# absorbs the float32 rounding of TFDS's normalized coordinates.
MIN_BOX_SIDE = 1.0
SIDE_TOLERANCE = 1e-3

# PIL modes that the decoder converts to RGB, by the reason they are counted under.
CONVERTED_MODES = {
    "image_grayscale": ("1", "L", "I", "I;16", "I;16B", "I;16L", "F"),
    "image_alpha": ("RGBA", "RGBa", "LA", "La", "PA"),
    "image_cmyk": ("CMYK",),
    "image_palette": ("P",),
}
_REASON_OF_MODE = {mode: reason for reason, modes in CONVERTED_MODES.items() for mode in modes}

REQUIRED_FEATURES = (("image",), ("image/id",), ("image/filename",), ("objects", "bbox"), ("objects", "label"),
                     ("objects", "is_crowd"))


@dataclasses.dataclass
class ImageTable:
  """Metadata of examples ``start..stop-1`` of a split; row ``i`` is example ``start + i``.

  Attributes:
    records: where each example's record lies.
    image_id: ``[N]`` int64, the dataset's image id.
    filename: ``[N]`` object array of str.
    height, width: ``[N]`` int32, the image's size in pixels, from its header
      (0 where undecodable).
    decodable: ``[N]`` bool: the record parses and the image's header passes
      ``image_header``'s checks (damage only decoding shows is found later).
    boxes: ``[M, 4]`` float32, xyxy in pixels of the original image; each
      image's rows are ``row_splits[i]:row_splits[i + 1]``, non-crowd first.
    labels: ``[M]`` int32, contiguous class index.
    is_crowd: ``[M]`` bool.
    area: ``[M]`` float32, the annotation's area in square pixels of the
      original image (COCO's segmentation area; the box's area where the
      dataset has no ``objects/area``). COCOeval sizes objects by it.
    row_splits: ``[N + 1]`` int64.
    report: what the images and boxes needed.
  """
  records: records.RecordIndex
  image_id: np.ndarray
  filename: np.ndarray
  height: np.ndarray
  width: np.ndarray
  decodable: np.ndarray
  boxes: np.ndarray
  labels: np.ndarray
  is_crowd: np.ndarray
  area: np.ndarray
  row_splits: np.ndarray
  report: Report

  def __len__(self) -> int:
    return len(self.image_id)

  def num_instances(self) -> np.ndarray:
    """``[N]`` int64: boxes per image, crowd regions included."""
    return np.diff(self.row_splits)


_TABLES: Dict[Tuple[str, str, int, int], ImageTable] = {}


def load(builder: tfds.core.DatasetBuilder, split: str, start: int, stop: int) -> ImageTable:
  """The ``ImageTable`` of examples ``start..stop-1`` of ``split``: kept in memory, stored on disk, else computed."""
  key = (str(builder.data_dir), split, start, stop)
  if key not in _TABLES:
    _check_features(builder)
    instructions = records.split_files(builder, split, start, stop)
    digest = metadata_cache.fingerprint(instructions, split, start, stop,
                                        rules=dict(min_box_side=MIN_BOX_SIDE, side_tolerance=SIDE_TOLERANCE,
                                                   sizes_from="image headers"))
    stored = metadata_cache.path(str(builder.data_dir), split, start, stop, digest)
    table = metadata_cache.read(stored, ImageTable, [i.filename for i in instructions])
    if table is None:
      table = _scan(builder, split, start, stop, instructions)
      problem = metadata_cache.write(stored, table)
      if problem:
        logging.warning("the metadata of %s cannot be stored in %s (%s): it is read again at every start",
                        table.report.source, builder.data_dir, problem)
    _TABLES[key] = table
  return _TABLES[key]


def _check_features(builder: tfds.core.DatasetBuilder) -> None:
  missing = []
  for path in REQUIRED_FEATURES:
    try:
      feature = builder.info.features
      for name in path:
        feature = feature[name]
    except KeyError:
      missing.append("/".join(path))
  if missing:
    raise DataError(f"{builder.info.full_name} lacks the features {missing} of TFDS's coco/2017 (image, image/id, "
                    f"image/filename, objects with bbox, label, is_crowd); the pipeline reads detection datasets "
                    f"with those features")


def decoder_message(error: Exception) -> str:
  """TensorFlow's error message without its op and function decorations."""
  message = getattr(error, "message", str(error))
  message = re.sub(r"\{\{[^}]*\}\}\s*", "", message)
  return re.sub(r"\s*\[Op:\w+\].*", "", message).strip().splitlines()[0] if message.strip() else type(error).__name__


def decode_problem(builder: tfds.core.DatasetBuilder, index: records.RecordIndex,
                   row: int) -> Tuple[str, Optional[str]]:
  """The file name of the example at ``row``, and why its record does not parse or its image does not decode.

  The reason is None where both work. This decodes the image, so it runs only
  for records the metadata pass could not parse and for the images of a
  batch that failed to decode.
  """
  with tf.io.gfile.GFile(index.files[index.file[row]], "rb") as stream:
    stream.seek(int(index.offset[row]))
    serialized = stream.read(int(index.length[row]))
  try:
    example = builder.info.features.deserialize_example_np(serialized,
                                                           decoders={"image": tfds.decode.SkipDecoding()})
  except Exception as error:  # noqa: BLE001  (any parse failure is reported, never raised)
    return f"record {row}", f"cannot parse the record: {error}"
  name = example["image/filename"]
  name = name.decode("utf-8", "replace") if isinstance(name, bytes) else str(name)
  try:
    images.decode(tf.constant(example["image"]))
  except tf.errors.OpError as error:
    return name, decoder_message(error)
  return name, None


def _pixel_boxes(example: dict, report: Report, name: str) -> Tuple[np.ndarray, ...]:
  """An example's boxes in pixels ``[n, 4]`` float32 xyxy, labels ``[n]`` int32, crowd flags ``[n]`` bool, areas.

  Boxes under one pixel a side are dropped (and counted); non-crowd boxes
  come first. ``area`` ``[n]`` float32 is the example's ``objects/area`` where
  it is positive, the box's area otherwise.
  """
  ymin, xmin, ymax, xmax = np.asarray(example["bbox"], np.float64).reshape(-1, 4).T
  height, width = example["height"], example["width"]
  boxes = np.stack([xmin * width, ymin * height, xmax * width, ymax * height], axis=1)
  big_enough = ((boxes[:, 2] - boxes[:, 0] >= MIN_BOX_SIDE - SIDE_TOLERANCE) &
                (boxes[:, 3] - boxes[:, 1] >= MIN_BOX_SIDE - SIDE_TOLERANCE))
  report.add("box_too_small", name, int(np.sum(~big_enough)))
  box_area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
  area = np.asarray(example["area"], np.float64)
  area = np.where(area > 0, area, box_area)[big_enough]
  crowd = np.asarray(example["is_crowd"], bool)[big_enough]
  order = np.argsort(crowd, kind="stable")
  return (boxes[big_enough][order].astype(np.float32), np.asarray(example["label"], np.int32)[big_enough][order],
          crowd[order], area[order].astype(np.float32))


_NO_BOXES = (np.zeros((0, 4), np.float32), np.zeros(0, np.int32), np.zeros(0, bool), np.zeros(0, np.float32))


def _scan(builder: tfds.core.DatasetBuilder, split: str, start: int, stop: int, instructions) -> ImageTable:
  """The table of examples ``start..stop-1`` of ``split``, read from the records of ``instructions``."""
  positions: List[Tuple[int, int, int]] = []

  def serialized_examples():
    for file, offset, length, data in records.scan(instructions):
      positions.append((file, offset, length))
      yield len(positions) - 1, data

  features = builder.info.features
  has_area = "area" in features["objects"].feature

  def light(row, serialized):
    example = features.deserialize_example(serialized, decoders={"image": tfds.decode.SkipDecoding()})
    objects = example["objects"]
    return {"row": row, "image_id": example["image/id"], "filename": example["image/filename"],
            "encoded": example["image"], "bbox": objects["bbox"],
            "label": objects["label"], "is_crowd": objects["is_crowd"],
            "area": objects["area"] if has_area else tf.zeros_like(objects["label"], tf.int64)}

  dataset = tf.data.Dataset.from_generator(
      serialized_examples, output_signature=(tf.TensorSpec([], tf.int64), tf.TensorSpec([], tf.string)))
  dataset = dataset.map(light, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  dataset = dataset.ignore_errors().prefetch(tf.data.AUTOTUNE)

  count = stop - start
  dataset_name = builder.info.full_name.rsplit("/", 1)[0]
  whole = start == 0 and stop == builder.info.splits[split].num_examples
  source = f"{dataset_name} {split}" + ("" if whole else f"[{start}:{stop}]")
  report = Report(source, images=count)
  image_id = np.full(count, -1, np.int64)
  filename = np.empty(count, object)
  height, width = np.zeros(count, np.int32), np.zeros(count, np.int32)
  decodable, parsed = np.zeros(count, bool), np.zeros(count, bool)
  per_image: List[Tuple[np.ndarray, ...]] = [None] * count
  boxes_seen = 0
  progress = tqdm.tqdm(dataset.as_numpy_iterator(), total=count, desc=f"reading {source}", unit=" images",
                       disable=None, leave=False)
  for example in progress:
    row = int(example["row"])
    name = example["filename"].decode("utf-8", "replace")
    image_id[row], filename[row], parsed[row] = example["image_id"], name, True
    try:
      header = image_header.read(example["encoded"])
    except image_header.HeaderError as error:
      report.add("image_undecodable", name, detail=str(error))
      per_image[row] = _NO_BOXES
      continue
    decodable[row], height[row], width[row] = True, header.height, header.width
    reason = _REASON_OF_MODE.get(header.mode)
    if reason:
      report.add(reason, name)
    boxes_seen += len(example["label"])
    per_image[row] = _pixel_boxes(dict(example, height=header.height, width=header.width), report, name)
  report.totals["boxes"] = boxes_seen
  if len(positions) != count:
    raise DataError(f"{source}: the record files hold {len(positions)} of the {count} examples their split info "
                    f"lists; prepare the dataset again")
  index = records.make_index(instructions, positions)
  for row in np.flatnonzero(~parsed):
    filename[row], detail = decode_problem(builder, index, row)
    report.add("image_undecodable", filename[row], detail=detail or "failed inside tf.data")
    per_image[row] = _NO_BOXES
  sizes = [len(part[1]) for part in per_image]
  return ImageTable(
      records=index, image_id=image_id, filename=filename, height=height, width=width, decodable=decodable,
      boxes=np.concatenate([p[0] for p in per_image] or [np.zeros((0, 4), np.float32)]).reshape(-1, 4),
      labels=np.concatenate([p[1] for p in per_image] or [np.zeros(0, np.int32)]),
      is_crowd=np.concatenate([p[2] for p in per_image] or [np.zeros(0, bool)]),
      area=np.concatenate([p[3] for p in per_image] or [np.zeros(0, np.float32)]),
      row_splits=np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)]), report=report)

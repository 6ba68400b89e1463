"""``coco_folder``: a TFDS builder for any COCO-format annotation file and image directory, without download.

Point ``config.data`` at ``instances_*.json`` files and their image
directories (``train_annotations``, ``train_images``, ``val_annotations``,
``val_images``); the first use prepares a TFDS dataset with the features of
TFDS's ``coco/2017``, named after the annotation files and a fingerprint of
them and of every file under the image directories (name, size, modification
time): a changed, added or removed file gives a new name, so the folder is
prepared again. Category ids map to contiguous labels in
order of id; ``info.metadata["category_ids"]`` keeps the ids and the label
names are the category names.

What the annotations need is counted and logged (``report.REASONS``) and kept
in ``info.metadata["reports"]``: image entries whose file is missing,
unreadable or outside the image directory are skipped; boxes with an unknown
category, a malformed or non-finite bbox or a negative size are dropped; boxes
partly outside the image are clipped. Images keep their file bytes; the
pipeline decodes and checks them.
"""

import collections
import dataclasses
import hashlib
import json
import math
import os
import re
from typing import Dict, List, Tuple

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from libra_jax.data import tf_runtime  # noqa: F401  (TensorFlow without accelerators)
from libra_jax.data.features import detection_features
from libra_jax.data.report import Report
from libra_jax.errors import DataError

PATH_KEYS = ("train_annotations", "train_images", "val_annotations", "val_images")


@dataclasses.dataclass
class CocoFolderConfig(tfds.core.BuilderConfig):
  """Absolute paths of the annotation files and image directories of the two splits."""
  train_annotations: str = ""
  train_images: str = ""
  val_annotations: str = ""
  val_images: str = ""


def folder_config(data_config) -> CocoFolderConfig:
  """The builder config of ``config.data``'s folder; ``FileNotFoundError`` naming every missing path."""
  paths = {key: data_config.get(key) for key in PATH_KEYS}
  missing = [f"data.{key}={path!r}" for key, path in paths.items()
             if not path or not (os.path.isdir(path) if key.endswith("_images") else os.path.isfile(path))]
  if missing:
    raise FileNotFoundError("coco_folder needs an annotation JSON and an image directory per split; missing or "
                            "not found: " + ", ".join(missing))
  paths = {key: os.path.abspath(path) for key, path in paths.items()}
  fingerprint = hashlib.sha1()
  for key in PATH_KEYS:
    fingerprint.update(paths[key].encode())
    if key.endswith("_annotations"):
      status = os.stat(paths[key])
      fingerprint.update(f"{status.st_size}:{status.st_mtime_ns}".encode())
    else:
      _fingerprint_files(fingerprint, paths[key])
  stem = re.sub(r"[^a-z0-9]+", "_", os.path.splitext(os.path.basename(paths["train_annotations"]))[0].lower())
  return CocoFolderConfig(name=f"{stem.strip('_') or 'folder'}_{fingerprint.hexdigest()[:12]}",
                          description="A COCO-format folder.", **paths)


def _fingerprint_files(fingerprint, directory: str) -> None:
  """Adds the relative path, size and modification time of every file under ``directory`` to ``fingerprint``."""
  for root, folders, files in os.walk(directory):
    folders.sort()
    for name in sorted(files):
      path = os.path.join(root, name)
      status = os.stat(path)
      fingerprint.update(f"{os.path.relpath(path, directory)}:{status.st_size}:{status.st_mtime_ns}\n".encode())


def _categories(annotations: dict, path: str) -> Tuple[List[int], List[str]]:
  """Category ids in increasing order and their names (made unique)."""
  categories = annotations.get("categories") or []
  if not categories:
    raise DataError(f"{path} lists no categories; add its 'categories' list")
  if not all(isinstance(c, dict) and isinstance(c.get("id"), int) for c in categories):
    raise DataError(f"{path}: every category needs an integer id")
  categories = sorted(categories, key=lambda c: c["id"])
  names, seen = [], collections.Counter(str(c.get("name", c["id"])) for c in categories)
  for category in categories:
    name = str(category.get("name", category["id"]))
    names.append(name if seen[name] == 1 else f"{name} (id {category['id']})")
  return [int(c["id"]) for c in categories], names


def _image_path(image_dir: str, file_name: str):
  """The image's path, or None if ``file_name`` leads outside ``image_dir``."""
  root = os.path.normpath(image_dir)
  path = os.path.normpath(os.path.join(root, file_name))
  return path if os.path.commonpath([root, path]) == root and path != root else None


def _box(annotation: dict, width: int, height: int, report: Report, name: str):
  """COCO ``[x, y, w, h]`` -> normalized ``tfds.features.BBox``, clipped to the image; None if dropped."""
  bbox = annotation.get("bbox")
  if not isinstance(bbox, (list, tuple)) or len(bbox) != 4 or \
      not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox):
    report.add("box_malformed", name, detail=repr(bbox))
    return None
  x, y, w, h = (float(v) for v in bbox)
  if not all(math.isfinite(v) for v in (x, y, w, h)):
    report.add("box_nonfinite", name, detail=repr(bbox))
    return None
  if w < 0 or h < 0:
    report.add("box_negative_size", name, detail=repr(bbox))
    return None
  corners = np.array([x, y, x + w, y + h])
  clipped = np.clip(corners, 0, [width, height, width, height])
  if np.any(clipped != corners):
    report.add("box_clipped", name)
  x1, y1, x2, y2 = clipped.tolist()
  return tfds.features.BBox(ymin=y1 / height, xmin=x1 / width, ymax=y2 / height, xmax=x2 / width)


class CocoFolder(tfds.core.GeneratorBasedBuilder):
  """A COCO-format folder as a TFDS dataset with the features of ``coco/2017``."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=detection_features(tfds.features.ClassLabel()),
        metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Local files: nothing to download.
    config = self.builder_config
    train = _load(config.train_annotations)
    category_ids, names = _categories(train, config.train_annotations)
    self.info.features["objects"]["label"].names = names
    self.info.metadata["category_ids"] = category_ids
    self.info.metadata["reports"] = {}
    labels = {category_id: label for label, category_id in enumerate(category_ids)}
    return {"train": self._generate_examples("train", train, config.train_images, labels),
            "validation": self._generate_examples("validation", _load(config.val_annotations), config.val_images,
                                                  labels)}

  def _generate_examples(self, split: str, annotations: dict, image_dir: str, labels: Dict[int, int]):
    _check_images(annotations)
    report = Report(f"coco_folder {split}", images=len(annotations.get("images", [])),
                    boxes=len(annotations.get("annotations", [])), annotations=len(annotations.get("annotations", [])))
    by_image = collections.defaultdict(list)
    listed = {image.get("id") for image in annotations.get("images", [])}
    for annotation in annotations.get("annotations", []):
      if annotation.get("image_id") in listed:
        by_image[annotation["image_id"]].append(annotation)
      else:
        report.add("annotation_unknown_image", f"image id {annotation.get('image_id')}")
    seen_ids = set()
    for image in sorted(annotations.get("images", []), key=lambda i: i["id"]):
      name = str(image.get("file_name"))
      path = _image_path(image_dir, name)
      if image["id"] in seen_ids:
        report.add("image_duplicate_id", name)
        continue
      seen_ids.add(image["id"])
      if path is None:
        report.add("image_path_escapes", name)
        continue
      if not os.path.isfile(path):
        report.add("image_missing", name)
        continue
      try:
        with Image.open(path) as opened:
          width, height = opened.size
      except Exception as error:  # noqa: BLE001  (any unreadable file is reported, never raised)
        report.add("image_unreadable", name, detail=str(error))
        continue
      if (image.get("width"), image.get("height")) not in ((width, height), (None, None)):
        report.add("image_size_from_file", name,
                   detail=f"{image.get('width')} x {image.get('height')} listed, {width} x {height} in the file")
      objects = []
      for annotation in by_image[image["id"]]:
        if annotation.get("category_id") not in labels:
          report.add("box_unknown_category", name, detail=f"category id {annotation.get('category_id')}")
          continue
        box = _box(annotation, width, height, report, name)
        if box is not None:
          objects.append({"id": int(annotation.get("id", 0)), "area": _area(annotation, box, width, height),
                          "bbox": box, "label": labels[annotation["category_id"]],
                          "is_crowd": bool(annotation.get("iscrowd", 0))})
      yield image["id"], {"image": path, "image/filename": name, "image/id": image["id"], "objects": objects}
    report.log()
    self.info.metadata["reports"][split] = report.to_json()


def _load(path: str) -> dict:
  """A COCO annotation file: a JSON object with a non-empty ``images`` list, or a ``DataError`` saying why not."""
  with open(path, "rb") as stream:
    try:
      annotations = json.load(stream)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
      raise DataError(f"{path} is not valid JSON ({error}); point the config at a COCO annotation file "
                      f"(instances_*.json)") from error
  if not isinstance(annotations, dict):
    raise DataError(f"{path}: a COCO annotation file is a JSON object with images, annotations and categories; "
                    f"this one's root is a {type(annotations).__name__}")
  if not annotations.get("images"):
    raise DataError(f"{path} lists no images; a COCO annotation file needs an 'images' list (and "
                    f"'annotations' and 'categories')")
  return annotations


def _check_images(annotations: dict) -> None:
  for position, image in enumerate(annotations.get("images", [])):
    if not isinstance(image, dict) or not isinstance(image.get("id"), int):
      raise DataError(f"images[{position}] of the annotations has no integer id: {image!r:.200}")


def _area(annotation: dict, box: tfds.features.BBox, width: int, height: int) -> int:
  """The annotation's area (square pixels), or its clipped box's if it has none."""
  area = annotation.get("area")
  if isinstance(area, (int, float)) and math.isfinite(area):
    return int(round(area))
  return int(round((box.xmax - box.xmin) * width * (box.ymax - box.ymin) * height))

"""A mini COCO-format dataset with every kind of bad input, written from a table of hand-chosen cases.

Images are tiny (80 x 60 landscape, 60 x 80 portrait). Categories are three
of COCO's own (ids 1, 18, 90), so the folder has non-contiguous ids and the
same files, zipped under COCO's names, prepare TFDS's real ``coco/2017``.
The cases TFDS's own builder cannot take (an escaping file name, an unknown
category, a NaN or out-of-image box) are left out of the zips.
"""

import dataclasses
import io
import json
import os
import pathlib
import zipfile
from typing import Dict, List, Optional, Tuple

import numpy as np
from PIL import Image

CATEGORIES = [{"id": 1, "name": "person"}, {"id": 18, "name": "dog"}, {"id": 90, "name": "toothbrush"}]
# Labels of the coco_folder (ids in increasing order) and of TFDS's coco/2017 (COCO's 80 categories).
FOLDER_LABEL = {1: 0, 18: 1, 90: 2}
COCO_LABEL = {1: 0, 18: 16, 90: 79}
SOLID_RGB = (200, 100, 50)


@dataclasses.dataclass
class Case:
  """One image entry: file, size, how it is stored, its boxes ``(category id, [x, y, w, h], is_crowd)``."""
  image_id: int
  file_name: str
  size: Tuple[int, int]  # (width, height)
  kind: str = "jpeg"  # jpeg, png, gray, rgba, cmyk, truncated, garbage, solid_png
  boxes: List[Tuple[int, list, bool]] = dataclasses.field(default_factory=list)
  tfds_ok: bool = True  # whether TFDS's coco builder can take it


TRAIN = [
    Case(101, "a_solid.png", (80, 60), "solid_png", [(1, [10, 20, 30, 15], False), (18, [40, 5, 20, 20], True)]),
    Case(102, "b_portrait.jpg", (60, 80), "jpeg", [(90, [5, 10, 20, 30], False)]),
    Case(103, "c_gray.jpg", (80, 60), "gray", [(1, [10, 10, 20, 20], False)]),
    Case(104, "d_rgba.png", (80, 60), "rgba", [(18, [30, 10, 20, 20], False)]),
    Case(105, "e_truncated.jpg", (80, 60), "truncated", [(1, [10, 10, 20, 20], False)]),
    Case(106, "f_empty.jpg", (80, 60), "jpeg", []),
    Case(107, "g_zero_area.jpg", (80, 60), "jpeg", [(1, [10, 10, 0, 5], False), (90, [20, 20, 30, 30], False)]),
    Case(108, "h_outside.jpg", (80, 60), "jpeg", [(18, [70, 50, 20, 20], False)], tfds_ok=False),
    Case(109, "../escape.jpg", (80, 60), "jpeg", [(1, [10, 10, 20, 20], False)], tfds_ok=False),
    Case(110, "i_unknown_category.jpg", (80, 60), "jpeg", [(99, [10, 10, 20, 20], False),
                                                           (1, [30, 30, 20, 20], False)], tfds_ok=False),
    Case(111, "j_nan.jpg", (80, 60), "jpeg", [(1, [float("nan"), 1, 2, 3], False), (1, [30, 30, 20, 20], False)],
         tfds_ok=False),
    Case(112, "k_cmyk.jpg", (80, 60), "cmyk", [(90, [10, 10, 40, 30], False)]),
    Case(113, "l_crowd_only.jpg", (80, 60), "jpeg", [(1, [0, 0, 40, 30], True)]),
    Case(114, "m_many.jpg", (80, 60), "jpeg", [(1, [5 * i, 5 * i, 10, 10], False) for i in range(6)]),
    Case(115, "n_tiny.jpg", (40, 30), "jpeg", [(1, [5, 5, 10, 10], False)]),
    Case(116, "o_garbage.jpg", (80, 60), "garbage", [(1, [10, 10, 20, 20], False)]),
]
VAL = [
    Case(501, "v1.jpg", (80, 60), "jpeg", [(1, [10, 10, 30, 20], False), (18, [40, 30, 30, 25], True)]),
    Case(502, "v2.jpg", (60, 80), "jpeg", [(90, [5, 5, 30, 40], False)]),
    Case(503, "v3.jpg", (80, 60), "gray", []),
    Case(504, "v4.jpg", (80, 60), "jpeg", [(18, [0, 0, 80, 60], False)]),
    Case(505, "v5.png", (80, 60), "solid_png", [(1, [20, 10, 40, 40], False)]),
]
TEST = [Case(901, "t1.jpg", (80, 60), "jpeg")]


def _encoded(case: Case, rng: np.random.Generator) -> bytes:
  width, height = case.size
  pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
  buffer = io.BytesIO()
  if case.kind == "garbage":
    return b"this is not an image"
  if case.kind == "solid_png":
    Image.new("RGB", (width, height), SOLID_RGB).save(buffer, format="PNG")
  elif case.kind == "png":
    Image.fromarray(pixels).save(buffer, format="PNG")
  elif case.kind == "rgba":
    Image.fromarray(pixels).convert("RGBA").save(buffer, format="PNG")
  elif case.kind == "gray":
    Image.fromarray(pixels).convert("L").save(buffer, format="JPEG")
  elif case.kind == "cmyk":
    Image.fromarray(pixels).convert("CMYK").save(buffer, format="JPEG")
  else:
    Image.fromarray(pixels).save(buffer, format="JPEG")
  data = buffer.getvalue()
  return data[:len(data) // 2] if case.kind == "truncated" else data


def _instances(cases: List[Case], categories: List[dict], for_tfds: bool) -> dict:
  images, annotations = [], []
  for case in cases:
    if for_tfds and not case.tfds_ok:
      continue
    images.append({"id": case.image_id, "file_name": case.file_name, "width": case.size[0],
                   "height": case.size[1]})
    for category_id, bbox, crowd in case.boxes:
      annotations.append({"id": len(annotations) + 1, "image_id": case.image_id, "category_id": category_id,
                          "bbox": bbox, "area": float(bbox[2] * bbox[3]) if np.isfinite(bbox[0]) else 0.0,
                          "iscrowd": int(crowd), "segmentation": []})
  return {"images": images, "annotations": annotations, "categories": categories}


@dataclasses.dataclass
class MiniCoco:
  """Paths of the folder (``train_annotations`` ...) and of the zips in COCO's names (``zips``)."""
  train_annotations: str
  train_images: str
  val_annotations: str
  val_images: str
  zips: Optional[str] = None


def write_folder(root: pathlib.Path) -> MiniCoco:
  """The COCO-format folder: ``root/images/{train,val}``, ``root/annotations/instances_{train,val}.json``."""
  rng = np.random.default_rng(0)
  (root / "annotations").mkdir(parents=True)
  paths = {}
  for split, cases in (("train", TRAIN), ("val", VAL)):
    image_dir = root / "images" / split
    image_dir.mkdir(parents=True)
    for case in cases:
      target = os.path.normpath(image_dir / case.file_name)
      with open(target, "wb") as stream:
        stream.write(_encoded(case, rng))
    path = root / "annotations" / f"instances_{split}.json"
    path.write_text(json.dumps(_instances(cases, CATEGORIES, for_tfds=False)))
    paths[f"{split}_annotations"], paths[f"{split}_images"] = str(path), str(image_dir)
  return MiniCoco(**paths)


def coco_categories() -> List[dict]:
  from libra_jax.data.sources import COCO_CATEGORIES
  return [{"id": category_id, "name": name, "supercategory": "thing"} for category_id, name in COCO_CATEGORIES]


def write_coco_zips(root: pathlib.Path) -> Dict[str, pathlib.Path]:
  """COCO's own files for TFDS's ``coco/2017``, in ``root``; returns them by file name."""
  rng = np.random.default_rng(0)
  root.mkdir(parents=True)
  everything = coco_categories()
  zips = {}
  annotations = root / "annotations_trainval2017.zip"
  with zipfile.ZipFile(annotations, "w") as archive:
    archive.writestr("annotations/instances_train2017.json", json.dumps(_instances(TRAIN, everything, True)))
    archive.writestr("annotations/instances_val2017.json", json.dumps(_instances(VAL, everything, True)))
  zips[annotations.name] = annotations
  test_info = root / "image_info_test2017.zip"
  with zipfile.ZipFile(test_info, "w") as archive:
    info = _instances(TEST, everything, True)
    del info["annotations"]
    archive.writestr("annotations/image_info_test2017.json", json.dumps(info))
  zips[test_info.name] = test_info
  for split, cases in (("train2017", TRAIN), ("val2017", VAL), ("test2017", TEST)):
    path = root / f"{split}.zip"
    with zipfile.ZipFile(path, "w") as archive:
      for case in cases:
        if case.tfds_ok:
          archive.writestr(f"{split}/{case.file_name}", _encoded(case, rng))
    zips[path.name] = path
  return zips

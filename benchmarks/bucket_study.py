"""Padding and compilations of bucket sets over COCO's image sizes: the table behind the default ``data.buckets``.

Each image is resized by the config's keep-ratio rule (``data.scale``,
1333 x 800 for COCO) and goes to the smallest bucket that holds it
(``geometry.bucket_index``), as in the pipeline. For each candidate bucket set
the table gives:
  buckets_used: buckets that receive an image; each one compiles the train
    step once and the detection step once;
  padding_share: the share of the pixels the model computes on that are
    padding, ``1 - sum(resized area) / sum(bucket area)``, over all images;
  over_own_share: the same, but counting as useful each image's own area
    rounded up to multiples of 32 (what mmdetection pads a batch of one to),
    so the floor of every bucket set is 0.

    python benchmarks/bucket_study.py [--annotations=instances_val2017.json] [--json]

With ``--annotations``, the sizes are those of the file's images (a COCO
annotation file lists each image's ``width`` and ``height``). Without it,
the sizes are drawn from ``modelled_coco_sizes``, because no public source
reachable from here lists val2017's sizes; its docstring says how.
"""

import json
from typing import Dict, List, Sequence, Tuple

import numpy as np

from libra_jax import cli
from libra_jax.data import geometry
from libra_jax.data.config import COCO_BUCKETS, COCO_SCALE
from libra_jax.errors import DataError

Buckets = Tuple[Tuple[int, int], ...]


def mirrored(*landscape: Tuple[int, int]) -> Buckets:
  """Each landscape ``(H, W)`` bucket with its portrait twin ``(W, H)``."""
  return tuple(b for h, w in landscape for b in ((h, w), (w, h)) if h != w or b == (h, w))


CANDIDATES: Dict[str, Buckets] = {
    "one per orientation": mirrored((800, 1344)),
    "+ 4:3": mirrored((800, 1344), (800, 1088)),
    "+ 4:3, 3:2": mirrored((800, 1344), (800, 1216), (800, 1088)),
    "+ 4:3, 3:2, square": mirrored((800, 1344), (800, 1216), (800, 1088), (800, 800)),
    "every multiple of 32": mirrored(*[(800, w) for w in range(800, 1345, 32)]),
}

# The modelled share of each shape among COCO's images: long side 640, short side by the aspect ratio.
_MODEL_SHAPES = ((480, 0.55), (427, 0.22), (640, 0.04), (360, 0.04))  # (short side, share); the rest spread
_MODEL_PORTRAIT_SHARE = 0.19
_MODEL_SMALLER_SHARE = 0.16  # images whose long side is below 640: scaled by a factor uniform in [0.45, 1)


def modelled_coco_sizes(count: int = 5000, seed: int = 0) -> Tuple[np.ndarray, np.ndarray]:
  """``(height, width)`` ``[count]`` int arrays drawn from a model of COCO 2017's image sizes.

  The model: COCO's images are Flickr downloads, most with a long side of
  640 px. The short side is 480 (4:3) for 55% of them, 427 (3:2) for 22%,
  640 (square) for 4% and 360 (16:9) for 4%; the other 15% are spread evenly
  over 300-639. 19% are portrait. 16% are smaller, both sides scaled by a
  factor uniform in [0.45, 1). The aspect shares are this project's estimate;
  the portrait and smaller shares were then fitted so that the model has the
  statistics a published analysis of 22,500 COCO images reports (mean width
  580 px, mean height 479, mean width/height 1.27, median 1.33; the model
  gives 581, 479, 1.26 and 1.33). Smaller images are resized up to the same
  scale, so only the aspect mix and the orientation move the table.
  ``--annotations`` replaces the model with a real annotation file's sizes.
  """
  rng = np.random.default_rng(seed)
  shorts = np.array([s for s, _ in _MODEL_SHAPES] + [0])
  shares = np.array([p for _, p in _MODEL_SHAPES] + [1 - sum(p for _, p in _MODEL_SHAPES)])
  short = shorts[rng.choice(len(shorts), count, p=shares)]
  short = np.where(short == 0, rng.integers(300, 640, count), short)
  factor = np.where(rng.random(count) < _MODEL_SMALLER_SHARE, rng.uniform(0.45, 1.0, count), 1.0)
  long, short = np.round(640 * factor).astype(int), np.round(short * factor).astype(int)
  portrait = rng.random(count) < _MODEL_PORTRAIT_SHARE
  return np.where(portrait, long, short), np.where(portrait, short, long)


def annotation_sizes(path: str) -> Tuple[np.ndarray, np.ndarray]:
  """``(height, width)`` of every image a COCO annotation file lists."""
  try:
    with open(path) as stream:
      images = json.load(stream)["images"]
    return (np.array([image["height"] for image in images]), np.array([image["width"] for image in images]))
  except (OSError, ValueError, KeyError, TypeError) as error:
    raise DataError(f"{path}: cannot read the images' width and height from it ({error}); give a COCO annotation "
                    f"file such as instances_val2017.json") from None


def study(height: np.ndarray, width: np.ndarray, candidates: Dict[str, Buckets] = CANDIDATES,
          scale: Sequence[int] = COCO_SCALE) -> List[dict]:
  """One row per bucket set: ``name, default, buckets, buckets_used, padding_share, over_own_share``.

  ``default`` says whether the set is ``data.buckets``' COCO default.
  """
  resized_h, resized_w = geometry.resized_size(height, width, scale)
  area = resized_h.astype(np.float64) * resized_w
  own = (-(-resized_h // 32) * 32).astype(np.float64) * (-(-resized_w // 32) * 32)
  rows = []
  for name, buckets in candidates.items():
    geometry.check_buckets(scale, buckets)
    index = geometry.bucket_index(resized_h, resized_w, buckets)
    shapes = np.asarray(buckets, np.float64)[index]
    padded = shapes[:, 0] * shapes[:, 1]
    is_default = set(map(tuple, buckets)) == set(map(tuple, COCO_BUCKETS))
    rows.append({"name": name, "default": is_default, "buckets": len(buckets), "buckets_used": len(np.unique(index)),
                 "padding_share": round(float(1 - area.sum() / padded.sum()), 4),
                 "over_own_share": round(float(1 - own.sum() / padded.sum()), 4)})
  return rows


def main(argv) -> int:
  parser = cli.ArgumentParser(prog="python benchmarks/bucket_study.py", description=__doc__.split("\n")[0],
                              config=None)
  parser.add_argument("--annotations", default=None, help="a COCO annotation file whose image sizes to use")
  parser.add_argument("--json", action="store_true", help="one JSON line per bucket set")
  args = parser.parse_args(argv)
  height, width = annotation_sizes(args.annotations) if args.annotations else modelled_coco_sizes()
  rows = study(height, width)
  if args.json:
    for row in rows:
      print(json.dumps(row))
    return 0
  source = args.annotations or f"modelled COCO sizes ({len(height)} images)"
  print(f"{source}, scale {COCO_SCALE}")
  print(f"{'bucket set':<34}{'buckets':>8}{'used':>6}{'padding':>9}{'over own':>10}")
  for row in rows:
    name = row["name"] + (" (default)" if row["default"] else "")
    print(f"{name:<34}{row['buckets']:>8}{row['buckets_used']:>6}{row['padding_share']:>9.1%}"
          f"{row['over_own_share']:>10.1%}")
  return 0


if __name__ == "__main__":
  cli.run(main)

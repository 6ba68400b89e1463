"""Image geometry of the input pipeline: the keep-ratio resize and the padded bucket shapes.

Pure numpy, so the plan of a whole epoch is computed from image sizes alone,
without decoding an image.
"""

from typing import Sequence, Tuple

import numpy as np

from libra_jax.errors import ConfigError

Bucket = Tuple[int, int]


def resized_size(height, width, scale: Sequence[int]) -> Tuple[np.ndarray, np.ndarray]:
  """mmcv's keep-ratio rescale of images ``height x width`` (pixels, scalars or arrays).

  The factor is ``min(long_max / long_side, short_max / short_side)`` with
  ``(long_max, short_max) = (max(scale), min(scale))``; each side becomes
  ``int(side * factor + 0.5)``. Returns ``(new_height, new_width)``, int32;
  an image with a zero side (undecodable) stays 0 x 0.
  """
  height = np.asarray(height, np.float64)
  width = np.asarray(width, np.float64)
  empty = np.minimum(height, width) <= 0
  shortest, longest = np.where(empty, 1.0, np.minimum(height, width)), np.where(empty, 1.0, np.maximum(height, width))
  factor = np.where(empty, 0.0, np.minimum(max(scale) / longest, min(scale) / shortest))
  return (np.floor(height * factor + 0.5).astype(np.int32), np.floor(width * factor + 0.5).astype(np.int32))


def bucket_index(height, width, buckets: Sequence[Bucket]) -> np.ndarray:
  """Index of the smallest bucket ``(H, W)`` holding each ``height x width`` image; -1 where none does.

  Ties go to the first bucket listed. With one landscape and one portrait
  bucket sized for the resize scale, this is the bucket of the image's
  orientation.
  """
  height, width = np.asarray(height)[..., None], np.asarray(width)[..., None]
  shapes = np.asarray(buckets, np.int64)
  fits = (height <= shapes[:, 0]) & (width <= shapes[:, 1])
  area = np.where(fits, shapes[:, 0] * shapes[:, 1], np.iinfo(np.int64).max)
  return np.where(fits.any(-1), np.argmin(area, -1), -1)


def check_buckets(scale: Sequence[int], buckets: Sequence[Bucket]) -> None:
  """Raises ``ValueError`` unless every resized image fits a bucket and every side is a multiple of 32.

  A landscape image resizes into at most ``short_max x long_max`` (H x W) and a
  portrait one into ``long_max x short_max``; a bucket must hold each.
  """
  if len(scale) != 2 or min(scale) <= 0:
    raise ConfigError(f"data.scale must be (long_max, short_max) in pixels, got {tuple(scale)}")
  if not buckets:
    raise ConfigError("data.buckets is empty; give padded (H, W) shapes, e.g. ((800, 1344), (1344, 800))")
  for bucket in buckets:
    if len(bucket) != 2 or min(bucket) <= 0 or bucket[0] % 32 or bucket[1] % 32:
      raise ConfigError(f"bucket {tuple(bucket)} of data.buckets must be (H, W) with both sides positive multiples "
                        f"of 32")
  long_max, short_max = max(scale), min(scale)
  for name, (height, width) in (("landscape", (short_max, long_max)), ("portrait", (long_max, short_max))):
    if bucket_index(height, width, buckets) < 0:
      raise ConfigError(f"no bucket of data.buckets {tuple(map(tuple, buckets))} holds a {name} image resized to "
                        f"data.scale {tuple(scale)} (up to {height} x {width} pixels); add a bucket of at least "
                        f"({-(-height // 32) * 32}, {-(-width // 32) * 32})")

"""Anchor boxes for FPN levels, in mmdetection 3.x's layout.

Anchors depend only on static shapes, so they are built once at trace time and
become constants of the compiled program. Per level the rows run over feature
rows (y), then columns (x), then the A base anchors of a location; the base
anchors are ratio-major and scale-minor. Cell (0, 0) is centred on pixel
(0, 0) (centre offset 0), as in the reference.
"""

import math
from typing import List, Sequence, Tuple

import jax.numpy as jnp
import numpy as np


def octave_scales(octave_base_scale: float = 4.0, scales_per_octave: int = 3) -> Tuple[float, ...]:
  """RetinaNet's anchor scales ``base * 2**(i / n)`` for ``i < n`` (4, 5.04, 6.35)."""
  return tuple(octave_base_scale * 2.0 ** (i / scales_per_octave) for i in range(scales_per_octave))


def base_anchors(stride: int, scales: Sequence[float], ratios: Sequence[float]) -> np.ndarray:
  """The A = len(ratios) * len(scales) anchors of one location, centred on (0, 0).

  The base size is the stride; ``ratio = h / w``, so ``h = stride * scale *
  sqrt(ratio)`` and ``w = stride * scale / sqrt(ratio)``.

  Returns:
    ``[A, 4]`` float32 xyxy, ratio-major (all scales of the first ratio first).
  """
  h_ratios = np.sqrt(np.asarray(ratios, np.float32))
  w_ratios = np.float32(1.0) / h_ratios
  scales = np.asarray(scales, np.float32)
  widths = (np.float32(stride) * w_ratios[:, None] * scales[None, :]).reshape(-1)
  heights = (np.float32(stride) * h_ratios[:, None] * scales[None, :]).reshape(-1)
  half_w, half_h = np.float32(0.5) * widths, np.float32(0.5) * heights
  return np.stack([-half_w, -half_h, half_w, half_h], axis=-1).astype(np.float32)


def anchor_grid(feature_shapes: Sequence[Tuple[int, int]], strides: Sequence[int],
                scales: Sequence[float], ratios: Sequence[float]) -> List[jnp.ndarray]:
  """All anchors of every FPN level.

  Args:
    feature_shapes: ``(H_i, W_i)`` of each level's feature map.
    strides: pixel stride of each level (also its anchor base size).
    scales: anchor scales in units of the stride (RPN: ``(8,)``; RetinaNet:
      ``octave_scales()``).
    ratios: height / width ratios, e.g. ``(0.5, 1.0, 2.0)``.

  Returns:
    one float32 ``[H_i * W_i * A, 4]`` array per level, xyxy pixels, in the
    order (y, x, anchor).
  """
  if len(feature_shapes) != len(strides):
    raise ValueError(f"{len(feature_shapes)} feature shapes but {len(strides)} strides")
  levels = []
  for (height, width), stride in zip(feature_shapes, strides):
    base = base_anchors(stride, scales, ratios)
    shift_x = np.arange(width, dtype=np.float32) * np.float32(stride)
    shift_y = np.arange(height, dtype=np.float32) * np.float32(stride)
    xx, yy = np.meshgrid(shift_x, shift_y)
    shifts = np.stack([xx, yy, xx, yy], axis=-1).reshape(-1, 1, 4)
    levels.append(jnp.asarray((shifts + base[None]).reshape(-1, 4)))
  return levels


def valid_anchor_mask(image_shape: jnp.ndarray, feature_shapes: Sequence[Tuple[int, int]],
                      strides: Sequence[int], num_base_anchors: int,
                      size_divisor: int = 32) -> List[jnp.ndarray]:
  """Which anchors of one image lie on its own (padded) area, per level.

  A batch is padded to a bucket larger than most of its images. As in the
  reference, an image's anchors are valid where their location falls inside
  the image's own size rounded up to ``size_divisor``: location (y, x) of a
  level with stride s is valid iff ``x < min(ceil(pad_w / s), W)`` and
  ``y < min(ceil(pad_h / s), H)``. Anchors that cross the real image border
  stay valid (``allowed_border = -1``).

  Args:
    image_shape: ``[2]`` int (h, w) of the resized image inside the padding;
      may be traced (vmap over a batch's ``image_shape [B, 2]``).
    feature_shapes, strides: as for :func:`anchor_grid`.
    num_base_anchors: A, anchors per location.
    size_divisor: the padding multiple of the reference (32).

  Returns:
    one bool ``[H_i * W_i * A]`` array per level, aligned with
    :func:`anchor_grid`'s rows.
  """
  image_shape = jnp.asarray(image_shape, jnp.int32)
  padded = (image_shape + size_divisor - 1) // size_divisor * size_divisor
  masks = []
  for (height, width), stride in zip(feature_shapes, strides):
    valid_h = jnp.minimum((padded[0] + stride - 1) // stride, height)
    valid_w = jnp.minimum((padded[1] + stride - 1) // stride, width)
    rows = jnp.arange(height) < valid_h
    cols = jnp.arange(width) < valid_w
    location = rows[:, None] & cols[None, :]
    masks.append(jnp.repeat(location.reshape(-1), num_base_anchors))
  return masks


def feature_shapes_for(image_hw: Tuple[int, int], strides: Sequence[int]) -> List[Tuple[int, int]]:
  """Feature map sizes of a padded image at each stride: ``ceil(h / s), ceil(w / s)``.

  This is the size a stride-2 convolution chain (and P6 by stride-2 max-pool)
  produces for an input whose sides are multiples of 32.
  """
  return [(math.ceil(image_hw[0] / s), math.ceil(image_hw[1] / s)) for s in strides]

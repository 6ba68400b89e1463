"""Each image of a static bucket computed as if padded only to its own multiple of 32.

mmdetection tests one image at a time, zero-padded to the next multiple of 32
(its ``pad_size_divisor``). A bucket pads further, and without care the extra
padding changes what the image's pixels compute: a convolution at the edge of
the image's area reads feature values computed on the padding (non-zero after
a bias or BatchNorm) instead of zeros, and the balanced feature pyramid's
non-local softmax runs over the padding's positions too.

At a map of stride ``s`` an image's own area is ``ceil(own / s)`` pixels on
each axis (``own`` = its size rounded up to a multiple of 32). Zeroing a map
outside that area before every layer that reads across positions makes each
image compute exactly what it computes alone: a convolution at the border
then sees the zeros its own padding would give it. Only the inputs of such
layers need it: pointwise layers (1x1 convolutions, BatchNorm, ReLU, sums)
never mix positions, and a stride-2 layer with a 3x3 (or smaller) window
reads at most the last row of its input's area when that area has an even
size. The layers that are not convolutions (nearest resizing, adaptive max
pooling, the softmax, RoIAlign) take the image's own sizes where they differ.
"""

from typing import NamedTuple, Optional

import jax.numpy as jnp

SIZE_DIVISOR = 32


class OwnArea(NamedTuple):
  """The area of each image that its own padding covers.

  Attributes:
    size: ``[B, 2]`` int32 ``(height, width)`` in input pixels, a multiple of
      ``SIZE_DIVISOR``.
  """
  size: jnp.ndarray

  @classmethod
  def of(cls, image_shape) -> "OwnArea":
    """The own area of images of ``image_shape [B, 2]`` (height, width in pixels)."""
    shape = jnp.asarray(image_shape, jnp.int32)
    return cls(-(-shape // SIZE_DIVISOR) * SIZE_DIVISOR)

  def extent(self, stride: int) -> jnp.ndarray:
    """``[B, 2]`` int32: the area's rows and columns at a map of ``stride`` (``ceil(size / stride)``)."""
    return -(-self.size // stride)

  def inside(self, height: int, width: int, stride: int) -> jnp.ndarray:
    """``[B, height, width]`` bool: which positions of a map of ``stride`` lie inside each image's area."""
    extent = self.extent(stride)
    rows = jnp.arange(height)[None, :] < extent[:, :1]
    cols = jnp.arange(width)[None, :] < extent[:, 1:]
    return rows[:, :, None] & cols[:, None, :]

  def zero_outside(self, x: jnp.ndarray, stride: int) -> jnp.ndarray:
    """``x [B, H, W, C]`` (a map of ``stride``) with every position outside each image's area set to 0."""
    inside = self.inside(x.shape[1], x.shape[2], stride)
    return jnp.where(inside[..., None], x, jnp.zeros((), x.dtype))


def zero_outside(area: Optional[OwnArea], x: jnp.ndarray, stride: int) -> jnp.ndarray:
  """``area.zero_outside(x, stride)``, or ``x`` itself when there is no area (the bucket's padding counts)."""
  return x if area is None else area.zero_outside(x, stride)

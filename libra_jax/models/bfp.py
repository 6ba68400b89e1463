"""Balanced feature pyramid (Libra R-CNN), NHWC.

All levels are resized to the refine level and averaged into one balanced
semantic feature, which is refined (a non-local block by default) and added
back to every level after resizing to that level's size. The resizing follows
PyTorch's ``adaptive_max_pool2d`` (finer levels) and legacy ``nearest``
interpolation (coarser levels) index rules exactly, also for sizes that do not
divide (e.g. 25x38 against 13x19).

With an ``OwnArea`` (``own_padding``), each image computes what it computes
alone: the resizing follows those rules on the sizes of its own area, which
differ from the bucket's where a level's stride exceeds 32 (P6 of an area 25
strides of 32 tall is 13 rows, of a bucket 42 tall 21), and the non-local
softmax runs over the positions inside the area only.
"""

from typing import Any, Optional, Sequence, Tuple

import flax.linen as nn
import jax.numpy as jnp

from libra_jax.models.layers import (ConvModule, adaptive_max_pool, adaptive_max_pool_per_image, resize_nearest,
                                     resize_nearest_per_image)
from libra_jax.models.own_padding import SIZE_DIVISOR, OwnArea, zero_outside
from libra_jax.ops.attention import softmax_attention

REFINE_TYPES = (None, "conv", "non_local")


class NonLocal2d(nn.Module):
  """Embedded-Gaussian non-local block with a residual (mmcv's ``NonLocal2d``).

  ``reduction=1`` (inner channels = channels) and no ``1/sqrt(C)`` scaling, as
  Libra R-CNN configures it: with ``theta, phi, g`` 1x1 convs (bias, no norm,
  no activation) over the N = H * W positions,
  ``y = softmax(theta(x) phi(x)^T) g(x)`` (``ops.attention.softmax_attention``,
  whose gradient is written out) and ``out = x + conv_out(y)``.
  ``g, theta, phi`` start from N(0, 0.01^2) and ``conv_out`` from zeros, so
  the block is the identity at initialization.

  Parameters: ``g/conv``, ``theta/conv``, ``phi/conv``, ``conv_out/conv``.
  """
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, inside: Optional[jnp.ndarray] = None) -> jnp.ndarray:
    """``x [B, H, W, C]`` -> ``[B, H, W, C]``; ``inside [B, H, W]`` bool limits the softmax to those positions."""
    batch, height, width, channels = x.shape
    embed = lambda name: ConvModule(channels, 1, kernel_init=nn.initializers.normal(0.01), dtype=self.dtype,
                                    name=name)(x).reshape(batch, height * width, channels)
    g, theta, phi = embed("g"), embed("theta"), embed("phi")
    key_mask = None if inside is None else inside.reshape(batch, height * width)
    y = softmax_attention(theta, phi, g, key_mask).reshape(batch, height, width, channels)
    return x + ConvModule(channels, 1, kernel_init=nn.initializers.zeros, dtype=self.dtype, name="conv_out")(y)


class BalancedFeaturePyramid(nn.Module):
  """Libra R-CNN's BFP neck: gather, integrate, refine, scatter with residual.

  Attributes:
    num_levels: number of input levels L (5).
    refine_level: the level everything is resized to (2 = P4 for Faster
      R-CNN's P2..P6; 1 = P4 for RetinaNet's P3..P7).
    refine_type: ``"non_local"`` (the paper), ``"conv"`` (a 3x3 conv + ReLU
      with no residual, Xavier init) or ``None`` (no refinement).
    dtype: computation dtype.

  Parameters: ``refine/...`` (:class:`NonLocal2d`'s, or ``refine/conv`` for
  ``"conv"``), as in mmdetection.
  """
  num_levels: int = 5
  refine_level: int = 2
  refine_type: Optional[str] = "non_local"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, inputs: Sequence[jnp.ndarray], area: Optional[OwnArea] = None,
               strides: Sequence[int] = (4, 8, 16, 32, 64)) -> Tuple[jnp.ndarray, ...]:
    """``num_levels`` maps ``[B, H_l, W_l, C]`` of ``strides`` -> the same shapes.

    With ``area``, each image computes as if padded only to its own area
    (outside it, the outputs are meaningless).
    """
    if len(inputs) != self.num_levels:
      raise ValueError(f"BalancedFeaturePyramid expects {self.num_levels} levels, got {len(inputs)}")
    if not 0 <= self.refine_level < self.num_levels:
      raise ValueError(f"refine_level {self.refine_level} outside 0..{self.num_levels - 1}")
    if self.refine_type not in REFINE_TYPES:
      raise ValueError(f"refine_type must be one of {REFINE_TYPES}, got {self.refine_type!r}")
    size = inputs[self.refine_level].shape[1:3]
    refine_stride = strides[self.refine_level]

    def pool(x, target, level_from, level_to):
      """Adaptive max pooling of a map of level ``level_from`` to the size ``target`` of level ``level_to``."""
      if area is None or max(strides[level_from], strides[level_to]) <= SIZE_DIVISOR:
        return adaptive_max_pool(x, target)
      return adaptive_max_pool_per_image(x, area.extent(strides[level_from]), area.extent(strides[level_to]), target,
                                         strides[level_to] // strides[level_from] + 1)

    def nearest(x, target, level_from, level_to):
      if area is None or max(strides[level_from], strides[level_to]) <= SIZE_DIVISOR:
        return resize_nearest(x, target)
      return resize_nearest_per_image(x, area.extent(strides[level_from]), area.extent(strides[level_to]), target)

    gathered = [pool(x, size, level, self.refine_level) if level < self.refine_level
                else nearest(x, size, level, self.refine_level) for level, x in enumerate(inputs)]
    balanced = sum(gathered) / self.num_levels
    if self.refine_type == "non_local":
      inside = None if area is None else area.inside(*balanced.shape[1:3], refine_stride)
      balanced = NonLocal2d(dtype=self.dtype, name="refine")(balanced, inside)
    elif self.refine_type == "conv":
      balanced = zero_outside(area, balanced, refine_stride)
      balanced = ConvModule(balanced.shape[-1], 3, use_relu=True, dtype=self.dtype, name="refine")(balanced)
    outs = []
    for level, x in enumerate(inputs):
      target = x.shape[1:3]
      residual = (nearest(balanced, target, self.refine_level, level) if level < self.refine_level
                  else pool(balanced, target, self.refine_level, level))
      outs.append(x + residual)
    return tuple(outs)

"""Feature pyramid network (mmdetection's ``FPN``), NHWC.

Faster R-CNN: C2..C5 -> P2..P6 with P6 a stride-2 subsampling of P5 (max-pool
of kernel 1). RetinaNet: C3..C5 -> P3..P7 with P6 a stride-2 3x3 conv on C5
and P7 one on P6 (``add_extra_convs='on_input'``, no ReLU in between).
"""

from typing import Any, Optional, Sequence, Tuple

import flax.linen as nn
import jax.numpy as jnp

from libra_jax.models.layers import ConvModuleList, resize_nearest
from libra_jax.models.own_padding import OwnArea, zero_outside

EXTRA_CONV_SOURCES = (None, "on_input")


def output_strides(in_strides: Sequence[int], start_level: int, num_outs: int) -> Tuple[int, ...]:
  """Strides of the FPN's outputs: the used backbone levels', then twice the previous one per extra level."""
  strides = list(in_strides[start_level:])
  while len(strides) < num_outs:
    strides.append(2 * strides[-1])
  return tuple(strides)


class FPN(nn.Module):
  """Lateral 1x1 convs, a nearest-upsampling top-down path and 3x3 output convs.

  Attributes:
    out_channels: channels of every output level (256).
    num_outs: number of output levels (5).
    start_level: index of the first backbone level used (0 for Faster
      R-CNN's C2, 1 for RetinaNet's C3).
    add_extra_convs: ``None`` adds levels by stride-2 subsampling of the last
      output; ``"on_input"`` adds them with stride-2 3x3 convs, the first on
      the last backbone level.
    dtype: computation dtype.

  Parameters: ``lateral_convs/{i}/conv`` and ``fpn_convs/{i}/conv`` (the extra
  convs continue the ``fpn_convs`` numbering), as in mmdetection; Xavier-uniform
  kernels, zero biases.
  """
  out_channels: int = 256
  num_outs: int = 5
  start_level: int = 0
  add_extra_convs: Optional[str] = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, inputs: Sequence[jnp.ndarray], area: Optional[OwnArea] = None,
               in_strides: Sequence[int] = (4, 8, 16, 32)) -> Tuple[jnp.ndarray, ...]:
    """Backbone maps ``[B, H_i, W_i, C_i]`` of strides ``in_strides`` -> ``num_outs`` maps ``[B, h_l, w_l, out_channels]``.

    Each extra level has size ``ceil(previous / 2)``. With ``area``, every 3x3
    convolution reads zeros outside each image's own area (``own_padding``).
    """
    if self.add_extra_convs not in EXTRA_CONV_SOURCES:
      raise ValueError(f"add_extra_convs must be one of {EXTRA_CONV_SOURCES}, got {self.add_extra_convs!r}")
    used = list(inputs[self.start_level:])
    if not used or len(used) > self.num_outs:
      raise ValueError(f"FPN with start_level {self.start_level} and num_outs {self.num_outs} "
                       f"cannot use {len(inputs)} backbone levels")
    lateral_convs = ConvModuleList(self.out_channels, dtype=self.dtype, name="lateral_convs")
    fpn_convs = ConvModuleList(self.out_channels, dtype=self.dtype, name="fpn_convs")
    strides = output_strides(in_strides[:len(inputs)], self.start_level, self.num_outs)
    laterals = [lateral_convs(x, i, kernel_size=1) for i, x in enumerate(used)]
    for i in range(len(laterals) - 1, 0, -1):
      laterals[i - 1] = laterals[i - 1] + resize_nearest(laterals[i], laterals[i - 1].shape[1:3])
    outs = [fpn_convs(zero_outside(area, x, stride), i) for i, (x, stride) in enumerate(zip(laterals, strides))]
    for i in range(len(outs), self.num_outs):
      if self.add_extra_convs is None:
        outs.append(outs[-1][:, ::2, ::2])
      else:
        # An odd-sized area's stride-2 3x3 conv reads one row and column past it.
        source = used[-1] if i == len(used) else outs[-1]
        outs.append(fpn_convs(zero_outside(area, source, strides[i - 1]), i, strides=2))
    return tuple(outs)

"""ResNet and ResNeXt backbones, PyTorch style, with frozen BatchNorm.

The layout follows torchvision's ResNet (mmdetection ``style='pytorch'``): a
7x7/2 stem conv, BN, ReLU and a 3x3/2 max-pool, then four stages whose first
block may downsample; in a bottleneck the stride sits on the 3x3 conv. Every
conv and the pool pad symmetrically by ``k // 2`` on each side, as PyTorch
does, so converted weights give the same numbers ('SAME' would pad only the
bottom and right at stride 2).

Module and parameter names nest like the PyTorch state dict: the Flax path
``params['layer1']['0']['downsample']['0']['kernel']`` is torch's
``layer1.0.downsample.0.weight`` (kernels HWIO instead of OIHW; BN ``scale`` is
torch's ``weight``, batch stats ``mean`` / ``var`` are ``running_mean`` /
``running_var``).

BatchNorm always normalizes with its running statistics (mmdetection's
``norm_eval=True``): they are never updated, and a batch's output equals its
examples' outputs one by one. The BN affine parameters stay ordinary params;
whether they are trained is up to the optimizer's mask.
"""

from typing import Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from libra_jax.models import params
from libra_jax.models.own_padding import OwnArea, zero_outside
from libra_jax.ops import conv as conv_ops

# depth -> (block kind, blocks per stage).
STAGE_BLOCKS = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}
EXPANSION = {"basic": 1, "bottleneck": 4}
# Strides of C2..C5.
OUTPUT_STRIDES = (4, 8, 16, 32)
BN_EPSILON = 1e-5

# Kaiming normal with fan_out = out_channels * kh * kw and the ReLU gain, as
# mmdetection initializes convs when training from scratch.
_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def _check_frozen_stages(frozen_stages: int) -> None:
  if not -1 <= frozen_stages <= 4:
    raise ValueError(f"frozen_stages={frozen_stages}: expected -1 (nothing frozen), 0 (the stem) "
                     "or 1..4 (the stem and layer1..layer<frozen_stages>)")


def frozen_param_prefixes(frozen_stages: int) -> Tuple[str, ...]:
  """Top-level backbone parameter names that ``frozen_stages`` freezes.

  Args:
    frozen_stages: -1 freezes nothing, 0 the stem (``conv1``, ``bn1``), and
      ``i`` in 1..4 the stem plus ``layer1`` .. ``layer<i>``.

  Returns:
    the names, e.g. ``('conv1', 'bn1', 'layer1')`` for 1, to build an optimizer
    mask from.
  """
  _check_frozen_stages(frozen_stages)
  if frozen_stages < 0:
    return ()
  return ("conv1", "bn1") + tuple(f"layer{i}" for i in range(1, frozen_stages + 1))


def stem_max_pool(x: jnp.ndarray) -> jnp.ndarray:
  """The stem's 3x3 stride-2 max-pool with one row/column of -inf padding per side.

  Args:
    x: ``[B, H, W, C]`` feature map, any float dtype.

  Returns:
    ``[B, (H - 1) // 2 + 1, (W - 1) // 2 + 1, C]``, same dtype (PyTorch's
    ``MaxPool2d(3, stride=2, padding=1)``).
  """
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


def _conv(features: int, kernel: int, stride: int, dtype, name: str, groups: int = 1) -> params.Conv:
  pad = kernel // 2
  return params.Conv(features, (kernel, kernel), strides=(stride, stride), padding=((pad, pad), (pad, pad)),
                     feature_group_count=groups, use_bias=False, dtype=dtype, param_dtype=jnp.float32,
                     kernel_init=_conv_init, name=name, conv_general_dilated=conv_ops.conv_general_dilated)


def _bn(dtype, name: str) -> params.BatchNorm:
  return params.BatchNorm(use_running_average=True, epsilon=BN_EPSILON, dtype=dtype, param_dtype=jnp.float32,
                          name=name)


class Downsample(nn.Module):
  """The shortcut projection: 1x1 conv with the block's stride (``"0"``), then BN (``"1"``).

  Attributes:
    features: output channels.
    stride: spatial stride.
    dtype: computation dtype.
  """
  features: int
  stride: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    """``[B, H, W, C_in]`` -> ``[B, ceil(H / stride), ceil(W / stride), features]``."""
    return _bn(self.dtype, "1")(_conv(self.features, 1, self.stride, self.dtype, "0")(x))


class BasicBlock(nn.Module):
  """Two 3x3 conv-BN pairs and an identity or projected shortcut (ResNet-18/34).

  Attributes:
    features: output channels (also the inner width).
    stride: stride of the first 3x3 conv and of the projection.
    downsample: whether the shortcut is a ``Downsample`` projection.
    dtype: computation dtype.
  """
  features: int
  stride: int = 1
  downsample: bool = False
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, area: Optional[OwnArea] = None, in_stride: int = 1) -> jnp.ndarray:
    """``[B, H, W, C_in]`` (a map of ``in_stride``) -> ``[B, ceil(H / stride), ceil(W / stride), features]``.

    With ``area``, the 3x3 convolutions read zeros outside each image's own area.
    """
    y = zero_outside(area, x, in_stride) if self.stride == 1 else x
    y = nn.relu(_bn(self.dtype, "bn1")(_conv(self.features, 3, self.stride, self.dtype, "conv1")(y)))
    y = zero_outside(area, y, in_stride * self.stride)
    y = _bn(self.dtype, "bn2")(_conv(self.features, 3, 1, self.dtype, "conv2")(y))
    shortcut = Downsample(self.features, self.stride, self.dtype, name="downsample")(x) if self.downsample else x
    return nn.relu(y + shortcut)


class Bottleneck(nn.Module):
  """1x1 reduce, 3x3 (grouped, strided), 1x1 expand, each with BN, plus a shortcut.

  Attributes:
    width: inner channels of the 1x1 and 3x3 convs.
    features: output channels (4 * planes).
    stride: stride of the 3x3 conv and of the projection (PyTorch style).
    groups: groups of the 3x3 conv (ResNeXt cardinality).
    downsample: whether the shortcut is a ``Downsample`` projection.
    dtype: computation dtype.
  """
  width: int
  features: int
  stride: int = 1
  groups: int = 1
  downsample: bool = False
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, area: Optional[OwnArea] = None, in_stride: int = 1) -> jnp.ndarray:
    """``[B, H, W, C_in]`` (a map of ``in_stride``) -> ``[B, ceil(H / stride), ceil(W / stride), features]``.

    With ``area``, the 3x3 convolution reads zeros outside each image's own area.
    """
    y = nn.relu(_bn(self.dtype, "bn1")(_conv(self.width, 1, 1, self.dtype, "conv1")(x)))
    if self.stride == 1:
      y = zero_outside(area, y, in_stride)
    y = _conv(self.width, 3, self.stride, self.dtype, "conv2", groups=self.groups)(y)
    y = nn.relu(_bn(self.dtype, "bn2")(y))
    y = _bn(self.dtype, "bn3")(_conv(self.features, 1, 1, self.dtype, "conv3")(y))
    shortcut = Downsample(self.features, self.stride, self.dtype, name="downsample")(x) if self.downsample else x
    return nn.relu(y + shortcut)


class ResLayer(nn.Module):
  """One stage: ``num_blocks`` blocks named ``"0"``, ``"1"``, ...; only the first strides.

  Attributes:
    block: ``"basic"`` or ``"bottleneck"``.
    num_blocks: number of blocks.
    planes: the stage's base channel count (output is ``planes * expansion``).
    width: bottleneck inner width (ignored by basic blocks).
    stride: stride of the first block.
    groups: bottleneck 3x3 groups.
    dtype: computation dtype.
  """
  block: str
  num_blocks: int
  planes: int
  width: int
  stride: int
  groups: int = 1
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, area: Optional[OwnArea] = None, in_stride: int = 1) -> jnp.ndarray:
    """``[B, H, W, C_in]`` (a map of ``in_stride``) -> ``[B, ceil(H / stride), ceil(W / stride), planes * expansion]``."""
    features = self.planes * EXPANSION[self.block]
    for i in range(self.num_blocks):
      stride = self.stride if i == 0 else 1
      downsample = i == 0 and (stride != 1 or x.shape[-1] != features)
      if self.block == "basic":
        block = BasicBlock(features, stride, downsample, self.dtype, name=str(i))
      else:
        block = Bottleneck(self.width, features, stride, self.groups, downsample, self.dtype, name=str(i))
      x = block(x, area, in_stride)
      in_stride *= stride
    return x


class ResNet(nn.Module):
  """ResNet / ResNeXt backbone returning C2..C5.

  Attributes:
    depth: 18, 34 (basic blocks), 50, 101 or 152 (bottlenecks).
    groups: cardinality of the bottleneck 3x3 convs (ResNeXt-101 32x4d: 32).
    base_width: channels per group at ``planes == base_channels`` (ResNeXt
      32x4d: 4). The bottleneck inner width is
      ``floor(planes * base_width / base_channels) * groups``, which is
      ``planes`` for plain ResNet (groups 1, base_width 64).
    frozen_stages: -1 nothing, 0 the stem, ``i`` the stem and layer1..layer<i>.
      Gradients are stopped at the frozen part's output; see also
      ``frozen_param_prefixes`` for the optimizer mask.
    dtype: computation dtype (float32 or bfloat16); params are float32.
    base_channels: stem width and the planes of layer1 (stage ``i`` has
      ``base_channels * 2**i`` planes); 64 for the standard networks.
  """
  depth: int
  groups: int = 1
  base_width: int = 64
  frozen_stages: int = 1
  dtype: jnp.dtype = jnp.float32
  base_channels: int = 64

  def __post_init__(self):
    if self.depth not in STAGE_BLOCKS:
      raise ValueError(f"ResNet depth={self.depth}: expected one of {sorted(STAGE_BLOCKS)}")
    if STAGE_BLOCKS[self.depth][0] == "basic" and (self.groups != 1 or self.base_width != 64):
      raise ValueError(f"ResNet-{self.depth} (basic blocks) supports only groups=1, base_width=64; "
                       f"got groups={self.groups}, base_width={self.base_width}")
    _check_frozen_stages(self.frozen_stages)
    super().__post_init__()

  @nn.compact
  def __call__(self, images: jnp.ndarray, area: Optional[OwnArea] = None) -> Tuple[jnp.ndarray, ...]:
    """Runs the backbone.

    Args:
      images: ``[B, H, W, 3]`` float, normalized, zero outside each image; H
        and W multiples of 32 give exact strides.
      area: each image's own padded area: each computes as if padded only to
        it (``own_padding``); None lets the whole bucket count.

    Returns:
      ``(C2, C3, C4, C5)``, each ``[B, H / s, W / s, C]`` in ``dtype`` with
      ``s = 4, 8, 16, 32`` and ``C = base_channels * 2**i * expansion``
      (ResNet-50: 256, 512, 1024, 2048).
    """
    block, stage_blocks = STAGE_BLOCKS[self.depth]
    x = _conv(self.base_channels, 7, 2, self.dtype, "conv1")(images)
    # The pool's windows stay inside the area for every output inside it: nothing to zero here.
    x = stem_max_pool(nn.relu(_bn(self.dtype, "bn1")(x)))
    if self.frozen_stages >= 0:
      x = jax.lax.stop_gradient(x)
    outputs = []
    in_stride = 4
    for i, num_blocks in enumerate(stage_blocks):
      planes = self.base_channels * 2**i
      width = (planes * self.base_width // self.base_channels) * self.groups
      x = ResLayer(block, num_blocks, planes, width, stride=1 if i == 0 else 2, groups=self.groups,
                   dtype=self.dtype, name=f"layer{i + 1}")(x, area, in_stride)
      in_stride = OUTPUT_STRIDES[i]
      if self.frozen_stages >= i + 1:
        x = jax.lax.stop_gradient(x)
      outputs.append(x)
    return tuple(outputs)

"""Layers shared by the necks and heads, with PyTorch's exact index rules.

Parameter names mirror mmdetection's: a ``ConvModule`` keeps its convolution in
a child called ``conv``, so the Flax path ``neck/0/lateral_convs/0/conv``
joined by dots is the state-dict prefix ``neck.0.lateral_convs.0.conv``.
"""

import functools
import math
from typing import Any, Callable, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from libra_jax.models import params
from libra_jax.ops import conv as conv_ops

Initializer = Callable[..., Any]


class ConvModule(nn.Module):
  """A 2-D convolution with PyTorch padding, optionally followed by ReLU.

  Attributes:
    features: output channels.
    kernel_size: square kernel side.
    strides: stride in both directions.
    use_relu: apply ReLU after the convolution.
    kernel_init, bias_init: initializers of the ``conv`` child.
    dtype: computation dtype (parameters stay float32).
  """
  features: int
  kernel_size: int = 3
  strides: int = 1
  use_relu: bool = False
  kernel_init: Initializer = nn.initializers.xavier_uniform()
  bias_init: Initializer = nn.initializers.zeros
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    """``x [B, H, W, C_in]`` -> ``[B, ceil(H / s), ceil(W / s), features]`` (odd kernels).

    ``x`` may also be a sequence of maps (stride 1): the one filter is applied
    to each (:class:`SharedFilterConv`) and the tuple of outputs returned.
    """
    if isinstance(x, (list, tuple)):
      if self.strides != 1:
        raise ValueError(f"a ConvModule applied to several maps has stride 1, not {self.strides}")
      maps = SharedFilterConv(self.features, self.kernel_size, name="conv", kernel_init=self.kernel_init,
                              bias_init=self.bias_init, dtype=self.dtype)(x)
      return tuple(nn.relu(y) for y in maps) if self.use_relu else maps
    x = conv2d(self.features, self.kernel_size, self.strides, name="conv", kernel_init=self.kernel_init,
               bias_init=self.bias_init, dtype=self.dtype)(x)
    return nn.relu(x) if self.use_relu else x


class SharedFilterConv(params.ReadsExistingParams, nn.Module):
  """One stride-1 convolution, PyTorch-padded (odd square kernel), applied to each map of a sequence.

  The parameters are ``nn.Conv``'s (``kernel [k, k, C_in, features]``,
  ``bias [features]``, float32), so a head that shares its filters across
  pyramid levels keeps its parameter tree. On the CPU the maps' 3x3
  convolutions run as one Winograd convolution (``libra_jax.ops.conv.conv_maps``).

  Attributes:
    features: output channels.
    kernel_size: square kernel side (odd).
    kernel_init, bias_init: the parameters' initializers.
    dtype: computation dtype (parameters stay float32).
  """
  features: int
  kernel_size: int = 3
  kernel_init: Initializer = nn.initializers.xavier_uniform()
  bias_init: Initializer = nn.initializers.zeros
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, maps: Sequence[jnp.ndarray]) -> Tuple[jnp.ndarray, ...]:
    """Maps ``[B, H_l, W_l, C_in]`` -> the tuple of ``[B, H_l, W_l, features]``."""
    size = self.kernel_size
    kernel = self.param("kernel", self.kernel_init, (size, size, maps[0].shape[-1], self.features), jnp.float32)
    bias = self.param("bias", self.bias_init, (self.features,), jnp.float32).astype(self.dtype)
    pad = size // 2
    outputs = conv_ops.conv_maps([x.astype(self.dtype) for x in maps], kernel.astype(self.dtype),
                                 ((pad, pad), (pad, pad)))
    return tuple(y + bias for y in outputs)


class ConvModuleList(nn.Module):
  """Numbered ``ConvModule`` children ``"0"``, ``"1"``, ... (an ``nn.ModuleList``).

  ``convs(x, index, ...)`` applies child ``index``, created on first use with
  the given shape, so FPN-like code can interleave the children with other
  work while the parameter tree reads ``<name>/<index>/conv``.
  """
  features: int
  kernel_init: Initializer = nn.initializers.xavier_uniform()
  bias_init: Initializer = nn.initializers.zeros
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, index: int, kernel_size: int = 3, strides: int = 1,
               use_relu: bool = False) -> jnp.ndarray:
    return ConvModule(self.features, kernel_size, strides, use_relu, self.kernel_init, self.bias_init,
                      self.dtype, name=str(index))(x)


def conv2d(features: int, kernel_size: int, strides: int = 1, use_bias: bool = True,
           name: Optional[str] = None, feature_group_count: int = 1,
           kernel_init: Initializer = nn.initializers.xavier_uniform(),
           bias_init: Initializer = nn.initializers.zeros, dtype: Any = jnp.float32) -> params.Conv:
  """``nn.Conv`` (:class:`libra_jax.models.params.Conv`) padded symmetrically by ``kernel_size // 2`` like PyTorch.

  Flax's ``"SAME"`` pads stride-2 convolutions asymmetrically, which shifts the
  output by a pixel relative to weights trained in PyTorch. On the CPU, 1x1
  convolutions and the filter gradients of large ones are matmuls
  (``libra_jax.ops.conv``).
  """
  pad = kernel_size // 2
  return params.Conv(features, (kernel_size, kernel_size), strides=(strides, strides),
                     padding=((pad, pad), (pad, pad)), use_bias=use_bias, name=name,
                     feature_group_count=feature_group_count, kernel_init=kernel_init,
                     bias_init=bias_init, dtype=dtype, param_dtype=jnp.float32,
                     conv_general_dilated=conv_ops.conv_general_dilated)


def resize_nearest(x: jnp.ndarray, size: Tuple[int, int]) -> jnp.ndarray:
  """PyTorch's legacy ``interpolate(mode='nearest')`` of ``x [B, H, W, C]`` to ``size``.

  Output pixel ``i`` copies input pixel ``floor(i * H_in / H_out)``
  (not ``jax.image.resize``'s half-pixel rule). By whole-number factors (the
  FPN's 2x, the balanced pyramid's 2x and 4x on sizes that divide) that is a
  broadcast, whose gradient is a sum over each pixel's copies; other sizes
  gather, whose gradient is a scatter-add (slow on XLA:CPU and on TPUs).
  """
  batch, in_h, in_w, channels = x.shape
  if size[0] % in_h == 0 and size[1] % in_w == 0:
    factor_h, factor_w = size[0] // in_h, size[1] // in_w
    copies = jnp.broadcast_to(x[:, :, None, :, None, :], (batch, in_h, factor_h, in_w, factor_w, channels))
    return copies.reshape(batch, size[0], size[1], channels)
  rows = (jnp.arange(size[0]) * in_h) // size[0]
  cols = (jnp.arange(size[1]) * in_w) // size[1]
  return x[:, rows][:, :, cols]


def _adaptive_windows(in_size: int, out_size: int) -> Sequence[Tuple[int, int]]:
  """PyTorch's adaptive pooling windows: ``[floor(i n / m), ceil((i + 1) n / m))``."""
  return [((i * in_size) // out_size, math.ceil((i + 1) * in_size / out_size)) for i in range(out_size)]


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def window_max_pool(x: jnp.ndarray, window: Tuple[int, int]) -> jnp.ndarray:
  """Max over non-overlapping ``window`` (rows, columns) tiles: ``x [B, H, W, C]`` -> ``[B, H / kh, W / kw, C]``.

  ``H`` and ``W`` must be multiples of the window. The forward pass is
  ``nn.max_pool``'s. The gradient goes to the first maximum of each tile in
  row-major order, as PyTorch's max pooling and XLA's ``select_and_scatter``
  (``nn.max_pool``'s own gradient) give it, but is computed as a comparison
  with the tile's maximum, because XLA:CPU runs ``select_and_scatter``
  slowly: 91 against 17 ms for the 4x4 tiles of a ``[2, 128, 128, 256]`` map.
  (A forward pass by reshaping into tiles was as fast, but with it XLA:CPU at
  ``--xla_backend_optimization_level=0``, the test suite's setting, returned
  NaN gradients for the balanced pyramid behind its non-local block.)
  """
  return nn.max_pool(x, window, strides=window)


def _window_max_tiles(x: jnp.ndarray, window: Tuple[int, int]) -> jnp.ndarray:
  """``x [B, H, W, C]`` -> ``[B, H / kh, kh, W / kw, kw, C]``."""
  batch, height, width, channels = x.shape
  return x.reshape(batch, height // window[0], window[0], width // window[1], window[1], channels)


def _window_max_pool_forward(x, window):
  pooled = window_max_pool(x, window)
  return pooled, (x, pooled)


def _window_max_pool_backward(window, residuals, cotangent):
  x, pooled = residuals
  position = (np.arange(window[0])[:, None] * window[1] + np.arange(window[1])[None, :])[None, None, :, None, :, None]
  is_max = _window_max_tiles(x, window) == pooled[:, :, None, :, None, :]
  first = jnp.min(jnp.where(is_max, position, window[0] * window[1]), axis=(2, 4), keepdims=True)
  gradient = jnp.where(position == first, cotangent[:, :, None, :, None, :], jnp.zeros((), x.dtype))
  return (gradient.reshape(x.shape),)


window_max_pool.defvjp(_window_max_pool_forward, _window_max_pool_backward)


def adaptive_max_pool(x: jnp.ndarray, size: Tuple[int, int]) -> jnp.ndarray:
  """PyTorch's ``adaptive_max_pool2d`` of ``x [B, H, W, C]`` to ``size`` (static).

  Windows may overlap or differ in size when the sizes do not divide. When the
  input is an exact multiple of the output it is :func:`window_max_pool`.
  """
  in_h, in_w = x.shape[1:3]
  out_h, out_w = size
  if in_h % out_h == 0 and in_w % out_w == 0:
    return window_max_pool(x, (in_h // out_h, in_w // out_w))
  x = jnp.stack([jnp.max(x[:, lo:hi], axis=1) for lo, hi in _adaptive_windows(in_h, out_h)], axis=1)
  return jnp.stack([jnp.max(x[:, :, lo:hi], axis=2) for lo, hi in _adaptive_windows(in_w, out_w)], axis=2)


def _nearest_rows(out_size: int, in_extent, out_extent, in_size: int):
  """``[B, out_size]`` int32: input row of each output row, ``floor(j * in_extent / out_extent)``, inside the map."""
  rows = (jnp.arange(out_size)[None, :] * in_extent[:, None]) // jnp.maximum(out_extent[:, None], 1)
  return jnp.minimum(rows, in_size - 1)


def resize_nearest_per_image(x: jnp.ndarray, in_extent, out_extent, size: Tuple[int, int]) -> jnp.ndarray:
  """``resize_nearest`` of each image's own area: ``x [B, H, W, C]`` -> ``[B, size[0], size[1], C]``.

  Image ``b``'s area is ``in_extent[b]`` (``[B, 2]`` int32 rows, columns) of
  ``x`` and becomes ``out_extent[b]`` of the output, by PyTorch's legacy
  nearest rule on those sizes; outside it the output is meaningless.
  """
  rows = _nearest_rows(size[0], in_extent[:, 0], out_extent[:, 0], x.shape[1])
  cols = _nearest_rows(size[1], in_extent[:, 1], out_extent[:, 1], x.shape[2])
  x = jnp.take_along_axis(x, rows[:, :, None, None], axis=1)
  return jnp.take_along_axis(x, cols[:, None, :, None], axis=2)


def _adaptive_max_axis(x: jnp.ndarray, axis: int, out_size: int, in_extent, out_extent, max_window: int):
  """Adaptive max pooling of ``x [B, H, W, C]`` along ``axis`` (1 or 2) with per-image windows."""
  steps = jnp.arange(out_size)[None, :]
  low = (steps * in_extent[:, None]) // jnp.maximum(out_extent[:, None], 1)
  high = -((-(steps + 1) * in_extent[:, None]) // jnp.maximum(out_extent[:, None], 1))
  shape = (-1, out_size, 1, 1) if axis == 1 else (-1, 1, out_size, 1)
  pooled = None
  for offset in range(max_window):
    index = jnp.minimum(low + offset, x.shape[axis] - 1)
    values = jnp.take_along_axis(x, index.reshape(shape), axis=axis)
    values = jnp.where((low + offset < high).reshape(shape), values, jnp.asarray(-np.inf, x.dtype))
    pooled = values if pooled is None else jnp.maximum(pooled, values)
  return pooled


def adaptive_max_pool_per_image(x: jnp.ndarray, in_extent, out_extent, size: Tuple[int, int],
                                max_window: int) -> jnp.ndarray:
  """``adaptive_max_pool`` of each image's own area (``in_extent [B, 2]`` of ``x`` -> ``out_extent [B, 2]``).

  ``max_window`` (static) bounds every window's length; windows of an output
  inside ``out_extent`` lie inside ``in_extent``. Outside it the output is
  meaningless.
  """
  x = _adaptive_max_axis(x, 1, size[0], in_extent[:, 0], out_extent[:, 0], max_window)
  return _adaptive_max_axis(x, 2, size[1], in_extent[:, 1], out_extent[:, 1], max_window)

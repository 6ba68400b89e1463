"""2-D convolution as matmuls where XLA:CPU's convolution kernels are slow.

XLA:CPU runs a 1x1 convolution well below its matmul rate (35-140 GFLOP/s
against 55-210 for the same product as a matmul, at ResNet-50 FPN's shapes for
an 800x1344 image: ``benchmarks/bench_conv_grad.py``), and computes a larger
convolution's filter (weight) gradient about 5x slower than the convolution
itself or its input gradient. So, on the platforms in ``MATMUL_PLATFORMS``
(the CPU; accelerators keep XLA's convolutions, which are their fast path):

* a 1x1 convolution is a matmul over the positions (after a strided slice
  when it has a stride), so its forward pass and both gradients are matmuls;
* a ``kh x kw`` convolution keeps XLA's forward pass and input gradient, and
  its filter gradient becomes ``kh * kw`` matmuls where that is faster (wide
  filters, and medium ones on large maps:
  :func:`matmul_filter_gradient_is_faster`): tap ``(i, j)`` is the input
  window shifted by ``(i, j)`` (strided like the convolution), contracted with
  the output gradient over batch and positions,
  ``dW[i, j] = sum_bhw x[b, s*h + i, s*w + j, :]^T g[b, h, w, :]``.

:func:`conv_general_dilated` has the signature of ``lax.conv_general_dilated``
(what ``flax.linen.Conv`` calls) and applies this to ungrouped, undilated NHWC
convolutions. Each is the same sum in another order: it agrees with XLA's to
float rounding (tests/ops/test_conv.py).
"""

import functools
from typing import Sequence, Tuple

import jax
import jax.numpy as jnp
from jax import lax

MATMUL_PLATFORMS = ("cpu",)
# Filters wider than this C_in * C_out take the matmul filter gradient on every map; from the smaller product below
# on, on maps of more than MATMUL_LARGE_MAP_POSITIONS output positions (see matmul_filter_gradient_is_faster).
MATMUL_ANY_MAP_ABOVE_CHANNEL_PRODUCT = 256 * 256
MATMUL_LARGE_MAPS_MIN_CHANNEL_PRODUCT = 128 * 128
MATMUL_LARGE_MAP_POSITIONS = 8192
NHWC = ("NHWC", "HWIO", "NHWC")


def matmul_filter_gradient_is_faster(filter_shape: Sequence[int], output_positions: int) -> bool:
  """Whether matmuls beat XLA:CPU's filter gradient for an ``[kh, kw, C_in, C_out]`` filter whose output has
  ``output_positions`` (batch x height x width) positions.

  A 1x1 filter's gradient, one matmul, is 1.1-10x faster than XLA's from
  16x16 channels on (2 cores, jax 0.10, 2026-12-03). For 3x3 filters XLA's
  own gradient is fast on small maps and slow on large ones. Its time over
  the nine matmuls' (2 cores with AVX-512, 2026-12-04, the median of three
  calls; ``2x64`` is batch 2 of 64x64, ``50x84`` batch 1):

      channels     2x16  2x32  50x84  2x64  2x128  100x168  200x336
      64 -> 64     0.49  0.70  0.63   0.57  0.62   0.40     0.61
      128 -> 128   0.80  1.78  1.11   0.40  1.53   0.78     2.38
      256 -> 256   0.93  1.08  0.83   0.60  2.40   1.22     3.79
      512 -> 512   0.89  0.87  0.85   1.62  -      2.33     -
      256 -> 720   1.13  1.15  1.32   1.93  3.38   2.19     6.10
      256 -> 36    1.17  0.87  0.81   0.72  0.71   0.84     2.06

  So: 1x1 filters; filters wider than ``MATMUL_ANY_MAP_ABOVE_CHANNEL_PRODUCT``
  (256 x 720, 512 x 512); and from ``MATMUL_LARGE_MAPS_MIN_CHANNEL_PRODUCT``
  on (128 x 128, 256 x 256) on maps of more than
  ``MATMUL_LARGE_MAP_POSITIONS``. The whole RetinaNet R-50 train step at
  512 x 512 batch 2, whose head runs 256 x 256 filters on maps of 8,192
  positions and less, took 5.26-5.32 s with matmuls for every 256 x 256
  filter and 4.69-4.71 s with this rule (two runs each, alternating). (On
  the machine of 2026-12-03 the nine matmuls won for 256 x 256 filters on
  every map from 24x24 at batch 2 on; the machines here differ from day to
  day.)
  """
  kh, kw, c_in, c_out = filter_shape
  channels = c_in * c_out
  return (kh * kw == 1 or channels > MATMUL_ANY_MAP_ABOVE_CHANNEL_PRODUCT
          or (channels >= MATMUL_LARGE_MAPS_MIN_CHANNEL_PRODUCT and output_positions > MATMUL_LARGE_MAP_POSITIONS))


def pointwise_conv(x, w, strides: Tuple[int, int]):
  """A 1x1 NHWC convolution without padding as a matmul: ``x [B, H, W, C_in]``, ``w [1, 1, C_in, C_out]``."""
  if strides != (1, 1):
    x = lax.slice(x, (0, 0, 0, 0), x.shape, (1,) + tuple(strides) + (1,))
  # A matmul of [positions, C] matrices, whose filter gradient XLA:CPU computes without transposing the input
  # (3.6x faster for 64 -> 256 channels at 200x336 than the same product written on 4-D arrays).
  return (x.reshape(-1, x.shape[3]) @ w[0, 0]).reshape(x.shape[:3] + (w.shape[3],))


def _xla_conv(x, w, strides: Tuple[int, int], padding: Tuple[Tuple[int, int], ...]):
  return lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=NHWC)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv_matmul_filter_gradient(x, w, strides, padding):
  return _xla_conv(x, w, strides, padding)


def _forward(x, w, strides, padding):
  return _xla_conv(x, w, strides, padding), (x, w)


def filter_gradient(x, g, kernel_size: Tuple[int, int], strides: Tuple[int, int],
                    padding: Sequence[Tuple[int, int]]):
  """``dL/dW [kh, kw, C_in, C_out]`` of an NHWC convolution from its input ``x`` and output gradient ``g``, by matmuls."""
  (top, bottom), (left, right) = padding
  padded = jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
  out_h, out_w = g.shape[1:3]
  # Positions flattened first: contracted as 4-D arrays, XLA:CPU transposed every window to channels-major
  # for the matmul, and those transposes took as long as the matmuls (256 channels at 200x336: 990 against
  # 585 ms for the nine taps).
  positions = g.reshape(-1, g.shape[3])
  taps = []
  for i in range(kernel_size[0]):
    for j in range(kernel_size[1]):
      window = lax.slice(padded, (0, i, j, 0),
                         (padded.shape[0], i + (out_h - 1) * strides[0] + 1, j + (out_w - 1) * strides[1] + 1,
                          padded.shape[3]), (1, strides[0], strides[1], 1))
      taps.append(jnp.einsum("nc,no->co", window.reshape(-1, padded.shape[3]), positions))
  return jnp.stack(taps).reshape(kernel_size + taps[0].shape)


def _backward(strides, padding, residuals, g):
  x, w = residuals
  _, input_gradient = jax.vjp(lambda x: _xla_conv(x, w, strides, padding), x)
  return input_gradient(g)[0], filter_gradient(x, g, w.shape[:2], strides, padding).astype(w.dtype)


_conv_matmul_filter_gradient.defvjp(_forward, _backward)


def _vary_alike(value, other):
  """``value`` marked varying over the mesh axes ``other`` varies over (inside ``shard_map``; else unchanged).

  A replicated filter convolved with a per-device input has a per-device
  filter gradient; marking the filter varying first lets ``shard_map`` sum
  that gradient over devices, as it does for XLA's own convolution.
  """
  missing = tuple(sorted(jax.typeof(other).mat.varying - jax.typeof(value).mat.varying))
  return lax.pcast(value, missing, to="varying") if missing else value


def _output_positions(lhs_shape, rhs_shape, strides, padding) -> int:
  """``B * H_out * W_out`` of an NHWC convolution without dilation."""
  sizes = [(size + low + high - kernel) // stride + 1
           for size, kernel, stride, (low, high) in zip(lhs_shape[1:3], rhs_shape[:2], strides, padding)]
  return lhs_shape[0] * sizes[0] * sizes[1]


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count: int = 1, batch_group_count: int = 1,
                         precision=None, preferred_element_type=None):
  """``lax.conv_general_dilated``, with matmuls where they apply (see the module docstring)."""
  plain = (feature_group_count == 1 and batch_group_count == 1 and precision is None
           and preferred_element_type is None and lhs.ndim == 4 and not isinstance(padding, str)
           and all(d == 1 for d in (lhs_dilation or (1, 1))) and all(d == 1 for d in (rhs_dilation or (1, 1)))
           and lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
           == lax.conv_dimension_numbers(lhs.shape, rhs.shape, NHWC)
           and jax.default_backend() in MATMUL_PLATFORMS)
  if plain and rhs.shape[:2] == (1, 1) and all(tuple(p) == (0, 0) for p in padding):
    return pointwise_conv(lhs, rhs, tuple(window_strides))
  if plain and matmul_filter_gradient_is_faster(rhs.shape, _output_positions(lhs.shape, rhs.shape, window_strides,
                                                                             padding)):
    lhs, rhs = _vary_alike(lhs, rhs), _vary_alike(rhs, lhs)
    return _conv_matmul_filter_gradient(lhs, rhs, tuple(window_strides), tuple(tuple(p) for p in padding))
  return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
                                  feature_group_count, batch_group_count, precision, preferred_element_type)

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
  its filter gradient becomes ``kh * kw`` matmuls where that is faster
  (:func:`matmul_filter_gradient_is_faster`): tap ``(i, j)`` is the input
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
# Larger filters take the matmul filter gradient from this C_in * C_out on (see matmul_filter_gradient_is_faster).
MATMUL_MIN_CHANNEL_PRODUCT = 256 * 256
NHWC = ("NHWC", "HWIO", "NHWC")


def matmul_filter_gradient_is_faster(filter_shape: Sequence[int]) -> bool:
  """Whether matmuls beat XLA:CPU's filter gradient for an ``[kh, kw, C_in, C_out]`` filter.

  Measured on 2 cores (jax 0.10, batch 2, maps of 24x24 to 200x336, square
  channel counts 16 to 256, strides 1 and 2): a 1x1 filter's gradient, one
  matmul, is 1.1-9x faster than XLA's from 16x16 channels on; a 3x3 filter's
  nine matmuls win from 256x256 channels (1.7-2.2x) but lose up to 4x on
  small ones (0.25-0.9x at 16-64 channels), with 128x128 in between
  (0.6-1.6x by map size). So: 1x1 filters, and larger ones from
  ``MATMUL_MIN_CHANNEL_PRODUCT``.
  """
  kh, kw, c_in, c_out = filter_shape
  return kh * kw == 1 or c_in * c_out >= MATMUL_MIN_CHANNEL_PRODUCT


def pointwise_conv(x, w, strides: Tuple[int, int]):
  """A 1x1 NHWC convolution without padding as a matmul: ``x [B, H, W, C_in]``, ``w [1, 1, C_in, C_out]``."""
  if strides != (1, 1):
    x = lax.slice(x, (0, 0, 0, 0), x.shape, (1,) + tuple(strides) + (1,))
  return jnp.einsum("bhwc,co->bhwo", x, w[0, 0])


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
  taps = []
  for i in range(kernel_size[0]):
    for j in range(kernel_size[1]):
      window = lax.slice(padded, (0, i, j, 0),
                         (padded.shape[0], i + (out_h - 1) * strides[0] + 1, j + (out_w - 1) * strides[1] + 1,
                          padded.shape[3]), (1, strides[0], strides[1], 1))
      taps.append(jnp.einsum("bhwc,bhwo->co", window, g))
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
  if plain and matmul_filter_gradient_is_faster(rhs.shape):
    lhs, rhs = _vary_alike(lhs, rhs), _vary_alike(rhs, lhs)
    return _conv_matmul_filter_gradient(lhs, rhs, tuple(window_strides), tuple(tuple(p) for p in padding))
  return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
                                  feature_group_count, batch_group_count, precision, preferred_element_type)

"""The convolution with matmul filter gradients: XLA's forward and input gradient, the same filter gradient."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from libra_jax.ops import conv


def filter_gradient_by_loops(x, g, kernel, stride, pad):
  """dW[i, j, c, o] = sum over b, h, w of padded x[b, stride h + i, stride w + j, c] * g[b, h, w, o]."""
  padded = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  out = np.zeros((kernel, kernel, x.shape[3], g.shape[3]))
  for i in range(kernel):
    for j in range(kernel):
      for h in range(g.shape[1]):
        for w in range(g.shape[2]):
          out[i, j] += padded[:, stride * h + i, stride * w + j, :].T @ g[:, h, w, :]
  return out


@pytest.fixture
def matmuls_for_every_filter(monkeypatch):
  """Small test filters take the matmul filter gradient too (by default only large ones do)."""
  monkeypatch.setattr(conv, "MATMUL_ANY_MAP_ABOVE_CHANNEL_PRODUCT", 0)


@pytest.mark.parametrize("kernel,stride", [(3, 1), (3, 2), (5, 1), (7, 2)])
def test_values_and_gradients_equal_xlas(kernel, stride, matmuls_for_every_filter):
  rng = np.random.default_rng(kernel * 10 + stride)
  x = jnp.asarray(rng.normal(size=(2, 11, 13, 3)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(kernel, kernel, 3, 5)), jnp.float32)
  padding = ((kernel // 2, kernel // 2),) * 2
  ours = lambda x, w: conv.conv_general_dilated(x, w, (stride, stride), padding, dimension_numbers=conv.NHWC)
  xlas = lambda x, w: lax.conv_general_dilated(x, w, (stride, stride), padding, dimension_numbers=conv.NHWC)
  assert "custom_vjp" in str(jax.make_jaxpr(ours)(x, w))
  np.testing.assert_array_equal(ours(x, w), xlas(x, w))
  g = jnp.asarray(rng.normal(size=xlas(x, w).shape), jnp.float32)
  dx, dw = jax.vjp(ours, x, w)[1](g)
  want_dx, want_dw = jax.vjp(xlas, x, w)[1](g)
  np.testing.assert_array_equal(dx, want_dx)
  np.testing.assert_allclose(dw, want_dw, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dw, filter_gradient_by_loops(np.asarray(x), np.asarray(g), kernel, stride, kernel // 2),
                             rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernel,channels,size,path", [
    (1, 16, 32, "pointwise"), (1, 2048, 32, "pointwise"), (3, 16, 32, "xla"), (3, 16, 100, "xla"),
    (3, 128, 32, "xla"), (3, 128, 64, "xla"), (3, 128, 65, "filter_gradient"), (3, 256, 64, "xla"),
    (3, 256, 65, "filter_gradient"), (3, 512, 8, "filter_gradient")])
def test_matmuls_where_they_are_faster(kernel, channels, size, path):
  # Batch 2: a 64x64 map has 8,192 output positions, the most at which 128x128 and 256x256 filters keep XLA's
  # filter gradient; 65x65 has 8,450.
  x = jax.ShapeDtypeStruct((2, size, size, channels), jnp.float32)
  w = jax.ShapeDtypeStruct((kernel, kernel, channels, channels), jnp.float32)
  jaxpr = str(jax.make_jaxpr(lambda x, w: conv.conv_general_dilated(x, w, (1, 1), ((kernel // 2,) * 2,) * 2,
                                                                    dimension_numbers=conv.NHWC))(x, w))
  assert ("conv_general_dilated" in jaxpr) == (path != "pointwise")
  assert ("custom_vjp" in jaxpr) == (path == "filter_gradient")


@pytest.mark.parametrize("stride", [1, 2])
def test_pointwise_convolutions_are_matmuls_with_xlas_values_and_gradients(stride):
  rng = np.random.default_rng(stride)
  x = jnp.asarray(rng.normal(size=(2, 11, 13, 6)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(1, 1, 6, 5)), jnp.float32)
  ours = lambda x, w: conv.conv_general_dilated(x, w, (stride, stride), ((0, 0), (0, 0)), dimension_numbers=conv.NHWC)
  xlas = lambda x, w: lax.conv_general_dilated(x, w, (stride, stride), ((0, 0), (0, 0)), dimension_numbers=conv.NHWC)
  assert "conv_general_dilated" not in str(jax.make_jaxpr(ours)(x, w))
  np.testing.assert_allclose(ours(x, w), xlas(x, w), rtol=1e-5, atol=1e-5)
  g = jnp.asarray(rng.normal(size=xlas(x, w).shape), jnp.float32)
  for got, want in zip(jax.vjp(ours, x, w)[1](g), jax.vjp(xlas, x, w)[1](g)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_grouped_convolutions_are_xlas_own(matmuls_for_every_filter):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(1, 6, 6, 4)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(3, 3, 2, 4)), jnp.float32)
  args = ((1, 1), ((1, 1), (1, 1)))
  ours = jax.make_jaxpr(lambda w: conv.conv_general_dilated(x, w, *args, dimension_numbers=conv.NHWC,
                                                            feature_group_count=2))(w)
  assert "custom_vjp" not in str(ours)
  plain = jax.make_jaxpr(lambda w: conv.conv_general_dilated(x, w[:, :, :, :2].repeat(2, 2), *args,
                                                             dimension_numbers=conv.NHWC))(w)
  assert "custom_vjp" in str(plain)

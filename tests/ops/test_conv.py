"""The convolution with matmuls and banded filter gradients: XLA's forward and input gradient, the same
filter gradient."""

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
def small_bands(monkeypatch):
  """Small test maps take the banded filter gradient too: bands of 30 positions (1 row of batch 2 x 13, 2 of 2 x 7)."""
  monkeypatch.setattr(conv, "FILTER_GRADIENT_BAND_POSITIONS", 30)


@pytest.mark.parametrize("kernel,stride,pad", [(3, 1, 1), (3, 2, 1), (5, 1, 2), (7, 2, 3), (3, 2, 0), (4, 3, 1)])
def test_values_and_gradients_equal_xlas(kernel, stride, pad, small_bands):
  # Strided maps have bands of 2 or 3 rows and a shorter last one; padding 0 with stride 2 (and 4x4 by 3)
  # never reads the last row or column, so the filter gradient's high padding is negative.
  rng = np.random.default_rng(kernel * 10 + stride)
  x = jnp.asarray(rng.normal(size=(2, 11, 13, 3)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(kernel, kernel, 3, 5)), jnp.float32)
  padding = ((pad, pad),) * 2
  ours = lambda x, w: conv.conv_general_dilated(x, w, (stride, stride), padding, dimension_numbers=conv.NHWC)
  xlas = lambda x, w: lax.conv_general_dilated(x, w, (stride, stride), padding, dimension_numbers=conv.NHWC)
  assert "custom_vjp" in str(jax.make_jaxpr(ours)(x, w))
  np.testing.assert_array_equal(ours(x, w), xlas(x, w))
  g = jnp.asarray(rng.normal(size=xlas(x, w).shape), jnp.float32)
  dx, dw = jax.vjp(ours, x, w)[1](g)
  want_dx, want_dw = jax.vjp(xlas, x, w)[1](g)
  np.testing.assert_array_equal(dx, want_dx)
  np.testing.assert_allclose(dw, want_dw, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dw, filter_gradient_by_loops(np.asarray(x), np.asarray(g), kernel, stride, pad),
                             rtol=1e-5, atol=1e-5)


def test_bands_cover_every_output_row_once(monkeypatch):
  monkeypatch.setattr(conv, "FILTER_GRADIENT_BAND_POSITIONS", 78)  # bands of 3 rows of batch 2 x 13: 3, 3, 3, 2
  # A gradient that is 1 on one output row at a time: each row's filter gradient must come from exactly one band.
  rng = np.random.default_rng(5)
  x = jnp.asarray(rng.normal(size=(2, 11, 13, 2)), jnp.float32)
  for row in range(11):
    g = jnp.zeros((2, 11, 13, 1), jnp.float32).at[:, row].set(1.0)
    np.testing.assert_allclose(conv.banded_filter_gradient(x, g, (3, 3), (1, 1), ((1, 1), (1, 1))),
                               filter_gradient_by_loops(np.asarray(x), np.asarray(g), 3, 1, 1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernel,batch,size,stride,path", [
    (1, 2, 32, 1, "pointwise"), (1, 1, 200, 2, "pointwise"), (3, 2, 32, 1, "xla"), (3, 1, 45, 1, "xla"),
    (3, 1, 46, 1, "banded"), (3, 2, 33, 1, "banded"), (3, 1, 90, 2, "xla"), (3, 1, 92, 2, "banded")])
def test_banded_filter_gradients_where_a_map_spans_several_bands(kernel, batch, size, stride, path):
  # 2,048 positions per band: rows of 2 x 32 give bands of 32 rows, one band for a 32x32 map and two for 33x33;
  # rows of 45 give bands of 45 rows (one band at 45x45), of 46 bands of 44 rows (two at 46x46).
  x = jax.ShapeDtypeStruct((batch, size, size, 8), jnp.float32)
  w = jax.ShapeDtypeStruct((kernel, kernel, 8, 8), jnp.float32)
  jaxpr = str(jax.make_jaxpr(lambda x, w: conv.conv_general_dilated(x, w, (stride, stride), ((kernel // 2,) * 2,) * 2,
                                                                    dimension_numbers=conv.NHWC))(x, w))
  assert ("conv_general_dilated" in jaxpr) == (path != "pointwise")
  assert ("custom_vjp" in jaxpr) == (path == "banded")


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


def test_grouped_convolutions_are_xlas_own(small_bands):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(1, 8, 13, 4)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(3, 3, 2, 4)), jnp.float32)
  args = ((1, 1), ((1, 1), (1, 1)))
  ours = jax.make_jaxpr(lambda w: conv.conv_general_dilated(x, w, *args, dimension_numbers=conv.NHWC,
                                                            feature_group_count=2))(w)
  assert "custom_vjp" not in str(ours)
  plain = jax.make_jaxpr(lambda w: conv.conv_general_dilated(x, w[:, :, :, :2].repeat(2, 2), *args,
                                                             dimension_numbers=conv.NHWC))(w)
  assert "custom_vjp" in str(plain)

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
  # Stride 1 takes bands of 2 or 3 rows and a shorter last one, larger strides one matmul per tap; a 4x4 filter by 3
  # with padding 1 never reads the last column.
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


def test_strided_filter_gradients_are_tap_matmuls_and_the_others_bands(small_bands):
  # 2 x 13 positions per row and bands of 30: an 8-row output has 8 bands, each one convolution; the same output
  # of a stride-2 convolution takes 9 tap matmuls and no convolution.
  def backward(stride):
    x = jax.ShapeDtypeStruct((2, 8 * stride, 13 * stride, 3), jnp.float32)
    w = jax.ShapeDtypeStruct((3, 3, 3, 5), jnp.float32)
    ours = lambda x, w: conv.conv_general_dilated(x, w, (stride, stride), ((1, 1), (1, 1)),
                                                  dimension_numbers=conv.NHWC)
    return str(jax.make_jaxpr(lambda x, w: jax.vjp(ours, x, w)[1](jnp.ones((2, 8, 13, 5))))(x, w))
  banded, taps = backward(1), backward(2)
  assert banded.count("conv_general_dilated[") - taps.count("conv_general_dilated[") == 8
  assert banded.count("dot_general[") == 0 and taps.count("dot_general[") == 9


@pytest.mark.parametrize("stride", [1, 2])
def test_wide_convolutions_of_one_band_take_tap_matmuls_with_xlas_gradients(stride, monkeypatch):
  # One band (2,048 positions) covers these maps; from TAP_MIN_CHANNELS input channels on (layer4's 512 in the
  # layers, 6 here) the filter gradient is nine tap matmuls, below it XLA's own convolution.
  monkeypatch.setattr(conv, "TAP_MIN_CHANNELS", 6)
  rng = np.random.default_rng(stride)
  w = jnp.asarray(rng.normal(size=(3, 3, 6, 5)), jnp.float32)
  x = jnp.asarray(rng.normal(size=(2, 9, 11, 6)), jnp.float32)
  args = ((stride, stride), ((1, 1), (1, 1)))
  ours = lambda x, w: conv.conv_general_dilated(x, w, *args, dimension_numbers=conv.NHWC)
  xlas = lambda x, w: lax.conv_general_dilated(x, w, *args, dimension_numbers=conv.NHWC)
  g = jnp.asarray(rng.normal(size=xlas(x, w).shape), jnp.float32)
  backward = str(jax.make_jaxpr(lambda x, w: jax.vjp(ours, x, w)[1](g))(x, w))
  assert backward.count("dot_general[") == 9
  np.testing.assert_allclose(ours(x, w), xlas(x, w), rtol=1e-5, atol=1e-5)
  for got, want in zip(jax.vjp(ours, x, w)[1](g), jax.vjp(xlas, x, w)[1](g)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  narrow = str(jax.make_jaxpr(lambda x, w: jax.vjp(ours, x, w)[1](g))(x[..., :5], w[:, :, :5]))
  assert "dot_general[" not in narrow


@pytest.mark.parametrize("kernel,stride,pad", [(3, 2, 0), (4, 3, 1), (5, 2, 2)])
def test_banded_filter_gradients_of_strided_convolutions(kernel, stride, pad, small_bands):
  # The bands serve stride 1 in the layers, but are written for any stride: 4x4 by 3 with padding 1 never reads the
  # last column, so a band's XLA filter gradient takes a negative high padding there.
  rng = np.random.default_rng(kernel + stride)
  x = rng.normal(size=(2, 11, 13, 3)).astype(np.float32)
  g = rng.normal(size=(2, (11 + 2 * pad - kernel) // stride + 1, (13 + 2 * pad - kernel) // stride + 1, 4))
  got = conv.banded_filter_gradient(jnp.asarray(x), jnp.asarray(g, jnp.float32), (kernel, kernel), (stride, stride),
                                    ((pad, pad), (pad, pad)))
  np.testing.assert_allclose(got, filter_gradient_by_loops(x, g.astype(np.float32), kernel, stride, pad),
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


def stride1_conv_by_loops(x, w, padding):
  """out[b, h, w] = sum over i, j of padded x[b, h + i, w + j, :] @ w[i, j], in float64."""
  (top, bottom), (left, right) = padding
  padded = np.pad(np.asarray(x, np.float64), ((0, 0), (top, bottom), (left, right), (0, 0)))
  kh, kw = w.shape[:2]
  out_h, out_w = padded.shape[1] - kh + 1, padded.shape[2] - kw + 1
  return sum(padded[:, i:i + out_h, j:j + out_w] @ np.asarray(w[i, j], np.float64)
             for i in range(kh) for j in range(kw))


@pytest.mark.parametrize("size,padding", [((8, 12), ((1, 1), (1, 1))), ((7, 9), ((1, 1), (1, 1))),
                                          ((9, 6), ((0, 2), (2, 0))), ((6, 7), ((0, 0), (0, 0)))])
def test_winograd_agrees_with_float64_as_closely_as_xla(size, padding):
  # Even and odd output sizes (an odd one crops the last 2x2 block), padding on one side only, and none.
  rng = np.random.default_rng(size[0])
  x = jnp.asarray(rng.normal(size=(2,) + size + (64,)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(3, 3, 64, 48)) / 24, jnp.float32)
  want = stride1_conv_by_loops(x, w, padding)
  ours = np.asarray(conv.winograd_conv3x3(x, w, padding), np.float64)
  xlas = np.asarray(lax.conv_general_dilated(x, w, (1, 1), padding, dimension_numbers=conv.NHWC), np.float64)
  assert ours.shape == want.shape
  ours_error, xla_error = np.abs(ours - want).max(), np.abs(xlas - want).max()
  assert ours_error < 3 * xla_error, (ours_error, xla_error)
  assert ours_error < 1e-6 * np.abs(want).max()


def test_winograd_filter_transform_and_its_adjoint_are_g_w_gt_and_gt_du_g():
  # The transform is written as sums of taps; here it is the matrix product of Lavin & Gray's G, in float64.
  rng = np.random.default_rng(5)
  g = np.asarray(conv.WINOGRAD_FILTER_TRANSFORM, np.float64)
  w = rng.normal(size=(3, 3, 5, 7)).astype(np.float32)
  u, pullback = jax.vjp(conv._winograd_filter, jnp.asarray(w))
  want = np.einsum("ik,klcd,jl->ijcd", g, w.astype(np.float64), g).reshape(16, 5, 7)
  np.testing.assert_allclose(u, want, rtol=1e-6, atol=1e-6)
  du = rng.normal(size=(16, 5, 7)).astype(np.float32)
  want_dw = np.einsum("ik,ijcd,jl->klcd", g, du.reshape(4, 4, 5, 7).astype(np.float64), g)
  np.testing.assert_allclose(pullback(jnp.asarray(du))[0], want_dw, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("size,padding", [((9, 10), ((1, 1), (1, 1))), ((8, 7), ((0, 2), (2, 0))),
                                          ((7, 8), ((0, 0), (0, 0)))])
def test_winograd_gradients_equal_the_direct_convolutions(size, padding):
  # Odd and even outputs, padding on one side only and none: the input gradient's tile adjoint crops the padding.
  rng = np.random.default_rng(3)
  (top, bottom), (left, right) = padding
  x = jnp.asarray(rng.normal(size=(2,) + size + (16,)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(3, 3, 16, 8)) / 12, jnp.float32)
  y, pullback = jax.vjp(lambda x, w: conv.winograd_conv3x3(x, w, padding), x, w)
  g = jnp.asarray(rng.normal(size=y.shape), jnp.float32)
  dx, dw = pullback(g)
  # The input gradient is the convolution of g, padded by 2 less the forward padding on each side, with the filter
  # turned 180 degrees and transposed.
  want_dx = stride1_conv_by_loops(g, np.asarray(w)[::-1, ::-1].transpose(0, 1, 3, 2),
                                  ((2 - top, 2 - bottom), (2 - left, 2 - right)))
  np.testing.assert_allclose(dx, want_dx, rtol=1e-5, atol=1e-5)
  padded = np.pad(np.asarray(x), ((0, 0), (top, bottom), (left, right), (0, 0)))
  np.testing.assert_allclose(dw, filter_gradient_by_loops(padded, np.asarray(g), 3, 1, 0), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("batch,size,channels,stride,dtype,padding,winograd", [
    (2, (32, 32), 128, 1, jnp.float32, 1, True), (1, (32, 63), 128, 1, jnp.float32, 1, False),
    (2, (32, 32), 127, 1, jnp.float32, 1, False), (1, (64, 64), 128, 2, jnp.float32, 1, False),
    (2, (32, 32), 256, 1, jnp.bfloat16, 1, False), (1, (50, 84), 512, 1, jnp.float32, 1, True),
    (2, (36, 36), 128, 1, jnp.float32, -1, False)])
def test_winograd_for_3x3_float32_convolutions_of_enough_channels_and_positions(batch, size, channels, stride, dtype,
                                                                                padding, winograd):
  # 2 x 32 x 32 is 2,048 output positions, the threshold; 32 x 63 is 2,016. Negative padding (a crop, 2 x 32 x 32
  # outputs of a 36 x 36 map) stays XLA's.
  x = jax.ShapeDtypeStruct((batch,) + size + (channels,), dtype)
  w = jax.ShapeDtypeStruct((3, 3, channels, 16), dtype)
  jaxpr = str(jax.make_jaxpr(lambda x, w: conv.conv_general_dilated(x, w, (stride, stride), ((padding, padding),) * 2,
                                                                    dimension_numbers=conv.NHWC))(x, w))
  assert ("conv_general_dilated" not in jaxpr) == winograd


def test_direct_convolutions_trace_no_winograd_and_count_the_direct_flops():
  x = jax.ShapeDtypeStruct((2, 32, 32, 128), jnp.float32)
  w = jax.ShapeDtypeStruct((3, 3, 128, 128), jnp.float32)

  def flops():  # a new function each time, so that JAX traces it anew
    f = jax.jit(lambda x, w: conv.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=conv.NHWC))
    return f.lower(x, w).cost_analysis()["flops"]

  winograd = flops()
  with conv.direct_convolutions():
    direct = flops()
  # XLA counts the taps that fall inside the map: along each axis 32 outputs x 3 taps, less 2 in the padding.
  assert direct == 2 * 2 * 128 * 128 * (32 * 3 - 2) ** 2
  # 16 products per 2x2 block instead of 36, plus the transforms' additions.
  assert 1 / 2.25 < winograd / direct < 1 / 2.0
  assert flops() == winograd


def test_winograd_of_several_maps_equals_each_maps_convolution_and_sums_the_filter_gradient():
  # Maps of different batch, size and parity share one filter; their tiles are stacked for one matmul per position.
  rng = np.random.default_rng(5)
  padding = ((1, 1), (1, 1))
  xs = tuple(jnp.asarray(rng.normal(size=shape), jnp.float32) for shape in [(2, 8, 10, 16), (2, 3, 5, 16),
                                                                            (1, 1, 1, 16)])
  w = jnp.asarray(rng.normal(size=(3, 3, 16, 8)) / 12, jnp.float32)
  outputs, pullback = jax.vjp(lambda xs, w: conv.winograd_conv3x3_maps(xs, w, padding), xs, w)
  for x, y in zip(xs, outputs):
    np.testing.assert_allclose(y, stride1_conv_by_loops(x, w, padding), rtol=1e-5, atol=1e-5)
  gs = tuple(jnp.asarray(rng.normal(size=y.shape), jnp.float32) for y in outputs)
  dxs, dw = pullback(gs)
  flipped = np.asarray(w)[::-1, ::-1].transpose(0, 1, 3, 2)
  for dx, g in zip(dxs, gs):
    np.testing.assert_allclose(dx, stride1_conv_by_loops(g, flipped, padding), rtol=1e-5, atol=1e-5)
  want_dw = sum(filter_gradient_by_loops(np.asarray(x), np.asarray(g), 3, 1, 1) for x, g in zip(xs, gs))
  np.testing.assert_allclose(dw, want_dw, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("sizes,winograd", [([(32, 32)], True), ([(31, 32)], False),
                                            ([(31, 32), (8, 8), (4, 4)], True), ([(16, 16), (8, 8)], False)])
def test_maps_take_winograd_together_when_their_positions_reach_the_threshold(sizes, winograd):
  # Batch 2: 2 x 32 x 32 is the threshold's 2,048 positions; 1,984 + 128 + 32 together reach it, 512 + 128 do not.
  xs = [jax.ShapeDtypeStruct((2,) + size + (128,), jnp.float32) for size in sizes]
  w = jax.ShapeDtypeStruct((3, 3, 128, 16), jnp.float32)
  jaxpr = str(jax.make_jaxpr(lambda xs, w: conv.conv_maps(xs, w, ((1, 1), (1, 1))))(xs, w))
  assert ("conv_general_dilated" not in jaxpr) == winograd
  assert ("custom_vjp" in jaxpr) == winograd


def test_maps_below_the_threshold_are_each_convolved_as_before():
  rng = np.random.default_rng(6)
  xs = [jnp.asarray(rng.normal(size=(1, n, n + 1, 8)), jnp.float32) for n in (6, 3)]
  w = jnp.asarray(rng.normal(size=(3, 3, 8, 4)), jnp.float32)
  for x, y in zip(xs, conv.conv_maps(xs, w, ((1, 1), (1, 1)))):
    np.testing.assert_array_equal(y, conv.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)),
                                                               dimension_numbers=conv.NHWC))


def test_a_materialized_cotangent_is_the_identity_through_a_conditional_xla_keeps():
  x = jnp.arange(6.0).reshape(2, 3)
  g = jnp.asarray([[1.0, -2.0, 3.0], [0.5, 0.0, 7.0]])
  value, pullback = jax.vjp(conv.materialize_cotangent, x)
  np.testing.assert_array_equal(value, x)
  np.testing.assert_array_equal(pullback(g)[0], g)
  # A NaN in the first element (which only a non-finite loss gives) makes the whole gradient NaN.
  assert np.isnan(pullback(g.at[0, 0].set(jnp.nan))[0]).all()
  # The gradient passes through a conditional in the compiled program, so that XLA:CPU materializes it.
  backward = jax.jit(lambda x, g: jax.vjp(lambda x: jnp.exp(conv.materialize_cotangent(x)), x)[1](g))
  assert "conditional(" in backward.lower(x, g).compile().as_text()

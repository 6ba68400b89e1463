"""Tests of the FPN and balanced feature pyramid necks and their PyTorch-rule resizing."""

import math

import flax.linen
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from libra_jax import convert
from libra_jax.models import layers
from libra_jax.models.bfp import BalancedFeaturePyramid
from libra_jax.models.fpn import FPN


def numpy_nearest(x, size):
  """PyTorch legacy nearest on NHWC, by the index rule src = floor(dst * in / out)."""
  out = np.zeros((x.shape[0], size[0], size[1], x.shape[3]), x.dtype)
  for i in range(size[0]):
    for j in range(size[1]):
      out[:, i, j] = x[:, int(math.floor(i * x.shape[1] / size[0])), int(math.floor(j * x.shape[2] / size[1]))]
  return out


def numpy_adaptive_max(x, size):
  """PyTorch adaptive max-pool on NHWC: window [floor(i n / m), ceil((i + 1) n / m))."""
  out = np.zeros((x.shape[0], size[0], size[1], x.shape[3]), x.dtype)
  for i in range(size[0]):
    r0, r1 = (i * x.shape[1]) // size[0], -(-((i + 1) * x.shape[1]) // size[0])
    for j in range(size[1]):
      c0, c1 = (j * x.shape[2]) // size[1], -(-((j + 1) * x.shape[2]) // size[1])
      out[:, i, j] = x[:, r0:r1, c0:c1].max(axis=(1, 2))
  return out


def test_resize_rules_by_hand():
  x = jnp.arange(5.0).reshape(1, 1, 5, 1)
  # 5 -> 3 windows: [0, 2), [1, 4), [3, 5) -> maxima 1, 3, 4.
  np.testing.assert_array_equal(layers.adaptive_max_pool(x, (1, 3))[0, 0, :, 0], [1, 3, 4])
  # 3 -> 5 nearest: sources floor(j * 3 / 5) = 0, 0, 1, 1, 2.
  y = jnp.arange(3.0).reshape(1, 1, 3, 1)
  np.testing.assert_array_equal(layers.resize_nearest(y, (1, 5))[0, 0, :, 0], [0, 0, 1, 1, 2])
  # Divisible sizes: a plain 2x2 max-pool.
  z = jnp.arange(16.0).reshape(1, 4, 4, 1)
  np.testing.assert_array_equal(layers.adaptive_max_pool(z, (2, 2))[0, :, :, 0], [[5, 7], [13, 15]])


@pytest.mark.parametrize("in_size,out_size", [((25, 38), (13, 19)), ((13, 19), (25, 38)), ((50, 76), (13, 19)),
                                              ((7, 10), (13, 19)), ((16, 24), (8, 12)), ((8, 12), (16, 24)),
                                              ((8, 12), (32, 48)), ((8, 12), (16, 48)), ((8, 12), (16, 19))])
def test_resize_rules_match_numpy_reference(in_size, out_size):
  x = np.random.default_rng(0).normal(size=(2,) + in_size + (3,)).astype(np.float32)
  np.testing.assert_array_equal(layers.resize_nearest(jnp.asarray(x), out_size), numpy_nearest(x, out_size))
  np.testing.assert_array_equal(layers.adaptive_max_pool(jnp.asarray(x), out_size), numpy_adaptive_max(x, out_size))


@pytest.mark.parametrize("out_size", [(16, 24), (32, 36), (13, 19)])
def test_resize_nearest_gradient_sums_each_pixels_copies(out_size):
  # By whole-number factors the resize is a broadcast and its gradient a sum, otherwise a gather and a
  # scatter-add; both must give every input pixel the sum of the weights of the outputs that copy it.
  rng = np.random.default_rng(1)
  x = rng.normal(size=(2, 8, 12, 3)).astype(np.float32)
  weights = rng.normal(size=(2,) + out_size + (3,)).astype(np.float32)
  gradient = jax.grad(lambda x: jnp.sum(layers.resize_nearest(x, out_size) * weights))(jnp.asarray(x))
  expected = np.zeros_like(x)
  for i in range(out_size[0]):
    for j in range(out_size[1]):
      expected[:, (i * 8) // out_size[0], (j * 12) // out_size[1]] += weights[:, i, j]
  np.testing.assert_allclose(gradient, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("window", [(2, 2), (4, 4), (2, 3)])
def test_window_max_pool_gradient_goes_to_each_tiles_first_maximum(window):
  # Small integers tie often inside a tile; PyTorch (and nn.max_pool's select_and_scatter) give the whole
  # gradient to the first maximum in row-major order, and so must the comparison-based backward.
  rng = np.random.default_rng(2)
  x = rng.integers(0, 3, size=(2, 4 * window[0], 3 * window[1], 5)).astype(np.float32)
  weights = rng.normal(size=(2, 4, 3, 5)).astype(np.float32)
  pooled = layers.window_max_pool(jnp.asarray(x), window)
  gradient = jax.grad(lambda x: jnp.sum(layers.window_max_pool(x, window) * weights))(jnp.asarray(x))
  expected_pooled = np.zeros_like(weights)
  expected = np.zeros_like(x)
  for b in range(2):
    for i in range(4):
      for j in range(3):
        for c in range(5):
          tile = x[b, i * window[0]:(i + 1) * window[0], j * window[1]:(j + 1) * window[1], c]
          row, col = divmod(int(np.argmax(tile)), window[1])
          expected_pooled[b, i, j, c] = tile.max()
          expected[b, i * window[0] + row, j * window[1] + col, c] = weights[b, i, j, c]
  np.testing.assert_array_equal(pooled, expected_pooled)
  np.testing.assert_array_equal(gradient, expected)
  reduce_window = jax.grad(lambda x: jnp.sum(flax.linen.max_pool(x, window, strides=window) * weights))
  np.testing.assert_array_equal(gradient, reduce_window(jnp.asarray(x)))


def test_bfp_gradients_equal_those_through_select_and_scatter(monkeypatch):
  # The whole pyramid (non-local block, pooling both ways, a P6 that does not divide) under the suite's XLA
  # settings: the comparison-based pooling gradient must give what nn.max_pool's own gradient gives.
  rng = np.random.default_rng(3)
  shapes = [(2, 32, 40, 8), (2, 16, 20, 8), (2, 8, 10, 8), (2, 4, 5, 8), (2, 2, 3, 8)]
  features = [jnp.asarray(rng.normal(size=shape), jnp.float32) for shape in shapes]
  weights = [jnp.asarray(rng.normal(size=shape), jnp.float32) for shape in shapes]
  module = BalancedFeaturePyramid()
  params = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape) * 0.1, jnp.float32),
                        module.init(jax.random.key(0), features))
  loss = lambda params, features: sum(jnp.sum(out * w) for out, w in zip(module.apply(params, features), weights))
  ours = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, features)
  monkeypatch.setattr(layers, "window_max_pool", lambda x, window: flax.linen.max_pool(x, window, strides=window))
  reference = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, features)
  for got, want in zip(jax.tree.leaves(ours), jax.tree.leaves(reference)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def params_from_state_dict(module, inputs, state_dict):
  target = jax.eval_shape(module.init, jax.random.key(0), inputs)
  variables, report = convert.state_dict_to_flax(state_dict, target)
  assert report.ok
  return variables


@pytest.mark.parametrize("case,refine_type", [("nonlocal_l2", "non_local"), ("none_l2", None), ("conv_l2", "conv")])
def test_bfp_matches_mmdetection_through_the_converter(load_ref, case, refine_type):
  ref = load_ref("bfp")
  inputs = [jnp.asarray(ref[f"{case}/in{i}"].transpose(0, 2, 3, 1)) for i in range(5)]
  module = BalancedFeaturePyramid(refine_level=int(ref[f"{case}/refine_level"]), refine_type=refine_type)
  prefix = f"{case}/param/"
  state_dict = {k[len(prefix):]: v for k, v in ref.items() if k.startswith(prefix)}
  variables = params_from_state_dict(module, inputs, state_dict) if state_dict else {}
  outputs = module.apply(variables, inputs)
  for i, out in enumerate(outputs):
    np.testing.assert_allclose(np.asarray(out).transpose(0, 3, 1, 2), ref[f"{case}/out{i}"], atol=1e-5, rtol=1e-5)


def test_bfp_default_init_is_identity_refinement(load_ref):
  ref = load_ref("bfp")
  assert float(ref["default_init_conv_out_weight_absmax"]) == 0.0
  inputs = [jnp.asarray(ref[f"nonlocal_l2/in{i}"].transpose(0, 2, 3, 1)) for i in range(5)]
  module = BalancedFeaturePyramid()
  variables = module.init(jax.random.key(0), inputs)
  refine = variables["params"]["refine"]
  assert not np.any(np.asarray(refine["conv_out"]["conv"]["kernel"]))
  np.testing.assert_allclose(np.std(refine["g"]["conv"]["kernel"]), float(ref["default_init_g_weight_std"]), rtol=0.2)
  # With conv_out zero the non-local block is the identity, so the output equals no refinement.
  plain = BalancedFeaturePyramid(refine_type=None).apply({}, inputs)
  for a, b in zip(module.apply(variables, inputs), plain):
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_bfp_odd_sizes_against_numpy():
  rng = np.random.default_rng(1)
  sizes = [(50, 76), (25, 38), (13, 19), (7, 10), (4, 5)]
  inputs = [rng.normal(size=(1,) + s + (4,)).astype(np.float32) for s in sizes]
  outputs = BalancedFeaturePyramid(refine_level=2, refine_type=None).apply({}, [jnp.asarray(x) for x in inputs])
  target = sizes[2]
  balanced = sum(numpy_adaptive_max(x, target) if i < 2 else numpy_nearest(x, target)
                 for i, x in enumerate(inputs)) / 5
  for i, (x, out) in enumerate(zip(inputs, outputs)):
    residual = numpy_nearest(balanced, sizes[i]) if i < 2 else numpy_adaptive_max(balanced, sizes[i])
    np.testing.assert_allclose(out, x + residual, atol=1e-5)


def test_bfp_rejects_bad_settings():
  inputs = [jnp.zeros((1, 8 // 2 ** i, 8 // 2 ** i, 2)) for i in range(3)]
  for kwargs in (dict(num_levels=5), dict(num_levels=3, refine_level=3), dict(num_levels=3, refine_type="gc")):
    with pytest.raises(ValueError):
      BalancedFeaturePyramid(**kwargs).init(jax.random.key(0), inputs)


def torch_style_conv(x_nchw, weight_oihw, bias, stride=1):
  pad = weight_oihw.shape[-1] // 2
  out = jax.lax.conv_general_dilated(x_nchw, weight_oihw, (stride, stride), [(pad, pad)] * 2,
                                     dimension_numbers=("NCHW", "OIHW", "NCHW"))
  return out + bias[None, :, None, None]


def reference_fpn(inputs_nchw, state_dict, start_level, num_outs, extra_on_input):
  """mmdetection's FPN forward written directly in NCHW with OIHW weights."""
  used = inputs_nchw[start_level:]
  conv = lambda name, x, stride=1: torch_style_conv(x, state_dict[f"{name}.conv.weight"],
                                                     state_dict[f"{name}.conv.bias"], stride)
  laterals = [conv(f"lateral_convs.{i}", x) for i, x in enumerate(used)]
  for i in range(len(laterals) - 1, 0, -1):
    size = laterals[i - 1].shape[2:]
    up = numpy_nearest(np.asarray(laterals[i]).transpose(0, 2, 3, 1), size).transpose(0, 3, 1, 2)
    laterals[i - 1] = laterals[i - 1] + up
  outs = [conv(f"fpn_convs.{i}", x) for i, x in enumerate(laterals)]
  for i in range(len(outs), num_outs):
    if extra_on_input:
      outs.append(conv(f"fpn_convs.{i}", used[-1] if i == len(used) else outs[-1], stride=2))
    else:
      outs.append(jax.lax.reduce_window(outs[-1], -jnp.inf, jax.lax.max, (1, 1, 1, 1), (1, 1, 2, 2), "VALID"))
  return outs


@pytest.mark.parametrize("start_level,extra", [(0, None), (1, "on_input")])
def test_fpn_matches_a_direct_nchw_implementation(start_level, extra):
  rng = np.random.default_rng(2)
  channels = (4, 6, 8, 10)
  # A 100 x 148 input: C2..C5 of 25x37, 13x19, 7x10, 4x5 (odd sizes on purpose).
  sizes = [(25, 37), (13, 19), (7, 10), (4, 5)]
  inputs = [rng.normal(size=(2,) + s + (c,)).astype(np.float32) for s, c in zip(sizes, channels)]
  module = FPN(out_channels=5, num_outs=5, start_level=start_level, add_extra_convs=extra)
  target = jax.eval_shape(module.init, jax.random.key(0), inputs)
  state_dict = {name: rng.normal(size=v.shape).astype(np.float32) * 0.3
                for name, v in convert.flax_to_state_dict(jax.tree.map(
                    lambda s: np.zeros(s.shape, s.dtype), target)).items()}
  variables, report = convert.state_dict_to_flax(state_dict, target)
  assert report.ok
  outputs = module.apply(variables, inputs)
  expected = reference_fpn([jnp.asarray(x.transpose(0, 3, 1, 2)) for x in inputs], state_dict, start_level, 5,
                           extra == "on_input")
  assert len(outputs) == 5
  for out, ref in zip(outputs, expected):
    np.testing.assert_allclose(np.asarray(out).transpose(0, 3, 1, 2), ref, atol=1e-4, rtol=1e-4)
  # P6 of Faster R-CNN is ceil(4 / 2) x ceil(5 / 2); RetinaNet's P7 is ceil(P6 / 2).
  assert outputs[-1].shape[1:3] == ((2, 3) if start_level == 0 else (1, 2))


def test_fpn_parameter_names_follow_mmdetection():
  inputs = [jnp.zeros((1, 16 // 2 ** i, 16 // 2 ** i, 4)) for i in range(4)]
  variables = jax.eval_shape(FPN(out_channels=8, start_level=1, add_extra_convs="on_input").init,
                             jax.random.key(0), inputs)
  names = set(convert.flax_to_state_dict(jax.tree.map(lambda s: np.zeros(s.shape), variables)))
  expected = {f"lateral_convs.{i}.conv.{p}" for i in range(3) for p in ("weight", "bias")}
  expected |= {f"fpn_convs.{i}.conv.{p}" for i in range(5) for p in ("weight", "bias")}
  assert names == expected
  with pytest.raises(ValueError, match="add_extra_convs"):
    FPN(add_extra_convs="on_output").init(jax.random.key(0), inputs)

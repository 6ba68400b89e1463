"""Tests of libra_jax.models.resnet: shapes, torchvision parity of names and counts, numerics."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from libra_jax.models import resnet

# torchvision totals (its model docs' ``num_params``, fc included) that validate the closed-form count below.
TORCHVISION_TOTALS = {
    (18, 1, 64): 11_689_512,
    (34, 1, 64): 21_797_672,
    (50, 1, 64): 25_557_032,
    (101, 1, 64): 44_549_160,
    (152, 1, 64): 60_192_808,
    (50, 32, 4): 25_028_904,  # resnext50_32x4d
    (101, 32, 8): 88_791_336,  # resnext101_32x8d
    (101, 64, 4): 83_455_272,  # resnext101_64x4d
}
# Written out independently of the module under test.
BLOCKS = {18: (False, (2, 2, 2, 2)), 34: (False, (3, 4, 6, 3)), 50: (True, (3, 4, 6, 3)),
          101: (True, (3, 4, 23, 3)), 152: (True, (3, 8, 36, 3))}


def closed_form_param_count(depth, groups, base_width, num_classes=None):
  """Conv weights plus BN (weight, bias) of a torchvision ResNet, fc added when num_classes is set."""
  bottleneck, blocks = BLOCKS[depth]
  total = 7 * 7 * 3 * 64 + 2 * 64
  in_ch = 64
  for stage, num_blocks in enumerate(blocks):
    planes = 64 * 2**stage
    width = planes * base_width // 64 * groups
    out_ch = planes * (4 if bottleneck else 1)
    for block in range(num_blocks):
      if bottleneck:
        total += in_ch * width + 9 * width * (width // groups) + width * out_ch + 2 * (2 * width + out_ch)
      else:
        total += 9 * in_ch * out_ch + 9 * out_ch * out_ch + 2 * (2 * out_ch)
      if block == 0 and (stage > 0 or in_ch != out_ch):
        total += in_ch * out_ch + 2 * out_ch
      in_ch = out_ch
  if num_classes is not None:
    total += in_ch * num_classes + num_classes
  return total


def count(tree):
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


def random_variables(model, shape, seed):
  """Variables of ``model`` for inputs of ``shape``, drawn in numpy (jax.random init compiles slowly on CPU).

  Kernels ~N(0, 2 / fan_in), BN scale and var ~U(0.5, 1.5), BN bias and mean ~N(0, 0.2).
  """
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = path[-1].key
    if name == "kernel":
      value = rng.normal(0.0, np.sqrt(2.0 / np.prod(leaf.shape[:-1])), leaf.shape)
    elif name in ("scale", "var"):
      value = rng.uniform(0.5, 1.5, leaf.shape)
    else:
      value = rng.normal(0.0, 0.2, leaf.shape)
    return jnp.asarray(value, jnp.float32)

  abstract = jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct(shape, jnp.float32))
  return jax.tree_util.tree_map_with_path(draw, abstract)


@pytest.mark.parametrize("depth,channels", [(18, (8, 16, 32, 64)), (50, (32, 64, 128, 256))])
def test_tiny_output_channels_and_strides(depth, channels):
  model = resnet.ResNet(depth, base_channels=8)
  x = jax.random.normal(jax.random.key(1), (2, 64, 96, 3))
  outputs = jax.jit(model.apply)(random_variables(model, x.shape, seed=0), x)
  assert len(outputs) == 4
  for out, ch, stride in zip(outputs, channels, (4, 8, 16, 32)):
    assert out.shape == (2, 64 // stride, 96 // stride, ch)
    assert out.dtype == jnp.float32
    assert np.all(np.isfinite(out))


def test_closed_form_count_reproduces_torchvision_totals():
  for (depth, groups, base_width), total in TORCHVISION_TOTALS.items():
    assert closed_form_param_count(depth, groups, base_width, num_classes=1000) == total
  # Backbone counts quoted in the design notes: total minus fc (2048 * 1000 + 1000 for bottlenecks).
  assert closed_form_param_count(50, 1, 64) == 25_557_032 - 2_049_000 == 23_508_032
  assert closed_form_param_count(101, 1, 64) == 44_549_160 - 2_049_000 == 42_500_160
  assert closed_form_param_count(18, 1, 64) == 11_689_512 - 513_000 == 11_176_512


@pytest.mark.parametrize("depth,groups,base_width,expected", [
    (18, 1, 64, 11_176_512),
    (50, 1, 64, 23_508_032),
    (101, 1, 64, 42_500_160),
    (101, 32, 4, 42_128_704),  # ResNeXt-101 32x4d
    (101, 64, 4, 81_406_272),  # ResNeXt-101 64x4d = torchvision 83,455,272 minus fc
])
def test_full_size_param_counts_and_shapes(depth, groups, base_width, expected):
  model = resnet.ResNet(depth, groups=groups, base_width=base_width)
  x = jax.ShapeDtypeStruct((1, 800, 1344, 3), jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  assert expected == closed_form_param_count(depth, groups, base_width)
  assert count(variables["params"]) == expected
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(variables))
  outputs = jax.eval_shape(model.apply, variables, x)
  expansion = 1 if depth < 50 else 4
  expected_shapes = [(1, 800 // s, 1344 // s, 64 * expansion * s // 4) for s in (4, 8, 16, 32)]
  assert [o.shape for o in outputs] == expected_shapes
  # The grouped 3x3 of the first bottleneck: inner width floor(64 * base_width / 64) * groups.
  if depth >= 50:
    width = base_width * groups
    assert variables["params"]["layer1"]["0"]["conv2"]["kernel"].shape == (3, 3, width // groups, width)


def test_tiny_resnext_width_scales_with_base_channels():
  # Like mmdetection's ResNeXt, base_width counts channels per group at planes == base_channels:
  # base_channels 8, 4 groups of 2 -> layer1 width floor(8 * 2 / 8) * 4 = 8, layer4 8 * 8 = 64.
  model = resnet.ResNet(50, groups=4, base_width=2, base_channels=8)
  x = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
  params = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
  assert params["layer1"]["0"]["conv2"]["kernel"].shape == (3, 3, 2, 8)
  assert params["layer4"]["0"]["conv2"]["kernel"].shape == (3, 3, 16, 64)


def torchvision_state_dict_keys(depth):
  """State-dict keys of torchvision's ResNet without fc and num_batches_tracked."""
  bottleneck, blocks = BLOCKS[depth]
  bn = ("weight", "bias", "running_mean", "running_var")
  keys = {"conv1.weight"} | {f"bn1.{n}" for n in bn}
  for stage, num_blocks in enumerate(blocks):
    for block in range(num_blocks):
      prefix = f"layer{stage + 1}.{block}"
      for i in range(1, 4 if bottleneck else 3):
        keys |= {f"{prefix}.conv{i}.weight"} | {f"{prefix}.bn{i}.{n}" for n in bn}
      if block == 0 and (stage > 0 or bottleneck):
        keys |= {f"{prefix}.downsample.0.weight"} | {f"{prefix}.downsample.1.{n}" for n in bn}
  return keys


@pytest.mark.parametrize("depth", [18, 50])
def test_param_paths_are_torchvision_names(depth):
  model = resnet.ResNet(depth)
  variables = jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32))
  rename = {("params", "kernel"): "weight", ("params", "scale"): "weight", ("params", "bias"): "bias",
            ("batch_stats", "mean"): "running_mean", ("batch_stats", "var"): "running_var"}
  names = set()
  for path in flax.traverse_util.flatten_dict(variables):
    names.add(".".join(path[1:-1] + (rename[path[0], path[-1]],)))
  assert names == torchvision_state_dict_keys(depth)
  # torchvision's state dicts hold 320 (ResNet-50) and 122 (ResNet-18) keys: minus fc's 2 and one
  # num_batches_tracked per BN (53 and 20).
  assert len(names) == (320 - 2 - 53 if depth == 50 else 122 - 2 - 20)


def numpy_conv(x, kernel, stride, groups=1):
  """PyTorch Conv2d in NHWC/HWIO: symmetric zero padding k // 2, grouped by contiguous channel blocks."""
  k = kernel.shape[0]
  pad = k // 2
  xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  out_h = (x.shape[1] + 2 * pad - k) // stride + 1
  out_w = (x.shape[2] + 2 * pad - k) // stride + 1
  cin, cout = x.shape[3] // groups, kernel.shape[3] // groups
  out = np.zeros((x.shape[0], out_h, out_w, kernel.shape[3]))
  for g in range(groups):
    for dy in range(k):
      for dx in range(k):
        patch = xp[:, dy:dy + stride * (out_h - 1) + 1:stride, dx:dx + stride * (out_w - 1) + 1:stride,
                   g * cin:(g + 1) * cin]
        out[..., g * cout:(g + 1) * cout] += patch @ kernel[dy, dx, :, g * cout:(g + 1) * cout]
  return out


def np_relu(x):
  return np.maximum(x, 0.0)


def numpy_bn(x, params, stats):
  return (x - stats["mean"]) / np.sqrt(stats["var"] + 1e-5) * params["scale"] + params["bias"]


def test_strided_bottleneck_matches_numpy_reference():
  block = resnet.Bottleneck(width=8, features=16, stride=2, groups=2, downsample=True)
  # Even height and width: 'SAME' would pad (0, 1) here instead of PyTorch's (1, 1).
  x = np.random.default_rng(0).normal(size=(2, 8, 10, 6)).astype(np.float32)
  variables = random_variables(block, x.shape, seed=1)
  out = block.apply(variables, x)
  p = jax.tree.map(lambda v: np.asarray(v, np.float64), variables["params"])
  s = jax.tree.map(lambda v: np.asarray(v, np.float64), variables["batch_stats"])
  y = np_relu(numpy_bn(numpy_conv(x, p["conv1"]["kernel"], 1), p["bn1"], s["bn1"]))
  y = np_relu(numpy_bn(numpy_conv(y, p["conv2"]["kernel"], 2, groups=2), p["bn2"], s["bn2"]))
  y = numpy_bn(numpy_conv(y, p["conv3"]["kernel"], 1), p["bn3"], s["bn3"])
  shortcut = numpy_bn(numpy_conv(x, p["downsample"]["0"]["kernel"], 2), p["downsample"]["1"],
                      s["downsample"]["1"])
  expected = np_relu(y + shortcut)
  assert out.shape == expected.shape == (2, 4, 5, 16)
  assert p["conv2"]["kernel"].shape == (3, 3, 4, 8)
  np.testing.assert_allclose(out, expected, atol=1e-4, rtol=1e-4)


def test_init_is_kaiming_fan_out_and_identity_batchnorm():
  block = resnet.Bottleneck(width=32, features=128, stride=2, groups=4, downsample=True)
  variables = jax.jit(block.init)(jax.random.key(0), jnp.zeros((1, 8, 8, 64)))
  params, stats = variables["params"], variables["batch_stats"]
  # PyTorch's fan_out is out_channels * kh * kw, groups notwithstanding.
  for kernel, fan_out in ((params["conv1"]["kernel"], 32), (params["conv2"]["kernel"], 32 * 9),
                          (params["conv3"]["kernel"], 128), (params["downsample"]["0"]["kernel"], 128)):
    assert kernel.dtype == jnp.float32
    assert abs(float(jnp.mean(kernel))) < 0.1 * np.sqrt(2.0 / fan_out)
    np.testing.assert_allclose(float(jnp.std(kernel)), np.sqrt(2.0 / fan_out), rtol=0.1)
  assert params["conv2"]["kernel"].shape == (3, 3, 8, 32)
  for bn_params, bn_stats in ((params["bn1"], stats["bn1"]), (params["bn3"], stats["bn3"]),
                              (params["downsample"]["1"], stats["downsample"]["1"])):
    np.testing.assert_array_equal(bn_params["scale"], 1.0)
    np.testing.assert_array_equal(bn_params["bias"], 0.0)
    np.testing.assert_array_equal(bn_stats["mean"], 0.0)
    np.testing.assert_array_equal(bn_stats["var"], 1.0)


def test_stem_max_pool_pads_one_with_minus_inf():
  # All values negative: zero padding would show up as zeros on the border.
  x = -(np.arange(64, dtype=np.float32).reshape(1, 8, 8, 1) + 1)
  out = np.asarray(resnet.stem_max_pool(jnp.asarray(x)))[0, :, :, 0]
  # Window of output (i, j) covers rows 2i-1..2i+1 and cols 2j-1..2j+1; the largest value sits at its
  # top-left corner inside the map.
  first = [0, 1, 3, 5]
  expected = -(np.array([[8 * r + c for c in first] for r in first], np.float32) + 1)
  np.testing.assert_array_equal(out, expected)
  assert resnet.stem_max_pool(jnp.zeros((1, 7, 9, 2))).shape == (1, 4, 5, 2)


def test_bfloat16_outputs_with_float32_params():
  x = jax.random.normal(jax.random.key(2), (1, 64, 64, 3))
  model32 = resnet.ResNet(50, base_channels=8)
  model16 = resnet.ResNet(50, base_channels=8, dtype=jnp.bfloat16)
  abstract = jax.eval_shape(model16.init, jax.random.key(0), x)
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(abstract))
  variables = random_variables(model16, x.shape, seed=2)
  ref = jax.jit(model32.apply)(variables, x)
  out = jax.jit(model16.apply)(variables, x)
  for o, r in zip(out, ref):
    assert o.dtype == jnp.bfloat16
    err = np.abs(np.asarray(o, np.float32) - np.asarray(r))
    assert err.max() <= 0.05 * np.abs(r).max()


def sq_loss(model, variables, x):
  def loss(params):
    outputs = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, x)
    return sum(jnp.sum(o.astype(jnp.float32) ** 2) for o in outputs)

  return jax.jit(jax.grad(loss))(variables["params"])


def any_nonzero(tree):
  return any(np.any(np.asarray(leaf) != 0) for leaf in jax.tree.leaves(tree))


def test_frozen_stages_get_exactly_zero_gradient():
  x = jax.random.normal(jax.random.key(3), (1, 32, 32, 3))
  frozen = resnet.ResNet(18, base_channels=8, frozen_stages=1)
  variables = random_variables(frozen, x.shape, seed=3)
  grads = sq_loss(frozen, variables, x)
  for name in ("conv1", "bn1", "layer1"):
    assert not any_nonzero(grads[name]), name
  for name in ("layer2", "layer3", "layer4"):
    assert any_nonzero(grads[name]), name
  grads = sq_loss(resnet.ResNet(18, base_channels=8, frozen_stages=-1), variables, x)
  for name in ("conv1", "bn1", "layer1", "layer2"):
    assert any_nonzero(grads[name]), name


def test_frozen_param_prefixes():
  assert resnet.frozen_param_prefixes(-1) == ()
  assert resnet.frozen_param_prefixes(0) == ("conv1", "bn1")
  assert resnet.frozen_param_prefixes(1) == ("conv1", "bn1", "layer1")
  assert resnet.frozen_param_prefixes(4) == ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4")
  assert resnet.ResNet(50).frozen_stages == 1
  with pytest.raises(ValueError, match="frozen_stages=5"):
    resnet.frozen_param_prefixes(5)


def test_batchnorm_uses_running_statistics_only():
  model = resnet.ResNet(18, base_channels=8)
  x = jax.random.normal(jax.random.key(4), (3, 32, 32, 3))
  variables = random_variables(model, x.shape, seed=5)
  apply = jax.jit(model.apply)
  batch = apply(variables, x)
  for i in range(3):
    single = apply(variables, x[i:i + 1])
    for b, s in zip(batch, single):
      np.testing.assert_allclose(b[i:i + 1], s, rtol=1e-5, atol=1e-5)
  shifted = dict(variables, batch_stats=jax.tree.map(lambda v: v + 0.5, variables["batch_stats"]))
  for b, s in zip(batch, apply(shifted, x)):
    assert not np.allclose(b, s)


def test_invalid_configs_raise():
  with pytest.raises(ValueError, match="depth=42"):
    resnet.ResNet(42)
  with pytest.raises(ValueError, match="groups=32"):
    resnet.ResNet(18, groups=32, base_width=4)
  with pytest.raises(ValueError, match="frozen_stages=-2"):
    resnet.ResNet(50, frozen_stages=-2)

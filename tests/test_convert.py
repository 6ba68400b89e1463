"""Tests of libra_jax.convert: layout rules, round trips, reports and file formats."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from libra_jax import convert
from libra_jax.models.bfp import BalancedFeaturePyramid
from libra_jax.models.fpn import FPN


class TinyNet(nn.Module):
  """A conv, a grouped conv, BatchNorm and a dense layer: every conversion rule."""

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(6, (3, 3), name="conv1")(x)
    x = nn.Conv(4, (1, 1), feature_group_count=2, use_bias=False, name="grouped")(x)
    x = nn.BatchNorm(use_running_average=True, name="bn1")(x)
    return nn.Dense(3, name="fc")(x.reshape(x.shape[0], -1))


def tiny_variables():
  variables = TinyNet().init(jax.random.key(0), jnp.ones((1, 4, 4, 2)))
  rng = np.random.default_rng(0)
  return jax.tree.map(lambda v: jnp.asarray(rng.normal(size=v.shape), v.dtype), variables)


def test_layout_rules():
  variables = tiny_variables()
  state_dict = convert.flax_to_state_dict(variables, prefix="net.")
  assert set(state_dict) == {"net.conv1.weight", "net.conv1.bias", "net.grouped.weight", "net.bn1.weight",
                             "net.bn1.bias", "net.bn1.running_mean", "net.bn1.running_var", "net.fc.weight",
                             "net.fc.bias"}
  kernel = np.asarray(variables["params"]["conv1"]["kernel"])  # [kh, kw, in, out]
  assert state_dict["net.conv1.weight"].shape == (6, 2, 3, 3)
  assert state_dict["net.conv1.weight"][5, 1, 0, 2] == kernel[0, 2, 1, 5]
  assert state_dict["net.grouped.weight"].shape == (4, 3, 1, 1)  # [out, in / groups, kh, kw]
  assert state_dict["net.fc.weight"].shape == (3, 4 * 4 * 4)
  np.testing.assert_array_equal(state_dict["net.bn1.running_var"], variables["batch_stats"]["bn1"]["var"])


def test_round_trip_is_the_identity():
  variables = tiny_variables()
  back, report = convert.state_dict_to_flax(convert.flax_to_state_dict(variables), variables)
  assert report.ok and report.converted == 9
  jax.tree.map(np.testing.assert_array_equal, back, dict(variables))
  # The same through the necks, whose names nest several levels deep.
  inputs = [jnp.ones((1, 16 // 2 ** i, 16 // 2 ** i, 4)) for i in range(4)]
  fpn = FPN(out_channels=4).init(jax.random.key(1), inputs)
  back, report = convert.state_dict_to_flax(convert.flax_to_state_dict(fpn), fpn)
  assert report.ok
  jax.tree.map(np.testing.assert_array_equal, back, dict(fpn))


def test_report_lists_missing_unexpected_and_mismatched():
  variables = tiny_variables()
  state_dict = convert.flax_to_state_dict(variables)
  del state_dict["conv1.bias"]
  state_dict["fc.weight"] = state_dict["fc.weight"][:, :5]
  state_dict["head.extra.weight"] = np.zeros(3)
  state_dict["bn1.num_batches_tracked"] = np.array(7)
  with pytest.raises(ValueError, match="conv1.bias"):
    convert.state_dict_to_flax(state_dict, variables)
  _, report = convert.state_dict_to_flax(state_dict, variables, strict=False)
  assert report.missing == ["conv1.bias"]
  assert report.unexpected == ["head.extra.weight"]
  assert report.mismatched == [("fc.weight", (3, 64), (3, 5))]
  assert not report.ok and "shape mismatch fc.weight" in str(report)
  _, report = convert.state_dict_to_flax(state_dict, variables, ignore_prefixes=("head.",), strict=False)
  assert report.unexpected == []


def test_prefix_selects_a_part_of_a_larger_state_dict():
  variables = tiny_variables()
  state_dict = convert.flax_to_state_dict(variables, prefix="backbone.")
  state_dict["neck.0.lateral_convs.0.conv.weight"] = np.zeros(1)
  back, report = convert.state_dict_to_flax(state_dict, variables, prefix="backbone.")
  assert report.ok
  jax.tree.map(np.testing.assert_array_equal, back, dict(variables))


def test_load_state_dict_formats(tmp_path):
  state_dict = convert.flax_to_state_dict(tiny_variables())
  np.savez(tmp_path / "weights.npz", **state_dict)
  loaded = convert.load_state_dict(tmp_path / "weights.npz")
  assert set(loaded) == set(state_dict)
  np.testing.assert_array_equal(loaded["conv1.weight"], state_dict["conv1.weight"])
  from safetensors.numpy import save_file
  save_file({k: np.ascontiguousarray(v) for k, v in state_dict.items()}, str(tmp_path / "weights.safetensors"))
  loaded = convert.load_state_dict(tmp_path / "weights.safetensors")
  np.testing.assert_array_equal(loaded["fc.weight"], state_dict["fc.weight"])
  with pytest.raises(FileNotFoundError, match="no checkpoint"):
    convert.load_state_dict(tmp_path / "absent.npz")
  (tmp_path / "weights.h5").write_bytes(b"")
  with pytest.raises(ValueError, match="unknown checkpoint format"):
    convert.load_state_dict(tmp_path / "weights.h5")


def test_bfp_through_the_converter_keeps_mmdetection_names():
  inputs = [jnp.ones((1, 32 // 2 ** i, 32 // 2 ** i, 8)) for i in range(5)]
  variables = BalancedFeaturePyramid().init(jax.random.key(0), inputs)
  names = set(convert.flax_to_state_dict(variables, prefix="neck.1."))
  assert names == {f"neck.1.refine.{part}.conv.{p}" for part in ("g", "theta", "phi", "conv_out")
                   for p in ("weight", "bias")}

"""Tests of libra_jax.convert: layout rules, round trips, reports and file formats."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from libra_jax import convert
from libra_jax.errors import DataError
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
  # A file cut short (an interrupted download) is named, with what to do.
  for name in ("weights.npz", "weights.safetensors"):
    whole = (tmp_path / name).read_bytes()
    (tmp_path / f"cut_{name}").write_bytes(whole[:len(whole) // 2])
    with pytest.raises(DataError, match=f"cut_{name}: cannot read it as a .* state dict .*download or export it"):
      convert.load_state_dict(tmp_path / f"cut_{name}")


def test_bfp_through_the_converter_keeps_mmdetection_names():
  inputs = [jnp.ones((1, 32 // 2 ** i, 32 // 2 ** i, 8)) for i in range(5)]
  variables = BalancedFeaturePyramid().init(jax.random.key(0), inputs)
  names = set(convert.flax_to_state_dict(variables, prefix="neck.1."))
  assert names == {f"neck.1.refine.{part}.conv.{p}" for part in ("g", "theta", "phi", "conv_out")
                   for p in ("weight", "bias")}


def torchvision_resnet18_state_dict(rng, base_channels=8):
  """Random tensors under torchvision's ResNet-18 names (with fc and BN counters), written by formula."""
  state_dict = {"conv1.weight": rng.normal(size=(base_channels, 3, 7, 7)), "fc.weight": rng.normal(size=(10, 64)),
                "fc.bias": rng.normal(size=(10,))}
  bn = lambda prefix, c: {f"{prefix}.weight": rng.normal(size=c), f"{prefix}.bias": rng.normal(size=c),
                          f"{prefix}.running_mean": rng.normal(size=c), f"{prefix}.running_var": rng.uniform(0.5, 2, c),
                          f"{prefix}.num_batches_tracked": np.array(100)}
  state_dict.update(bn("bn1", base_channels))
  in_channels = base_channels
  for stage in range(4):
    channels = base_channels * 2 ** stage
    for block in range(2):
      prefix = f"layer{stage + 1}.{block}"
      first_in = in_channels if block == 0 else channels
      state_dict[f"{prefix}.conv1.weight"] = rng.normal(size=(channels, first_in, 3, 3))
      state_dict[f"{prefix}.conv2.weight"] = rng.normal(size=(channels, channels, 3, 3))
      state_dict.update(bn(f"{prefix}.bn1", channels))
      state_dict.update(bn(f"{prefix}.bn2", channels))
      if block == 0 and (stage > 0):
        state_dict[f"{prefix}.downsample.0.weight"] = rng.normal(size=(channels, in_channels, 1, 1))
        state_dict.update(bn(f"{prefix}.downsample.1", channels))
    in_channels = channels
  return {k: np.asarray(v, np.float32) for k, v in state_dict.items()}


def test_import_torchvision_backbone(tiny_faster):
  _, variables = tiny_faster
  state_dict = torchvision_resnet18_state_dict(np.random.default_rng(0))
  new, report = convert.import_backbone(state_dict, variables)
  assert report.ok and report.converted == len([k for k in state_dict if not k.startswith("fc.") and
                                                not k.endswith("num_batches_tracked")])
  backbone = new["params"]["backbone"]
  np.testing.assert_array_equal(backbone["layer2"]["0"]["downsample"]["0"]["kernel"],
                                state_dict["layer2.0.downsample.0.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(new["batch_stats"]["backbone"]["layer4"]["1"]["bn2"]["var"],
                                state_dict["layer4.1.bn2.running_var"])
  # The rest of the detector is untouched.
  jax.tree.map(np.testing.assert_array_equal, new["params"]["rpn_head"], variables["params"]["rpn_head"])
  del state_dict["layer3.1.conv2.weight"]
  with pytest.raises(ValueError, match="layer3.1.conv2.weight"):
    convert.import_backbone(state_dict, variables)


def test_whole_detector_round_trip_gives_the_same_detections(tiny_faster, tmp_path):
  from support import synthetic_batch
  model, variables = tiny_faster
  batch = synthetic_batch()
  state_dict = convert.export_detector(variables)
  assert "roi_head.bbox_head.shared_fcs.0.weight" in state_dict and "neck.1.refine.g.conv.weight" in state_dict
  np.savez(tmp_path / "detector.npz", **state_dict)
  target = jax.eval_shape(lambda k, b: model.init(k, b, train=False), jax.random.key(1), batch)
  restored, report = convert.import_detector(convert.load_state_dict(tmp_path / "detector.npz"), target)
  assert report.ok and report.converted == len(state_dict)
  jax.tree.map(np.testing.assert_array_equal, restored, dict(variables))
  infer = jax.jit(lambda v, b: model.apply(v, b, train=False))
  a, b = infer(variables, batch), infer(restored, batch)
  np.testing.assert_array_equal(a.boxes, b.boxes)
  np.testing.assert_array_equal(a.scores, b.scores)

"""benchmarks/profile_step.py: every stage of the train step timed, and the stages are the step's own."""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import profile_step, trace_ops
from libra_jax import cli

pytestmark = pytest.mark.slow  # about twenty small programs compiled

SHAPES = "configs/shapes_libra_faster_rcnn.py"
TINY = ["--config.model.backbone.depth=18", "--config.model.backbone.base_channels=8",
        "--config.model.neck.out_channels=16", "--config.model.rpn.feat_channels=16",
        "--config.model.rcnn.fc_channels=32", "--config.model.train.rcnn.sampler.num=64"]


def test_every_stage_is_timed_and_the_staged_losses_are_the_models(tmp_path, capsys):
  argv = [f"--config={SHAPES}", *TINY, "--height=96", "--width=128", "--batch=2", "--repeats=1", "--json",
          f"--trace={tmp_path / 'trace'}"]
  assert profile_step.main(argv) == 0
  result = json.loads(capsys.readouterr().out)
  assert tuple(result["stages"]) == profile_step.STAGES
  for name in profile_step.STAGES:
    assert result["forward"][name] > 0, name
    assert result["stages"][name] == result["forward"][name] + result["backward"][name]
  assert all(result["backward"][name] == 0 for name in ("proposals", "rcnn_sampling", "optimizer"))
  conv = sum(result["stages"][name] for name in profile_step.CONV_STAGES)
  assert result["step_s"] > 0 and result["non_conv_fraction"] == pytest.approx(min(max(1 - conv / result["step_s"],
                                                                                       0), 1))
  # The timing process loaded every program that the compiling process had put in the cache.
  assert result["compiled_while_timing"] == 0
  # The stages, compiled one by one, compute the loss of the model's own forward pass (to float rounding).
  np.testing.assert_allclose(result["staged_loss"], result["model_loss"], rtol=1e-4)
  assert list(pathlib.Path(tmp_path / "trace").rglob("*.xplane.pb"))
  # The traced steps, by operation: the detector's convolutions ran, and the share is the others' over all.
  seconds = result["op_seconds"]
  assert set(seconds) == set(trace_ops.KINDS) and seconds["conv"] > 0 and seconds["dot"] > 0
  assert result["non_conv_fraction_ops"] == pytest.approx(seconds["other"] / sum(seconds.values()))
  # The same operation time by stage: every stage's scope marks operations of the step, and together with the
  # unscoped ones they are all of them.
  by_stage, unscoped = result["stage_op_seconds"], result["unscoped_op_seconds"]
  assert set(by_stage) == set(profile_step.STAGES) | {trace_ops.UNSCOPED}
  assert all(by_stage[name] > 0 for name in profile_step.STAGES), by_stage
  assert sum(by_stage.values()) == pytest.approx(sum(seconds.values()))
  assert set(unscoped) == set(trace_ops.KINDS) and sum(unscoped.values()) == pytest.approx(by_stage["unscoped"])
  conv = sum(by_stage[name] for name in profile_step.CONV_STAGES) + unscoped["conv"] + unscoped["dot"]
  assert result["non_conv_fraction_in_step"] == pytest.approx(1 - conv / sum(by_stage.values()))


def test_a_one_stage_detector_is_refused_in_one_line():
  with pytest.raises(cli.UsageError, match="this config's model.type is 'retinanet'"):
    profile_step.main(["--config=configs/retinanet_r50_fpn_1x_coco.py", "--repeats=1"])


def test_under_cache_keyed_by_metadata_a_program_keeps_its_own_op_names():
  # The suite's persistent compilation cache (conftest) keys a program without its source locations: the same
  # computation under another named scope loads the executable cached first, with that one's op_names.
  def under(scope):
    def step(x):
      with jax.named_scope(scope):
        return jnp.sin(x) * 3.0
    return step

  x = jnp.arange(4.0)
  jax.jit(under("first_scope")).lower(x).compile()
  assert "second_scope" not in jax.jit(under("second_scope")).lower(x).compile().as_text()
  with profile_step.cache_keyed_by_metadata():
    assert "second_scope" in jax.jit(under("second_scope")).lower(x).compile().as_text()

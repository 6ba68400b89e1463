"""Tests of the data-parallel train step, the optimizer and the schedule."""

import importlib.util
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from support import synthetic_batch
from libra_jax import runtime
from libra_jax.evaluation.predict_step import make_predict_step
from libra_jax.training import optim, step as step_lib

RUNNER = pathlib.Path(__file__).with_name("step_runner.py")


def run_steps(tmp_path, devices):
  out = tmp_path / f"params_{devices}.npz"
  flags = " ".join(filter(None, [os.environ.get("XLA_FLAGS"), f"--xla_force_host_platform_device_count={devices}"]))
  env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
  subprocess.run([sys.executable, str(RUNNER), str(out)], check=True, env=env, timeout=600)
  return dict(np.load(out))


@pytest.mark.slow
def test_four_devices_take_the_same_step_as_one(tmp_path):
  spec = importlib.util.spec_from_file_location("step_runner", RUNNER)
  runner = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(runner)
  one, four = runner.two_steps(), run_steps(tmp_path, 4)
  assert int(one["devices"]) == 1 and int(four["devices"]) == 4
  np.testing.assert_allclose(one["losses"], four["losses"], rtol=1e-5)
  names = [k for k in one if k.startswith("[")]
  assert len(names) > 50
  for name in names:
    np.testing.assert_allclose(one[name], four[name], rtol=1e-4, atol=1e-6, err_msg=name)
  # The predict step: with one image a device, the devices run the test-time head over different numbers of
  # chunks of proposal slots, and the detections are those of one device running the chunks all images need.
  np.testing.assert_array_equal(one["chunks_needed"], four["chunks_needed"])
  assert len(set(one["chunks_needed"].tolist())) > 1, one["chunks_needed"]
  assert np.all(one["detections.valid"].sum(axis=1) > 50)
  np.testing.assert_array_equal(one["detections.valid"], four["detections.valid"])
  np.testing.assert_array_equal(one["detections.classes"], four["detections.classes"])
  for name in ("detections.boxes", "detections.scores"):
    np.testing.assert_allclose(one[name], four[name], rtol=1e-4, atol=1e-4, err_msg=name)


def test_schedule_by_hand():
  schedule = optim.learning_rate_schedule(0.02, warmup_steps=500, warmup_ratio=0.001, milestones=(1000, 2000),
                                          gamma=0.1)
  # Warm-up: factor 0.001 + 0.999 * t / 500.
  np.testing.assert_allclose(schedule(0), 0.02 * 0.001, rtol=1e-6)
  np.testing.assert_allclose(schedule(250), 0.02 * (0.001 + 0.999 * 0.5), rtol=1e-6)
  np.testing.assert_allclose(schedule(500), 0.02, rtol=1e-6)
  np.testing.assert_allclose(schedule(999), 0.02, rtol=1e-6)
  np.testing.assert_allclose(schedule(1000), 0.002, rtol=1e-6)
  np.testing.assert_allclose(schedule(2500), 0.0002, rtol=1e-5)
  assert optim.scaled_base_lr(0.02, 16) == 0.02 and optim.scaled_base_lr(0.02, 2) == 0.0025



def test_run_config_values_follow_the_batch_and_overrides_stay_local():
  from configs import shapes_libra_faster_rcnn
  config = shapes_libra_faster_rcnn.get_config()
  # 2,000 images in batches of 8: 250 steps an epoch, 2 epochs, one evaluation at the end.
  assert (config.steps_per_epoch, config.total_steps, config.eval_every) == (250, 500, 500)
  config.eval_every = 100
  config.total_steps = 600
  assert (config.steps_per_epoch, config.total_steps, config.eval_every) == (250, 600, 100)
  config = shapes_libra_faster_rcnn.get_config()
  config.global_batch_size = 16
  assert (config.steps_per_epoch, config.total_steps, config.eval_every) == (125, 250, 250)


def sgd_config(**overrides):
  values = dict(lr_per_16=0.16, momentum=0.9, weight_decay=0.1, warmup_steps=0, warmup_ratio=1.0, milestone_epochs=(),
                gamma=0.1, grad_clip_norm=None)
  values.update(overrides)
  return ml_collections.ConfigDict(values)


def test_sgd_matches_pytorch_update_rule_and_freezes_masked_parameters():
  params = {"backbone": {"conv1": {"kernel": jnp.array([1.0])}, "layer2": {"w": jnp.array([2.0])}},
            "head": {"w": jnp.array([-1.0])}}
  grads = {"backbone": {"conv1": {"kernel": jnp.array([5.0])}, "layer2": {"w": jnp.array([0.5])}},
           "head": {"w": jnp.array([1.0])}}
  optimizer = optim.make_optimizer(sgd_config(), 16, 1, params, frozen_stages=1)
  state = optimizer.init(params)
  # PyTorch SGD: d = g + wd * p; buf = d (first step), then buf = 0.9 buf + d; p -= lr * buf.
  p, buf = 2.0, 0.0
  for _ in range(2):
    updates, state = optimizer.update(grads, state, params)
    params = jax.tree.map(lambda a, u: a + u, params, updates)
    d = 0.5 + 0.1 * p
    buf = 0.9 * buf + d
    p = p - 0.16 * buf
  np.testing.assert_allclose(params["backbone"]["layer2"]["w"], [p], rtol=1e-6)
  assert float(params["backbone"]["conv1"]["kernel"][0]) == 1.0  # frozen: no update, no decay


def test_gradient_clipping():
  params = {"head": {"w": jnp.array([0.0, 0.0])}}
  optimizer = optim.make_optimizer(sgd_config(weight_decay=0.0, momentum=0.0, lr_per_16=1.0, grad_clip_norm=1.0),
                                   16, 1, params, frozen_stages=-1)
  updates, _ = optimizer.update({"head": {"w": jnp.array([3.0, 4.0])}}, optimizer.init(params), params)
  np.testing.assert_allclose(updates["head"]["w"], [-0.6, -0.8], rtol=1e-6)


@pytest.fixture(scope="module")
def tiny_training(tiny_faster):
  model, variables = tiny_faster
  optimizer = optim.make_optimizer(sgd_config(lr_per_16=0.02, weight_decay=1e-4, warmup_steps=10,
                                              warmup_ratio=0.1), 2, 1, variables["params"], 1)
  mesh = runtime.make_mesh()

  def initial_state():
    # Fresh copies: the step donates its input state.
    params, batch_stats = jax.tree.map(jnp.array, (variables["params"], variables["batch_stats"]))
    state = step_lib.new_train_state({"params": params, "batch_stats": batch_stats}, optimizer, jax.random.key(1))
    return jax.device_put(state, runtime.replicated(mesh))

  return model, optimizer, mesh, initial_state, variables


def test_steps_keep_frozen_parts_compile_once_and_skip_nonfinite(tiny_training):
  model, optimizer, mesh, initial_state, variables = tiny_training
  train_step = step_lib.make_train_step(model, optimizer, mesh, skip_nonfinite=True)
  state = initial_state()
  for seed in range(3):
    state, metrics = train_step(state, jax.device_put(synthetic_batch(seed=seed), runtime.batch_sharding(mesh)))
    assert float(metrics["finite"]) == 1.0
  assert train_step._cache_size() == 1 and int(state.step) == 3
  for part in ("conv1", "bn1", "layer1"):
    jax.tree.map(np.testing.assert_array_equal, state.params["backbone"][part], variables["params"]["backbone"][part])
  jax.tree.map(np.testing.assert_array_equal, state.batch_stats, variables["batch_stats"])
  assert not np.array_equal(state.params["backbone"]["layer2"]["0"]["conv1"]["kernel"],
                            variables["params"]["backbone"]["layer2"]["0"]["conv1"]["kernel"])
  before = jax.tree.map(np.asarray, state.params)
  poisoned = synthetic_batch(seed=9)
  poisoned["image"] = poisoned["image"].at[0, 0, 0, 0].set(jnp.nan)
  state, metrics = train_step(state, jax.device_put(poisoned, runtime.batch_sharding(mesh)))
  assert float(metrics["finite"]) == 0.0 and int(state.skipped_steps) == 1 and int(state.step) == 4
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, state.params), before)
  # A second bucket shape compiles once more, and only once.
  for seed in range(2):
    state, _ = train_step(state, jax.device_put(synthetic_batch(seed=seed, height=160, width=128),
                                                runtime.batch_sharding(mesh)))
  assert train_step._cache_size() == 2


def test_predict_step_runs_on_the_mesh(tiny_training):
  model, _, mesh, initial_state, variables = tiny_training
  predict = make_predict_step(model, mesh)
  detections = predict(variables, jax.device_put(synthetic_batch(), runtime.batch_sharding(mesh)))
  expected = jax.jit(lambda v, b: model.apply(v, b, train=False))(variables, synthetic_batch())
  np.testing.assert_allclose(detections.scores, expected.scores, rtol=1e-5, atol=1e-6)

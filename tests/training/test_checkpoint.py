"""Tests of libra_jax.training.checkpoint: exact round trips and retention."""

import jax
import jax.numpy as jnp
import numpy as np

from libra_jax import runtime
from libra_jax.training import step as step_lib
from libra_jax.training.checkpoint import Checkpointer, abstract_like


def example_state(seed):
  rng = np.random.default_rng(seed)
  params = {"backbone": {"layer2": {"0": {"kernel": jnp.asarray(rng.normal(size=(3, 3, 2, 4)), jnp.float32)}}},
            "head": {"bias": jnp.asarray(rng.normal(size=(5,)), jnp.float32)}}
  return step_lib.TrainState(step=jnp.int32(seed), params=params, batch_stats={"bn": {"mean": jnp.ones(4)}},
                             opt_state=({"trace": jax.tree.map(jnp.zeros_like, params)},),
                             rng=jax.random.key_data(jax.random.key(seed)), skipped_steps=jnp.int32(0))


def test_round_trip_is_exact_and_lands_on_the_mesh(tmp_path):
  mesh = runtime.make_mesh()
  state = jax.device_put(example_state(3), runtime.replicated(mesh))
  checkpointer = Checkpointer(tmp_path, keep=2)
  checkpointer.save(3, state, {"input_position": 3})
  checkpointer.wait()
  restored, meta = checkpointer.restore(3, abstract_like(state))
  checkpointer.close()
  assert meta == {"input_position": 3}
  jax.tree.map(np.testing.assert_array_equal, restored, state)
  assert restored.params["head"]["bias"].sharding == runtime.replicated(mesh)


def test_keeps_the_last_steps_and_finds_the_latest(tmp_path):
  checkpointer = Checkpointer(tmp_path, keep=2)
  for step in (10, 20, 30):
    checkpointer.save(step, example_state(step), {"input_position": step})
  checkpointer.wait()
  assert checkpointer.latest_step() == 30 and sorted(checkpointer.all_steps()) == [20, 30]
  checkpointer.close()
  reopened = Checkpointer(tmp_path, keep=2)
  restored, _ = reopened.restore(reopened.latest_step(), abstract_like(example_state(0)))
  reopened.close()
  assert int(restored.step) == 30
  np.testing.assert_array_equal(restored.params["head"]["bias"], example_state(30).params["head"]["bias"])

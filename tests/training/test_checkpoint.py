"""Tests of libra_jax.training.checkpoint: exact round trips and retention."""

import logging
import os
import resource
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from support import largest_file
from libra_jax import runtime
from libra_jax.training import checkpoint, step as step_lib
from libra_jax.errors import UserError
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
  checkpointer.save(3, state, {"input_position": 3}, wait=True)
  restored, meta = checkpointer.restore(3, abstract_like(state))
  checkpointer.close()
  assert meta == {"input_position": 3}
  jax.tree.map(np.testing.assert_array_equal, restored, state)
  assert restored.params["head"]["bias"].sharding == runtime.replicated(mesh)


def test_keeps_the_last_steps_and_finds_the_latest(tmp_path):
  checkpointer = Checkpointer(tmp_path, keep=2)
  for step in (10, 20, 30):
    checkpointer.save(step, example_state(step), {"input_position": step}, wait=step == 30)
  assert checkpointer.latest_step() == 30 and sorted(checkpointer.all_steps()) == [20, 30]
  checkpointer.close()
  reopened = Checkpointer(tmp_path, keep=2)
  restored, _ = reopened.restore(reopened.latest_step(), abstract_like(example_state(0)))
  reopened.close()
  assert int(restored.step) == 30
  np.testing.assert_array_equal(restored.params["head"]["bias"], example_state(30).params["head"]["bias"])


def test_an_unreadable_latest_checkpoint_is_set_aside_for_the_one_before(tmp_path, caplog):
  checkpointer = Checkpointer(tmp_path, keep=3)
  for step in (10, 20):
    checkpointer.save(step, example_state(step), {"input_position": step}, wait=True)
  data = largest_file(tmp_path / "checkpoints" / "20" / "state")
  data.write_bytes(data.read_bytes()[:len(data.read_bytes()) // 2])
  with caplog.at_level(logging.WARNING):
    step, restored, meta = checkpointer.restore_latest(abstract_like(example_state(0)))
  assert step == 10 and meta == {"input_position": 10} and int(restored.step) == 10
  assert "the checkpoint of step 20" in caplog.text and "cannot be read" in caplog.text
  assert checkpointer.all_steps() == [10] and (tmp_path / "unreadable_checkpoints" / "20").is_dir()
  # The run goes on and saves step 20 again where the unreadable one was.
  checkpointer.save(20, example_state(20), {"input_position": 20}, wait=True)
  assert sorted(checkpointer.all_steps()) == [10, 20]
  checkpointer.close()


def test_the_model_alone_is_read_whatever_the_optimizer(tmp_path):
  checkpointer = Checkpointer(tmp_path, keep=1)
  state = example_state(7)
  checkpointer.save(7, state, {"input_position": 7}, wait=True)
  target = abstract_like({"params": state.params, "batch_stats": state.batch_stats})
  step, variables = checkpointer.restore_latest_model(target)
  checkpointer.close()
  assert step == 7 and sorted(variables) == ["batch_stats", "params"]
  jax.tree.map(np.testing.assert_array_equal, variables["params"], state.params)


def test_a_failed_background_save_stops_with_a_clear_error(tmp_path):
  # A file-size limit makes every large write fail as on a full disk ("File too large"), even for root.
  checkpointer = Checkpointer(tmp_path, keep=1)
  big = example_state(1).replace(params={"w": jnp.asarray(np.random.default_rng(0).random((512, 512)), jnp.float32)},
                                 opt_state=())
  soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
  resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, hard))
  try:
    checkpointer.save(1, big, {"input_position": 1})
    with pytest.raises(UserError, match=r"saving a checkpoint to .*checkpoints failed .*File too large.*stopped at "
                                        r"step \d+. Free space there"):
      for step in range(2, 600):  # the loop checks after every step; here a step is 50 ms
        checkpointer.check_for_errors(step)
        time.sleep(0.05)
  finally:
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
  checkpointer.manager.close()


def test_a_storage_errors_os_code_is_named_in_words():
  # TensorStore's text: the failed file, a long spec (cut out of the middle), then only the OS error's number.
  long = ValueError("OUT_OF_RANGE: Error writing \"params/w/.zarray\" " + "x" * 600 + " [os_error_code='28']")
  gist = checkpoint._gist(long)
  assert gist.startswith("ValueError: OUT_OF_RANGE: Error writing") and " ... " in gist and len(gist) < 450
  assert gist.endswith(f"[os_error_code='28'] ({os.strerror(28)})") and "No space left on device" in gist
  # Where the text already says it, it is not said twice.
  assert checkpoint._gist(OSError(f"{os.strerror(27)} [os_error_code=27]")).count(os.strerror(27)) == 1

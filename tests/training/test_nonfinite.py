"""A non-finite loss stops a run before its weights are saved or evaluated, or, when asked, is skipped."""

import os
import re

import pytest

from support import records, shapes_config, tiny_train_overrides
from libra_jax.training import loop

pytestmark = pytest.mark.slow  # two training runs in this process


def test_nonfinite_loss_stops_the_run_at_that_step_or_is_skipped(tmp_path, shapes_tfds_dir):
  config = shapes_config(tiny_train_overrides(shapes_tfds_dir, os.environ["JAX_COMPILATION_CACHE_DIR"],
                                              total_steps=6, log_every=1000))
  config.optim.update(lr_per_16=1e12, warmup_steps=0)
  with pytest.raises(loop.NonFiniteLossError, match=r"non-finite loss at step \d+ .*no checkpoint was saved yet") as stop:
    loop.train_and_evaluate(config, tmp_path / "stop")
  stopped_at = int(re.search(r"at step (\d+)", str(stop.value)).group(1))
  # Nothing of the bad weights was saved or evaluated, although step 4 saves and step 6 evaluates.
  assert not list((tmp_path / "stop").glob("eval_*.json")) and not list((tmp_path / "stop" / "checkpoints").iterdir())
  config.skip_nonfinite = True
  config.log_every = 1
  loop.train_and_evaluate(config, tmp_path / "skip")
  # The same run, skipping instead of stopping, flags its first non-finite loss at the step named above.
  flags = {r["step"]: r["finite"] for r in records(tmp_path / "skip")}
  assert stopped_at == min(step for step, finite in flags.items() if finite == 0.0)
  assert records(tmp_path / "skip")[-1]["skipped_steps"] > 0

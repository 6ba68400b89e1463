"""libra_jax.training.precompile: a CPU run's steps compiled in a fresh process, which the run then loads."""

import logging
import multiprocessing
import os
import pathlib
import re
import subprocess
import sys

import pytest

from libra_jax.errors import Stopped
from libra_jax.training import precompile
from libra_jax.training.preemption import StopRequest
from support import shapes_config, tiny_train_overrides

pytestmark = pytest.mark.slow  # a training run and two fresh processes

ROOT = pathlib.Path(__file__).resolve().parents[2]
PROGRAMS = ("jit_init_variables", "jit_per_device")  # the initialization; the train and the detection step
DONE = "train and detection steps in a fresh process; this one loads them from the cache"


def test_train_py_loads_every_step_that_the_fresh_process_compiled(tmp_path, shapes_tfds_dir):
  # A cache of its own, empty: every program is compiled once, and JAX reports each miss (the fresh process's on
  # the same stderr). The eval batch differs from the train batch, so a detection step compiled for the wrong one
  # would be a miss of the run's own.
  cache = tmp_path / "cache"
  overrides = tiny_train_overrides(shapes_tfds_dir, str(cache), total_steps=2, eval_every=2, eval_batch_size=2,
                                   precompile_in_fresh_process=True)
  result = subprocess.run([sys.executable, "train.py", f"--config={ROOT / 'configs/shapes_libra_faster_rcnn.py'}",
                           f"--workdir={tmp_path / 'run'}"] + [f"--config.{k}={v}" for k, v in overrides.items()],
                          cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, JAX_PLATFORMS="cpu", JAX_EXPLAIN_CACHE_MISSES="1"))
  assert result.returncode == 0, result.stderr[-3000:]
  before, done, after = result.stderr.partition(DONE)
  assert done, result.stderr[-3000:]
  missed = lambda text: sorted(re.findall(r"PERSISTENT COMPILATION CACHE MISS for '(%s)'" % "|".join(PROGRAMS), text))
  assert missed(before) == ["jit_init_variables", "jit_per_device", "jit_per_device"]  # one bucket
  assert missed(after) == []  # the run loaded all three
  assert sorted(path.name.split("-")[0] for path in cache.iterdir() if path.name.startswith(PROGRAMS)) == \
      ["jit_init_variables", "jit_per_device", "jit_per_device"]


def test_a_failure_in_the_fresh_process_is_a_warning_with_its_reason(tmp_path, shapes_tfds_dir, caplog):
  config = shapes_config(tiny_train_overrides(shapes_tfds_dir, str(tmp_path / "cache")))
  config.model.type = "no_such_detector"
  with caplog.at_level(logging.WARNING, logger=precompile.__name__):
    precompile.compile_in_fresh_process(config, tmp_path / "run", StopRequest())
  assert "compiling the run's programs in a fresh process failed" in caplog.text
  assert "no_such_detector" in caplog.text


def test_a_stop_request_ends_the_fresh_process_and_stops_the_run(tmp_path, shapes_tfds_dir):
  config = shapes_config(tiny_train_overrides(shapes_tfds_dir, str(tmp_path / "cache")))
  stop = StopRequest()
  stop.signal_name = "SIGTERM"  # as its handler records a signal
  with pytest.raises(Stopped, match="SIGTERM received while compiling the run's programs in a fresh process"):
    precompile.compile_in_fresh_process(config, tmp_path / "run", stop)
  assert not multiprocessing.active_children()
  assert not (tmp_path / "cache").exists()  # ended before it compiled anything

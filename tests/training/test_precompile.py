"""libra_jax.training.precompile: a CPU run's steps compiled in a fresh process, which the run then loads."""

import logging
import multiprocessing
import os
import pathlib
import re
import subprocess
import sys
import time

import pytest

from libra_jax import cli
from libra_jax.errors import Stopped
from libra_jax.training import precompile
from libra_jax.training.preemption import StopRequest
from support import shapes_config, tiny_train_overrides

pytestmark = pytest.mark.slow  # a training run and two fresh processes

ROOT = pathlib.Path(__file__).resolve().parents[2]
TESTS = ROOT / "tests"
PROGRAMS = ("jit_init_variables", "jit_per_device")  # the initialization; the train and the detection step
DONE = "train and detection steps in a fresh process; this one loads them from the cache"


def test_train_py_loads_every_step_that_the_fresh_process_compiled(tmp_path, shapes_tfds_dir):
  # A cache of its own, empty: every program is compiled once, and JAX reports each miss (the fresh process's on
  # the same stderr). The eval batch differs from the train batch, so a detection step compiled for the wrong one
  # would be a miss of the run's own.
  cache = tmp_path / "cache"
  overrides = tiny_train_overrides(shapes_tfds_dir, str(cache), total_steps=2, eval_every=2, eval_batch_size=2,
                                   precompile_in_fresh_process=True)
  command = [sys.executable, "train.py", f"--config={ROOT / 'configs/shapes_libra_faster_rcnn.py'}",
             f"--workdir={tmp_path / 'run'}"] + [f"--config.{k}={v}" for k, v in overrides.items()]
  train = lambda: subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600,
                                 env=dict(os.environ, JAX_PLATFORMS="cpu", JAX_EXPLAIN_CACHE_MISSES="1"))
  result = train()
  assert result.returncode == 0, result.stderr[-3000:]
  before, done, after = result.stderr.partition(DONE)
  assert done, result.stderr[-3000:]
  missed = lambda text: sorted(re.findall(r"PERSISTENT COMPILATION CACHE MISS for '(%s)'" % "|".join(PROGRAMS), text))
  assert missed(before) == ["jit_init_variables", "jit_per_device", "jit_per_device"]  # one bucket
  assert missed(after) == []  # the run loaded all three
  assert sorted(path.name.split("-")[0] for path in cache.iterdir() if path.name.startswith(PROGRAMS)) == \
      ["jit_init_variables", "jit_per_device", "jit_per_device"]

  again = train()  # the run is finished: it only evaluates, so no fresh process compiles its train step
  assert again.returncode == 0, again.stderr[-3000:]
  assert DONE not in again.stderr and "fresh process" not in again.stderr
  table = lambda output: output.rstrip().splitlines()[-2:]
  assert table(again.stdout) == table(result.stdout)  # the final model's metrics, as the first run printed them


def test_wanted_only_by_the_first_unfinished_run_of_a_process(monkeypatch, shapes_tfds_dir, tmp_path):
  config = shapes_config(tiny_train_overrides(shapes_tfds_dir, str(tmp_path / "cache"), total_steps=10,
                                              precompile_in_fresh_process=True))
  monkeypatch.setattr(precompile, "_runs_started", 0)
  assert not precompile.wanted(config, latest_step=10)  # finished: nothing to train
  monkeypatch.setattr(precompile, "_runs_started", 0)
  assert precompile.wanted(config, latest_step=9)
  assert not precompile.wanted(config, latest_step=None)  # a second run of this process
  monkeypatch.setattr(precompile, "_runs_started", 0)
  config.precompile_in_fresh_process = False
  assert not precompile.wanted(config, latest_step=None)


def test_the_fresh_process_imports_the_commands_import_modules(tmp_path, shapes_tfds_dir, monkeypatch, caplog):
  # The module records the process that imports it. The config then fails to build, which ends the fresh process
  # early: what matters is that it imported the module before it built anything.
  marker = tmp_path / "imported_by"
  (tmp_path / "precompile_test_module.py").write_text(
      f"import os\nwith open({str(marker)!r}, 'a') as f:\n  f.write(f'{{os.getpid()}}\\n')\n")
  monkeypatch.syspath_prepend(str(tmp_path))
  cli.import_modules(["precompile_test_module"])
  monkeypatch.delitem(sys.modules, "precompile_test_module")
  assert cli.imported_modules() == ("precompile_test_module",)
  config = shapes_config(tiny_train_overrides(shapes_tfds_dir, str(tmp_path / "cache")))
  config.model.type = "no_such_detector"
  with caplog.at_level(logging.WARNING, logger=precompile.__name__):
    precompile.compile_in_fresh_process(config, tmp_path / "run", StopRequest())
  assert "no_such_detector" in caplog.text  # it went on to build the model
  importers = marker.read_text().split()
  assert len(importers) == 2 and importers[0] == str(os.getpid()) and importers[1] != importers[0]


def _alive(pid: int) -> bool:
  try:
    state = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
  except FileNotFoundError:
    return False
  return state not in ("Z", "X")  # a zombie has ended; whether anyone reaps it is not ours to test


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the fresh process's end with its parent is Linux's")
def test_the_fresh_process_ends_when_the_training_process_is_killed(tmp_path, shapes_tfds_dir):
  # The training process imports a module that, in the fresh process only, says so and then sleeps: the fresh
  # process is then certainly past setting up its end with its parent, and would outlive a killed parent by
  # minutes without it.
  ready = tmp_path / "fresh_process_pid"
  (tmp_path / "precompile_sleeper.py").write_text(
      "import multiprocessing, os, pathlib, time\n"
      "if multiprocessing.parent_process() is not None:\n"
      f"  pathlib.Path({str(ready)!r}).write_text(str(os.getpid()))\n"
      "  time.sleep(120)\n")
  script = (f"import sys; sys.path[:0] = [{str(TESTS)!r}, {str(tmp_path)!r}]\n"
            "from support import shapes_config, tiny_train_overrides\n"
            "from libra_jax import cli\n"
            "from libra_jax.training import precompile\n"
            "from libra_jax.training.preemption import StopRequest\n"
            "cli.import_modules(['precompile_sleeper'])\n"
            f"config = shapes_config(tiny_train_overrides({shapes_tfds_dir!r}, {str(tmp_path / 'cache')!r}))\n"
            f"precompile.compile_in_fresh_process(config, {str(tmp_path / 'run')!r}, StopRequest())\n")
  parent = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.monotonic() + 120
  while not ready.exists() and time.monotonic() < deadline and parent.poll() is None:
    time.sleep(0.1)
  assert ready.exists(), "the fresh process never imported the module"
  time.sleep(0.2)  # the pid is written before the file is closed
  child = int(ready.read_text())
  parent.kill()
  parent.wait()
  deadline = time.monotonic() + 10
  while _alive(child) and time.monotonic() < deadline:
    time.sleep(0.1)
  assert not _alive(child)


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

"""benchmarks/bench_host_memory.py: its processes alternate the switch, its memory readings, its flag checks."""

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

from benchmarks import bench_host_memory
from libra_jax import cli, host_memory
from support import MALLOC_SETTING_VARIABLES

ROOT = pathlib.Path(__file__).resolve().parent.parent
ROW = dict(height=64, width=64, batch=1, config="faster_rcnn")


@pytest.mark.parametrize("previous", [None, "1"])
def test_processes_alternate_kept_and_declined_and_the_environment_is_restored(monkeypatch, previous):
  if previous is None:
    monkeypatch.delenv(host_memory.SWITCH_ENV, raising=False)
  else:
    monkeypatch.setenv(host_memory.SWITCH_ENV, previous)
  started = []

  def run_isolated(function, *args):
    started.append((function.__name__, os.environ.get(host_memory.SWITCH_ENV)))
    if function is bench_host_memory.steps_from_cache:
      return dict(keeps_freed_host_memory=os.environ[host_memory.SWITCH_ENV] == "1")
    return None

  monkeypatch.setattr(bench_host_memory.bench, "run_isolated", run_isolated)
  results = bench_host_memory.measure(ROW, steps=3, rounds=2)
  assert started == [("compile_into", previous)] + [("steps_from_cache", switch) for switch in ("1", "0", "1", "0")]
  assert [(r["round"], r["switch"], r["keeps_freed_host_memory"]) for r in results] == [
      (0, "1", True), (0, "0", False), (1, "1", True), (1, "0", False)]
  assert os.environ.get(host_memory.SWITCH_ENV) == previous


def test_the_environment_is_restored_when_a_process_fails(monkeypatch):
  monkeypatch.delenv(host_memory.SWITCH_ENV, raising=False)

  def run_isolated(function, *args):
    if function is bench_host_memory.steps_from_cache and os.environ[host_memory.SWITCH_ENV] == "0":
      raise RuntimeError("the worker died")
    return dict(keeps_freed_host_memory=True)

  monkeypatch.setattr(bench_host_memory.bench, "run_isolated", run_isolated)
  with pytest.raises(RuntimeError, match="the worker died"):
    bench_host_memory.measure(ROW, steps=3, rounds=1)
  assert host_memory.SWITCH_ENV not in os.environ


# A child process with glibc's own malloc reads its memory, as the benchmark's processes do, before, with and after
# a 268 MB buffer.
MEMORY_CHILD = textwrap.dedent("""
    import json
    import numpy as np
    from libra_jax import host_memory
    def memory():
      return {"rss": host_memory.resident_gb(), "peak": host_memory.peak_resident_gb()}
    before = memory()
    buffer = np.ones(64 * 2 ** 20, np.float32)
    during = memory()
    del buffer
    print(json.dumps([before, during, memory()]))
""")


@pytest.mark.skipif(not sys.platform.startswith("linux") or not host_memory.uses_glibc(),
                    reason="reads /proc/self/status; glibc returns a large freed block to the kernel")
def test_memory_readings_see_a_buffer_and_the_peak_outlives_it():
  env = {name: value for name, value in os.environ.items() if name not in MALLOC_SETTING_VARIABLES}
  result = subprocess.run([sys.executable, "-c", MEMORY_CHILD], capture_output=True, text=True, check=True,
                          cwd=ROOT, env=env)
  before, during, after = json.loads(result.stdout)
  assert during["rss"] - before["rss"] > 0.25
  # The buffer came from its own mmap and went back to the kernel with it; the peak remembers it.
  assert during["rss"] - after["rss"] > 0.25
  assert after["peak"] - after["rss"] > 0.25


@pytest.mark.parametrize("argv,environment,expected", [
    (["--steps=1"], {}, "--steps must be at least 2"),
    (["--rounds=0"], {}, "--rounds must be at least 1"),
    ([], {"JAX_PLATFORMS": "cuda"}, "JAX would compute on an accelerator here"),
    ([], {"MALLOC_ARENA_MAX": "2"}, "MALLOC_ARENA_MAX set in the environment: unset it"),
])
def test_a_bad_flag_or_environment_is_one_line(monkeypatch, capsys, argv, environment, expected):
  for name in MALLOC_SETTING_VARIABLES:
    monkeypatch.delenv(name, raising=False)
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv(host_memory.SWITCH_ENV, "0")  # this test process keeps glibc's malloc as it is
  for name, value in environment.items():
    monkeypatch.setenv(name, value)
  with pytest.raises(SystemExit) as exit_info:
    cli.run(bench_host_memory.main, argv)
  assert exit_info.value.code == 2
  lines = capsys.readouterr().err.strip().splitlines()
  assert len(lines) == 1 and expected in lines[0]

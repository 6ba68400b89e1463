"""benchmarks/bench_host_memory.py: its processes alternate the switch, its memory readings, its flag checks."""

import os
import sys

import numpy as np
import pytest

from benchmarks import bench_host_memory
from libra_jax import cli, host_memory

ROW = dict(height=64, width=64, batch=1, config="faster_rcnn")


def test_processes_alternate_kept_and_declined_and_the_environment_is_restored(monkeypatch):
  monkeypatch.setenv(host_memory.SWITCH_ENV, "1")
  started = []

  def run_isolated(function, *args):
    started.append((function.__name__, os.environ.get(host_memory.SWITCH_ENV)))
    if function is bench_host_memory.steps_from_cache:
      return dict(keeps_freed_host_memory=os.environ[host_memory.SWITCH_ENV] == "1")
    return None

  monkeypatch.setattr(bench_host_memory.bench, "run_isolated", run_isolated)
  results = bench_host_memory.measure(ROW, steps=3, rounds=2)
  assert started == [("compile_into", "1")] + [("steps_from_cache", switch) for switch in ("1", "0", "1", "0")]
  assert [(r["round"], r["switch"], r["keeps_freed_host_memory"]) for r in results] == [
      (0, "1", True), (0, "0", False), (1, "1", True), (1, "0", False)]
  assert os.environ[host_memory.SWITCH_ENV] == "1"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_memory_readings_see_a_touched_buffer():
  before = bench_host_memory.memory_gb()
  assert 0 < before["rss"] <= before["peak"]
  buffer = np.ones(64 * 2 ** 20, np.float32)  # 268 MB, every page written
  after = bench_host_memory.memory_gb()
  assert after["rss"] - before["rss"] > 0.25
  assert after["peak"] >= after["rss"]
  del buffer


@pytest.mark.parametrize("argv,expected", [
    (["--steps=1"], "--steps must be at least 2"),
    (["--rounds=0"], "--rounds must be at least 1"),
])
def test_a_bad_flag_is_one_line(monkeypatch, capsys, argv, expected):
  monkeypatch.setenv(host_memory.SWITCH_ENV, "0")  # this test process keeps glibc's malloc as it is
  with pytest.raises(SystemExit) as exit_info:
    cli.run(bench_host_memory.main, argv)
  assert exit_info.value.code == 2
  lines = capsys.readouterr().err.strip().splitlines()
  assert len(lines) == 1 and expected in lines[0]

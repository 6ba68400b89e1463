"""benchmarks/bench_compile.py: the two collector settings alternate in flipped order, each in its own process."""

import json

import pytest

from benchmarks import bench_compile, run
from libra_jax import cli

CONFIG = "--config=configs/shapes_libra_faster_rcnn.py"


def test_settings_alternate_and_each_gets_its_median(monkeypatch, capsys):
  calls = []

  def fake_compiled_row(row, config, cache_dir, pause_collector, compile):
    calls.append((pause_collector, compile))
    # The n-th cached compile takes n seconds; each cold one ten times the cached one after it.
    cached = sum(kind == "cached" for _, kind in calls) + (compile == "cold")
    return run.CompiledRow(None, 10.0 * cached if compile == "cold" else float(cached), None, None, None, False)

  monkeypatch.setattr(run, "run_isolated", lambda function, *args: function(*args))
  monkeypatch.setattr(run, "compiled_row", fake_compiled_row)
  assert bench_compile.main([CONFIG, "--height=64", "--width=96", "--batch=2", "--repeats=3", "--json"]) == 0
  result = json.loads(capsys.readouterr().out)
  # Per setting, cold then cached, each in its own (here: faked) process.
  assert calls == [(pause, kind) for pause in [False, True, True, False, False, True] for kind in ("cold", "cached")]
  assert [times["cached_s"] for times in result["runs"]["on"]] == [1.0, 4.0, 5.0]
  assert [times["cold_s"] for times in result["runs"]["paused"]] == [20.0, 30.0, 60.0]
  assert result["median_cached_s"] == {"on": 4.0, "paused": 3.0}
  assert (result["height"], result["width"], result["batch"]) == (64, 96, 2)


def test_no_repeats_is_a_usage_error():
  with pytest.raises(cli.UsageError, match="--repeats must be at least 1"):
    bench_compile.main([CONFIG, "--repeats=0"])

"""The work directory: one run at a time, the recorded config, and metrics that hold each step once."""

import json
import logging
import subprocess
import sys
import textwrap

import ml_collections
import pytest

from support import apply_overrides, summary_steps
from libra_jax.errors import UserError
from libra_jax.training.metrics import MetricWriter
from libra_jax.training.workdir import WorkdirLock, check_and_record_config, config_differences, flat_config

HOLD_LOCK = textwrap.dedent("""
    import sys, time
    from libra_jax.training.workdir import WorkdirLock
    lock = WorkdirLock(sys.argv[1])
    lock.acquire()
    print("holding", flush=True)
    time.sleep(600)
""")


def test_a_second_run_is_refused_and_a_dead_runs_lock_is_taken_over(tmp_path, caplog):
  holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(tmp_path)], stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "holding"
    with pytest.raises(UserError, match=rf"{tmp_path} is in use by another run \(pid {holder.pid} on host .*"
                                        rf"started .*\); wait for it to end"):
      WorkdirLock(tmp_path).acquire()
  finally:
    holder.kill()
    holder.wait()
  # Killed, the holder left its name in the lock file but no lock: the next run takes over and says so.
  lock = WorkdirLock(tmp_path)
  with caplog.at_level(logging.INFO):
    lock.acquire()
  assert f"no longer running (pid {holder.pid}" in caplog.text
  assert json.loads((tmp_path / "lock").read_text())["pid"] != holder.pid
  lock.release()
  assert (tmp_path / "lock").read_text() == ""


def run_config(**changes):
  config = ml_collections.ConfigDict({"global_batch_size": 4, "log_every": 50, "seed": 0,
                                      "data": {"buckets": ((96, 128), (128, 96)), "tfds_data_dir": "/a"},
                                      "model": {"num_classes": 3}})
  return apply_overrides(config, changes)


def test_differences_list_what_changes_shapes_schedule_or_data_and_nothing_else():
  saved = flat_config(run_config())
  assert saved["data.buckets"] == [[96, 128], [128, 96]]
  assert config_differences(saved, flat_config(run_config(log_every=1, **{"data.tfds_data_dir": "/b"}))) == []
  assert config_differences(saved, flat_config(run_config(global_batch_size=8, **{"model.num_classes": 4}))) == [
      "global_batch_size was 4, now 8", "model.num_classes was 3, now 4"]


def test_a_restart_with_another_config_is_refused_unless_allowed(tmp_path, caplog):
  check_and_record_config(run_config(), tmp_path, resumed_step=None, allow_changes=False)
  assert json.loads((tmp_path / "config.json").read_text())["global_batch_size"] == 4
  check_and_record_config(run_config(log_every=5), tmp_path, resumed_step=10, allow_changes=False)
  with pytest.raises(UserError, match=r"was started with another config: global_batch_size was 4, now 8; seed was "
                                      r"0, now 1\. Use the original values, .* --allow_config_change"):
    check_and_record_config(run_config(global_batch_size=8, seed=1), tmp_path, resumed_step=10,
                            allow_changes=False)
  with caplog.at_level(logging.WARNING):
    check_and_record_config(run_config(global_batch_size=8), tmp_path, resumed_step=10, allow_changes=True)
  assert "resuming at step 10 with a changed config: global_batch_size was 4, now 8" in caplog.text
  assert json.loads((tmp_path / "config.until_step_10.json").read_text())["global_batch_size"] == 4
  assert json.loads((tmp_path / "config.json").read_text())["global_batch_size"] == 8


def test_a_resumed_run_keeps_each_step_once(tmp_path):
  writer = MetricWriter(tmp_path)
  writer.write(-1, {"AP": 0.1}, kind="eval")
  for step in range(1, 7):
    writer.write(step, {"loss": 1.0 / step})
  writer.write(4, {"AP": 0.2}, kind="eval")
  writer.close()
  # Resumed from the checkpoint of step 3: steps 4..6 will be computed again.
  writer = MetricWriter(tmp_path, keep_until=3)
  for step in (4, 5):
    writer.write(step, {"loss": 2.0})
  writer.close()
  records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [(r["kind"], r["step"]) for r in records] == [("eval", -1)] + [("train", s) for s in range(1, 6)]
  assert [r["loss"] for r in records[1:]] == [1.0, 0.5, 1.0 / 3, 2.0, 2.0]
  assert summary_steps(tmp_path, "train/loss") == [1, 2, 3, 4, 5]
  assert summary_steps(tmp_path, "eval/AP") == [0]

"""End-to-end tests of the training loop and train.py on the shapes dataset with a tiny model.

(The non-finite loss runs are in test_nonfinite.py: a file of their own, so that the two pytest workers can
share out this file's long tests and those.)
"""

import json
import logging
import os
import pathlib
import resource
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from support import (assert_drawn_where_detected, largest_file, records, shapes_config, summary_steps,
                     tiny_train_overrides)
from libra_jax import cli, convert, diagnostics, host_memory, predict
from libra_jax.evaluation import driver
from libra_jax.models.detectors import build_detector
from libra_jax.training import loop

pytestmark = pytest.mark.slow  # training runs, in this process and as train.py

ROOT = pathlib.Path(__file__).resolve().parents[2]
TRAIN = str(ROOT / "train.py")
CONFIG = str(ROOT / "configs" / "shapes_libra_faster_rcnn.py")


@pytest.fixture(scope="module")
def dirs(shapes_tfds_dir):
  """The session's shapes dataset and compilation cache (shared with the other tests and the subprocesses)."""
  return shapes_tfds_dir, os.environ["JAX_COMPILATION_CACHE_DIR"]


# The temporary buffers the training loop asked host_memory.keep_if_affordable about, in bytes, in the trained run,
# and the compilations JAX logged while the loop measured them.
ASKED_ABOUT_HOST_MEMORY = []
COMPILED_WHILE_MEASURING = []


class _Records(logging.Handler):
  def __init__(self, records):
    super().__init__()
    self.records = records

  def emit(self, record):
    self.records.append(record.getMessage())


def temporary_bytes_without_compiling(*args):
  """``loop.temporary_bytes``, recording what JAX logs as compiled meanwhile."""
  handler, jax_logger = _Records(COMPILED_WHILE_MEASURING), logging.getLogger("jax")
  jax_logger.addHandler(handler)
  try:
    with jax.log_compiles(True):
      return TEMPORARY_BYTES(*args)
  finally:
    jax_logger.removeHandler(handler)


TEMPORARY_BYTES = loop.temporary_bytes


@pytest.fixture(scope="module")
def trained(dirs, tmp_path_factory):
  """A 40-step run of the tiny model, trained in this process: ``(overrides, config, workdir, final metrics)``.

  The run sees freed host memory as kept by default, as a command on the CPU does, and records what it asks
  ``host_memory.keep_if_affordable`` (which answers yes, leaving this process's malloc as it is)."""
  # One checkpoint, at the end: the tests read the final weights only.
  overrides = tiny_train_overrides(*dirs, total_steps=40, log_every=1, checkpoint_every=40,
                                   **{"optim.warmup_steps": 5, "optim.lr_per_16": 0.08})
  config = shapes_config(overrides)
  workdir = tmp_path_factory.mktemp("trained")
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(host_memory, "_kept_because", "by default")
    patch.setattr(host_memory, "keep_if_affordable", lambda n: ASKED_ABOUT_HOST_MEMORY.append(n) or True)
    patch.setattr(loop, "temporary_bytes", temporary_bytes_without_compiling)
    return overrides, config, workdir, loop.train_and_evaluate(config, workdir)


def test_classifiers_learn_and_metrics_are_written(trained):
  _, config, workdir, metrics = trained
  train = records(workdir)
  assert [r["step"] for r in train] == list(range(1, 41))
  for key in ("loss", "loss_rpn_cls", "loss_rpn_bbox", "loss_cls", "loss_bbox", "lr", "images_per_sec"):
    assert all(np.isfinite(r[key]) for r in train), key
  # Both classifiers learn: their losses fall well below where they started. (The total is no measure of
  # learning this early: as proposals find the objects, positives appear and the box losses grow from about 0.)
  for key in ("loss_rpn_cls", "loss_cls"):
    assert np.mean([r[key] for r in train[-10:]]) < 0.6 * train[0][key], key
  assert np.mean([r["num_pos_rois"] for r in train[-10:]]) > 2 * np.mean([r["num_pos_rois"] for r in train[:3]])
  # The first step's time, and the train step's compilations: one per bucket shape (one here), never more.
  [compiled] = records(workdir, "compile")
  assert compiled["step"] == 1 and compiled["first_step_seconds"] > 0 and compiled["train_step_compilations"] == 1
  assert [r["train_step_compilations"] for r in train] == [1] * len(train)
  # After the first step of its one image size, the loop asked whether keeping freed host memory is affordable,
  # giving the step's temporary buffer: XLA's analysis of the tiny model's step, tens to hundreds of MB. Measuring
  # it found the step's program, compiling nothing.
  assert len(ASKED_ABOUT_HOST_MEMORY) == 1 and 10e6 < ASKED_ABOUT_HOST_MEMORY[0] < 2e9
  assert not [m for m in COMPILED_WHILE_MEASURING if "ompil" in m], COMPILED_WHILE_MEASURING
  # The host's peak memory: it does not fall (but for the kernel's approximate counters, a few pages: one run read
  # 4.1227 then 4.1225 GB), and is never above getrusage's peak for this process now (which also counts the peak
  # of the process this one was started from).
  peaks = [r["host_memory_peak_gb"] for r in train]
  assert peaks[0] > 0.1 and all(later > earlier - 0.01 for earlier, later in zip(peaks, peaks[1:]))
  assert peaks[-1] <= resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
  evals = records(workdir, "eval")
  assert len(evals) == 1 and evals[0]["step"] == 40 and set(metrics) >= {"AP", "AP50", "AP75", "APs", "APm", "APl"}
  assert list(pathlib.Path(workdir).glob("events.out.tfevents.*"))
  assert json.loads((workdir / "eval_40.json").read_text()) == metrics
  results = json.loads((workdir / "results_40.json").read_text())
  assert all(set(r) == {"image_id", "category_id", "bbox", "score"} for r in results)
  # The balanced-learning diagnostics can take their candidates from this trained model.
  candidates = diagnostics.model_candidates(config, workdir, num_batches=2)
  assert len(candidates) == 8 and all(c[0] == 1.0 and np.all((c >= 0) & (c <= 1)) for c in candidates)
  histograms = diagnostics.negative_iou_histograms(candidates, num_negatives=20, num_draws=3)
  np.testing.assert_allclose(histograms["random"].sum(), 1.0)
  # Evaluation alone (train.py --mode=eval) of the latest checkpoint, and of the same weights exported as an
  # mmdetection-named state dict (--checkpoint=FILE), reproduces the metrics scored during training.
  assert driver.evaluate_checkpoint(config, workdir) == metrics
  weights = workdir / "exported.npz"
  model = build_detector(config.model)
  np.savez(weights, **convert.export_detector(jax.device_get(driver.load_trained_variables(config, model, workdir))))
  assert driver.evaluate_checkpoint(config, workdir / "from_file", str(weights)) == metrics
  # Prediction with the trained model draws its detections on the validation images.
  named = predict.read_eval_images(config.data, 3)
  found = predict.predict_images(config, driver.load_trained_variables(config, model, workdir), named,
                                 workdir / "predictions")
  assert [name for name, _ in named] == list(found) and sum(map(len, found.values())) > 0
  for name, image in named:
    assert_drawn_where_detected(image, workdir / "predictions" / f"{pathlib.Path(name).stem}.png", found[name])
  # --min_score keeps exactly the detections scoring at least that.
  threshold = float(np.median([d["score"] for dets in found.values() for d in dets]))
  confident = predict.predict_images(config, driver.load_trained_variables(config, model, workdir), named,
                                     workdir / "confident", min_score=threshold)
  assert confident == {name: [d for d in dets if d["score"] >= threshold] for name, dets in found.items()}


def run_train(workdir, overrides, wait=True, flags=(), **popen):
  args = [sys.executable, TRAIN, f"--config={CONFIG}", f"--workdir={workdir}", *flags]
  args += [f"--config.{k}={v}" for k, v in overrides.items()]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  if wait:
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=900, **popen)
  return subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, **popen)


def run_train_here(capsys, workdir, overrides, flags=()):
  """train.py's command in this process, for runs that stop before training: ``(exit status, stderr)``."""
  import train
  capsys.readouterr()
  with pytest.raises(SystemExit) as exited:
    cli.run(train.main, [f"--config={CONFIG}", f"--workdir={workdir}", *flags,
                         *[f"--config.{k}={v}" for k, v in overrides.items()]])
  return exited.value.code, capsys.readouterr().err


def wait_for(condition, process, seconds=600):
  deadline = time.time() + seconds
  while time.time() < deadline and not condition():
    assert process.poll() is None, "the run ended early: " + process.stderr.read()[-2000:]
    time.sleep(0.5)
  assert condition()


def checkpoint_steps(workdir):
  directory = pathlib.Path(workdir) / "checkpoints"
  return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()) if directory.is_dir() else []


def test_a_run_stopped_killed_and_damaged_ends_as_the_uninterrupted_one(tmp_path, trained, capsys):
  # The first 16 steps of the straight run: the learning rate's milestones are set in epochs, so total_steps
  # does not change the steps themselves.
  overrides, _, straight_dir, _ = trained
  overrides = dict(overrides, total_steps=16, checkpoint_every=4)
  workdir = tmp_path / "interrupted"
  # 1. Once a run holds the directory (before it compiles), a second run there stops at once and names it.
  process = run_train(workdir, overrides, wait=False)
  wait_for(lambda: (workdir / "lock").exists() and (workdir / "lock").read_text(), process)
  status, stderr = run_train_here(capsys, workdir, overrides)
  assert status == 1
  assert f"is in use by another run (pid {process.pid} on host" in stderr.strip().splitlines()[-1]
  # 2. SIGTERM mid-way: the run finishes its step, saves it and exits 0 with one line saying where.
  wait_for(lambda: (workdir / "metrics.jsonl").exists() and len(records(workdir)) >= 3, process)
  process.send_signal(signal.SIGTERM)
  _, stderr = process.communicate(timeout=300)
  assert process.returncode == 0, stderr[-2000:]
  last = stderr.strip().splitlines()[-1]
  stopped_at = int(last.split("checkpoint of step ")[1].split()[0])
  assert last == (f"stopped: SIGTERM received: saved the checkpoint of step {stopped_at} in "
                  f"{workdir / 'checkpoints'}; run the same command to resume")
  assert 3 <= stopped_at < 16 and stopped_at in checkpoint_steps(workdir)
  # 3. Resumed, then killed outright once it has saved a later checkpoint; that newest checkpoint is damaged too
  # (as by a save cut short).
  process = run_train(workdir, overrides, wait=False)
  wait_for(lambda: checkpoint_steps(workdir)[-1] > stopped_at, process)
  process.send_signal(signal.SIGKILL)
  process.wait()
  *_, fallback, newest = checkpoint_steps(workdir)
  data = largest_file(workdir / "checkpoints" / str(newest) / "state")
  data.write_bytes(data.read_bytes()[:data.stat().st_size // 2])
  # 4. The last restart warns, sets the damaged checkpoint aside, resumes from the one before and takes over the
  # lock the killed run left.
  resumed = run_train(workdir, overrides)
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert f"the checkpoint of step {newest} in" in resumed.stderr and "cannot be read" in resumed.stderr
  assert f"resumed from step {fallback}" in resumed.stderr and "took over" in resumed.stderr
  # A person watching sees the compilations and the evaluation's progress.
  for step_name in ("train step", "detection step"):
    assert f"compiling the {step_name} for 192x192 images" in resumed.stderr
    assert f"compiled the {step_name} for 192x192 images in" in resumed.stderr
  assert "evaluating" in resumed.stderr and "images/s" in resumed.stderr
  assert (workdir / "unreadable_checkpoints" / str(newest)).is_dir()
  # Through it all, train.py logs the losses of the uninterrupted run in this process, step for step, each step
  # once (what the killed run logged after its last readable checkpoint is replaced).
  expected = {r["step"]: r["loss"] for r in records(straight_dir)}
  steps = [r["step"] for r in records(workdir)]
  assert steps == list(range(1, 17)) and summary_steps(workdir, "train/loss") == steps
  assert all(r["loss"] == expected[r["step"]] for r in records(workdir))
  # 5. Started again with another model, the run stops at once and names what changed in the config ...
  status, stderr = run_train_here(capsys, workdir, dict(overrides, **{"model.rcnn.fc_channels": 48}))
  assert status == 1 and "Traceback" not in stderr
  last = stderr.strip().splitlines()[-1]
  assert last.startswith(f"error: the run in {workdir} was started with another config: ")
  assert "model.rcnn.fc_channels was 32, now 48" in last and "--allow_config_change" in last
  # ... and, allowed to go on, is stopped by the checkpoint itself, which names the first array that differs.
  status, stderr = run_train_here(capsys, workdir, dict(overrides, **{"model.rcnn.fc_channels": 48}),
                                  flags=["--allow_config_change"])
  assert status == 1 and "Traceback" not in stderr
  last = stderr.strip().splitlines()[-1]
  assert last.startswith("error: the checkpoint of step 16 in ") and "was saved by a different model" in last
  assert "params/roi_head/" in last and "32" in last and "48" in last and "more differences" in last


def test_fine_tuning_starts_from_a_whole_detector(tmp_path, trained):
  # The trained weights, from an mmdetection-named file (train.py) and from the run's work directory (in this
  # process), start a new run: its first loss is that of the trained model on batch 0, the same by both routes,
  # and clearly below the fresh model's loss on that same batch (the straight run's first step).
  overrides, config, straight_dir, _ = trained
  model = build_detector(config.model)
  weights = tmp_path / "trained.npz"
  np.savez(weights, **convert.export_detector(jax.device_get(driver.load_trained_variables(config, model,
                                                                                            straight_dir))))
  from_file = run_train(tmp_path / "from_file", dict(overrides, total_steps=1, init_checkpoint=weights))
  assert from_file.returncode == 0, from_file.stderr[-2000:]
  loop.train_and_evaluate(shapes_config(dict(overrides, total_steps=1, init_checkpoint=str(straight_dir))),
                          tmp_path / "from_dir")
  first = [records(tmp_path / name)[0]["loss"] for name in ("from_dir", "from_file")]
  assert first[0] == first[1] < 0.9 * records(straight_dir)[0]["loss"]

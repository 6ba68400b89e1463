"""End-to-end tests of the training loop and train.py on the shapes dataset with a tiny model."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from support import assert_drawn_where_detected, tiny_train_overrides
from libra_jax import convert, diagnostics, predict
from libra_jax.evaluation import driver
from libra_jax.models.detectors import build_detector
from libra_jax.training import loop

pytestmark = pytest.mark.slow  # training runs, in this process and as train.py

ROOT = pathlib.Path(__file__).resolve().parents[2]
TRAIN = str(ROOT / "train.py")
CONFIG = str(ROOT / "configs" / "shapes_libra_faster_rcnn.py")


def apply_overrides(config, values):
  for path, value in values.items():
    node = config
    *parents, key = path.split(".")
    for parent in parents:
      node = node[parent]
    node[key] = value
  return config


@pytest.fixture(scope="module")
def dirs(shapes_tfds_dir):
  """The session's shapes dataset and compilation cache (shared with the other tests and the subprocesses)."""
  return shapes_tfds_dir, os.environ["JAX_COMPILATION_CACHE_DIR"]


def load_config(**values):
  from configs import shapes_libra_faster_rcnn
  return apply_overrides(shapes_libra_faster_rcnn.get_config(), values)


def records(workdir, kind="train"):
  lines = (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()
  return [r for r in map(json.loads, lines) if r["kind"] == kind]


@pytest.fixture(scope="module")
def trained(dirs, tmp_path_factory):
  """A 40-step run of the tiny model, trained in this process: ``(overrides, config, workdir, final metrics)``."""
  overrides = tiny_train_overrides(*dirs, total_steps=40, log_every=1,
                             **{"optim.warmup_steps": 5, "optim.lr_per_16": 0.08})
  config = load_config(**overrides)
  workdir = tmp_path_factory.mktemp("trained")
  return overrides, config, workdir, loop.train_and_evaluate(config, workdir)


def test_loss_goes_down_and_metrics_are_written(trained):
  _, config, workdir, metrics = trained
  train = records(workdir)
  assert [r["step"] for r in train] == list(range(1, 41))
  for key in ("loss", "loss_rpn_cls", "loss_rpn_bbox", "loss_cls", "loss_bbox", "lr", "images_per_sec"):
    assert all(np.isfinite(r[key]) for r in train), key
  assert np.mean([r["loss"] for r in train[-10:]]) < 0.8 * np.mean([r["loss"] for r in train[:3]])
  # The first step's time, and the train step's compilations: one per bucket shape (one here), never more.
  [compiled] = records(workdir, "compile")
  assert compiled["step"] == 1 and compiled["first_step_seconds"] > 0 and compiled["train_step_compilations"] == 1
  assert [r["train_step_compilations"] for r in train] == [1] * len(train)
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


def test_nonfinite_loss_stops_the_run_or_is_skipped(tmp_path, dirs):
  config = load_config(**tiny_train_overrides(*dirs, total_steps=6))
  config.optim.update(lr_per_16=1e12, warmup_steps=0)
  with pytest.raises(loop.NonFiniteLossError, match="non-finite loss at or before step"):
    loop.train_and_evaluate(config, tmp_path / "stop")
  config.skip_nonfinite = True
  loop.train_and_evaluate(config, tmp_path / "skip")
  assert records(tmp_path / "skip")[-1]["skipped_steps"] > 0


def run_train(workdir, overrides, wait=True):
  args = [sys.executable, TRAIN, f"--config={CONFIG}", f"--workdir={workdir}"]
  args += [f"--config.{k}={v}" for k, v in overrides.items()]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  if wait:
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=900)
  return subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def test_killed_run_resumes_to_the_same_result(tmp_path, trained):
  overrides, _, straight_dir, _ = trained
  killed_dir = tmp_path / "killed"
  process = run_train(killed_dir, overrides, wait=False)
  deadline = time.time() + 600
  while time.time() < deadline and not list((killed_dir / "checkpoints").glob("8")):
    time.sleep(0.5)
  assert process.poll() is None, "the run ended before it could be killed"
  process.send_signal(signal.SIGKILL)
  process.wait()
  resumed = run_train(killed_dir, overrides)
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  # train.py, killed after its checkpoint of step 8 and started again, logs the losses of the same run in this
  # process, step for step, and scores the same AP.
  expected = {r["step"]: r["loss"] for r in records(straight_dir)}
  got = {r["step"]: r["loss"] for r in records(killed_dir)}
  assert set(got) == set(range(1, 41)) and all(got[step] == expected[step] for step in got)
  assert records(killed_dir, "eval")[-1]["AP"] == records(straight_dir, "eval")[-1]["AP"]
  # Started again with another model, the run stops at once and names the first array that differs.
  changed = run_train(killed_dir, dict(overrides, **{"model.rcnn.fc_channels": 48}))
  assert changed.returncode == 1 and "Traceback" not in changed.stderr
  last = changed.stderr.strip().splitlines()[-1]
  assert last.startswith("error: the checkpoint of step 40 in ") and "was saved by a different model" in last
  assert "params/roi_head/" in last and "32" in last and "48" in last and "more differences" in last

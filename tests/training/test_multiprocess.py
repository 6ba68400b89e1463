"""Several processes, one mesh: train.py as 2 processes x 2 CPU devices (gloo) against 1 process x 4 devices.

The data of a step depends on the device count only (``pipeline``), so the two
topologies train on the same batches: their losses, detections and COCO
metrics agree to float rounding, a training state saved by one process is
continued by two, and weights saved by two processes are evaluated by one.
"""

import json
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from support import records, tiny_train_overrides

pytestmark = pytest.mark.slow  # four train.py runs, six processes, each compiling the tiny detector

ROOT = pathlib.Path(__file__).resolve().parents[2]


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def launch(workdir: pathlib.Path, overrides, processes: int, devices_per_process: int, arguments=()):
  """Starts train.py (with ``arguments``) as ``processes`` processes of ``devices_per_process`` CPU devices each."""
  flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", ""))
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"{flags} --xla_force_host_platform_device_count={devices_per_process}")
  args = [sys.executable, str(ROOT / "train.py"), f"--config={ROOT / 'configs/shapes_libra_faster_rcnn.py'}",
          f"--workdir={workdir}", *arguments] + [f"--config.{k}={v}" for k, v in overrides.items()]
  if processes > 1:
    args += ["--config.distributed=True", f"--config.coordinator_address=127.0.0.1:{free_port()}",
             f"--config.num_processes={processes}"]
  started = []
  for index in range(processes):
    log = open(f"{workdir}.{index}.log", "w")
    started.append(subprocess.Popen(args + ([f"--config.process_id={index}"] if processes > 1 else []), env=env,
                                    stdout=log, stderr=subprocess.STDOUT, cwd=ROOT))
  return started


def finish(runs):
  for workdir, processes in runs.items():
    for index, process in enumerate(processes):
      assert process.wait(timeout=900) == 0, pathlib.Path(f"{workdir}.{index}.log").read_text()[-3000:]


def losses(workdir):
  return {r["step"]: {k: v for k, v in r.items() if k.startswith("loss")} for r in records(workdir, "train")}


def assert_same_losses(got, want, step):
  """Step 1 (the same weights) to float rounding. Later steps: the RPN losses to float rounding (their targets
  do not depend on the weights), the R-CNN ones to 1e-3 (their RoIs come from the proposals, where a near tie
  between two scores, resolved differently after the devices' gradients were summed in another order, may
  swap a proposal)."""
  for name in want:
    close = step == 1 or name.startswith("loss_rpn")
    np.testing.assert_allclose(got[name], want[name], rtol=2e-5 if close else 1e-3, err_msg=f"{name} step {step}")


def wait_for_step(workdir: pathlib.Path, step: int, processes, seconds: float = 600) -> None:
  """Waits until ``workdir``'s run has logged the training step ``step`` (its processes must keep running)."""
  deadline = time.time() + seconds
  while not ((workdir / "metrics.jsonl").exists() and any(r["step"] >= step for r in records(workdir, "train"))):
    assert time.time() < deadline, f"no step {step} within {seconds} s"
    assert all(p.poll() is None for p in processes), pathlib.Path(f"{workdir}.0.log").read_text()[-3000:]
    time.sleep(0.5)


@pytest.fixture(scope="module")
def workdirs(tmp_path_factory, shapes_tfds_dir):
  """``one``: 4 steps on 1 x 4 devices, a checkpoint at step 3. ``two``: 3 steps on 2 x 2 devices, evaluated there.
  Then each takes over the other's checkpoint of step 3: ``two_from_one`` trains on 2 x 2 devices from one's, set
  for 60 steps, and gets Ctrl-C on process 1 once it has logged step 5; ``one_evaluates_two`` evaluates two's on
  1 x 4 devices."""
  base = tmp_path_factory.mktemp("multiprocess")
  dirs = {name: base / name for name in ("one", "two", "two_from_one", "one_evaluates_two")}
  overrides = tiny_train_overrides(shapes_tfds_dir, os.environ["JAX_COMPILATION_CACHE_DIR"], total_steps=3,
                                   log_every=1, checkpoint_every=3)
  # The learning rate's milestones are set in epochs, so total_steps does not change the steps themselves.
  finish({dirs["one"]: launch(dirs["one"], dict(overrides, total_steps=4), 1, 4),
          dirs["two"]: launch(dirs["two"], overrides, 2, 2)})
  shutil.copytree(dirs["one"] / "checkpoints" / "3", dirs["two_from_one"] / "checkpoints" / "3")
  interrupted = launch(dirs["two_from_one"], dict(overrides, total_steps=60), 2, 2)
  evaluation = launch(dirs["one_evaluates_two"], overrides, 1, 4, ["--mode=eval", f"--checkpoint={dirs['two']}"])
  wait_for_step(dirs["two_from_one"], 5, interrupted)
  interrupted[1].send_signal(signal.SIGINT)
  finish({dirs["two_from_one"]: interrupted, dirs["one_evaluates_two"]: evaluation})
  return dirs


def test_two_processes_log_the_losses_of_one(workdirs):
  one, two = losses(workdirs["one"]), losses(workdirs["two"])
  assert sorted(one) == [1, 2, 3, 4] and sorted(two) == [1, 2, 3]
  for step in two:
    assert_same_losses(two[step], one[step], step)


def test_two_processes_detect_and_score_like_one(workdirs):
  # The same weights (two's step 3, saved by 2 processes) evaluated by 2 processes at the end of their run and by
  # 1 process from the checkpoint: with 2, each converts the detections of its own images, and process 0 writes
  # the gathered results. Each image gets the detections it gets on one process (a mix-up between images and
  # detections would show here), and the COCO metrics are the same.
  def by_image(path):
    images = {}
    for r in json.loads(path.read_text()):
      images.setdefault(r["image_id"], []).append((r["category_id"], r["score"], *r["bbox"]))
    return {image: np.array(sorted(rows)) for image, rows in images.items()}

  one, two = by_image(workdirs["one_evaluates_two"] / "results_-1.json"), by_image(workdirs["two"] / "results_3.json")
  assert len(one) == 16 and sorted(one) == sorted(two)
  for image in one:
    np.testing.assert_allclose(two[image], one[image], rtol=1e-4, atol=1e-4, err_msg=f"image {image}")
  [score_one], [score_two] = records(workdirs["one_evaluates_two"], "eval"), records(workdirs["two"], "eval")
  assert score_one["step"] == -1 and score_two["step"] == 3 and score_one.keys() == score_two.keys()
  for name in score_one:
    if name not in ("step", "kind"):
      assert score_two[name] == pytest.approx(score_one[name], abs=1e-6), name


def test_a_checkpoint_moves_between_one_and_two_processes(workdirs):
  # Two processes resumed one's whole training state at step 3 and took its step 4 on the same batch; one process
  # read the weights two processes saved (the test above).
  one, resumed = losses(workdirs["one"]), losses(workdirs["two_from_one"])
  assert min(resumed) == 4
  assert_same_losses(resumed[4], one[4], 4)


def test_a_signal_to_one_process_stops_all_at_one_step_with_a_checkpoint(workdirs):
  # Ctrl-C on process 1 goes through JAX's preemption service, as a SIGTERM would: both processes finish the
  # same step, save it together and exit 0.
  workdir = workdirs["two_from_one"]
  lines = [pathlib.Path(f"{workdir}.{i}.log").read_text().strip().splitlines()[-1] for i in range(2)]
  steps = {int(line.split("checkpoint of step ")[1].split()[0]) for line in lines}
  assert len(steps) == 1 and all(line.startswith("stopped: ") for line in lines), lines
  [step] = steps
  assert lines[1].startswith("stopped: SIGINT received") and 5 <= step < 60
  assert max(losses(workdir)) == step and max(int(p.name) for p in (workdir / "checkpoints").iterdir()) == step

"""Each command answers a user's mistake with one line on stderr and a non-zero exit.

Every tool runs for real, as a new process, once. train.py's other kinds of mistake run through its ``main``
in this process, under ``cli.run`` as ``python train.py`` does: the same parser, checks and one-line report,
without the seconds a new interpreter spends importing JAX and TensorFlow. The variants of each kind (every
config key, every kind of bad annotation or weights file) are tested in test_cli.py, test_convert.py and
test_unprepared.py.
"""

import concurrent.futures
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from support import tiny_train_overrides
from libra_jax import cli


ROOT = pathlib.Path(__file__).resolve().parents[1]
SHAPES = "configs/shapes_libra_faster_rcnn.py"


def folder_overrides(annotations, images, data_dir):
  """Overrides that train the shapes config on a COCO-format folder whose two splits share one annotation file."""
  return ["--config.data.dataset=coco_folder", f"--config.data.train_annotations={annotations}",
          f"--config.data.train_images={images}", f"--config.data.val_annotations={annotations}",
          f"--config.data.val_images={images}", f"--config.data.tfds_data_dir={data_dir}"]


def truncated_copy(source: pathlib.Path, target: pathlib.Path) -> str:
  data = source.read_bytes()
  target.write_bytes(data[:len(data) // 2])
  return str(target)


def cases(tmp: pathlib.Path, shapes_dir: str):
  """``name -> (argv, text the error line must contain)``; writes the files the cases need into ``tmp``."""
  (tmp / "afile").write_text("not a directory")
  images = tmp / "images"
  images.mkdir()
  (tmp / "invalid.json").write_text('{"images": [')
  np.savez(tmp / "whole.npz", **{f"w{i}": np.full((64, 64), i, np.float32) for i in range(4)})
  train = ["train.py", f"--config={SHAPES}", f"--workdir={tmp / 'run'}"]
  shapes_eval = train + ["--mode=eval", f"--config.data.tfds_data_dir={shapes_dir}"]
  return {
      "unknown_key": (train + ["--config.total_stepz=3"], "unknown config key total_stepz; did you mean total_steps?"),
      "missing_config": (["train.py", "--config=configs/absent.py", "--workdir=w"],
                         "config file configs/absent.py does not exist"),
      "zero_batch": (train + ["--config.global_batch_size=0"], "config.global_batch_size must be a positive integer"),
      "negative_batch": (train + ["--config.global_batch_size=-8"], "got -8"),
      "zero_log_every": (train + ["--config.log_every=0"], "config.log_every must be a positive integer"),
      "workdir_is_a_file": (["train.py", f"--config={SHAPES}", f"--workdir={tmp / 'afile'}"],
                            "is a file, not a directory"),
      "distributed_without_coordinator": (train + ["--config.distributed=True"],
                                          "config.distributed=True needs a coordinator"),
      "annotations_not_json": (train + folder_overrides(tmp / "invalid.json", images, tmp / "tfds"),
                               "invalid.json is not valid JSON"),
      "truncated_npz": (shapes_eval + [f"--checkpoint={truncated_copy(tmp / 'whole.npz', tmp / 'cut.npz')}"],
                        "cut.npz: cannot read it as a .npz state dict"),
      "checkpoint_in_train_mode": (train + [f"--checkpoint={tmp / 'whole.npz'}"], "--checkpoint goes with --mode=eval"),
      "init_checkpoint_in_eval_mode": (shapes_eval + [f"--config.init_checkpoint={tmp / 'whole.npz'}"],
                                       "--config.init_checkpoint goes with --mode=train"),
      "init_checkpoint_missing": (train + [f"--config.init_checkpoint={tmp / 'absent.npz'}"],
                                  "config.init_checkpoint="),
      "predict_missing_workdir": (["-m", "libra_jax.predict", f"--config={SHAPES}", f"--workdir={tmp / 'absent'}",
                                   "--out=o", "x.png"], "absent does not exist"),
      "inspect_bad_value": (["-m", "libra_jax.data.inspect", f"--config={SHAPES}", "--config.data.flip_prob=2.0"],
                            "data.flip_prob must be in [0, 1], got 2.0"),
      "summary_missing_config": (["-m", "libra_jax.tools.summary", "--config=configs/absent.py"], "does not exist"),
      "diagnostics_config_alone": (["-m", "libra_jax.diagnostics", f"--config={SHAPES}"],
                                   "--config and --workdir go together"),
      "ablation_unknown_loss": (["-m", "libra_jax.ablation", f"--workdir={tmp / 'ablation'}",
                                 "--config.model.rcnn.loss_bbox.name=tukey"], "unknown loss 'tukey'"),
      "bench_input_bad_batches": (["benchmarks/bench_input.py", "--batches=0"], "--batches must be at least 1"),
      "coco_eval_missing_annotations": (["-m", "libra_jax.evaluation.coco_eval", f"--annotations={tmp / 'gt.json'}",
                                         f"--results={tmp / 'invalid.json'}"], "gt.json does not exist"),
  }


# One per command, each run as a new process; train.py's other cases run through its main in this process.
SUBPROCESS = ["unknown_key", "predict_missing_workdir", "inspect_bad_value", "summary_missing_config",
              "diagnostics_config_alone", "ablation_unknown_loss", "bench_input_bad_batches",
              "coco_eval_missing_annotations"]
IN_PROCESS = ["missing_config", "zero_batch", "negative_batch", "zero_log_every", "workdir_is_a_file",
              "distributed_without_coordinator", "annotations_not_json", "truncated_npz", "checkpoint_in_train_mode",
              "init_checkpoint_in_eval_mode", "init_checkpoint_missing"]


def assert_one_line(status, stderr, expected):
  """A failure's exit status (1, or 2 for usage) and stderr: one ``error:`` line, the last, with ``expected``."""
  assert status in (1, 2), (status, stderr[-3000:])
  errors = [line for line in stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and expected in errors[0], stderr[-3000:]
  assert stderr.strip().splitlines()[-1] == errors[0]
  assert "Traceback" not in stderr


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory, shapes_tfds_dir):
  """Runs each SUBPROCESS case (two at a time: this machine has two cores); ``name -> (CompletedProcess, text)``."""
  table = cases(tmp_path_factory.mktemp("commands"), shapes_tfds_dir)
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
  env.pop("LIBRA_JAX_VERBOSE", None)

  def run(argv):
    return subprocess.run([sys.executable, *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)

  with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
    futures = {name: pool.submit(run, table[name][0]) for name in SUBPROCESS}
  return {name: (future.result(), table[name][1]) for name, future in futures.items()}


@pytest.mark.slow
@pytest.mark.parametrize("name", SUBPROCESS)
def test_a_mistake_gets_one_line(outcomes, name):
  result, expected = outcomes[name]
  assert_one_line(result.returncode, result.stderr, expected)


@pytest.mark.parametrize("name", IN_PROCESS)
def test_a_mistake_given_to_train_py_gets_one_line(name, tmp_path, shapes_tfds_dir, capsys, monkeypatch):
  import train
  argv, expected = cases(tmp_path, shapes_tfds_dir)[name]
  assert argv[0] == "train.py"
  monkeypatch.chdir(ROOT)
  monkeypatch.delenv("LIBRA_JAX_VERBOSE", raising=False)
  capsys.readouterr()
  with pytest.raises(SystemExit) as exited:
    cli.run(train.main, argv[1:])
  assert_one_line(exited.value.code, capsys.readouterr().err, expected)


def test_every_case_is_checked(tmp_path):
  assert sorted(cases(tmp_path, "unused")) == sorted(SUBPROCESS + IN_PROCESS)


@pytest.mark.slow
def test_verbose_shows_the_traceback(tmp_path):
  result = subprocess.run([sys.executable, "train.py", f"--config={SHAPES}", f"--workdir={tmp_path}",
                           "--config.log_every=0", "--verbose"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert result.returncode != 0 and "Traceback" in result.stderr and "ConfigError" in result.stderr


@pytest.mark.slow  # trains, as a new process
def test_a_failed_checkpoint_save_stops_training_with_one_line(tmp_path, shapes_tfds_dir):
  # A file-size limit makes the checkpoint's writes fail as on a full disk ("File too large"), even for root.
  import resource
  overrides = tiny_train_overrides(shapes_tfds_dir, os.environ["JAX_COMPILATION_CACHE_DIR"], total_steps=8,
                                   checkpoint_every=2)
  limit = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 18, resource.RLIM_INFINITY))
  result = subprocess.run([sys.executable, "train.py", f"--config={SHAPES}", f"--workdir={tmp_path / 'full'}"] +
                          [f"--config.{k}={v}" for k, v in overrides.items()], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env=dict(os.environ, JAX_PLATFORMS="cpu"), preexec_fn=limit)
  # Orbax and TensorStore print their own reports of the failed writes (some as the process exits, from other
  # threads, so one may land on the same line just before ours); the run's own word is one line.
  assert result.returncode == 1, result.stderr[-2000:]
  own = f"error: saving a checkpoint to {tmp_path / 'full' / 'checkpoints'} failed "
  [line] = [line[line.index(own):] for line in result.stderr.splitlines() if own in line] or [result.stderr[-2000:]]
  assert line.startswith(own) and "File too large" in line and "Free space there" in line, line

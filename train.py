"""Train and evaluate a detector: ``python train.py --config=configs/<name>.py --workdir=DIR``.

Command-line overrides reach any config value (``--config.global_batch_size=8``,
``--config.data.dataset=coco/2017``). Started again in the same work directory,
training resumes from the latest checkpoint. ``--mode=eval`` evaluates the
latest checkpoint of DIR, or ``--checkpoint=FILE`` (e.g. an mmdetection model),
without training.
"""

import logging
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

from absl import app, flags  # noqa: E402
from absl import logging as absl_logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics.jsonl and summaries.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval"], "Train (and evaluate), or only evaluate.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "With --mode=eval: a weights file to evaluate instead of "
                                  "the latest checkpoint of --workdir (.pth, .safetensors or .npz).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  absl_logging.set_verbosity(absl_logging.WARNING)
  logging.getLogger("libra_jax").setLevel(logging.INFO)
  config = _CONFIG.value
  if config.distributed:
    import jax
    jax.distributed.initialize()
  from libra_jax.training import loop
  if _MODE.value == "eval":
    metrics = loop.evaluate_checkpoint(config, _WORKDIR.value, _CHECKPOINT.value)
  else:
    metrics = loop.train_and_evaluate(config, _WORKDIR.value)
  print(loop.format_metrics(metrics))


if __name__ == "__main__":
  from libra_jax.training.loop import ConfigError, NonFiniteLossError
  try:
    app.run(main)
  except (ConfigError, FileNotFoundError, NonFiniteLossError) as error:
    sys.exit(f"error: {error}")

"""Train and evaluate a detector: ``python train.py --config=configs/<name>.py --workdir=DIR``.

Command-line overrides reach any config value (``--config.global_batch_size=8``,
``--config.data.dataset=coco/2017``). Started again in the same work directory,
training resumes from the newest readable checkpoint, with the config it was
started with (``--allow_config_change`` to resume with another). SIGTERM or
Ctrl-C saves a checkpoint and stops. ``--config.init_checkpoint=FILE_OR_DIR``
fine-tunes a whole detector's weights. ``--mode=eval`` evaluates the latest
checkpoint of DIR, or ``--checkpoint=FILE`` (e.g. an mmdetection model),
without training. A mistake prints one line (``--verbose`` for a traceback).
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

from libra_jax import cli  # noqa: E402


def main(argv) -> int:
  parser = cli.ArgumentParser(prog="train.py", description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", required=True, help="directory for checkpoints, metrics.jsonl and summaries")
  parser.add_argument("--mode", choices=("train", "eval"), default="train",
                      help="train (and evaluate), or only evaluate")
  parser.add_argument("--checkpoint", help="with --mode=eval: a weights file to evaluate instead of the latest "
                      "checkpoint of --workdir (.pth, .safetensors or .npz)")
  parser.add_argument("--allow_config_change", action="store_true",
                      help="with --mode=train: resume the run in --workdir although the config differs from the "
                           "one it was started with (the differences are logged)")
  args = parser.parse_args(argv)
  if args.checkpoint and args.mode != "eval":
    parser.error("--checkpoint goes with --mode=eval; to fine-tune from a detector's weights, pass "
                 "--config.init_checkpoint=FILE")
  if args.mode == "eval" and args.allow_config_change:
    parser.error("--allow_config_change goes with --mode=train")
  if args.mode == "eval" and args.config.get("init_checkpoint"):
    parser.error("--config.init_checkpoint goes with --mode=train; to evaluate a weights file, pass --checkpoint")
  cli.check_workdir(args.workdir)
  if args.config.distributed:
    from libra_jax import distributed
    distributed.initialize(args.config)
  from libra_jax.evaluation import driver
  from libra_jax.training import loop
  if args.mode == "eval":
    metrics = driver.evaluate_checkpoint(args.config, args.workdir, args.checkpoint)
  else:
    metrics = loop.train_and_evaluate(args.config, args.workdir, args.allow_config_change)
  print(driver.format_metrics(metrics))
  return 0


if __name__ == "__main__":
  cli.run(main)

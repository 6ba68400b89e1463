"""Train and evaluate a detector: ``python train.py --config=configs/<name>.py --workdir=DIR``.

Command-line overrides reach any config value (``--config.global_batch_size=8``,
``--config.data.dataset=coco/2017``). Started again in the same work directory,
training resumes from the latest checkpoint. ``--mode=eval`` evaluates the
latest checkpoint of DIR, or ``--checkpoint=FILE`` (e.g. an mmdetection model),
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
  args = parser.parse_args(argv)
  if args.checkpoint and args.mode != "eval":
    parser.error("--checkpoint goes with --mode=eval (training resumes from --workdir's own checkpoints)")
  cli.check_workdir(args.workdir)
  if args.config.distributed:
    from libra_jax import distributed
    distributed.initialize(args.config)
  from libra_jax.evaluation import driver
  from libra_jax.training import loop
  if args.mode == "eval":
    metrics = driver.evaluate_checkpoint(args.config, args.workdir, args.checkpoint)
  else:
    metrics = loop.train_and_evaluate(args.config, args.workdir)
  print(driver.format_metrics(metrics))
  return 0


if __name__ == "__main__":
  cli.run(main)

"""Are the three Libra parts complementary? Train the baseline, each part alone, and all three.

``python -m libra_jax.ablation --workdir=DIR [--steps N] [--config=FILE[:arg]] [--config.KEY=VALUE ...]``

Every row is the ``--config`` experiment, by default
``configs/shapes_libra_faster_rcnn.py:hard`` (the harder shapes variant: small
objects, clutter), with its overrides and with some Libra parts switched back
to the Faster R-CNN baseline's values of
``base_faster_rcnn.model_config(libra=False)``:

- IoU-balanced sampling: the R-CNN sampler (``"libra"`` or ``"random"``, with
  the shapes config's ``num`` and ``pos_fraction``) and the RPN sampler's
  ``neg_pos_ub`` (5 with Libra, -1 without, as in mmdetection's configs);
- balanced feature pyramid: ``model.neck.bfp`` (the BFP settings or None);
- balanced L1 loss: ``model.rcnn.loss_bbox`` (``balanced_l1`` or ``l1``).

All rows share the seed, the data order and the schedule. ``--steps N``
stretches or compresses the config's schedule in time: the warm-up, the
learning-rate drop and the end all move by ``N / config.total_steps``, so the
drop keeps its place (3/4 of training in the shapes config), and each row is
evaluated once, at the end. The default is the config's own schedule, 500
steps of 8 images (warm-up 100 steps, drop at 375): at about 10 images/s on
two CPU cores, plus compilation and evaluation, a row takes about 8 minutes
and the five rows about 40.

Row ``<slug>`` trains in ``DIR/<slug>`` through ``train_and_evaluate``. Started
again, the ablation reads the metrics of rows that have their final
``eval_<N>.json`` and resumes the others from their latest checkpoints (use a
new DIR for another ``N``). It writes ``DIR/ablation.md`` (the table, also
printed), ``DIR/ablation.png`` (a bar chart of the six COCO APs) and
``DIR/ablation.json`` (the metrics per row).
"""

import copy
import json
import os
import pathlib
from typing import Dict, FrozenSet, List, NamedTuple, Optional, Sequence, Tuple

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import ml_collections  # noqa: E402

from configs import base_faster_rcnn  # noqa: E402
from libra_jax import cli, config_loader  # noqa: E402
from libra_jax.training import loop  # noqa: E402

DEFAULT_STEPS = 500
DEFAULT_CONFIG = f"{config_loader.REPO_ROOT / 'configs' / 'shapes_libra_faster_rcnn.py'}:hard"
METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
# The three parts, in the paper's order, with their column names in the table.
PARTS = (("sampling", "IoU-balanced sampling"), ("bfp", "balanced feature pyramid"), ("loss", "balanced L1"))


class Row(NamedTuple):
  """One trained variant: its directory name, its label in the table, the Libra parts it has on."""
  slug: str
  label: str
  parts: FrozenSet[str]


ROWS = (
    Row("baseline", "baseline", frozenset()),
    Row("iou_balanced_sampling", "+ IoU-balanced sampling", frozenset({"sampling"})),
    Row("balanced_feature_pyramid", "+ balanced feature pyramid", frozenset({"bfp"})),
    Row("balanced_l1_loss", "+ balanced L1 loss", frozenset({"loss"})),
    Row("libra", "all three (Libra)", frozenset({"sampling", "bfp", "loss"})),
)


def switch_off(model: ml_collections.ConfigDict, part: str) -> None:
  """Sets the settings of Libra ``part`` in ``model`` (a ``config.model``) to the baseline's."""
  baseline = base_faster_rcnn.model_config(libra=False)
  if part == "sampling":
    sampler = model.train.rcnn.sampler
    model.train.rcnn.sampler = dict(baseline.train.rcnn.sampler, num=sampler.num, pos_fraction=sampler.pos_fraction)
    model.train.rpn.sampler.neg_pos_ub = baseline.train.rpn.sampler.neg_pos_ub
  elif part == "bfp":
    model.neck.bfp = baseline.neck.bfp
  elif part == "loss":
    model.rcnn.loss_bbox = baseline.rcnn.loss_bbox
  else:
    raise ValueError(f"unknown Libra part {part!r}; use one of {[name for name, _ in PARTS]}")


def scale_schedule(config: ml_collections.ConfigDict, steps: int) -> None:
  """Makes ``config`` train ``steps`` steps with warm-up and milestones at the same fractions of training."""
  factor = steps / config.total_steps
  config.optim.warmup_steps = round(config.optim.warmup_steps * factor)
  config.optim.milestone_epochs = tuple(epoch * factor for epoch in config.optim.milestone_epochs)
  config.total_steps = steps


def row_config(row: Row, steps: int = DEFAULT_STEPS,
               base: Optional[ml_collections.ConfigDict] = None) -> ml_collections.ConfigDict:
  """``base`` (the shapes-hard Libra config by default) with the parts ``row`` lacks switched off, for ``steps``."""
  config = copy.deepcopy(base if base is not None else config_loader.load_config(DEFAULT_CONFIG))
  config.unlock()
  for part, _ in PARTS:
    if part not in row.parts:
      switch_off(config.model, part)
  scale_schedule(config, steps)
  return config


def finished_metrics(workdir: pathlib.Path, steps: int) -> Optional[Dict[str, float]]:
  """The metrics of ``workdir/eval_<steps>.json``, or None if that run has not finished."""
  path = workdir / f"eval_{steps}.json"
  return json.loads(path.read_text()) if path.is_file() else None


def run_header(workdir, steps: int, config: ml_collections.ConfigDict) -> str:
  """The line above the table: the command, and the data, schedule and seed every row shares."""
  return (f"`python -m libra_jax.ablation --workdir={workdir} --steps={steps}`: {config.data.dataset}, "
          f"{config.total_steps} steps of {config.global_batch_size} images per row, seed {config.seed}, "
          f"COCO metrics on `{config.data.eval_split}`.")


def run_ablation(workdir, steps: int = DEFAULT_STEPS,
                 base: Optional[ml_collections.ConfigDict] = None) -> List[Tuple[Row, Dict[str, float]]]:
  """Trains (or reads) every row in ``workdir/<slug>`` and writes the table, chart and JSON.

  Returns ``(row, COCO metrics)`` pairs in ``ROWS`` order.
  """
  workdir = pathlib.Path(workdir)
  base = base if base is not None else config_loader.load_config(DEFAULT_CONFIG)
  results = []
  for index, row in enumerate(ROWS, 1):
    config = row_config(row, steps, base)
    row_dir = workdir / row.slug
    metrics = finished_metrics(row_dir, config.total_steps)
    if metrics is None:
      print(f"[{index}/{len(ROWS)}] {row.label}: training {config.total_steps} steps in {row_dir}", flush=True)
      metrics = loop.train_and_evaluate(config, row_dir)
    else:
      print(f"[{index}/{len(ROWS)}] {row.label}: finished before, metrics from {row_dir}", flush=True)
    results.append((row, metrics))
  header = run_header(workdir, steps, config)
  table = write_markdown(workdir / "ablation.md", results, header)
  write_chart(workdir / "ablation.png", results)
  write_json(workdir / "ablation.json", results, header)
  print(table)
  return results


def _cell(value: float) -> str:
  """A COCO metric for the table; pycocotools' -1 (no object of that size) shows as n/a."""
  return f"{value:.3f}" if value >= 0 else "n/a"


def markdown_table(results: Sequence[Tuple[Row, Dict[str, float]]]) -> str:
  """One line per row: the label, a check mark per Libra part it has, and the six APs."""
  columns = ["variant"] + [title for _, title in PARTS] + list(METRICS)
  lines = ["| " + " | ".join(columns) + " |",
           "|---|" + ":-:|" * len(PARTS) + "--:|" * len(METRICS)]
  for row, metrics in results:
    cells = [row.label] + ["✓" if part in row.parts else "" for part, _ in PARTS]
    cells += [_cell(metrics[name]) for name in METRICS]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def write_markdown(path, results: Sequence[Tuple[Row, Dict[str, float]]], header: str) -> str:
  """Writes the title, ``header`` and the table to ``path``; returns the table."""
  table = markdown_table(results)
  pathlib.Path(path).write_text(f"# Libra R-CNN ablation\n\n{header}\n\n{table}\n")
  return table


def write_chart(path, results: Sequence[Tuple[Row, Dict[str, float]]]) -> None:
  """Writes a PNG of grouped bars: one group per COCO metric, one bar per row (n/a drawn as 0)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  width = 0.8 / len(results)
  fig, ax = plt.subplots(figsize=(10, 4.5))
  for index, (row, metrics) in enumerate(results):
    offsets = [m + (index - (len(results) - 1) / 2) * width for m in range(len(METRICS))]
    ax.bar(offsets, [max(metrics[name], 0.0) for name in METRICS], width=width, label=row.label)
  ax.set_xticks(range(len(METRICS)), METRICS)
  ax.set(ylabel="COCO metric", ylim=(0, 1), title="Libra R-CNN parts, alone and together")
  ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=len(results), frameon=False)
  ax.grid(alpha=0.3, axis="y")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def write_json(path, results: Sequence[Tuple[Row, Dict[str, float]]], header: str) -> None:
  """Writes ``{"run": header, "rows": [{"slug", "label", "parts", "metrics"}, ...]}`` to ``path``."""
  rows = [{"slug": row.slug, "label": row.label, "parts": sorted(row.parts), "metrics": metrics}
          for row, metrics in results]
  pathlib.Path(path).write_text(json.dumps({"run": header, "rows": rows}, indent=1))


def main(argv) -> int:
  parser = cli.ArgumentParser(prog="python -m libra_jax.ablation", description=__doc__.split("\n")[0],
                              config="optional", default_config=DEFAULT_CONFIG)
  parser.add_argument("--workdir", required=True, help="one subdirectory per row, plus ablation.md/.png/.json")
  parser.add_argument("--steps", type=int, default=DEFAULT_STEPS,
                      help=f"training steps per row (default {DEFAULT_STEPS}); the warm-up and the learning-rate "
                      f"drop keep their place in training")
  args = parser.parse_args(argv)
  if args.steps < 1:
    parser.error(f"--steps must be at least 1, got {args.steps}")
  parent = pathlib.Path(args.workdir).resolve().parent
  if not parent.is_dir():
    parser.error(f"--workdir {args.workdir}: its parent directory {parent} does not exist")
  cli.check_workdir(args.workdir)
  run_ablation(args.workdir, args.steps, args.config)
  return 0


if __name__ == "__main__":
  cli.run(main)

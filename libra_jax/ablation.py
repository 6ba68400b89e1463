"""Are the three Libra parts complementary, and by more than the noise? The ablation, with seeds, and loss sweeps.

``python -m libra_jax.ablation --workdir=DIR [--steps=N] [--seeds=K] [--config=FILE[:arg]] [--config.KEY=VALUE ...]``
``python -m libra_jax.ablation --workdir=DIR --loss_bbox=balanced_l1,smooth_l1,l1,giou[,name:key=value...]
[--import=mymodule] [--steps=N] [--seeds=K]``

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

The ablation trains the rows of two tables: each part alone against the
baseline and all three, and the paper's cumulative order (baseline, + IoU-
balanced sampling, + the balanced feature pyramid, + balanced L1). With
``--loss_bbox`` it instead trains the Libra model once per R-CNN box loss (a
registered name, optionally with hyper-parameters; ``--import`` loads a module
that registers more).

``--seeds=K`` trains every row with the config's seed and the K - 1 after it.
A seed sets the initialization, the data order and the sampling, and every
row shares them within a seed, so rows are compared seed by seed: the tables
give each metric's mean ± standard deviation over the seeds and each row's
paired AP difference from the reference row (the baseline, the row above in
the cumulative table, or the first loss) with a 95% Student-t interval
(``seed_statistics``), in bold where it excludes 0.

All rows share the schedule. ``--steps N`` stretches or compresses the
config's schedule in time: the warm-up, the learning-rate drop and the end
all move by ``N / config.total_steps``, so the drop keeps its place (3/4 of
training in the shapes config), and each row is evaluated once, at the end.
The default is the config's own schedule, 500 steps of 8 images (warm-up 100
steps, drop at 375): at about 10 images/s on two CPU cores, plus compilation
and evaluation, a row takes about 8 minutes.

Row ``<slug>`` with seed ``s`` trains in ``DIR/<slug>/seed_<s>`` through
``train_and_evaluate``. Started again, the command reads the metrics of runs
that have their final ``eval_<N>.json`` and resumes the others from their
latest checkpoints (use a new DIR for another ``N``). It writes
``DIR/ablation.md`` (the tables, also printed), ``DIR/ablation.png`` (bars at
the mean with a whisker of one standard deviation and a dot per seed) and
``DIR/ablation.json`` (every seed's metrics per row); a loss sweep writes
``loss_sweep.*``.
"""

import ast
import copy
import json
import math
import os
import pathlib
import re
from typing import Dict, FrozenSet, List, Mapping, NamedTuple, Optional, Sequence, Tuple

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from configs import base_faster_rcnn  # noqa: E402
from libra_jax import cli, config_loader, losses, seed_statistics  # noqa: E402
from libra_jax.errors import ConfigError  # noqa: E402
from libra_jax.training import loop  # noqa: E402
from libra_jax.training.workdir import check_and_record_config  # noqa: E402

DEFAULT_STEPS = 500
DEFAULT_CONFIG = f"{config_loader.REPO_ROOT / 'configs' / 'shapes_libra_faster_rcnn.py'}:hard"
METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
# The three parts, in the paper's order, with their column names in the table.
PARTS = (("sampling", "IoU-balanced sampling"), ("bfp", "balanced feature pyramid"), ("loss", "balanced L1"))
ALL_PARTS = frozenset(part for part, _ in PARTS)


class Row(NamedTuple):
  """One trained variant: its directory name, its label in the tables, the Libra parts it has on, and (for a
  loss sweep) the R-CNN box loss that replaces the config's."""
  slug: str
  label: str
  parts: FrozenSet[str]
  loss_bbox: Optional[Tuple[Tuple[str, object], ...]] = None


BASELINE = Row("baseline", "baseline", frozenset())
LIBRA = Row("libra", "all three (Libra)", ALL_PARTS)
# One part at a time.
PART_ROWS = (
    BASELINE,
    Row("iou_balanced_sampling", "+ IoU-balanced sampling", frozenset({"sampling"})),
    Row("balanced_feature_pyramid", "+ balanced feature pyramid", frozenset({"bfp"})),
    Row("balanced_l1_loss", "+ balanced L1 loss", frozenset({"loss"})),
    LIBRA,
)
# The paper's order (its Table 5): each row adds one part to the one above.
CUMULATIVE_ROWS = (
    BASELINE,
    PART_ROWS[1],
    Row("sampling_and_pyramid", "+ IoU-balanced sampling + balanced feature pyramid", frozenset({"sampling", "bfp"})),
    LIBRA,
)
# The gain of each cumulative row over the one above in the paper's COCO ablation, as AP fractions like COCOeval's
# (its AP points 35.9 -> 36.8 -> 37.7 -> 38.5).
PAPER_BASELINE_AP = 0.359
PAPER_GAINS = {"iou_balanced_sampling": 0.009, "sampling_and_pyramid": 0.009, "libra": 0.008}
ROWS = tuple(dict.fromkeys(PART_ROWS + CUMULATIVE_ROWS))  # every row either table needs, each once


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


def row_config(row: Row, steps: int = DEFAULT_STEPS, base: Optional[ml_collections.ConfigDict] = None,
               seed: Optional[int] = None) -> ml_collections.ConfigDict:
  """``base`` (the shapes-hard Libra config by default) with the parts ``row`` lacks switched off, its box loss
  if it names one, ``steps`` steps, and ``seed`` (the base's own if None)."""
  config = copy.deepcopy(base if base is not None else config_loader.load_config(DEFAULT_CONFIG))
  config.unlock()
  for part, _ in PARTS:
    if part not in row.parts:
      switch_off(config.model, part)
  if row.loss_bbox is not None:
    config.model.rcnn.loss_bbox = dict(row.loss_bbox)
  scale_schedule(config, steps)
  if seed is not None:
    config.seed = seed
  return config


def parse_value(text: str):
  """A hyper-parameter's value: a Python literal (``0.25``, ``True``, ``(1, 2)``), or else the text itself."""
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def loss_row(spec: str, base_loss: Mapping[str, object]) -> Row:
  """The Libra row that trains with the box loss ``spec``: ``name`` or ``name:key=value[:key=value...]``.

  The loss starts from the config's own settings when ``name`` is the
  config's loss (so ``balanced_l1:alpha=0.25`` keeps its gamma and beta),
  otherwise from the name alone with the config's ``loss_weight``. A spec
  that gives the config's own loss unchanged is the Libra row itself (its runs
  are shared), labelled with the spec.
  Raises ``ConfigError`` for an unknown loss or hyper-parameter.
  """
  name, *assignments = spec.strip().split(":")
  loss = dict(base_loss) if name == base_loss["name"] else {"name": name, "loss_weight": base_loss["loss_weight"]}
  for assignment in assignments:
    key, equals, value = assignment.partition("=")
    if not equals or not key:
      raise ConfigError(f"--loss_bbox entry {spec!r}: write name:key=value, e.g. balanced_l1:alpha=0.25")
    loss[key] = parse_value(value)
    if not isinstance(loss[key], (bool, int, float, str)):
      raise ConfigError(f"--loss_bbox entry {spec!r}: {key} must be a number, True/False or a word, got {value}")
  try:
    kind = losses.get_loss(name).consumes
    losses.build_loss(loss)
  except (KeyError, ValueError, TypeError) as error:
    raise ConfigError(f"--loss_bbox entry {spec!r}: {error.args[0] if error.args else error}") from None
  if kind not in losses.BOX_CONSUMES:
    raise ConfigError(f"--loss_bbox entry {spec!r}: {name} is a {kind} loss; the R-CNN box head takes losses of "
                      f"deltas or boxes")
  if loss == dict(base_loss):
    return LIBRA._replace(label=f"{spec.strip()} (the Libra row)")
  slug = re.sub(r"[^A-Za-z0-9_.=-]+", "_", "loss_" + spec.strip().replace(":", "_"))
  return Row(slug, spec.strip(), ALL_PARTS, tuple(sorted(loss.items())))


def finished_metrics(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> Optional[Dict[str, float]]:
  """The metrics of ``workdir/eval_<total_steps>.json``, or None if that run has not finished.

  A finished run is reused only if it was trained with ``config``: otherwise a
  ``UserError`` lists what differs (use a new ``--workdir``).
  """
  path = workdir / f"eval_{config.total_steps}.json"
  if not path.is_file():
    return None
  check_and_record_config(config, workdir, resumed_step=config.total_steps, allow_changes=False, write=False)
  return json.loads(path.read_text())


def seed_list(base_seed: int, count: int) -> List[int]:
  """The ``count`` seeds of a run: the config's own seed and the ones after it."""
  return [base_seed + k for k in range(count)]


def run_header(command: str, config: ml_collections.ConfigDict, seeds: Sequence[int]) -> str:
  """The line above the tables: the command, and the data, schedule and seeds every row shares."""
  return (f"`{command}`: {config.data.dataset}, {config.total_steps} steps of {config.global_batch_size} images per "
          f"row, seeds {', '.join(map(str, seeds))} (each row trains once per seed; within a seed, every row shares "
          f"the initialization, the data order and the sampling), COCO metrics on `{config.data.eval_split}`.")


Results = Dict[str, List[Dict[str, float]]]  # row slug -> the metrics of each seed, in seed order


def train_rows(workdir, rows: Sequence[Row], steps: int, seeds: Sequence[int],
               base: ml_collections.ConfigDict) -> Results:
  """Trains (or reads back) every row with every seed, in ``workdir/<slug>/seed_<seed>``."""
  workdir = pathlib.Path(workdir)
  if len({row.slug for row in rows}) != len(rows):
    raise ValueError(f"rows need distinct directory names, got {[row.slug for row in rows]}")
  results: Results = {}
  total, done = len(rows) * len(seeds), 0
  for seed in seeds:
    for row in rows:
      done += 1
      config = row_config(row, steps, base, seed)
      run_dir = workdir / row.slug / f"seed_{seed}"
      metrics = finished_metrics(config, run_dir)
      if metrics is None:
        print(f"[{done}/{total}] {row.label}, seed {seed}: training {config.total_steps} steps in {run_dir}",
              flush=True)
        metrics = loop.train_and_evaluate(config, run_dir)
      else:
        print(f"[{done}/{total}] {row.label}, seed {seed}: finished before, metrics from {run_dir}", flush=True)
      results.setdefault(row.slug, []).append(metrics)
  return results


def run_ablation(workdir, steps: int = DEFAULT_STEPS, base: Optional[ml_collections.ConfigDict] = None,
                 seeds: int = 1) -> Results:
  """Trains every row of both tables with ``seeds`` seeds; writes ``ablation.md``, ``.png`` and ``.json``."""
  base = base if base is not None else config_loader.load_config(DEFAULT_CONFIG)
  seeds_used = seed_list(base.seed, seeds)
  results = train_rows(workdir, ROWS, steps, seeds_used, base)
  header = run_header(f"python -m libra_jax.ablation --workdir={workdir} --steps={steps} --seeds={seeds}",
                      row_config(BASELINE, steps, base), seeds_used)
  tables = [("One part at a time", seeded_table(PART_ROWS, results, BASELINE, parts=True)),
            ("The paper's order: each part added to the row above", cumulative_table(CUMULATIVE_ROWS, results))]
  write_outputs(pathlib.Path(workdir), "ablation", "Libra R-CNN ablation", header, tables, ROWS, results,
                seeds_used)
  return results


def run_loss_sweep(workdir, specs: Sequence[str], steps: int = DEFAULT_STEPS,
                   base: Optional[ml_collections.ConfigDict] = None, seeds: int = 1) -> Results:
  """Trains the Libra model once per box-loss spec and seed; writes ``loss_sweep.md``, ``.png`` and ``.json``.

  Differences are paired against the first spec's row.
  """
  base = base if base is not None else config_loader.load_config(DEFAULT_CONFIG)
  rows = tuple(dict.fromkeys(loss_row(spec, base.model.rcnn.loss_bbox.to_dict()) for spec in specs))
  seeds_used = seed_list(base.seed, seeds)
  results = train_rows(workdir, rows, steps, seeds_used, base)
  header = run_header(f"python -m libra_jax.ablation --workdir={workdir} --steps={steps} --seeds={seeds} "
                      f"--loss_bbox={','.join(specs)}", row_config(rows[0], steps, base), seeds_used)
  tables = [("R-CNN box loss of the Libra model", seeded_table(rows, results, rows[0], parts=False))]
  write_outputs(pathlib.Path(workdir), "loss_sweep", "Box-loss sweep", header, tables, rows, results, seeds_used)
  return results


def _cell(value: float) -> str:
  """A COCO metric for the table; COCOeval's -1 (no object of that size) shows as n/a."""
  return f"{value:.3f}" if value >= 0 else "n/a"


def _spread_cell(values: Sequence[float]) -> str:
  """``mean ± sd`` of a metric over seeds (just the value with one seed; n/a where COCOeval gave -1)."""
  if min(values) < 0:
    return "n/a"
  mean, std = seed_statistics.mean_std(values)
  return _cell(mean) if math.isnan(std) else f"{mean:.3f} ± {std:.3f}"


def _difference_cell(interval: seed_statistics.Interval) -> str:
  """A paired AP difference with its 95% interval, in bold where the interval excludes 0."""
  if math.isnan(interval.low):
    return f"{interval.mean:+.3f}"
  text = f"{interval.mean:+.3f} [{interval.low:+.3f}, {interval.high:+.3f}]"
  return f"**{text}**" if interval.excludes_zero() else text


def _ap(results: Results, row: Row) -> List[float]:
  return [metrics["AP"] for metrics in results[row.slug]]


def seeded_table(rows: Sequence[Row], results: Results, reference: Row, parts: bool) -> str:
  """One line per row: its label, (with ``parts``) a check mark per Libra part, each metric's mean ± sd over
  the seeds, and its AP's paired difference from ``reference`` with a 95% interval."""
  difference = f"AP - {reference.label} [95% interval]"
  columns = ["variant"] + ([title for _, title in PARTS] if parts else []) + list(METRICS) + [difference]
  lines = ["| " + " | ".join(columns) + " |",
           "|---|" + (":-:|" * len(PARTS) if parts else "") + "--:|" * (len(METRICS) + 1)]
  for row in rows:
    cells = [row.label] + (["✓" if part in row.parts else "" for part, _ in PARTS] if parts else [])
    cells += [_spread_cell([metrics[name] for metrics in results[row.slug]]) for name in METRICS]
    cells.append("" if row == reference else
                 _difference_cell(seed_statistics.paired_difference(_ap(results, row), _ap(results, reference))))
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def cumulative_table(rows: Sequence[Row], results: Results) -> str:
  """The paper's order: each row's AP (mean ± sd), its paired gain over the row above with a 95% interval, and
  the paper's gain on COCO, all as AP fractions."""
  lines = ["| variant | AP | gain over the row above [95% interval] | the paper's on COCO |", "|---|--:|--:|--:|"]
  for above, row in zip((None,) + tuple(rows), rows):
    gain = "" if above is None else _difference_cell(seed_statistics.paired_difference(_ap(results, row),
                                                                                       _ap(results, above)))
    paper = f"+{PAPER_GAINS[row.slug]:.3f}" if row.slug in PAPER_GAINS else f"(AP {PAPER_BASELINE_AP:.3f})"
    lines.append(f"| {row.label} | {_spread_cell(_ap(results, row))} | {gain} | {paper} |")
  return "\n".join(lines)


def write_outputs(workdir: pathlib.Path, stem: str, title: str, header: str, tables: Sequence[Tuple[str, str]],
                  rows: Sequence[Row], results: Results, seeds: Sequence[int]) -> None:
  """Writes ``<stem>.md`` (the tables, also printed), ``<stem>.png`` (the chart) and ``<stem>.json``."""
  text = "\n\n".join(f"## {name}\n\n{table}" for name, table in tables)
  (workdir / f"{stem}.md").write_text(f"# {title}\n\n{header}\n\n{text}\n")
  write_chart(workdir / f"{stem}.png", rows, results, title)
  write_json(workdir / f"{stem}.json", rows, results, header, seeds)
  print(text)


def write_chart(path, rows: Sequence[Row], results: Results, title: str) -> None:
  """Writes a PNG of grouped bars: one group per COCO metric, one bar per row at its mean over the seeds, with a
  standard-deviation whisker and a dot per seed (n/a drawn as 0)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  width = 0.8 / len(rows)
  fig, ax = plt.subplots(figsize=(11, 4.8))
  for index, row in enumerate(rows):
    offsets = np.array([m + (index - (len(rows) - 1) / 2) * width for m in range(len(METRICS))])
    values = np.array([[max(metrics[name], 0.0) for name in METRICS] for metrics in results[row.slug]])
    spread = values.std(axis=0, ddof=1) if len(values) > 1 else None
    ax.bar(offsets, values.mean(axis=0), width=width, yerr=spread, capsize=2, label=row.label, alpha=0.85)
    for seed_values in values:
      ax.plot(offsets, seed_values, ".", color="black", markersize=3)
  ax.set_xticks(range(len(METRICS)), METRICS)
  ax.set(ylabel="COCO metric (dots: seeds)", ylim=(0, 1), title=title)
  ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=min(len(rows), 3), frameon=False)
  ax.grid(alpha=0.3, axis="y")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def write_json(path, rows: Sequence[Row], results: Results, header: str, seeds: Sequence[int]) -> None:
  """Writes ``{"run", "seeds", "rows": [{"slug", "label", "parts", "loss_bbox", "metrics": [per seed]}]}``."""
  saved = [{"slug": row.slug, "label": row.label, "parts": sorted(row.parts),
            "loss_bbox": dict(row.loss_bbox) if row.loss_bbox else None, "metrics": results[row.slug]}
           for row in rows]
  pathlib.Path(path).write_text(json.dumps({"run": header, "seeds": list(seeds), "rows": saved}, indent=1))


def main(argv) -> int:
  parser = cli.ArgumentParser(prog="python -m libra_jax.ablation", description=__doc__.split("\n")[0],
                              config="optional", default_config=DEFAULT_CONFIG)
  parser.add_argument("--workdir", required=True, help="one subdirectory per row and seed, plus the tables, "
                      "chart and JSON")
  parser.add_argument("--steps", type=int, default=DEFAULT_STEPS,
                      help=f"training steps per row (default {DEFAULT_STEPS}); the warm-up and the learning-rate "
                      f"drop keep their place in training")
  parser.add_argument("--seeds", type=int, default=1, help="train every row with this many seeds (the config's "
                      "seed and the ones after it); the tables give mean ± sd and paired 95%% intervals")
  parser.add_argument("--loss_bbox", default=None, help="instead of the ablation, train the Libra model once per "
                      "R-CNN box loss: comma-separated name or name:key=value[:key=value], e.g. "
                      "balanced_l1,smooth_l1,l1,giou,balanced_l1:alpha=0.25")
  parser.add_argument("--import", dest="imports", action="append", default=[],
                      help="a module to import first, e.g. one that registers a loss (repeatable)")
  args = parser.parse_args(argv)
  if args.steps < 1:
    parser.error(f"--steps must be at least 1, got {args.steps}")
  if args.seeds < 1:
    parser.error(f"--seeds must be at least 1, got {args.seeds}")
  parent = pathlib.Path(args.workdir).resolve().parent
  if not parent.is_dir():
    parser.error(f"--workdir {args.workdir}: its parent directory {parent} does not exist")
  cli.import_modules(args.imports)
  specs = [spec for spec in (args.loss_bbox or "").split(",") if spec.strip()]
  if args.loss_bbox is not None and not specs:
    parser.error("--loss_bbox names no loss; give e.g. --loss_bbox=balanced_l1,l1")
  for spec in specs:  # every spec is checked before anything trains
    loss_row(spec, args.config.model.rcnn.loss_bbox.to_dict())
  cli.check_workdir(args.workdir)
  if specs:
    run_loss_sweep(args.workdir, specs, args.steps, args.config, args.seeds)
  else:
    run_ablation(args.workdir, args.steps, args.config, args.seeds)
  return 0


if __name__ == "__main__":
  cli.run(main)

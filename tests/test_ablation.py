"""The ablation: its six configs, the loss-sweep rows, the seeded tables and chart, and its run over rows and seeds
(training stubbed)."""

import itertools
import json
import pathlib

import jax
import numpy as np
import pytest
from PIL import Image

from configs import base_faster_rcnn, shapes_libra_faster_rcnn
from libra_jax import ablation, cli
from libra_jax.errors import ConfigError, UserError
from libra_jax.models.detectors import build_detector
from libra_jax.tools.summary import abstract_batch
from libra_jax.training import loop, optim
from libra_jax.training.workdir import check_and_record_config

# Where each part's settings live in the flattened config (written out here, not taken from the module).
PART_KEYS = {
    "sampling": ("model.train.rcnn.sampler", "model.train.rpn.sampler.neg_pos_ub"),
    "bfp": ("model.neck.bfp",),
    "loss": ("model.rcnn.loss_bbox",),
}
MISSING = object()


def flatten(tree, prefix=""):
  """``{"a.b.c": leaf}`` of nested dicts (a None subtree is a leaf)."""
  if not isinstance(tree, dict):
    return {prefix: tree}
  flat = {}
  for key, value in tree.items():
    flat.update(flatten(value, f"{prefix}.{key}" if prefix else key))
  return flat


def flat_config(row, steps=ablation.DEFAULT_STEPS):
  return flatten(ablation.row_config(row, steps).to_dict())


def differing_keys(a, b):
  return {k for k in a.keys() | b.keys() if a.get(k, MISSING) != b.get(k, MISSING)}


def test_rows_are_each_part_alone_and_the_papers_cumulative_order():
  assert [sorted(row.parts) for row in ablation.PART_ROWS] == [[], ["sampling"], ["bfp"], ["loss"],
                                                               ["bfp", "loss", "sampling"]]
  assert [sorted(row.parts) for row in ablation.CUMULATIVE_ROWS] == [[], ["sampling"], ["bfp", "sampling"],
                                                                     ["bfp", "loss", "sampling"]]
  assert len(ablation.ROWS) == 6 and len({row.slug for row in ablation.ROWS}) == 6


@pytest.mark.parametrize("first,second", list(itertools.combinations(ablation.ROWS, 2)), ids=lambda r: r.slug)
def test_two_rows_differ_exactly_in_the_parts_one_has_and_the_other_lacks(first, second):
  changed = differing_keys(flat_config(first), flat_config(second))
  toggled = first.parts ^ second.parts
  for key in changed:
    assert any(key.startswith(prefix) for part in toggled for prefix in PART_KEYS[part]), key
  for part in toggled:
    assert any(key.startswith(prefix) for key in changed for prefix in PART_KEYS[part]), part


def test_baseline_takes_its_switches_from_the_faster_rcnn_baseline_config():
  config = ablation.row_config(ablation.ROWS[0])
  reference = base_faster_rcnn.model_config(libra=False)
  assert config.model.neck.bfp is None and reference.neck.bfp is None
  assert config.model.rcnn.loss_bbox.to_dict() == reference.rcnn.loss_bbox.to_dict() == {"name": "l1",
                                                                                        "loss_weight": 1.0}
  assert config.model.train.rpn.sampler.neg_pos_ub == reference.train.rpn.sampler.neg_pos_ub == -1
  expected_sampler = dict(reference.train.rcnn.sampler.to_dict(), num=128)
  assert config.model.train.rcnn.sampler.to_dict() == expected_sampler
  assert expected_sampler["type"] == "random"


def test_all_three_is_the_shapes_hard_libra_config():
  libra = ablation.LIBRA
  assert flat_config(libra, steps=500) == flatten(shapes_libra_faster_rcnn.get_config("hard").to_dict())
  assert ablation.row_config(libra).data.dataset == "shapes_hard"


def test_steps_compress_the_whole_schedule():
  own = shapes_libra_faster_rcnn.get_config("hard")
  assert own.total_steps == 500
  config = ablation.row_config(ablation.ROWS[0], steps=250)
  assert config.total_steps == 250 and config.steps_per_epoch == own.steps_per_epoch
  assert config.eval_every == 250
  short = optim.schedule_from_config(config.optim, config.global_batch_size, config.steps_per_epoch)
  full = optim.schedule_from_config(own.optim, own.global_batch_size, own.steps_per_epoch)
  steps = np.arange(0, 250, 5)
  np.testing.assert_allclose([short(s) for s in steps], [full(2 * s) for s in steps], rtol=1e-6)
  # The learning rate drops x10 at 3/4 of training, after a warm-up of a fifth of it.
  assert short(186) == pytest.approx(10 * short(187)) and short(50) == pytest.approx(short(186))


def seeded(*aps):
  """Results of one row over seeds: AP as given, the other metrics derived from it (APl: no object, -1)."""
  return [{"AP": ap, "AP50": ap + 0.2, "AP75": ap / 2, "APs": ap, "APm": 0.5, "APl": -1.0} for ap in aps]


def parse_table(text, index=0):
  """``(header cells, row cells)`` of the ``index``-th markdown table in ``text``."""
  tables, current = [], []
  for line in text.splitlines() + [""]:
    if line.startswith("|"):
      current.append([cell.strip() for cell in line.strip("|").split("|")])
    elif current:
      tables.append(current)
      current = []
  return tables[index][0], tables[index][2:]


def test_seeded_table_gives_mean_sd_and_the_paired_interval_by_hand():
  results = {"baseline": seeded(0.1, 0.2, 0.3), "iou_balanced_sampling": seeded(0.2, 0.35, 0.45),
             "balanced_feature_pyramid": seeded(0.1, 0.2, 0.3), "balanced_l1_loss": seeded(0.3, 0.1, 0.2),
             "libra": seeded(0.2, 0.3, 0.4)}
  header, rows = parse_table(ablation.seeded_table(ablation.PART_ROWS, results, ablation.BASELINE, parts=True))
  assert header == ["variant", "IoU-balanced sampling", "balanced feature pyramid", "balanced L1", "AP", "AP50",
                    "AP75", "APs", "APm", "APl", "AP - baseline [95% interval]"]
  assert rows[0][4] == "0.200 ± 0.100" and rows[0][9] == "n/a" and rows[0][10] == ""
  # Sampling minus baseline, seed by seed: 0.1, 0.15, 0.15; mean 0.1333, sd 0.02887; t(0.975, 2) = 4.3027,
  # so the half-width is 4.3027 * 0.02887 / sqrt(3) = 0.0717: [0.062, 0.205], which excludes 0 (bold).
  assert rows[1][10] == "**+0.133 [+0.062, +0.205]**"
  assert rows[2][10] == "+0.000 [+0.000, +0.000]"  # the same APs: no difference, and no bold
  # Balanced L1 minus baseline: 0.2, -0.1, -0.1; mean 0, sd 0.1732, half-width 4.3027 * 0.1 = 0.430.
  assert rows[3][10] == "+0.000 [-0.430, +0.430]"
  assert [cell == "✓" for cell in rows[4][1:4]] == [True, True, True]


def test_cumulative_table_takes_each_gain_over_the_row_above():
  results = {"baseline": seeded(0.1, 0.2), "iou_balanced_sampling": seeded(0.2, 0.3),
             "sampling_and_pyramid": seeded(0.25, 0.36), "libra": seeded(0.3, 0.4)}
  _, rows = parse_table(ablation.cumulative_table(ablation.CUMULATIVE_ROWS, results))
  assert [r[0] for r in rows] == [row.label for row in ablation.CUMULATIVE_ROWS]
  assert rows[0][2] == "" and rows[0][3] == "(AP 0.359)"
  # Gains 0.1 and 0.1: sd 0, so the interval is the point. Then 0.05, 0.06: mean 0.055, sd 0.00707, and
  # t(0.975, 1) = 12.706 gives a half-width of 12.706 * 0.00707 / sqrt(2) = 0.0635.
  assert rows[1][2] == "**+0.100 [+0.100, +0.100]**" and rows[1][3] == "+0.009"
  assert rows[2][2] == "+0.055 [-0.009, +0.119]" and rows[2][3] == "+0.009"
  assert rows[3][3] == "+0.008"


def test_one_seed_gives_values_without_spread():
  results = {"baseline": seeded(0.1), "iou_balanced_sampling": seeded(0.25)}
  _, rows = parse_table(ablation.seeded_table(ablation.PART_ROWS[:2], results, ablation.BASELINE, parts=False))
  assert rows[0][1] == "0.100" and rows[1][7] == "+0.150"


def test_chart_is_a_png_of_plausible_size(tmp_path):
  path = tmp_path / "ablation.png"
  results = {row.slug: seeded(0.1 * i, 0.1 * i + 0.05) for i, row in enumerate(ablation.ROWS)}
  ablation.write_chart(path, ablation.ROWS, results, "title")
  with Image.open(path) as image:
    assert image.format == "PNG" and 800 <= image.width <= 2000 and 300 <= image.height < image.width
    pixels = np.asarray(image.convert("L"))
  assert pixels.std() > 10


def test_cli_rejects_a_workdir_without_parent_bad_counts_and_bad_losses(tmp_path):
  for argv, message in (([f"--workdir={tmp_path}/no/such/dir"], "no/such"),
                        ([f"--workdir={tmp_path}/run", "--steps=0"], "--steps must be at least 1"),
                        ([f"--workdir={tmp_path}/run", "--seeds=0"], "--seeds must be at least 1"),
                        ([f"--workdir={tmp_path}/run", "--loss_bbox=,"], "--loss_bbox names no loss")):
    with pytest.raises(cli.UsageError, match=message):
      ablation.main(argv)
  for argv, message in (([f"--workdir={tmp_path}/run", "--loss_bbox=l1,tukey"], "unknown loss 'tukey'"),
                        ([f"--workdir={tmp_path}/run", "--loss_bbox=giou:sharpness=2"], "sharpness"),
                        ([f"--workdir={tmp_path}/run", "--loss_bbox=giou:2"], "write name:key=value"),
                        ([f"--workdir={tmp_path}/run", "--loss_bbox=sigmoid_focal"], "is a logits loss"),
                        ([f"--workdir={tmp_path}/run", "--loss_bbox=l1:loss_weight=heavy"], "l1:loss_weight=heavy"),
                        ([f"--workdir={tmp_path}/run", "--loss_bbox=l1:loss_weight=[1]"], "must be a number"),
                        ([f"--workdir={tmp_path}/run", "--import=no_such_module_here"], "--import=no_such_module")):
    with pytest.raises(ConfigError, match=message):
      ablation.main(argv)
  assert not (tmp_path / "run").exists()


def test_loss_rows_start_from_the_configs_loss_or_the_name_alone():
  base = {"name": "balanced_l1", "alpha": 0.5, "gamma": 1.5, "beta": 1.0, "loss_weight": 1.0}
  assert ablation.loss_row("balanced_l1", base) == ablation.LIBRA._replace(label="balanced_l1 (the Libra row)")
  lower_alpha = ablation.loss_row("balanced_l1:alpha=0.25", base)
  assert dict(lower_alpha.loss_bbox) == dict(base, alpha=0.25) and lower_alpha.parts == ablation.ALL_PARTS
  assert dict(ablation.loss_row("giou:loss_weight=10", base).loss_bbox) == {"name": "giou", "loss_weight": 10}
  config = ablation.row_config(ablation.loss_row("smooth_l1:beta=0.5", base))
  assert config.model.rcnn.loss_bbox.to_dict() == {"name": "smooth_l1", "beta": 0.5, "loss_weight": 1.0}
  assert config.model.neck.bfp is not None and config.model.train.rcnn.sampler.type == "libra"


def test_every_row_builds_and_traces_a_training_step_with_its_parts():
  batch = abstract_batch(160, 192, max_instances=16)
  for row in ablation.ROWS:
    model = build_detector(ablation.row_config(row).model)
    key = jax.random.key(0)
    variables = jax.eval_shape(lambda k, b: model.init(k, b, train=True, keys=k[None]), key, batch)
    has_bfp = "refine" in variables["params"]["neck"].get("1", {})
    assert has_bfp == ("bfp" in row.parts), row.slug


def fake_training(calls):
  """A stand-in for ``loop.train_and_evaluate`` that records its calls and writes the final eval JSON."""

  def train(config, workdir):
    calls.append((config, pathlib.Path(workdir)))
    metrics = {name: 0.01 * len(calls) + 0.001 * i for i, name in enumerate(ablation.METRICS)}
    pathlib.Path(workdir).mkdir(parents=True, exist_ok=True)
    check_and_record_config(config, workdir, None, allow_changes=False)  # as the real run records its config
    (pathlib.Path(workdir) / f"eval_{config.total_steps}.json").write_text(json.dumps(metrics))
    return metrics

  return train


def test_run_trains_each_row_and_seed_in_its_directory_writes_the_outputs_and_resumes(tmp_path, monkeypatch,
                                                                                        capsys):
  calls = []
  monkeypatch.setattr(loop, "train_and_evaluate", fake_training(calls))
  workdir = tmp_path / "ablation"
  results = ablation.run_ablation(workdir, steps=7, seeds=2)
  expected = [(workdir / row.slug / f"seed_{seed}", seed, row) for seed in (0, 1) for row in ablation.ROWS]
  assert [path for _, path in calls] == [path for path, _, _ in expected]
  for (config, _), (_, seed, row) in zip(calls, expected):
    assert flatten(config.to_dict()) == dict(flat_config(row, steps=7), seed=seed)
  assert list(results) == [row.slug for row in ablation.ROWS] and all(len(v) == 2 for v in results.values())
  text = (workdir / "ablation.md").read_text()
  assert "--steps=7 --seeds=2" in text and "shapes_hard, 7 steps of 8 images per row, seeds 0, 1" in text
  _, part_rows = parse_table(text, 0)
  _, cumulative_rows = parse_table(text, 1)
  assert [r[0] for r in part_rows] == [row.label for row in ablation.PART_ROWS]
  assert [r[0] for r in cumulative_rows] == [row.label for row in ablation.CUMULATIVE_ROWS]
  printed = capsys.readouterr().out
  assert parse_table(printed, 0)[1] == part_rows and parse_table(printed, 1)[1] == cumulative_rows
  saved = json.loads((workdir / "ablation.json").read_text())
  assert saved["seeds"] == [0, 1] and [r["slug"] for r in saved["rows"]] == list(results)
  assert [r["metrics"] for r in saved["rows"]] == list(results.values())
  with Image.open(workdir / "ablation.png") as image:
    assert image.format == "PNG"
  # A run killed during the second seed: the first seed's runs and two of the second's are read back.
  for row in ablation.ROWS[2:]:
    (workdir / row.slug / "seed_1" / "eval_7.json").unlink()
  calls.clear()
  again = ablation.run_ablation(workdir, steps=7, seeds=2)
  assert [path for _, path in calls] == [workdir / row.slug / "seed_1" for row in ablation.ROWS[2:]]
  assert [again[row.slug][0] for row in ablation.ROWS] == [results[row.slug][0] for row in ablation.ROWS]
  # A finished run is not reused for another experiment in the same directory.
  other = ablation.config_loader.load_config(ablation.DEFAULT_CONFIG)
  other.optim.lr_per_16 = 0.5
  with pytest.raises(UserError, match="was started with another config: optim.lr_per_16"):
    ablation.run_ablation(workdir, steps=7, base=other, seeds=2)


def test_loss_sweep_with_a_users_registered_loss(tmp_path, monkeypatch, scratch_loss_registry):
  (tmp_path / "my_sweep_losses.py").write_text(
      "from libra_jax import losses\n"
      "@losses.register_loss('my_sweep_l2', consumes='deltas')\n"
      "def my_sweep_l2(pred, target, scale=1.0):\n"
      "  return scale * (pred - target) ** 2\n")
  monkeypatch.syspath_prepend(str(tmp_path))
  calls = []
  monkeypatch.setattr(loop, "train_and_evaluate", fake_training(calls))
  workdir = tmp_path / "sweep"
  assert ablation.main([f"--workdir={workdir}", "--steps=5", "--seeds=2", "--import=my_sweep_losses",
                        "--loss_bbox=balanced_l1,my_sweep_l2:scale=2,l1"]) == 0
  slugs = ["libra", "loss_my_sweep_l2_scale=2", "loss_l1"]
  assert [path for _, path in calls] == [workdir / slug / f"seed_{seed}" for seed in (0, 1) for slug in slugs]
  assert calls[1][0].model.rcnn.loss_bbox.to_dict() == {"name": "my_sweep_l2", "scale": 2, "loss_weight": 1.0}
  header, rows = parse_table((workdir / "loss_sweep.md").read_text())
  assert header[0] == "variant" and header[-1] == "AP - balanced_l1 (the Libra row) [95% interval]"
  assert [r[0] for r in rows] == ["balanced_l1 (the Libra row)", "my_sweep_l2:scale=2", "l1"]
  assert (workdir / "loss_sweep.png").is_file() and (workdir / "loss_sweep.json").is_file()

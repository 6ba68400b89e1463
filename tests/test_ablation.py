"""The ablation: its five configs, its table and chart writers, and its run over the rows (training stubbed)."""

import itertools
import json
import pathlib

import jax
import numpy as np
import pytest
from PIL import Image

from configs import base_faster_rcnn, shapes_libra_faster_rcnn
from libra_jax import ablation, cli
from libra_jax.models.detectors import build_detector
from libra_jax.tools.summary import abstract_batch
from libra_jax.training import loop, optim

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


def test_rows_are_the_baseline_each_part_alone_and_all_three():
  assert [sorted(row.parts) for row in ablation.ROWS] == [[], ["sampling"], ["bfp"], ["loss"],
                                                          ["bfp", "loss", "sampling"]]
  assert len({row.slug for row in ablation.ROWS}) == len(ablation.ROWS)


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
  libra = ablation.ROWS[-1]
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


RESULTS = [(row, {"AP": 0.1 * i, "AP50": 0.2 + 0.1 * i, "AP75": 0.05 * i, "APs": -1.0, "APm": 0.3, "APl": 0.4567,
                  "AR100": 0.9}) for i, row in enumerate(ablation.ROWS)]


def parse_table(text):
  lines = [line for line in text.splitlines() if line.startswith("|")]
  cells = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]
  return cells[0], cells[2:]


def test_markdown_table_reads_back(tmp_path):
  path = tmp_path / "ablation.md"
  table = ablation.write_markdown(path, RESULTS, "`the command`: shapes_hard, 500 steps")
  text = path.read_text()
  assert text.startswith("# ") and "`the command`: shapes_hard, 500 steps" in text and table in text
  header, rows = parse_table(text)
  assert header == ["variant", "IoU-balanced sampling", "balanced feature pyramid", "balanced L1",
                    "AP", "AP50", "AP75", "APs", "APm", "APl"]
  assert [r[0] for r in rows] == [row.label for row, _ in RESULTS]
  for cells, (row, metrics) in zip(rows, RESULTS):
    assert [c == "✓" for c in cells[1:4]] == [p in row.parts for p in ("sampling", "bfp", "loss")]
    assert all(c in ("✓", "") for c in cells[1:4])
    assert cells[7] == "n/a"
    for name, cell in zip(("AP", "AP50", "AP75", "APm", "APl"), cells[4:7] + cells[8:]):
      assert float(cell) == pytest.approx(metrics[name], abs=5e-4)


def test_chart_is_a_png_of_plausible_size(tmp_path):
  path = tmp_path / "ablation.png"
  ablation.write_chart(path, RESULTS)
  with Image.open(path) as image:
    assert image.format == "PNG" and 800 <= image.width <= 2000 and 300 <= image.height < image.width
    pixels = np.asarray(image.convert("L"))
  assert pixels.std() > 10


def test_cli_rejects_a_workdir_without_parent_and_bad_steps(tmp_path):
  for argv, message in (([f"--workdir={tmp_path}/no/such/dir"], "no/such"),
                        ([f"--workdir={tmp_path}/run", "--steps=0"], "--steps must be at least 1")):
    with pytest.raises(cli.UsageError, match=message):
      ablation.main(argv)
  assert not (tmp_path / "run").exists()


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
    (pathlib.Path(workdir) / f"eval_{config.total_steps}.json").write_text(json.dumps(metrics))
    return metrics

  return train


def test_run_trains_each_row_in_its_directory_writes_the_outputs_and_resumes(tmp_path, monkeypatch, capsys):
  calls = []
  monkeypatch.setattr(loop, "train_and_evaluate", fake_training(calls))
  workdir = tmp_path / "ablation"
  results = ablation.run_ablation(workdir, steps=7)
  assert [row for row, _ in results] == list(ablation.ROWS)
  assert [path for _, path in calls] == [workdir / row.slug for row in ablation.ROWS]
  for (config, _), row in zip(calls, ablation.ROWS):
    assert flatten(config.to_dict()) == flat_config(row, steps=7)
  text = (workdir / "ablation.md").read_text()
  assert "--steps=7" in text and "shapes_hard, 7 steps of 8 images per row, seed 0" in text
  _, table_rows = parse_table(text)
  assert [float(r[4]) for r in table_rows] == pytest.approx([m["AP"] for _, m in results], abs=5e-4)
  assert parse_table(capsys.readouterr().out)[1] == table_rows
  saved = json.loads((workdir / "ablation.json").read_text())
  assert [(r["slug"], r["metrics"]) for r in saved["rows"]] == [(row.slug, m) for row, m in results]
  assert saved["rows"][1]["parts"] == ["sampling"]
  with Image.open(workdir / "ablation.png") as image:
    assert image.format == "PNG"
  # A run killed during row 4: rows 1-3 are read back, rows 4-5 train again.
  for row in ablation.ROWS[3:]:
    (workdir / row.slug / "eval_7.json").unlink()
  calls.clear()
  again = ablation.run_ablation(workdir, steps=7)
  assert [path for _, path in calls] == [workdir / row.slug for row in ablation.ROWS[3:]]
  assert again[:3] == results[:3]

"""Tests of libra_jax.diagnostics: the figures are written and the data behind them is right."""

import numpy as np
import pytest
from PIL import Image

from libra_jax import cli, diagnostics
from libra_jax.errors import ConfigError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_png(path):
  assert path.read_bytes()[:8] == PNG_SIGNATURE
  with Image.open(path) as image:
    image.verify()
  with Image.open(path) as image:
    assert image.size[0] > 300 and image.size[1] > 200
    assert len(set(np.asarray(image.convert("L")).ravel().tolist())) > 10  # not a blank canvas


def test_regression_loss_curves_data():
  data = diagnostics.regression_loss_curves(max_error=1.5, num_points=151)
  x = data["error"]
  inlier = (x > 0) & (x < 1)
  # Smooth L1 (beta 1): gradient x below 1, then 1.
  np.testing.assert_allclose(data["smooth_l1/grad"][inlier], x[inlier], rtol=1e-5)
  np.testing.assert_allclose(data["smooth_l1/grad"][x > 1], 1.0)
  for alpha, gamma in diagnostics.BALANCED_L1_SETTINGS:
    grad = data[f"balanced_l1 a={alpha} g={gamma}/grad"]
    # Capped at gamma for outliers; 0 at x = 0; increasing in between.
    np.testing.assert_allclose(grad[x > 1], gamma, rtol=1e-6)
    assert grad[0] == 0.0 and np.all(np.diff(grad[x <= 1]) >= -1e-6)
  # The paper's point: with alpha 0.5, gamma 1.5, inliers get larger gradients than smooth L1.
  assert np.all(data["balanced_l1 a=0.5 g=1.5/grad"][inlier] > data["smooth_l1/grad"][inlier])
  # Every other registered box loss is drawn too. L1: gradient 1 away from 0.
  np.testing.assert_allclose(data["l1/grad"][x > 0], 1.0)
  # GIoU of a unit box shifted by s = 0.1 x widths (the R-CNN's delta std) against itself: IoU (1 - s) / (1 + s);
  # the hull is the union, so the loss is 1 - IoU = 2s / (1 + s), with gradient 0.1 * 2 / (1 + s)^2 in x.
  shift = 0.1 * x
  np.testing.assert_allclose(data["giou/loss"], 2 * shift / (1 + shift), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(data["giou/grad"][x > 0], 0.2 / (1 + shift[x > 0]) ** 2, rtol=1e-3)  # 0 at the kink
  assert {key.split("/")[0] for key in data if "/" in key} >= {"iou", "giou", "l1", "smooth_l1"}


def test_named_and_imported_losses(tmp_path, monkeypatch, scratch_loss_registry):
  (tmp_path / "my_figure_losses.py").write_text(
      "from libra_jax import losses\n"
      "@losses.register_loss('my_figure_l2', consumes='deltas')\n"
      "def my_figure_l2(pred, target):\n"
      "  return (pred - target) ** 2\n")
  monkeypatch.syspath_prepend(str(tmp_path))
  diagnostics.main(["--out", str(tmp_path / "figures"), "--import=my_figure_losses", "--losses=my_figure_l2,l1"])
  assert_png(tmp_path / "figures" / "regression_losses.png")
  data = diagnostics.regression_loss_curves(names=["my_figure_l2"], num_points=11)
  np.testing.assert_allclose(data["my_figure_l2/grad"], 2 * data["error"], rtol=1e-6)
  with pytest.raises(ConfigError, match="sigmoid_focal is a logits loss, not a box loss"):
    diagnostics.regression_loss_curves(names=["sigmoid_focal"])
  with pytest.raises(cli.UsageError, match="--losses: unknown loss 'tukey'"):
    diagnostics.main(["--out", str(tmp_path / "figures"), "--losses=tukey"])
  with pytest.raises(cli.UsageError, match="--losses: cross_entropy is a logits loss, not a box loss"):
    diagnostics.main(["--out", str(tmp_path / "figures"), "--losses=cross_entropy"])


def test_negative_histograms_show_random_follows_candidates_and_balanced_finds_hard_ones():
  data = diagnostics.negative_iou_histograms(num_draws=20)
  for name in ("candidates", "random", "iou_balanced"):
    np.testing.assert_allclose(data[name].sum(), 1.0, rtol=1e-9)
  np.testing.assert_allclose(data["random"], data["candidates"], atol=0.02)
  # 720 negatives have IoU > 0, more than the 384 asked for, so with floor_thr = 0 the
  # IoU-balanced draw never takes a disjoint (IoU 0) one: its hard share is that of the
  # touching negatives, more than twice the candidates'.
  max_iou = data["max_iou"]
  touching = max_iou[(max_iou > 0) & (max_iou < 0.5)]
  hard = data["edges"][:-1] >= 0.1
  assert abs(data["iou_balanced"][hard].sum() - np.mean(touching >= 0.1)) < 0.05
  assert data["iou_balanced"][hard].sum() > 2 * data["candidates"][hard].sum()


def test_command_line_writes_valid_pngs(tmp_path, capsys):
  diagnostics.main(["--out", str(tmp_path / "figures")])
  assert_png(tmp_path / "figures" / "regression_losses.png")
  assert_png(tmp_path / "figures" / "negative_iou_histogram.png")
  assert "IoU-balanced" in capsys.readouterr().out

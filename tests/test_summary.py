"""Tests of libra_jax.tools.summary on the real Libra Faster R-CNN config (shapes only, nothing runs)."""

import json

import pytest

from libra_jax import config_loader
from libra_jax.errors import ConfigError
from libra_jax.tools import summary

CONFIG = "configs/libra_faster_rcnn_r50_fpn_1x_coco.py"


@pytest.fixture(scope="module")
def libra_r50():
  return summary.summarize(config_loader.load_config(CONFIG))


def test_parameter_counts(libra_r50):
  # 42,016,224 = torchvision ResNet-50 without fc + FPN + BFP + RPN + RoI head (see test_detectors.py).
  assert libra_r50["params_total"] == 42_016_224
  assert sum(libra_r50["parts"].values()) == libra_r50["params_total"]
  assert set(libra_r50["parts"]) == {"backbone", "neck", "rpn_head", "roi_head"}
  # Frozen: stem 7*7*3*64 + BN 2*64, and layer1 (75,008 + 2 * 70,400), computed by hand.
  assert libra_r50["params_frozen"] == 9_408 + 128 + 215_808
  assert libra_r50["params_trainable"] == libra_r50["params_total"] - libra_r50["params_frozen"]


def test_flops_match_a_hand_estimate(libra_r50):
  # Multiply-adds at 800 x 1344, from layer sizes: ResNet-50 body 4.1 G at 224^2 scaled by area (87.9 G),
  # FPN laterals + output convs (61 G), RPN 3x3 conv on five levels (52.8 G), RoI head on 1,000 RoIs
  # (14.3 G), BFP non-local at 50 x 84 (10 G). XLA counts 2 FLOPs per multiply-add.
  estimate = 2 * (87.9 + 61.0 + 52.8 + 14.3 + 10.0) * 1e9
  assert abs(libra_r50["flops"] / estimate - 1) < 0.05


def test_command_line_json(capsys):
  summary.main(["--config", "configs/retinanet_r50_fpn_1x_coco.py", "--json"])
  result = json.loads(capsys.readouterr().out)
  assert {"params_total", "params_trainable", "parts", "flops"} <= set(result)
  assert set(result["parts"]) == {"backbone", "neck", "bbox_head"}
  with pytest.raises(ConfigError, match="config file configs/absent.py does not exist"):
    summary.main(["--config", "configs/absent.py"])


def test_command_line_overrides_reach_the_model(capsys):
  # ResNet-101 instead of 50, nothing else: torchvision's ResNet-101 has 44,549,160 parameters and ResNet-50
  # 25,557,032, each with a 2,049,000-parameter classifier that detection drops.
  summary.main(["--config", CONFIG, "--config.model.backbone.depth=101", "--json"])
  result = json.loads(capsys.readouterr().out)
  assert result["parts"]["backbone"] == 44_549_160 - 2_049_000
  assert result["params_total"] == 42_016_224 - (25_557_032 - 2_049_000) + (44_549_160 - 2_049_000)

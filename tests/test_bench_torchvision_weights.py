"""benchmarks/torchvision_weights.py: our weights and images in torchvision's detectors compute what ours compute."""

import json
import subprocess
import sys

import numpy as np
import pytest

from benchmarks import run, torchvision_weights
from test_benchmarks_run import needs_torchvision


def test_names_by_hand():
  name = torchvision_weights.torchvision_name
  assert name("backbone.layer2.1.bn3.running_var", "faster_rcnn", 4) == "backbone.body.layer2.1.bn3.running_var"
  assert name("neck.lateral_convs.3.conv.weight", "faster_rcnn", 4) == "backbone.fpn.inner_blocks.3.0.weight"
  assert name("neck.fpn_convs.2.conv.bias", "faster_rcnn", 4) == "backbone.fpn.layer_blocks.2.0.bias"
  assert name("neck.fpn_convs.2.conv.bias", "retinanet", 3) == "backbone.fpn.layer_blocks.2.0.bias"
  assert name("neck.fpn_convs.3.conv.weight", "retinanet", 3) == "backbone.fpn.extra_blocks.p6.weight"
  assert name("neck.fpn_convs.4.conv.weight", "retinanet", 3) == "backbone.fpn.extra_blocks.p7.weight"
  assert name("rpn_head.rpn_conv.weight", "faster_rcnn", 4) == "rpn.head.conv.0.0.weight"
  assert name("roi_head.bbox_head.shared_fcs.1.bias", "faster_rcnn", 4) == "roi_heads.box_head.fc7.bias"
  assert name("roi_head.bbox_head.fc_reg.weight", "faster_rcnn", 4) == "roi_heads.box_predictor.bbox_pred.weight"
  assert name("bbox_head.reg_convs.3.conv.weight", "retinanet", 3) == "head.regression_head.conv.3.0.weight"
  assert name("bbox_head.retina_cls.bias", "retinanet", 3) == "head.classification_head.cls_logits.bias"
  with pytest.raises(ValueError, match="neck.bfp.refine.conv.weight: torchvision's faster_rcnn has no such layer"):
    name("neck.bfp.refine.conv.weight", "faster_rcnn", 4)
  with pytest.raises(ValueError, match="rpn_head.rpn_conv.weight: torchvision's retinanet"):
    name("rpn_head.rpn_conv.weight", "retinanet", 3)
  with pytest.raises(ValueError, match="family must be one of .*got 'fcos'"):
    name("backbone.conv1.weight", "fcos", 4)


def test_background_moves_first_and_gets_zero_box_rows():
  # 3 classes: mmdetection's classifier rows are (class 0, 1, 2, background), its regressor 4 rows per class.
  cls_weight = np.arange(4 * 2, dtype=np.float32).reshape(4, 2)
  reg_bias = np.arange(12, dtype=np.float32)
  state = {"roi_head.bbox_head.fc_cls.weight": cls_weight, "roi_head.bbox_head.fc_reg.bias": reg_bias,
           "neck.lateral_convs.0.conv.bias": np.zeros(1), "neck.lateral_convs.1.conv.bias": np.zeros(1)}
  got = torchvision_weights.torchvision_state_dict(state, "faster_rcnn")
  np.testing.assert_array_equal(got["roi_heads.box_predictor.cls_score.weight"],
                                [[6, 7], [0, 1], [2, 3], [4, 5]])
  np.testing.assert_array_equal(got["roi_heads.box_predictor.bbox_pred.bias"], [0] * 4 + list(range(12)))
  # Two lateral convolutions: FPN output 2 is the first extra level.
  state = {"neck.lateral_convs.0.conv.bias": np.zeros(1), "neck.lateral_convs.1.conv.bias": np.zeros(1),
           "neck.fpn_convs.2.conv.bias": np.zeros(1)}
  assert "backbone.fpn.extra_blocks.p6.bias" in torchvision_weights.torchvision_state_dict(state, "retinanet")


def test_torchvisions_normalization_gives_back_our_image():
  image = np.random.default_rng(0).normal(size=(2, 5, 6, 3)).astype(np.float32)
  theirs = torchvision_weights.torchvision_images(image)
  assert theirs.shape == (2, 3, 5, 6) and theirs.flags["C_CONTIGUOUS"]
  mean = np.array(torchvision_weights.TORCHVISION_MEAN)[:, None, None]
  std = np.array(torchvision_weights.TORCHVISION_STD)[:, None, None]
  np.testing.assert_allclose((theirs - mean) / std, np.transpose(image, (0, 3, 1, 2)), atol=1e-5)
  # mmdetection's normalization of 0..255 images, which our pipeline uses, is the same one.
  from libra_jax.data.config import MEAN_RGB, STD_RGB
  np.testing.assert_allclose(np.array(torchvision_weights.TORCHVISION_MEAN) * 255, MEAN_RGB, rtol=1e-6)
  np.testing.assert_allclose(np.array(torchvision_weights.TORCHVISION_STD) * 255, STD_RGB, rtol=1e-6)


# Our ResNet-18 detectors (the benchmark's configs at depth 18) and torchvision's with their weights, on one image:
# the FPN maps and the heads' outputs, largest absolute difference over largest magnitude. In a fresh process, as
# the benchmark's torchvision rows run (torch beside JAX and TensorFlow can crash a test process).
_COMPARE = """
import json, sys
import jax, numpy as np, torch
from benchmarks import run, torchvision_weights
from libra_jax.models.detectors import FasterRCNN, build_detector, jitted_init
family = sys.argv[1]
config = run.detector_config(dict(config=family, depth=18, part=None))
model = build_detector(config.model)
variables = jitted_init(model)(jax.random.key(config.seed), jax.numpy.zeros((1, 64, 64, 3)))
theirs = run.torchvision_detector(family, 18, 96, 128, pretrained_setup=True).eval()
weights = run.our_setup(family, 18)["weights"]
theirs.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()}, strict=True)
image = run.synthetic_batch(96, 128, 1, run.BOXES_PER_IMAGE)["image"]
tv_image = torch.from_numpy(torchvision_weights.torchvision_images(image))
def nhwc(t):
  return t.permute(0, 2, 3, 1).numpy()
def error(ours, reference):
  ours, reference = np.asarray(ours), np.asarray(reference)
  assert ours.shape == reference.shape, (ours.shape, reference.shape)
  return float(np.abs(ours - reference).max() / np.abs(reference).max())
result = {}
with torch.no_grad():
  tv_features = list(theirs.backbone(theirs.transform.normalize(tv_image[0])[None]).values())
  if family == "faster_rcnn":
    features = model.apply(variables, image, method=FasterRCNN.features)
    result["fpn"] = max(error(f, nhwc(t)) for f, t in zip(features, tv_features))
    logits, deltas = model.apply(variables, features, method=FasterRCNN.rpn_outputs)
    tv_logits, tv_deltas = theirs.rpn.head([torch.from_numpy(np.asarray(f)).permute(0, 3, 1, 2) for f in features])
    result["rpn_logits"] = error(logits, np.concatenate([nhwc(t).reshape(1, -1) for t in tv_logits], 1))
    result["rpn_deltas"] = error(deltas, np.concatenate([nhwc(t).reshape(1, -1, 4) for t in tv_deltas], 1))
    pooled = np.random.default_rng(1).normal(size=(1, 5, 7, 7, 256)).astype(np.float32)
    cls, reg = model.apply(variables, pooled, method=FasterRCNN.box_head)
    tv_cls, tv_reg = theirs.roi_heads.box_predictor(theirs.roi_heads.box_head(
        torch.from_numpy(pooled[0]).permute(0, 3, 1, 2)))
    result["rcnn_cls"] = error(cls[0], np.concatenate([tv_cls[:, 1:], tv_cls[:, :1]], 1))
    result["rcnn_reg"] = error(reg[0], tv_reg[:, 4:])
  else:
    backbone = model.apply(variables, image, method=lambda m, x: m.neck(m.backbone(x)))
    # torchvision puts a ReLU before the P7 convolution, mmdetection does not: P3..P6 only.
    result["fpn"] = max(error(f, nhwc(t)) for f, t in zip(backbone[:4], tv_features[:4]))
    cls, reg = model.apply(variables, backbone, method=lambda m, f: m.bbox_head(f, None, config.model.anchors.strides))
    tv_in = [torch.from_numpy(np.asarray(f)).permute(0, 3, 1, 2) for f in backbone]
    result["retina_cls"] = error(cls, theirs.head.classification_head(tv_in))
    result["retina_reg"] = error(reg, theirs.head.regression_head(tv_in))
print(json.dumps(result))
"""


@needs_torchvision
@pytest.mark.parametrize("family", ["faster_rcnn", "retinanet"])
def test_torchvision_with_our_weights_computes_our_maps_and_head_outputs(family):
  out = subprocess.run([sys.executable, "-c", _COMPARE, family], capture_output=True, text=True, timeout=300,
                       cwd=str(run.ROOT))
  assert out.returncode == 0, out.stderr[-3000:]
  errors = json.loads(out.stdout.splitlines()[-1])
  assert len(errors) == (5 if family == "faster_rcnn" else 3)
  # Measured: 0.2-1.8e-6 of the largest magnitude (float32 sums in another order).
  assert all(e < 1e-5 for e in errors.values()), errors

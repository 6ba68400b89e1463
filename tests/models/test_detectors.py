"""Tests of the composed detectors: full-size structure, tiny training and inference."""

import copy
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import base_faster_rcnn, base_retinanet
from libra_jax import convert
from libra_jax.models.detectors import build_detector
from libra_jax.models.postprocess import Detections
from libra_jax.tools.summary import abstract_batch

# Closed-form parameter counts of the heads and necks (weights + biases), from the spec's layer sizes.
CONV3 = 9 * 256 * 256 + 256          # a 3x3 256 -> 256 conv
FPN_FASTER = 256 * (256 + 512 + 1024 + 2048) + 4 * 256 + 4 * CONV3
FPN_RETINA = 256 * (512 + 1024 + 2048) + 3 * 256 + 3 * CONV3 + (9 * 2048 * 256 + 256) + CONV3
BFP_NON_LOCAL = 4 * (256 * 256 + 256)
RPN_HEAD = CONV3 + (256 * 3 + 3) + (256 * 12 + 12)
ROI_HEAD = (256 * 7 * 7 * 1024 + 1024) + (1024 * 1024 + 1024) + (1024 * 81 + 81) + (1024 * 320 + 320)
RETINA_HEAD = 8 * CONV3 + (9 * 256 * 720 + 720) + (9 * 256 * 36 + 36)
# torchvision's published totals minus the 2048 x 1000 classifier: resnet50 25,557,032; resnet101 44,549,160;
# resnext101_64x4d 83,455,272.
BACKBONE = {50: 25_557_032 - 2_049_000, 101: 44_549_160 - 2_049_000, "x101_64x4d": 83_455_272 - 2_049_000}


def count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def abstract_variables(model_cfg, train=True):
  model = build_detector(model_cfg)
  init = functools.partial(model.init, train=train)
  return model, jax.eval_shape(lambda k, b: init(k, b, keys=k[None]), jax.random.key(0), abstract_batch(800, 1344))


@pytest.mark.parametrize("family,libra,depth,expected", [
    ("faster", True, 50, BACKBONE[50] + FPN_FASTER + BFP_NON_LOCAL + RPN_HEAD + ROI_HEAD),
    ("faster", False, 50, BACKBONE[50] + FPN_FASTER + RPN_HEAD + ROI_HEAD),
    ("faster", True, 101, BACKBONE[101] + FPN_FASTER + BFP_NON_LOCAL + RPN_HEAD + ROI_HEAD),
    ("faster", True, "x101_64x4d", BACKBONE["x101_64x4d"] + FPN_FASTER + BFP_NON_LOCAL + RPN_HEAD + ROI_HEAD),
    ("retina", True, 50, BACKBONE[50] + FPN_RETINA + BFP_NON_LOCAL + RETINA_HEAD),
    ("retina", False, 50, BACKBONE[50] + FPN_RETINA + RETINA_HEAD),
])
def test_full_size_detectors_build_with_the_reference_parameter_count(family, libra, depth, expected):
  base = base_faster_rcnn if family == "faster" else base_retinanet
  model_cfg = base.model_config(libra=libra)
  if depth == "x101_64x4d":
    model_cfg.backbone.update(depth=101, groups=64, base_width=4)
  else:
    model_cfg.backbone.depth = depth
  _, variables = abstract_variables(model_cfg)
  assert count(variables["params"]) == expected
  parts = set(variables["params"])
  assert parts == ({"backbone", "neck", "rpn_head", "roi_head"} if family == "faster" else
                   {"backbone", "neck", "bbox_head"})


def test_full_size_state_dict_names_follow_mmdetection():
  _, variables = abstract_variables(base_faster_rcnn.model_config(libra=True))
  zeros = jax.tree.map(lambda s: np.zeros(s.shape, np.float32), variables)
  names = set(convert.flax_to_state_dict(zeros))
  for name in ("backbone.conv1.weight", "backbone.bn1.running_var", "backbone.layer1.0.downsample.0.weight",
               "backbone.layer4.2.bn3.bias", "neck.0.lateral_convs.3.conv.weight", "neck.0.fpn_convs.0.conv.bias",
               "neck.1.refine.conv_out.conv.weight", "rpn_head.rpn_conv.weight", "rpn_head.rpn_cls.bias",
               "rpn_head.rpn_reg.weight", "roi_head.bbox_head.shared_fcs.0.weight",
               "roi_head.bbox_head.shared_fcs.1.bias", "roi_head.bbox_head.fc_cls.weight",
               "roi_head.bbox_head.fc_reg.bias"):
    assert name in names, name
  shapes = {k: v.shape for k, v in convert.flax_to_state_dict(zeros).items()}
  assert shapes["roi_head.bbox_head.shared_fcs.0.weight"] == (1024, 12544)
  assert shapes["roi_head.bbox_head.fc_reg.weight"] == (320, 1024)
  assert shapes["rpn_head.rpn_reg.weight"] == (12, 256, 1, 1)
  _, retina = abstract_variables(base_retinanet.model_config(libra=True))
  retina_names = set(convert.flax_to_state_dict(jax.tree.map(lambda s: np.zeros(s.shape, np.float32), retina)))
  for name in ("neck.0.fpn_convs.3.conv.weight", "neck.0.fpn_convs.4.conv.weight", "bbox_head.cls_convs.3.conv.weight",
               "bbox_head.reg_convs.0.conv.bias", "bbox_head.retina_cls.weight", "bbox_head.retina_reg.bias"):
    assert name in retina_names, name


from support import synthetic_batch, tiny_model_config, tiny_variables  # noqa: E402


class TinyDetector:
  """A tiny detector with its variables and jitted training and inference calls."""

  def __init__(self, family, libra=True, **overrides):
    self.cfg = tiny_model_config(family, libra)
    for path, value in overrides.items():
      section, key = path.rsplit(".", 1)
      functools.reduce(getattr, section.split("."), self.cfg)[key] = value
    self.model = build_detector(self.cfg)
    # The losses have no parameters: every variant of a family and its Libra switches shares its variables.
    self.variables = tiny_variables(family, libra)
    per_example = lambda k, b: jax.random.split(k, b["image"].shape[0])
    self.train = jax.jit(lambda v, b, k: self.model.apply(v, b, train=True, keys=per_example(k, b)))
    self.grads = jax.jit(jax.grad(lambda p, v, b, k: self.model.apply({**v, "params": p}, b, train=True,
                                                                      keys=per_example(k, b))["loss"]))
    self.infer = jax.jit(lambda v, b: self.model.apply(v, b, train=False))


@pytest.fixture(scope="module")
def libra_faster():
  return TinyDetector("faster", libra=True)


@pytest.fixture(scope="module")
def libra_retina():
  return TinyDetector("retina", libra=True)


FASTER_KEYS = {"loss", "loss_rpn_cls", "loss_rpn_bbox", "loss_cls", "loss_bbox", "num_proposals", "num_pos_rois",
               "mean_pos_iou", "rcnn_accuracy", "rpn_num_pos"}


def test_faster_rcnn_trains_and_detects_with_static_shapes(libra_faster):
  det = libra_faster
  out = det.train(det.variables, synthetic_batch(), jax.random.key(1))
  assert set(out) == FASTER_KEYS
  assert all(np.isfinite(float(v)) for v in out.values())
  np.testing.assert_allclose(float(out["loss"]), sum(float(out[k]) for k in FASTER_KEYS if k.startswith("loss_")),
                             rtol=1e-5)
  # The gts are added as proposals, so there are positives with IoU 1.
  assert float(out["num_pos_rois"]) >= 5 and 0.5 <= float(out["mean_pos_iou"]) <= 1.0
  detections = det.infer(det.variables, synthetic_batch())
  assert isinstance(detections, Detections) and detections.boxes.shape == (2, 100, 4)
  boxes = np.asarray(detections.boxes)[np.asarray(detections.valid)]
  assert np.all(boxes[:, 2:] >= boxes[:, :2]) and np.all(boxes >= 0)
  # Boxes are clipped to each image's own size: the second image is 100 high.
  second = np.asarray(detections.boxes[1])[np.asarray(detections.valid[1])]
  assert np.all(second[:, [1, 3]] <= 100) and np.all(boxes[:, [0, 2]] <= 160)
  classes = np.asarray(detections.classes)
  assert np.all((classes[np.asarray(detections.valid)] >= 0) & (classes[np.asarray(detections.valid)] < 3))
  # Same shapes, new data: no recompilation.
  det.train(det.variables, synthetic_batch(seed=5), jax.random.key(2))
  det.infer(det.variables, synthetic_batch(seed=5))
  assert det.train._cache_size() == 1 and det.infer._cache_size() == 1


def test_faster_rcnn_gradients_reach_the_trained_parts_only(libra_faster):
  det = libra_faster
  grads = det.grads(det.variables["params"], det.variables, synthetic_batch(), jax.random.key(1))
  norms = {jax.tree_util.keystr(path): float(jnp.linalg.norm(g))
           for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]}
  assert all(np.isfinite(v) for v in norms.values())
  frozen = [p for p in norms if p.startswith(("['backbone']['conv1']", "['backbone']['bn1']",
                                              "['backbone']['layer1']"))]
  assert len(frozen) > 4 and all(norms[p] == 0.0 for p in frozen)
  for part in ("['backbone']['layer4']", "['neck']['0']", "['neck']['1']['refine']['conv_out']", "['rpn_head']",
               "['roi_head']['bbox_head']['fc_cls']", "['roi_head']['bbox_head']['fc_reg']"):
    assert sum(v for p, v in norms.items() if p.startswith(part)) > 0, part


def test_padded_examples_do_not_change_the_losses(libra_faster):
  det = libra_faster
  batch = synthetic_batch()
  batch["valid"] = jnp.array([True, False])
  other = dict(batch, image=batch["image"].at[1].set(5.0), boxes=batch["boxes"].at[1].set(0.0),
               labels=batch["labels"].at[1].set(-1))
  a = det.train(det.variables, batch, jax.random.key(3))
  b = det.train(det.variables, other, jax.random.key(3))
  for name in ("loss_rpn_cls", "loss_rpn_bbox", "loss_cls", "loss_bbox"):
    np.testing.assert_allclose(float(a[name]), float(b[name]), rtol=1e-5, err_msg=name)


def test_images_without_objects_give_finite_losses(libra_faster, libra_retina):
  batch = synthetic_batch()
  batch["labels"] = jnp.full_like(batch["labels"], -1)
  for det in (libra_faster, libra_retina):
    out = det.train(det.variables, batch, jax.random.key(4))
    assert all(np.isfinite(float(v)) for v in out.values())
    assert float(out["loss_bbox"]) == 0.0


def test_retinanet_trains_and_detects(libra_retina):
  det = libra_retina
  out = det.train(det.variables, synthetic_batch(), jax.random.key(1))
  assert set(out) == {"loss", "loss_cls", "loss_bbox", "num_pos_anchors"}
  assert all(np.isfinite(float(v)) for v in out.values()) and float(out["num_pos_anchors"]) >= 5
  # The focal-loss prior: every logit starts at -log(99), so sigmoid 0.01 < score_thr 0.05: no detections.
  variables = det.variables
  bias = variables["params"]["bbox_head"]["retina_cls"]["bias"]
  np.testing.assert_allclose(bias, -np.log(99), rtol=1e-6)
  detections = det.infer(variables, synthetic_batch())
  assert detections.boxes.shape == (2, 100, 4) and not np.asarray(detections.valid).any()
  grads = det.grads(variables["params"], variables, synthetic_batch(), jax.random.key(1))
  assert float(jnp.linalg.norm(grads["bbox_head"]["retina_reg"]["kernel"])) > 0


def test_public_stages_compose_into_the_detections(libra_faster):
  # The stages a researcher calls one by one (features, RPN outputs, test proposals, the R-CNN head on given RoIs,
  # detections from given proposals) give the whole test-time forward's detections.
  from libra_jax.models import FasterRCNN, build_detector as exported
  assert exported is build_detector
  det = libra_faster
  cfg = copy.deepcopy(det.cfg)
  cfg.test.rpn_proposal.max_per_img = 60  # test settings that differ from training's (100)
  model = build_detector(cfg)

  def staged(v, b):
    # Test time computes each image within its own padding: the stages take the images' shapes for that.
    stage = lambda method, *args, **kw: model.apply(v, *args, method=method, **kw)
    features = stage(FasterRCNN.features, b["image"], b["image_shape"])
    logits, deltas = stage(FasterRCNN.rpn_outputs, features, b["image_shape"])
    test, train = stage(FasterRCNN.proposals, b, train=False), stage(FasterRCNN.proposals, b, train=True)
    cls_logits, reg_deltas = stage(FasterRCNN.rcnn_outputs, features, test.boxes, b["image_shape"])
    detections = stage(FasterRCNN.detections_from_proposals, features, test, b["image_shape"], own_padding=True)
    return logits, deltas, test, train, cls_logits, reg_deltas, detections, model.apply(v, b, train=False)

  logits, deltas, test, train, cls_logits, reg_deltas, staged_dets, whole = jax.jit(staged)(det.variables,
                                                                                          synthetic_batch())
  assert logits.shape == deltas.shape[:2] and deltas.shape[2] == 4
  assert test.boxes.shape == (2, 60, 4) and train.boxes.shape == (2, 100, 4)
  assert cls_logits.shape == (2, 60, 4) and reg_deltas.shape == (2, 60, 12)
  jax.tree.map(np.testing.assert_array_equal, staged_dets, whole)
  assert np.asarray(whole.valid).any()


def test_test_time_head_runs_only_up_to_the_last_chunk_with_a_proposal(libra_faster, monkeypatch):
  # 60 proposal slots in 8 chunks of 8. Image 0 holds 13 proposals (chunks 0-1), image 1 one in slot 20 (chunk 2):
  # the head runs chunks 0-2 for both images; their rows equal the head on every row, later rows are 0.
  from libra_jax.models import FasterRCNN, detectors
  det = libra_faster
  cfg = copy.deepcopy(det.cfg)
  cfg.test.rpn_proposal.max_per_img = 60
  model = build_detector(cfg)
  batch = synthetic_batch()
  stage = lambda method, *args, **kw: model.apply(det.variables, *args, method=method, **kw)
  features = stage(FasterRCNN.features, batch["image"], batch["image_shape"])
  proposals = stage(FasterRCNN.proposals, batch, train=False)
  valid = np.zeros((2, 60), bool)
  valid[0, :13] = True
  valid[1, 20] = True
  proposals = proposals._replace(valid=jnp.asarray(valid))
  chunked = jax.jit(lambda f, p: stage(FasterRCNN._rcnn_outputs_up_to_last_proposal, f, p, batch["image_shape"]))
  every_row = stage(FasterRCNN.rcnn_outputs, features, proposals.boxes, batch["image_shape"])
  for ours, reference in zip(chunked(features, proposals), every_row):
    np.testing.assert_allclose(ours[:, :24], reference[:, :24], rtol=1e-5, atol=1e-6)
    assert not np.asarray(ours[:, 24:]).any() and np.asarray(reference[:, 24:]).all(axis=-1).any()
  empty = chunked(features, proposals._replace(valid=jnp.zeros((2, 60), bool)))
  assert not any(np.asarray(part).any() for part in empty)
  # The detections are those of one chunk holding every slot.
  detect = lambda: jax.jit(lambda f, p: stage(FasterRCNN.detections_from_proposals, f, p, batch["image_shape"],
                                              own_padding=True))(features, proposals)
  chunked_detections = detect()
  monkeypatch.setattr(detectors, "RCNN_TEST_CHUNKS", 1)
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-5), chunked_detections, detect())
  assert np.asarray(chunked_detections.valid).any()


def test_flop_count_traces_the_test_time_head_over_every_slot(libra_faster):
  # XLA's cost analysis counts a loop body once: outside flop_count_trace the head's 8 chunks count as one.
  # Inside, the head runs over every slot of both images in one pass: 2 FLOPs per weight of its fc layers per row.
  from libra_jax.models import detectors
  det = libra_faster
  model = build_detector(det.cfg)
  flops = lambda: jax.jit(lambda v, b: model.apply(v, b, train=False)).lower(det.variables,
                                                                           synthetic_batch()).cost_analysis()["flops"]
  chunked = flops()
  with detectors.flop_count_trace():
    every_slot = flops()
  params = det.variables["params"]["roi_head"]["bbox_head"]
  fc_flops = sum(2 * params[name]["kernel"].size for name in ("fc_cls", "fc_reg")) + sum(
      2 * layer["kernel"].size for layer in params["shared_fcs"].values())
  per_image = det.cfg.test.rpn_proposal.max_per_img
  chunk = -(-per_image // detectors.RCNN_TEST_CHUNKS)
  # The loop's count has one chunk of each image; the rows of the others are missing: at least their fc layers'
  # multiply-adds.
  assert every_slot - chunked >= 2 * (per_image - chunk) * fc_flops


@pytest.mark.parametrize("loss_bbox", [dict(name="giou", loss_weight=1.0), dict(name="smooth_l1", beta=1.0)])
def test_regression_loss_is_chosen_by_name(loss_bbox):
  det = TinyDetector("faster", libra=False, **{"rcnn.loss_bbox": loss_bbox})
  out = det.train(det.variables, synthetic_batch(), jax.random.key(1))
  assert np.isfinite(float(out["loss_bbox"])) and float(out["loss_bbox"]) > 0
  assert "refine" not in str(jax.tree_util.tree_structure(det.variables["params"]["neck"]))


def test_bfloat16_compute_keeps_float32_parameters_and_losses():
  cfg = tiny_model_config("faster")
  cfg.dtype = "bfloat16"
  model = build_detector(cfg)
  batch = synthetic_batch()
  variables = jax.eval_shape(lambda k: model.init(k, batch, train=False), jax.random.key(0))
  assert {leaf.dtype for leaf in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
  keys = jax.random.split(jax.random.key(0), 2)
  losses = jax.eval_shape(lambda v: model.apply(v, batch, train=True, keys=keys), variables)
  assert all(value.dtype == jnp.float32 for value in losses.values())
  features = jax.eval_shape(lambda v: model.apply(v, batch["image"], method=lambda m, x: m.backbone(x)), variables)
  assert {f.dtype for f in features} == {jnp.dtype(jnp.bfloat16)}


@pytest.mark.parametrize("family", ["faster", "retina"])
def test_init_variables_equal_a_whole_forward_init(family):
  # The session's tiny variables come from ``jitted_init`` (``init_variables``, key 0) on the same images.
  model = build_detector(tiny_model_config(family))
  whole = jax.jit(lambda k, b: model.init(k, b, train=False))(jax.random.key(0), synthetic_batch())
  layers = tiny_variables(family)
  assert jax.tree.structure(layers) == jax.tree.structure(whole)
  for a, b in zip(jax.tree.leaves(layers), jax.tree.leaves(whole)):
    np.testing.assert_array_equal(a, b)

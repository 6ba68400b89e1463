"""The whole Libra Faster R-CNN R-50 against mmdetection 3.3.0's own outputs on two photos (tests/data/e2e/).

``tests/data/e2e/README.md`` (a copy of ``shared/refs/e2e/README.md``) says how
the references were made: the weights are regenerated here from their recipe
in numpy and imported with ``convert.import_detector`` (strict). Two runs go
through the public stages:

- the batch of the two photos padded together to 800x1216, as mmdetection
  batched them (``own_padding`` off), against ``libra_faster_r50.npz``;
- the two photos in COCO's 800x1344 bucket, each computed as if padded only
  to its own multiple of 32 (``own_padding``, the test default), against
  mmdetection's one-image runs (``libra_faster_r50_single_*.npz``).

Each stage is compared with mmdetection's, the R-CNN head and the detections
with both RoIAlign grids: the config's adaptive one (``sampling_ratio=0``,
``sr0_*``) and the fixed ``sampling_ratio=2`` (``sr2_*``). The bars are the
README's.
"""

import hashlib
import json
import pathlib
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from support import OPTIMIZED_CODE
from libra_jax import convert
from libra_jax.config_loader import load_config
from libra_jax.models import FasterRCNN, build_detector
from libra_jax.models.detectors import abstract_variables
from libra_jax.models.rpn import Proposals
from libra_jax.ops import boxes as box_ops

pytestmark = pytest.mark.slow  # a ResNet-50 detector on two 800x1216 images, compiled once

ROOT = pathlib.Path(__file__).resolve().parents[2]
E2E = ROOT / "tests" / "data" / "e2e"
MEAN, STD = np.array([123.675, 116.28, 103.53]), np.array([58.395, 57.12, 57.375])
WEIGHTS_SHA256 = "d9001488d94cb6277fe164b61e6caba9ef1bbb374fbc5e81e6a8589811ce6e10"


def reference_state_dict():
  """The weights from ``libra_faster_r50_weights.json``'s recipe (README "The weights"), mmdetection's names."""
  recipe = json.loads((E2E / "libra_faster_r50_weights.json").read_text())
  state_dict = {}
  for name, shape, dtype, dist, a, b, center in recipe["entries"]:
    rng = np.random.default_rng(zlib.crc32((recipe["salt"] + name).encode("utf-8")))
    value = a + b * rng.standard_normal(tuple(shape)) if dist == "normal" else rng.uniform(a, b, size=tuple(shape))
    if center:
      value = value - value.reshape(shape[0], -1).mean(axis=1).reshape((shape[0],) + (1,) * (len(shape) - 1))
    state_dict[name] = value.astype(dtype)
  return state_dict


def weights_digest(state_dict):
  digest = hashlib.sha256()
  for name in sorted(state_dict):
    digest.update(name.encode("utf-8") + np.ascontiguousarray(state_dict[name], "<f4").tobytes())
  return digest.hexdigest()


def network_input(ref):
  """The 800x1216 batch mmdetection saw: each resized photo normalized, at the top left of zeros."""
  image = np.zeros((2,) + tuple(ref["pad_shape"]) + (3,), np.float32)
  for i in range(2):
    h, w = ref[f"img_shape{i}"]
    image[i, :h, :w] = ((ref[f"image{i}"].astype(np.float32) - MEAN.astype(np.float32)) / STD.astype(np.float32))
  return image


SINGLE = ("astronaut", "rocket")
BUCKET = (800, 1344)


def load_reference(name):
  with np.load(E2E / name) as data:
    return {key: data[key] for key in data.files}


@pytest.fixture(scope="module")
def imported():
  """``(variables, config)``: the recipe's weights imported into the COCO config's Libra Faster R-CNN."""
  state_dict = reference_state_dict()
  assert weights_digest(state_dict) == WEIGHTS_SHA256
  config = load_config(str(ROOT / "configs" / "libra_faster_rcnn_r50_fpn_1x_coco.py"))
  assert config.model.rcnn.sampling_ratio == 0 and config.model.test.own_padding
  variables, report = convert.import_detector(state_dict, abstract_variables(build_detector(config.model),
                                                                             jnp.zeros((1, 64, 64, 3))))
  assert report.ok and report.converted == len(state_dict)
  return variables, config


def run_stages(variables, config, image, image_shape, rois, own_padding: bool):
  """Our outputs of every stage, the R-CNN head and the detections with RoIAlign sampling ratios 0 and 2."""
  config = config.copy_and_resolve_references()
  config.model.test.own_padding = own_padding
  models = {}
  for ratio in (0, 2):
    config.model.rcnn.sampling_ratio = ratio
    models[ratio] = build_detector(config.model)
  area_shape = image_shape if own_padding else None

  def stages(v, b, rois):
    model = models[0]
    stage = lambda method, *args, **kw: model.apply(v, *args, method=method, **kw)
    features = stage(FasterRCNN.features, b["image"], area_shape)
    logits, deltas = stage(FasterRCNN.rpn_outputs, features, area_shape)
    proposals = stage(FasterRCNN.proposals, b, train=False)
    outputs = dict(features=features, logits=logits, deltas=deltas, proposals=proposals)
    for ratio, detector in models.items():
      head = lambda method, *args, **kw: detector.apply(v, *args, method=method, **kw)
      outputs[f"sr{ratio}_cls"], outputs[f"sr{ratio}_reg"] = head(FasterRCNN.rcnn_outputs, features, rois, area_shape)
      outputs[f"sr{ratio}_detections"] = head(FasterRCNN.detections_from_proposals, features, proposals,
                                              b["image_shape"], own_padding=own_padding)
    return outputs

  batch = dict(image=image, image_shape=image_shape)
  return jax.device_get(jax.jit(stages, compiler_options=OPTIMIZED_CODE)(variables, batch, rois))


@pytest.fixture(scope="module")
def outputs(imported):
  """``(reference arrays, our outputs of every stage)`` of the 800x1216 batch, without own padding."""
  ref = load_reference("libra_faster_r50.npz")
  image_shape = np.stack([ref["img_shape0"], ref["img_shape1"]]).astype(np.int32)
  return ref, run_stages(*imported, network_input(ref), image_shape, ref["proposals_boxes"][:, :200],
                         own_padding=False)


@pytest.fixture(scope="module")
def bucketed(imported):
  """``([reference arrays per photo], our outputs)`` of both photos in one 800x1344 batch, with own padding."""
  refs = [load_reference(f"libra_faster_r50_single_{name}.npz") for name in SINGLE]
  image = np.zeros((2,) + BUCKET + (3,), np.float32)
  for i, ref in enumerate(refs):
    h, w = ref["img_shape0"]
    image[i, :h, :w] = (ref["image0"].astype(np.float32) - MEAN.astype(np.float32)) / STD.astype(np.float32)
  image_shape = np.stack([ref["img_shape0"] for ref in refs]).astype(np.int32)
  rois = np.stack([ref["proposals_boxes"][0, :200] for ref in refs])
  return refs, run_stages(*imported, image, image_shape, rois, own_padding=True)


def by_level(flat, ref, name):
  """Our ``[B, N, ...]`` anchor-ordered outputs -> one NHWC array per level, shaped as ``ref``'s."""
  levels, start = [], 0
  for level in range(5):
    b, h, w, c = ref[f"{name}{level}_shape"]
    size = h * w * c // (flat.shape[2] if flat.ndim == 3 else 1)
    levels.append(flat[:, start:start + size].reshape(b, h, w, c))
    start += size
  assert start == flat.shape[1]
  return levels


def assert_dense_close(ours_by_level, ref, name):
  """README bar: per level, max |ours - ref| over the sampled values / the mean RMS of the level, below 1e-3."""
  for level, ours in enumerate(ours_by_level):
    assert ours.shape == tuple(ref[f"{name}{level}_shape"]), (name, level)
    got = ours.reshape(-1)[ref[f"{name}{level}_idx"]]
    error = np.max(np.abs(got - ref[f"{name}{level}_val"])) / np.mean(ref[f"{name}{level}_rms"])
    assert error < 1e-3, (name, level, error)


def test_neck_and_rpn_outputs(outputs):
  ref, ours = outputs
  assert_dense_close(ours["features"], ref, "neck")
  np.testing.assert_allclose(ours["features"][0][..., 0], ref["neck0_ch0"], atol=1e-4)
  assert_dense_close(by_level(ours["logits"], ref, "rpn_cls"), ref, "rpn_cls")
  assert_dense_close(by_level(ours["deltas"], ref, "rpn_reg"), ref, "rpn_reg")


def matched_share(boxes_a, boxes_b, iou_threshold):
  """Share of ``boxes_a`` for which some box of ``boxes_b`` has IoU above ``iou_threshold``."""
  overlap = np.asarray(box_ops.iou(jnp.asarray(boxes_a), jnp.asarray(boxes_b)))
  return float(np.mean(overlap.max(axis=1) > iou_threshold))


def test_proposals(outputs):
  # README bar: at least 95% of mmdetection's 300 best proposals of each image have one of ours at IoU > 0.99,
  # and the reverse.
  ref, ours = outputs
  proposals: Proposals = ours["proposals"]
  for i in range(2):
    theirs, mine = ref["proposals_boxes"][i, :300], proposals.boxes[i][proposals.valid[i]][:300]
    assert matched_share(theirs, mine, 0.99) >= 0.95, i
    assert matched_share(mine, theirs, 0.99) >= 0.95, i


@pytest.mark.parametrize("ratio", [0, 2])
def test_rcnn_head_on_mmdetections_proposals(outputs, ratio):
  # README bar: max |ours - ref| / RMS(ref) over the whole array below 1e-3. The two grids differ by 0.13 (logits)
  # and 0.22 (deltas) in this measure, so each must match its own reference.
  ref, ours = outputs
  for name in ("cls", "reg"):
    want = ref[f"sr{ratio}_{name}"]
    error = np.max(np.abs(ours[f"sr{ratio}_{name}"] - want)) / np.sqrt(np.mean(want ** 2))
    assert error < 1e-3, (name, error)


def detection_share(a, b):
  """Share of detections ``a`` (score > 0.3) matched in ``b``: IoU > 0.9, the same label, |score difference| < 0.02."""
  boxes_a, scores_a, labels_a = a
  boxes_b, scores_b, labels_b = b
  keep = scores_a > 0.3
  overlap = np.asarray(box_ops.iou(jnp.asarray(boxes_a[keep]), jnp.asarray(boxes_b)))
  same = (overlap > 0.9) & (labels_a[keep][:, None] == labels_b[None]) & (
      np.abs(scores_a[keep][:, None] - scores_b[None]) < 0.02)
  return float(np.mean(same.any(axis=1)))


@pytest.mark.parametrize("ratio", [0, 2])
def test_detections(outputs, ratio):
  # README bar for a test: at least 90% of the detections both ways; this implementation (which leaves out the
  # anchors beyond each image's own multiple of 32, as training does) measured 97.5%: 95% is required here.
  ref, ours = outputs
  detections = ours[f"sr{ratio}_detections"]
  for i in range(2):
    count = int(ref[f"sr{ratio}_det_count"][i])
    theirs = tuple(ref[f"sr{ratio}_det_{key}"][i, :count] for key in ("boxes", "scores", "labels"))
    valid = detections.valid[i]
    mine = (detections.boxes[i][valid], detections.scores[i][valid], detections.classes[i][valid])
    assert detection_share(theirs, mine) >= 0.95, i
    assert detection_share(mine, theirs) >= 0.95, i


def bucket_levels(flat, features, channels):
  """Our anchor-ordered outputs of one image in the bucket (``[N]`` logits or ``[N, 4]`` deltas) -> one
  ``[H_l, W_l, channels]`` map per level (``channels``: 3 logits or 12 deltas per location)."""
  levels, start = [], 0
  rows_per_location = channels // (flat.shape[1] if flat.ndim == 2 else 1)
  for level in features:
    h, w = level.shape[1:3]
    levels.append(flat[start:start + h * w * rows_per_location].reshape(h, w, channels))
    start += h * w * rows_per_location
  assert start == flat.shape[0]
  return levels


def own_crops(levels, ref, name):
  """Each level cropped to the reference's own-padded size, as ``[1, H, W, C]``."""
  return [level[None, :ref[f"{name}{l}_shape"][1], :ref[f"{name}{l}_shape"][2]] for l, level in enumerate(levels)]


@pytest.mark.parametrize("photo", [0, 1], ids=SINGLE)
def test_one_photo_in_the_bucket_neck_and_rpn_outputs(bucketed, photo):
  # README bar: per level, max |ours - ref| over the sampled values / the level's RMS, below 1e-3, inside the
  # photo's own padded area (all of mmdetection's one-image maps).
  refs, ours = bucketed
  ref = refs[photo]
  assert_dense_close(own_crops([level[photo] for level in ours["features"]], ref, "neck"), ref, "neck")
  np.testing.assert_allclose(ours["features"][0][photo][None, ..., 0][:, :ref["neck0_shape"][1],
                                                                      :ref["neck0_shape"][2]],
                             ref["neck0_ch0"], atol=1e-4)
  for name, flat, channels in (("rpn_cls", ours["logits"][photo], 3), ("rpn_reg", ours["deltas"][photo], 12)):
    assert_dense_close(own_crops(bucket_levels(flat, ours["features"], channels), ref, name), ref, name)


@pytest.mark.parametrize("photo", [0, 1], ids=SINGLE)
def test_one_photo_in_the_bucket_proposals(bucketed, photo):
  refs, ours = bucketed
  proposals: Proposals = ours["proposals"]
  theirs, mine = refs[photo]["proposals_boxes"][0, :300], proposals.boxes[photo][proposals.valid[photo]][:300]
  assert matched_share(theirs, mine, 0.99) >= 0.95
  assert matched_share(mine, theirs, 0.99) >= 0.95


@pytest.mark.parametrize("ratio", [0, 2])
@pytest.mark.parametrize("photo", [0, 1], ids=SINGLE)
def test_one_photo_in_the_bucket_rcnn_head_and_detections(bucketed, photo, ratio):
  refs, ours = bucketed
  ref = refs[photo]
  for name in ("cls", "reg"):
    want = ref[f"sr{ratio}_{name}"][0]
    error = np.max(np.abs(ours[f"sr{ratio}_{name}"][photo] - want)) / np.sqrt(np.mean(want ** 2))
    assert error < 1e-3, (name, error)
  detections = ours[f"sr{ratio}_detections"]
  count = int(ref[f"sr{ratio}_det_count"][0])
  theirs = tuple(ref[f"sr{ratio}_det_{key}"][0, :count] for key in ("boxes", "scores", "labels"))
  valid = detections.valid[photo]
  mine = (detections.boxes[photo][valid], detections.scores[photo][valid], detections.classes[photo][valid])
  assert detection_share(theirs, mine) >= 0.95
  assert detection_share(mine, theirs) >= 0.95

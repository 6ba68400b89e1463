"""An image inside a larger bucket computes what it computes padded only to its own multiple of 32.

The reference is the same image in a bucket of exactly its own padded size,
where ``own_padding`` has nothing to do: every map, RPN output and detection
inside the image's area must agree. The image is 150x90, so its own area is
160x96: 5x3 cells of stride 32, odd, which makes P6 (3x2 cells) a different
fraction of P4 (10x6) than in the 256x256 bucket (4x4 of 16x16), so the
balanced feature pyramid's resizing and the non-local softmax are exercised.
"""

import copy
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from support import tiny_model_config, tiny_variables
from libra_jax.models import FasterRCNN, build_detector
from libra_jax.models.own_padding import OwnArea
from libra_jax.ops.roi_align import multilevel_roi_align

IMAGE = (150, 90)
OWN = (160, 96)
BUCKET = (256, 256)


def batch_in(bucket, image):
  """A one-image batch: ``image`` at the top left of a zero bucket, with made-up ground truth."""
  padded = np.zeros((1,) + bucket + (3,), np.float32)
  padded[0, :image.shape[0], :image.shape[1]] = image
  return dict(image=jnp.asarray(padded), image_shape=jnp.asarray([image.shape[:2]], jnp.int32))


@functools.partial(jax.jit, static_argnums=1)
def perturbed(variables, seed):
  """The variables with noise on every parameter, so that the non-local block (zero-initialized output) and the
  biases matter."""
  leaves, tree = jax.tree.flatten(variables["params"])
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  noisy = [leaf + 0.05 * jax.random.normal(key, leaf.shape, leaf.dtype) for leaf, key in zip(leaves, keys)]
  return dict(variables, params=jax.tree.unflatten(tree, noisy))


@pytest.fixture(scope="module")
def image():
  return np.random.default_rng(0).normal(size=IMAGE + (3,)).astype(np.float32)


@pytest.mark.slow  # three whole detectors compiled per family
@pytest.mark.parametrize("family", ["faster", "retina"])
def test_an_image_in_a_bucket_detects_as_in_its_own_padding(family, image):
  cfg = tiny_model_config(family)
  cfg.test.own_padding = True
  bucket_model = build_detector(cfg)
  plain = copy.deepcopy(cfg)
  plain.test.own_padding = False
  own_model = build_detector(plain)
  variables = perturbed(tiny_variables(family), 1)
  own, bucket = batch_in(OWN, image), batch_in(BUCKET, image)
  models = {"own": own_model, "bucket": bucket_model}
  detect = lambda name, b: jax.jit(lambda b: models[name].apply(variables, b, train=False))(b)
  want, got = jax.device_get(detect("own", own)), jax.device_get(detect("bucket", bucket))
  assert want.valid.sum() > 5
  np.testing.assert_array_equal(got.valid, want.valid)
  valid = want.valid
  np.testing.assert_array_equal(got.classes[valid], want.classes[valid])
  # The two programs sum over maps of other sizes, so in other orders: float32 rounding moves a box by up to
  # about 1e-4 of its coordinate (5e-3 px at 43 px with the suite's XLA flags; 0.017 px at most) and a score by
  # up to about 2.3e-4 of its value (1.3e-4 before the RoIAlign weights were summed in another order). A padding
  # leak moves both far more (below: more than 1e-3 of a score).
  np.testing.assert_allclose(got.boxes[valid], want.boxes[valid], rtol=5e-4, atol=1e-3)
  np.testing.assert_allclose(got.scores[valid], want.scores[valid], rtol=5e-4, atol=1e-5)
  # Without own padding, the bucket's padding changes the detections (what the test above rules out).
  loose = jax.device_get(detect("own", bucket))
  assert not (np.array_equal(loose.valid, want.valid) and np.allclose(loose.scores[valid], want.scores[valid],
                                                                      rtol=1e-3))


def test_every_stage_inside_the_area_is_the_own_padded_images():
  cfg = tiny_model_config("faster")
  model = build_detector(cfg)
  variables = perturbed(tiny_variables("faster"), 2)
  image = np.random.default_rng(1).normal(size=IMAGE + (3,)).astype(np.float32)
  own, bucket = batch_in(OWN, image), batch_in(BUCKET, image)

  def stages(b, image_shape):
    features = model.apply(variables, b["image"], image_shape, method=FasterRCNN.features)
    logits, _ = model.apply(variables, features, image_shape, method=FasterRCNN.rpn_outputs)
    return features, logits

  want_features, want_logits = jax.jit(stages)(own, None)
  got_features, got_logits = jax.jit(stages)(bucket, bucket["image_shape"])
  area = OwnArea.of(bucket["image_shape"])
  start_own = start_bucket = 0
  for level, (want, got, stride) in enumerate(zip(want_features, got_features, cfg.anchors.strides)):
    rows, cols = np.asarray(area.extent(stride))[0]
    assert want.shape[1:3] == (rows, cols), level
    scale = float(np.abs(want).max())
    np.testing.assert_allclose(got[:, :rows, :cols], want, rtol=0, atol=1e-5 * scale, err_msg=f"level {level}")
    # The RPN logits of the level: [B, H * W * A] in row-major order.
    anchors = len(cfg.anchors.ratios) * len(cfg.anchors.scales)
    size_own, size_bucket = rows * cols * anchors, got.shape[1] * got.shape[2] * anchors
    mine = np.asarray(got_logits[0, start_bucket:start_bucket + size_bucket]).reshape(got.shape[1], got.shape[2], -1)
    np.testing.assert_allclose(mine[:rows, :cols].reshape(-1), want_logits[0, start_own:start_own + size_own],
                               rtol=0, atol=1e-5 * float(np.abs(want_logits).max()), err_msg=f"level {level}")
    start_own, start_bucket = start_own + size_own, start_bucket + size_bucket


@pytest.mark.parametrize("sampling_ratio", [0, 2])
def test_roi_align_inside_a_valid_size_is_roi_align_on_the_cropped_maps(sampling_ratio):
  rng = np.random.default_rng(3)
  strides = (4, 8, 16, 32)
  valid = (100, 70)
  maps = [rng.normal(size=(-(-256 // s), -(-256 // s), 3)).astype(np.float32) for s in strides]
  cropped = [m[:-(-valid[0] // s), :-(-valid[1] // s)] for m, s in zip(maps, strides)]
  # Boxes inside the valid area, some reaching its far edges, at every level.
  centre = rng.uniform([0, 0], [valid[1], valid[0]], (40, 2))
  half = rng.uniform(4, 120, (40, 2))
  rois = np.clip(np.concatenate([centre - half, centre + half], 1), 0, [valid[1], valid[0]] * 2).astype(np.float32)
  align = jax.jit(multilevel_roi_align, static_argnames=("output_size", "strides", "sampling_ratio"))
  got = align(maps, rois, output_size=7, strides=strides, sampling_ratio=sampling_ratio,
              valid_size=jnp.asarray(valid))
  want = align(cropped, rois, output_size=7, strides=strides, sampling_ratio=sampling_ratio)
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
  # Without valid_size the maps' rows past the area (here non-zero) leak into the bins at its edges.
  assert not np.allclose(align(maps, rois, output_size=7, strides=strides, sampling_ratio=sampling_ratio), want,
                         atol=1e-6)

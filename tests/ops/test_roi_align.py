"""Tests for libra_jax.ops.roi_align against a loop-by-loop numpy reference.

The reference follows mmcv's CPU kernel sample by sample, including its
adaptive grid (``sampling_ratio=0``): ``ceil(bin size)`` samples per bin along
each axis, the sum divided by ``max(grid_h * grid_w, 1)``.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import test_util as jtu

from libra_jax.ops import adaptive_roi_align
from libra_jax.ops.roi_align import batched_multilevel_roi_align, map_roi_levels, multilevel_roi_align, roi_align

jit_roi_align = jax.jit(roi_align, static_argnames=("output_size", "sampling_ratio", "aligned"))
jit_map_roi_levels = jax.jit(map_roi_levels, static_argnames=("num_levels", "finest_scale"))
jit_multilevel = jax.jit(
    multilevel_roi_align,
    static_argnames=("output_size", "strides", "sampling_ratio", "finest_scale", "aligned"))


def _bilinear_terms(height, width, y, x):
  """``[((row, col), weight)]`` of one bilinear sample, by the RoIAlign rules."""
  if y < -1.0 or y > height or x < -1.0 or x > width:
    return []
  y, x = max(y, 0.0), max(x, 0.0)
  y_low, x_low = int(math.floor(y)), int(math.floor(x))
  if y_low >= height - 1:
    y_low = y_high = height - 1
    y = float(y_low)
  else:
    y_high = y_low + 1
  if x_low >= width - 1:
    x_low = x_high = width - 1
    x = float(x_low)
  else:
    x_high = x_low + 1
  ly, lx = y - y_low, x - x_low
  hy, hx = 1.0 - ly, 1.0 - lx
  return [((y_low, x_low), hy * hx), ((y_low, x_high), hy * lx),
          ((y_high, x_low), ly * hx), ((y_high, x_high), ly * lx)]


def _reference_bin_terms(height, width, roi, output_size, spatial_scale, sampling_ratio,
                         aligned):
  """Yields ``(ph, pw, (row, col), weight)``: bin ``(ph, pw)`` of ``roi`` is
  the sum of ``weight * feature[row, col]`` over its terms."""
  out_h, out_w = output_size
  offset = 0.5 if aligned else 0.0
  x1, y1, x2, y2 = (float(v) for v in roi)
  start_x, start_y = x1 * spatial_scale - offset, y1 * spatial_scale - offset
  roi_w = x2 * spatial_scale - offset - start_x
  roi_h = y2 * spatial_scale - offset - start_y
  if not aligned:
    roi_w, roi_h = max(roi_w, 1.0), max(roi_h, 1.0)
  bin_h, bin_w = roi_h / out_h, roi_w / out_w
  grid_h = sampling_ratio or math.ceil(bin_h)
  grid_w = sampling_ratio or math.ceil(bin_w)
  count = max(grid_h * grid_w, 1)
  for ph in range(out_h):
    for pw in range(out_w):
      for iy in range(grid_h):
        y = start_y + ph * bin_h + (iy + 0.5) * bin_h / grid_h
        for ix in range(grid_w):
          x = start_x + pw * bin_w + (ix + 0.5) * bin_w / grid_w
          for pixel, weight in _bilinear_terms(height, width, y, x):
            yield ph, pw, pixel, weight / count


def reference_roi_align(features, rois, output_size, spatial_scale, sampling_ratio, aligned):
  features = np.asarray(features, np.float64)
  height, width, channels = features.shape
  out = np.zeros((len(rois),) + tuple(output_size) + (channels,))
  for k, roi in enumerate(np.asarray(rois)):
    for ph, pw, pixel, weight in _reference_bin_terms(
        height, width, roi, output_size, spatial_scale, sampling_ratio, aligned):
      out[k, ph, pw] += weight * features[pixel]
  return out


def reference_roi_align_adjoint(cotangent, feature_shape, rois, output_size, spatial_scale,
                                sampling_ratio, aligned):
  """Gradient of ``sum(roi_align(features) * cotangent)`` w.r.t. features."""
  height, width, _ = feature_shape
  grad = np.zeros(feature_shape)
  for k, roi in enumerate(np.asarray(rois)):
    for ph, pw, pixel, weight in _reference_bin_terms(
        height, width, roi, output_size, spatial_scale, sampling_ratio, aligned):
      grad[pixel] += weight * cotangent[k, ph, pw]
  return grad


def random_rois(rng, num_rois, image_h, image_w):
  """xyxy RoIs of mixed sizes, some crossing or outside the image border."""
  centre = rng.uniform([-0.2 * image_w, -0.2 * image_h], [1.2 * image_w, 1.2 * image_h],
                       (num_rois, 2))
  size = rng.uniform(0.2, 1.5, (num_rois, 2)) * [image_w, image_h]
  rois = np.concatenate([centre - size / 2, centre + size / 2], axis=1)
  special = np.array([
      [3.0, 4.0, 3.5, 4.2],                       # tiny
      [5.0, 5.0, 5.0, 5.0],                       # zero size
      [-3.0 * image_w, -2.0 * image_h, 3.0 * image_w, 2.5 * image_h],  # covers the map
      [1.5 * image_w, 1.5 * image_h, 2.0 * image_w, 2.0 * image_h],    # fully outside
      [-10.0, -10.0, -1.0, -1.5],                 # outside, near the origin
      [image_w - 1.0, image_h - 1.0, image_w + 3.0, image_h + 2.0],    # past the far corner
  ])
  rois[:len(special)] = special
  return rois.astype(np.float32)


@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("sampling_ratio", [0, 1, 2, 3])
def test_roi_align_matches_reference(aligned, sampling_ratio):
  rng = np.random.default_rng(sampling_ratio + 10 * aligned)
  features = rng.normal(size=(13, 17, 3)).astype(np.float32)
  spatial_scale = 0.5
  rois = random_rois(rng, 20, 13 / spatial_scale, 17 / spatial_scale)
  # Adaptive (0) and 3 samples per bin also with more column bins than row bins.
  output_size = (3, 4) if sampling_ratio in (0, 3) else (2, 2)
  expected = reference_roi_align(features, rois, output_size, spatial_scale, sampling_ratio,
                                 aligned)
  got = jit_roi_align(features, rois, output_size, spatial_scale, sampling_ratio, aligned)
  assert got.shape == (20,) + output_size + (3,)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, expected, atol=1e-5)


def test_int_output_size_and_dtype():
  rng = np.random.default_rng(0)
  features = rng.normal(size=(6, 5, 2)).astype(np.float32)
  rois = random_rois(rng, 7, 6, 5)
  got = jit_roi_align(features, rois, 3, 1.0)
  np.testing.assert_allclose(got, reference_roi_align(features, rois, (3, 3), 1.0, 2, True),
                             atol=1e-5)
  half = jit_roi_align(features.astype(jnp.bfloat16), rois, 3, 1.0)
  assert half.dtype == jnp.bfloat16
  np.testing.assert_allclose(half.astype(np.float32), got, atol=0.05)


@pytest.mark.parametrize("sampling_ratio", [-1, 1.5])
def test_bad_sampling_ratio_raises(sampling_ratio):
  features = np.zeros((4, 4, 1), np.float32)
  rois = np.array([[0.0, 0.0, 2.0, 2.0]], np.float32)
  with pytest.raises(ValueError):
    jit_roi_align(features, rois, 2, 1.0, sampling_ratio=sampling_ratio)
  with pytest.raises(ValueError):
    jit_multilevel([features], rois, 2, (4,), sampling_ratio=sampling_ratio)


def test_linear_map_gives_bin_centres():
  # Map pixel (i, j) has its centre at image point ((j + 0.5) / s, (i + 0.5) / s)
  # when aligned; there the map holds f(y, x) = 2 y + 3 x + 1. Bilinear
  # interpolation is exact on a linear function, and the samples of a bin are
  # symmetric about its centre, so each bin equals f at its centre as long
  # as every sample lies between pixel centres.
  def f(y, x):
    return 2.0 * y + 3.0 * x + 1.0

  spatial_scale = 1.0
  rows, cols = np.meshgrid(np.arange(8.0), np.arange(8.0), indexing="ij")
  features = f(rows + 0.5, cols + 0.5)[..., None].astype(np.float32)
  # Bins of the RoI x in [2, 6], y in [1, 5] are centred at y in {2, 4},
  # x in {3, 5}: f = 2 * 2 + 3 * 3 + 1 = 14, 2 * 2 + 3 * 5 + 1 = 20, ...
  rois = np.array([[2.0, 1.0, 6.0, 5.0]], np.float32)
  expected = np.array([[14.0, 20.0], [18.0, 24.0]])
  for sampling_ratio in (1, 3):
    got = jit_roi_align(features, rois, 2, spatial_scale, sampling_ratio=sampling_ratio)
    np.testing.assert_allclose(got[0, ..., 0], expected, atol=1e-5)

  # With stride 2 (scale 0.5), map pixel (i, j) is centred at image point
  # (2 j + 1, 2 i + 1). The RoI x in [3, 12], y in [2, 11] in 3 x 3 bins has
  # bin centres y in {3.5, 6.5, 9.5}, x in {4.5, 7.5, 10.5}.
  spatial_scale = 0.5
  features = f(2.0 * rows + 1.0, 2.0 * cols + 1.0)[..., None].astype(np.float32)
  rois = np.array([[3.0, 2.0, 12.0, 11.0]], np.float32)
  expected = np.array([[21.5, 30.5, 39.5], [27.5, 36.5, 45.5], [33.5, 42.5, 51.5]])
  got = jit_roi_align(features, rois, 3, spatial_scale, sampling_ratio=2)
  np.testing.assert_allclose(got[0, ..., 0], expected, atol=1e-5)


@pytest.mark.parametrize("sampling_ratio", [0, 2])
@pytest.mark.parametrize("aligned", [True, False])
def test_constant_map(aligned, sampling_ratio):
  features = np.full((9, 11, 2), 3.25, np.float32)
  rois = np.array([[1.0, 1.0, 8.0, 6.0], [4.2, 3.1, 4.6, 3.3], [0.5, 0.5, 10.5, 8.5]],
                  np.float32)
  got = jit_roi_align(features, rois, 4, 1.0, sampling_ratio=sampling_ratio, aligned=aligned)
  np.testing.assert_allclose(got, 3.25, atol=1e-6)


@pytest.mark.parametrize("aligned", [True, False])
def test_adaptive_grid_with_samples_on_pixel_centres_and_map_edges(aligned):
  # Integer RoIs whose bins are whole pixels put every adaptive sample exactly on a pixel centre (or, unaligned,
  # halfway between two), at the map's edges and past them, with grids from 1 to 10 samples per bin: the
  # pixel-pair loop must find every sample however the coordinates round.
  rng = np.random.default_rng(11)
  features = rng.normal(size=(12, 15, 2)).astype(np.float32)
  starts = rng.integers(-8, 14, (40, 2))
  sizes = 3 * rng.integers(1, 11, (40, 2))
  rois = np.concatenate([starts, starts + sizes], axis=1).astype(np.float32)
  rois[:3] = [[0, 0, 15, 12], [-3, -3, 18, 15], [14, 11, 44, 41]]
  expected = reference_roi_align(features, rois, (3, 3), 1.0, 0, aligned)
  np.testing.assert_allclose(jit_roi_align(features, rois, 3, 1.0, 0, aligned), expected, atol=1e-5)


def test_roi_outside_map_is_zero():
  features = np.ones((5, 5, 1), np.float32)
  rois = np.array([[20.0, 20.0, 30.0, 30.0], [-30.0, -9.0, -20.0, -2.5]], np.float32)
  np.testing.assert_array_equal(jit_roi_align(features, rois, 2, 1.0), 0.0)


def test_map_roi_levels_matches_mmdet(load_ref):
  data = load_ref("roi_levels")
  got = jit_map_roi_levels(data["rois"][:, 1:], int(data["num_levels"]),
                           float(data["finest_scale"]))
  assert got.dtype == jnp.int32
  np.testing.assert_array_equal(got, data["target_lvls"])


def test_map_roi_levels_boundaries():
  def square(side):
    return [10.0, 20.0, 10.0 + side, 20.0 + side]

  rois = np.array([square(111.9), square(112.0), square(223.9), square(224.0), square(448.0),
                   square(1e5), [5.0, 5.0, 5.0, 40.0], [50.0, 50.0, 10.0, 10.0],
                   [0.0, 0.0, 0.0, 0.0]], np.float32)
  np.testing.assert_array_equal(jit_map_roi_levels(rois, 4), [0, 1, 1, 2, 3, 3, 0, 0, 0])
  np.testing.assert_array_equal(jit_map_roi_levels(rois, 2), [0, 1, 1, 1, 1, 1, 0, 0, 0])


LEVEL_SHAPES = ((25, 38), (13, 19), (7, 10), (4, 5))
STRIDES = (4, 8, 16, 32)
FINEST_SCALE = 8.0  # levels at scales < 16, [16, 32), [32, 64), >= 64


def pyramid_and_rois(rng, num_rois=24, channels=3):
  features = [rng.normal(size=shape + (channels,)).astype(np.float32) for shape in LEVEL_SHAPES]
  centre = rng.uniform([-10.0, -10.0], [160.0, 110.0], (num_rois, 2))
  scale = np.exp(rng.uniform(np.log(4.0), np.log(150.0), num_rois))
  aspect = np.exp(rng.uniform(-0.7, 0.7, num_rois))
  half = 0.5 * scale[:, None] * np.stack([np.sqrt(aspect), 1.0 / np.sqrt(aspect)], axis=1)
  rois = np.concatenate([centre - half, centre + half], axis=1).astype(np.float32)
  return features, rois


@pytest.mark.parametrize("sampling_ratio", [0, 2])
def test_multilevel_matches_per_level_roi_align(sampling_ratio):
  rng = np.random.default_rng(3)
  features, rois = pyramid_and_rois(rng)
  levels = np.asarray(jit_map_roi_levels(rois, len(features), FINEST_SCALE))
  assert set(levels.tolist()) == {0, 1, 2, 3}
  got = jit_multilevel(features, rois, (2, 3), STRIDES, sampling_ratio, FINEST_SCALE, True)
  assert got.shape == (len(rois), 2, 3, 3)
  for level, level_features in enumerate(features):
    single = jit_roi_align(level_features, rois, (2, 3), 1.0 / STRIDES[level], sampling_ratio, True)
    mine = levels == level
    np.testing.assert_allclose(got[mine], single[mine], atol=1e-5)

  got = jit_multilevel(features, rois, (2, 3), STRIDES, sampling_ratio, FINEST_SCALE, False)
  for k, level in enumerate(levels):
    expected = reference_roi_align(features[level], rois[k:k + 1], (2, 3), 1.0 / STRIDES[level],
                                   sampling_ratio, False)
    np.testing.assert_allclose(got[k], expected[0], atol=1e-5)


def test_multilevel_rejects_mismatched_strides():
  with pytest.raises(ValueError):
    jit_multilevel([np.zeros((4, 4, 1))] * 2, np.zeros((1, 4)), 2, (4, 8, 16))


@pytest.mark.parametrize("sampling_ratio", [0, 2])
def test_vmap_over_images_equals_per_image(sampling_ratio):
  # With the adaptive grid the two images need different numbers of pixel pairs; the batch loops to the larger.
  rng = np.random.default_rng(4)
  features = rng.normal(size=(2, 13, 17, 3)).astype(np.float32)
  rois = np.stack([random_rois(rng, 9, 26, 34) for _ in range(2)])
  batched = jax.jit(jax.vmap(functools.partial(roi_align, output_size=3, spatial_scale=0.5,
                                               sampling_ratio=sampling_ratio)))
  got = batched(features, rois)
  for i in range(2):
    np.testing.assert_allclose(got[i], jit_roi_align(features[i], rois[i], 3, 0.5, sampling_ratio), atol=1e-6)

  pyramids, level_rois = zip(*(pyramid_and_rois(rng, num_rois=8) for _ in range(2)))
  stacked = [np.stack(levels) for levels in zip(*pyramids)]
  batched = jax.jit(jax.vmap(functools.partial(
      multilevel_roi_align, output_size=2, strides=STRIDES, sampling_ratio=sampling_ratio,
      finest_scale=FINEST_SCALE)))
  got = batched(stacked, np.stack(level_rois))
  # The batched op (one call for all images, each with its own valid size) is the per-image op too.
  valid = np.array([[60, 150], [100, 90]], np.int32)
  at_once = jax.jit(functools.partial(batched_multilevel_roi_align, output_size=2, strides=STRIDES,
                                      sampling_ratio=sampling_ratio, finest_scale=FINEST_SCALE))
  whole, limited = at_once(stacked, np.stack(level_rois)), at_once(stacked, np.stack(level_rois), valid_size=valid)
  for i in range(2):
    single = jit_multilevel(pyramids[i], level_rois[i], 2, STRIDES, sampling_ratio, FINEST_SCALE)
    np.testing.assert_allclose(whole[i], single, atol=1e-6)
    np.testing.assert_allclose(limited[i], multilevel_roi_align(pyramids[i], level_rois[i], 2, STRIDES, sampling_ratio,
                                                                FINEST_SCALE, valid_size=valid[i]), atol=1e-6)
    np.testing.assert_allclose(got[i], single, atol=1e-6)


def test_check_grads_wrt_features():
  rng = np.random.default_rng(5)
  features = rng.normal(size=(6, 7, 2)).astype(np.float32)
  rois = random_rois(rng, 8, 12, 14)
  jtu.check_grads(lambda f: jit_roi_align(f, rois, 2, 0.5, sampling_ratio=2), (features,),
                  order=1, modes=["rev"], atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("sampling_ratio", [0, 2])
@pytest.mark.parametrize("aligned", [True, False])
def test_gradient_matches_reference_adjoint(aligned, sampling_ratio):
  rng = np.random.default_rng(6)
  features = rng.normal(size=(13, 17, 3)).astype(np.float32)
  rois = random_rois(rng, 12, 26, 34)
  cotangent = rng.normal(size=(12, 3, 3, 3)).astype(np.float32)
  grad = jax.jit(jax.grad(
      lambda f: jnp.sum(jit_roi_align(f, rois, 3, 0.5, sampling_ratio, aligned) * cotangent)))(features)
  expected = reference_roi_align_adjoint(cotangent, features.shape, rois, (3, 3), 0.5, sampling_ratio,
                                         aligned)
  np.testing.assert_allclose(grad, expected, atol=1e-5)


@pytest.mark.parametrize("sampling_ratio", [0, 2])
def test_multilevel_gradient_matches_reference_adjoint(sampling_ratio):
  rng = np.random.default_rng(7)
  features, rois = pyramid_and_rois(rng, num_rois=16)
  cotangent = rng.normal(size=(16, 2, 2, 3)).astype(np.float32)
  grads = jax.grad(lambda fs: jnp.sum(
      jit_multilevel(fs, rois, 2, STRIDES, sampling_ratio, FINEST_SCALE) * cotangent))(features)
  levels = np.asarray(jit_map_roi_levels(rois, len(features), FINEST_SCALE))
  for level, grad in enumerate(grads):
    mine = levels == level
    expected = reference_roi_align_adjoint(cotangent[mine], features[level].shape, rois[mine],
                                           (2, 2), 1.0 / STRIDES[level], sampling_ratio, True)
    np.testing.assert_allclose(grad, expected, atol=1e-5)


def test_adaptive_rois_pooled_in_groups_of_like_grids(monkeypatch):
  # Groups of at most 5 RoIs (23 RoIs: five groups of 5, two of them padding), each group looping only as far as
  # its own largest grid: the same values and feature gradient as the reference, also inside shard_map (where
  # the gradient is per device).
  monkeypatch.setattr(adaptive_roi_align, "GROUP_SIZE", 5)
  rng = np.random.default_rng(8)
  features = rng.normal(size=(13, 17, 3)).astype(np.float32)
  rois = random_rois(rng, 23, 26, 34)
  cotangent = rng.normal(size=(23, 3, 3, 3)).astype(np.float32)
  pool = functools.partial(roi_align, rois=rois, output_size=3, spatial_scale=0.5, sampling_ratio=0)
  np.testing.assert_allclose(jax.jit(pool)(features), reference_roi_align(features, rois, (3, 3), 0.5, 0, True),
                             atol=1e-5)
  expected = reference_roi_align_adjoint(cotangent, features.shape, rois, (3, 3), 0.5, 0, True)
  gradient = jax.grad(lambda f: jnp.sum(pool(f) * cotangent))
  np.testing.assert_allclose(jax.jit(gradient)(features), expected, atol=1e-5)
  mesh = jax.make_mesh((1,), ("data",), devices=jax.devices()[:1])
  per_device = jax.shard_map(lambda f: gradient(f[0])[None], mesh=mesh, in_specs=jax.P("data"),
                             out_specs=jax.P("data"))
  sharded = jax.device_put(features[None], jax.NamedSharding(mesh, jax.P("data")))
  np.testing.assert_allclose(jax.jit(per_device)(sharded)[0], expected, atol=1e-5)


@pytest.mark.parametrize("pairs_per_step", [2, 3])
def test_adaptive_pooling_loops_give_the_same_sums_with_several_pairs_per_step(monkeypatch, pairs_per_step):
  # Pairs past a group's largest grid add exact zeros, so unrolling the loops adds the same terms in the same
  # order (XLA's fusions of the unrolled body may round the last bit differently), with group sizes (4) and pair
  # counts that the unrolling does not divide.
  monkeypatch.setattr(adaptive_roi_align, "GROUP_SIZE", 4)
  rng = np.random.default_rng(9)
  features = rng.normal(size=(13, 17, 3)).astype(np.float32)
  rois = random_rois(rng, 19, 26, 34)
  cotangent = rng.normal(size=(19, 3, 3, 3)).astype(np.float32)

  def values_and_gradient():
    pool = functools.partial(roi_align, rois=rois, output_size=3, spatial_scale=0.5, sampling_ratio=0)
    gradient = jax.grad(lambda f: jnp.sum(pool(f) * cotangent))
    return np.asarray(jax.jit(pool)(features)), np.asarray(jax.jit(gradient)(features))

  one_pair = values_and_gradient()
  monkeypatch.setattr(adaptive_roi_align, "PAIRS_PER_STEP", pairs_per_step)
  unrolled = values_and_gradient()
  np.testing.assert_allclose(unrolled[0], one_pair[0], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(unrolled[1], one_pair[1], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(one_pair[0], reference_roi_align(features, rois, (3, 3), 0.5, 0, True), atol=1e-5)


@pytest.mark.parametrize("aligned", [True, False])
def test_adaptive_pixel_weights_hold_each_counted_sample_once(aligned):
  # Along each axis a sample inside [-1, extent] spreads weight 1 over the pixels it reads, so a bin's weights over
  # its pixel offsets sum to (counted samples) / (samples per bin), and offsets past the RoI's pixel count weigh
  # nothing. Rows (3 bins) and columns (4) side by side, on RoIs of every kind: tiny, empty, huge, outside.
  rng = np.random.default_rng(11 + aligned)
  height, width = 13.0, 17.0
  rois = random_rois(rng, 40, height, width)
  offset = 0.5 if aligned else 0.0
  y = adaptive_roi_align.axis_grid(jnp.asarray(rois[:, 1] - offset), jnp.asarray(rois[:, 3] - offset),
                                   jnp.full(40, height), 3, aligned)
  x = adaptive_roi_align.axis_grid(jnp.asarray(rois[:, 0] - offset), jnp.asarray(rois[:, 2] - offset),
                                   jnp.full(40, width), 4, aligned)
  grids = adaptive_roi_align.bin_grids(y, x)
  num_pixels = np.concatenate([np.repeat(np.asarray(y.num_pixels)[:, None], 3, 1),
                               np.repeat(np.asarray(x.num_pixels)[:, None], 4, 1)], axis=1)
  totals = np.zeros((40, 7))
  for step in range(int(num_pixels.max()) + 2):
    pixels, weights = jax.jit(adaptive_roi_align.pixel_weights)(grids, jnp.full((40, 7), step, jnp.int32))
    weights = np.asarray(weights)
    np.testing.assert_array_equal(weights[step >= num_pixels], 0.0)
    assert np.all((np.asarray(pixels) >= 0) & (np.asarray(pixels) < [[height] * 3 + [width] * 4]))
    totals += weights
  expected = np.zeros((40, 7))
  for k, (x1, y1, x2, y2) in enumerate(rois.astype(np.float64) - offset):
    for axis, (start, end, extent, bins) in enumerate(((y1, y2, height, 3), (x1, x2, width, 4))):
      length = end - start if aligned else max(end - start, 1.0)
      samples = math.ceil(length / bins)
      for b in range(bins):
        coords = [start + b * length / bins + (i + 0.5) * length / bins / samples for i in range(samples)]
        expected[k, axis * 3 + b] = sum(-1.0 <= c <= extent for c in coords) / max(samples, 1)
  np.testing.assert_allclose(totals, expected, atol=1e-5)

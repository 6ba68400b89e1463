"""Tests of libra_jax.ops.anchors against mmdetection's AnchorGenerator."""

import jax
import numpy as np
import pytest

from libra_jax.ops import anchors

RPN = dict(strides=(4, 8, 16, 32, 64), scales=(8.0,), ratios=(0.5, 1.0, 2.0))
RETINA = dict(strides=(8, 16, 32, 64, 128), scales=anchors.octave_scales(4.0, 3), ratios=(0.5, 1.0, 2.0))


@pytest.mark.parametrize("name,setting", [("rpn", RPN), ("retina", RETINA)])
def test_anchor_grid_matches_mmdetection(load_ref, name, setting):
  ref = load_ref("anchors")
  shapes = [tuple(int(v) for v in ref[f"{name}_lvl{i}_featsize"]) for i in range(5)]
  assert shapes == anchors.feature_shapes_for(tuple(int(v) for v in ref["img_hw"]), setting["strides"])
  grid = anchors.anchor_grid(shapes, setting["strides"], setting["scales"], setting["ratios"])
  for level, stride in enumerate(setting["strides"]):
    np.testing.assert_allclose(grid[level], ref[f"{name}_lvl{level}"], rtol=1e-6, atol=1e-4)
    np.testing.assert_allclose(anchors.base_anchors(stride, setting["scales"], setting["ratios"]),
                               ref[f"{name}_base_lvl{level}"], rtol=1e-6, atol=1e-4)
    assert grid[level].shape == (shapes[level][0] * shapes[level][1] * int(ref[f"{name}_num_base"][level]), 4)


def test_base_anchor_order_and_sizes_by_hand():
  # Stride 4, scale 8: the square anchor is 32 x 32; ratio 0.5 (h / w) is 45.25 wide, 22.63 high.
  base = anchors.base_anchors(4, (8.0,), (0.5, 1.0, 2.0))
  side = 32 / np.sqrt(2)
  np.testing.assert_allclose(base, [[-side, -side / 2, side, side / 2], [-16, -16, 16, 16],
                                    [-side / 2, -side, side / 2, side]], rtol=1e-6)
  # Ratio-major, scale-minor: the first three RetinaNet anchors share ratio 0.5 and grow in scale.
  retina = anchors.base_anchors(8, anchors.octave_scales(), (0.5, 1.0, 2.0))
  widths = retina[:, 2] - retina[:, 0]
  np.testing.assert_allclose(widths[:3] / widths[0], [1.0, 2 ** (1 / 3), 2 ** (2 / 3)], rtol=1e-6)
  np.testing.assert_allclose(anchors.octave_scales(), [4.0, 4 * 2 ** (1 / 3), 4 * 2 ** (2 / 3)])


def test_grid_rows_run_over_y_then_x_then_anchor():
  grid = np.asarray(anchors.anchor_grid([(2, 3)], [16], (1.0,), (1.0, 2.0))[0])
  centres = (grid[:, :2] + grid[:, 2:]) / 2
  expected = [(x * 16, y * 16) for y in range(2) for x in range(3) for _ in range(2)]
  np.testing.assert_allclose(centres, expected, atol=1e-5)


def test_valid_mask_follows_each_images_padded_size():
  shapes = [(25, 38), (13, 19)]  # a 800 x 1216 bucket at strides 32 and 64
  # Image 500 x 700 pads to 512 x 704: 16 x 22 locations valid at stride 32,
  # ceil(512/64) = 8 x ceil(704/64) = 11 at stride 64.
  masks = anchors.valid_anchor_mask(np.array([500, 700]), shapes, (32, 64), num_base_anchors=3)
  for mask, (h, w), (vh, vw) in zip(masks, shapes, [(16, 22), (8, 11)]):
    location = np.asarray(mask).reshape(h, w, 3)
    assert location.sum() == vh * vw * 3
    assert location[:vh, :vw].all() and not location[vh:].any() and not location[:, vw:].any()
  full = anchors.valid_anchor_mask(np.array([800, 1216]), shapes, (32, 64), 3)
  assert all(bool(np.asarray(m).all()) for m in full)


def test_valid_mask_under_vmap():
  shapes = [(4, 6)]
  image_shapes = np.array([[64, 96], [33, 40]], np.int32)
  batched = jax.vmap(lambda s: anchors.valid_anchor_mask(s, shapes, (16,), 1))(image_shapes)[0]
  # 33 x 40 pads to 64 x 64: 4 x 4 locations at stride 16.
  assert np.asarray(batched[0]).sum() == 24 and np.asarray(batched[1]).sum() == 16


def test_anchor_grid_rejects_mismatched_levels():
  with pytest.raises(ValueError, match="strides"):
    anchors.anchor_grid([(2, 2)], (4, 8), (8.0,), (1.0,))

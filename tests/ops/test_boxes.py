"""Tests of libra_jax.ops.boxes: overlaps and the delta coder."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from libra_jax.ops import boxes as box_ops


def numpy_iou(boxes1, boxes2, mode="iou"):
  """Pairwise IoU with explicit loops, the textbook definition."""
  out = np.zeros((len(boxes1), len(boxes2)), np.float64)
  for i, a in enumerate(boxes1):
    for j, b in enumerate(boxes2):
      iw = max(min(a[2], b[2]) - max(a[0], b[0]), 0.0)
      ih = max(min(a[3], b[3]) - max(a[1], b[1]), 0.0)
      inter = iw * ih
      area_a = max(a[2] - a[0], 0) * max(a[3] - a[1], 0)
      area_b = max(b[2] - b[0], 0) * max(b[3] - b[1], 0)
      denominator = area_a + area_b - inter if mode == "iou" else area_a
      out[i, j] = inter / max(denominator, 1e-6)
  return out


def random_boxes(rng, n, size=100.0):
  xy = rng.uniform(0, size, (n, 2))
  wh = rng.uniform(0, size / 2, (n, 2))
  return np.concatenate([xy, xy + wh], axis=1).astype(np.float32)


def test_iou_hand_computed():
  a = [[0.0, 0.0, 10.0, 10.0]]
  b = [[5.0, 5.0, 15.0, 15.0], [0.0, 0.0, 10.0, 10.0], [10.0, 0.0, 20.0, 10.0], [2.0, 2.0, 4.0, 4.0]]
  # overlap 25 / union 175; identical; touching edge; contained 4 / 100.
  np.testing.assert_allclose(box_ops.iou(a, b), [[25 / 175, 1.0, 0.0, 0.04]], rtol=1e-6)
  # IoF divides by the area of the first set: 25 / 100 for the first pair,
  # and a box inside a region is covered fully.
  np.testing.assert_allclose(box_ops.iou(a, b, mode="iof"), [[0.25, 1.0, 0.0, 0.04]], rtol=1e-6)
  np.testing.assert_allclose(box_ops.iou(b[3:], a, mode="iof"), [[1.0]], rtol=1e-6)


@pytest.mark.parametrize("mode", ["iou", "iof"])
def test_iou_matches_numpy_reference(mode):
  rng = np.random.default_rng(0)
  boxes1, boxes2 = random_boxes(rng, 37), random_boxes(rng, 23)
  np.testing.assert_allclose(box_ops.iou(boxes1, boxes2, mode=mode), numpy_iou(boxes1, boxes2, mode),
                             rtol=1e-5, atol=1e-7)


def test_iou_aligned_is_the_diagonal():
  rng = np.random.default_rng(1)
  boxes1, boxes2 = random_boxes(rng, 15), random_boxes(rng, 15)
  np.testing.assert_allclose(box_ops.iou(boxes1, boxes2, aligned=True),
                             np.diag(numpy_iou(boxes1, boxes2)), rtol=1e-5, atol=1e-7)


def test_degenerate_boxes_give_zero_not_nan():
  degenerate = np.array([[5, 5, 5, 5], [10, 10, 3, 3], [0, 0, 0, 0]], np.float32)
  normal = np.array([[0, 0, 10, 10], [4, 4, 6, 6]], np.float32)
  for result in (box_ops.iou(degenerate, normal), box_ops.iou(degenerate, degenerate),
                 box_ops.iou(degenerate, normal, mode="iof")):
    assert np.all(np.asarray(result) == 0.0)
  # A flipped box must not count as a positive area (-7 * -7 = 49).
  assert float(box_ops.box_area(degenerate[1])) == 0.0
  assert np.all(np.isfinite(box_ops.giou(degenerate, degenerate)))


def test_iou_gradients_are_finite_for_degenerate_boxes():
  boxes = jnp.array([[5.0, 5.0, 5.0, 5.0], [0.0, 0.0, 10.0, 10.0], [10.0, 10.0, 20.0, 20.0]])
  grad = jax.grad(lambda b: box_ops.iou(b, b).sum() + box_ops.giou(b, b).sum())(boxes)
  assert np.all(np.isfinite(grad))


def test_iou_batches_under_vmap_and_broadcast():
  rng = np.random.default_rng(2)
  boxes1 = np.stack([random_boxes(rng, 7) for _ in range(3)])
  boxes2 = np.stack([random_boxes(rng, 5) for _ in range(3)])
  batched = jax.jit(jax.vmap(box_ops.iou))(boxes1, boxes2)
  broadcast = box_ops.iou(boxes1, boxes2)
  for i in range(3):
    np.testing.assert_allclose(batched[i], numpy_iou(boxes1[i], boxes2[i]), rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(broadcast, batched, rtol=1e-6)


def test_giou_hand_computed():
  a = [[0.0, 0.0, 10.0, 10.0]]
  # Disjoint boxes 10 apart: IoU 0, hull 30 x 10 = 300, union 200 -> 0 - 100/300.
  b = [[20.0, 0.0, 30.0, 10.0], [0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 15.0, 15.0]]
  # Third: IoU 25/175, hull 15 x 15 = 225, union 175 -> 25/175 - 50/225.
  expected = [[-1.0 / 3.0, 1.0, 25 / 175 - 50 / 225]]
  np.testing.assert_allclose(box_ops.giou(a, b), expected, rtol=1e-6)
  np.testing.assert_allclose(box_ops.giou(a * 3, b, aligned=True), expected[0], rtol=1e-6)


def test_giou_is_at_most_iou_and_at_least_minus_one():
  rng = np.random.default_rng(3)
  boxes1, boxes2 = random_boxes(rng, 30), random_boxes(rng, 30)
  g, i = np.asarray(box_ops.giou(boxes1, boxes2)), np.asarray(box_ops.iou(boxes1, boxes2))
  assert np.all(g <= i + 1e-6) and np.all(g >= -1.0 - 1e-6)


def test_iou_rejects_unknown_mode():
  with pytest.raises(ValueError, match="mode"):
    box_ops.iou([[0, 0, 1, 1.0]], [[0, 0, 1, 1.0]], mode="dice")


RCNN_STDS = (0.1, 0.1, 0.2, 0.2)


def test_encode_matches_mmdetection(load_ref):
  ref = load_ref("delta_coder")
  np.testing.assert_allclose(box_ops.encode_deltas(ref["proposals"], ref["gts"], stds=RCNN_STDS),
                             ref["encode_rcnn"], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(box_ops.encode_deltas(ref["proposals"], ref["gts"]),
                             ref["encode_rpn"], rtol=1e-5, atol=1e-6)


def test_decode_matches_mmdetection(load_ref):
  ref = load_ref("delta_coder")
  clip = float(ref["wh_ratio_clip"])
  max_shape = tuple(int(v) for v in ref["max_shape"])
  cases = {
      "decode_rcnn_maxshape": dict(stds=RCNN_STDS, max_shape=max_shape),
      "decode_rcnn_noclip": dict(stds=RCNN_STDS),
      "decode_rpn_maxshape": dict(max_shape=max_shape),
  }
  for key, kwargs in cases.items():
    decoded = box_ops.decode_deltas(ref["proposals"], ref["deltas"], wh_ratio_clip=clip, **kwargs)
    np.testing.assert_allclose(decoded, ref[key], rtol=1e-5, atol=1e-3, err_msg=key)
  roundtrip = box_ops.decode_deltas(
      ref["proposals"], box_ops.encode_deltas(ref["proposals"], ref["gts"], stds=RCNN_STDS),
      stds=RCNN_STDS)
  np.testing.assert_allclose(roundtrip, ref["roundtrip_rcnn"], rtol=1e-5, atol=1e-3)


def test_decode_hand_computed_and_clamps():
  box = [[10.0, 20.0, 30.0, 60.0]]  # centre (20, 40), size (20, 40)
  # Move the centre by half a width right and a quarter height down, double the width.
  deltas = [[0.5, 0.25, np.log(2.0), 0.0]]
  np.testing.assert_allclose(box_ops.decode_deltas(box, deltas), [[10.0, 30.0, 50.0, 70.0]], rtol=1e-6)
  # dw far beyond log(1/0.016) is clamped: width 20 * (1 / 0.016) = 1250.
  huge = box_ops.decode_deltas(box, [[0.0, 0.0, 50.0, -50.0]])
  np.testing.assert_allclose(huge[0, 2] - huge[0, 0], 1250.0, rtol=1e-5)
  np.testing.assert_allclose(huge[0, 3] - huge[0, 1], 40 * 0.016, rtol=1e-5)
  # max_shape (h, w) = (50, 40): x clipped to [0, 40], y to [0, 50].
  clipped = box_ops.decode_deltas(box, [[0.0, 0.0, 50.0, 50.0]], max_shape=(50, 40))
  np.testing.assert_allclose(clipped, [[0.0, 0.0, 40.0, 50.0]])


def test_decode_class_specific_deltas_share_the_box():
  rng = np.random.default_rng(4)
  boxes = random_boxes(rng, 6)
  deltas = rng.normal(size=(6, 3 * 4)).astype(np.float32)
  together = box_ops.decode_deltas(boxes, deltas, stds=RCNN_STDS, max_shape=(80, 90))
  for k in range(3):
    alone = box_ops.decode_deltas(boxes, deltas[:, 4 * k:4 * k + 4], stds=RCNN_STDS, max_shape=(80, 90))
    np.testing.assert_allclose(together[:, 4 * k:4 * k + 4], alone, rtol=1e-6)
  with pytest.raises(ValueError, match="multiple of 4"):
    box_ops.decode_deltas(boxes, deltas[:, :5])


def test_decode_under_vmap_with_per_image_shape():
  rng = np.random.default_rng(5)
  boxes = np.stack([random_boxes(rng, 4, 200.0) for _ in range(2)])
  deltas = rng.normal(size=(2, 4, 4)).astype(np.float32)
  shapes = np.array([[60, 80], [100, 50]], np.int32)
  batched = jax.jit(jax.vmap(lambda b, d, s: box_ops.decode_deltas(b, d, max_shape=s)))(boxes, deltas, shapes)
  for i in range(2):
    expected = box_ops.decode_deltas(boxes[i], deltas[i], max_shape=tuple(shapes[i]))
    np.testing.assert_allclose(batched[i], expected, rtol=1e-6)
    assert np.all(np.asarray(batched[i])[:, 0::2] <= shapes[i][1])
    assert np.all(np.asarray(batched[i])[:, 1::2] <= shapes[i][0])

"""Tests of the per-image pure functions of the heads: targets, proposals, sampling, detections."""

import jax
import jax.numpy as jnp
import numpy as np

from libra_jax.models import retina_head, roi_head, rpn
from libra_jax.ops import boxes as box_ops

RPN_TRAIN = dict(assigner=dict(pos_iou_thr=0.7, neg_iou_thr=0.3, min_pos_iou=0.3),
                 sampler=dict(num=8, pos_fraction=0.5, neg_pos_ub=-1))


def logit(p):
  return float(np.log(p / (1 - p)))


def test_rpn_proposals_by_hand():
  level0 = jnp.array([[0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60], [-5, -5, 0, 0]], jnp.float32)
  level1 = jnp.array([[0, 0, 10, 10], [20, 20, 40, 40]], jnp.float32)
  logits = jnp.array([logit(0.9), logit(0.8), logit(0.7), logit(0.95), logit(0.6), logit(0.99)])
  valid = jnp.array([True, True, True, True, True, False])
  proposals = rpn.rpn_proposals(logits, jnp.zeros((6, 4)), [level0, level1], valid, jnp.array([40, 100]),
                                nms_pre=3, max_per_img=4, iou_threshold=0.7)
  # Level 0 keeps its top 3 (0.95, 0.9, 0.8): the 0.95 anchor clips to a point and is dropped, anchor 1
  # (IoU 0.68 with anchor 0) survives NMS at 0.7. Anchor [50, 50, 60, 60] (0.7) is not in the top 3.
  # Level 1: the invalid anchor is never proposed; [0, 0, 10, 10] at 0.6 is kept despite the identical
  # level-0 box, since NMS runs per level. [50..60] clipped to h = 40 would be degenerate anyway.
  np.testing.assert_allclose(proposals.scores, [0.9, 0.8, 0.6, 0.0], rtol=1e-6)
  np.testing.assert_array_equal(proposals.valid, [True, True, True, False])
  np.testing.assert_allclose(proposals.boxes[:3], [[0, 0, 10, 10], [1, 1, 11, 11], [0, 0, 10, 10]])


def test_rpn_targets_by_hand():
  anchors = jnp.array([[0, 0, 10, 10], [0, 0, 10, 9], [30, 30, 40, 40], [0, 0, 4, 10], [80, 80, 90, 90]],
                      jnp.float32)
  gt = jnp.array([[0, 0, 10, 10], [0, 0, 0, 0]], jnp.float32)
  gt_valid = jnp.array([True, False])
  anchor_valid = jnp.array([True, True, True, True, False])
  targets = rpn.rpn_targets(jax.random.key(0), anchors, anchor_valid, gt, gt_valid, gt, jnp.zeros(2, bool),
                            RPN_TRAIN)
  # IoUs with the gt: 1, 0.9, 0, 0.4, 0 -> positive, positive, negative, neither, (invalid).
  np.testing.assert_array_equal(targets.labels, [1, 1, 0, 0, 0])
  np.testing.assert_array_equal(targets.label_weights, [1, 1, 1, 0, 0])
  np.testing.assert_array_equal(targets.delta_weights, [1, 1, 0, 0, 0])
  assert int(targets.num_samples) == 3
  np.testing.assert_allclose(targets.deltas[1], box_ops.encode_deltas(anchors[1], gt[0]), rtol=1e-6)
  np.testing.assert_allclose(targets.deltas[0], 0.0, atol=1e-7)


RCNN_TRAIN = dict(assigner=dict(pos_iou_thr=0.5, neg_iou_thr=0.5, min_pos_iou=0.5, match_low_quality=False),
                  target_stds=(0.1, 0.1, 0.2, 0.2))


def test_sample_rois_adds_gts_and_builds_targets():
  gt = jnp.array([[0, 0, 20, 20], [40, 40, 60, 60], [0, 0, 0, 0]], jnp.float32)
  gt_labels = jnp.array([2, 0, -1])
  gt_valid = jnp.array([True, True, False])
  proposals = jnp.array([[0, 0, 20, 16], [100, 100, 110, 110], [41, 41, 60, 60], [0, 0, 5, 5]], jnp.float32)
  proposal_valid = jnp.array([True, True, True, False])
  for sampler in (dict(type="random", num=16, pos_fraction=0.25),
                  dict(type="libra", num=16, pos_fraction=0.25, floor_thr=0.0, num_bins=3)):
    sampled = roi_head.sample_rois(jax.random.key(0), proposals, proposal_valid, gt, gt_labels, gt_valid, gt,
                                   jnp.zeros(3, bool), num_classes=3, cfg=dict(RCNN_TRAIN, sampler=sampler))
    # Candidates: 2 valid gts + 3 valid proposals; 4 positives (the gts, IoU-0.8 and 0.9 proposals), 1 negative.
    assert sampled.rois.shape == (16, 4)
    assert int(sampled.is_positive.sum()) == 4 and int(sampled.valid.sum()) == 5
    rois = np.asarray(sampled.rois)[np.asarray(sampled.valid)]
    assert not any(np.allclose(r, [0, 0, 5, 5]) for r in rois)  # padded proposal never sampled
    labels = np.asarray(sampled.labels)[np.asarray(sampled.valid)]
    assert sorted(labels.tolist()) == [0, 0, 2, 2, 3]  # background = num_classes
    positive = np.asarray(sampled.is_positive)
    expected = box_ops.encode_deltas(sampled.rois, sampled.matched_boxes, stds=(0.1, 0.1, 0.2, 0.2))
    np.testing.assert_allclose(np.asarray(sampled.deltas)[positive], np.asarray(expected)[positive], atol=1e-6)
    assert np.all(np.asarray(sampled.max_iou)[positive] >= 0.5)


def test_class_deltas_picks_each_rows_class():
  deltas = jnp.arange(2 * 12, dtype=jnp.float32).reshape(2, 12)
  np.testing.assert_array_equal(roi_head.class_deltas(deltas, jnp.array([2, 3]), 3), [[8, 9, 10, 11], [20, 21, 22, 23]])


def test_detect_boxes_by_hand():
  boxes = jnp.array([[[0, 0, 10, 10], [0, 0, 10, 10]], [[1, 0, 11, 10], [1, 0, 11, 10]],
                     [[50, 50, 60, 60], [50, 50, 60, 60]]], jnp.float32)
  scores = jnp.array([[0.9, 0.04], [0.8, 0.7], [0.3, 0.2]])
  detections = roi_head.detect_boxes(boxes, scores, jnp.array([True, True, False]), score_thr=0.05,
                                     iou_threshold=0.5, max_per_img=4, pre_nms_top_k=10)
  # Class 0: 0.9 suppresses 0.8 (IoU 0.82); class 1: 0.04 is below the threshold, 0.7 kept; RoI 2 invalid.
  np.testing.assert_allclose(detections.scores, [0.9, 0.7, 0, 0], rtol=1e-6)
  np.testing.assert_array_equal(detections.classes, [0, 1, -1, -1])
  np.testing.assert_allclose(detections.boxes[:2], [[0, 0, 10, 10], [1, 0, 11, 10]])


def test_retina_targets_and_detections_by_hand():
  anchors = jnp.array([[0, 0, 10, 10], [0, 0, 10, 7], [30, 30, 40, 40], [2, 2, 8, 8]], jnp.float32)
  gt = jnp.array([[0, 0, 10, 10]], jnp.float32)
  cfg = dict(assigner=dict(pos_iou_thr=0.5, neg_iou_thr=0.4, min_pos_iou=0.0))
  targets = retina_head.retina_targets(anchors, jnp.ones(4, bool), gt, jnp.array([1]), jnp.array([True]), gt,
                                       jnp.zeros(1, bool), num_classes=2, cfg=cfg)
  # IoUs 1, 0.7, 0, 0.36: positive, positive, negative, negative.
  np.testing.assert_array_equal(targets.labels, [1, 1, 2, 2])
  np.testing.assert_array_equal(targets.label_weights, [1, 1, 1, 1])
  assert float(targets.num_pos) == 2.0
  logits = jnp.array([[-9.0, logit(0.9)], [logit(0.6), -9.0], [logit(0.04), -9.0], [-9.0, logit(0.5)]])
  detections = retina_head.retina_detections(logits, jnp.zeros((4, 4)), [anchors[:2], anchors[2:]],
                                             jnp.ones(4, bool), jnp.array([100, 100]), nms_pre=1,
                                             score_thr=0.05, iou_threshold=0.5, max_per_img=3)
  # nms_pre = 1 per level: level 0 keeps (anchor 0, class 1), level 1 keeps (anchor 3, class 1); the
  # latter (IoU 0.36) survives NMS.
  np.testing.assert_allclose(detections.scores, [0.9, 0.5, 0.0], rtol=1e-6)
  np.testing.assert_array_equal(detections.classes, [1, 1, -1])

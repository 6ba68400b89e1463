"""What each head's losses are divided by, derived by hand on tiny cases.

mmdetection divides the RPN losses by the sampled anchors, the R-CNN losses by
the sampled RoIs and RetinaNet's by the positive anchors, each over the whole
batch. Each case below is two identical images with one gt, so every other
normalizer (the positives, all anchors, per image then summed) gives another
number.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np

from configs import base_faster_rcnn, base_retinanet
from libra_jax.models.retina_head import retina_loss
from libra_jax.models.roi_head import SampledRoIs, rcnn_loss
from libra_jax.models.rpn import rpn_loss

GT = [0.0, 0.0, 10.0, 10.0]
# The positive anchor's predicted deltas; its target deltas are 0 (it is the gt box): L1 of 0.5 + 0.25 = 0.75.
PREDICTED = [0.5, -0.25, 0.0, 0.0]
LOG2 = math.log(2.0)


def two_images(per_image):
  return jnp.asarray(np.stack([per_image, per_image]))


def anchor_case(between):
  """Anchors: the gt itself (positive), one far away (negative), one with IoU ``between`` the thresholds."""
  anchors = jnp.asarray([GT, [100.0, 100.0, 110.0, 110.0], between])
  deltas = two_images(np.array([PREDICTED, [0.0] * 4, [0.0] * 4], np.float32))
  return dict(anchors=anchors, deltas=deltas, anchor_valid=jnp.ones((2, 3), bool),
              gt_boxes=two_images(np.array([GT], np.float32)), gt_valid=jnp.ones((2, 1), bool),
              ignore_valid=jnp.zeros((2, 1), bool), example_valid=jnp.ones((2,), jnp.float32))


def test_rpn_losses_are_divided_by_the_sampled_anchors():
  # IoU of [0, 0, 10, 20] with the gt: 100 / 200 = 0.5, between 0.3 and 0.7: ignored. Sampled per image: the
  # positive and the negative (256 allowed), 4 in the batch. Objectness logits 0: log 2 for each sampled anchor.
  model = base_faster_rcnn.model_config(libra=False)
  case = anchor_case([0.0, 0.0, 10.0, 20.0])
  out = rpn_loss(jax.random.split(jax.random.key(0), 2), jnp.zeros((2, 3)), case.pop("deltas"), **case,
                 train_cfg=model.train.rpn.to_dict(), loss_cfg=model.rpn.to_dict())
  np.testing.assert_allclose(out["loss_rpn_cls"], 4 * LOG2 / 4, rtol=1e-6)
  np.testing.assert_allclose(out["loss_rpn_bbox"], 2 * 0.75 / 4, rtol=1e-6)
  np.testing.assert_allclose(out["rpn_num_pos"], 1.0)


def test_retinanet_losses_are_divided_by_the_positive_anchors():
  # IoU of [0, 0, 10, 22] with the gt: 100 / 220 = 0.45, between 0.4 and 0.5: ignored. Two classes, the gt's is
  # class 0, logits 0 (p = 0.5): the focal loss of a class is alpha (1 - p)^2 log 2 = 0.0625 log 2 where it is the
  # anchor's class and (1 - alpha) p^2 log 2 = 0.1875 log 2 where not. Per image: the positive anchor
  # 0.0625 + 0.1875, the negative 2 x 0.1875, so 0.625 log 2; one positive per image, 2 in the batch.
  model = base_retinanet.model_config(libra=False)
  case = anchor_case([0.0, 0.0, 10.0, 22.0])
  out = retina_loss(jnp.zeros((2, 3, 2)), case.pop("deltas"), **case, gt_labels=jnp.zeros((2, 1), jnp.int32),
                    train_cfg=model.train.to_dict(), loss_cfg=model.head.to_dict())
  np.testing.assert_allclose(out["loss_cls"], 2 * 0.625 * LOG2 / 2, rtol=1e-5)
  np.testing.assert_allclose(out["loss_bbox"], 2 * 0.75 / 2, rtol=1e-6)
  np.testing.assert_allclose(out["num_pos_anchors"], 1.0)


def test_rcnn_losses_are_divided_by_the_sampled_rois():
  # Per image 4 RoI slots: a positive of class 0, two background RoIs and an empty slot: 3 sampled RoIs, 6 in the
  # batch. Two classes and background, logits 0: cross-entropy log 3 per sampled RoI.
  model = base_faster_rcnn.model_config(libra=False, num_classes=2)
  background = 2
  sampled = SampledRoIs(
      rois=two_images(np.array([GT, [50, 50, 60, 60], [70, 70, 80, 80], [0, 0, 0, 0]], np.float32)),
      valid=two_images(np.array([True, True, True, False])),
      labels=two_images(np.array([0, background, background, background], np.int32)),
      is_positive=two_images(np.array([True, False, False, False])),
      deltas=jnp.zeros((2, 4, 4)), matched_boxes=two_images(np.array([GT] * 4, np.float32)),
      max_iou=two_images(np.array([1.0, 0.0, 0.0, 0.0], np.float32)))
  # Class-specific deltas [S, 4 x 2]: class 0's are PREDICTED on the positive; class 1's (not its class) are
  # large, and must not count.
  reg = np.zeros((4, 8), np.float32)
  reg[0, :4], reg[0, 4:] = PREDICTED, 9.0
  out = rcnn_loss(jnp.zeros((2, 4, 3)), two_images(reg), sampled, jnp.ones((2,), jnp.float32), model.rcnn.to_dict())
  np.testing.assert_allclose(out["loss_cls"], 6 * math.log(3.0) / 6, rtol=1e-6)
  np.testing.assert_allclose(out["loss_bbox"], 2 * 0.75 / 6, rtol=1e-6)
  np.testing.assert_allclose(out["num_pos_rois"], 1.0)

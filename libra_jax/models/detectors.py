"""Faster R-CNN and RetinaNet, with the Libra R-CNN parts as config switches.

A detector is one Flax module whose children carry mmdetection's top-level
names (``backbone``, ``neck``, ``rpn_head``, ``roi_head``, ``bbox_head``).
Called with ``train=True`` on a batch (DESIGN.md's batch contract) and one
PRNG key per example it returns a dict of named scalar losses (``"loss"`` is
their sum) and diagnostics; with ``train=False`` it returns fixed-size
:class:`~libra_jax.models.roi_head.Detections` with a leading batch axis.
Every shape is static; everything runs under ``jit``.

Loss normalizers (numbers of sampled anchors, RoIs or positives) are summed
over the batch; inside a data-parallel step, ``axis_name`` also sums them over
devices, so each device's losses are its share of the global-batch loss and
their sum over devices does not depend on how the batch is split.
"""

from typing import Any, Dict, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from libra_jax import losses
from libra_jax.models.bfp import BalancedFeaturePyramid
from libra_jax.models.fpn import FPN
from libra_jax.models.resnet import ResNet
from libra_jax.models.retina_head import RetinaHead, retina_detections, retina_targets
from libra_jax.models.roi_head import RoIHead, class_deltas, detect_boxes, sample_rois
from libra_jax.models.rpn import RPNHead, rpn_proposals, rpn_targets
from libra_jax.ops import anchors as anchor_ops
from libra_jax.ops import boxes as box_ops
from libra_jax.ops.roi_align import multilevel_roi_align

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class LibraNeck(nn.Module):
  """FPN followed by the balanced feature pyramid: children ``"0"`` and ``"1"`` as mmdetection's list neck."""
  fpn: Mapping[str, Any]
  bfp: Mapping[str, Any]
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, features):
    features = FPN(**self.fpn, dtype=self.dtype, name="0")(features)
    return BalancedFeaturePyramid(num_levels=len(features), **self.bfp, dtype=self.dtype, name="1")(features)


def gt_masks(batch):
  """Ground truth of a batch split into targets and crowd (ignore) regions.

  Returns ``(gt_valid [B, G], ignore_valid [B, G])``: real rows that are not
  crowd, and crowd rows. Padding rows (label -1) are in neither.
  """
  real = batch["labels"] >= 0
  crowd = batch["is_crowd"].astype(bool)
  return real & ~crowd, real & crowd


def _anchors(features, anchor_cfg, image_shape):
  """Anchors of every level, the concatenation, and each image's validity ``[B, N]``."""
  shapes = [tuple(f.shape[1:3]) for f in features]
  per_level = anchor_ops.anchor_grid(shapes, anchor_cfg["strides"], anchor_cfg["scales"], anchor_cfg["ratios"])
  num_base = len(anchor_cfg["scales"]) * len(anchor_cfg["ratios"])
  valid = jax.vmap(lambda s: jnp.concatenate(
      anchor_ops.valid_anchor_mask(s, shapes, anchor_cfg["strides"], num_base)))(image_shape)
  return per_level, jnp.concatenate(per_level), valid


def _finite_mean(values, mask):
  return jnp.sum(jnp.where(mask, values, 0.0)) / jnp.maximum(jnp.sum(mask), 1)


def _global_sum(value, axis_name):
  """``value`` summed over the devices of ``axis_name`` (as is, without one)."""
  return value if axis_name is None else jax.lax.psum(value, axis_name)


def _check_keys(keys, batch):
  if keys is None:
    raise ValueError("training needs PRNG keys, one per example: model.apply(variables, batch, train=True, "
                     "keys=jax.random.split(key, batch_size))")
  if keys.shape[:1] != batch["image"].shape[:1]:
    raise ValueError(f"expected one PRNG key per example ({batch['image'].shape[0]}), got keys of shape {keys.shape}")


class FasterRCNN(nn.Module):
  """Two-stage detector: backbone -> neck -> RPN -> proposals -> RoIAlign -> box head.

  Attributes:
    backbone, neck, rpn_head, roi_head: the learnable parts (adopted under
      these names).
    cfg: the model config (``anchors``, ``rpn``, ``rcnn``, ``train``,
      ``test`` sections; see ``configs/base_faster_rcnn.py``).
  """
  backbone: nn.Module
  neck: nn.Module
  rpn_head: nn.Module
  roi_head: nn.Module
  cfg: Mapping[str, Any]

  def _rois(self, features, rois):
    rcnn = self.cfg["rcnn"]
    levels = features[:len(rcnn["roi_strides"])]
    align = lambda f, r: multilevel_roi_align(f, r, rcnn["roi_size"], rcnn["roi_strides"], rcnn["sampling_ratio"],
                                              rcnn["finest_scale"])
    batch, num = rois.shape[:2]
    pooled = jax.vmap(align)(levels, jax.lax.stop_gradient(rois))
    logits, deltas = self.roi_head(pooled.reshape((batch * num,) + pooled.shape[2:]))
    return logits.reshape(batch, num, -1), deltas.reshape(batch, num, -1)

  def _first_stage(self, batch, train: bool):
    features = self.neck(self.backbone(batch["image"]))
    logits, deltas = self.rpn_head(features)
    per_level, anchors, anchor_valid = _anchors(features, self.cfg["anchors"], batch["image_shape"])
    stage = self.cfg["train"] if train else self.cfg["test"]
    propose = lambda lg, dl, av, shape: rpn_proposals(lg, dl, per_level, av, shape, **stage["rpn_proposal"])
    proposals = jax.vmap(propose)(jax.lax.stop_gradient(logits), jax.lax.stop_gradient(deltas), anchor_valid,
                                  batch["image_shape"])
    return features, logits, deltas, anchors, anchor_valid, proposals

  def proposals(self, batch: Mapping[str, jnp.ndarray]):
    """The RPN proposals the R-CNN stage samples from in training (``[B, P]`` ``Proposals``).

    Call with ``model.apply(variables, batch, method=FasterRCNN.proposals)``.
    """
    return self._first_stage(batch, train=True)[-1]

  @nn.compact
  def __call__(self, batch: Mapping[str, jnp.ndarray], *, train: bool, keys=None, axis_name=None):
    """Losses (``train``; ``keys [B]`` PRNG keys) or detections of ``batch``."""
    features, logits, deltas, anchors, anchor_valid, proposals = self._first_stage(batch, train)
    if train:
      _check_keys(keys, batch)
      return self._losses(keys, axis_name, batch, features, logits, deltas, anchors, anchor_valid, proposals)
    return self._detect(features, proposals, batch["image_shape"])

  def _losses(self, keys, axis_name, batch, features, logits, deltas, anchors, anchor_valid, proposals):
    stage_keys = jax.vmap(jax.random.split)(keys)
    rpn_keys, rcnn_keys = stage_keys[:, 0], stage_keys[:, 1]
    batch_size = logits.shape[0]
    example_valid = batch["valid"].astype(jnp.float32)
    gt_valid, ignore_valid = gt_masks(batch)
    train_cfg, rpn_cfg, rcnn_cfg = self.cfg["train"], self.cfg["rpn"], self.cfg["rcnn"]
    num_classes = self.roi_head.num_classes

    targets = jax.vmap(lambda k, av, g, gv, iv: rpn_targets(k, anchors, av, g, gv, g, iv, train_cfg["rpn"]))(
        rpn_keys, anchor_valid, batch["boxes"], gt_valid, ignore_valid)
    rpn_avg = _global_sum(jnp.sum(targets.num_samples * example_valid), axis_name)
    rpn_weights = targets.label_weights * example_valid[:, None]
    loss_rpn_cls = losses.build_loss(rpn_cfg["loss_cls"])(logits, targets.labels, rpn_weights, rpn_avg)
    loss_rpn_bbox = losses.build_loss(rpn_cfg["loss_bbox"])(
        deltas, targets.deltas, (targets.delta_weights * example_valid[:, None])[..., None], rpn_avg)

    sample = lambda k, p, pv, g, lab, gv, iv: sample_rois(k, p, pv, g, lab, gv, g, iv, num_classes, train_cfg["rcnn"])
    sampled = jax.vmap(sample)(rcnn_keys, proposals.boxes, proposals.valid, batch["boxes"], batch["labels"],
                               gt_valid, ignore_valid)
    cls_logits, reg_deltas = self._rois(features, sampled.rois)
    roi_weights = sampled.valid * example_valid[:, None]
    num_rois = jnp.maximum(_global_sum(jnp.sum(roi_weights), axis_name), 1.0)
    loss_cls = losses.build_loss(rcnn_cfg["loss_cls"])(cls_logits, sampled.labels, roi_weights, num_rois)
    pos_weights = (sampled.is_positive * example_valid[:, None]).astype(jnp.float32)
    own_deltas = jax.vmap(lambda d, lab: class_deltas(d, lab, num_classes))(reg_deltas, sampled.labels)
    bbox_loss = losses.build_loss(rcnn_cfg["loss_bbox"])
    if bbox_loss.registered.consumes == "boxes":
      decoded = box_ops.decode_deltas(sampled.rois, own_deltas, stds=rcnn_cfg["target_stds"])
      loss_bbox = bbox_loss(decoded, sampled.matched_boxes, pos_weights, num_rois)
    else:
      loss_bbox = bbox_loss(own_deltas, sampled.deltas, pos_weights[..., None], num_rois)

    predicted = jnp.argmax(cls_logits, axis=-1)
    positive = pos_weights > 0
    results = {
        "loss_rpn_cls": loss_rpn_cls, "loss_rpn_bbox": loss_rpn_bbox,
        "loss_cls": loss_cls, "loss_bbox": loss_bbox,
        "num_proposals": jnp.mean(jnp.sum(proposals.valid, axis=1).astype(jnp.float32)),
        "num_pos_rois": jnp.sum(pos_weights) / batch_size,
        "mean_pos_iou": _finite_mean(sampled.max_iou, positive),
        "rcnn_accuracy": _finite_mean((predicted == sampled.labels).astype(jnp.float32), roi_weights > 0),
        "rpn_num_pos": jnp.sum(targets.delta_weights) / batch_size,
    }
    results["loss"] = loss_rpn_cls + loss_rpn_bbox + loss_cls + loss_bbox
    return results

  def _detect(self, features, proposals, image_shape):
    rcnn, test = self.cfg["rcnn"], self.cfg["test"]["rcnn"]
    cls_logits, reg_deltas = self._rois(features, proposals.boxes)
    probs = jax.nn.softmax(cls_logits, axis=-1)[..., :-1]

    def one_image(boxes, deltas, scores, valid, shape):
      decoded = box_ops.decode_deltas(boxes, deltas, stds=rcnn["target_stds"], max_shape=shape)
      return detect_boxes(decoded.reshape(boxes.shape[0], -1, 4), scores, valid, **test)

    return jax.vmap(one_image)(proposals.boxes, reg_deltas, probs, proposals.valid, image_shape)


class RetinaNet(nn.Module):
  """One-stage detector: backbone -> neck -> RetinaNet head on P3..P7.

  Attributes:
    backbone, neck, bbox_head: the learnable parts (adopted under these names).
    cfg: the model config (``anchors``, ``head``, ``train``, ``test``).
  """
  backbone: nn.Module
  neck: nn.Module
  bbox_head: nn.Module
  cfg: Mapping[str, Any]

  @nn.compact
  def __call__(self, batch: Mapping[str, jnp.ndarray], *, train: bool, keys=None, axis_name=None):
    """Losses (``train``) or detections of ``batch``; ``keys`` are unused (no sampling)."""
    del keys
    features = self.neck(self.backbone(batch["image"]))
    cls_logits, deltas = self.bbox_head(features)
    per_level, anchors, anchor_valid = _anchors(features, self.cfg["anchors"], batch["image_shape"])
    if not train:
      detect = lambda c, d, av, shape: retina_detections(c, d, per_level, av, shape, **self.cfg["test"])
      return jax.vmap(detect)(cls_logits, deltas, anchor_valid, batch["image_shape"])

    gt_valid, ignore_valid = gt_masks(batch)
    example_valid = batch["valid"].astype(jnp.float32)
    num_classes = self.bbox_head.num_classes
    targets = jax.vmap(lambda av, g, lab, gv, iv: retina_targets(anchors, av, g, lab, gv, g, iv, num_classes,
                                                                 self.cfg["train"]))(
        anchor_valid, batch["boxes"], batch["labels"], gt_valid, ignore_valid)
    num_pos = jnp.maximum(_global_sum(jnp.sum(targets.num_pos * example_valid), axis_name), 1.0)
    head = self.cfg["head"]
    label_weights = targets.label_weights * example_valid[:, None]
    loss_cls = losses.build_loss(head["loss_cls"])(cls_logits, targets.labels, label_weights[..., None], num_pos)
    bbox_loss = losses.build_loss(head["loss_bbox"])
    delta_weights = targets.delta_weights * example_valid[:, None]
    if bbox_loss.registered.consumes == "boxes":
      decoded = box_ops.decode_deltas(anchors[None], deltas)
      loss_bbox = bbox_loss(decoded, targets.matched_boxes, delta_weights, num_pos)
    else:
      loss_bbox = bbox_loss(deltas, targets.deltas, delta_weights[..., None], num_pos)
    return {"loss_cls": loss_cls, "loss_bbox": loss_bbox, "loss": loss_cls + loss_bbox,
            "num_pos_anchors": jnp.sum(targets.num_pos * example_valid) / cls_logits.shape[0]}


def _frozen(config) -> Dict[str, Any]:
  """A ConfigDict or mapping as plain nested dicts with tuples (hashable leaves)."""
  if isinstance(config, ml_collections.ConfigDict):
    config = config.to_dict()
  if isinstance(config, Mapping):
    return {k: _frozen(v) for k, v in config.items()}
  if isinstance(config, list):
    return tuple(_frozen(v) for v in config)
  return config


def build_detector(model_config) -> nn.Module:
  """The detector a ``config.model`` describes (see ``configs/base_*.py``)."""
  cfg = _frozen(model_config)
  dtype = DTYPES[cfg.get("dtype", "float32")]
  backbone = ResNet(**cfg["backbone"], dtype=dtype)
  bfp = cfg["neck"].get("bfp")
  fpn = {k: v for k, v in cfg["neck"].items() if k != "bfp"}
  neck = LibraNeck(fpn, bfp, dtype=dtype) if bfp else FPN(**fpn, dtype=dtype)
  num_classes = cfg["num_classes"]
  num_anchors = len(cfg["anchors"]["scales"]) * len(cfg["anchors"]["ratios"])
  if cfg["type"] == "faster_rcnn":
    return FasterRCNN(backbone=backbone, neck=neck,
                      rpn_head=RPNHead(num_anchors, cfg["rpn"]["feat_channels"], dtype=dtype),
                      roi_head=RoIHead(num_classes, cfg["rcnn"]["fc_channels"], dtype=dtype), cfg=cfg)
  if cfg["type"] == "retinanet":
    head = RetinaHead(num_classes, num_anchors, cfg["head"]["feat_channels"], cfg["head"]["stacked_convs"],
                      cfg["head"]["prior_prob"], dtype=dtype)
    return RetinaNet(backbone=backbone, neck=neck, bbox_head=head, cfg=cfg)
  raise ValueError(f"unknown detector type {cfg['type']!r}; use 'faster_rcnn' or 'retinanet'")

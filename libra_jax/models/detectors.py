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

import contextlib
import contextvars
import functools
from typing import Any, Dict, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from libra_jax.models.bfp import BalancedFeaturePyramid
from libra_jax.models.fpn import FPN
from libra_jax.models.fpn import output_strides as fpn_output_strides
from libra_jax.models.own_padding import OwnArea
from libra_jax.models.resnet import OUTPUT_STRIDES, ResNet
from libra_jax.models.retina_head import RetinaHead, retina_detections, retina_loss
from libra_jax.models.postprocess import Detections
from libra_jax.models.roi_head import RoIHead, detect_boxes, rcnn_loss, sample_rois
from libra_jax.models.rpn import RPNHead, rpn_loss, rpn_proposals
from libra_jax.ops import anchors as anchor_ops
from libra_jax.ops import boxes as box_ops
from libra_jax.ops import conv
from libra_jax.ops.roi_align import batched_multilevel_roi_align
from libra_jax.ops.varying import vary_alike
from libra_jax.registry import Registry

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# Test time runs the R-CNN head over the proposal slots in this many equal chunks, up to the last chunk that holds a
# proposal: its cost follows the proposals the RPN found (535 and 608 of 1,000 slots per image in benchmarks/run.py's
# random Faster R-CNN at 512 x 512 batch 2), not the slots, at a granularity of 1/8 of them.
RCNN_TEST_CHUNKS = 8
_HEAD_OVER_EVERY_SLOT = contextvars.ContextVar("libra_jax_head_over_every_slot", default=False)


@contextlib.contextmanager
def flop_count_trace():
  """Inside, a detector traces the computation its FLOP count describes, for XLA's cost analysis: every
  convolution a direct one (``conv.direct_convolutions``) and the test-time R-CNN head on every proposal slot in
  one pass (the chunk loop's body would be counted once). The same caveat about JAX's trace caches applies."""
  token = _HEAD_OVER_EVERY_SLOT.set(True)
  try:
    with conv.direct_convolutions():
      yield
  finally:
    _HEAD_OVER_EVERY_SLOT.reset(token)


class LibraNeck(nn.Module):
  """FPN followed by the balanced feature pyramid: children ``"0"`` and ``"1"`` as mmdetection's list neck."""
  fpn: Mapping[str, Any]
  bfp: Mapping[str, Any]
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, features, area: Optional[OwnArea] = None):
    fpn = FPN(**self.fpn, dtype=self.dtype, name="0")
    features = fpn(features, area)
    strides = fpn_output_strides(OUTPUT_STRIDES, fpn.start_level, fpn.num_outs)
    return BalancedFeaturePyramid(num_levels=len(features), **self.bfp, dtype=self.dtype, name="1")(features, area,
                                                                                                      strides)


def gt_masks(batch):
  """Ground truth of a batch split into targets and crowd (ignore) regions.

  Returns ``(gt_valid [B, G], ignore_valid [B, G])``: real rows that are not
  crowd, and crowd rows. Padding rows (label -1) are in neither.
  """
  real = batch["labels"] >= 0
  crowd = batch["is_crowd"].astype(bool)
  return real & ~crowd, real & crowd


def feature_anchors(features, anchor_cfg, image_shape):
  """Anchors of every level of ``features``, their concatenation ``[N, 4]``, and each image's validity ``[B, N]``."""
  shapes = [tuple(f.shape[1:3]) for f in features]
  per_level = anchor_ops.anchor_grid(shapes, anchor_cfg["strides"], anchor_cfg["scales"], anchor_cfg["ratios"])
  num_base = len(anchor_cfg["scales"]) * len(anchor_cfg["ratios"])

  def image_valid(one_image_shape):
    return jnp.concatenate(anchor_ops.valid_anchor_mask(one_image_shape, shapes, anchor_cfg["strides"], num_base))

  return per_level, jnp.concatenate(per_level), jax.vmap(image_valid)(image_shape)


def batch_proposals(logits, deltas, anchors_per_level, anchor_valid, image_shape, proposal_cfg) -> Any:
  """Each image's RPN proposals (``[B, P]`` ``Proposals``) from the head's ``logits [B, N]`` and ``deltas [B, N, 4]``.

  No gradient flows into the head through the proposals.
  """
  propose = functools.partial(rpn_proposals, anchors_per_level=anchors_per_level, **proposal_cfg)
  return jax.vmap(propose)(logits=jax.lax.stop_gradient(logits), deltas=jax.lax.stop_gradient(deltas),
                           anchor_valid=anchor_valid, image_shape=image_shape)


def batch_sample_rois(keys, proposals, batch, num_classes: int, rcnn_train_cfg) -> Any:
  """Each image's sampled RoIs and their targets (``[B, S]`` ``SampledRoIs``); ``keys [B]``."""
  gt_valid, ignore_valid = gt_masks(batch)
  sample = functools.partial(sample_rois, num_classes=num_classes, cfg=rcnn_train_cfg)
  return jax.vmap(sample)(key=keys, proposals=proposals.boxes, proposal_valid=proposals.valid,
                          gt_boxes=batch["boxes"], gt_labels=batch["labels"], gt_valid=gt_valid,
                          ignore_boxes=batch["boxes"], ignore_valid=ignore_valid)


def align_rois(features, rois, rcnn_cfg, area: Optional[OwnArea] = None) -> jnp.ndarray:
  """RoIAlign of ``rois [B, R, 4]`` on the RoI levels of ``features``: ``[B, R, S, S, C]`` (no gradient to ``rois``).

  With ``area``, each image's maps end at its own area (``own_padding``).
  """
  return batched_multilevel_roi_align(
      features[:len(rcnn_cfg["roi_strides"])], jax.lax.stop_gradient(rois), output_size=rcnn_cfg["roi_size"],
      strides=rcnn_cfg["roi_strides"], sampling_ratio=rcnn_cfg["sampling_ratio"],
      finest_scale=rcnn_cfg["finest_scale"], valid_size=None if area is None else area.size)


def own_area(image_shape) -> Optional[OwnArea]:
  """The ``OwnArea`` of images of ``image_shape [B, 2]``; None for None (the whole bucket counts)."""
  return None if image_shape is None else OwnArea.of(image_shape)


def uses_own_padding(cfg, train: bool) -> bool:
  """Whether a forward pass computes each image as if padded to its own multiple of 32 (at test time, if set)."""
  return not train and cfg["test"].get("own_padding", False)


def stage_keys(keys):
  """The per-example keys ``[B]`` of a training forward -> (RPN sampler keys ``[B]``, R-CNN sampler keys ``[B]``)."""
  split = jax.vmap(jax.random.split)(keys)
  return split[:, 0], split[:, 1]


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

  def features(self, image: jnp.ndarray, image_shape=None):
    """The neck's feature maps of ``image [B, H, W, 3]``: a tuple of ``[B, H / s, W / s, C]``, strides 4 to 64.

    With ``image_shape [B, 2]``, each image computes as if padded only to its
    own multiple of 32, as in mmdetection's one-image test (``own_padding``);
    the maps are then meaningful inside that area only.
    """
    area = own_area(image_shape)
    return self.neck(self.backbone(image, area), area)

  def rpn_outputs(self, features, image_shape=None):
    """The RPN head on ``features``: objectness logits ``[B, N]`` and deltas ``[B, N, 4]`` (raw, stds 1).

    Rows follow ``libra_jax.ops.anchors.anchor_grid`` over the levels: per
    level, for y, for x, for each base anchor. ``image_shape``: as for
    ``features`` (pass the same).
    """
    return self.rpn_head(features, own_area(image_shape), self.cfg["anchors"]["strides"])

  def rcnn_outputs(self, features, rois, image_shape=None):
    """The R-CNN head on ``rois [B, R, 4]`` (xyxy pixels): class logits ``[B, R, C + 1]`` (C is background)
    and class-specific deltas ``[B, R, 4C]`` (before the stds). ``image_shape``: as for ``features``."""
    with jax.named_scope("roi_align"):
      pooled = align_rois(features, rois, self.cfg["rcnn"], own_area(image_shape))
    return self.box_head(pooled)

  def box_head(self, pooled):
    """The R-CNN head on RoI features ``[B, R, S, S, C]``: class logits ``[B, R, C + 1]``, deltas ``[B, R, 4C]``."""
    batch, num = pooled.shape[:2]
    logits, deltas = self.roi_head(pooled.reshape((batch * num,) + pooled.shape[2:]))
    return logits.reshape(batch, num, -1), deltas.reshape(batch, num, -1)

  def _first_stage(self, batch, train: bool):
    image_shape = batch["image_shape"] if uses_own_padding(self.cfg, train) else None
    features = self.features(batch["image"], image_shape)
    logits, deltas = self.rpn_outputs(features, image_shape)
    per_level, anchors, anchor_valid = feature_anchors(features, self.cfg["anchors"], batch["image_shape"])
    stage = self.cfg["train"] if train else self.cfg["test"]
    with jax.named_scope("proposals"):
      proposals = batch_proposals(logits, deltas, per_level, anchor_valid, batch["image_shape"],
                                  stage["rpn_proposal"])
    return features, logits, deltas, anchors, anchor_valid, proposals

  def layers(self, image: jnp.ndarray):
    """Every learnable layer once: the backbone, neck and RPN head on ``image [B, H, W, 3]``, the RoI head on one RoI.

    What :func:`init_variables` runs instead of the whole forward pass.
    """
    features = self.features(image)
    self.rpn_outputs(features)
    size = self.cfg["rcnn"]["roi_size"]
    return self.roi_head(jnp.zeros((1, size, size, features[0].shape[-1]), features[0].dtype))

  def proposals(self, batch: Mapping[str, jnp.ndarray], *, train: bool):
    """The RPN proposals of ``batch`` (``[B, P]`` ``Proposals``), with the ``train`` or ``test`` settings.

    ``train=True`` gives what the R-CNN stage samples from in training,
    ``train=False`` what detection starts from. Call with
    ``model.apply(variables, batch, train=False, method=FasterRCNN.proposals)``.
    """
    return self._first_stage(batch, train=train)[-1]

  def detections_from_proposals(self, features, proposals, image_shape, *, own_padding: bool = False) -> Detections:
    """The test-time second stage: the R-CNN head on ``proposals`` (``[B, P]`` ``Proposals``), softmax,
    class-specific decoding clipped to ``image_shape [B, 2]``, score threshold, per-class NMS, the best
    ``test.rcnn.max_per_img`` (``Detections`` with a leading batch axis). ``own_padding``: the features
    were computed with ``image_shape`` (RoIAlign then ends each image's maps at its own area). The head runs
    only up to the last of ``RCNN_TEST_CHUNKS`` chunks of proposal slots that holds a valid proposal."""
    rcnn, test = self.cfg["rcnn"], self.cfg["test"]["rcnn"]
    cls_logits, reg_deltas = self._rcnn_outputs_up_to_last_proposal(features, proposals,
                                                                     image_shape if own_padding else None)
    probs = jax.nn.softmax(cls_logits, axis=-1)[..., :-1]

    def one_image(boxes, deltas, scores, valid, shape):
      decoded = box_ops.decode_deltas(boxes, deltas, stds=rcnn["target_stds"], max_shape=shape)
      return detect_boxes(decoded.reshape(boxes.shape[0], -1, 4), scores, valid, **test)

    return jax.vmap(one_image)(proposals.boxes, reg_deltas, probs, proposals.valid, image_shape)

  def _rcnn_outputs_up_to_last_proposal(self, features, proposals, image_shape):
    """``rcnn_outputs`` of ``proposals [B, P]``'s boxes, in ``RCNN_TEST_CHUNKS`` chunks of ``ceil(P / chunks)``
    slots: a while loop runs the chunks up to the last one that holds a valid proposal in any image. Rows of the
    chunks after it (no proposal there) are 0; a row's values do not depend on the chunk it runs in. While
    initializing and inside ``flop_count_trace`` the head runs over every slot instead. The loop has no
    reverse-mode derivative (nothing differentiates test-time outputs)."""
    if self.is_initializing() or _HEAD_OVER_EVERY_SLOT.get():
      return self.rcnn_outputs(features, proposals.boxes, image_shape)
    batch, slots = proposals.valid.shape
    chunk = -(-slots // RCNN_TEST_CHUNKS)
    rois = jnp.pad(proposals.boxes, ((0, 0), (0, chunk * RCNN_TEST_CHUNKS - slots), (0, 0)))
    used_slots = jnp.max(jnp.where(proposals.valid, jnp.arange(1, slots + 1), 0))
    num_chunks = -(-used_slots // chunk)
    num_classes = self.roi_head.num_classes
    zeros = lambda width: vary_alike(jnp.zeros((batch, rois.shape[1], width), jnp.float32), rois)

    def run_chunk(module, carry):
      index, cls_logits, reg_deltas = carry
      start = index * chunk
      chunk_logits, chunk_deltas = module.rcnn_outputs(
          features, jax.lax.dynamic_slice_in_dim(rois, start, chunk, axis=1), image_shape)
      return (index + 1, jax.lax.dynamic_update_slice_in_dim(cls_logits, chunk_logits, start, axis=1),
              jax.lax.dynamic_update_slice_in_dim(reg_deltas, chunk_deltas, start, axis=1))

    _, cls_logits, reg_deltas = nn.while_loop(lambda module, carry: carry[0] < num_chunks, run_chunk, self,
                                              (vary_alike(jnp.int32(0), rois), zeros(num_classes + 1),
                                               zeros(4 * num_classes)))
    return cls_logits[:, :slots], reg_deltas[:, :slots]

  @nn.compact
  def __call__(self, batch: Mapping[str, jnp.ndarray], *, train: bool, keys=None, axis_name=None):
    """Losses (``train``; ``keys [B]`` PRNG keys) or detections of ``batch``."""
    features, logits, deltas, anchors, anchor_valid, proposals = self._first_stage(batch, train)
    if train:
      _check_keys(keys, batch)
      return self._losses(keys, axis_name, batch, features, logits, deltas, anchors, anchor_valid, proposals)
    return self.detections_from_proposals(features, proposals, batch["image_shape"],
                                          own_padding=uses_own_padding(self.cfg, train))

  def _losses(self, keys, axis_name, batch, features, logits, deltas, anchors, anchor_valid, proposals):
    rpn_keys, rcnn_keys = stage_keys(keys)
    gt_valid, ignore_valid = gt_masks(batch)
    example_valid = batch["valid"].astype(jnp.float32)
    with jax.named_scope("rcnn_sampling"):
      sampled = batch_sample_rois(rcnn_keys, proposals, batch, self.roi_head.num_classes, self.cfg["train"]["rcnn"])

    cls_logits, reg_deltas = self.rcnn_outputs(features, sampled.rois)

    with jax.named_scope("rpn_loss"):
      rpn = rpn_loss(rpn_keys, logits, deltas, anchors, anchor_valid, batch["boxes"], gt_valid, ignore_valid,
                     example_valid, train_cfg=self.cfg["train"]["rpn"], loss_cfg=self.cfg["rpn"], axis_name=axis_name)
    with jax.named_scope("rcnn_loss"):
      rcnn = rcnn_loss(cls_logits, reg_deltas, sampled, example_valid, cfg=self.cfg["rcnn"], axis_name=axis_name)

    loss = rpn["loss_rpn_cls"] + rpn["loss_rpn_bbox"] + rcnn["loss_cls"] + rcnn["loss_bbox"]
    num_proposals = jnp.mean(jnp.sum(proposals.valid, axis=1).astype(jnp.float32))
    return {**rpn, **rcnn, "loss": loss, "num_proposals": num_proposals}


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

  def layers(self, image: jnp.ndarray):
    """Every learnable layer once, on ``image [B, H, W, 3]``: what :func:`init_variables` runs."""
    return self.bbox_head(self.neck(self.backbone(image)))

  @nn.compact
  def __call__(self, batch: Mapping[str, jnp.ndarray], *, train: bool, keys=None, axis_name=None):
    """Losses (``train``) or detections of ``batch``; ``keys`` are unused (no sampling)."""
    del keys
    area = own_area(batch["image_shape"]) if uses_own_padding(self.cfg, train) else None
    features = self.neck(self.backbone(batch["image"], area), area)
    cls_logits, deltas = self.bbox_head(features, area, self.cfg["anchors"]["strides"])
    per_level, anchors, anchor_valid = feature_anchors(features, self.cfg["anchors"], batch["image_shape"])
    if not train:
      settings = {k: v for k, v in self.cfg["test"].items() if k != "own_padding"}
      detect = functools.partial(retina_detections, anchors_per_level=per_level, **settings)
      return jax.vmap(detect)(cls_logits=cls_logits, deltas=deltas, anchor_valid=anchor_valid,
                              image_shape=batch["image_shape"])

    gt_valid, ignore_valid = gt_masks(batch)
    results = retina_loss(cls_logits, deltas, anchors, anchor_valid, batch["boxes"], batch["labels"], gt_valid,
                          ignore_valid, batch["valid"].astype(jnp.float32), train_cfg=self.cfg["train"],
                          loss_cfg=self.cfg["head"], axis_name=axis_name)
    return {**results, "loss": results["loss_cls"] + results["loss_bbox"]}


def init_variables(model: nn.Module, key, image: jnp.ndarray) -> Dict[str, Any]:
  """``{"params", "batch_stats"}`` of a detector: the same arrays as ``model.init(key, batch, train=False)``.

  Only the learnable layers run (the detector's ``layers``), so a jitted
  initialization compiles convolutions and matmuls, not the proposals, NMS
  and RoIAlign of a whole forward pass. ``image`` is ``[B, H, W, 3]`` of any
  size the backbone takes; the parameters do not depend on it.
  """
  return model.init(key, image, method=type(model).layers)


def abstract_variables(model: nn.Module, image) -> Dict[str, Any]:
  """Shape structs (``jax.ShapeDtypeStruct``) of ``init_variables(model, key, image)``; nothing runs."""
  return jax.eval_shape(functools.partial(init_variables, model), jax.random.key(0), image)


def jitted_init(model: nn.Module):
  """``init_variables`` of ``model`` under ``jit``, as ``(key, image) -> variables``.

  It runs once per process, so on CPU it is compiled for compilation speed
  (XLA's backend optimization level 0: about 4x faster to compile for the
  tiny test detectors; the values agree with an optimized build to the last
  float bit or two).
  """
  options = {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else None
  return jax.jit(functools.partial(init_variables, model), compiler_options=options)


def _frozen(config) -> Dict[str, Any]:
  """A ConfigDict or mapping as plain nested dicts with tuples (hashable leaves)."""
  if isinstance(config, ml_collections.ConfigDict):
    config = config.to_dict()
  if isinstance(config, Mapping):
    return {k: _frozen(v) for k, v in config.items()}
  if isinstance(config, list):
    return tuple(_frozen(v) for v in config)
  return config


DETECTORS = Registry("detector type")


@DETECTORS.register("faster_rcnn")
def _faster_rcnn(cfg, backbone, neck, num_anchors, dtype) -> FasterRCNN:
  return FasterRCNN(backbone=backbone, neck=neck,
                    rpn_head=RPNHead(num_anchors, cfg["rpn"]["feat_channels"], dtype=dtype),
                    roi_head=RoIHead(cfg["num_classes"], cfg["rcnn"]["fc_channels"], dtype=dtype), cfg=cfg)


@DETECTORS.register("retinanet")
def _retinanet(cfg, backbone, neck, num_anchors, dtype) -> RetinaNet:
  head = RetinaHead(cfg["num_classes"], num_anchors, cfg["head"]["feat_channels"], cfg["head"]["stacked_convs"],
                    cfg["head"]["prior_prob"], dtype=dtype)
  return RetinaNet(backbone=backbone, neck=neck, bbox_head=head, cfg=cfg)


def build_detector(model_config) -> nn.Module:
  """The detector a ``config.model`` describes (see ``configs/base_*.py``); ``type`` names it in :data:`DETECTORS`."""
  cfg = _frozen(model_config)
  build = DETECTORS.get(cfg["type"])
  dtype = DTYPES[cfg.get("dtype", "float32")]
  backbone = ResNet(**cfg["backbone"], dtype=dtype)
  bfp = cfg["neck"].get("bfp")
  fpn = {k: v for k, v in cfg["neck"].items() if k != "bfp"}
  neck = LibraNeck(fpn, bfp, dtype=dtype) if bfp else FPN(**fpn, dtype=dtype)
  num_anchors = len(cfg["anchors"]["scales"]) * len(cfg["anchors"]["ratios"])
  return build(cfg, backbone, neck, num_anchors, dtype)

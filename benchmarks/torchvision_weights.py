"""Our detector's weights and images in torchvision's detector: a benchmark then compares one network in two frameworks.

With random weights of their own, the two frameworks' Faster R-CNNs keep
different numbers of RPN proposals (2026-12-05, 512 x 512 batch 2: ours 572
per image, torchvision's 267), and the second stage's work follows that count.
Given the same weights and the same images they compute the same backbone,
FPN and head outputs, up to the known differences below, so their proposals
and detections are nearly the same and the timing compares speed alone.

Names (our variables exported by ``libra_jax.convert.export_detector`` carry
mmdetection's names, in PyTorch layout):

| ours (mmdetection)                        | torchvision                                   |
|-------------------------------------------|-----------------------------------------------|
| ``backbone.*``                            | ``backbone.body.*``                           |
| ``neck.lateral_convs.{i}.conv``           | ``backbone.fpn.inner_blocks.{i}.0``           |
| ``neck.fpn_convs.{i}.conv``, a used level | ``backbone.fpn.layer_blocks.{i}.0``           |
| ``neck.fpn_convs.{i}.conv``, extra levels | ``backbone.fpn.extra_blocks.p6`` / ``.p7``    |
| ``rpn_head.rpn_conv`` / ``rpn_cls`` / ``rpn_reg`` | ``rpn.head.conv.0.0`` / ``cls_logits`` / ``bbox_pred`` |
| ``roi_head.bbox_head.shared_fcs.{0,1}``   | ``roi_heads.box_head.fc6`` / ``fc7``          |
| ``roi_head.bbox_head.fc_cls`` / ``fc_reg`` | ``roi_heads.box_predictor.cls_score`` / ``bbox_pred`` |
| ``bbox_head.{cls,reg}_convs.{i}.conv``    | ``head.{classification,regression}_head.conv.{i}.0`` |
| ``bbox_head.retina_cls``                 | ``head.classification_head.cls_logits``       |
| ``bbox_head.retina_reg``                 | ``head.regression_head.bbox_reg``             |

Values change in one place: the R-CNN classifier. mmdetection's background
is its last class, torchvision's its first, so ``cls_score`` is ``fc_cls``
with the last row moved to the front; torchvision regresses a box for the
background class too (it never decodes it), so ``bbox_pred`` is ``fc_reg``
after four zero rows. The box coders agree: torchvision's weights (10, 10, 5,
5) divide the deltas as mmdetection's target stds (0.1, 0.1, 0.2, 0.2)
multiply them.

Known differences that remain (the two frameworks' algorithms, not the
weights): torchvision's RetinaNet puts a ReLU between P6 and the P7 conv
(mmdetection does not); its RoIAlign samples 2 x 2 points per bin without
the half-pixel offset (mmdetection: ``aligned=True``, adaptive sampling),
and it rounds its base anchors to whole pixels.
"""

import re
from typing import Dict, Mapping

import numpy as np

# torchvision's normalization of [0, 1] images, which equals mmdetection's (and our data pipeline's) of 0..255
# images: mean (123.675, 116.28, 103.53), std (58.395, 57.12, 57.375).
TORCHVISION_MEAN = (0.485, 0.456, 0.406)
TORCHVISION_STD = (0.229, 0.224, 0.225)

_FASTER_RCNN_NAMES = (
    (r"rpn_head\.rpn_conv\.", "rpn.head.conv.0.0."),
    (r"rpn_head\.rpn_cls\.", "rpn.head.cls_logits."),
    (r"rpn_head\.rpn_reg\.", "rpn.head.bbox_pred."),
    (r"roi_head\.bbox_head\.shared_fcs\.0\.", "roi_heads.box_head.fc6."),
    (r"roi_head\.bbox_head\.shared_fcs\.1\.", "roi_heads.box_head.fc7."),
    (r"roi_head\.bbox_head\.fc_cls\.", "roi_heads.box_predictor.cls_score."),
    (r"roi_head\.bbox_head\.fc_reg\.", "roi_heads.box_predictor.bbox_pred."),
)
_RETINANET_NAMES = (
    (r"bbox_head\.cls_convs\.(\d+)\.conv\.", r"head.classification_head.conv.\1.0."),
    (r"bbox_head\.reg_convs\.(\d+)\.conv\.", r"head.regression_head.conv.\1.0."),
    (r"bbox_head\.retina_cls\.", "head.classification_head.cls_logits."),
    (r"bbox_head\.retina_reg\.", "head.regression_head.bbox_reg."),
)
_COMMON_NAMES = (
    (r"backbone\.", "backbone.body."),
    (r"neck\.lateral_convs\.(\d+)\.conv\.", r"backbone.fpn.inner_blocks.\1.0."),
)
FAMILIES = ("faster_rcnn", "retinanet")
_FPN_OUTPUT = re.compile(r"neck\.fpn_convs\.(\d+)\.conv\.(.*)")


def torchvision_name(name: str, family: str, num_used_levels: int) -> str:
  """torchvision's name of our (mmdetection-named) state-dict entry ``name``.

  Args:
    family: ``'faster_rcnn'`` or ``'retinanet'``.
    num_used_levels: how many backbone levels the FPN takes (4 for Faster
      R-CNN, 3 for RetinaNet); FPN outputs past them are torchvision's extra
      blocks ``p6`` and ``p7``.

  Raises:
    ValueError: an unknown ``family``, or a name torchvision's detector of
      that family has no place for (a Libra balanced feature pyramid's, say).
  """
  if family not in FAMILIES:
    raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
  fpn_output = _FPN_OUTPUT.fullmatch(name)
  if fpn_output:
    level, leaf = int(fpn_output.group(1)), fpn_output.group(2)
    if level < num_used_levels:
      return f"backbone.fpn.layer_blocks.{level}.0.{leaf}"
    return f"backbone.fpn.extra_blocks.p{level - num_used_levels + 6}.{leaf}"
  rules = _COMMON_NAMES + (_FASTER_RCNN_NAMES if family == "faster_rcnn" else _RETINANET_NAMES)
  for pattern, replacement in rules:
    renamed, count = re.subn("^" + pattern, replacement, name)
    if count:
      return renamed
  raise ValueError(f"{name}: torchvision's {family} has no such layer")


def torchvision_state_dict(state_dict: Mapping[str, np.ndarray], family: str) -> Dict[str, np.ndarray]:
  """Our detector's exported state dict (``libra_jax.convert.export_detector``) under torchvision's names and
  class order, for ``family`` ``'faster_rcnn'`` or ``'retinanet'`` (see the module docstring)."""
  num_used_levels = len({m.group(1) for m in map(re.compile(r"neck\.lateral_convs\.(\d+)\.").match, state_dict)
                         if m})
  result = {}
  for name, value in state_dict.items():
    value = np.array(value)
    if name.startswith("roi_head.bbox_head.fc_cls."):
      value = np.roll(value, 1, axis=0)
    elif name.startswith("roi_head.bbox_head.fc_reg."):
      value = np.concatenate([np.zeros((4,) + value.shape[1:], value.dtype), value])
    result[torchvision_name(name, family, num_used_levels)] = value
  return result


def torchvision_images(image: np.ndarray) -> np.ndarray:
  """``image [B, H, W, 3]`` normalized as our batches are (DESIGN.md) -> ``[B, 3, H, W]`` float32 in torchvision's
  input space (RGB that its own normalization maps back to ``image``: in [0, 1] for a real photo, wherever the
  values lead for synthetic ones)."""
  mean, std = np.asarray(TORCHVISION_MEAN, np.float32), np.asarray(TORCHVISION_STD, np.float32)
  return np.ascontiguousarray(np.transpose(np.asarray(image, np.float32) * std + mean, (0, 3, 1, 2)))

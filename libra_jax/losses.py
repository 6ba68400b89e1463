"""Detection losses as pure functions, chosen by name from a config.

Every loss here is an *elementwise* function ``(pred, target, **hparams) ->
loss`` with no reduction. One helper, :func:`weight_reduce_loss`, applies
per-element weights and mmdetection's ``reduction`` / ``avg_factor`` rule, so
any two losses are interchangeable in a head. Each loss is registered under a
name together with what it consumes:

- ``"deltas"``: encoded box deltas ``[..., 4]`` -> loss ``[..., 4]``
  (``balanced_l1``, ``smooth_l1``, ``l1``);
- ``"boxes"``: decoded xyxy boxes ``[..., 4]`` -> loss ``[...]`` (``iou``,
  ``giou``); :func:`box_regression_loss` decodes a head's deltas first;
- ``"logits"``: classification logits with integer or float targets
  (``cross_entropy``, ``sigmoid_cross_entropy``, ``sigmoid_focal``).

A new loss is one decorated function::

    @register_loss("my_l1", consumes="deltas")
    def my_l1(pred, target, scale=1.0):
      return scale * jnp.abs(pred - target)

and a config selects it with ``dict(name="my_l1", scale=2.0, loss_weight=1.0)``
passed to :func:`build_loss`.
"""

import dataclasses
import inspect
from typing import Callable, Dict, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from libra_jax.ops import boxes as box_ops
from libra_jax.registry import Registry

# mmdetection adds float32 epsilon to avg_factor before dividing.
AVG_FACTOR_EPS = float(np.finfo(np.float32).eps)

CONSUMES = ("deltas", "boxes", "logits")
# What a box-regression head can feed a loss.
BOX_CONSUMES = ("deltas", "boxes")


@dataclasses.dataclass(frozen=True)
class RegisteredLoss:
  """A named elementwise loss and the kind of input it consumes."""
  name: str
  fn: Callable[..., jnp.ndarray]
  consumes: str

  def hparams(self) -> Dict[str, object]:
    """Keyword hyper-parameters of the loss with their defaults."""
    params = list(inspect.signature(self.fn).parameters.values())[2:]
    return {p.name: p.default for p in params}


_REGISTRY: Registry[RegisteredLoss] = Registry("loss")


def register_loss(name: str, consumes: str):
  """Decorator: registers an elementwise loss ``fn(pred, target, **hparams)``."""
  if consumes not in CONSUMES:
    raise ValueError(f"consumes must be one of {CONSUMES}, got {consumes!r}")

  def decorate(fn):
    _REGISTRY.register(name)(RegisteredLoss(name, fn, consumes))
    return fn

  return decorate


def get_loss(name: str) -> RegisteredLoss:
  """The registered loss called ``name``; a ``KeyError`` lists the known names."""
  return _REGISTRY.get(name)


def registered_losses() -> Dict[str, RegisteredLoss]:
  """All registered losses by name (a copy)."""
  return _REGISTRY.entries()


def abs_error(pred, target) -> jnp.ndarray:
  """``|pred - target|`` whose gradient at 0 is 0, as in PyTorch.

  ``jax.grad(jnp.abs)(0.0)`` is 1, which would give every exactly-matched
  coordinate a full-size gradient; ``d * sign(d)`` has the same value and the
  subgradient 0 there, matching the reference's gradients.
  """
  diff = pred - target
  return diff * jnp.sign(diff)


def weight_reduce_loss(loss: jnp.ndarray, weight: Optional[jnp.ndarray] = None,
                       reduction: str = "mean",
                       avg_factor: Optional[jnp.ndarray] = None) -> jnp.ndarray:
  """mmdetection's ``weight_reduce_loss``.

  The loss is multiplied by ``weight`` (broadcast to the loss). Without
  ``avg_factor``: ``"mean"`` averages over all elements, ``"sum"`` adds them,
  ``"none"`` returns them. With ``avg_factor`` (e.g. the number of sampled
  RoIs) and ``"mean"``: ``sum / (avg_factor + eps)``; other reductions with an
  ``avg_factor`` are an error. An empty loss reduces to 0.
  """
  if reduction not in ("none", "mean", "sum"):
    raise ValueError(f"reduction must be 'none', 'mean' or 'sum', got {reduction!r}")
  if weight is not None:
    loss = loss * weight
  if avg_factor is None:
    if reduction == "none":
      return loss
    if loss.size == 0:
      return jnp.zeros((), loss.dtype)
    return jnp.mean(loss) if reduction == "mean" else jnp.sum(loss)
  if reduction != "mean":
    raise ValueError(f"avg_factor can only be used with reduction='mean', got {reduction!r}")
  return jnp.sum(loss) / (avg_factor + AVG_FACTOR_EPS)


def build_loss(config: Mapping) -> Callable[..., jnp.ndarray]:
  """A reduced loss ``f(pred, target, weight=None, avg_factor=None)`` from a config.

  Args:
    config: ``{"name": ..., "loss_weight": 1.0, "reduction": "mean", **hparams}``;
      hyper-parameters must be keyword arguments of the registered function.

  Returns:
    a function giving ``loss_weight * weight_reduce_loss(fn(pred, target,
    **hparams), weight, reduction, avg_factor)``, with the registered entry as
    its ``.registered`` attribute (so a head knows what the loss consumes).
  """
  config = dict(config)
  if "name" not in config:
    raise KeyError(f"loss config needs a 'name'; got keys {sorted(config)}")
  registered = get_loss(config.pop("name"))
  loss_weight = float(config.pop("loss_weight", 1.0))
  reduction = config.pop("reduction", "mean")
  known = registered.hparams()
  unknown = sorted(set(config) - set(known))
  if unknown:
    raise KeyError(f"loss {registered.name!r} has no hyper-parameter(s) {unknown}; "
                   f"it takes {sorted(known) + ['loss_weight', 'reduction']}")

  def loss(pred, target, weight=None, avg_factor=None):
    elementwise = registered.fn(pred, target, **config)
    return loss_weight * weight_reduce_loss(elementwise, weight, reduction, avg_factor)

  loss.registered = registered
  return loss


def box_regression_loss(loss: Callable[..., jnp.ndarray], deltas, priors, target_deltas, target_boxes, weight,
                        avg_factor, stds=(1.0, 1.0, 1.0, 1.0)) -> jnp.ndarray:
  """A built box loss applied to predicted deltas, as the loss consumes them.

  A ``"deltas"`` loss compares ``deltas`` with ``target_deltas`` (``weight``
  broadcast over the 4 coordinates); a ``"boxes"`` loss compares the deltas
  decoded against their priors with ``target_boxes``.

  Args:
    loss: from :func:`build_loss`.
    deltas: ``[..., 4]`` float32 predicted deltas, one row per prior.
    priors: ``[..., 4]`` xyxy pixels (anchors or RoIs) the deltas move,
      broadcastable against ``deltas``.
    target_deltas: ``[..., 4]`` float32 encoded matched gt boxes.
    target_boxes: ``[..., 4]`` matched gt boxes, xyxy pixels.
    weight: ``[...]`` float32 per-row weight (1 for positives).
    avg_factor: float32 scalar normalizer.
    stds: the box coder's stds the targets were encoded with.

  Returns:
    the float32 scalar loss.
  """
  if loss.registered.consumes == "boxes":
    return loss(box_ops.decode_deltas(priors, deltas, stds=stds), target_boxes, weight, avg_factor)
  return loss(deltas, target_deltas, weight[..., None], avg_factor)


def global_sum(value: jnp.ndarray, axis_name: Optional[str] = None) -> jnp.ndarray:
  """``value`` (a loss normalizer) summed over the devices of ``axis_name``; as is without one."""
  return value if axis_name is None else jax.lax.psum(value, axis_name)


@register_loss("balanced_l1", consumes="deltas")
def balanced_l1_loss(pred, target, alpha: float = 0.5, gamma: float = 1.5,
                     beta: float = 1.0) -> jnp.ndarray:
  """Balanced L1 loss (Libra R-CNN), elementwise, exactly as mmdetection computes it.

  With ``x = |pred - target|`` and ``b = exp(gamma / alpha) - 1``:
  ``alpha / b * (b x + 1) * log(b x / beta + 1) - alpha x`` for ``x < beta``,
  else ``gamma x + gamma / b - alpha beta``. For ``beta = 1`` the gradient is
  continuous (``alpha log(b + 1) = gamma``); for other ``beta`` (RetinaNet's
  0.11) mmdetection's formula has a kink at 0 and a jump at ``beta``, which
  we reproduce on purpose.

  Args:
    pred, target: ``[..., 4]`` (any equal shapes) float.
    alpha: how strongly inliers (small errors) are promoted.
    gamma: the upper bound of the gradient (slope for ``x >= beta``).
    beta: where the loss switches to linear, > 0.

  Returns:
    the elementwise loss, shape of ``pred``.
  """
  if beta <= 0:
    raise ValueError(f"balanced_l1 needs beta > 0, got {beta}")
  diff = abs_error(pred, target)
  b = float(np.e ** (gamma / alpha) - 1)
  inlier = alpha / b * (b * diff + 1) * jnp.log(b * diff / beta + 1) - alpha * diff
  outlier = gamma * diff + gamma / b - alpha * beta
  return jnp.where(diff < beta, inlier, outlier)


@register_loss("smooth_l1", consumes="deltas")
def smooth_l1_loss(pred, target, beta: float = 1.0) -> jnp.ndarray:
  """Smooth L1 (Huber / beta): ``0.5 x^2 / beta`` below ``beta``, ``x - beta / 2`` above."""
  if beta <= 0:
    raise ValueError(f"smooth_l1 needs beta > 0 (use 'l1' for beta = 0), got {beta}")
  diff = abs_error(pred, target)
  return jnp.where(diff < beta, 0.5 * diff * diff / beta, diff - 0.5 * beta)


@register_loss("l1", consumes="deltas")
def l1_loss(pred, target) -> jnp.ndarray:
  """Absolute error ``|pred - target|`` (the RPN's regression loss in mmdetection 3.x)."""
  return abs_error(pred, target)


@register_loss("iou", consumes="boxes")
def iou_loss(pred, target, mode: str = "log", eps: float = 1e-6) -> jnp.ndarray:
  """IoU loss of aligned box pairs ``[..., 4]`` -> ``[...]``.

  ``mode``: ``"log"`` gives ``-log(max(iou, eps))``, ``"linear"`` ``1 - iou``,
  ``"square"`` ``1 - iou^2`` (mmdetection's ``IoULoss`` modes).
  """
  overlap = box_ops.iou(pred, target, aligned=True)
  if mode == "log":
    return -jnp.log(jnp.maximum(overlap, eps))
  if mode == "linear":
    return 1.0 - overlap
  if mode == "square":
    return 1.0 - overlap * overlap
  raise ValueError(f"iou loss mode must be 'log', 'linear' or 'square', got {mode!r}")


@register_loss("giou", consumes="boxes")
def giou_loss(pred, target) -> jnp.ndarray:
  """GIoU loss ``1 - giou`` of aligned box pairs ``[..., 4]`` -> ``[...]``, in [0, 2]."""
  return 1.0 - box_ops.giou(pred, target, aligned=True)


@register_loss("cross_entropy", consumes="logits")
def cross_entropy_loss(logits, labels) -> jnp.ndarray:
  """Softmax cross-entropy: logits ``[..., K]``, int labels ``[...]`` in [0, K) -> ``[...]``.

  Padding labels (-1) give a finite value; give them weight 0.
  """
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  safe_labels = jnp.clip(labels, 0, logits.shape[-1] - 1)
  return -jnp.take_along_axis(log_probs, safe_labels[..., None], axis=-1)[..., 0]


@register_loss("sigmoid_cross_entropy", consumes="logits")
def sigmoid_cross_entropy_loss(logits, targets) -> jnp.ndarray:
  """Binary cross-entropy with logits, elementwise; ``targets`` in [0, 1], shape of ``logits``."""
  logits = logits.astype(jnp.float32)
  return jnp.maximum(logits, 0) - logits * targets + jnp.log1p(jnp.exp(-jnp.abs(logits)))


@register_loss("sigmoid_focal", consumes="logits")
def sigmoid_focal_loss(logits, labels, gamma: float = 2.0, alpha: float = 0.25) -> jnp.ndarray:
  """Sigmoid focal loss (RetinaNet), elementwise over classes.

  Args:
    logits: ``[..., C]`` float, one sigmoid per object class.
    labels: ``[...]`` int in [0, C]; C is background (an all-zero target row).
    gamma: focusing exponent; alpha: weight of the positive class.

  Returns:
    ``[..., C]``: ``BCE(p, t) * (alpha t + (1 - alpha)(1 - t)) * |t - p|^gamma``.
  """
  num_classes = logits.shape[-1]
  targets = jax.nn.one_hot(labels, num_classes + 1, dtype=jnp.float32)[..., :num_classes]
  probs = jax.nn.sigmoid(logits.astype(jnp.float32))
  miss = (1 - probs) * targets + probs * (1 - targets)
  class_weight = alpha * targets + (1 - alpha) * (1 - targets)
  return sigmoid_cross_entropy_loss(logits, targets) * class_weight * miss ** gamma

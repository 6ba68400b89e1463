"""SGD with momentum, the reference's learning-rate schedule, and frozen-parameter masks.

mmdetection's schedule: SGD(momentum 0.9, weight decay 1e-4 on every
parameter, coupled as in PyTorch: ``g + wd * p``), a linear warm-up of the
learning-rate factor from ``warmup_ratio`` to 1 over ``warmup_steps``
iterations, and x``gamma`` at each milestone. Frozen parameters (the stem
and first stage of the backbone) get neither updates nor decay.
"""

from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import optax

from libra_jax.models.resnet import frozen_param_prefixes


def learning_rate_schedule(base_lr: float, warmup_steps: int, warmup_ratio: float,
                           milestones: Sequence[int], gamma: float) -> optax.Schedule:
  """``lr(step) = base_lr * warmup(step) * gamma ** #(milestones <= step)``.

  ``warmup(step) = warmup_ratio + (1 - warmup_ratio) * step / warmup_steps``
  below ``warmup_steps`` and 1 after (mmengine's ``LinearLR``, by iteration).
  """
  milestones = jnp.asarray(sorted(milestones), jnp.int32)

  def schedule(step):
    step = jnp.asarray(step)
    if warmup_steps > 0:
      warmup = warmup_ratio + (1.0 - warmup_ratio) * jnp.minimum(step, warmup_steps) / warmup_steps
    else:
      warmup = 1.0
    decays = jnp.sum(step >= milestones)
    return base_lr * warmup * gamma ** decays

  return schedule


def scaled_base_lr(lr_per_16: float, global_batch_size: int) -> float:
  """The linear scaling rule: the reference's lr is for 16 images per step."""
  return lr_per_16 * global_batch_size / 16


def trainable_mask(params: Mapping[str, Any], frozen_stages: int) -> Any:
  """A pytree of bools like ``params``: False under the frozen backbone parts."""
  frozen = set(frozen_param_prefixes(frozen_stages))

  def mark(path, _):
    keys = [str(getattr(k, "key", k)) for k in path]
    return not (len(keys) > 1 and keys[0] == "backbone" and keys[1] in frozen)

  return jax.tree_util.tree_map_with_path(mark, params)


def schedule_from_config(optim_config, global_batch_size: int, steps_per_epoch: int) -> optax.Schedule:
  """The learning-rate schedule of ``config.optim`` (milestones given in epochs)."""
  return learning_rate_schedule(scaled_base_lr(optim_config.lr_per_16, global_batch_size),
                                optim_config.warmup_steps, optim_config.warmup_ratio,
                                [int(e * steps_per_epoch) for e in optim_config.milestone_epochs],
                                optim_config.gamma)


def make_optimizer(optim_config, global_batch_size: int, steps_per_epoch: int, params: Mapping[str, Any],
                   frozen_stages: int) -> optax.GradientTransformation:
  """The optax transformation of ``config.optim`` for ``params``.

  ``optim_config``: ``lr_per_16``, ``momentum``, ``weight_decay``,
  ``warmup_steps``, ``warmup_ratio``, ``milestone_epochs``, ``gamma``,
  ``grad_clip_norm`` (None or 0 for no clipping).
  """
  steps = []
  if optim_config.grad_clip_norm:
    steps.append(optax.clip_by_global_norm(optim_config.grad_clip_norm))
  steps += [optax.add_decayed_weights(optim_config.weight_decay),
            optax.sgd(schedule_from_config(optim_config, global_batch_size, steps_per_epoch),
                      momentum=optim_config.momentum)]
  mask = trainable_mask(params, frozen_stages)
  return optax.multi_transform({"train": optax.chain(*steps), "frozen": optax.set_to_zero()},
                               jax.tree.map(lambda m: "train" if m else "frozen", mask))

"""The data-parallel train step: per-device code mapped over a 1-D ``'data'`` mesh.

The step is written per shard (each device sees its slice of the global
batch) and wrapped in ``jax.shard_map`` inside ``jax.jit``. The model
normalizes each device's losses by global-batch counts (``axis_name``), so the
objective is their sum ``lax.psum(loss, 'data')``, and its gradient is taken
directly: with ``check_vma`` on, the cotangent of a replicated parameter is
summed over devices by shard_map itself, so a further ``pmean``/``psum`` of
the gradients would scale them by the device count. Randomness is per example
(keys from the step and the example's global index), so one device and N
devices take exactly the same step; a test asserts it.
"""

from typing import Any, Callable, Dict, Tuple

import flax
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, PartitionSpec as P

from libra_jax.runtime import DATA_AXIS, replicated
from libra_jax.training import optim


@flax.struct.dataclass
class TrainState:
  """Everything a step reads and writes (checkpointed whole)."""
  step: jnp.ndarray                 # int32 scalar: steps taken
  params: Any                       # trainable variables ('params' collection)
  batch_stats: Any                  # frozen BatchNorm statistics
  opt_state: Any
  rng: jnp.ndarray                  # uint32 raw PRNG key data; example i of step k uses fold_in(fold_in(rng, k), i)
  skipped_steps: jnp.ndarray        # int32 scalar: steps skipped for a non-finite loss


def new_train_state(variables, optimizer: optax.GradientTransformation, rng) -> TrainState:
  """Step 0 of training ``variables`` (``{"params", "batch_stats"}``) with ``optimizer``; ``rng`` is the run's key."""
  return TrainState(step=jnp.int32(0), params=variables["params"], batch_stats=variables["batch_stats"],
                    opt_state=optimizer.init(variables["params"]), rng=jax.random.key_data(rng),
                    skipped_steps=jnp.int32(0))


def optimizer_and_state(config, variables, mesh: Mesh) -> Tuple[optax.GradientTransformation, TrainState]:
  """The run's optimizer (``config.optim``) and its train state at step 0 from ``variables``, replicated on
  ``mesh``: ``(optimizer, state)``."""
  optimizer = optim.make_optimizer(config.optim, config.global_batch_size, config.steps_per_epoch,
                                   variables["params"], config.model.backbone.frozen_stages)
  state = new_train_state(variables, optimizer, jax.random.fold_in(jax.random.key(config.seed), 1))
  return optimizer, jax.device_put(state, replicated(mesh))


def make_train_step(model, optimizer: optax.GradientTransformation, mesh: Mesh,
                    skip_nonfinite: bool = False) -> Callable[[TrainState, Dict[str, jnp.ndarray]],
                                                              Tuple[TrainState, Dict[str, jnp.ndarray]]]:
  """A jitted ``(state, global batch) -> (state, metrics)`` over all devices of ``mesh``.

  Args:
    model: a detector from ``build_detector``.
    optimizer: from ``make_optimizer``.
    mesh: 1-D ``'data'`` mesh; the batch's leading axis is split over it.
    skip_nonfinite: when the loss is not finite, keep the old parameters and
      optimizer state and count the step instead of applying NaN updates
      (the loop otherwise stops the run on such a step).

  Metrics are the model's named losses and diagnostics averaged over devices,
  plus ``grad_norm`` and ``finite`` (1.0 when the loss was finite).
  """

  def per_device(state: TrainState, batch):
    local_size = batch["image"].shape[0]
    first = jax.lax.axis_index(DATA_AXIS) * local_size
    step_key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    keys = jax.vmap(lambda i: jax.random.fold_in(step_key, i))(first + jnp.arange(local_size))

    def loss_fn(params):
      outputs = model.apply({"params": params, "batch_stats": state.batch_stats}, batch, train=True, keys=keys,
                            axis_name=DATA_AXIS)
      outputs = {name: jax.lax.psum(value, DATA_AXIS) if name.startswith("loss") else
                 jax.lax.pmean(value, DATA_AXIS) for name, value in outputs.items()}
      return outputs["loss"], outputs

    grads, metrics = jax.grad(loss_fn, has_aux=True)(state.params)
    with jax.named_scope("optimizer"):
      updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
      params = optax.apply_updates(state.params, updates)
    finite = jnp.isfinite(metrics["loss"])
    metrics = dict(metrics, grad_norm=optax.tree.norm(grads), finite=finite.astype(jnp.float32))
    if skip_nonfinite:
      keep = lambda new, old: jnp.where(finite, new, old)
      params = jax.tree.map(keep, params, state.params)
      opt_state = jax.tree.map(keep, opt_state, state.opt_state)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                              skipped_steps=state.skipped_steps + (~finite).astype(jnp.int32))
    return new_state, metrics

  mapped = jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(DATA_AXIS)), out_specs=(P(), P()))
  return jax.jit(mapped, donate_argnums=0)


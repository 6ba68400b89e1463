"""The jitted detection step, data-parallel over a mesh.

A module of its own so that code which only runs the step (benchmarks, a
step profile) imports JAX and the model, not the data pipeline (TensorFlow)
or COCO's evaluation.
"""

from typing import Any, Callable, Dict

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from libra_jax import runtime


def make_predict_step(model, mesh: Mesh) -> Callable[[Dict[str, Any], Dict[str, jnp.ndarray]], Any]:
  """A jitted ``(variables, global batch) -> Detections`` data-parallel over ``mesh`` (batch split on ``'data'``)."""

  def per_device(variables, batch):
    return model.apply(variables, batch, train=False)

  mapped = jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(runtime.DATA_AXIS)), out_specs=P(runtime.DATA_AXIS))
  return jax.jit(mapped)

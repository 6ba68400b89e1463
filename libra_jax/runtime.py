"""What every command that runs a model shares: the ``'data'`` mesh, host <-> global arrays, the compilation cache.

Training, evaluation and predict all place batches on one 1-D mesh over
every device of every process (DESIGN.md principle 4): each process hands its
own rows of the global batch to :func:`to_global`, and parameters are
replicated.
"""

import pathlib
from typing import Dict

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from libra_jax.errors import ConfigError

DATA_AXIS = "data"


def make_mesh(devices=None) -> Mesh:
  """A 1-D mesh over all (or the given) devices with the ``'data'`` axis."""
  devices = jax.devices() if devices is None else devices
  return jax.make_mesh((len(devices),), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=devices)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over ``'data'``."""
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  """The same full value on every device."""
  return NamedSharding(mesh, P())


def to_global(batch: Dict[str, np.ndarray], mesh: Mesh) -> Dict[str, jax.Array]:
  """This process's rows of a batch -> global arrays split over the ``'data'`` mesh axis."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}


def enable_compilation_cache(config, workdir) -> None:
  """Turns on JAX's persistent compilation cache (``config.compilation_cache_dir`` or ``workdir/xla_cache``)."""
  directory = config.get("compilation_cache_dir") or str(pathlib.Path(workdir) / "xla_cache")
  jax.config.update("jax_compilation_cache_dir", directory)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def check_batch_sizes(config, mesh: Mesh) -> None:
  """Raises ``ConfigError`` unless the batch sizes split evenly over the devices and processes."""
  for name in ("global_batch_size", "eval_batch_size"):
    if config[name] % mesh.size or config[name] % jax.process_count():
      raise ConfigError(f"config.{name}={config[name]} must be a multiple of the {mesh.size} devices; set "
                        f"--config.{name} to one")

"""What every command that runs a model shares: the ``'data'`` mesh, host <-> global arrays, the compilation cache.

Training, evaluation and predict all place batches on one 1-D mesh over
every device of every process (DESIGN.md principle 4): each process hands its
own rows of the global batch to :func:`to_global`, and parameters are
replicated. The mesh lists each process's devices together, in process
order, so process ``p`` owns a contiguous block of every global batch; its
rows come back with :func:`to_local`.
"""

import contextlib
import gc
import logging
import pathlib
import pickle
import time
from typing import Any, Dict, List, Set, Tuple

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from libra_jax import xla_cache
from libra_jax.errors import ConfigError

DATA_AXIS = "data"

_log = logging.getLogger(__name__)


def make_mesh(devices=None) -> Mesh:
  """A 1-D mesh over all (or the given) devices with the ``'data'`` axis, grouped by process in process order."""
  devices = sorted(jax.devices() if devices is None else devices, key=lambda d: (d.process_index, d.id))
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


def to_local(tree: Any) -> Any:
  """The rows of batch-sharded global arrays that this process put there with :func:`to_global`, as numpy."""

  def local_rows(array):
    shards = sorted(array.addressable_shards, key=lambda shard: shard.index[0].start or 0)
    unique = {shard.index[0].start: shard for shard in shards}  # a replica per device at most once
    return np.concatenate([np.asarray(shard.data) for shard in unique.values()])

  return jax.tree.map(local_rows, tree)


def all_processes(values: np.ndarray) -> np.ndarray:
  """``[k]`` on each process -> ``[num_processes, k]``, every process's values in process order (a collective)."""
  values = np.asarray(values)
  if jax.process_count() == 1:
    return values[None]
  return np.asarray(multihost_utils.process_allgather(values))


def gather_objects(value: Any) -> List[Any]:
  """Any picklable ``value`` of each process -> the list of all of them in process order, on every process."""
  if jax.process_count() == 1:
    return [value]
  data = np.frombuffer(pickle.dumps(value), np.uint8)
  sizes = all_processes(np.array([len(data)], np.int64))[:, 0]
  padded = np.zeros(int(sizes.max()), np.uint8)
  padded[:len(data)] = data
  gathered = all_processes(padded)
  return [pickle.loads(gathered[i, :size].tobytes()) for i, size in enumerate(sizes)]


def enable_compilation_cache(config, workdir) -> None:
  """Turns on JAX's persistent compilation cache (``config.compilation_cache_dir`` or ``workdir/xla_cache``).

  Which programs it keeps follows JAX's settings (by default, those that took
  at least a second to compile; ``JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS``).
  The first process first deletes the entries that a process stopped while
  writing them left cut short (``libra_jax.xla_cache``), which JAX would
  otherwise fail to read, and compile again, at every start. Within a run only
  the first process writes entries; another run sharing the directory may
  lose an entry it is writing at that moment, to be compiled again later.
  """
  directory = config.get("compilation_cache_dir") or str(pathlib.Path(workdir) / "xla_cache")
  if jax.process_index() == 0:
    xla_cache.remove_unreadable_entries(directory)
  jax.config.update("jax_compilation_cache_dir", directory)


def check_batch_sizes(config, mesh: Mesh) -> None:
  """Raises ``ConfigError`` unless the batch sizes split evenly over the devices and processes."""
  for name in ("global_batch_size", "eval_batch_size"):
    if config[name] % mesh.size or config[name] % jax.process_count():
      raise ConfigError(f"config.{name}={config[name]} must be a multiple of the {mesh.size} devices; set "
                        f"--config.{name} to one")


@contextlib.contextmanager
def cyclic_gc_paused():
  """Python's cyclic garbage collector off inside (reference counting still frees memory), as it was after.

  Tracing a detector's step allocates millions of short-lived objects, and
  the collector's passes over the live objects (TensorFlow's and the input
  pipeline's included) add up during one trace. With TensorFlow imported
  (505,000 live objects), tracing Libra Faster R-CNN R-50's train step at
  800x1344 took 3.2-3.9 s with the collector on and 2.3-3.2 s with it
  paused, in alternation in one process (2026-12-04).

  On the way out (when it turns the collector back on) it collects the
  youngest generation, which the pause let grow: the collection that the
  next allocation would start anyway, so that a time taken around the
  ``with`` includes it (0.07-0.08 s after Libra R-50's train step compiled
  for 128x128 images).
  """
  enabled = gc.isenabled()
  gc.disable()
  try:
    yield
  finally:
    if enabled:
      gc.enable()
      gc.collect(0)


class CompilationLog:
  """Announces each compilation of a jitted step: one line before its first call with a new image size, one after.

  That first call compiles the step (or reads it from the persistent cache);
  with JAX's asynchronous dispatch the call returns once that is done, so the
  time between the two lines is the compilation's, minutes on a CPU for a
  ResNet-50 detector, which a person would otherwise watch in silence. The
  cyclic garbage collector is paused for that call (:func:`cyclic_gc_paused`).
  """

  def __init__(self, step_name: str):
    self.step_name = step_name
    self.sizes: Set[Tuple[int, int]] = set()

  @contextlib.contextmanager
  def around(self, image: Any):
    """Wraps the step's call on a batch whose images are ``image`` (``[B, H, W, C]``)."""
    size = tuple(int(n) for n in image.shape[1:3])
    if size in self.sizes:
      yield
      return
    _log.info("compiling the %s for %dx%d images (or reading it from the compilation cache) ...", self.step_name,
              *size)
    start = time.perf_counter()
    with cyclic_gc_paused():
      yield
    self.sizes.add(size)
    _log.info("compiled the %s for %dx%d images in %.1f s", self.step_name, *size, time.perf_counter() - start)

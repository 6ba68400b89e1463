"""Several processes, one mesh: ``config.distributed`` and the keys that place this process among the others.

``--config.distributed=True --config.coordinator_address=HOST:PORT
--config.num_processes=N --config.process_id=I`` starts process ``I`` of ``N``;
with ``distributed=True`` alone, JAX detects the topology where the cluster
announces it (a Cloud TPU VM, a SLURM job, an Open MPI launch). On CPU the
processes exchange data over gloo.
"""

import os
import pathlib

from libra_jax.errors import ConfigError


def detected_cluster() -> str:
  """The name of a cluster whose topology JAX can detect by itself here, or ``""``."""
  if os.environ.get("SLURM_JOB_ID") and os.environ.get("SLURM_NTASKS"):
    return "SLURM"
  if os.environ.get("OMPI_MCA_orte_hnp_uri") or os.environ.get("OMPI_COMM_WORLD_SIZE"):
    return "Open MPI"
  if os.environ.get("TPU_ACCELERATOR_TYPE") or pathlib.Path("/dev/accel0").exists() or \
      pathlib.Path("/dev/vfio/0").exists():
    return "Cloud TPU"
  return ""


def check_topology(config) -> None:
  """Raises ``ConfigError`` unless ``config`` (with ``distributed=True``) says or lets JAX find the processes."""
  address = config.get("coordinator_address", "")
  num, index = config.get("num_processes", 0), config.get("process_id", -1)
  if address:
    if ":" not in address:
      raise ConfigError(f"config.coordinator_address={address!r} must be HOST:PORT of process 0, e.g. "
                        f"10.0.0.2:1234")
    if num < 1 or not 0 <= index < num:
      raise ConfigError(f"with config.coordinator_address, set --config.num_processes=N (N >= 1) and "
                        f"--config.process_id=I (0 <= I < N) on every process; got N={num}, I={index}")
  elif not detected_cluster():
    raise ConfigError("config.distributed=True needs a coordinator: pass --config.coordinator_address=HOST:PORT "
                      "--config.num_processes=N --config.process_id=I on every process (on a Cloud TPU VM, "
                      "under SLURM or Open MPI they are detected), or drop --config.distributed for one process")


def initialize(config) -> None:
  """Joins the processes of ``config`` (``distributed=True``) into one JAX runtime; call before anything else."""
  import jax
  check_topology(config)
  # Only the CPU backend reads this; accelerators keep their own collectives.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  address = config.get("coordinator_address", "")
  if address:
    jax.distributed.initialize(coordinator_address=address, num_processes=config.num_processes,
                               process_id=config.process_id)
  else:
    jax.distributed.initialize()

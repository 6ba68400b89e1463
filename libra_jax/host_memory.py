"""Keeping freed host memory in the process, so that a CPU step does not page-fault its buffers in every time.

XLA:CPU allocates each execution's temporary buffer afresh (1.8 GB for the
Faster R-CNN R-50 train step at 512 x 512 batch 2, 4.3 GB at 800 x 1344) and
frees it at the end. glibc's malloc serves an allocation that large with a
fresh ``mmap`` and returns it with ``munmap``, so every step page-faults the
whole buffer in again, and the kernel zeroes each page first. On 2 cores
that was about 2 s of a 10 s step at 800 x 1344 and 0.2 s of 4.6 s at
512 x 512 batch 2 (2026-12-04); 0.6-0.9 s of 6.0-6.2 s and 0.4-0.5 s of
3.4-3.6 s in ``benchmarks/bench_host_memory.py``'s rows (2026-12-06).

:func:`keep_freed_host_memory` sets three glibc malloc parameters
(``mallopt(3)``), as the environment variables ``MALLOC_ARENA_MAX=1``,
``MALLOC_MMAP_MAX_=0`` and ``MALLOC_TRIM_THRESHOLD_=-1`` would at start-up:
one arena for every thread (the only one that can grow past 64 MB without
``mmap``), no ``mmap`` for large blocks, and no trimming of the heap. A freed
block then stays in the process and a later step reuses it without a fault.
A step may still add a large buffer's worth of memory, when smaller blocks
allocated in between have split the freed buffer so that it no longer fits,
and the process keeps that memory until it exits. In
``benchmarks/bench_host_memory.py``'s rows (2026-12-06) the Faster R-CNN R-50
train step at 800 x 1344 took 5.2-5.4 s a step with it and 6.0-6.2 s
without. Without it the process peaked at 4.6 GB; with it at 7.7 or 11.0 GB,
growing from 4.5 GB by 3.3 GB at a time. The heap last grew at the 2nd to
the 25th step of processes of 16 or 60 steps. README, "Host memory on the
CPU", has the table.

Threads that allocated before the call keep their own arenas, and XLA:CPU's
worker threads start with the backend, so it must run before the first JAX
computation. Every command does this (``libra_jax.cli.run``, through
:func:`keep_freed_host_memory_where_wanted`), where JAX computes on the CPU
(:func:`jax_computes_on_host`); on accelerator hosts the step's buffers live
in device memory, so nothing is changed there.

Who is short of memory rather than time declines it with
``LIBRA_JAX_KEEP_HOST_MEMORY=0``. Unset, it is done unless the environment
already sets glibc's own malloc parameters (``MALLOC_ARENA_MAX``,
``MALLOC_ARENA_TEST``, ``MALLOC_MMAP_MAX_``, ``MALLOC_MMAP_THRESHOLD_``,
``MALLOC_TOP_PAD_``, ``MALLOC_TRIM_THRESHOLD_``, or ``glibc.malloc.*`` in
``GLIBC_TUNABLES``): those are the user's choice, and ``mallopt`` would
silently override them. ``LIBRA_JAX_KEEP_HOST_MEMORY=1`` sets it even over
them.
"""

import ctypes
import importlib.metadata
import importlib.util
import logging
import os
import resource
import sys
from typing import List, Optional

from libra_jax.errors import ConfigError

# mallopt(3) parameter numbers, from glibc's <malloc.h>.
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8
# (parameter, value): one arena, no mmap for large blocks, never trim (-1 disables trimming, per mallopt(3)).
SETTINGS = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1))
# 0 declines the settings, 1 asks for them; unset, see wanted().
SWITCH_ENV = "LIBRA_JAX_KEEP_HOST_MEMORY"
# glibc's own environment variables for malloc's parameters (mallopt(3)), read when a process starts.
GLIBC_MALLOC_ENV = ("MALLOC_ARENA_MAX", "MALLOC_ARENA_TEST", "MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_",
                    "MALLOC_TOP_PAD_", "MALLOC_TRIM_THRESHOLD_")

_log = logging.getLogger(__name__)


def uses_glibc() -> bool:
  """Whether the process's C library is glibc (not macOS's or musl)."""
  return hasattr(ctypes.CDLL(None), "gnu_get_libc_version")


def keep_freed_host_memory() -> bool:
  """Sets glibc's malloc to keep and reuse freed memory (see the module docstring).

  Returns whether it did: False where the C library is not glibc, which
  keeps its own behaviour.
  """
  if not uses_glibc():
    _log.debug("the C library is not glibc: host memory is returned as it decides")
    return False
  mallopt = ctypes.CDLL(None).mallopt  # the symbols the process has loaded, the C library's among them
  mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
  return all(mallopt(parameter, value) == 1 for parameter, value in SETTINGS)


def jax_computes_on_host() -> bool:
  """Whether JAX will compute on the CPU, judged without starting a backend.

  True when ``JAX_PLATFORMS`` names only ``cpu``, or when it is unset and no
  accelerator runtime is installed: no ``jax_plugins`` package or entry point
  (how the CUDA and ROCm plugins register) and no ``libtpu``.
  """
  platforms = os.environ.get("JAX_PLATFORMS", "")
  if platforms:
    return all(p.strip() == "cpu" for p in platforms.split(","))
  return (not importlib.metadata.entry_points(group="jax_plugins") and importlib.util.find_spec("jax_plugins") is None
          and importlib.util.find_spec("libtpu") is None)


def malloc_tuned_by_environment() -> List[str]:
  """The environment variables by which this process was started with glibc malloc parameters of its own."""
  names = [name for name in GLIBC_MALLOC_ENV if name in os.environ]
  if "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
    names.append("GLIBC_TUNABLES")
  return names


def wanted() -> bool:
  """Whether the environment asks for the malloc settings (see the module docstring).

  ``LIBRA_JAX_KEEP_HOST_MEMORY=1``: yes; ``0``: no; unset or empty: yes,
  unless the process was started with glibc malloc parameters of its own.

  Raises:
    ConfigError: ``LIBRA_JAX_KEEP_HOST_MEMORY`` is set to anything else.
  """
  value = os.environ.get(SWITCH_ENV, "").strip()
  if not value:
    tuned = malloc_tuned_by_environment()
    if tuned:
      _log.info("host memory: malloc is left as %s set it (%s=1 would override that)", " and ".join(tuned), SWITCH_ENV)
    return not tuned
  if value not in ("0", "1"):
    raise ConfigError(f"{SWITCH_ENV}={value}: set it to 1 (keep freed host memory for reuse: faster CPU steps, a "
                      f"higher peak) or 0 (glibc's own malloc behaviour), or unset it")
  return value == "1"


def keep_freed_host_memory_where_wanted() -> bool:
  """:func:`keep_freed_host_memory` where JAX computes on the host and :func:`wanted` says so; returns whether it was
  done. Call it before the first JAX computation.

  Raises:
    ConfigError: from :func:`wanted`, on any host (a mistaken value is reported where it would not apply too).
  """
  asked = wanted()
  return jax_computes_on_host() and asked and keep_freed_host_memory()


def _status_gb(field: str) -> Optional[float]:
  """A memory field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``; the kernel gives KiB), in GB; None where the
  file or the field does not exist (not Linux)."""
  try:
    with open("/proc/self/status") as status:
      for line in status:
        name, _, value = line.partition(":")
        if name == field:
          return int(value.split()[0]) * 1024 / 1e9
  except OSError:
    pass
  return None


def resident_gb() -> Optional[float]:
  """This process's resident host memory now, in GB (10^9 bytes), from ``VmRSS``; None where it is not Linux."""
  return _status_gb("VmRSS")


def peak_resident_gb() -> float:
  """This process's peak resident host memory so far, in GB (10^9 bytes): what the malloc setting can raise, and
  what a host must have room for.

  On Linux it is ``VmHWM`` of ``/proc/self/status``, the peak of this
  program's own memory. ``getrusage``'s ``ru_maxrss`` there also keeps the
  peak of the process this one was started from, across ``fork`` and
  ``execve``: a command started by a large process would show that
  process's peak. Elsewhere, ``ru_maxrss`` (bytes on macOS).
  """
  peak = _status_gb("VmHWM")
  if peak is not None:
    return peak
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024) / 1e9

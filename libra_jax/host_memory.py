"""Keeping freed host memory in the process, so that a CPU step does not page-fault its buffers in every time.

XLA:CPU allocates each execution's temporary buffer afresh (1.8 GB for the
Faster R-CNN R-50 train step at 512 x 512 batch 2, 4.3 GB at 800 x 1344) and
frees it at the end. glibc's malloc serves an allocation that large with a
fresh ``mmap`` and returns it with ``munmap``, so every step page-faults the
whole buffer in again, and the kernel zeroes each page first. On 2 cores
that was about 2 s of a 10 s step at 800 x 1344, 0.2 s of 4.6 s at 512 x 512.

:func:`keep_freed_host_memory` sets three glibc malloc parameters
(``mallopt(3)``), as the environment variables ``MALLOC_ARENA_MAX=1``,
``MALLOC_MMAP_MAX_=0`` and ``MALLOC_TRIM_THRESHOLD_=-1`` would at start-up:
one arena for every thread (the only one that can grow past 64 MB without
``mmap``), no ``mmap`` for large blocks, and no trimming of the heap. A freed
block then stays in the process and a later step reuses it without a fault.
The heap settles after a few steps. Until then a step may add a whole
buffer's worth of memory, when smaller blocks allocated in between have split
the freed buffer so that it no longer fits. The cost: the process keeps that
memory until it exits. The Faster R-CNN R-50 train step at 512 x 512 batch 2
peaked at 5.0-5.4 GB with it, about 4.0 GB without. At 800 x 1344, loaded
from the persistent cache (2026-12-06), it peaked at 4.4 GB without it
(7.2-7.5 s a step) and with it at 4.3 GB for the first steps, then 7.4 GB,
and in some processes 10.5 GB (5.1-5.4 s a step): about 1.2 GB and one, two
or three 3.1 GB buffers. The peak then stayed the same through 20 steps.

Threads that allocated before the call keep their own arenas, and XLA:CPU's
worker threads start with the backend, so it must run before the first JAX
computation. Every command does this (``libra_jax.cli.run``), where JAX
computes on the CPU (:func:`jax_computes_on_host`); on accelerator hosts the
step's buffers live in device memory, so nothing is changed there.
"""

import ctypes
import importlib.metadata
import importlib.util
import logging
import os

# mallopt(3) parameter numbers, from glibc's <malloc.h>.
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8
# (parameter, value): one arena, no mmap for large blocks, never trim (-1 disables trimming, per mallopt(3)).
SETTINGS = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1))

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

"""Keeping freed host memory in the process, so that a CPU step does not page-fault its buffers in every time.

XLA:CPU allocates each execution's temporary buffer afresh (3.3 GB for the
Faster R-CNN R-50 train step at 800 x 1344, by XLA's memory analysis) and
frees it at the end. glibc's malloc serves an allocation that large with a
fresh ``mmap`` and returns it with ``munmap``, so every step page-faults the
whole buffer in again, and the kernel zeroes each page first. On 2 cores
that was about 2 s of a 10 s step at 800 x 1344 and 0.2 s of 4.6 s at
512 x 512 batch 2 (2026-12-04); 0.6-0.9 s of 6.0-6.2 s and 0.4-0.5 s of
3.4-3.6 s in ``benchmarks/bench_host_memory.py``'s rows (2026-12-06). The
quick start's training ran at 28-31 images/s with it and 21-22 without
(medians of two runs each, in turns).

:func:`keep_freed_host_memory` sets three glibc malloc parameters
(``mallopt(3)``), as the environment variables ``MALLOC_ARENA_MAX=1``,
``MALLOC_MMAP_MAX_=0`` and ``MALLOC_TRIM_THRESHOLD_=-1`` would at start-up:
one arena for every thread (the only one that can grow past 64 MB without
``mmap``), no ``mmap`` for large blocks, and no trimming of the heap. A freed
block then stays in the process and a later step reuses it without a fault.

The cost is up to two more temporary buffers in the process. XLA:CPU
allocates a step's buffer when the step is dispatched, so with JAX's
asynchronous dispatch the next step's buffer is allocated while the current
one is in use, and even a caller that waits for each step's outputs
sometimes sees it allocated before the last one is freed (2 steps of 16 in
one trace). The last step's buffer then
leaves a hole of exactly its own size, and glibc cannot place an aligned
block of that size there (``memalign`` asks for the alignment on top), so a
third buffer is taken from the heap's top, and three take turns from then
on. A tracer of every large allocation showed this in a training loop's
pattern: from the third step on, Faster R-CNN R-50's 3.3 GB buffer at 800 x
1344 cycled through three places, and the process held 11.0 GB, against
4.6 GB with glibc's defaults (2026-12-06).

So a run decides by the size of its step. :func:`keep_if_affordable`, called
by training after the first step of each image size, returns glibc's
defaults (:func:`return_freed_host_memory`) if the process's resident memory
plus two more of the step's temporary buffers would pass half of the host's
memory (:func:`host_memory_gb`). On this project's 25 GB machine the R-50
train step keeps the setting at 800 x 1344 batch 1 (4.4 + 2 x 3.3 GB, a peak
of 11.0 GB) and returns it at batch 2 (7.8 + 2 x 6.5 GB: a peak of 7.8 GB
where keeping it reached 21.5 GB).

Threads that allocated before the call keep their own arenas, and XLA:CPU's
worker threads start with the backend, so it must run before the first JAX
computation. Every command does this (``libra_jax.cli.run``, through
:func:`keep_freed_host_memory_where_wanted`), where JAX computes on the CPU
(:func:`jax_computes_on_host`); on accelerator hosts the step's buffers live
in device memory, so nothing is changed there.

Who is short of memory rather than time declines it with
``LIBRA_JAX_KEEP_HOST_MEMORY=0``, and ``LIBRA_JAX_KEEP_HOST_MEMORY=1`` keeps it
whatever the step's size. Unset, it is done unless the environment already
sets glibc's own malloc parameters (``MALLOC_ARENA_MAX``,
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
M_MMAP_THRESHOLD = -3
M_MMAP_MAX = -4
M_ARENA_MAX = -8
# (parameter, value): one arena, no mmap for large blocks, never trim (-1 disables trimming, per mallopt(3)).
SETTINGS = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1))
# (parameter, value): glibc's defaults on 64 bits once its sliding mmap threshold has reached its ceiling, as it
# soon does in a JAX process: blocks of 32 MiB and more are mapped on their own, at most 65,536 of them, and the
# heap's top is trimmed past 64 MiB. (The one arena stays: arenas are made as threads first allocate.)
GLIBC_DEFAULTS = ((M_MMAP_MAX, 65536), (M_MMAP_THRESHOLD, 32 * 2 ** 20), (M_TRIM_THRESHOLD, 64 * 2 ** 20))
# The setting stays while the peak it can lead to is within this share of the host's memory (keep_if_affordable).
KEPT_PEAK_SHARE = 0.5
# How many of a step's temporary buffers the setting can hold besides the one in use (the module docstring).
EXTRA_TEMPORARY_BUFFERS = 2
# Where cgroups v2 and v1 are mounted, and the file in a group's directory that holds its memory limit in bytes
# ("max" or a huge number: none).
CGROUP_MEMORY_LIMIT_FILES = (("/sys/fs/cgroup", "memory.max"), ("/sys/fs/cgroup/memory", "memory.limit_in_bytes"))
# 0 declines the settings, 1 asks for them; unset, see wanted().
SWITCH_ENV = "LIBRA_JAX_KEEP_HOST_MEMORY"
# glibc's own environment variables for malloc's parameters (mallopt(3)), read when a process starts.
GLIBC_MALLOC_ENV = ("MALLOC_ARENA_MAX", "MALLOC_ARENA_TEST", "MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_",
                    "MALLOC_TOP_PAD_", "MALLOC_TRIM_THRESHOLD_")

_log = logging.getLogger(__name__)
# Why this process keeps freed memory: None (it does not), "asked" (the switch is 1) or "by default" (the switch is
# unset, and keep_if_affordable decides by the step's size).
_kept_because: Optional[str] = None


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
  return _set_malloc_parameters(SETTINGS)


def _set_malloc_parameters(settings) -> bool:
  """``mallopt(parameter, value)`` for each ``(parameter, value)`` of ``settings``, every one tried; returns whether
  glibc accepted them all."""
  mallopt = ctypes.CDLL(None).mallopt  # the symbols the process has loaded, the C library's among them
  mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
  accepted = [mallopt(parameter, value) == 1 for parameter, value in settings]
  return all(accepted)


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
  global _kept_because
  asked = wanted()
  made = jax_computes_on_host() and asked and keep_freed_host_memory()
  if made:
    _kept_because = "asked" if os.environ.get(SWITCH_ENV, "").strip() else "by default"
  return made


def made_by_default() -> bool:
  """Whether this process keeps freed memory without having been asked to, so that :func:`keep_if_affordable`
  decides by the step's size."""
  return _kept_because == "by default"


def return_freed_host_memory() -> bool:
  """Undoes :func:`keep_freed_host_memory`'s mmap and trimming parameters (``GLIBC_DEFAULTS``) and hands the heap's
  free memory back to the system (``malloc_trim``). Returns whether every parameter was accepted."""
  global _kept_because
  accepted = _set_malloc_parameters(GLIBC_DEFAULTS)
  malloc_trim = ctypes.CDLL(None).malloc_trim
  malloc_trim.argtypes = (ctypes.c_size_t,)
  malloc_trim(0)
  _kept_because = None
  return accepted


def keep_if_affordable(temporary_bytes: int) -> bool:
  """Where this process keeps freed memory by default (:func:`made_by_default`), returns glibc's defaults
  (:func:`return_freed_host_memory`) if the peak that keeping can lead to passes ``KEPT_PEAK_SHARE`` of the host's
  memory: the process's resident memory now plus ``EXTRA_TEMPORARY_BUFFERS`` more of the step's temporary buffers
  (see the module docstring). Call it after a step's first call, whose buffer the resident memory then counts.

  Args:
    temporary_bytes: the step's temporary buffers in this process, in bytes (``Compiled.memory_analysis()``'s
      ``temp_size_in_bytes`` is one device's: times the process's devices). Several processes on one host each
      measure against the whole host.

  Returns:
    Whether this process keeps freed memory after the call (also when the switch asked for it).
  """
  if _kept_because != "by default":
    return _kept_because is not None
  peak_if_kept = (resident_gb() or 0.0) + EXTRA_TEMPORARY_BUFFERS * temporary_bytes / 1e9  # glibc: Linux's /proc
  host = host_memory_gb()
  if peak_if_kept <= KEPT_PEAK_SHARE * host:
    return True
  _log.info("host memory: the step's temporary buffers take %.1f GB, and keeping freed memory could raise this "
            "process's peak to %.1f GB, past %.0f%% of the host's %.1f GB, so glibc's malloc defaults are back "
            "(%s=1 would keep it: faster steps, the higher peak)", temporary_bytes / 1e9, peak_if_kept,
            100 * KEPT_PEAK_SHARE, host, SWITCH_ENV)
  if not return_freed_host_memory():
    _log.warning("host memory: glibc refused some of its malloc defaults back (mallopt); freed memory may still stay "
                 "in the process: watch host_memory_peak_gb, or start with %s=0", SWITCH_ENV)
  return False


def host_memory_gb() -> float:
  """The host's memory this process may use, in GB (10^9 bytes): its physical memory, or the smallest memory limit
  of its cgroup and the cgroup's ancestors (``/proc/self/cgroup``, v2 or v1) where that is smaller."""
  limit = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  for path in cgroup_memory_limit_files():
    try:
      with open(path) as limit_file:
        value = limit_file.read().strip()
    except OSError:
      continue
    if value.isdigit():
      limit = min(limit, int(value))
  return limit / 1e9


def cgroup_memory_limit_files(membership: str = "/proc/self/cgroup") -> List[str]:
  """The files that may hold a memory limit of this process's cgroup or of its ancestors, for cgroups v2 and v1
  (``CGROUP_MEMORY_LIMIT_FILES``), read from ``membership``. Inside a container with its own cgroup namespace the
  group is ``/``; without one (systemd, Slurm) it is a path below the mount."""
  groups = {}  # mount -> the process's group below it
  try:
    with open(membership) as lines:
      for line in lines:
        _, controllers, group = line.rstrip("\n").split(":", 2)
        if controllers == "":
          groups[CGROUP_MEMORY_LIMIT_FILES[0][0]] = group
        elif "memory" in controllers.split(","):
          groups[CGROUP_MEMORY_LIMIT_FILES[1][0]] = group
  except (OSError, ValueError):
    pass
  files = []
  for mount, name in CGROUP_MEMORY_LIMIT_FILES:
    parts = [part for part in groups.get(mount, "/").split("/") if part]
    files += [os.path.join(mount, *parts[:depth], name) for depth in range(len(parts), -1, -1)]
  return files


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

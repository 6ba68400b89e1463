"""A train step's time and host memory with ``libra_jax.host_memory``'s malloc setting kept and declined.

    python benchmarks/bench_host_memory.py [--height=800 --width=1344 --batch=1] [--steps=16] [--rounds=2]

One fresh process compiles the step of ``benchmarks/run.py``'s Faster R-CNN
R-50 train row for that shape (synthetic batch) into a temporary persistent
cache. Then, for each of ``--rounds`` rounds, two fresh processes load it from
there and take ``--steps`` steps each: the first with
``LIBRA_JAX_KEEP_HOST_MEMORY=1``, the second with ``=0``, as a command run
either way would (``host_memory.keep_freed_host_memory_where_wanted``).
Alternating the two kinds of process lets both see the same state of the
machine. It measures JAX on the CPU with glibc's malloc, and refuses to start
where JAX would compute on an accelerator, where the C library is not glibc,
or where the environment sets glibc's own malloc variables (the declined
processes would not run glibc's defaults). One JSON line per process:

- ``keeps_freed_host_memory``: whether the setting was made there;
- ``step_s``: each step's wall time, and ``median_step_s``, the median of all
  but the first (which also pays for compiling what the cache left out and
  for the heap's first growth). A later step at which the heap grows again
  stays in the median: ``rss_gb`` shows which;
- ``rss_gb``: the process's resident memory after each step, in GB, and
  ``peak_rss_gb``, its peak (``host_memory.peak_resident_gb``: Linux's ``VmHWM``): the setting's cost, since
  a process that keeps freed memory keeps its peak until it exits;
- ``date``, ``cpu_count`` and ``jax_version``: where and when.
"""

import datetime
import json
import os
import pathlib
import statistics
import sys
import tempfile
import time
from typing import Any, Dict, List

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))  # this checkout's libra_jax and benchmarks

from benchmarks import run as bench  # noqa: E402  (JAX is imported only in the worker processes)
from libra_jax import cli, host_memory  # noqa: E402


def compile_into(row: Dict[str, Any], cache_dir: str) -> None:
  """Fills ``cache_dir`` with the row's step (run in a fresh process)."""
  bench.compiled_row(row, bench.detector_config(row), cache_dir, compile="cold")


def steps_from_cache(row: Dict[str, Any], cache_dir: str, steps: int) -> Dict[str, Any]:
  """Loads the row's step from ``cache_dir`` and takes ``steps`` steps, timing each and reading the process's memory
  after each (run in a fresh process, whose environment says whether to keep freed memory: ``compiled_row`` decides
  first thing)."""
  import jax
  compiled = bench.compiled_row(row, bench.detector_config(row), cache_dir, compile="cached")
  seconds, resident = [], []
  for _ in range(steps):
    start = time.perf_counter()
    compiled.step()
    seconds.append(time.perf_counter() - start)
    resident.append(host_memory.resident_gb())
  return dict(keeps_freed_host_memory=compiled.keeps_freed_host_memory, step_s=seconds,
              median_step_s=statistics.median(seconds[1:]), rss_gb=resident,
              peak_rss_gb=host_memory.peak_resident_gb(), cpu_count=os.cpu_count(), jax_version=jax.__version__)


def measure(row: Dict[str, Any], steps: int, rounds: int) -> List[Dict[str, Any]]:
  """The alternating processes of the module docstring, one result each (the process's ``round`` and
  ``switch``, the value of ``LIBRA_JAX_KEEP_HOST_MEMORY`` it was started with, beside its measurements)."""
  results = []
  previous = os.environ.get(host_memory.SWITCH_ENV)
  with tempfile.TemporaryDirectory(prefix="libra_jax_bench_host_memory_") as cache_dir:
    bench.run_isolated(compile_into, row, cache_dir)
    try:
      for round_index in range(rounds):
        for switch in ("1", "0"):
          os.environ[host_memory.SWITCH_ENV] = switch  # the spawned process's environment
          result = bench.run_isolated(steps_from_cache, row, cache_dir, steps)
          results.append(dict(row, round=round_index, switch=switch, date=datetime.date.today().isoformat(),
                              **result))
          print(json.dumps(results[-1]), flush=True)
    finally:
      if previous is None:
        os.environ.pop(host_memory.SWITCH_ENV, None)
      else:
        os.environ[host_memory.SWITCH_ENV] = previous
  return results


def main(argv) -> int:
  parser = cli.ArgumentParser(prog="python benchmarks/bench_host_memory.py", description=__doc__.split("\n")[0],
                              config=None)
  parser.add_argument("--height", type=int, default=800)
  parser.add_argument("--width", type=int, default=1344)
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--steps", type=int, default=16)
  parser.add_argument("--rounds", type=int, default=2)
  args = parser.parse_args(argv)
  for name in ("height", "width", "batch", "rounds"):
    if getattr(args, name) < 1:
      parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
  if args.steps < 2:
    parser.error(f"--steps must be at least 2 (the first is left out of the median), got {args.steps}")
  if not sys.platform.startswith("linux") or not host_memory.uses_glibc():
    parser.error("this benchmark reads /proc/self/status and sets glibc's malloc: run it on Linux with glibc")
  if not host_memory.jax_computes_on_host():
    parser.error("JAX would compute on an accelerator here, where the setting does not apply: set JAX_PLATFORMS=cpu")
  tuned = host_memory.malloc_tuned_by_environment()
  if tuned:
    parser.error(f"{' and '.join(tuned)} set in the environment: unset it, so that the declined processes run "
                 f"glibc's own malloc defaults")
  row = dict(height=args.height, width=args.width, batch=args.batch, depth=50, steps=args.steps,
             accelerator=False, framework="libra_jax", config="faster_rcnn", part=None, mode="train",
             model=bench.model_name("faster_rcnn", 50))
  measure(row, args.steps, args.rounds)
  return 0


if __name__ == "__main__":
  cli.run(main)

"""Compile time of a train step from the persistent cache, with Python's cyclic garbage collector on and paused.

    python benchmarks/bench_compile.py --config=configs/libra_faster_rcnn_r50_fpn_1x_coco.py \
        [--config.KEY=VALUE ...] [--height 800 --width 1344 --batch 1] [--repeats 3] [--json]

Each repeat measures both collector settings, on and paused
(``libra_jax.runtime.cyclic_gc_paused``, as the train and evaluation loops
compile); the order flips every repeat (on, paused, paused, on, ...), so that
a drift of the machine's speed through the run favours neither. Each setting
compiles the train step as ``benchmarks/run.py`` does (``run.compiled_row``),
in two fresh processes: cold into an empty persistent compilation cache, then
from it, as a restarted run compiles. Both times cover tracing, lowering and
compiling or loading. Prints each setting's two times and the medians of the
cached times; ``--json`` prints one JSON object instead.
"""

import json
import pathlib
import statistics
import sys
import tempfile
from typing import Any, Dict

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import run  # noqa: E402
from benchmarks.profile_step import add_step_flags, parse_step_flags  # noqa: E402
from libra_jax import cli  # noqa: E402

SETTINGS = {"on": False, "paused": True}  # collector setting -> compiled_row's pause_collector


def compile_seconds(row: Dict[str, Any], config, cache_dir: str, pause_collector: bool, kind: str) -> float:
  """Seconds to compile ``row``'s step, ``kind`` ``"cold"`` or ``"cached"`` (``run.compile_timed``; run in a fresh
  process)."""
  return run.compiled_row(row, config, cache_dir, pause_collector, compile=kind).compile_s


def compile_times(row: Dict[str, Any], config, pause_collector: bool) -> Dict[str, float]:
  """``{"cold_s", "cached_s"}`` of ``row``'s step, each in a fresh process, with a cache of their own."""
  with tempfile.TemporaryDirectory() as cache_dir:
    return {f"{kind}_s": run.run_isolated(compile_seconds, row, config, cache_dir, pause_collector, kind)
            for kind in ("cold", "cached")}


def main(argv) -> int:
  parser = cli.ArgumentParser(prog="python benchmarks/bench_compile.py", description=__doc__.split("\n")[0])
  add_step_flags(parser, height=800, width=1344, batch=1,
                 repeats_help="pairs of fresh processes, one per collector setting (medians are reported)")
  parser.add_argument("--json", action="store_true", help="one JSON object on stdout instead of lines")
  args = parse_step_flags(parser, argv)
  row = dict(height=args.height, width=args.width, batch=args.batch, mode="train", accelerator=False)
  times = {name: [] for name in SETTINGS}
  for repeat in range(args.repeats):
    order = list(SETTINGS.items())
    for name, pause in order if repeat % 2 == 0 else order[::-1]:
      times[name].append(compile_times(row, args.config, pause))
      if not args.json:
        last = times[name][-1]
        print(f"collector {name:6}  cold {last['cold_s']:6.1f} s  cached {last['cached_s']:5.2f} s", flush=True)
  medians = {name: statistics.median(t["cached_s"] for t in runs) for name, runs in times.items()}
  if args.json:
    print(json.dumps({"config": args.config_file, "height": args.height, "width": args.width,
                      "batch": args.batch, "runs": times, "median_cached_s": medians}))
  else:
    print("median cached compile: " + ", ".join(f"collector {name} {s:.2f} s" for name, s in medians.items()))
  return 0


if __name__ == "__main__":
  cli.run(main)

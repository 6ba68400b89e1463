"""A change's effect on a whole step: the working tree's step against a git revision's, in turns in one process.

    python benchmarks/paired_revision.py --config=configs/faster_rcnn_r50_fpn_1x_coco.py --base=HEAD~1 \\
        --swap=libra_jax.ops.conv:winograd_conv3x3_maps [--swap=...] [--mode=train] \\
        [--height 512 --width 512 --batch 2] [--repeats 10] [--json]

This machine's speed drifts by 10% and more between runs (benchmarks/README.md), more than
most changes gain, so a change is measured against its base in one process:
both programs are loaded, then ``--repeats`` rounds (10 by default) call each once, in
alternating order (``benchmarks.run.paired_seconds``), and the median of the
rounds' differences is the change's effect. Both are compiled first in a
fresh process of their own, into a temporary persistent cache that the
timing process loads them from: on the CPU a process that has compiled a
large program runs programs more slowly afterwards
(benchmarks/README.md). ``compiled_while_timing`` counts programs the timing process had
to compile anyway (0 unless the cache missed).

The base program is the working tree with some names taken from ``--base``:
``--swap=MODULE:NAME`` replaces ``MODULE.NAME`` by the ``NAME`` that
MODULE's file defines at the base revision; ``--swap=MODULE:NAME=SOURCE``
takes it from module SOURCE's file instead, for a name that MODULE imported
from SOURCE. The base file runs as a module of its own that imports the
working tree's other modules. A swap changes what the code that looks up
``MODULE.NAME`` when the step is traced sees: name the binding its callers
use (for a function imported with ``from SOURCE import NAME``, the
importer's; for a ``jax.custom_vjp`` function, the function, not its rules).
Nothing else of the base revision is measured.

Both programs take ``--config`` (with ``--config.KEY=VALUE`` overrides) on
a synthetic batch (``benchmarks.run.synthetic_batch``) with randomly
initialized parameters, as ``benchmarks/run.py``'s rows do. Prints
``base_step_s`` and ``step_s`` (medians), ``change_s`` (the median of the
rounds' differences, the working tree's less the base's: negative is faster)
and ``change_s_per_round`` (and ``compiled_while_timing``); ``--json`` prints them as one JSON object.
"""

import contextlib
import json
import pathlib
import subprocess
import sys
import tempfile
import types
from typing import Any, Callable, Dict, Iterator, List, NamedTuple, Sequence, Tuple

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.profile_step import add_step_flags, parse_step_flags  # noqa: E402
from libra_jax import cli  # noqa: E402

MODES = ("train", "infer")


class Swap(NamedTuple):
  """``module.name`` takes the value of ``name`` in module ``source``'s file at the base revision."""
  module: str
  name: str
  source: str


def parse_swap(text: str) -> Swap:
  """``MODULE:NAME`` or ``MODULE:NAME=SOURCE`` (dotted module names) as a :class:`Swap`."""
  target, equals, source = text.partition("=")
  module, colon, name = target.partition(":")
  names = [module, name] + ([source] if equals else [])
  if not colon or not all(part and all(piece.isidentifier() for piece in part.split(".")) for part in names):
    raise cli.UsageError(f"--swap={text}: write MODULE:NAME or MODULE:NAME=SOURCE with dotted module names, e.g. "
                         f"libra_jax.ops.conv:winograd_conv3x3_maps")
  return Swap(module, name, source or module)


def module_at_revision(source: str, revision: str, root: pathlib.Path = ROOT) -> types.ModuleType:
  """Module ``source`` as its file was at git ``revision`` of the repository at ``root``, run as a new module."""
  path = source.replace(".", "/") + ".py"
  shown = subprocess.run(["git", "show", f"{revision}:{path}"], cwd=root, capture_output=True, text=True)
  if shown.returncode != 0:
    reason = shown.stderr.strip().splitlines()[-1] if shown.stderr.strip() else f"git exited {shown.returncode}"
    raise cli.UsageError(f"--base={revision}: no {path} there ({reason}); give a revision of this repository "
                         f"that has the module")
  name = f"{source}@{revision}"
  module = types.ModuleType(name)
  module.__file__ = f"{path}@{revision}"
  sys.modules[name] = module  # dataclasses and NamedTuples look their module up while it runs
  exec(compile(shown.stdout, module.__file__, "exec"), module.__dict__)  # noqa: S102  (the repository's own code)
  return module


def base_values(swaps: Sequence[Swap], revision: str, root: pathlib.Path = ROOT) -> Dict[Swap, Any]:
  """Each swap's value at ``revision``; a usage error names a swap whose module or base lacks its name."""
  import importlib

  sources: Dict[str, types.ModuleType] = {}
  values = {}
  for swap in swaps:
    target = importlib.import_module(swap.module)
    if not hasattr(target, swap.name):
      raise cli.UsageError(f"--swap={swap.module}:{swap.name}: the working tree's {swap.module} has no {swap.name}")
    if swap.source not in sources:
      sources[swap.source] = module_at_revision(swap.source, revision, root)
    if not hasattr(sources[swap.source], swap.name):
      raise cli.UsageError(f"--swap={swap.module}:{swap.name}: {swap.source} at {revision} has no {swap.name}; "
                           f"name its module with =SOURCE if it was defined elsewhere")
    values[swap] = getattr(sources[swap.source], swap.name)
  return values


@contextlib.contextmanager
def swapped(values: Dict[Swap, Any]) -> Iterator[None]:
  """Sets each ``swap.module``'s ``swap.name`` to its value, and restores them all on exit."""
  import importlib

  saved: List[tuple] = []
  try:
    for swap, value in values.items():
      module = importlib.import_module(swap.module)
      saved.append((module, swap.name, getattr(module, swap.name)))
      setattr(module, swap.name, value)
    yield
  finally:
    for module, name, value in reversed(saved):
      setattr(module, name, value)


def compiled_steps(config, swaps: Sequence[Swap], revision: str, row: Dict[str, Any],
                   cache_dir: str) -> Tuple[Callable[[], None], Callable[[], None]]:
  """``(base step, working tree's step)`` of ``row`` (``benchmarks.run.compiled_row``), compiled through the
  persistent cache in ``cache_dir``."""
  import jax

  from benchmarks import run

  with swapped(base_values(swaps, revision)):
    base_step = run.compiled_row(row, config, cache_dir).step
  jax.clear_caches()  # the working tree's functions are traced anew, not taken from the base's trace
  return base_step, run.compiled_row(row, config, cache_dir).step


def fill_cache(config, swaps: Sequence[Swap], revision: str, row: Dict[str, Any], cache_dir: str) -> None:
  """Compiles both steps of :func:`compiled_steps` into ``cache_dir`` (in a fresh process of its own)."""
  compiled_steps(config, swaps, revision, row, cache_dir)


def measure(config, swaps: Sequence[Swap], revision: str, mode: str, height: int, width: int, batch: int,
            repeats: int) -> Dict[str, Any]:
  """Compiles the base's step and the working tree's in a fresh process, loads them here from its cache and
  times them in turns (see the module doc)."""
  from benchmarks import run

  row = dict(height=height, width=width, batch=batch, mode=mode, accelerator=False)
  with tempfile.TemporaryDirectory(prefix="libra_jax_paired_xla_cache_") as cache_dir:
    run.run_isolated(fill_cache, config, swaps, revision, row, cache_dir)
    compiled = run.cached_programs(cache_dir)
    base_step, step = compiled_steps(config, swaps, revision, row, cache_dir)
    compiled_while_timing = len(run.cached_programs(cache_dir) - compiled)
    timed = run.paired_seconds(step, base_step, warmup=1, rounds=repeats)
  return dict(base=revision, swaps=[f"{s.module}:{s.name}={s.source}" for s in swaps], mode=mode,
              shape=f"{height}x{width} b{batch}", base_step_s=timed["baseline_step_s"], step_s=timed["step_s"],
              change_s=timed["extra_s_per_step"], change_s_per_round=timed["extra_s_per_round"],
              compiled_while_timing=compiled_while_timing)


def main(argv) -> int:
  parser = cli.ArgumentParser(prog="python benchmarks/paired_revision.py", description=__doc__.split("\n")[0])
  add_step_flags(parser, height=512, width=512, batch=2, repeats_help="rounds of one step of each program")
  parser.set_defaults(repeats=10)
  parser.add_argument("--base", required=True, metavar="REV", help="the git revision to compare with (HEAD~1, ...)")
  parser.add_argument("--swap", action="append", required=True, metavar="MODULE:NAME[=SOURCE]",
                      help="a name the base revision supplies (repeat for several)")
  parser.add_argument("--mode", choices=MODES, default="train", help="the train step or the inference step")
  parser.add_argument("--json", action="store_true", help="one JSON object on stdout instead of text")
  args = parse_step_flags(parser, argv)
  swaps = [parse_swap(text) for text in args.swap]
  result = measure(args.config, swaps, args.base, args.mode, args.height, args.width, args.batch, args.repeats)
  if args.json:
    print(json.dumps(result))
  else:
    rounds = ", ".join(f"{d:+.3f}" for d in result["change_s_per_round"])
    print(f"{args.mode} {result['shape']}: base ({args.base}) {result['base_step_s']:.3f} s, working tree "
          f"{result['step_s']:.3f} s, change {result['change_s']:+.3f} s per step (median of {args.repeats} rounds: "
          f"{rounds})")
  return 0


if __name__ == "__main__":
  cli.run(main)

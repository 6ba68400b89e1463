"""Time per kind of operation inside a compiled program, from a ``jax.profiler`` trace of it on the CPU.

XLA:CPU records every thunk it runs (a fusion, a dot, a convolution, a
scatter, a ``while``) as a trace event named after its HLO instruction, on the
thread that ran it. :func:`seconds_by_kind` matches those names to the
program's optimized HLO text (``compiled.as_text()``) and sums each event's
*exclusive* time (its duration less that of events nested in it on the same
thread: the body of a ``while``, say) into three kinds:

  conv   instructions that are, or fusions that contain, a ``convolution``;
  dot    the same for ``dot`` (matmuls: the box head, and the 1x1
         convolutions and filter gradients that ``libra_jax.ops.conv`` writes
         as matmuls);
  other  everything else: elementwise fusions (BatchNorm, ReLU, residual
         adds, losses), reductions, gathers, scatters, sorts, loop overhead.

A fusion is counted whole under its kind, so a convolution's fused output
arithmetic counts as convolution, as it would on an accelerator. The seconds
are operation time: XLA:CPU may run independent operations on two threads at
once, so their sum can exceed the step's wall time (RetinaNet R-50 at
800x1344: 9.3 s of operations in an 8.5 s step); shares are of that sum. Events whose
names are not instructions of the program (the runtime's own bookkeeping,
Python frames) are left out. Only the CPU's trace names its events this way;
on other platforms the instruction names differ and this does not apply.

:func:`seconds_by_scope` sums the same time by the code that made each
instruction instead: its ``op_name`` metadata, the path of JAX functions,
Flax modules and ``jax.named_scope``s it was traced in (the backward pass's
under ``transpose(jvp(...))``, with the same module and scope names inside).
"""

import collections
import gzip
import json
import pathlib
import re
from typing import Dict, Iterable, List, Mapping, Sequence

KINDS = ("conv", "dot", "other")
_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) [^\n]*\{\n(.*?)\n\}", re.S | re.M)
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (.*)$", re.M)
_CALLS = re.compile(r"calls=%([\w.\-]+)")
_OPCODE = re.compile(r"(?:^|\s)([a-z][\w\-]*)\(")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
# The scope of operations whose op_name no scope of ``seconds_by_scope`` names.
UNSCOPED = "unscoped"


def _kind_of_opcodes(opcodes) -> str:
  opcodes = set(opcodes)
  return "conv" if "convolution" in opcodes else "dot" if "dot" in opcodes else "other"


def instruction_kinds(hlo_text: str) -> Dict[str, str]:
  """Instruction name -> ``'conv'``, ``'dot'`` or ``'other'`` for every instruction of an HLO module's text.

  An instruction that calls a computation (a fusion) has the kind of what
  that computation contains; a ``while`` keeps ``'other'`` for itself (the
  instructions of its body are classified on their own).
  """
  bodies = {name: body for name, body in _COMPUTATION.findall(hlo_text)}
  kinds = {}
  for name, rest in _INSTRUCTION.findall(hlo_text):
    called = _CALLS.search(rest)
    if called:
      kinds[name] = _kind_of_opcodes(_OPCODE.findall(bodies.get(called.group(1), "")))
    else:
      opcode = _OPCODE.search(rest)
      kinds[name] = _kind_of_opcodes([opcode.group(1)] if opcode else [])
  return kinds


def exclusive_seconds(events: Iterable[dict]) -> List[tuple]:
  """``(name, seconds)`` of complete trace events (``ph == 'X'``, ``ts``/``dur`` in microseconds), each less
  the time of the events nested inside it on its thread."""
  per_thread = collections.defaultdict(list)
  for event in events:
    if event.get("ph") == "X":
      per_thread[(event.get("pid"), event.get("tid"))].append(event)
  result = []
  for thread_events in per_thread.values():
    thread_events.sort(key=lambda e: (e["ts"], -e["dur"]))
    nested = [0.0] * len(thread_events)
    open_events: List[int] = []
    for i, event in enumerate(thread_events):
      while open_events and thread_events[open_events[-1]]["ts"] + thread_events[open_events[-1]]["dur"] <= event["ts"]:
        open_events.pop()
      if open_events:
        nested[open_events[-1]] += event["dur"]
      open_events.append(i)
    result.extend((event["name"], (event["dur"] - inside) / 1e6) for event, inside in zip(thread_events, nested))
  return result


def instruction_op_names(hlo_text: str) -> Dict[str, str]:
  """Instruction name -> the ``op_name`` of its metadata (the JAX code that made it; ``''`` where none).

  A fusion that XLA made without metadata (a ``ynn_fusion`` of a filter
  gradient, a layout copy) takes the ``op_name`` of the instructions it
  fuses: its root's, else the first one's that has one.
  """
  bodies = {name: body for name, body in _COMPUTATION.findall(hlo_text)}
  op_names = {}
  for name, rest in _INSTRUCTION.findall(hlo_text):
    own = _OP_NAME.search(rest)
    called = _CALLS.search(rest)
    if own is None and called:
      body = bodies.get(called.group(1), "")
      root = re.search(r"^\s*ROOT .*$", body, re.M)
      own = (root and _OP_NAME.search(root.group(0))) or _OP_NAME.search(body)
    op_names[name] = own.group(1) if own else ""
  return op_names


def scope_of(op_name: str, scopes: Mapping[str, Sequence[str]]) -> str:
  """The scope (a key of ``scopes``) that ``op_name`` lies in: the one naming the innermost of its ``/``-separated
  components that any scope names, else ``UNSCOPED``. ``scopes``: scope -> the components that mark it (a module's
  name, a ``jax.named_scope``'s)."""
  return _scope_in(op_name, _owners(scopes))


def _owners(scopes: Mapping[str, Sequence[str]]) -> Dict[str, str]:
  return {component: scope for scope, components in scopes.items() for component in components}


def _scope_in(op_name: str, owners: Mapping[str, str]) -> str:
  for component in reversed(op_name.split("/")):
    if component in owners:
      return owners[component]
  return UNSCOPED


def _op_seconds(trace_dir, instructions: Mapping[str, str]) -> List[tuple]:
  """``(instruction, seconds)`` of each event of the newest ``*.trace.json.gz`` under ``trace_dir`` that names one of
  ``instructions``, by its exclusive time."""
  traces = sorted(pathlib.Path(trace_dir).rglob("*.trace.json.gz"), key=lambda p: p.stat().st_mtime)
  if not traces:
    raise FileNotFoundError(f"no *.trace.json.gz under {trace_dir}")
  with gzip.open(traces[-1]) as f:
    events = json.load(f)["traceEvents"]
  seconds = [(name, s) for name, s in exclusive_seconds(events) if name in instructions]
  if not seconds:
    raise ValueError(f"no event of {traces[-1]} names an instruction of the program: not a CPU trace of it?")
  return seconds


def seconds_by_kind(trace_dir, hlo_text: str, steps: int = 1) -> Dict[str, float]:
  """Seconds per step of each kind in ``KINDS``, from the newest ``*.trace.json.gz`` under ``trace_dir``.

  Args:
    trace_dir: a directory ``jax.profiler.trace`` wrote into.
    hlo_text: the traced program's optimized HLO (``compiled.as_text()``).
    steps: how many runs of the program the trace holds; the sums are divided by it.

  Raises:
    FileNotFoundError: no trace file under ``trace_dir``.
    ValueError: no event of the trace names an instruction of the program.
  """
  return seconds_by_scope(trace_dir, hlo_text, {}, steps)[UNSCOPED]


def seconds_by_scope(trace_dir, hlo_text: str, scopes: Mapping[str, Sequence[str]],
                     steps: int = 1) -> Dict[str, Dict[str, float]]:
  """Seconds per step of each scope of ``scopes`` (see :func:`scope_of`) and of ``UNSCOPED``, each split into
  ``KINDS`` (``{scope: {kind: seconds}}``), from a trace as :func:`seconds_by_kind` reads it (its other arguments
  and errors are that function's). A fusion counts under its ``op_name`` (:func:`instruction_op_names`), which XLA
  takes from the operation at its root."""
  kinds = instruction_kinds(hlo_text)
  owners = _owners(scopes)
  scope_of_instruction = {name: _scope_in(op_name, owners) for name, op_name in instruction_op_names(hlo_text).items()}
  totals = {scope: dict.fromkeys(KINDS, 0.0) for scope in list(scopes) + [UNSCOPED]}
  for name, seconds in _op_seconds(trace_dir, scope_of_instruction):
    totals[scope_of_instruction[name]][kinds[name]] += seconds / steps
  return totals

"""Stopping a run cleanly on SIGTERM (a preemption notice) or SIGINT (Ctrl-C).

The loop asks ``StopRequest.reached(step)`` after every step; when it says
yes, the run saves a checkpoint of that step synchronously and ends with exit
status 0, and the same command resumes it.

- One process: the first SIGTERM or SIGINT sets a flag, read at the next
  step. The handler then steps aside, so a second signal ends the process at
  once (Ctrl-C twice).
- Several processes: a SIGTERM to any of them goes through JAX's preemption
  service (started by ``jax.distributed.initialize``), which picks one step at
  which every process stops: ``multihost_utils.reached_preemption_sync_point``.
  SIGINT is turned into a SIGTERM to this process so it takes the same path.
"""

import os
import signal
from typing import Optional

import jax
from jax.experimental import multihost_utils


class StopRequest:
  """Listens for SIGTERM and SIGINT between ``install`` and ``uninstall``."""

  def __init__(self):
    self.signal_name: Optional[str] = None
    self._previous = {}

  def install(self) -> "StopRequest":
    handled = (signal.SIGINT,) if jax.process_count() > 1 else (signal.SIGTERM, signal.SIGINT)
    for number in handled:
      self._previous[number] = signal.signal(number, self._handle)
    return self

  def uninstall(self) -> None:
    for number, handler in self._previous.items():
      signal.signal(number, handler)
    self._previous = {}

  def _handle(self, number, frame) -> None:
    del frame
    self.signal_name = signal.Signals(number).name
    signal.signal(number, self._previous.get(number, signal.SIG_DFL))
    if jax.process_count() > 1:
      os.kill(os.getpid(), signal.SIGTERM)

  def reached(self, step: int) -> bool:
    """Whether the run should stop after ``step`` (the same answer, at the same step, on every process)."""
    if jax.process_count() > 1:
      return multihost_utils.reached_preemption_sync_point(step)
    return self.signal_name is not None

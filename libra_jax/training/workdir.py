"""What keeps a training work directory whole: one run at a time, and the config the run was started with.

``WorkdirLock`` holds an exclusive ``flock`` on ``<workdir>/lock`` for the
run's lifetime; the file says who holds it (host, pid, start time, command).
The kernel drops the lock when its process dies, however it dies, so a lock
left by a killed run is simply taken over. (``flock`` works on local disks and
on NFS v4; a work directory on an object store needs a scheduler that never
starts two runs on it.)

``config.json`` records the resolved config of the run. A restart whose
config differs in a key that changes shapes, the schedule or the data order
(anything but ``RESUMABLE_KEYS``) is refused with one line listing the
differences, unless the user allows it.
"""

import datetime
import fcntl
import json
import logging
import os
import pathlib
import socket
import sys
from typing import Any, Dict, List, Optional

from libra_jax.errors import UserError

LOCK_FILE = "lock"
CONFIG_FILE = "config.json"

# Keys a resumed run may change: how often it logs, saves and evaluates, where things are, how it is launched,
# how far it goes, and the weights only a fresh start reads.
RESUMABLE_KEYS = frozenset({
    "log_every", "checkpoint_every", "eval_every", "keep", "compilation_cache_dir", "precompile_in_fresh_process",
    "skip_nonfinite", "distributed", "coordinator_address", "num_processes", "process_id", "eval_batch_size",
    "total_steps", "epochs", "init_checkpoint", "backbone_checkpoint", "data.tfds_data_dir", "data.eval_split",
    "data.val_annotations", "data.val_images",
})

_log = logging.getLogger(__name__)


class WorkdirLock:
  """An exclusive lock on a work directory, held until ``release`` (or the process's end)."""

  def __init__(self, workdir):
    self.path = pathlib.Path(workdir) / LOCK_FILE
    self._file = None

  def acquire(self) -> None:
    """Takes the lock; raises ``UserError`` naming the run that holds it."""
    handle = open(self.path, "a+")
    try:
      fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = _holder(self.path)
      handle.close()
      raise UserError(f"{self.path.parent} is in use by another run ({holder}); wait for it to end or stop it, "
                      f"or pass another --workdir") from None
    previous = _holder(self.path)
    if previous != "unknown":
      _log.info("took over %s from an earlier run that is no longer running (%s)", self.path, previous)
    handle.seek(0)
    handle.truncate()
    json.dump({"host": socket.gethostname(), "pid": os.getpid(), "started": _now(),
               "command": " ".join(sys.argv)}, handle)
    handle.flush()
    self._file = handle

  def release(self) -> None:
    """Drops the lock and clears the file (a later run then finds no earlier holder)."""
    if self._file is not None:
      self._file.seek(0)
      self._file.truncate()
      fcntl.flock(self._file, fcntl.LOCK_UN)
      self._file.close()
      self._file = None


def _holder(path: pathlib.Path) -> str:
  """Who the lock file says holds it, as ``pid P on host H, started T (command)``; ``unknown`` if it is empty."""
  try:
    holder = json.loads(path.read_text())
  except (OSError, ValueError):
    return "unknown"
  return (f"pid {holder.get('pid')} on host {holder.get('host')}, started {holder.get('started')}: "
          f"{holder.get('command')}")


def _now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def flat_config(config) -> Dict[str, Any]:
  """``"data.buckets" -> value`` for every leaf of a config, with JSON's types (tuples become lists)."""
  flat = {}

  def walk(node, prefix):
    for key, value in node.items():
      if isinstance(value, dict):
        walk(value, f"{prefix}{key}.")
      else:
        flat[f"{prefix}{key}"] = value

  walk(json.loads(config.to_json_best_effort()) if hasattr(config, "to_json_best_effort") else config, "")
  return flat


def config_differences(saved: Dict[str, Any], current: Dict[str, Any]) -> List[str]:
  """``"key was A, now B"`` for each key outside ``RESUMABLE_KEYS`` whose value differs (or exists on one side)."""
  differences = []
  for key in sorted(saved.keys() | current.keys()):
    if key in RESUMABLE_KEYS or saved.get(key) == current.get(key):
      continue
    was = json.dumps(saved[key]) if key in saved else "absent"
    now = json.dumps(current[key]) if key in current else "absent"
    differences.append(f"{key} was {was}, now {now}")
  return differences


def check_and_record_config(config, workdir, resumed_step: Optional[int], allow_changes: bool,
                            write: bool = True) -> None:
  """Compares ``config`` with the one the run in ``workdir`` was started with, then records it.

  A fresh run (``resumed_step`` None) just records its config. A resumed run
  whose config differs outside ``RESUMABLE_KEYS`` raises ``UserError``
  listing the differences, unless ``allow_changes``: then they are logged,
  the earlier record is kept as ``config.until_step_<N>.json`` and the new
  config becomes ``config.json``. Only the process with ``write`` writes.
  """
  path = pathlib.Path(workdir) / CONFIG_FILE
  current = flat_config(config)
  if resumed_step is not None and path.exists():
    saved = flat_config(json.loads(path.read_text()))
    differences = config_differences(saved, current)
    if differences and not allow_changes:
      raise UserError(f"the run in {workdir} was started with another config: {'; '.join(differences)}. Use the "
                      f"original values, pass another --workdir, or pass --allow_config_change to resume with these")
    if differences:
      _log.warning("resuming at step %d with a changed config: %s", resumed_step, "; ".join(differences))
      if write:
        path.rename(path.with_name(f"config.until_step_{resumed_step}.json"))
  if write:
    path.write_text(config.to_json_best_effort(indent=1) + "\n")

"""Orbax checkpoints of the train state and the input position.

One ``CheckpointManager`` per work directory: asynchronous saves, the last
``keep`` steps kept, restore onto an abstract target (shapes, dtypes and
shardings), so a restored state lands on the mesh directly.

A checkpoint that cannot be read (a save cut short, a truncated file) is moved
to ``<workdir>/unreadable_checkpoints/<step>`` with a warning, and the newest
readable one is restored instead. A save that failed in the background is
reported by ``check_for_errors``, which the loop calls after every step.
"""

import logging
import os
import pathlib
import re
import shutil
from typing import Any, Callable, Dict, Optional, Tuple

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from libra_jax import errors
from libra_jax.errors import UserError

UNREADABLE_DIR = "unreadable_checkpoints"

_log = logging.getLogger(__name__)

# Parts of the state whose names and shapes are the model's: compared before a restore.
MODEL_PARTS = ("params", "batch_stats")


class Checkpointer:
  """Saves and restores ``(TrainState, metadata)`` under ``<workdir>/checkpoints``."""

  def __init__(self, workdir, keep: int, asynchronous: bool = True):
    directory = pathlib.Path(workdir).resolve() / "checkpoints"
    self.directory = directory
    self.unreadable = directory.with_name(UNREADABLE_DIR)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=asynchronous,
                                           create=True)
    self.manager = ocp.CheckpointManager(directory, options=options, item_names=("state", "meta"))
    self._unchecked = False

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def all_steps(self):
    return list(self.manager.all_steps())

  def save(self, step: int, state: Any, meta: Dict[str, Any], wait: bool = False) -> None:
    """Starts saving ``state`` and the JSON-able ``meta`` (e.g. the input position) at ``step``.

    With ``wait``, returns once the checkpoint is on disk. A failed save (this
    one or the one before) raises ``UserError``.
    """
    self._finish(step)
    self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                    meta=ocp.args.JsonSave(meta)))
    self._unchecked = True
    if wait:
      self._finish(step)

  def restore(self, step: int, abstract_state: Any) -> Tuple[Any, Dict[str, Any]]:
    """The state saved at ``step``, shaped and sharded like ``abstract_state``.

    Raises ``UserError`` naming the first differing array when the checkpoint
    was saved by another model (a changed config restarting in an old work
    directory).
    """
    self.check_model(step, abstract_state)
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
    return restored["state"], restored["meta"]

  def restore_latest(self, abstract_state: Any) -> Optional[Tuple[int, Any, Dict[str, Any]]]:
    """``(step, state, meta)`` of the newest readable checkpoint, or None when there is none.

    Unreadable checkpoints are moved aside (by process 0) with a warning; a
    checkpoint of another model raises ``UserError`` (see ``restore``).
    """
    found = self._newest_readable(lambda step: self.restore(step, abstract_state), set_aside=True)
    return None if found is None else (found[0], *found[1])

  def restore_latest_model(self, abstract_variables: Any) -> Optional[Tuple[int, Any]]:
    """``(step, {"params", "batch_stats"})`` of the newest readable checkpoint (left in place), or None.

    Only the model is read: the optimizer state may be another optimizer's,
    and the devices another topology's. ``abstract_variables`` gives the
    expected shapes and the sharding to restore onto.
    """
    return self._newest_readable(lambda step: self.restore_model(step, abstract_variables), set_aside=False)

  def restore_model(self, step: int, abstract_variables: Any) -> Any:
    """``{"params", "batch_stats"}`` saved at ``step``, checked against and placed like ``abstract_variables``."""
    self.check_model(step, abstract_variables)
    sharding = jax.tree.leaves(abstract_variables)[0].sharding
    saved = ocp.StandardCheckpointHandler().metadata(self.directory / str(step) / "state").tree
    target = jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding), saved)
    state = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))["state"]
    return {part: state[part] for part in MODEL_PARTS}

  def _newest_readable(self, restore: Callable[[int], Any], set_aside: bool) -> Optional[Tuple[int, Any]]:
    for step in sorted(self.all_steps(), reverse=True):
      try:
        return step, restore(step)
      except UserError:
        raise
      except Exception as error:  # pylint: disable=broad-except
        if set_aside:
          self._set_aside(step, error)
        else:
          _log.warning("the checkpoint of step %d in %s cannot be read (%s); trying the one before", step,
                       self.directory, _gist(error))
    return None

  def _set_aside(self, step: int, error: Exception) -> None:
    target = self.unreadable / str(step)
    _log.warning("the checkpoint of step %d in %s cannot be read (%s); moved it to %s and trying the one before",
                 step, self.directory, _gist(error), target)
    if jax.process_index() == 0:
      target.parent.mkdir(exist_ok=True)
      if target.exists():
        shutil.rmtree(target)
      shutil.move(str(self.directory / str(step)), str(target))
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"set aside checkpoint {step}")
    self.manager.reload()

  def check_for_errors(self, step: int) -> None:
    """Raises ``UserError`` if the last background save has ended in failure (checked at ``step``; never blocks)."""
    if self._unchecked and not self.manager.is_saving_in_progress():
      self._unchecked = False
      self._finish(step)

  def _finish(self, step: int) -> None:
    """Waits for pending saves; a failure becomes a ``UserError`` that says what to do."""
    try:
      self.manager.wait_until_finished()
    except Exception as error:  # pylint: disable=broad-except
      raise UserError(f"saving a checkpoint to {self.directory} failed ({_gist(error)}); stopped at step {step}. "
                      f"Free space there or fix the cause, then run the same command to resume from the last saved "
                      f"step") from error

  def check_model(self, step: int, abstract_state: Any) -> None:
    """Compares the names and shapes of the model's arrays saved at ``step`` with ``abstract_state``'s."""
    saved = ocp.StandardCheckpointHandler().metadata(self.directory / str(step) / "state").tree
    have, want = _model_shapes(saved), _model_shapes(abstract_state)
    differences = [f"{name} is missing there" for name in sorted(want.keys() - have.keys())]
    differences += [f"{name} is not in this model" for name in sorted(have.keys() - want.keys())]
    differences += [f"{name} is {have[name]} there and {want[name]} here" for name in sorted(want.keys() & have.keys())
                    if have[name] != want[name]]
    if differences:
      more = f" (and {len(differences) - 1} more differences)" if len(differences) > 1 else ""
      raise UserError(f"the checkpoint of step {step} in {self.directory} was saved by a different model: "
                      f"{differences[0]}{more}; start from a new --workdir, or use the config (and overrides) the "
                      f"run was started with")

  def close(self) -> None:
    """Waits for pending saves (raising ``UserError`` if one failed) and closes the manager."""
    try:
      self._finish(self.latest_step() or 0)
    finally:
      self.manager.close()


def _gist(error: Exception) -> str:
  """An error's type and one-line text, its middle cut out when long, and the system's words for an OS error code.

  TensorStore's storage errors name the failed file, then a long spec, then
  ``[os_error_code='28']``; the code's meaning ("No space left on device") is
  not always in the text, so it is added.
  """
  text = errors.message(error)
  code = re.search(r"os_error_code='?(\d+)", text)
  meaning = os.strerror(int(code.group(1))) if code else None
  if len(text) > 400:
    text = f"{text[:150]} ... {text[-200:]}"
  if meaning and meaning not in text:
    text += f" ({meaning})"
  return f"{type(error).__name__}: {text}"


def _model_shapes(state: Any) -> Dict[str, Tuple[int, ...]]:
  """``"params/backbone/conv1/kernel" -> shape`` of the model parts of a state (a ``TrainState`` or a saved tree)."""
  shapes = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
    names = [str(getattr(key, "name", getattr(key, "key", getattr(key, "idx", key)))) for key in path]
    if names and names[0] in MODEL_PARTS:
      shapes["/".join(names)] = tuple(leaf.shape)
  return shapes


def abstract_like(tree: Any) -> Any:
  """``jax.ShapeDtypeStruct`` leaves (with shardings) for an array pytree."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree)

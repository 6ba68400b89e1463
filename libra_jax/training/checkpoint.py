"""Orbax checkpoints of the train state and the input position.

One ``CheckpointManager`` per work directory: asynchronous saves, the last
``keep`` steps kept, restore onto an abstract target (shapes, dtypes and
shardings), so a restored state lands on the mesh directly.
"""

import pathlib
from typing import Any, Dict, Optional, Tuple

import jax
import orbax.checkpoint as ocp

from libra_jax.errors import UserError

# Parts of the state whose names and shapes are the model's: compared before a restore.
MODEL_PARTS = ("params", "batch_stats")


class Checkpointer:
  """Saves and restores ``(TrainState, metadata)`` under ``<workdir>/checkpoints``."""

  def __init__(self, workdir, keep: int, asynchronous: bool = True):
    directory = pathlib.Path(workdir).resolve() / "checkpoints"
    self.directory = directory
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=asynchronous,
                                           create=True)
    self.manager = ocp.CheckpointManager(directory, options=options, item_names=("state", "meta"))

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def all_steps(self):
    return list(self.manager.all_steps())

  def save(self, step: int, state: Any, meta: Dict[str, Any]) -> None:
    """Starts saving ``state`` and the JSON-able ``meta`` (e.g. the input position) at ``step``."""
    self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                    meta=ocp.args.JsonSave(meta)))

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

  def wait(self) -> None:
    """Blocks until pending asynchronous saves are on disk."""
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


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

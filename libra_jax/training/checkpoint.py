"""Orbax checkpoints of the train state and the input position.

One ``CheckpointManager`` per work directory: asynchronous saves, the last
``keep`` steps kept, restore onto an abstract target (shapes, dtypes and
shardings), so a restored state lands on the mesh directly.
"""

import pathlib
from typing import Any, Dict, Optional, Tuple

import jax
import orbax.checkpoint as ocp


class Checkpointer:
  """Saves and restores ``(TrainState, metadata)`` under ``<workdir>/checkpoints``."""

  def __init__(self, workdir, keep: int, asynchronous: bool = True):
    directory = pathlib.Path(workdir).resolve() / "checkpoints"
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
    """The state saved at ``step``, shaped and sharded like ``abstract_state``."""
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
    return restored["state"], restored["meta"]

  def wait(self) -> None:
    """Blocks until pending asynchronous saves are on disk."""
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def abstract_like(tree: Any) -> Any:
  """``jax.ShapeDtypeStruct`` leaves (with shardings) for an array pytree."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree)

"""Components chosen by name from a config: losses, samplers, detectors.

A registry maps names to entries of one kind; an entry is added by a
decorator, and an unknown name is an error that lists the known ones::

    SAMPLERS = Registry("sampler")

    @SAMPLERS.register("random")
    def random_positives_negatives(key, gt_inds, ...): ...

    SAMPLERS.get("libra")  # KeyError: "unknown sampler 'libra'; known: random"
"""

from typing import Callable, Dict, Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
  """Entries of one ``kind`` by name."""

  def __init__(self, kind: str):
    self.kind = kind
    self._entries: Dict[str, T] = {}

  def register(self, name: str) -> Callable[[T], T]:
    """Decorator: registers its argument under ``name`` and returns it unchanged."""

    def decorate(entry: T) -> T:
      if name in self._entries:
        raise ValueError(f"a {self.kind} named {name!r} is already registered; pick another name")
      self._entries[name] = entry
      return entry

    return decorate

  def get(self, name: str) -> T:
    """The entry called ``name``; a ``KeyError`` lists the known names."""
    if name not in self._entries:
      raise KeyError(f"unknown {self.kind} {name!r}; known: {', '.join(sorted(self._entries))}")
    return self._entries[name]

  def pop(self, name: str) -> T:
    """Removes and returns the entry called ``name`` (tests register temporary entries)."""
    return self._entries.pop(name)

  def entries(self) -> Dict[str, T]:
    """All entries by name (a copy)."""
    return dict(self._entries)

"""PyTorch state dicts (torchvision, mmdetection) <-> Flax variables.

Our modules mirror mmdetection's names (DESIGN.md principle 6): a Flax path
joined by dots is the state-dict prefix, so conversion is one rule per kind
of leaf, not a table per model:

| Flax leaf                          | state-dict name  | layout change             |
|------------------------------------|------------------|---------------------------|
| ``params/.../kernel`` (4-D conv)   | ``....weight``   | HWIO <-> OIHW             |
| ``params/.../kernel`` (2-D dense)  | ``....weight``   | (in, out) <-> (out, in)   |
| ``params/.../bias``                | ``....bias``     | none                      |
| ``params/.../scale`` (BatchNorm)   | ``....weight``   | none                      |
| ``batch_stats/.../mean``           | ``....running_mean`` | none                  |
| ``batch_stats/.../var``            | ``....running_var``  | none                  |

Grouped convolutions convert with the same transpose (PyTorch stores
``[O, I / groups, kh, kw]``, Flax ``[kh, kw, I / groups, O]``).
"""

import dataclasses
import pathlib
from typing import Any, Dict, List, Mapping, Sequence, Tuple

import jax
import numpy as np

from libra_jax import torch_pickle
from libra_jax.errors import DataError, UserError

# Buffers that PyTorch keeps and Flax has no use for.
ALWAYS_IGNORED_SUFFIXES = ("num_batches_tracked",)

_LEAF_NAMES = {
    ("params", "bias"): "bias",
    ("params", "scale"): "weight",
    ("params", "kernel"): "weight",
    ("batch_stats", "mean"): "running_mean",
    ("batch_stats", "var"): "running_var",
}


@dataclasses.dataclass
class ConversionReport:
  """What did not line up between a state dict and the Flax variables."""
  missing: List[str] = dataclasses.field(default_factory=list)
  unexpected: List[str] = dataclasses.field(default_factory=list)
  mismatched: List[Tuple[str, Tuple[int, ...], Tuple[int, ...]]] = dataclasses.field(default_factory=list)
  converted: int = 0

  @property
  def ok(self) -> bool:
    return not (self.missing or self.unexpected or self.mismatched)

  def __str__(self) -> str:
    lines = [f"converted {self.converted} tensors"]
    if self.missing:
      lines.append(f"missing from the state dict ({len(self.missing)}): {', '.join(self.missing[:20])}")
    if self.unexpected:
      lines.append(f"unexpected in the state dict ({len(self.unexpected)}): {', '.join(self.unexpected[:20])}")
    for name, want, got in self.mismatched[:20]:
      lines.append(f"shape mismatch {name}: model wants {want} (PyTorch layout), file has {got}")
    return "\n".join(lines)


def _torch_name(collection: str, path: Sequence[str]) -> str:
  key = (collection, path[-1])
  if key not in _LEAF_NAMES:
    raise ValueError(f"no state-dict rule for Flax leaf {collection}/{'/'.join(path)}")
  return ".".join(list(path[:-1]) + [_LEAF_NAMES[key]])


def _to_torch_layout(leaf_name: str, value: np.ndarray) -> np.ndarray:
  if leaf_name == "kernel" and value.ndim == 4:
    return np.transpose(value, (3, 2, 0, 1))
  if leaf_name == "kernel" and value.ndim == 2:
    return value.T
  return value


def _from_torch_layout(leaf_name: str, value: np.ndarray, ndim: int) -> np.ndarray:
  if leaf_name == "kernel" and ndim == 4 and value.ndim == 4:
    return np.transpose(value, (2, 3, 1, 0))
  if leaf_name == "kernel" and ndim == 2 and value.ndim == 2:
    return value.T
  return value


def _torch_shape(leaf_name: str, shape: Tuple[int, ...]) -> Tuple[int, ...]:
  if leaf_name == "kernel" and len(shape) == 4:
    return (shape[3], shape[2], shape[0], shape[1])
  if leaf_name == "kernel" and len(shape) == 2:
    return (shape[1], shape[0])
  return tuple(shape)


def _leaves(variables: Mapping[str, Any]):
  """Yields ``(collection, path tuple, leaf)`` for the convertible collections."""
  for collection in ("params", "batch_stats"):
    if collection not in variables:
      continue
    flat = jax.tree_util.tree_flatten_with_path(variables[collection])[0]
    for key_path, leaf in flat:
      yield collection, tuple(str(k.key) for k in key_path), leaf


def flax_to_state_dict(variables: Mapping[str, Any], prefix: str = "") -> Dict[str, np.ndarray]:
  """Flax ``variables`` -> a PyTorch-layout state dict of numpy arrays.

  Args:
    variables: ``{"params": ..., "batch_stats": ...}`` of one of our modules.
    prefix: prepended to every name (e.g. ``"backbone."``).
  """
  return {prefix + _torch_name(collection, path): _to_torch_layout(path[-1], np.asarray(leaf))
          for collection, path, leaf in _leaves(variables)}


def state_dict_to_flax(state_dict: Mapping[str, np.ndarray], target: Mapping[str, Any],
                       prefix: str = "", ignore_prefixes: Sequence[str] = (),
                       strict: bool = True) -> Tuple[Dict[str, Any], ConversionReport]:
  """A PyTorch-layout state dict -> Flax variables shaped like ``target``.

  Args:
    state_dict: name -> array (numpy or anything ``np.asarray`` accepts).
    target: variables (or ``jax.eval_shape`` structs) giving the structure,
      shapes and dtypes to fill.
    prefix: the state-dict names of ``target`` start with this.
    ignore_prefixes: state-dict names to drop silently (e.g. ``("fc.",)`` for
      a torchvision classifier); ``num_batches_tracked`` is always dropped.
    strict: raise ``ValueError`` with the report when anything is missing,
      unexpected or of the wrong shape. Non-strict leaves missing or
      mismatched entries as they are in ``target`` (they must then be arrays).

  Returns:
    ``(variables, report)``: new variables for the ``params`` and
    ``batch_stats`` collections found in ``target``.
  """
  report = ConversionReport()
  used = set()
  converted = {}
  for collection in ("params", "batch_stats"):
    if collection not in target:
      continue
    flat, treedef = jax.tree_util.tree_flatten_with_path(target[collection])
    leaves = []
    for key_path, leaf in flat:
      path = tuple(str(k.key) for k in key_path)
      name = prefix + _torch_name(collection, path)
      want = _torch_shape(path[-1], tuple(leaf.shape))
      if name not in state_dict:
        report.missing.append(name)
        leaves.append(leaf)
        continue
      used.add(name)
      value = np.asarray(state_dict[name])
      if tuple(value.shape) != want:
        report.mismatched.append((name, want, tuple(value.shape)))
        leaves.append(leaf)
        continue
      leaves.append(np.asarray(_from_torch_layout(path[-1], value, len(leaf.shape)), dtype=leaf.dtype))
      report.converted += 1
    converted[collection] = jax.tree_util.tree_unflatten(treedef, leaves)
  for name in state_dict:
    if name in used or name.endswith(ALWAYS_IGNORED_SUFFIXES) or not name.startswith(prefix):
      continue
    if not any(name.startswith(p) for p in ignore_prefixes):
      report.unexpected.append(name)
  if strict and not report.ok:
    summary = str(report).replace("\n", "; ")
    raise DataError(f"state dict does not match the model ({summary}); check that the config describes the "
                    f"model these weights belong to")
  return converted, report


def load_state_dict(path) -> Dict[str, np.ndarray]:
  """Reads a state dict from ``.npz``, ``.safetensors`` or ``.pth`` / ``.pt``.

  mmdetection checkpoints keep the weights under ``"state_dict"`` (next to
  ``"meta"`` and the optimizer); that entry is returned. ``.pth`` files are
  read without PyTorch, by an unpickler that loads tensors and plain
  containers only (``libra_jax.torch_pickle``).
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"no checkpoint at {path}")
  suffix = path.suffix.lower()
  readers = {".npz": _read_npz, ".safetensors": _read_safetensors, ".pth": _read_pth, ".pt": _read_pth}
  if suffix not in readers:
    raise DataError(f"unknown checkpoint format {suffix!r} for {path}; use .npz, .safetensors or .pth")
  try:
    return readers[suffix](path)
  except (ImportError, UserError):
    raise
  except torch_pickle.UnsafePickleError as error:
    raise DataError(str(error)) from error
  except Exception as error:  # noqa: BLE001  (every reader's own error for a damaged file)
    raise DataError(f"{path}: cannot read it as a {suffix} state dict ({type(error).__name__}: {error}); the file "
                    f"is truncated or not a {suffix} file: download or export it again") from error


def _read_npz(path: pathlib.Path) -> Dict[str, np.ndarray]:
  with np.load(path) as data:
    return {key: data[key] for key in data.files}


def _read_safetensors(path: pathlib.Path) -> Dict[str, np.ndarray]:
  try:
    from safetensors.numpy import load_file
  except ImportError as error:
    raise ImportError(f"reading {path.name} needs the safetensors package: pip install safetensors") from error
  return dict(load_file(str(path)))


def _read_pth(path: pathlib.Path) -> Dict[str, np.ndarray]:
  checkpoint = torch_pickle.load(path)
  if isinstance(checkpoint, Mapping) and "state_dict" in checkpoint:
    checkpoint = checkpoint["state_dict"]
  if not (isinstance(checkpoint, Mapping) and all(isinstance(v, np.ndarray) for v in checkpoint.values())):
    raise DataError(f"{path}: holds a {type(checkpoint).__name__}, not a state dict (name -> tensor) or an "
                    f"mmdetection checkpoint with a 'state_dict'")
  return dict(checkpoint)


def _collections(variables: Mapping[str, Any], part: str) -> Dict[str, Any]:
  return {c: variables[c][part] for c in ("params", "batch_stats") if c in variables and part in variables[c]}


def import_backbone(state_dict: Mapping[str, np.ndarray], variables: Mapping[str, Any],
                    strict: bool = True) -> Tuple[Dict[str, Any], ConversionReport]:
  """Puts an ImageNet classifier's weights (torchvision ResNet / ResNeXt names) into the backbone.

  The classifier (``fc.*``) is dropped; every backbone tensor must be present.

  Args:
    state_dict: torchvision-style names (``conv1.weight``, ``layer1.0.bn1.running_mean``, ...).
    variables: the detector's variables; only ``backbone`` is replaced.
    strict: as in :func:`state_dict_to_flax`.

  Returns:
    ``(new variables, report)``.
  """
  converted, report = state_dict_to_flax(state_dict, _collections(variables, "backbone"),
                                         ignore_prefixes=("fc.",), strict=strict)
  new = {c: dict(v) for c, v in variables.items()}
  for collection, tree in converted.items():
    new[collection]["backbone"] = tree
  return new, report


def import_detector(state_dict: Mapping[str, np.ndarray], variables: Mapping[str, Any],
                    strict: bool = True) -> Tuple[Dict[str, Any], ConversionReport]:
  """Puts a whole mmdetection detector (Faster R-CNN, RetinaNet, and their Libra variants) into ``variables``.

  Args:
    state_dict: mmdetection names (``backbone.*``, ``neck.*``, ``rpn_head.*``,
      ``roi_head.bbox_head.*`` or ``bbox_head.*``).
    variables: the detector's variables (or their ``jax.eval_shape``).
    strict: as in :func:`state_dict_to_flax`.

  Returns:
    ``(new variables, report)``; other collections are kept.
  """
  converted, report = state_dict_to_flax(state_dict, variables, strict=strict)
  return {**variables, **converted}, report


def export_detector(variables: Mapping[str, Any]) -> Dict[str, np.ndarray]:
  """The detector's variables as an mmdetection-named, PyTorch-layout state dict."""
  return flax_to_state_dict(variables)

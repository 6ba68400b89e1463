"""One loader for every command's experiment: ``--config=FILE[:arg]`` plus ``--config.key=value`` overrides.

A config file is a Python file whose ``get_config()`` (or ``get_config(arg)``
for ``FILE:arg``) returns an ``ml_collections.ConfigDict``. Overrides name a
dotted key that exists in it; the value is parsed as the type the key already
has (``int``, ``float``, ``bool``, ``str``, tuples and dicts as Python
literals, ``None`` where the key is empty). ``check_config`` then rejects
every value that cannot work, before anything is built or compiled. Every
failure is a :class:`~libra_jax.errors.ConfigError` whose message names the
file or key and says what to do.
"""

import ast
import difflib
import importlib.util
import pathlib
import sys
from typing import Any, Sequence, Tuple

import ml_collections

from libra_jax.errors import ConfigError, message

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]

# Run keys that must be positive integers.
POSITIVE_RUN_KEYS = ("global_batch_size", "eval_batch_size", "log_every", "checkpoint_every", "eval_every",
                     "steps_per_epoch", "keep")


def load_config_file(spec: str) -> ml_collections.ConfigDict:
  """``FILE`` or ``FILE:arg`` -> the file's ``get_config()`` (or ``get_config(arg)``)."""
  path_text, _, argument = spec.partition(":")
  path = pathlib.Path(path_text)
  if not path.is_file():
    hint = "pass --config=configs/<name>.py; the configs/ folder lists them"
    raise ConfigError(f"config file {path_text} does not exist; {hint}")
  # Config files import the shared pieces of configs/ (in a checkout) and their own neighbours.
  for root in ([REPO_ROOT] if (REPO_ROOT / "configs").is_dir() else []) + [path.resolve().parent]:
    if str(root) not in sys.path:
      sys.path.insert(0, str(root))
  module_spec = importlib.util.spec_from_file_location(f"libra_jax_config_{path.stem}", path)
  module = importlib.util.module_from_spec(module_spec)
  try:
    module_spec.loader.exec_module(module)
  except Exception as error:
    raise ConfigError(f"config file {path_text} cannot be loaded ({type(error).__name__}: {error}); "
                      f"fix the file") from error
  if not hasattr(module, "get_config"):
    raise ConfigError(f"config file {path_text} has no get_config() function; a config file defines "
                      f"get_config() returning an ml_collections.ConfigDict")
  try:
    config = module.get_config(argument) if argument else module.get_config()
  except Exception as error:
    hint = f"check the ':arg' part of --config={spec}" if argument else "fix the file"
    call = f"get_config({argument!r})" if argument else "get_config()"
    raise ConfigError(f"config file {path_text}: {call} failed ({type(error).__name__}: {error}); {hint}") from error
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigError(f"config file {path_text}: get_config() returned {type(config).__name__}, not an "
                      f"ml_collections.ConfigDict")
  return config


def _holder(config: ml_collections.ConfigDict, key: str) -> Tuple[ml_collections.ConfigDict, str]:
  """The ConfigDict that holds dotted ``key``'s last part, and that part; unknown parts raise ``ConfigError``."""
  names = key.split(".")
  node = config
  for depth, name in enumerate(names):
    walked = names[:depth]
    if not isinstance(node, ml_collections.ConfigDict):
      raise ConfigError(f"unknown config key {key}: {'.'.join(walked)} is a value, not a section")
    if name not in node:
      close = difflib.get_close_matches(name, list(node.keys()), n=1)
      where = f"section {'.'.join(walked)}" if walked else "the config"
      hint = (f"did you mean {'.'.join(walked + close)}?" if close else
              f"{where} has: {', '.join(sorted(node.keys()))}")
      raise ConfigError(f"unknown config key {key}; {hint}")
    if depth < len(names) - 1:
      node = node[name]
  return node, names[-1]


def parse_value(text: str, current: Any, key: str) -> Any:
  """``text`` from the command line as a value of the type ``current`` has."""
  literal = None
  try:
    literal = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    pass
  if text == "None":
    return None
  if isinstance(current, bool):
    if text.lower() in ("true", "1", "yes"):
      return True
    if text.lower() in ("false", "0", "no"):
      return False
  elif isinstance(current, int):
    if isinstance(literal, int) and not isinstance(literal, bool):
      return literal
  elif isinstance(current, float):
    if isinstance(literal, (int, float)) and not isinstance(literal, bool):
      return float(literal)
  elif isinstance(current, str):
    return text
  elif isinstance(current, (tuple, list)):
    if isinstance(literal, (tuple, list)):
      return tuple(literal)
    if isinstance(literal, (int, float, str)):
      return (literal,)
    if literal is None:
      return tuple(part.strip() for part in text.split(","))
  elif isinstance(current, ml_collections.ConfigDict):
    if isinstance(literal, dict):
      return ml_collections.ConfigDict(literal)
  else:
    return text if literal is None else literal
  if isinstance(current, ml_collections.ConfigDict):
    raise ConfigError(f"--config.{key}={text}: {key} is a section; set one of its keys "
                      f"({', '.join(sorted(current.keys()))}) or give a whole dict, e.g. \"{{'name': 'l1'}}\"")
  kind = type(current).__name__
  raise ConfigError(f"--config.{key}={text}: expected {'an' if kind[0] in 'aeiou' else 'a'} {kind}, like the current "
                    f"value {current!r}")


def apply_override(config: ml_collections.ConfigDict, key: str, text: str) -> None:
  """Sets dotted ``key`` of ``config`` to ``text`` parsed as the key's type."""
  holder, leaf = _holder(config, key)
  current = holder[leaf]
  if current is None:
    # An empty placeholder keeps the type it was declared with (e.g. placeholder(str)).
    current = {str: "", int: 0, float: 0.0, bool: False}.get(holder.get_type(leaf))
  value = parse_value(text, current, key)
  try:
    holder[leaf] = value
  except (TypeError, ValueError) as error:
    raise ConfigError(f"--config.{key}={text}: {error}") from error


def load_config(spec: str, overrides: Sequence[Tuple[str, str]] = (), check: bool = True) -> ml_collections.ConfigDict:
  """The config of ``--config=spec`` with ``(key, value)`` overrides applied, checked, and locked.

  Args:
    spec: ``FILE`` or ``FILE:arg``.
    overrides: ``(dotted key, text)`` pairs, in command-line order.
    check: run :func:`check_config` (every experiment config; off only for
      partial configs in tests).
  """
  config = load_config_file(spec)
  for key, text in overrides:
    apply_override(config, key, text)
  if check:
    check_config(config)
  config.lock()
  return config


def _require(condition: bool, message: str) -> None:
  if not condition:
    raise ConfigError(message)


def check_config(config: ml_collections.ConfigDict) -> None:
  """Raises ``ConfigError`` naming the first key of an experiment config that cannot work.

  Checks the run keys, the optimizer, the data section and the model (its
  detector type, backbone, losses and samplers are looked up by name), so a
  mistake stops a command before anything is compiled.
  """
  for key in POSITIVE_RUN_KEYS:
    if key in config:
      value = config[key]
      _require(isinstance(value, int) and value >= 1,
               f"config.{key} must be a positive integer, got {value!r}; set --config.{key}=N with N >= 1")
  if "total_steps" in config:
    _require(config.total_steps >= 0, f"config.total_steps must be >= 0, got {config.total_steps}")
  if config.get("init_checkpoint"):
    _require(pathlib.Path(config.init_checkpoint).exists(),
             f"config.init_checkpoint={config.init_checkpoint} does not exist; pass a detector's weights file "
             f"(.pth, .safetensors, .npz) or a training run's work directory")
  if "optim" in config:
    _check_optim(config.optim)
  if "data" in config:
    from libra_jax.data.config import check_data_config
    check_data_config(config.data)
  if "model" in config:
    check_model_config(config.model)
  if config.get("distributed"):
    from libra_jax import distributed
    distributed.check_topology(config)


def _check_optim(optim) -> None:
  _require(optim.lr_per_16 > 0, f"config.optim.lr_per_16 must be > 0, got {optim.lr_per_16}")
  _require(optim.warmup_steps >= 0, f"config.optim.warmup_steps must be >= 0, got {optim.warmup_steps}")
  _require(0 < optim.warmup_ratio <= 1, f"config.optim.warmup_ratio must be in (0, 1], got {optim.warmup_ratio}")
  _require(0 <= optim.momentum < 1, f"config.optim.momentum must be in [0, 1), got {optim.momentum}")
  _require(optim.weight_decay >= 0, f"config.optim.weight_decay must be >= 0, got {optim.weight_decay}")
  _require(0 < optim.gamma <= 1, f"config.optim.gamma must be in (0, 1], got {optim.gamma}")
  _require(all(epoch > 0 for epoch in optim.milestone_epochs),
           f"config.optim.milestone_epochs must be positive epochs, got {optim.milestone_epochs}")


def check_model_config(model) -> None:
  """Builds the detector's description and its losses: unknown names or values raise ``ConfigError``."""
  from libra_jax import losses
  from libra_jax.models.detectors import build_detector
  _require(model.num_classes >= 1, f"config.model.num_classes must be >= 1, got {model.num_classes}")
  try:
    build_detector(model)
    if model.type == "faster_rcnn":
      from libra_jax.ops.sample import SAMPLERS
      try:
        SAMPLERS.get(model.train.rcnn.sampler.type)
      except KeyError as error:
        raise ConfigError(f"config.model.train.rcnn.sampler.type: {message(error)}") from error
    heads = {"rpn": model.rpn, "rcnn": model.rcnn} if model.type == "faster_rcnn" else {"head": model.head}
    for head_name, head in heads.items():
      for loss in ("loss_cls", "loss_bbox"):
        try:
          losses.build_loss(head[loss])
        except (KeyError, TypeError, ValueError) as error:
          raise ConfigError(f"config.model.{head_name}.{loss}: {message(error)}") from error
  except ConfigError:
    raise
  except (KeyError, ValueError, TypeError) as error:
    raise ConfigError(f"config.model: {message(error)}") from error

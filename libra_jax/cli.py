"""The command-line convention every libra_jax command follows.

- ``--config=FILE[:arg]`` names the experiment (a ``configs/*.py`` file) and
  ``--config.key=value`` overrides any value in it, through one loader
  (:mod:`libra_jax.config_loader`) with one set of checks.
- A mistake (a usage error, an unknown key, a value that cannot work, a file
  that is missing or unreadable) prints one line on stderr that names the
  flag, key or file and says what to do, and the command exits with status 1
  (2 for a usage error). ``--verbose``, or ``LIBRA_JAX_VERBOSE=1`` in the
  environment, shows the traceback instead.
- A run stopped by a signal after saving (``errors.Stopped``) prints one
  ``stopped:`` line saying where, and exits with status 0.
- Where JAX computes on the CPU, freed host memory stays in the process
  (:mod:`libra_jax.host_memory`): a step's buffers are not page-faulted in anew
  every step. Training gives glibc's defaults back where its step's buffers are
  too large for the host; ``LIBRA_JAX_KEEP_HOST_MEMORY=0`` declines the setting
  and ``=1`` keeps it.

A command builds its flags with :class:`ArgumentParser` and runs its
``main(argv)`` through :func:`run`.
"""

import argparse
import importlib
import logging
import os
import pathlib
import sys
from typing import Callable, List, Optional, Sequence, Tuple

from libra_jax import errors, host_memory
from libra_jax.errors import ConfigError, UserError

VERBOSE_ENV = "LIBRA_JAX_VERBOSE"
OVERRIDE_PREFIX = "--config."
# The --import modules imported so far (import_modules).
_imported: List[str] = []


class UsageError(UserError):
  """A command line that does not parse (unknown flag, missing value, ...)."""


def split_overrides(argv: Sequence[str]) -> Tuple[List[str], List[Tuple[str, str]]]:
  """``argv`` without its ``--config.key=value`` items, and those items as ``(key, value)`` pairs."""
  rest, overrides = [], []
  for item in argv:
    if not item.startswith(OVERRIDE_PREFIX):
      rest.append(item)
      continue
    key, equals, value = item[len(OVERRIDE_PREFIX):].partition("=")
    if not equals or not key:
      raise UsageError(f"{item}: an override is --config.KEY=VALUE, with '=' and no spaces around it")
    overrides.append((key, value))
  return rest, overrides


class ArgumentParser(argparse.ArgumentParser):
  """``argparse`` with ``--config``, ``--config.*`` overrides, ``--verbose`` and one-line usage errors.

  Args:
    config: ``"required"``, ``"optional"`` or ``None`` (the command takes no config).
    default_config: the ``--config`` used when none is given (with ``"optional"``).
    check_config: run :func:`libra_jax.config_loader.check_config` on the loaded config.

  ``parse_args`` returns a namespace whose ``config`` is the loaded, overridden
  and checked ``ConfigDict`` (``None`` when no config was given) and whose
  ``config_file`` is the ``--config`` text.
  """

  def __init__(self, *args, config: Optional[str] = "required", default_config: Optional[str] = None,
               check_config: bool = True, **kwargs):
    kwargs.setdefault("allow_abbrev", False)
    super().__init__(*args, **kwargs)
    self._config_mode = config
    self._check_config = check_config
    if config is not None:
      self.add_argument("--config", dest="config_file", metavar="FILE[:arg]", required=config == "required",
                        default=default_config,
                        help="the experiment's config file (configs/*.py, optionally :arg for get_config(arg)); "
                             "--config.KEY=VALUE overrides any value in it")
    self.add_argument("--verbose", action="store_true",
                      help=f"show tracebacks instead of one-line errors (or set {VERBOSE_ENV}=1)")

  def error(self, message):
    raise UsageError(f"{message} (see {self.prog} --help)")

  def parse_args(self, args=None, namespace=None):
    argv = sys.argv[1:] if args is None else [str(a) for a in args]
    rest, overrides = split_overrides(argv)
    parsed = super().parse_args(rest, namespace)
    parsed.config = None
    if self._config_mode is None:
      if overrides:
        self.error(f"{OVERRIDE_PREFIX}{overrides[0][0]}: this command takes no config")
      return parsed
    if parsed.config_file is None:
      if overrides:
        self.error(f"{OVERRIDE_PREFIX}{overrides[0][0]} needs --config=FILE to override")
      return parsed
    from libra_jax import config_loader
    parsed.config = config_loader.load_config(parsed.config_file, overrides, check=self._check_config)
    return parsed


def check_workdir(workdir, must_exist: bool = False) -> None:
  """Raises ``UsageError`` if ``--workdir`` names a file (or, with ``must_exist``, nothing)."""
  path = pathlib.Path(workdir)
  if path.exists() and not path.is_dir():
    raise UsageError(f"--workdir={workdir} is a file, not a directory; pass a directory (it is created if new)")
  if must_exist and not path.is_dir():
    raise UsageError(f"--workdir={workdir} does not exist; pass the work directory of a training run")


def verbose_requested(argv: Sequence[str]) -> bool:
  return "--verbose" in argv or os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def one_line(error: BaseException) -> str:
  """``error`` as the single line a command prints: the message, or the type for an unexpected error."""
  text = errors.message(error)
  if isinstance(error, (UserError, OSError, ImportError)):
    return f"error: {text}"
  return (f"error: unexpected {type(error).__name__}: {text} (a bug: rerun with --verbose for the traceback, "
          f"and report it)")


def import_modules(names: Sequence[str]) -> None:
  """Imports each ``--import`` module (one that registers a loss, say); a failure is one line naming it. The names
  imported are kept for :func:`imported_modules`."""
  for name in names:
    try:
      importlib.import_module(name)
    except Exception as error:  # noqa: BLE001  (any failure of the user's module is reported as one line)
      raise ConfigError(f"--import={name}: cannot import it ({type(error).__name__}: {error}); give a module on "
                        f"the Python path, e.g. mylosses for ./mylosses.py") from None
    if name not in _imported:
      _imported.append(name)


def imported_modules() -> Tuple[str, ...]:
  """The ``--import`` modules this process has imported, in order: a fresh process that builds the same models
  imports them too (``training.precompile``), or a loss they register would be unknown there."""
  return tuple(_imported)


def setup_logging() -> None:
  """Warnings from libraries, progress from libra_jax, on stderr."""
  logging.basicConfig(format="%(levelname).1s %(asctime)s %(name)s] %(message)s", datefmt="%H:%M:%S",
                      level=logging.WARNING)
  logging.getLogger("libra_jax").setLevel(logging.INFO)
  from absl import logging as absl_logging
  absl_logging.set_verbosity(absl_logging.WARNING)


def run(main: Callable[[Sequence[str]], Optional[int]], argv: Optional[Sequence[str]] = None) -> None:
  """Runs ``main(argv)`` as a command: exits with its return value, or prints a failure as one line."""
  argv = list(sys.argv[1:] if argv is None else argv)
  setup_logging()
  try:
    host_memory.keep_freed_host_memory_where_wanted()
    code = main(argv)
  except KeyboardInterrupt:
    print("interrupted", file=sys.stderr)
    sys.exit(130)
  except errors.Stopped as stopped:
    print(f"stopped: {errors.message(stopped)}", file=sys.stderr)
    sys.exit(0)
  except Exception as error:  # pylint: disable=broad-except
    if verbose_requested(argv):
      raise
    print(one_line(error), file=sys.stderr)
    sys.exit(2 if isinstance(error, UsageError) else 1)
  sys.exit(code or 0)

"""Errors a person can act on. Every command prints them as one line (``libra_jax.cli``)."""


class UserError(Exception):
  """A mistake in a command, a config, a file or a work directory; the message says what to do."""


class ConfigError(UserError, ValueError):
  """A config value that cannot work, or a config file that cannot be loaded."""


class NonFiniteLossError(UserError, RuntimeError):
  """The loss became NaN or infinite."""


class DataError(UserError, ValueError):
  """A dataset or weights file that cannot be read as what it claims to be."""


class Stopped(Exception):
  """A run that stopped early on request (SIGTERM, SIGINT) after saving; the message says where. Exit status 0."""


def message(error: BaseException) -> str:
  """An exception's text on one line (a ``KeyError``'s without the quotes ``str`` adds)."""
  text = error.args[0] if isinstance(error, KeyError) and error.args else error
  return " ".join(str(text).split())

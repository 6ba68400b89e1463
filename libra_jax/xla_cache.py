"""Entries of JAX's persistent compilation cache that a stopped process left cut short.

JAX writes a cache entry (``<program>-<64 hex digits>-cache``: the compile
time and the compiled program, compressed with zstd where a zstd module is
installed, else zlib) in place, not through a rename, and never replaces an
entry that exists. A process killed while it writes one (a preempted run, a
SIGKILL) leaves a truncated file behind, and every later process that needs
that program warns "Error reading persistent compilation cache entry",
compiles it again and keeps the broken file: each restart of a run pays that
compile again (the train step's: about 30 s on this project's CPU, minutes on
a GPU). :func:`remove_unreadable_entries` deletes such entries, so that the
next compile writes them anew.

Since JAX never rewrites an entry, one found whole stays whole: a stamp file
in the directory (``CHECKED_STAMP``) records when the last check began, and
later checks read only the entries modified since. Deleting an entry that
another process sharing the directory is writing at that moment loses that
entry (it is compiled and written again later); it never makes a read return
other bytes.
"""

import logging
import os
import pathlib
import re
import time
import zlib
from typing import Callable, List, Optional, Tuple, Type

_log = logging.getLogger(__name__)

# JAX's names: the program's name, the SHA-256 of its cache key, and a suffix.
ENTRY_NAME = re.compile(r".+-[0-9a-f]{64}-cache")
# The access-time file JAX keeps beside an entry when its cache has a size limit.
ACCESS_TIME_SUFFIX = "-atime"
CHECKED_STAMP = ".libra_jax_checked"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def _zstd() -> Optional[Tuple[Callable[[bytes], bytes], Type[Exception]]]:
  """``(decompress, its error type)`` of Python's ``compression.zstd`` or ``zstandard``; None where neither exists."""
  try:
    from compression import zstd  # Python 3.14
    return zstd.decompress, zstd.ZstdError
  except ImportError:
    pass
  try:
    import zstandard
  except ImportError:
    return None
  return (lambda data: zstandard.ZstdDecompressor().decompress(data)), zstandard.ZstdError


def is_readable(data: bytes) -> Optional[bool]:
  """Whether ``data``, an entry's bytes, decompresses whole. None where this cannot judge: a zstd entry without a
  zstd module (JAX could not read it either), or a failure that is not the codec's (memory, say)."""
  if data.startswith(ZSTD_MAGIC):
    codec = _zstd()
    if codec is None:
      return None
    decompress, codec_error = codec
  else:
    decompress, codec_error = zlib.decompress, zlib.error
  try:
    decompress(data)
  except codec_error:
    return False
  except Exception:  # not a verdict on the entry
    return None
  return True


def unreadable_entries(directory, modified_since: float = 0.0) -> List[pathlib.Path]:
  """The entries under the local ``directory`` modified at or after ``modified_since`` (seconds since the epoch)
  that do not decompress, sorted. Files that cannot be read (gone meanwhile, another user's) are skipped."""
  found = []
  for path in pathlib.Path(directory).iterdir():
    if not ENTRY_NAME.fullmatch(path.name):
      continue
    try:
      if path.stat().st_mtime >= modified_since and is_readable(path.read_bytes()) is False:
        found.append(path)
    except OSError:
      continue
  return sorted(found)


def remove_unreadable_entries(directory) -> List[pathlib.Path]:
  """Deletes the :func:`unreadable_entries` modified since the last check (and their access-time files), logs a
  warning naming how many, and returns them. A directory that does not exist, or a remote one (``gs://...``), is
  left alone. Best effort: a failure (a read-only directory, say) is logged, never raised, as JAX's own cache
  errors are."""
  if "://" in str(directory) or not pathlib.Path(directory).is_dir():
    return []
  stamp = pathlib.Path(directory) / CHECKED_STAMP
  started = time.time()
  try:
    last_check = stamp.stat().st_mtime if stamp.exists() else 0.0
    removed = unreadable_entries(directory, modified_since=last_check)
    for path in removed:
      path.unlink(missing_ok=True)
      path.with_name(path.name[:-len("-cache")] + ACCESS_TIME_SUFFIX).unlink(missing_ok=True)
    stamp.touch()
    os.utime(stamp, (started, started))  # entries written while this check ran are checked next time
  except OSError as error:
    _log.warning("could not check the compilation cache %s for cut-short entries: %s", directory, error)
    return []
  if removed:
    _log.warning("removed %d cut-short entries from the compilation cache %s (a process stopped while writing "
                 "them); their programs are compiled and cached again", len(removed), directory)
  return removed

"""Entries of JAX's persistent compilation cache that a stopped process left cut short.

JAX writes a cache entry (``<key>-cache``: the compiled program, compressed
with zstd where a zstd module is installed, else zlib) in place, not through
a rename, and never replaces an entry that exists. A process killed while it
writes one (a preempted run, a SIGKILL) leaves a truncated file behind, and
every later process that needs that program warns "Error reading persistent
compilation cache entry", compiles it again and keeps the broken file: each
restart of a run pays that compile (the train step's: about 30 s on this
project's CPU, minutes on a GPU the first time). :func:`remove_unreadable_entries`
deletes such entries, so that the next compile writes them anew.
"""

import logging
import pathlib
import zlib
from typing import List, Optional

_log = logging.getLogger(__name__)

ENTRY_SUFFIX = "-cache"
# The access-time file JAX keeps beside an entry when its cache has a size limit.
ACCESS_TIME_SUFFIX = "-atime"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def _zstd_decompress():
  """A zstd decompression function, or None where neither Python's ``compression.zstd`` nor ``zstandard`` exists."""
  try:
    from compression import zstd  # Python 3.14
    return zstd.decompress
  except ImportError:
    pass
  try:
    import zstandard
  except ImportError:
    return None
  return lambda data: zstandard.ZstdDecompressor().decompress(data)


def is_readable(data: bytes) -> Optional[bool]:
  """Whether ``data``, an entry's bytes, decompresses whole; None for a zstd entry where no zstd module is installed
  (JAX could not read it either, and this cannot judge it)."""
  if data.startswith(ZSTD_MAGIC):
    decompress = _zstd_decompress()
    if decompress is None:
      return None
  else:
    decompress = zlib.decompress
  try:
    decompress(data)
  except Exception:  # zlib.error, zstd's own errors: any failure means JAX's read fails the same way
    return False
  return True


def unreadable_entries(directory) -> List[pathlib.Path]:
  """The entries under the local ``directory`` (a ``pathlib`` path or string) that do not decompress, sorted."""
  return sorted(path for path in pathlib.Path(directory).glob(f"*{ENTRY_SUFFIX}")
                if path.is_file() and is_readable(path.read_bytes()) is False)


def remove_unreadable_entries(directory) -> List[pathlib.Path]:
  """Deletes :func:`unreadable_entries` (and their access-time files) and logs a warning naming how many; returns
  them. A directory that does not exist, or a remote one (``gs://...``), is left alone."""
  if "://" in str(directory) or not pathlib.Path(directory).is_dir():
    return []
  removed = unreadable_entries(directory)
  for path in removed:
    path.unlink(missing_ok=True)
    path.with_name(path.name[:-len(ENTRY_SUFFIX)] + ACCESS_TIME_SUFFIX).unlink(missing_ok=True)
  if removed:
    _log.warning("removed %d cut-short entries from the compilation cache %s (a process stopped while writing "
                 "them); their programs are compiled and cached again", len(removed), directory)
  return removed

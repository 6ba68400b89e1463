"""The metadata pass's tables on disk, so that a restart (or another host) does not read the split again.

A table is stored next to the prepared dataset, in
``<dataset dir>/libra_jax_metadata/<split>_<start>_<stop>_<fingerprint>.npz``.
The fingerprint covers what the table is computed from: the record files
(names, sizes, modification times), the slice, and the rules of the pass
(``FORMAT`` and the box-size limits). A dataset prepared again, or any record
file rewritten, gets a new fingerprint, so a stale table is never read. Each
host writes only its own slice; a write goes to a temporary name first and is
renamed into place, so concurrent writers and readers see whole files. A
dataset directory that cannot be written (a read-only bucket) is not an error:
the pass then runs at every start, as before, with one warning.
"""

import hashlib
import io
import json
import logging
import os
from typing import Optional, Sequence

import numpy as np

from libra_jax.data import records
from libra_jax.data.report import Report
from libra_jax.data.tf_runtime import tf

# Bumped whenever the pass or this file layout changes, which retires every stored table.
FORMAT = 1
FOLDER = "libra_jax_metadata"

_ARRAYS = ("image_id", "height", "width", "decodable", "boxes", "labels", "is_crowd", "area", "row_splits")


def fingerprint(instructions: Sequence, split: str, start: int, stop: int, rules: dict) -> str:
  """Hex digest of the record files of ``instructions`` (name, size, mtime), the slice and the pass's ``rules``."""
  files = []
  for instruction in instructions:
    stat = tf.io.gfile.stat(instruction.filename)
    files.append([os.path.basename(instruction.filename), int(stat.length), int(stat.mtime_nsec),
                  int(instruction.skip), int(instruction.take)])
  text = json.dumps(dict(format=FORMAT, split=split, start=start, stop=stop, rules=rules, files=files),
                    sort_keys=True)
  return hashlib.sha256(text.encode("utf-8")).hexdigest()[:20]


def path(data_dir: str, split: str, start: int, stop: int, digest: str) -> str:
  return os.path.join(data_dir, FOLDER, f"{split}_{start}_{stop}_{digest}.npz")


def read(table_path: str, table_type, record_files: Sequence[str]):
  """The table stored at ``table_path``, or None if there is none (or it cannot be read: it is then recomputed).

  ``record_files`` are the paths of the record files where they are now (the
  folder may have moved since the table was stored; their names are in the
  fingerprint).
  """
  if not tf.io.gfile.exists(table_path):
    return None
  try:
    with tf.io.gfile.GFile(table_path, "rb") as stream:
      data = np.load(io.BytesIO(stream.read()), allow_pickle=False)
      index = records.RecordIndex(files=tuple(record_files),
                                  file_sizes=data["record_file_sizes"], file=data["record_file"],
                                  offset=data["record_offset"], length=data["record_length"])
      header = json.loads(str(data["header"]))
      return table_type(records=index, filename=data["filename"].astype(object),
                        report=Report.from_json(header["source"], header["report"]),
                        **{name: data[name] for name in _ARRAYS})
  except Exception as error:  # noqa: BLE001  (a damaged table is only a missed shortcut)
    logging.warning("ignoring the unreadable metadata table %s (%s); reading the split again", table_path, error)
    return None


def write(table_path: str, table) -> Optional[str]:
  """Stores ``table`` at ``table_path``; returns why it could not (None when stored)."""
  buffer = io.BytesIO()
  header = json.dumps(dict(source=table.report.source, report=table.report.to_json()))
  np.savez(buffer, header=np.array(header), filename=np.array([str(f) for f in table.filename], dtype=str),
           record_file_sizes=table.records.file_sizes,
           record_file=table.records.file, record_offset=table.records.offset, record_length=table.records.length,
           **{name: getattr(table, name) for name in _ARRAYS})
  temporary = f"{table_path}.tmp{os.getpid()}"
  try:
    tf.io.gfile.makedirs(os.path.dirname(table_path))
    with tf.io.gfile.GFile(temporary, "wb") as stream:
      stream.write(buffer.getvalue())
    tf.io.gfile.rename(temporary, table_path, overwrite=True)
  except (tf.errors.OpError, OSError) as error:
    return str(getattr(error, "message", error)).strip().splitlines()[0]
  return None

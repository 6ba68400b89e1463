"""Random access to the examples of a prepared TFDS dataset, by their byte position in its record files.

TFDS stores a split as TFRecord files: each record is an 8-byte little-endian
length, a 4-byte checksum of it, the serialized example and a 4-byte checksum
of the data. One sequential ``scan`` of a slice of the split notes where
every example starts; afterwards ``read_examples`` reads any example with one
read, so a batch plan can take examples in any order and a resumed run reads
only what it uses.
"""

import dataclasses
import struct
from typing import Iterator, List, Sequence, Tuple

import numpy as np
import tensorflow_datasets as tfds

from libra_jax.data.tf_runtime import tf
from libra_jax.errors import DataError

_LENGTH = struct.Struct("<Q")
_HEADER_BYTES = 12  # length (8) + its checksum (4)
_FOOTER_BYTES = 4  # checksum of the data


@dataclasses.dataclass
class RecordIndex:
  """Where the examples of a slice of a split lie. Row ``i`` is the slice's ``i``-th example.

  Attributes:
    files: paths of the record files.
    file_sizes: ``[F]`` int64, bytes.
    file: ``[N]`` int32, index into ``files`` of each example.
    offset: ``[N]`` int64, byte offset of each serialized example in its file.
    length: ``[N]`` int64, bytes of each serialized example.
  """
  files: Tuple[str, ...]
  file_sizes: np.ndarray
  file: np.ndarray
  offset: np.ndarray
  length: np.ndarray

  def __len__(self) -> int:
    return len(self.offset)


def split_files(builder: tfds.core.DatasetBuilder, split: str, start: int, stop: int) -> List:
  """Which records of which files hold examples ``start..stop-1`` of ``split``.

  Returns TFDS file instructions (``filename``, ``skip``, ``take``, ``examples_in_shard``).
  """
  if builder.info.file_format != tfds.core.FileFormat.TFRECORD:
    raise DataError(f"{builder.info.full_name} is stored as {builder.info.file_format.value}; the pipeline reads "
                    f"TFRecord files (TFDS's default format): prepare it again without --file_format")
  if stop <= start:
    return []
  return list(builder.info.splits[f"{split}[{start}:{stop}]"].file_instructions)


def scan(instructions: Sequence) -> Iterator[Tuple[int, int, int, bytes]]:
  """Reads the records of ``instructions`` sequentially: ``(file, offset, length, serialized example)``.

  ``file`` indexes ``instructions``; ``offset`` and ``length`` are bytes. A
  file shorter than its split info says raises ``ValueError``.
  """
  for file, instruction in enumerate(instructions):
    with tf.io.gfile.GFile(instruction.filename, "rb") as stream:
      position = 0
      for record in range(instruction.skip + instruction.take):
        header = stream.read(_HEADER_BYTES)
        if len(header) < _HEADER_BYTES:
          raise DataError(f"{instruction.filename} ends after {record} records but its split info promises "
                          f"{instruction.examples_in_shard}; prepare the dataset again")
        (length,) = _LENGTH.unpack(header[:8])
        if record < instruction.skip:
          stream.seek(position + _HEADER_BYTES + length + _FOOTER_BYTES)
        else:
          data = stream.read(length)
          stream.read(_FOOTER_BYTES)
          yield file, position + _HEADER_BYTES, length, data
        position += _HEADER_BYTES + length + _FOOTER_BYTES


def make_index(instructions: Sequence, positions: Sequence[Tuple[int, int, int]]) -> RecordIndex:
  """The ``RecordIndex`` of ``positions`` (``(file, offset, length)`` per example, from ``scan``)."""
  located = np.asarray(positions, np.int64).reshape(-1, 3)
  return RecordIndex(files=tuple(i.filename for i in instructions),
                     file_sizes=np.array([tf.io.gfile.stat(i.filename).length for i in instructions], np.int64),
                     file=located[:, 0].astype(np.int32), offset=located[:, 1], length=located[:, 2])


def read_examples(index: RecordIndex, dataset: tf.data.Dataset) -> tf.data.Dataset:
  """Adds ``"serialized"`` (the example's bytes) to each element of ``dataset``, by its ``"row"`` (int64).

  Order is kept; reads run in parallel. ``index`` must hold at least one file.
  """
  files = tf.constant(index.files, tf.string)
  file_sizes = tf.constant(index.file_sizes, tf.int64)
  file_of = tf.constant(index.file, tf.int32)
  offset_of = tf.constant(index.offset, tf.int64)
  length_of = tf.constant(index.length, tf.int64)

  def read(element):
    row = element["row"]
    file, offset, length = file_of[row], offset_of[row], length_of[row]
    record = tf.data.FixedLengthRecordDataset(files[file], record_bytes=length, header_bytes=offset,
                                              footer_bytes=file_sizes[file] - offset - length)
    return record.take(1).map(lambda serialized: dict(element, serialized=serialized))

  return dataset.interleave(read, cycle_length=16, block_length=1, num_parallel_calls=tf.data.AUTOTUNE,
                            deterministic=True)

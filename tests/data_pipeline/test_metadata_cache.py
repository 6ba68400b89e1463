"""The metadata tables stored next to a prepared dataset: read back whole, never stale, never required."""

import dataclasses
import logging
import os
import shutil

import numpy as np
import pytest

from libra_jax.data import metadata, metadata_cache, records, sources


def assert_same_table(got: metadata.ImageTable, want: metadata.ImageTable):
  for field in dataclasses.fields(metadata.ImageTable):
    a, b = getattr(got, field.name), getattr(want, field.name)
    if field.name == "report":
      assert (a.source, a.to_json()) == (b.source, b.to_json())
    elif field.name == "records":
      assert a.files == b.files
      for name in ("file_sizes", "file", "offset", "length"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    else:
      assert a.dtype == b.dtype and a.shape == b.shape, field.name
      np.testing.assert_array_equal(a, b, err_msg=field.name)


@pytest.fixture
def fresh(folder_config, monkeypatch):
  """``(builder, split, size, scanned table)`` of the mini folder's train split, with nothing stored or remembered."""
  builder = sources.prepared_builder(folder_config())
  shutil.rmtree(os.path.join(builder.data_dir, metadata_cache.FOLDER), ignore_errors=True)
  monkeypatch.setattr(metadata, "_TABLES", {})
  size = builder.info.splits["train"].num_examples
  return builder, "train", size, metadata._scan(builder, "train", 0, size,
                                               records.split_files(builder, "train", 0, size))


def forbid_scanning(monkeypatch):
  def scan(*args):
    raise AssertionError("the split was read again")
  monkeypatch.setattr(metadata, "_TABLES", {})
  monkeypatch.setattr(metadata, "_scan", scan)


def test_a_restart_reads_the_stored_table_instead_of_the_split(fresh, monkeypatch):
  builder, split, size, scanned = fresh
  # The mini folder's train split has undecodable, grayscale and palette images and dropped boxes: the report
  # and every array must come back.
  assert scanned.report.counts and not scanned.decodable.all()
  assert_same_table(metadata.load(builder, split, 0, size), scanned)
  [stored] = os.listdir(os.path.join(builder.data_dir, metadata_cache.FOLDER))
  assert stored.startswith(f"{split}_0_{size}_") and stored.endswith(".npz")
  forbid_scanning(monkeypatch)
  assert_same_table(metadata.load(builder, split, 0, size), scanned)
  # Another slice (another host's share) is not that table.
  with pytest.raises(AssertionError, match="read again"):
    metadata.load(builder, split, 1, size)


def test_a_rewritten_record_file_retires_the_stored_table(fresh, monkeypatch):
  builder, split, size, scanned = fresh
  metadata.load(builder, split, 0, size)
  record_file = scanned.records.files[0]
  stat = os.stat(record_file)
  os.utime(record_file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
  try:
    forbid_scanning(monkeypatch)
    with pytest.raises(AssertionError, match="read again"):
      metadata.load(builder, split, 0, size)
  finally:
    os.utime(record_file, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_a_damaged_table_is_read_again_and_an_unwritable_folder_only_warns(fresh, monkeypatch, caplog):
  builder, split, size, scanned = fresh
  metadata.load(builder, split, 0, size)
  folder = os.path.join(builder.data_dir, metadata_cache.FOLDER)
  [stored] = os.listdir(folder)
  path = os.path.join(folder, stored)
  with open(path, "r+b") as stream:
    stream.truncate(os.path.getsize(path) // 2)
  monkeypatch.setattr(metadata, "_TABLES", {})
  with caplog.at_level(logging.WARNING):
    assert_same_table(metadata.load(builder, split, 0, size), scanned)
  assert "ignoring the unreadable metadata table" in caplog.text
  # Rewritten whole by that pass.
  forbid_scanning(monkeypatch)
  assert_same_table(metadata.load(builder, split, 0, size), scanned)

  # A folder that cannot be written (here its name is taken by a file): the pass runs, with one warning.
  shutil.rmtree(folder)
  open(folder, "w").close()
  monkeypatch.setattr(metadata, "_TABLES", {})
  monkeypatch.setattr(metadata, "_scan", lambda *args: scanned)
  caplog.clear()
  try:
    with caplog.at_level(logging.WARNING):
      assert metadata.load(builder, split, 0, size) is scanned
  finally:
    os.remove(folder)
  assert "cannot be stored" in caplog.text and "read again at every start" in caplog.text

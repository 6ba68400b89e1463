"""Cut-short entries of JAX's persistent compilation cache are deleted before a run uses the cache."""

import json
import logging
import os
import pathlib
import subprocess
import sys
import textwrap
import zlib

import pytest

from libra_jax import xla_cache

# A fresh process (JAX fixes its cache directory at the first compile) compiles one program through the cache in
# argv[1]; with argv[2] == "repair" it turns the cache on as a run does. It prints the warnings it saw and whether
# each entry in the cache is readable afterwards.
COMPILE_CHILD = textwrap.dedent("""
    import json, logging, pathlib, sys, warnings
    import jax, jax.numpy as jnp
    from libra_jax import runtime, xla_cache
    logging.basicConfig(level=logging.WARNING)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    if sys.argv[2] == "repair":
      runtime.enable_compilation_cache({"compilation_cache_dir": sys.argv[1]}, "unused")
    else:
      jax.config.update("jax_compilation_cache_dir", sys.argv[1])
    with warnings.catch_warnings(record=True) as seen:
      warnings.simplefilter("always")
      jax.jit(lambda x: jnp.sin(x) @ x.T + 1.0)(jnp.ones((32, 32))).block_until_ready()
    entries = {p.name: xla_cache.is_readable(p.read_bytes())
               for p in sorted(pathlib.Path(sys.argv[1]).glob("jit__lambda*-cache"))}
    print(json.dumps(dict(warnings=[str(w.message) for w in seen], entries=entries)))
""")


def compile_in_child(cache_dir, mode):
  done = subprocess.run([sys.executable, "-c", COMPILE_CHILD, str(cache_dir), mode], capture_output=True, text=True,
                        check=True, timeout=300)
  return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr


def test_a_cut_short_entry_fails_every_start_until_a_run_removes_it(tmp_path):
  written, _ = compile_in_child(tmp_path, "plain")
  assert list(written["entries"].values()) == [True]
  (entry,) = tmp_path.glob("jit__lambda*-cache")
  entry.write_bytes(entry.read_bytes()[:len(entry.read_bytes()) // 2])  # as a process killed mid-write leaves it
  for _ in range(2):  # JAX alone never replaces it: each start warns and compiles again
    plain, _ = compile_in_child(tmp_path, "plain")
    assert any("Error reading persistent compilation cache entry" in w for w in plain["warnings"])
    assert list(plain["entries"].values()) == [False]
  repaired, stderr = compile_in_child(tmp_path, "repair")
  assert "removed 1 cut-short entries from the compilation cache" in stderr
  assert not any("persistent compilation cache" in w for w in repaired["warnings"])
  assert list(repaired["entries"].values()) == [True]  # written anew, whole


KEY = "0123456789abcdef" * 4  # the 64 hex digits of JAX's entry names


def test_only_entries_that_do_not_decompress_are_removed_with_their_access_times(tmp_path, caplog):
  whole = zlib.compress(b"a compiled program" * 100)
  (tmp_path / f"jit_a-{KEY}-cache").write_bytes(whole)
  (tmp_path / f"jit_a-{KEY}-atime").write_bytes(b"12345678")
  (tmp_path / f"jit_b-{KEY}-cache").write_bytes(whole[:len(whole) // 2])
  (tmp_path / f"jit_b-{KEY}-atime").write_bytes(b"12345678")
  (tmp_path / f"jit_c-{KEY}-cache").write_bytes(b"")
  (tmp_path / "notes-cache").write_bytes(b"not JAX's")  # not an entry's name: kept
  with caplog.at_level(logging.WARNING, logger=xla_cache.__name__):
    removed = xla_cache.remove_unreadable_entries(tmp_path)
  assert [p.name for p in removed] == [f"jit_b-{KEY}-cache", f"jit_c-{KEY}-cache"]
  assert sorted(p.name for p in tmp_path.iterdir()) == [xla_cache.CHECKED_STAMP, f"jit_a-{KEY}-atime",
                                                        f"jit_a-{KEY}-cache", "notes-cache"]
  assert f"removed 2 cut-short entries from the compilation cache {tmp_path}" in caplog.text
  caplog.clear()
  with caplog.at_level(logging.WARNING, logger=xla_cache.__name__):
    assert xla_cache.remove_unreadable_entries(tmp_path) == []
  assert caplog.text == ""


def test_entries_older_than_the_last_check_are_not_read_again(tmp_path):
  cut = tmp_path / f"jit_d-{KEY}-cache"
  cut.write_bytes(zlib.compress(b"program")[:5])
  os.utime(cut, (1000.0, 1000.0))  # written long before the check below
  (tmp_path / xla_cache.CHECKED_STAMP).touch()
  assert xla_cache.remove_unreadable_entries(tmp_path) == [] and cut.exists()
  # Modified after the last check. Set explicitly: a file's "now" comes from the kernel's coarse clock, which can
  # read earlier than the time.time() the check stamped (a clean clone's run saw no entry found).
  checked = (tmp_path / xla_cache.CHECKED_STAMP).stat().st_mtime
  os.utime(cut, (checked + 1, checked + 1))
  assert xla_cache.remove_unreadable_entries(tmp_path) == [cut] and not cut.exists()


def test_a_directory_that_cannot_be_written_is_a_warning_not_an_error(tmp_path, caplog, monkeypatch):
  (tmp_path / f"jit_e-{KEY}-cache").write_bytes(b"cut")

  def refuse(*_, **__):
    raise PermissionError("read-only file system")
  monkeypatch.setattr(pathlib.Path, "unlink", refuse)
  with caplog.at_level(logging.WARNING, logger=xla_cache.__name__):
    assert xla_cache.remove_unreadable_entries(tmp_path) == []
  assert f"could not check the compilation cache {tmp_path} for cut-short entries: read-only" in caplog.text


def test_zstd_entries_are_judged_only_where_zstd_can_be_read(monkeypatch):
  cut = xla_cache.ZSTD_MAGIC + b"not a whole frame"
  monkeypatch.setattr(xla_cache, "_zstd", lambda: None)
  assert xla_cache.is_readable(cut) is None
  monkeypatch.setattr(xla_cache, "_zstd", lambda: (zlib.decompress, zlib.error))  # a decoder that rejects it
  assert xla_cache.is_readable(cut) is False


def test_real_zstd_entries_whole_and_cut():
  zstandard = pytest.importorskip("zstandard")
  whole = zstandard.ZstdCompressor().compress(b"a compiled program" * 100)
  assert xla_cache.is_readable(whole) is True
  assert xla_cache.is_readable(whole[:len(whole) // 2]) is False


def test_a_failure_that_is_not_the_codecs_is_no_verdict(monkeypatch):
  def out_of_memory(_):
    raise MemoryError
  monkeypatch.setattr(xla_cache.zlib, "decompress", out_of_memory)
  assert xla_cache.is_readable(b"x\x9c whatever") is None


def test_missing_and_remote_directories_are_left_alone(tmp_path):
  assert xla_cache.remove_unreadable_entries(tmp_path / "not_made_yet") == []
  assert not (tmp_path / "not_made_yet").exists()
  assert xla_cache.remove_unreadable_entries("gs://bucket/xla_cache") == []

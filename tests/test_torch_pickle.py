"""Reading torch.save files without PyTorch: files torch wrote (tests/data/make_torch_checkpoints.py), and pickles
that try to run code."""

import os
import pathlib
import pickle
import struct
import sys
import zipfile

import ml_dtypes
import numpy as np
import pytest

from libra_jax import convert, torch_pickle
from libra_jax.errors import DataError

DATA = pathlib.Path(__file__).parent / "data"
sys.path.insert(0, str(DATA))
import make_torch_checkpoints as made  # noqa: E402  (the formulas the files were written from)


def expected_state_dict():
  """The arrays the files hold, from the generator's formulas in numpy: floats rounded to their stored dtype, then
  float32, as the reader returns them."""
  stored = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16, "int64": np.int64,
            "bool": np.bool_}
  arrays = {}
  for name, (make, dtype) in made.TENSORS.items():
    value = np.asarray(make()).astype(stored[dtype])
    arrays[name] = value.astype(np.float32) if dtype in ("float16", "bfloat16") else value
  arrays["bn1.running_var_tail"] = arrays["bn1.running_var"][2:]
  return arrays


def assert_state_dict(got):
  want = expected_state_dict()
  assert list(got) == list(made.TENSORS) + ["bn1.running_var_tail"]
  for name, value in want.items():
    assert got[name].dtype == value.dtype and got[name].shape == value.shape, name
    np.testing.assert_array_equal(got[name], value, err_msg=name)


@pytest.mark.parametrize("name", ["torchvision_layout.pth", "mmdetection_layout_zip.pth",
                                  "mmdetection_layout_legacy.pth"])
def test_files_torch_wrote_are_read_exactly(name):
  checkpoint = torch_pickle.load(DATA / name)
  if name.startswith("mmdetection"):
    assert checkpoint["meta"] == made.META
    checkpoint = checkpoint["state_dict"]
  assert_state_dict(checkpoint)
  # convert.load_state_dict takes the weights out of either layout.
  assert_state_dict(convert.load_state_dict(DATA / name))


class RunsCode:
  """Unpickled by pickle itself, this would call os.system."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return os.system, (f"touch {self.marker}",)


def zip_checkpoint(path, payload: bytes):
  with zipfile.ZipFile(path, "w") as archive:
    archive.writestr("archive/data.pkl", payload)
    archive.writestr("archive/version", "3\n")


def legacy_checkpoint(path, payload: bytes):
  head = b"".join(pickle.dumps(value, protocol=2) for value in (
      torch_pickle.LEGACY_MAGIC_NUMBER, torch_pickle.LEGACY_PROTOCOL_VERSION,
      {"protocol_version": 1001, "little_endian": True, "type_sizes": {"short": 2, "int": 4, "long": 4}}))
  path.write_bytes(head + payload)


@pytest.mark.parametrize("write", [zip_checkpoint, legacy_checkpoint])
def test_a_pickle_that_would_run_code_is_refused_before_anything_runs(tmp_path, write):
  marker = tmp_path / "ran"
  # Sanity: pickle itself would run it.
  pickle.loads(pickle.dumps(RunsCode(marker), protocol=2))
  assert marker.exists()
  marker.unlink()
  path = tmp_path / "model.pth"
  write(path, pickle.dumps({"state_dict": {"w": RunsCode(marker)}}, protocol=2))
  with pytest.raises(torch_pickle.UnsafePickleError, match=r"names posix\.system, which is not a tensor"):
    torch_pickle.load(path)
  assert not marker.exists()
  with pytest.raises(DataError, match=r"model\.pth: its pickle names posix\.system"):
    convert.load_state_dict(path)
  assert not marker.exists()


def _text(value: str) -> bytes:
  data = value.encode()
  return b"X" + struct.pack("<I", len(data)) + data


def _ints(values) -> bytes:
  return b"(" + b"".join(b"J" + struct.pack("<i", v) for v in values) + b"t"


def one_tensor_pickle(size, stride, storage_class=b"ctorch\nFloatStorage\n", numel=4) -> bytes:
  """Protocol-2 opcodes, written out as torch.save writes them, for
  ``{"w": _rebuild_tensor_v2(<storage "0": numel floats>, 0, size, stride, False, ())}``."""
  storage = b"(" + _text("storage") + storage_class + _text("0") + _text("cpu") + b"J" + struct.pack("<i", numel)
  storage += b"tQ"  # TUPLE, then BINPERSID: the tuple is a persistent id
  arguments = b"(" + storage + b"J" + struct.pack("<i", 0) + _ints(size) + _ints(stride) + b"\x89)t"
  return b"\x80\x02}" + _text("w") + b"ctorch._utils\n_rebuild_tensor_v2\n" + arguments + b"Rs."


def zip_with_storage(path, payload: bytes, floats=(1, 2, 3, 4)):
  with zipfile.ZipFile(path, "w") as archive:
    archive.writestr("archive/data.pkl", payload)
    archive.writestr("archive/data/0", struct.pack(f"<{len(floats)}f", *floats))


def test_a_hand_written_tensor_reads_as_torch_would_give_it(tmp_path):
  # The 2 x 2 transposed view of the storage [1, 2, 3, 4]: [[1, 3], [2, 4]].
  zip_with_storage(tmp_path / "t.pth", one_tensor_pickle((2, 2), (1, 2)))
  np.testing.assert_array_equal(torch_pickle.load(tmp_path / "t.pth")["w"], [[1, 3], [2, 4]])


def test_a_storage_id_that_is_not_a_storage_is_refused(tmp_path):
  zip_with_storage(tmp_path / "odd.pth", one_tensor_pickle((4,), (1,), storage_class=_text("FloatStorage")))
  with pytest.raises(torch_pickle.UnsafePickleError, match="not a tensor storage"):
    torch_pickle.load(tmp_path / "odd.pth")


def test_a_tensor_past_its_storage_is_refused(tmp_path):
  # 5 elements of a 4-element storage, or 2 x 2 with a stride that reaches element 4: an error, not a read of
  # memory past the buffer.
  for size, stride in (((5,), (1,)), ((2, 2), (3, 1))):
    zip_with_storage(tmp_path / "past.pth", one_tensor_pickle(size, stride))
    with pytest.raises(ValueError, match="reaches past its storage of 4 elements"):
      torch_pickle.load(tmp_path / "past.pth")
  with pytest.raises(DataError, match="past.pth: cannot read it as a .pth state dict"):
    convert.load_state_dict(tmp_path / "past.pth")


def test_damaged_files_get_one_line(tmp_path):
  whole = (DATA / "mmdetection_layout_legacy.pth").read_bytes()
  (tmp_path / "cut.pth").write_bytes(whole[:len(whole) - 10])
  with pytest.raises(DataError, match="cut.pth: cannot read it as a .pth state dict .*download or export it again"):
    convert.load_state_dict(tmp_path / "cut.pth")
  zip_checkpoint(tmp_path / "list.pth", pickle.dumps([1, 2], protocol=2))
  with pytest.raises(DataError, match="list.pth: holds a list, not a state dict"):
    convert.load_state_dict(tmp_path / "list.pth")

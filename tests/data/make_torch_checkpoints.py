"""Writes the small ``torch.save`` files of tests/test_torch_pickle.py (run by hand where PyTorch is installed).

    python tests/data/make_torch_checkpoints.py

Every tensor is ``TENSORS[name](numpy)`` computed in torch, so the test can
compute the expected arrays with numpy alone. Files:

* ``torchvision_layout.pth``: a plain ``OrderedDict`` state dict, zip format;
  one entry is an ``nn.Parameter``, one a transposed (non-contiguous) view, one
  a view at an offset into another entry's storage.
* ``mmdetection_layout_legacy.pth``: ``{"meta": ..., "state_dict": ...}`` in the
  legacy (pre-zip) format that mmdetection 2's published checkpoints use.
* ``mmdetection_layout_zip.pth``: the same object in the zip format.
"""

import collections
import pathlib

import numpy as np


def _ramp(shape, scale):
  """``arange(prod(shape)) * scale - 1`` reshaped to ``shape``, float64."""
  return np.arange(int(np.prod(shape)), dtype=np.float64).reshape(shape) * scale - 1.0


# name -> (how the stored tensor is made from numpy arrays, the torch dtype name)
TENSORS = {
    "conv1.weight": (lambda: _ramp((4, 3, 3, 3), 0.01), "float32"),
    "bn1.running_var": (lambda: _ramp((4,), 0.5) + 2.0, "float32"),
    "bn1.num_batches_tracked": (lambda: np.array(1234), "int64"),
    "fc.weight_t": (lambda: _ramp((3, 5), 0.1).T, "float32"),
    "head.half": (lambda: _ramp((6,), 0.25), "float16"),
    "head.bf16": (lambda: _ramp((2, 2), 0.5), "bfloat16"),
    "head.mask": (lambda: _ramp((5,), 1.0) > 1, "bool"),
    "head.empty": (lambda: np.zeros((0, 3)), "float32"),
}
META = {"mmdet_version": "2.0.0", "CLASSES": ("person", "bicycle"), "epoch": 12, "iter": 87960,
        "config": "model = dict(type='FasterRCNN')"}


def state_dict():
  import torch
  tensors = collections.OrderedDict()
  for name, (make, dtype) in TENSORS.items():
    tensors[name] = torch.from_numpy(np.array(make(), order="C")).to(getattr(torch, dtype))
  tensors["fc.weight_t"] = tensors["fc.weight_t"].T.contiguous().T  # stored as a transposed view
  tensors["conv1.weight"] = torch.nn.Parameter(tensors["conv1.weight"], requires_grad=True)
  # The last 2 of bn1's 4 running variances, sharing its storage at an offset of 2 elements.
  tensors["bn1.running_var_tail"] = tensors["bn1.running_var"][2:]
  return tensors


def main():
  import torch
  here = pathlib.Path(__file__).parent
  torch.save(state_dict(), here / "torchvision_layout.pth")
  checkpoint = {"meta": META, "state_dict": state_dict()}
  torch.save(checkpoint, here / "mmdetection_layout_legacy.pth", _use_new_zipfile_serialization=False)
  torch.save(checkpoint, here / "mmdetection_layout_zip.pth")


if __name__ == "__main__":
  main()

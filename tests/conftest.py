"""Shared test fixtures: the reference data in tests/data/."""

import pathlib

import numpy as np
import pytest

DATA_DIR = pathlib.Path(__file__).parent / "data"


@pytest.fixture(scope="session")
def load_ref():
  """Loads ``tests/data/<name>.npz`` (numbers computed with mmdetection's own code)."""

  def load(name):
    path = DATA_DIR / f"{name}.npz"
    with np.load(path) as data:
      return {key: data[key] for key in data.files}

  return load


"""Shared test fixtures: the reference data in tests/data/, one prepared shapes dataset, the tiny detectors.

Before JAX is imported anywhere, the suite (and every command its tests start,
which inherit the environment) sets XLA:CPU to compile fast and shares one
persistent compilation cache. On CPU, compilation takes most of the suite's
time (580 s of the workers' 1,480 s in a cold run on 2 cores, 2026-12-02):
- backend optimization level 0 compiles about 2x faster than the default;
- XLA:CPU's older elemental emitters, instead of its fusion emitters, compile
  about 1.8x faster again (the tiny detector's train step: 7.3 to 4.0 s;
  three op and head test files, cold: 98 to 71 s). Their steps run about
  1.3x slower (0.24 to 0.29 s), which the suite's few hundred training steps
  do not feel.
Results differ from an optimized build's only in the last bits of a float.
"""

import fcntl
import os
import pathlib
import tempfile

os.environ["XLA_FLAGS"] = " ".join(filter(None, [os.environ.get("XLA_FLAGS"),
                                                  "--xla_backend_optimization_level=0",
                                                  "--xla_cpu_use_fusion_emitters=false"]))
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "libra_jax_test_xla_cache"))
# Cache every program, not only those that compile in over a second: the suite compiles hundreds of small ones.
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

DATA_DIR = pathlib.Path(__file__).parent / "data"


@pytest.fixture(scope="session")
def load_ref():
  """Loads ``tests/data/<name>.npz`` (numbers computed with mmdetection's own code)."""

  def load(name):
    path = DATA_DIR / f"{name}.npz"
    with np.load(path) as data:
      return {key: data[key] for key in data.files}

  return load



@pytest.fixture(autouse=True)
def no_import_modules_from_other_tests(monkeypatch):
  """Each test starts with no recorded ``--import`` modules (``cli.imported_modules``): a fresh process a test
  spawns imports those, and another test's module may be gone from the path by then."""
  from libra_jax import cli
  monkeypatch.setattr(cli, "_imported", [])


@pytest.fixture(autouse=True)
def no_host_memory_decision_from_other_tests(monkeypatch):
  """Each test starts as if this process had not kept freed host memory by default: a command a test runs in this
  process (``cli.run``) records that it did, and a later in-process training run would then decide on this
  process's malloc (``host_memory.keep_if_affordable``)."""
  from libra_jax import host_memory
  monkeypatch.setattr(host_memory, "_kept_because", None)


@pytest.fixture(scope="session")
def shapes_tfds_dir(tmp_path_factory) -> str:
  """A TFDS data dir where the easy ``shapes`` dataset is prepared, once for the whole run.

  Under pytest-xdist the workers share it: it lies in the run's base directory, and the first worker to
  get there prepares it while the others wait on a file lock.
  """
  from libra_jax.data import default_data_config, pipeline
  root = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    root = root.parent  # the workers' base directories are siblings in the run's own
  data = default_data_config("shapes")
  data.tfds_data_dir = str(root / "shapes_tfds")
  with open(root / "shapes_tfds.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    pipeline.dataset_info(data)
  return data.tfds_data_dir


@pytest.fixture(scope="session")
def tiny_faster():
  """``(model, variables)`` of the tiny Libra Faster R-CNN of ``support.tiny_model_config("faster")``."""
  from support import tiny_model_config, tiny_variables
  from libra_jax.models.detectors import build_detector
  return build_detector(tiny_model_config("faster")), tiny_variables("faster")


@pytest.fixture(scope="session")
def tiny_retina():
  """``(model, variables)`` of the tiny Libra RetinaNet of ``support.tiny_model_config("retina")``."""
  from support import tiny_model_config, tiny_variables
  from libra_jax.models.detectors import build_detector
  return build_detector(tiny_model_config("retina")), tiny_variables("retina")


@pytest.fixture
def scratch_loss_registry(monkeypatch):
  """Losses registered during the test (say by a user module it imports) go into a copy of the registry, which
  the test's end puts back: later tests in the worker see only the built-in losses."""
  from libra_jax import losses
  monkeypatch.setattr(losses._REGISTRY, "_entries", losses._REGISTRY.entries())


def pytest_collection_modifyitems(items):
  """Slow tests first, so that the two workers start the long ones early and share out the short ones after."""
  items.sort(key=lambda item: item.get_closest_marker("slow") is None)

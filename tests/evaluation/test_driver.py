"""What the evaluation driver checks before anything compiles."""

import gc
import types

import pytest

from configs import shapes_libra_faster_rcnn
from libra_jax import runtime
from libra_jax.errors import ConfigError
from libra_jax.evaluation import driver


@pytest.mark.parametrize("key, value, message", [
    ("data.eval_split", "validaton[:16]", "config.data.eval_split: shapes/easy/1.0.0 has no split 'validaton[:16]' "
     "(Unknown split 'validaton'. Should be one of ['train', 'validation'].); it has ['train', 'validation']"),
    ("data.eval_split", "validation+train", "config.data.eval_split: data split 'validation+train' joins several "
     "splits; name one split or a slice of one"),
    ("data.train_split", "training", "config.data.train_split: shapes/easy/1.0.0 has no split 'training'"),
    ("model.num_classes", 4, "config.model.num_classes is 4 but dataset 'shapes' has 3 classes"),
])
def test_a_config_that_does_not_fit_its_dataset_stops_before_compiling(shapes_tfds_dir, key, value, message):
  config = shapes_libra_faster_rcnn.get_config()
  config.data.tfds_data_dir = shapes_tfds_dir
  section, name = key.rsplit(".", 1) if "." in key else ("", key)
  (config[section] if section else config)[name] = value
  with pytest.raises(ConfigError) as error:
    driver.checked_model(config, runtime.make_mesh())
  assert message in str(error.value)


def test_batch_sizes_must_split_over_the_devices():
  config = shapes_libra_faster_rcnn.get_config()
  four_devices = types.SimpleNamespace(size=4)
  runtime.check_batch_sizes(config, four_devices)  # 8 and 8
  config.eval_batch_size = 6
  with pytest.raises(ConfigError, match="config.eval_batch_size=6 must be a multiple of the 4 devices"):
    runtime.check_batch_sizes(config, four_devices)


def test_a_compilation_is_announced_once_per_image_size(caplog):
  import logging
  import numpy as np
  log = runtime.CompilationLog("detection step")
  collector_on = []
  with caplog.at_level(logging.INFO, logger="libra_jax.runtime"):
    for height, width in ((64, 96), (64, 96), (96, 64), (64, 96)):
      with log.around(np.zeros((2, height, width, 3))):
        collector_on.append(gc.isenabled())
  lines = [record.getMessage() for record in caplog.records]
  assert [line.split(" images")[0] for line in lines] == [
      "compiling the detection step for 64x96", "compiled the detection step for 64x96",
      "compiling the detection step for 96x64", "compiled the detection step for 96x64"]
  assert lines[1].endswith(" s") and "or reading it from the compilation cache" in lines[0]
  # The cyclic garbage collector is paused for the calls that compile, and only for them.
  assert collector_on == [False, True, False, True] and gc.isenabled()


def test_the_collector_pause_collects_the_young_generation_before_it_returns():
  generations = []  # of each collection started
  callback = lambda phase, info: generations.append(info["generation"]) if phase == "start" else None
  threshold = gc.get_threshold()
  gc.set_threshold(10**9)  # no collection starts by itself, so any is the pause's own
  gc.callbacks.append(callback)
  try:
    with runtime.cyclic_gc_paused():
      kept = [[] for _ in range(20_000)]
    collected = list(generations)
  finally:
    gc.callbacks.remove(callback)
    gc.set_threshold(*threshold)
  assert collected == [0] and len(kept) == 20_000


def test_the_collector_pause_restores_the_state_it_found():
  with pytest.raises(KeyError):
    with runtime.cyclic_gc_paused():
      assert not gc.isenabled()
      raise KeyError("a failed compilation")
  assert gc.isenabled()
  gc.disable()
  try:
    with runtime.cyclic_gc_paused():
      pass
    assert not gc.isenabled()
  finally:
    gc.enable()

"""Small data configs shared by the data-pipeline tests (``from data_support import ...``)."""

from libra_jax.data import default_data_config

# Test geometry: an 80 x 60 image resizes by min(128 / 80, 80 / 60) = 4/3 to 107 x 80 (w x h), into a
# 96 x 128 (H x W) landscape bucket; a 60 x 80 one to 80 x 107 into the 128 x 96 portrait bucket.
TEST_SCALE = (128, 80)
TEST_BUCKETS = ((96, 128), (128, 96))
TEST_MAX_INSTANCES = 4


def small_config(dataset: str, **overrides):
  """``config.data`` for the tiny test images."""
  config = default_data_config(dataset)
  config.scale = TEST_SCALE
  config.buckets = TEST_BUCKETS
  config.max_instances = TEST_MAX_INSTANCES
  config.update(overrides)
  return config


def as_hosts(count: int, make):
  """Runs ``make(host, all_hosts)`` for ``count`` hosts at once, in threads; returns their results in host order.

  ``all_hosts`` is the collective the pipeline takes: each host's array -> the
  stack of all of them, exchanged between the threads.
  """
  import concurrent.futures
  import threading

  import numpy as np

  barrier, slots = threading.Barrier(count), [None] * count

  def host(index):
    def all_hosts(values):
      slots[index] = np.asarray(values)
      barrier.wait()
      stacked = np.stack(slots)
      barrier.wait()
      return stacked
    return make(index, all_hosts)

  with concurrent.futures.ThreadPoolExecutor(count) as pool:
    return list(pool.map(host, range(count)))

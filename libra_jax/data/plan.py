"""Batch plans: which examples, flipped or not, make each batch — from metadata alone, before any decoding.

Training: ``TrainPlan.batches(start)`` gives batch ``k`` as a pure function
of the seed and ``k``, so a run resumed at batch ``k`` yields exactly what the
uninterrupted one would, and skipping costs no image reads. Evaluation:
``eval_plan`` puts every image of a host in exactly one of its batches.
"""

import dataclasses
from typing import Dict, Iterator, List, Sequence, Tuple

import numpy as np

from libra_jax.errors import DataError

# Step k's bucket comes from the fractional part of (offset + k * GOLDEN): a
# low-discrepancy sequence, so every bucket's share of the first k steps stays
# within a few steps of fraction * k.
GOLDEN = (np.sqrt(5.0) - 1.0) / 2.0
_CHUNK = 1 << 20


@dataclasses.dataclass(frozen=True)
class PlannedBatch:
  """One batch: ``rows`` ``[B]`` int64 into the metadata table, ``flips`` ``[B]`` bool, ``valid`` ``[B]`` bool."""
  rows: np.ndarray
  flips: np.ndarray
  valid: np.ndarray
  bucket: int


class TrainPlan:
  """One host's endless training batches.

  Every host follows the same sequence of buckets (from ``fractions``, which
  all hosts compute alike), so at each step all hosts fill batches of the same
  shape. Within a bucket the host takes its own examples in passes: pass ``j``
  of bucket ``b`` is a permutation, with flips, drawn from ``(seed,
  shard_index, b, j)``. With fractions that match the data, all buckets finish
  a pass after about one epoch of steps, each example seen once per pass.

  Args:
    rows_by_bucket: per bucket, ``[n_b]`` int64 rows of this host's examples.
    fractions: ``[num_buckets]`` share of the steps of each bucket.
    batch_size: examples per batch on this host.
    seed: the run's seed.
    shard_index: this host's index.
    flip_prob: probability that an example is mirrored.
  """

  def __init__(self, rows_by_bucket: Sequence[np.ndarray], fractions: Sequence[float], batch_size: int, seed: int,
               shard_index: int, flip_prob: float):
    fractions = np.asarray(fractions, np.float64)
    if fractions.sum() <= 0:
      raise DataError("no training images: every bucket's fraction is 0")
    for bucket, (rows, fraction) in enumerate(zip(rows_by_bucket, fractions)):
      if fraction > 0 and not len(rows):
        raise DataError(f"bucket {bucket} takes {fraction:.1%} of the steps but shard {shard_index} has no image in "
                        f"it; use fewer shards or more data")
    self.rows_by_bucket = [np.asarray(rows, np.int64) for rows in rows_by_bucket]
    self.fractions = fractions / fractions.sum()
    self.batch_size = batch_size
    self.seed = seed
    self.shard_index = shard_index
    self.flip_prob = flip_prob
    self._offset = np.random.default_rng(seed).random()
    self._passes: Dict[Tuple[int, int], Tuple[np.ndarray, np.ndarray]] = {}

  def buckets(self, steps: np.ndarray) -> np.ndarray:
    """Bucket of each step in ``steps`` (int64 array)."""
    phase = np.mod(self._offset + np.asarray(steps, np.float64) * GOLDEN, 1.0)
    return np.searchsorted(np.cumsum(self.fractions)[:-1], phase, side="right")

  def _counts_before(self, step: int) -> np.ndarray:
    """``[num_buckets]``: how many of steps ``0..step-1`` went to each bucket."""
    counts = np.zeros(len(self.fractions), np.int64)
    for first in range(0, step, _CHUNK):
      counts += np.bincount(self.buckets(np.arange(first, min(first + _CHUNK, step))), minlength=len(counts))
    return counts

  def _pass(self, bucket: int, index: int) -> Tuple[np.ndarray, np.ndarray]:
    """Rows in the order of pass ``index`` over ``bucket``, and their flips."""
    key = (bucket, index)
    if key not in self._passes:
      rng = np.random.default_rng([self.seed, self.shard_index, bucket, index])
      rows = self.rows_by_bucket[bucket]
      order = rng.permutation(len(rows))
      self._passes = {k: v for k, v in self._passes.items() if k[0] != bucket or k[1] >= index - 1}
      self._passes[key] = (rows[order], rng.random(len(rows)) < self.flip_prob)
    return self._passes[key]

  def batch(self, bucket: int, ordinal: int) -> PlannedBatch:
    """The ``ordinal``-th batch of ``bucket`` (counting from 0)."""
    size = len(self.rows_by_bucket[bucket])
    positions = ordinal * self.batch_size + np.arange(self.batch_size)
    rows, flips = np.empty(self.batch_size, np.int64), np.empty(self.batch_size, bool)
    for index in np.unique(positions // size):
      chosen = positions // size == index
      pass_rows, pass_flips = self._pass(bucket, int(index))
      rows[chosen], flips[chosen] = pass_rows[positions[chosen] % size], pass_flips[positions[chosen] % size]
    return PlannedBatch(rows=rows, flips=flips, valid=np.ones(self.batch_size, bool), bucket=bucket)

  def batches(self, start: int = 0) -> Iterator[PlannedBatch]:
    """Batches ``start, start + 1, ...`` without end."""
    counts = self._counts_before(start)
    for first in range(start, np.iinfo(np.int64).max, _CHUNK):
      for bucket in self.buckets(np.arange(first, first + _CHUNK)):
        yield self.batch(int(bucket), int(counts[bucket]))
        counts[bucket] += 1


def eval_batch_counts(rows_by_bucket: Sequence[np.ndarray], batch_size: int) -> np.ndarray:
  """``[num_buckets]`` int64: batches of ``batch_size`` that one host's rows of each bucket fill."""
  return np.array([-(-len(rows) // batch_size) for rows in rows_by_bucket], np.int64)


def eval_plan(rows_by_bucket: Sequence[np.ndarray], batch_size: int, batches_per_bucket: Sequence[int]
              ) -> List[PlannedBatch]:
  """Every row of one host in exactly one valid slot, in the batch count all hosts agreed on.

  Per bucket, the host's rows are taken in order in batches of ``batch_size``;
  ``batches_per_bucket[b]`` (the most any host needs: the maximum of the hosts'
  ``eval_batch_counts``) batches are made, slots past the host's rows holding
  row 0 with ``valid=False`` (nothing is decoded for them), so every host has
  the same number of batches with the same bucket at each position.
  """
  rows_by_bucket = [np.asarray(rows, np.int64) for rows in rows_by_bucket]
  needed = eval_batch_counts(rows_by_bucket, batch_size)
  if np.any(needed > np.asarray(batches_per_bucket)):
    raise ValueError(f"the agreed batches per bucket {list(batches_per_bucket)} do not hold this host's "
                     f"{list(needed)}")
  plan = []
  for bucket, (rows, count) in enumerate(zip(rows_by_bucket, batches_per_bucket)):
    for first in range(0, int(count) * batch_size, batch_size):
      mine = rows[first:first + batch_size]
      valid = np.arange(batch_size) < len(mine)
      plan.append(PlannedBatch(rows=np.concatenate([mine, np.zeros(batch_size - len(mine), np.int64)]),
                               flips=np.zeros(batch_size, bool), valid=valid, bucket=bucket))
  return plan

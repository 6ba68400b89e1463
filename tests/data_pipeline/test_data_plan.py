"""The batch plans (numpy): passes, bucket schedule, resume purity, sharded evaluation."""

import numpy as np
import pytest

from libra_jax.data.plan import TrainPlan, eval_batch_counts, eval_plan


def _plan(seed=0, shard_index=0, batch_size=4, flip_prob=0.5):
  rows_by_bucket = [np.arange(0, 30), np.arange(100, 110)]
  return TrainPlan(rows_by_bucket, [0.75, 0.25], batch_size, seed, shard_index, flip_prob)


def _take(iterator, count):
  return [next(iterator) for _ in range(count)]


def test_each_pass_over_a_bucket_takes_every_row_once():
  plan = _plan()
  batches = _take(plan.batches(), 40)
  # 30 landscape rows in batches of 4: rows 0..119 of the bucket's stream are passes 0..3 exactly.
  stream = np.concatenate([b.rows for b in batches if b.bucket == 0])[:120]
  for index in range(4):
    np.testing.assert_array_equal(np.sort(stream[30 * index:30 * (index + 1)]), np.arange(30))
  assert not np.array_equal(stream[:30], stream[30:60])  # reshuffled


def test_bucket_shares_follow_the_fractions():
  buckets = _plan().buckets(np.arange(10_000))
  # A low-discrepancy sequence: within a few steps of 7500 / 2500.
  assert abs(np.sum(buckets == 0) - 7500) <= 3


def test_starting_later_gives_the_same_batches():
  full = _take(_plan().batches(0), 60)
  for start in (1, 17, 59):
    resumed = _take(_plan().batches(start), 60 - start)
    for a, b in zip(full[start:], resumed):
      assert a.bucket == b.bucket
      np.testing.assert_array_equal(a.rows, b.rows)
      np.testing.assert_array_equal(a.flips, b.flips)


def test_a_far_start_is_computed_without_walking_the_stream():
  batch = next(_plan().batches(5_000_000))
  assert batch.rows.shape == (4,)


def test_seed_and_shard_change_the_order_and_flip_prob_bounds_flips():
  first = _take(_plan(seed=0).batches(), 10)
  assert any(not np.array_equal(a.rows, b.rows) for a, b in zip(first, _take(_plan(seed=1).batches(), 10)))
  assert any(not np.array_equal(a.rows, b.rows) for a, b in zip(first, _take(_plan(shard_index=1).batches(), 10)))
  assert not any(b.flips.any() for b in _take(_plan(flip_prob=0.0).batches(), 20))
  assert all(b.flips.all() for b in _take(_plan(flip_prob=1.0).batches(), 20))


def test_a_bucket_in_the_schedule_without_rows_is_an_error():
  with pytest.raises(ValueError, match="no image"):
    TrainPlan([np.arange(5), np.array([], np.int64)], [0.5, 0.5], 2, 0, 3, 0.5)


def test_eval_covers_every_row_once_over_hosts_with_equal_batch_counts():
  # Host 0 has rows 0..4 (landscape), host 1 rows 5, 6 (landscape) and 10 (portrait); batches of 2.
  hosts = [[np.arange(5), np.array([], np.int64)], [np.array([5, 6]), np.array([10])]]
  counts = np.stack([eval_batch_counts(rows, 2) for rows in hosts])
  np.testing.assert_array_equal(counts, [[3, 0], [1, 1]])
  plans = [eval_plan(rows, 2, counts.max(0)) for rows in hosts]
  assert [len(p) for p in plans] == [4, 4]
  assert [b.bucket for b in plans[0]] == [b.bucket for b in plans[1]] == [0, 0, 0, 1]
  valid = np.concatenate([b.rows[b.valid] for p in plans for b in p])
  np.testing.assert_array_equal(np.sort(valid), [0, 1, 2, 3, 4, 5, 6, 10])
  # Host 0's third landscape batch holds row 4 and a padding slot; its portrait batch is padding only.
  np.testing.assert_array_equal(plans[0][2].valid, [True, False])
  np.testing.assert_array_equal(plans[0][3].valid, [False, False])
  np.testing.assert_array_equal(plans[1][1].valid, [False, False])
  assert not any(b.flips.any() for p in plans for b in p)
  with pytest.raises(ValueError, match="agreed"):
    eval_plan(hosts[0], 2, [2, 0])

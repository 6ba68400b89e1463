"""Tests of libra_jax.ops.sample: exact counts, balance over many keys, degenerate cases.

Statistical checks use fixed seeds and bounds of several standard deviations
of the binomial / hypergeometric law the draw follows, so they fail only when
the sampler is biased, not by chance.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from libra_jax.ops import sample

NUM_KEYS = 400


def many_keys(n=NUM_KEYS, seed=0):
  return jax.random.split(jax.random.key(seed), n)


def binomial_bound(trials, p, sigmas=5.0):
  return sigmas * np.sqrt(trials * p * (1 - p)) + 1


@functools.partial(jax.jit, static_argnames=("floor_thr", "floor_fraction", "num_bins"))
def negatives_for_keys(keys, max_iou, is_negative, num, floor_thr=-1, floor_fraction=0.0, num_bins=3):
  draw = lambda k: sample.iou_balanced_negatives(k, max_iou, is_negative, num, floor_thr,
                                                 floor_fraction, num_bins)
  return jax.vmap(draw)(keys)


def test_choose_random_counts_and_uniformity():
  candidates = np.zeros(50, bool)
  candidates[5:45] = True
  chosen = np.asarray(jax.vmap(lambda k: sample.choose_random(k, candidates, 10))(many_keys()))
  assert np.all(chosen.sum(1) == 10) and not chosen[:, ~candidates].any()
  frequency = chosen[:, candidates].sum(0)
  expected = NUM_KEYS * 10 / 40
  assert np.all(np.abs(frequency - expected) < binomial_bound(NUM_KEYS, 10 / 40))
  few = sample.choose_random(jax.random.key(1), candidates, 100)
  np.testing.assert_array_equal(few, candidates)
  assert not np.asarray(sample.choose_random(jax.random.key(1), candidates, 0)).any()


@pytest.mark.parametrize("num,k", [(1, 1), (7, 0), (7, -3), (50, 10), (50, 60), (268569, 256), (268569, 200000)])
def test_choose_random_without_a_sort_equals_ranking_in_one_group(num, k):
  # Two independent ways to the first k candidates in (random key, index) order: bisection, and the sort that
  # ranks a single group. At 268,569 candidates many 23-bit keys repeat, so the cut falls among equal keys.
  for seed in range(3):
    candidates = np.asarray(jax.random.uniform(jax.random.key(100 + seed), (num,)) < 0.6)
    key = jax.random.key(seed)
    chosen = np.asarray(jax.jit(sample.choose_random)(key, candidates, k))
    ranked = np.asarray(sample.choose_per_group(key, np.zeros(num, np.int32), candidates, k))
    np.testing.assert_array_equal(chosen, ranked)
    assert chosen.sum() == min(max(k, 0), candidates.sum()) and not chosen[~candidates].any()
  if num > 2**12:
    # A cut among equal keys: the candidates are those with keys up to a repeated key, and k takes all keys
    # below it and one of its copies, which must be the first by index.
    keys = np.asarray(sample._random_keys(key, num))
    values, counts = np.unique(keys, return_counts=True)
    repeated = values[counts > 1][0]
    candidates = keys <= repeated
    k = int((keys < repeated).sum()) + 1
    chosen = np.asarray(jax.jit(sample.choose_random)(key, candidates, k))
    copies = np.flatnonzero(keys == repeated)
    assert chosen.sum() == k and chosen[copies[0]] and not chosen[copies[1:]].any()


def test_choose_per_group_takes_quota_or_all():
  groups = np.repeat([3, 7, 9], [20, 4, 10])
  candidates = np.ones(34, bool)
  candidates[-10:] = False  # group 9 has no candidates
  chosen = np.asarray(sample.choose_per_group(jax.random.key(0), groups, candidates, 6))
  assert chosen[groups == 3].sum() == 6 and chosen[groups == 7].sum() == 4
  assert not chosen[groups == 9].any()


@pytest.mark.parametrize("num_pos,num_neg,expected_pos,expected_neg", [
    (200, 1000, 128, 128),  # plenty of both: half and half
    (30, 1000, 30, 226),    # few positives: negatives fill up to 256
    (30, 100, 30, 100),     # few of both: everything
    (0, 1000, 0, 256),      # no positives
])
def test_random_sampler_counts(num_pos, num_neg, expected_pos, expected_neg):
  gt_inds = np.concatenate([np.ones(num_pos), np.zeros(num_neg), -np.ones(50)]).astype(np.int32)
  positives, negatives = sample.random_positives_negatives(jax.random.key(0), gt_inds, 256, 0.5)
  assert int(positives.sum()) == expected_pos and int(negatives.sum()) == expected_neg
  assert np.all(gt_inds[np.asarray(positives)] > 0) and np.all(gt_inds[np.asarray(negatives)] == 0)


def test_random_sampler_negative_upper_bound_and_validity():
  # The Libra RPN: neg_pos_ub = 5 caps negatives at 5 * max(1, #pos).
  gt_inds = np.concatenate([np.ones(10), np.zeros(1000)]).astype(np.int32)
  positives, negatives = sample.random_positives_negatives(jax.random.key(0), gt_inds, 256, 0.5, 5)
  assert int(positives.sum()) == 10 and int(negatives.sum()) == 50
  no_pos = np.zeros(1000, np.int32)
  _, negatives = sample.random_positives_negatives(jax.random.key(0), no_pos, 256, 0.5, 5)
  assert int(negatives.sum()) == 5
  valid = np.arange(1010) < 505  # padding / anchors off the image
  positives, negatives = sample.random_positives_negatives(jax.random.key(0), gt_inds, 256, 0.5,
                                                           valid=valid)
  assert not np.asarray(positives | negatives)[~valid].any()
  assert int(positives.sum()) == 10 and int(negatives.sum()) == 246


def bin_case(sizes, rng, zeros=0, top=1.0):
  """Negatives with ``sizes[k]`` IoUs inside bin k of [0, top) / 3, plus exact zeros.

  One extra candidate (a gt added as proposal) has IoU ``top`` and is not negative.
  """
  edges = np.linspace(0, top, 4)
  parts = [np.zeros(zeros)] + [rng.uniform(edges[k] + 1e-3, edges[k + 1] - 1e-3, n)
                               for k, n in enumerate(sizes)] + [[top]]
  max_iou = np.concatenate(parts).astype(np.float32)
  is_negative = np.ones(len(max_iou), bool)
  is_negative[-1] = False
  return max_iou, is_negative, edges


def per_bin(chosen, max_iou, edges):
  return [int(((max_iou >= edges[k]) & (max_iou < edges[k + 1]) & chosen).sum()) for k in range(3)]


def test_iou_balanced_exact_bin_counts():
  rng = np.random.default_rng(0)
  # Bin 0 holds 500, bin 1 holds 50, bin 2 none; 300 wanted, quota 100 per bin:
  # bin 1 gives all 50, bin 0 its 100, and the 150 shortfall comes from bin 0.
  max_iou, is_negative, edges = bin_case([500, 50, 0], rng)
  chosen = np.asarray(negatives_for_keys(many_keys(50), max_iou, is_negative, 300))
  for row in chosen:
    assert per_bin(row, max_iou, edges) == [250, 50, 0]
    assert not row[~is_negative].any()


def test_iou_balanced_takes_the_quota_from_every_full_bin():
  rng = np.random.default_rng(1)
  max_iou, is_negative, edges = bin_case([400, 300, 200], rng)
  chosen = np.asarray(negatives_for_keys(many_keys(50), max_iou, is_negative, 301))
  # Quota int(301 / 3) = 100 each, the one left over drawn from any bin.
  for row in chosen:
    counts = per_bin(row, max_iou, edges)
    assert sum(counts) == 301 and all(100 <= c <= 101 for c in counts)


def test_iou_balanced_is_uniform_inside_a_bin():
  rng = np.random.default_rng(2)
  max_iou, is_negative, _ = bin_case([200, 30, 0], rng)
  chosen = np.asarray(negatives_for_keys(many_keys(), max_iou, is_negative, 150))
  # 150 wanted: 30 from bin 1, 120 of the 200 in bin 0, each with probability 0.6.
  frequency = chosen[:, :200].sum(0)
  assert np.all(np.abs(frequency - NUM_KEYS * 0.6) < binomial_bound(NUM_KEYS, 0.6))
  assert np.all(chosen[:, 200:230])


def test_bins_span_the_max_iou_over_all_candidates():
  rng = np.random.default_rng(3)
  # Negatives only below 0.3 but bins computed up to the gt's IoU 0.9: bins are
  # [0, 0.3), [0.3, 0.6), [0.6, 0.9), so every negative lies in bin 0.
  max_iou, is_negative, edges = bin_case([300, 0, 0], rng, top=0.9)
  chosen = np.asarray(negatives_for_keys(many_keys(5), max_iou, is_negative, 90))
  assert all(per_bin(row, max_iou, edges) == [90, 0, 0] for row in chosen)


def test_floor_threshold_zero_versus_minus_one():
  rng = np.random.default_rng(4)
  max_iou, is_negative, _ = bin_case([200, 0, 0], rng, zeros=100)
  zero = max_iou == 0
  # floor_thr = 0: the 200 IoU > 0 negatives are all taken first (200 <= 250), 50 zeros fill.
  floor0 = np.asarray(negatives_for_keys(many_keys(), max_iou, is_negative, 250, floor_thr=0))
  assert np.all(floor0[:, ~zero & is_negative]) and np.all(floor0[:, zero].sum(1) == 50)
  # floor_thr = -1: zeros are binned with the rest, each negative chosen with probability 250/300.
  floor_m1 = np.asarray(negatives_for_keys(many_keys(), max_iou, is_negative, 250, floor_thr=-1))
  assert np.all(floor_m1.sum(1) == 250)
  zeros_chosen = floor_m1[:, zero].sum()
  expected = NUM_KEYS * 100 * 250 / 300
  assert abs(zeros_chosen - expected) < binomial_bound(NUM_KEYS * 100, 250 / 300)


def test_positive_floor_threshold_and_floor_fraction():
  rng = np.random.default_rng(5)
  low = rng.uniform(0, 0.1, 300)
  high = rng.uniform(0.1, 0.5, 300)
  max_iou = np.concatenate([low, high, [1.0]]).astype(np.float32)
  is_negative = max_iou < 0.5
  chosen = np.asarray(negatives_for_keys(many_keys(20), max_iou, is_negative, 100, floor_thr=0.1,
                                         floor_fraction=0.5))
  # Half from IoU >= 0.1, the other half from the floor set [0, 0.1).
  assert np.all(chosen[:, :300].sum(1) == 50) and np.all(chosen[:, 300:600].sum(1) == 50)


def test_single_bin_is_uniform_sampling():
  rng = np.random.default_rng(6)
  max_iou, is_negative, _ = bin_case([100, 100, 100], rng)
  chosen = np.asarray(negatives_for_keys(many_keys(), max_iou, is_negative, 60, num_bins=1))
  assert np.all(chosen.sum(1) == 60)
  frequency = chosen[:, :300].sum(0)
  assert np.all(np.abs(frequency - NUM_KEYS * 0.2) < binomial_bound(NUM_KEYS, 0.2))


@pytest.mark.parametrize("num", [0, 10, 250, 600, 1000])
def test_iou_balanced_chooses_exactly_min_num_available(num):
  rng = np.random.default_rng(7)
  max_iou = rng.uniform(0, 1, 800).astype(np.float32)
  is_negative = (max_iou < 0.5) & (np.arange(800) < 700)  # the last 100 are padding
  chosen = np.asarray(negatives_for_keys(many_keys(10), max_iou, is_negative, num, floor_thr=0))
  assert np.all(chosen.sum(1) == min(num, is_negative.sum()))
  assert not chosen[:, ~is_negative].any()


def test_iou_balanced_without_gts_does_not_divide_by_zero():
  # No gt: every IoU is 0, the bins are empty, the draw falls back to uniform fill.
  chosen = sample.iou_balanced_negatives(jax.random.key(0), np.zeros(100, np.float32),
                                         np.ones(100, bool), 30)
  assert int(chosen.sum()) == 30


def test_iou_balanced_rejects_bad_floor():
  with pytest.raises(ValueError, match="floor_thr"):
    sample.iou_balanced_negatives(jax.random.key(0), np.zeros(4), np.ones(4, bool), 2, floor_thr=-0.5)


def instance_case(sizes, padding=20):
  gt_inds = np.concatenate([np.full(n, k + 1) for k, n in enumerate(sizes)] + [np.zeros(300),
                                                                              -np.ones(padding)])
  return gt_inds.astype(np.int32)


def positives_for_keys(keys, gt_inds, num):
  return np.asarray(jax.jit(jax.vmap(lambda k: sample.instance_balanced_positives(k, gt_inds, num)))(keys))


def test_instance_balanced_quota_and_fill():
  # 4 instances of 100, 100, 5, 5 positives, 64 wanted: quota round(64 / 4) + 1 = 17,
  # giving 17 + 17 + 5 + 5 = 44, and 20 more from the two large instances.
  gt_inds = instance_case([100, 100, 5, 5])
  chosen = positives_for_keys(many_keys(), gt_inds, 64)
  counts = np.stack([chosen[:, gt_inds == k].sum(1) for k in range(1, 5)], axis=1)
  assert np.all(counts.sum(1) == 64) and np.all(counts[:, 2:] == 5)
  assert np.all(counts[:, :2] >= 17)
  # The 20 extra are drawn uniformly from 166 left: each large instance gets 20 * 83 / 166 = 10 on average.
  hypergeom_sd = np.sqrt(20 * 0.5 * 0.5 * (166 - 20) / (166 - 1))
  assert abs(counts[:, 0].mean() - 27) < 5 * hypergeom_sd / np.sqrt(NUM_KEYS)


def test_instance_balanced_cuts_an_excess():
  # 3 instances of 100, 128 wanted: quota round(42.67) + 1 = 44, 132 drawn, 4 cut at random.
  gt_inds = instance_case([100, 100, 100])
  chosen = positives_for_keys(many_keys(50), gt_inds, 128)
  counts = np.stack([chosen[:, gt_inds == k].sum(1) for k in range(1, 4)], axis=1)
  assert np.all(counts.sum(1) == 128) and np.all((counts >= 40) & (counts <= 44))


def test_instance_balanced_is_balanced_against_a_dominant_instance():
  # One instance with 1000 positives and ten with 10: random sampling would give the big
  # one ~ 128 * 1000 / 1100 = 116. Instance balancing: quota round(128 / 11) + 1 = 13,
  # so 13 + 10 * 10 = 113, and the 15 missing come from the big one: 28.
  gt_inds = instance_case([1000] + [10] * 10)
  chosen = positives_for_keys(many_keys(20), gt_inds, 128)
  for k in range(2, 12):
    assert np.all(chosen[:, gt_inds == k].sum(1) == 10)
  assert np.all(chosen[:, gt_inds == 1].sum(1) == 28)


@pytest.mark.parametrize("sizes,num", [([], 128), ([3, 4], 128), ([50] * 6, 128), ([500], 10)])
def test_instance_balanced_exact_counts_and_never_padding(sizes, num):
  gt_inds = instance_case(sizes)
  chosen = positives_for_keys(many_keys(10), gt_inds, num)
  assert np.all(chosen.sum(1) == min(num, sum(sizes)))
  assert not chosen[:, gt_inds <= 0].any()


def test_balanced_sampler_splits_num_between_positives_and_negatives():
  rng = np.random.default_rng(8)
  gt_inds = np.concatenate([np.repeat(np.arange(1, 6), 40), np.zeros(1500), -np.ones(100)]).astype(np.int32)
  max_iou = np.where(gt_inds > 0, 0.7, rng.uniform(0, 0.5, len(gt_inds))).astype(np.float32)
  valid = np.arange(len(gt_inds)) < len(gt_inds) - 50
  draw = jax.jit(lambda k: sample.balanced_positives_negatives(k, gt_inds, max_iou, 512, 0.25, floor_thr=0,
                                                               valid=valid))
  positives, negatives = draw(jax.random.key(0))
  assert int(positives.sum()) == 128 and int(negatives.sum()) == 384
  assert not np.asarray(positives | negatives)[~valid].any()
  few = np.where(gt_inds > 3, 0, gt_inds)  # 120 positives left
  positives, negatives = sample.balanced_positives_negatives(jax.random.key(0), few, max_iou, 512, 0.25)
  assert int(positives.sum()) == 120 and int(negatives.sum()) == 392


def test_samplers_compile_once_and_vmap_over_a_batch():
  rng = np.random.default_rng(9)
  draw = jax.jit(jax.vmap(lambda k, g, m: sample.balanced_positives_negatives(k, g, m, 64, 0.25)))
  for seed in range(3):
    gt_inds = rng.integers(-1, 4, (2, 300)).astype(np.int32)
    max_iou = rng.uniform(0, 1, (2, 300)).astype(np.float32)
    keys = jax.random.split(jax.random.key(seed), 2)
    positives, negatives = draw(keys, gt_inds, max_iou)
    for b in range(2):
      single_pos, single_neg = sample.balanced_positives_negatives(keys[b], gt_inds[b], max_iou[b], 64, 0.25)
      np.testing.assert_array_equal(positives[b], single_pos)
      np.testing.assert_array_equal(negatives[b], single_neg)
  assert draw._cache_size() == 1


def test_samplers_are_chosen_by_name_and_an_unknown_name_lists_the_known_ones():
  assert sample.SAMPLERS.get("random") is sample.random_positives_negatives
  assert sample.SAMPLERS.get("libra") is sample.balanced_positives_negatives
  with pytest.raises(KeyError, match="unknown sampler 'balanced'; known: libra, random"):
    sample.SAMPLERS.get("balanced")
  with pytest.raises(ValueError, match="'random' is already registered"):
    sample.SAMPLERS.register("random")(sample.random_positives_negatives)


def test_a_registered_sampler_is_used_by_the_rcnn_stage():
  from libra_jax.models import roi_head

  @sample.SAMPLERS.register("test_negatives_only")
  def negatives_only(key, gt_inds, num, pos_fraction, valid=None, max_iou=None):
    del key, num, pos_fraction, max_iou
    return jnp.zeros(gt_inds.shape, bool), (gt_inds == 0) & valid

  try:
    gt = jnp.array([[0, 0, 20, 20], [40, 40, 60, 60]], jnp.float32)
    proposals = jnp.array([[0, 0, 20, 16], [100, 100, 110, 110], [41, 41, 60, 60]], jnp.float32)
    cfg = dict(assigner=dict(pos_iou_thr=0.5, neg_iou_thr=0.5, min_pos_iou=0.5, match_low_quality=False),
               target_stds=(0.1, 0.1, 0.2, 0.2), sampler=dict(type="test_negatives_only", num=8, pos_fraction=0.25))
    sampled = roi_head.sample_rois(jax.random.key(0), proposals, jnp.ones(3, bool), gt, jnp.array([2, 0]),
                                   jnp.ones(2, bool), gt, jnp.zeros(2, bool), num_classes=3, cfg=cfg)
    # 4 of the 5 candidates are positives (both gts, IoU 0.8 and 0.9); the sampler keeps only the negative.
    assert not sampled.is_positive.any() and int(sampled.valid.sum()) == 1
    np.testing.assert_array_equal(sampled.rois[0], [100, 100, 110, 110])
    assert int(sampled.labels[0]) == 3
  finally:
    sample.SAMPLERS.pop("test_negatives_only")

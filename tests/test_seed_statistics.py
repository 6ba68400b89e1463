"""Mean, spread and paired t intervals over seeds, against values worked out by hand and Student's t table."""

import math

import pytest

from libra_jax import seed_statistics


def test_mean_std_uses_the_sample_deviation():
  assert seed_statistics.mean_std([1.0, 2.0, 3.0]) == pytest.approx((2.0, 1.0))
  mean, std = seed_statistics.mean_std([0.4])
  assert mean == 0.4 and math.isnan(std)


def test_intervals_follow_students_t_table():
  # t(0.975, 1) = 12.706: values 1 and 3 have mean 2 and sd sqrt(2), so the half-width is 12.706.
  interval = seed_statistics.mean_interval([1.0, 3.0])
  assert interval.mean == 2.0 and interval.low == pytest.approx(2 - 12.706, abs=1e-3)
  assert interval.high == pytest.approx(2 + 12.706, abs=1e-3) and not interval.excludes_zero()
  # t(0.975, 4) = 2.776; values 1..5: sd sqrt(2.5), half-width 2.776 * 1.5811 / sqrt(5) = 1.963.
  interval = seed_statistics.mean_interval([1.0, 2.0, 3.0, 4.0, 5.0])
  assert (interval.low, interval.high) == pytest.approx((3 - 1.963, 3 + 1.963), abs=1e-3)
  assert interval.excludes_zero()
  # t(0.95, 2) = 2.920 at 90% confidence.
  assert seed_statistics.mean_interval([0.0, 1.0, 2.0], confidence=0.9).high == pytest.approx(1 + 2.920 / 3 ** 0.5,
                                                                                             abs=1e-3)


def test_paired_differences_are_taken_seed_by_seed():
  # The seeds move both rows together: the rows' own spreads are large, their paired differences are not.
  interval = seed_statistics.paired_difference([0.31, 0.52, 0.43], [0.29, 0.50, 0.40])
  assert interval.mean == pytest.approx(0.07 / 3) and interval.excludes_zero()  # differences 0.02, 0.02, 0.03
  with pytest.raises(ValueError, match="the same seeds"):
    seed_statistics.paired_difference([0.1, 0.2], [0.1])
  single = seed_statistics.paired_difference([0.5], [0.25])
  assert single.mean == 0.25 and math.isnan(single.low) and not single.excludes_zero()

"""A metric measured over several seeds: its mean and spread, and paired differences with a t interval.

Rows of an ablation share each seed (initialization, data order, sampling),
so the difference of two rows is taken seed by seed, and the interval is that
of the mean of those paired differences: ``mean +- t(1 - (1 - c) / 2, K - 1)
* sd / sqrt(K)`` for ``K`` seeds (Student's t, as for any small sample of
roughly normal differences). With one seed there is no spread: the standard
deviation and the interval bounds are NaN.
"""

import math
from typing import NamedTuple, Sequence, Tuple

import numpy as np
from scipy import stats


class Interval(NamedTuple):
  """A mean with the bounds of its confidence interval (NaN bounds when there is one value)."""
  mean: float
  low: float
  high: float

  def excludes_zero(self) -> bool:
    """Whether the whole interval lies on one side of 0 (the difference is larger than the noise)."""
    return bool(self.low > 0 or self.high < 0)


def mean_std(values: Sequence[float]) -> Tuple[float, float]:
  """Mean and sample standard deviation (``ddof=1``; NaN for a single value)."""
  values = np.asarray(values, np.float64)
  return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else math.nan


def mean_interval(values: Sequence[float], confidence: float = 0.95) -> Interval:
  """The mean of ``values`` and its two-sided Student-t interval at ``confidence``."""
  mean, std = mean_std(values)
  if len(values) < 2:
    return Interval(mean, math.nan, math.nan)
  half = stats.t.ppf(0.5 + confidence / 2, len(values) - 1) * std / math.sqrt(len(values))
  return Interval(mean, mean - half, mean + half)


def paired_difference(values: Sequence[float], reference: Sequence[float], confidence: float = 0.95) -> Interval:
  """The mean of ``values[k] - reference[k]`` over seeds ``k``, with its t interval at ``confidence``."""
  if len(values) != len(reference):
    raise ValueError(f"paired values need the same seeds: {len(values)} values against {len(reference)}")
  return mean_interval(np.asarray(values, np.float64) - np.asarray(reference, np.float64), confidence)

"""benchmarks/bench_roi_align.py: a small case runs, counts its RoIs, and leaves the library's loop setting alone."""

from benchmarks import bench_roi_align
from libra_jax.ops import adaptive_roi_align


def test_small_adaptive_case_with_several_pairs_per_step():
  before = adaptive_roi_align.PAIRS_PER_STEP
  result = bench_roi_align.bench_roi_align(num_rois=12, channels=4, output_size=2, sampling_ratio=0,
                                           image_size=(64, 96), iterations=1, pairs_per_step=3)
  assert adaptive_roi_align.PAIRS_PER_STEP == before
  assert sum(result[f"rois_level_{level}"] for level in range(4)) == 12
  assert result["ms_per_call"] > 0 and result["ms_per_call_grad"] > 0 and result["compile_s"] > 0

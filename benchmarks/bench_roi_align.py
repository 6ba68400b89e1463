"""Timing of jitted multilevel RoIAlign on an FPN pyramid (P2..P5).

Usage: ``python benchmarks/bench_roi_align.py``. The case is one 800 x 1216
image with 256-channel P2..P5 maps (strides 4..32) and 512 RoIs pooled to
7 x 7, as in the Faster R-CNN box head, with 2 x 2 samples per bin and with
mmcv's adaptive grid (``sampling_ratio=0``), the latter with 1, 4 and 16
pixel pairs per step of its pooling loops
(``adaptive_roi_align.PAIRS_PER_STEP``: 1 is the library's choice; the
others show what a step of the loop costs on an accelerator); one JSON line
per setting.
"""

import json
import time
from typing import Dict, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from libra_jax.ops import adaptive_roi_align
from libra_jax.ops.roi_align import map_roi_levels, multilevel_roi_align


def random_rois(rng: np.random.Generator, num_rois: int, image_h: int, image_w: int,
                min_scale: float = 16.0, max_scale: float = 640.0) -> np.ndarray:
  """``[num_rois, 4]`` float32 xyxy boxes clipped to the image.

  Scales (sqrt of area, pixels) are log-uniform in ``[min_scale, max_scale]``
  and aspect ratios log-uniform in [1/2, 2], so all FPN levels get RoIs.
  """
  scale = np.exp(rng.uniform(np.log(min_scale), np.log(max_scale), num_rois))
  aspect = np.exp(rng.uniform(np.log(0.5), np.log(2.0), num_rois))
  half_size = 0.5 * scale[:, None] * np.stack([np.sqrt(aspect), 1.0 / np.sqrt(aspect)], axis=1)
  centre = rng.uniform([0.0, 0.0], [image_w, image_h], (num_rois, 2))
  rois = np.concatenate([centre - half_size, centre + half_size], axis=1)
  return np.clip(rois, 0.0, [image_w, image_h, image_w, image_h]).astype(np.float32)


def _time_ms(fn, args, iterations: int) -> float:
  """Median wall time of ``fn(*args)`` in milliseconds, after one warm-up call."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(iterations):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return float(np.median(times)) * 1e3


def bench_roi_align(num_rois: int = 512, channels: int = 256, output_size: int = 7,
                    sampling_ratio: int = 2, image_size: Sequence[int] = (800, 1216),
                    strides: Sequence[int] = (4, 8, 16, 32), iterations: int = 10,
                    seed: int = 0, pairs_per_step: int = 1) -> Dict[str, float]:
  """Times jitted ``multilevel_roi_align``, forward and forward + backward.

  Args:
    num_rois: RoIs per call.
    channels: feature channels of every level.
    output_size: bins per side.
    sampling_ratio: samples per bin along each axis; 0 for the adaptive grid.
    image_size: ``(H, W)`` of the image in pixels; level ``l`` is
      ``ceil(H / stride_l) x ceil(W / stride_l)``.
    strides: image pixels per map pixel of each level.
    iterations: timed calls after one warm-up call.
    seed: seed of the random features and RoIs.
    pairs_per_step: ``adaptive_roi_align.PAIRS_PER_STEP`` while compiling
      (the adaptive grid's loops; restored afterwards).

  Returns:
    ``compile_s`` (seconds to lower and compile the forward pass),
    ``ms_per_call`` (forward) and ``ms_per_call_grad`` (forward and backward
    w.r.t. the features), both medians over ``iterations`` calls, and
    ``rois_level_{l}`` (RoIs per level).
  """
  rng = np.random.default_rng(seed)
  image_h, image_w = image_size
  features = [
      jnp.asarray(rng.standard_normal(
          (-(-image_h // stride), -(-image_w // stride), channels), dtype=np.float32))
      for stride in strides
  ]
  rois = jnp.asarray(random_rois(rng, num_rois, image_h, image_w))
  cotangent = jnp.asarray(rng.standard_normal(
      (num_rois, output_size, output_size, channels), dtype=np.float32))

  def forward(feats, boxes):
    return multilevel_roi_align(feats, boxes, output_size, tuple(strides),
                                sampling_ratio=sampling_ratio)

  def backward(feats, boxes):
    return jax.grad(lambda f: jnp.sum(forward(f, boxes) * cotangent))(feats)

  library_choice = adaptive_roi_align.PAIRS_PER_STEP
  adaptive_roi_align.PAIRS_PER_STEP = pairs_per_step
  try:
    start = time.perf_counter()
    forward_compiled = jax.jit(forward).lower(features, rois).compile()
    compile_s = time.perf_counter() - start
    backward_compiled = jax.jit(backward).lower(features, rois).compile()
  finally:
    adaptive_roi_align.PAIRS_PER_STEP = library_choice

  result = {
      "compile_s": compile_s,
      "ms_per_call": _time_ms(forward_compiled, (features, rois), iterations),
      "ms_per_call_grad": _time_ms(backward_compiled, (features, rois), iterations),
  }
  counts = np.bincount(np.asarray(map_roi_levels(rois, len(strides))), minlength=len(strides))
  result.update({f"rois_level_{level}": int(count) for level, count in enumerate(counts)})
  return result


if __name__ == "__main__":
  print(json.dumps(dict(device=jax.devices()[0].device_kind, sampling_ratio=2, **bench_roi_align(sampling_ratio=2))),
        flush=True)
  for pairs in (1, 4, 16):
    print(json.dumps(dict(device=jax.devices()[0].device_kind, sampling_ratio=0, pairs_per_step=pairs,
                          **bench_roi_align(sampling_ratio=0, pairs_per_step=pairs))), flush=True)

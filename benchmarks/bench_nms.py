"""Wall-clock timing of the jitted exact NMS on realistic, clustered boxes.

Run ``python benchmarks/bench_nms.py``; it prints the dict ``bench_nms``
returns.
"""

import time

import jax
import jax.numpy as jnp
import numpy as np

from libra_jax.ops.nms import nms


def clustered_boxes(num_boxes: int, num_centers: int = 200, image_size: float = 800.0,
                    seed: int = 0):
  """Detector-like boxes: many jittered copies around a few object centres.

  Args:
    num_boxes: number of boxes N.
    num_centers: number of object centres the boxes gather around.
    image_size: side of the square image, pixels.
    seed: numpy random seed.

  Returns:
    ``(boxes, scores)``: ``[N, 4]`` float32 xyxy pixels (centres jittered by
    8 px, sides 20 to 120 px) and ``[N]`` float32 scores uniform in [0, 1).
  """
  rng = np.random.default_rng(seed)
  centers = rng.uniform(0.0, image_size, (num_centers, 2))
  box_centers = centers[rng.integers(0, num_centers, num_boxes)]
  box_centers = box_centers + rng.normal(0.0, 8.0, (num_boxes, 2))
  sizes = rng.uniform(20.0, 120.0, (num_boxes, 2))
  boxes = np.concatenate([box_centers - sizes / 2, box_centers + sizes / 2], axis=1)
  scores = rng.uniform(0.0, 1.0, num_boxes)
  return boxes.astype(np.float32), scores.astype(np.float32)


def bench_nms(num_boxes: int = 2000, repeats: int = 50, iou_threshold: float = 0.5,
              max_output: int = 1000) -> dict:
  """Times ``jit(nms)`` on ``num_boxes`` clustered boxes.

  Args:
    num_boxes: number of input boxes.
    repeats: timed calls after the compiling one.
    iou_threshold: NMS IoU threshold (passed traced).
    max_output: static output length.

  Returns:
    Dict with ``compile_s`` (seconds for the first call: trace, compile, run),
    ``ms_per_call`` (median milliseconds of the later calls), ``min_ms`` (the
    fastest call), ``num_kept`` and ``backend``.
  """
  boxes, scores = clustered_boxes(num_boxes)
  boxes, scores = jax.device_put(boxes), jax.device_put(scores)
  threshold = jnp.float32(iou_threshold)
  run = jax.jit(nms, static_argnames="max_output")

  start = time.perf_counter()
  _, count = jax.block_until_ready(run(boxes, scores, threshold, max_output=max_output))
  compile_s = time.perf_counter() - start

  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(run(boxes, scores, threshold, max_output=max_output))
    times.append(time.perf_counter() - start)
  return {
      "num_boxes": num_boxes,
      "compile_s": compile_s,
      "ms_per_call": 1e3 * float(np.median(times)),
      "min_ms": 1e3 * min(times),
      "num_kept": int(count),
      "backend": jax.default_backend(),
  }


if __name__ == "__main__":
  print(bench_nms())

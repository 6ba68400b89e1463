"""Cost of the IoU-balanced R-CNN sampler against the random one.

512 RoIs sampled from 2,000 candidates per image, batch 2, jit-compiled and
vmapped as in the training step. Run: ``python benchmarks/bench_samplers.py``.
"""

import json
import time

import jax
import numpy as np

from libra_jax.ops import sample


def _time(fn, args, repeats):
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  compile_s = time.perf_counter() - start
  start = time.perf_counter()
  for _ in range(repeats):
    jax.block_until_ready(fn(*args))
  return compile_s, (time.perf_counter() - start) / repeats * 1e3


def bench_samplers(num_candidates=2000, num=512, batch=2, repeats=50):
  """Returns ``{sampler: {"compile_s", "ms_per_call"}}`` for the random and Libra samplers."""
  rng = np.random.default_rng(0)
  max_iou = rng.beta(0.6, 4.0, (batch, num_candidates)).astype(np.float32)
  max_iou[:, :200] = rng.uniform(0.5, 1.0, (batch, 200))
  gt_inds = np.where(max_iou >= 0.5, rng.integers(1, 21, (batch, num_candidates)),
                     np.where(max_iou < 0.5, 0, -1)).astype(np.int32)
  keys = jax.random.split(jax.random.key(0), batch)
  samplers = {
      "random": jax.jit(jax.vmap(lambda k, g, m: sample.random_positives_negatives(k, g, num, 0.25))),
      "iou_balanced": jax.jit(jax.vmap(
          lambda k, g, m: sample.balanced_positives_negatives(k, g, m, num, 0.25, floor_thr=0))),
  }
  results = {}
  for name, fn in samplers.items():
    compile_s, ms = _time(fn, (keys, gt_inds, max_iou), repeats)
    results[name] = {"compile_s": round(compile_s, 3), "ms_per_call": round(ms, 4)}
  return results


if __name__ == "__main__":
  results = bench_samplers()
  for name, row in results.items():
    print(json.dumps({"sampler": name, "candidates": 2000, "num": 512, "batch": 2, **row}))
  print(f"IoU-balanced / random time: "
        f"{results['iou_balanced']['ms_per_call'] / results['random']['ms_per_call']:.2f}x")

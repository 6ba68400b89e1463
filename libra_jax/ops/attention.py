"""Softmax attention with its gradient written out: the non-local block's core.

``softmax_attention(queries, keys, values)`` is
``softmax(queries keys^T, over keys) values`` with no scaling, what mmcv's
embedded-Gaussian ``NonLocal2d`` computes over the ``N = H * W`` positions of
a map. It is the same function as the plain formula, computed in another
order, with a gradient (a custom VJP) that does less work than autodiff's:

* the forward pass keeps the unnormalized weights ``E = exp(S - max S)`` and
  their row sums ``l``, and divides the ``[N, C]`` product ``E values`` by
  ``l`` instead of the ``[N, M]`` weights before it;
* the backward pass uses ``sum_m dP P = sum_c dy y`` (the row sums of the
  weights' cotangent times the weights equal those of the output's cotangent
  times the output), so the logits' cotangent
  ``P * (dP - sum_m dP P) = E * (dy values^T / l - (sum_c dy y) / l)`` is one
  elementwise pass over ``[N, M]``.

Both passes do the six ``[N, M, C]`` matmuls that any exact method does (two
forward, four backward); what this saves is passes over ``[N, M]`` arrays in
between (at the balanced pyramid's P4 of an 800x1344 image, N = M = 4,200 and
C = 256: 70 MB each). There, on 2 cores (2026-12-05, one process each, median
of 9 calls), forward and backward took 216 and 235 ms against autodiff's 229
and 251 ms in two runs; the six matmuls alone take 188 ms (29-33 ms each, at
the machine's matmul rate), so little is left above them. Libra Faster R-CNN's
train step at 800x1344: -0.056 s (``benchmarks/paired_revision.py``, README).
"""

from typing import Optional

import jax
import jax.numpy as jnp


def _unnormalized_weights(queries, keys, key_mask):
  """``[B, N, M]`` float32 ``exp(S - max_m S)`` and ``[B, N, 1]`` row sums, ``S = queries keys^T``."""
  logits = jnp.einsum("bnc,bmc->bnm", queries, keys, preferred_element_type=jnp.float32)
  if key_mask is not None:
    logits = jnp.where(key_mask[:, None, :], logits, -jnp.inf)
  weights = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))
  return weights, jnp.sum(weights, axis=-1, keepdims=True)


def _forward(queries, keys, values, key_mask):
  weights, totals = _unnormalized_weights(queries, keys, key_mask)
  out = jnp.einsum("bnm,bmc->bnc", weights.astype(values.dtype), values, preferred_element_type=jnp.float32) / totals
  return out.astype(values.dtype), (queries, keys, values, weights, totals, out)


@jax.custom_vjp
def _attention(queries, keys, values, key_mask):
  return _forward(queries, keys, values, key_mask)[0]


def _backward(residuals, cotangent):
  queries, keys, values, weights, totals, out = residuals  # masked keys' weights are 0: no mask needed
  scaled = cotangent.astype(jnp.float32) / totals
  row_dot = jnp.sum(scaled * out, axis=-1, keepdims=True)
  d_values = jnp.einsum("bnm,bnc->bmc", weights, scaled)
  d_weights = jnp.einsum("bnc,bmc->bnm", scaled, values.astype(jnp.float32))
  d_logits = weights * (d_weights - row_dot)
  d_queries = jnp.einsum("bnm,bmc->bnc", d_logits, keys.astype(jnp.float32))
  d_keys = jnp.einsum("bnm,bnc->bmc", d_logits, queries.astype(jnp.float32))
  return (d_queries.astype(queries.dtype), d_keys.astype(keys.dtype), d_values.astype(values.dtype), None)


_attention.defvjp(_forward, _backward)


def softmax_attention(queries: jnp.ndarray, keys: jnp.ndarray, values: jnp.ndarray,
                      key_mask: Optional[jnp.ndarray] = None) -> jnp.ndarray:
  """``softmax(queries keys^T) values``, the softmax over the keys, unscaled.

  Args:
    queries: ``[B, N, C]``.
    keys: ``[B, M, C]``.
    values: ``[B, M, D]``.
    key_mask: optional ``[B, M]`` bool; keys where it is False get no weight.
      Every row needs at least one True.

  Returns:
    ``[B, N, D]`` in ``values.dtype``; logits and weights are float32.
  """
  return _attention(queries, keys, values, key_mask)

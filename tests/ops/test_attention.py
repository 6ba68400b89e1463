"""Tests of libra_jax.ops.attention: values by hand, and values and gradients against autodiff of the plain formula."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from libra_jax.ops.attention import softmax_attention


def plain_attention(queries, keys, values, key_mask=None):
  """The formula as written: the softmax of the logits, then the product, differentiated by autodiff."""
  logits = jnp.einsum("bnc,bmc->bnm", queries, keys)
  if key_mask is not None:
    logits = jnp.where(key_mask[:, None, :], logits, -jnp.inf)
  return jnp.einsum("bnm,bmc->bnc", jax.nn.softmax(logits, axis=-1), values)


def test_weights_by_hand():
  # Logits 0 and ln 3 give weights 1/4 and 3/4: 4 / 4 + 8 * 3 / 4 = 7, and 1 / 4 + 3 * 3 / 4 = 2.5.
  queries = jnp.array([[[1.0, 0.0]]])
  keys = jnp.array([[[0.0, 5.0], [math.log(3.0), -2.0]]])
  values = jnp.array([[[4.0, 1.0], [8.0, 3.0]]])
  np.testing.assert_allclose(softmax_attention(queries, keys, values), [[[7.0, 2.5]]], rtol=1e-6)
  # Masking the second key leaves all the weight on the first.
  masked = softmax_attention(queries, keys, values, jnp.array([[True, False]]))
  np.testing.assert_allclose(masked, [[[4.0, 1.0]]], rtol=1e-6)


def test_gradient_by_hand():
  # One query, two keys, scalar values: out = (v1 + 3 v2) / 4 for logits 0 and ln 3, so d out / d v = (1/4, 3/4);
  # d out / d q = sum_m P_m (v_m - out) k_m = 1/4 (4 - 7) k1 + 3/4 (8 - 7) k2.
  queries = jnp.array([[[1.0, 0.0]]])
  keys = jnp.array([[[0.0, 5.0], [math.log(3.0), -2.0]]])
  values = jnp.array([[[4.0], [8.0]]])
  d_queries, d_values = jax.grad(lambda q, v: softmax_attention(q, keys, v)[0, 0, 0], argnums=(0, 1))(queries, values)
  np.testing.assert_allclose(d_values[0, :, 0], [0.25, 0.75], rtol=1e-6)
  expected = 0.25 * (4.0 - 7.0) * np.asarray(keys[0, 0]) + 0.75 * (8.0 - 7.0) * np.asarray(keys[0, 1])
  np.testing.assert_allclose(d_queries[0, 0], expected, rtol=1e-5)


@pytest.mark.parametrize("masked", [False, True])
def test_matches_the_plain_formula_and_its_autodiff_gradient(masked):
  rng = np.random.default_rng(0)
  batch, num_queries, num_keys, channels, value_channels = 2, 12, 20, 8, 6
  queries = jnp.asarray(rng.normal(size=(batch, num_queries, channels)), jnp.float32)
  keys = jnp.asarray(rng.normal(size=(batch, num_keys, channels)), jnp.float32)
  values = jnp.asarray(rng.normal(size=(batch, num_keys, value_channels)), jnp.float32)
  cotangent = jnp.asarray(rng.normal(size=(batch, num_queries, value_channels)), jnp.float32)
  key_mask = jnp.asarray(rng.random((batch, num_keys)) < 0.6).at[:, 0].set(True) if masked else None

  def objective(function):
    return lambda q, k, v: jnp.sum(function(q, k, v, key_mask) * cotangent)

  np.testing.assert_allclose(softmax_attention(queries, keys, values, key_mask),
                             plain_attention(queries, keys, values, key_mask), rtol=1e-5, atol=1e-6)
  ours = jax.grad(objective(softmax_attention), argnums=(0, 1, 2))(queries, keys, values)
  plain = jax.grad(objective(plain_attention), argnums=(0, 1, 2))(queries, keys, values)
  for name, a, b in zip(("queries", "keys", "values"), ours, plain):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(b))), err_msg=name)
  if masked:
    ignored = ~np.asarray(key_mask)
    assert np.all(np.asarray(ours[1])[ignored] == 0) and np.all(np.asarray(ours[2])[ignored] == 0)


def test_large_logits_stay_finite():
  # Logits of several hundred overflow exp() unless the row's maximum is subtracted first.
  queries = jnp.full((1, 3, 4), 10.0)
  keys = jnp.array([[[10.0] * 4, [9.0] * 4]])
  values = jnp.array([[[1.0], [2.0]]])
  out, grads = jax.value_and_grad(lambda q: jnp.sum(softmax_attention(q, keys, values)))(queries)
  assert np.isfinite(out) and np.all(np.isfinite(grads))
  # The logits differ by 40: the second key's weight is exp(-40), the output the first key's value.
  np.testing.assert_allclose(softmax_attention(queries, keys, values), np.ones((1, 3, 1)), rtol=1e-6)

"""Tests of libra_jax.losses against mmdetection's numbers and the closed forms."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from libra_jax import losses


def balanced_l1_settings(ref):
  return [dict(zip(("alpha", "gamma", "beta"), map(float, row))) for row in ref["params_alpha_gamma_beta"]]


@pytest.mark.parametrize("k", [0, 1, 2])
def test_balanced_l1_matches_mmdetection(load_ref, k):
  ref = load_ref("balanced_l1")
  hparams = balanced_l1_settings(ref)[k]
  pred = jnp.asarray(ref["pred"], jnp.float32)
  target = jnp.asarray(ref["target"], jnp.float32)
  elementwise = losses.balanced_l1_loss(pred, target, **hparams)
  np.testing.assert_allclose(elementwise, ref[f"loss_none_{k}_f32"], rtol=1e-5, atol=1e-6)
  grad = jax.grad(lambda p: losses.balanced_l1_loss(p, target, **hparams).sum())(pred)
  np.testing.assert_allclose(grad, ref[f"grad_pred_{k}_f32"], rtol=1e-5, atol=1e-5)
  mean = losses.build_loss(dict(name="balanced_l1", **hparams))
  np.testing.assert_allclose(mean(pred, target), ref[f"loss_mean_{k}_f32"], rtol=1e-5)
  total = losses.build_loss(dict(name="balanced_l1", reduction="sum", **hparams))
  np.testing.assert_allclose(total(pred, target), ref[f"loss_sum_{k}_f32"], rtol=1e-5)
  # The R-CNN convention: weight 1 on the first 300 rows, divided by 512 sampled RoIs.
  weight = (np.arange(1000) < 300)[:, None].astype(np.float32) * np.ones((1, 4), np.float32)
  np.testing.assert_allclose(mean(pred, target, weight, avg_factor=512.0),
                             ref[f"loss_weighted_avg512_{k}_f32"], rtol=1e-5)


def test_balanced_l1_loss_weight(load_ref):
  ref = load_ref("balanced_l1")
  doubled = losses.build_loss(dict(name="balanced_l1", loss_weight=2.0))
  np.testing.assert_allclose(doubled(ref["pred"], ref["target"]), ref["loss_mean_0_lw2_f64"], rtol=1e-5)


def balanced_l1_grad(x, **hparams):
  return jax.grad(lambda p: losses.balanced_l1_loss(p, 0.0, **hparams))(jnp.float32(x))


def test_balanced_l1_closed_form_properties():
  alpha, gamma = 0.5, 1.5
  b = np.exp(gamma / alpha) - 1
  # beta = 1: value at beta is gamma * 1 + gamma / b - alpha from both sides, gradient
  # rises from 0 to alpha * ln(b + 1) = gamma, then stays gamma.
  below = float(losses.balanced_l1_loss(jnp.float32(1.0 - 1e-6), 0.0))
  np.testing.assert_allclose(below, gamma + gamma / b - alpha, rtol=1e-5)
  np.testing.assert_allclose(float(balanced_l1_grad(1e-7)), 0.0, atol=1e-5)
  np.testing.assert_allclose(float(balanced_l1_grad(1.0 - 1e-4)), gamma, rtol=1e-3)
  np.testing.assert_allclose(float(balanced_l1_grad(3.0)), gamma, rtol=1e-6)
  # beta = 0.11 (RetinaNet): mmdetection's kink at 0 is alpha * (1 / beta - 1) = 4.0448 and the
  # gradient jumps from 1.7014 to 1.5 at beta (the spec's measured values).
  retina = dict(alpha=alpha, gamma=gamma, beta=0.11)
  np.testing.assert_allclose(float(balanced_l1_grad(1e-7, **retina)), alpha * (1 / 0.11 - 1), rtol=1e-4)
  np.testing.assert_allclose(float(balanced_l1_grad(0.11 - 1e-6, **retina)), 1.7014, rtol=1e-3)
  np.testing.assert_allclose(float(balanced_l1_grad(0.11, **retina)), 1.5, rtol=1e-6)


@pytest.mark.parametrize("name", ["balanced_l1", "smooth_l1", "l1"])
def test_coordinate_losses_have_finite_gradients_with_zero_at_zero(name):
  loss = losses.get_loss(name).fn
  points = jnp.array([0.0, 1e-8, 0.11, 1.0, -1.0, 5.0], jnp.float32)
  grad = jax.vmap(jax.grad(lambda p: loss(p, 0.0)))(points)
  assert np.all(np.isfinite(grad))
  assert float(grad[0]) == 0.0  # like PyTorch's |x|, not jnp.abs's subgradient 1


def test_smooth_l1_and_l1_by_hand():
  pred = jnp.array([0.0, 0.5, 2.0, -3.0])
  np.testing.assert_allclose(losses.smooth_l1_loss(pred, 0.0, beta=1.0), [0.0, 0.125, 1.5, 2.5])
  np.testing.assert_allclose(losses.smooth_l1_loss(pred, 0.0, beta=1 / 9)[1], 0.5 - 1 / 18, rtol=1e-6)
  np.testing.assert_allclose(losses.l1_loss(pred, 1.0), [1.0, 0.5, 1.0, 4.0])
  with pytest.raises(ValueError, match="beta"):
    losses.smooth_l1_loss(pred, 0.0, beta=0.0)
  with pytest.raises(ValueError, match="beta"):
    losses.balanced_l1_loss(pred, 0.0, beta=-1.0)


def test_box_losses_by_hand():
  target = jnp.array([[0.0, 0.0, 10.0, 10.0]] * 3)
  pred = jnp.array([[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 15.0, 15.0], [20.0, 0.0, 30.0, 10.0]])
  overlap = np.array([1.0, 25 / 175, 0.0])
  np.testing.assert_allclose(losses.iou_loss(pred, target, mode="linear"), 1 - overlap, rtol=1e-6)
  np.testing.assert_allclose(losses.iou_loss(pred, target, mode="square"), 1 - overlap ** 2, rtol=1e-6)
  np.testing.assert_allclose(losses.iou_loss(pred, target), -np.log(np.maximum(overlap, 1e-6)), rtol=1e-5)
  np.testing.assert_allclose(losses.giou_loss(pred, target), [0.0, 1 - (25 / 175 - 50 / 225), 1 + 1 / 3],
                             rtol=1e-6)
  with pytest.raises(ValueError, match="mode"):
    losses.iou_loss(pred, target, mode="cubic")
  grad = jax.grad(lambda p: losses.giou_loss(p, target).sum())(pred)
  assert np.all(np.isfinite(grad))


def test_cross_entropy_losses_against_numpy():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(7, 5)).astype(np.float32) * 3
  labels = rng.integers(0, 5, 7)
  log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  np.testing.assert_allclose(losses.cross_entropy_loss(logits, labels), -log_probs[np.arange(7), labels],
                             rtol=1e-5)
  targets = rng.uniform(size=(7, 5)).astype(np.float32)
  probs = 1 / (1 + np.exp(-logits))
  expected = -(targets * np.log(probs) + (1 - targets) * np.log(1 - probs))
  np.testing.assert_allclose(losses.sigmoid_cross_entropy_loss(logits, targets), expected, rtol=1e-4,
                             atol=1e-6)
  # Padding labels (-1) stay finite so a zero weight removes them.
  assert np.isfinite(float(losses.cross_entropy_loss(logits[:1], np.array([-1]))[0]))


def test_focal_loss_matches_mmdetection(load_ref):
  ref = load_ref("focal_loss")
  elementwise = losses.sigmoid_focal_loss(ref["logits"], ref["labels"])
  np.testing.assert_allclose(elementwise, ref["loss_none"], rtol=1e-4, atol=1e-7)
  focal = losses.build_loss(dict(name="sigmoid_focal", gamma=2.0, alpha=0.25))
  np.testing.assert_allclose(focal(ref["logits"], ref["labels"], avg_factor=float(ref["num_pos"])),
                             ref["loss_mean_avg_npos"], rtol=1e-5)
  total = losses.build_loss(dict(name="sigmoid_focal", reduction="sum"))
  np.testing.assert_allclose(total(ref["logits"], ref["labels"]), ref["loss_sum"], rtol=1e-5)


def test_weight_reduce_loss_rules():
  loss = jnp.array([[1.0, 2.0], [3.0, 4.0]])
  weight = jnp.array([[1.0, 0.0], [1.0, 1.0]])
  np.testing.assert_allclose(losses.weight_reduce_loss(loss, weight, "none"), [[1.0, 0.0], [3.0, 4.0]])
  np.testing.assert_allclose(losses.weight_reduce_loss(loss, weight, "sum"), 8.0)
  np.testing.assert_allclose(losses.weight_reduce_loss(loss, weight, "mean"), 2.0)
  np.testing.assert_allclose(losses.weight_reduce_loss(loss, weight, avg_factor=4.0), 2.0, rtol=1e-6)
  assert float(losses.weight_reduce_loss(jnp.zeros((0, 4)))) == 0.0
  with pytest.raises(ValueError, match="avg_factor"):
    losses.weight_reduce_loss(loss, avg_factor=2.0, reduction="sum")
  with pytest.raises(ValueError, match="reduction"):
    losses.weight_reduce_loss(loss, reduction="max")


def test_build_loss_errors_name_the_problem():
  with pytest.raises(KeyError, match="smooth_l1"):
    losses.build_loss(dict(name="smoth_l1"))
  with pytest.raises(KeyError, match="delta"):
    losses.build_loss(dict(name="balanced_l1", delta=1.0))
  with pytest.raises(KeyError, match="name"):
    losses.build_loss(dict(beta=1.0))
  with pytest.raises(ValueError, match="consumes"):
    losses.register_loss("x", consumes="pixels")


def test_register_and_select_a_new_loss(scratch_loss_registry):
  @losses.register_loss("test_scaled_l1", consumes="deltas")
  def scaled_l1(pred, target, scale=1.0):
    return scale * jnp.abs(pred - target)

  loss = losses.build_loss(dict(name="test_scaled_l1", scale=3.0, loss_weight=0.5))
  assert loss.registered.consumes == "deltas"
  np.testing.assert_allclose(loss(jnp.array([1.0, -1.0]), jnp.zeros(2)), 0.5 * 3.0 * 1.0)
  assert losses.registered_losses()["test_scaled_l1"].hparams() == {"scale": 1.0}
  with pytest.raises(ValueError, match="already registered"):
    losses.register_loss("test_scaled_l1", consumes="deltas")(scaled_l1)


def test_every_registered_loss_declares_what_it_consumes():
  kinds = {name: entry.consumes for name, entry in losses.registered_losses().items()}
  assert kinds == {"balanced_l1": "deltas", "smooth_l1": "deltas", "l1": "deltas", "iou": "boxes",
                   "giou": "boxes", "cross_entropy": "logits", "sigmoid_cross_entropy": "logits",
                   "sigmoid_focal": "logits"}

"""Layers that read existing parameters without tracing their initializers (libra_jax.models.params)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import errors

from libra_jax.models import params
from libra_jax.models.layers import SharedFilterConv


def _counting_normal(calls):
  """A normal(0.1) initializer that counts its calls, traced or not."""
  def init(key, shape, dtype=jnp.float32):
    calls.append(tuple(shape))
    return 0.1 * jax.random.normal(key, shape, dtype)
  return init


LAYERS = [
    (lambda init: params.Conv(5, (3, 3), kernel_init=init, bias_init=init), nn.Conv, (1, 6, 7, 4)),
    (lambda init: params.Dense(5, kernel_init=init, bias_init=init), nn.Dense, (3, 4)),
    (lambda init: params.BatchNorm(use_running_average=True, scale_init=init, bias_init=init), nn.BatchNorm,
     (2, 3, 3, 4)),
    (lambda init: SharedFilterConv(5, kernel_init=init, bias_init=init), None, None),
]


@pytest.mark.parametrize("make, flax_layer, shape", LAYERS)
def test_apply_reads_parameters_without_calling_the_initializer(make, flax_layer, shape):
  calls = []
  layer = make(_counting_normal(calls))
  x = (jax.random.normal(jax.random.key(1), (1, 6, 7, 4)),) if shape is None else jax.random.normal(
      jax.random.key(1), shape)
  variables = layer.init(jax.random.key(0), x)
  created = len(calls)
  assert created >= 2
  jax.jit(layer.apply)(variables, x)
  layer.apply(variables, x)
  assert len(calls) == created
  if flax_layer is not None:  # Flax's own layer traces the initializer on every apply, and computes the same
    plain = flax_layer(**{f.name: getattr(layer, f.name) for f in layer.__dataclass_fields__.values()
                          if f.name not in ("parent", "name")})
    np.testing.assert_array_equal(plain.apply(variables, x), layer.apply(variables, x))
    assert len(calls) > created


def test_a_stored_parameter_of_another_shape_names_its_module_and_shapes():
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      return params.Dense(3, name="head")(params.Conv(4, (3, 3), name="stem")(x))

  net = Net()
  x = jnp.ones((1, 5, 5, 2))
  variables = net.init(jax.random.key(0), x)
  wrong = jax.tree.map(lambda v: v, variables)
  wrong["params"]["stem"]["kernel"] = jnp.zeros((3, 3, 2, 6))
  with pytest.raises(errors.ScopeParamShapeError, match=r"kernel.*/stem.*\(3, 3, 2, 4\).*existing.*\(3, 3, 2, 6\)"):
    net.apply(wrong, x)


def test_boxed_parameters_are_compared_and_returned_unboxed():
  layer = params.Dense(3, kernel_init=nn.with_partitioning(nn.initializers.lecun_normal(), (None, "model")))
  x = jnp.ones((2, 4))
  variables = layer.init(jax.random.key(0), x)
  np.testing.assert_array_equal(layer.apply(variables, x), nn.Dense(3).apply(nn.unbox(variables), x))


def test_a_parameter_name_claimed_twice_fails_in_apply_as_in_init():
  class Twice(params.ReadsExistingParams, nn.Module):
    @nn.compact
    def __call__(self, x):
      return x * self.param("w", nn.initializers.ones, (2,)) * self.param("w", nn.initializers.ones, (2,))

  with pytest.raises(Exception, match='"w"'):
    Twice().init(jax.random.key(0), jnp.ones(2))
  with pytest.raises(Exception, match='"w"'):
    Twice().apply({"params": {"w": jnp.ones(2)}}, jnp.ones(2))

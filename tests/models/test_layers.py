"""The shared-filter convolution of the heads: nn.Conv's parameters, the same outputs map by map."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from libra_jax.models.layers import ConvModule, SharedFilterConv, conv2d


def test_shared_filter_conv_has_nn_convs_parameters_and_outputs_on_each_map():
  # 2 x 32 x 32 + 2 x 16 x 16 positions and 128 channels: the maps go through Winograd together on the CPU.
  rng = np.random.default_rng(0)
  maps = [jnp.asarray(rng.normal(size=(2, n, n, 128)), jnp.float32) for n in (32, 16)]
  init = nn.initializers.normal(0.01)
  shared = SharedFilterConv(64, 3, kernel_init=init, bias_init=nn.initializers.constant(0.5))
  single = conv2d(64, 3, kernel_init=init, bias_init=nn.initializers.constant(0.5))
  key = jax.random.key(3)
  shared_params = shared.init(key, maps)
  single_params = single.init(key, maps[0])
  assert jax.tree.map(jnp.shape, shared_params) == jax.tree.map(jnp.shape, single_params)
  jax.tree.map(np.testing.assert_array_equal, shared_params, single_params)
  for x, y in zip(maps, shared.apply(shared_params, maps)):
    np.testing.assert_allclose(y, single.apply(single_params, x), rtol=1e-5, atol=1e-6)


def test_a_conv_module_over_several_maps_has_stride_one():
  maps = [jnp.zeros((1, 8, 8, 4))]
  with pytest.raises(ValueError, match="stride 1, not 2"):
    ConvModule(4, strides=2).init(jax.random.key(0), maps)

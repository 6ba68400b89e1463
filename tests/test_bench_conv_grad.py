"""benchmarks/bench_conv_grad.py: each convolution path traces what it names, and the module is restored after."""

import contextlib

import jax
import jax.numpy as jnp
import pytest

from benchmarks import bench_conv_grad
from libra_jax.ops import conv


def traced(path, kernel: int, channels: int) -> str:
  """The jaxpr of a convolution over a 2 x 32 x 32 map (2,048 output positions), traced as ``path`` (None: as is)."""
  x = jax.ShapeDtypeStruct((2, 32, 32, channels), jnp.float32)
  w = jax.ShapeDtypeStruct((kernel, kernel, channels, 8), jnp.float32)
  padding = ((kernel // 2, kernel // 2),) * 2
  with bench_conv_grad.convolution_path(path) if path else contextlib.nullcontext():
    return str(jax.make_jaxpr(lambda x, w: conv.conv_general_dilated(x, w, (1, 1), padding,
                                                                     dimension_numbers=conv.NHWC))(x, w))


@pytest.mark.parametrize("path,pointwise_is_conv,winograd", [("xla", True, False),
                                                            ("ours_without_winograd", False, False),
                                                            ("ours", False, True)])
def test_each_path_traces_its_convolutions(path, pointwise_is_conv, winograd):
  assert ("conv_general_dilated" in traced(path, 1, 128)) == pointwise_is_conv
  assert ("conv_general_dilated" not in traced(path, 3, 128)) == winograd
  # Outside the context every path is back to the module's own choice.
  assert "conv_general_dilated" not in traced(None, 3, 128)
  assert "conv_general_dilated" not in traced(None, 1, 128)


def test_the_module_is_restored_after_an_exception():
  platforms = conv.MATMUL_PLATFORMS
  with pytest.raises(RuntimeError):
    with bench_conv_grad.convolution_path("xla"):
      raise RuntimeError("traced step failed")
  assert conv.MATMUL_PLATFORMS == platforms
  assert "conv_general_dilated" not in traced(None, 3, 128)

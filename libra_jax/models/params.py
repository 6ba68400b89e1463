"""Flax layers that read their existing parameters without tracing the initializers again.

Flax's ``Module.param`` checks an existing parameter's shape by evaluating its
initializer abstractly (``jax.eval_shape`` of ``init_fn(key, *init_args)``),
on every call, in ``apply`` too. A ResNet-50 detector has about 200
parameters, so every trace of its train or inference step traced about 200
initializers (random normals, truncated normals, ...): 0.23-0.30 s of the
first trace of Libra Faster R-CNN's train step at 800x1344 in a fresh
process, about 5% of its cached compile.

:class:`ReadsExistingParams` compares the stored shape with the shape the layer
asks for (the first of ``init_args``, as every Flax layer passes it) and
returns the stored value; a parameter that does not exist yet is created by
Flax as before. The layers below are Flax's, with that one change; their
parameter trees and automatic names are the same.
"""

import flax.linen as nn
import numpy as np
from flax import errors
from flax.core import meta


class ReadsExistingParams:
  """Mixin for an ``nn.Module``: ``param`` reads an existing parameter and checks its shape, tracing nothing.

  The layer must call ``self.param(name, init_fn, shape, ...)`` with the
  parameter's shape as the first initializer argument. A stored parameter of
  another shape raises Flax's ``ScopeParamShapeError``, naming the module path.
  """

  def param(self, name, init_fn, *init_args, unbox=True, **init_kwargs):
    if not self.has_variable("params", name):
      return super().param(name, init_fn, *init_args, unbox=unbox, **init_kwargs)
    self.scope.reserve(name, "params")  # a second claim on the name fails, as in Flax
    value = self.get_variable("params", name)
    stored = meta.unbox(value)
    wanted = tuple(init_args[0])
    if np.shape(stored) != wanted:
      raise errors.ScopeParamShapeError(name, self.scope.path_text, np.shape(stored), wanted)
    return stored if unbox else value


class Conv(ReadsExistingParams, nn.Conv):
  """``nn.Conv`` whose existing parameters are read without tracing their initializers."""


class Dense(ReadsExistingParams, nn.Dense):
  """``nn.Dense`` whose existing parameters are read without tracing their initializers."""


class BatchNorm(ReadsExistingParams, nn.BatchNorm):
  """``nn.BatchNorm`` whose existing parameters are read without tracing their initializers."""

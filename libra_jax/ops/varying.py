"""Mesh-axis types inside ``shard_map``: making one value vary over the axes another varies over."""

import jax
from jax import lax


def vary_alike(value, other):
  """``value`` marked varying over the mesh axes ``other`` varies over (inside ``shard_map``; else unchanged).

  Two uses here: a replicated filter convolved with a per-device input has a
  per-device filter gradient, and marking the filter varying first lets
  ``shard_map`` sum that gradient over devices, as it does for XLA's own
  convolution; and a loop whose body computes per-device values needs a
  carry that starts varying too (a ``while_loop``'s carry keeps its type).
  """
  missing = tuple(sorted(jax.typeof(other).mat.varying - jax.typeof(value).mat.varying))
  return lax.pcast(value, missing, to="varying") if missing else value

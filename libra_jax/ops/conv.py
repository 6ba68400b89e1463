"""2-D convolution where XLA:CPU's convolution kernels are slow: matmuls, Winograd, filter gradients in bands.

XLA:CPU runs a 1x1 convolution well below its matmul rate (35-140 GFLOP/s
against 55-210 for the same product as a matmul, at ResNet-50 FPN's shapes for
an 800x1344 image: ``benchmarks/bench_conv_grad.py``), and its filter (weight)
gradient of a larger convolution slows down as the map grows: 160-180 GFLOP/s
over about 2,000 output positions, 60-100 over 8,000-17,000 and 27 over
67,200 (256 -> 256 3x3 filters), while the forward pass and the input
gradient keep 170-200. So, on the platforms in ``MATMUL_PLATFORMS`` (the CPU;
accelerators keep XLA's convolutions, which are their fast path):

* a 1x1 convolution is a matmul over the positions (after a strided slice
  when it has a stride), so its forward pass and both gradients are matmuls;
* a ``kh x kw`` convolution keeps XLA's forward pass and input gradient, and
  its filter gradient is the sum of XLA's own filter gradients over bands of
  output rows of about ``FILTER_GRADIENT_BAND_POSITIONS`` positions each
  (:func:`banded_filter_gradient`): band ``[r0, r1)`` reads input rows
  ``[s*r0 - pad, s*(r1 - 1) - pad + kh)``. Maps of one band keep XLA's
  convolution as it is, unless they have at least ``TAP_MIN_CHANNELS`` input
  channels (below). A strided convolution of several bands takes one
  matmul per tap instead (:func:`tap_filter_gradient`): XLA's filter-gradient
  convolution reads its input channels first, and in the train step XLA:CPU
  transposes each band of the map for it in a fusion that also recomputes the
  BatchNorm and ReLU before it, slowly (Faster R-CNN R-50 at 800x1344: 71 ms
  for the bands of layer2's first 3x3 convolution, whose filter gradient
  itself took 46 ms; 2026-12-06). A strided stem (7x7, 3 channels) takes 49
  such matmuls when it is trained; with ``frozen_stages >= 0`` its gradient
  is never computed. A convolution of one band takes the tap matmuls too when
  it has at least ``TAP_MIN_CHANNELS`` input channels (layer4's 3x3
  convolutions where Winograd does not take them, as at batch 1, and
  RetinaNet's P6 convolution on C5; narrower ones keep XLA's own): Faster
  R-CNN R-50's train step at 800x1344 -0.062 and -0.076 s (8 and 5 of 10 and
  8 rounds faster), RetinaNet R-50's at 512x512 batch 2 -0.027 s (7 of 10),
  each against the version before in one process
  (``benchmarks/paired_revision.py``, 2026-12-06).

Measured on 2 cores with AVX-512 (2026-12-04, jax 0.10, median of three calls,
ms; ``bench_conv_grad.py`` times the layers and the whole step), filter
gradients of 3x3 filters, XLA's own, the nine tap matmuls (which strided
convolutions of several bands and wide ones of one band take now: alone they
were slower than the bands, inside the train step faster, see above), and
bands of 2,048 positions::

    map (output)   channels        XLA   nine matmuls   bands
    1x200x336      256 -> 256     2149        700         501-554
    1x100x168      256 -> 256      219        183         147
    2x128x128      256 -> 256      846        359         242
    2x64x64        256 -> 256       68         91          56
    1x100x168      128 -> 128       37         66          44
    2x64x64        256 -> 720      389        180         164
    1x100x168      256 -> 720      744        360         326
    1x100x168 /2   128 -> 128       88         74          57

(bands of 1,024 positions were within 10% of these, and twice as many
operations to compile; a ``fori_loop`` over equal bands ran 70x slower.)

:func:`conv_general_dilated` has the signature of ``lax.conv_general_dilated``
(what ``flax.linen.Conv`` calls) and applies this to ungrouped, undilated NHWC
convolutions. Each is the same sum in another order: it agrees with XLA's to
float rounding (tests/ops/test_conv.py).

A 3x3 float32 convolution with stride 1 whose input has at least
``WINOGRAD_MIN_CHANNELS`` channels and whose output at least
``WINOGRAD_MIN_POSITIONS`` positions is computed on those platforms by
Winograd's minimal filtering F(2x2, 3x3) (Lavin & Gray, 2016,
:func:`winograd_conv3x3`): each 2x2 block of outputs from its 4x4 input tile
with 16 products per channel pair instead of 36, as 16 matmuls over the
tiles. Its forward pass, input gradient and filter gradient (a custom VJP:
the adjoints of the tile, filter and output transforms, and two matmuls per
Winograd position) are all matmuls, 2.25x fewer FLOPs than the direct
convolution's. The gradient keeps only ``x`` and ``w``, as XLA's does, and
recomputes the tiles. Being a custom VJP, it has no forward-mode derivative
(``jax.jvp``, ``jax.jacfwd``): nothing here uses one; trace such code inside
:func:`direct_convolutions`. Forward and backward are each jitted per shape, so that
repeated layers (a ResNet stage's blocks, a head's levels) are traced once:
tracing Faster R-CNN R-50's train step at 800x1344 took 2.5 s without that
and 1.8 s with it (1.7 s before Winograd). It is an exact identity computed in
another order, with transforms whose coefficients are 0, +-1 and +-1/2, and
agrees with the float64 convolution as closely as XLA's own does (test).
Measured on 2 cores (2026-12-04, ms, median of three jitted calls, one run of
``python benchmarks/bench_conv_grad.py``; ``fwd+bwd``: ``jax.vjp`` with a
random output gradient; direct: XLA's forward pass and input gradient, the
banded filter gradient)::

    map (output)   channels      forward: direct  Winograd   fwd+bwd: direct  Winograd
    1x200x336      256 -> 256              383.2     234.5            1196.6     705.8
    1x100x168      256 -> 256               94.5      74.7             329.0     183.1
    2x128x128      256 -> 256              190.0     115.9             584.2     347.7
    1x100x168      256 -> 720              289.8     160.9             848.0     465.4
    1x50x84        256 -> 256               25.1      19.7              78.8      48.6
    2x64x64        128 -> 128               12.1       9.5              39.6      25.6
    2x32x32        256 -> 256               13.6      11.0              40.0      26.7
    1x200x336       64 -> 64                27.2      21.1              90.3      80.5
    1x25x42        512 -> 512               25.0      33.9              81.6      71.2
    2x16x16        512 -> 512               12.6      27.0              43.3      46.9

Below the thresholds (the last three rows) the tile transforms, memory traffic
that fewer channels or positions repay less, take the gain or more: 512
channels over 1,050 and 512 positions run slower forward, and 64 channels
gained -20% to +45% forward and -2% to +15% forward and backward over five
maps in a second run, within that run's noise. The train step of Libra Faster
R-CNN R-50 at 512x512 batch 2 took 3.96 s with Winograd and 4.39 s without in
that run; an earlier run of the same command (a version whose gradient kept
the tiles) gave 3.40 against 4.40 s, and the two versions, alternating in
four fresh processes, took 3.29-3.44 s each: the step varies by ~15% between
runs on this machine.

A head that applies one filter to every pyramid level (RetinaNet's towers
and class and box convolutions, the RPN's 3x3 conv;
``models.layers.SharedFilterConv``) calls :func:`conv_maps`, which stacks
the levels' tiles for one set of 16 matmuls per layer
(:func:`winograd_conv3x3_maps`), so levels too small for Winograd alone take
it too. Measured in one process with both programs' steps in turns
(2026-12-05; median of the per-round differences): RetinaNet R-50's train
step -0.143 s at 512x512 batch 2 (2.779 -> 2.635 s, 10 rounds, all faster)
and -0.141 s at 800x1344 (6 rounds); its inference -0.019 s and -0.055 s.
Faster R-CNN's train step, whose RPN conv is the only such layer, did not
change (-0.054 and +0.044 s in two runs at 512x512 batch 2, +0.014 s at
800x1344). Keeping the largest level out of the stack was 0.20 s slower for
RetinaNet.

The input gradient's tile adjoint is written out
(:func:`_winograd_tiles_adjoint`: each input row is the sum of two tiles'
terms, the tile axis shifted by one) rather than taken by ``jax.vjp`` of the
tiling's strided slices, which made one zero-interleaved copy of the map per
slice. Both versions' train steps in turns in one process (2026-12-05,
median of the rounds' differences): RetinaNet R-50 -0.134 s at 512x512 batch
2 (2.674 -> 2.539 s, 10 of 10 rounds faster) and -0.139 s at 800x1344
(5.456 -> 5.302 s, 4 of 6 rounds; one round caught a 6 s stall of this
machine); Faster R-CNN R-50 -0.088 s at 512x512 batch 2 (2.962 -> 2.876 s,
9 of 10 rounds).
"""

import contextlib
import contextvars
import functools
import math
from typing import Sequence, Tuple

import jax
import jax.numpy as jnp
from jax import lax

from libra_jax.ops.varying import vary_alike

MATMUL_PLATFORMS = ("cpu",)
# Output positions (batch x rows x width) per band of a banded filter gradient.
FILTER_GRADIENT_BAND_POSITIONS = 2048
# The smallest 3x3 convolutions (input channels, output positions batch x rows x width) computed by Winograd.
WINOGRAD_MIN_CHANNELS = 128
WINOGRAD_MIN_POSITIONS = 2048
# The fewest input channels of a one-band convolution whose filter gradient is tap matmuls (layer4's 3x3, P6 on C5).
TAP_MIN_CHANNELS = 512
# F(2x2, 3x3)'s filter transform G [4, 3]; its input transform B^T and output transform A^T are written out as sums in
# _winograd_input_rows and _winograd_output_rows.
WINOGRAD_FILTER_TRANSFORM = ((1.0, 0.0, 0.0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0.0, 0.0, 1.0))
_WINOGRAD_ALLOWED = contextvars.ContextVar("libra_jax_winograd_allowed", default=True)
NHWC = ("NHWC", "HWIO", "NHWC")


def band_rows(output_shape: Sequence[int]) -> int:
  """Output rows per band of the filter gradient of an NHWC convolution whose output is ``output_shape``."""
  batch, _, width, _ = output_shape
  return max(1, FILTER_GRADIENT_BAND_POSITIONS // (batch * width))


def pointwise_conv(x, w, strides: Tuple[int, int]):
  """A 1x1 NHWC convolution without padding as a matmul: ``x [B, H, W, C_in]``, ``w [1, 1, C_in, C_out]``."""
  if strides != (1, 1):
    x = lax.slice(x, (0, 0, 0, 0), x.shape, (1,) + tuple(strides) + (1,))
  # A matmul of [positions, C] matrices, whose filter gradient XLA:CPU computes without transposing the input
  # (3.6x faster for 64 -> 256 channels at 200x336 than the same product written on 4-D arrays).
  return (x.reshape(-1, x.shape[3]) @ w[0, 0]).reshape(x.shape[:3] + (w.shape[3],))


def _winograd_input_rows(x, tiles: int, axis: int):
  """``B^T d`` along ``axis``: the four transformed rows of each of ``tiles`` overlapping 4-row tiles (stride 2).

  ``x`` has ``2 * tiles + 2`` rows along ``axis``; with ``d_k`` the tiles' ``k``-th
  rows, returns ``[d_0 - d_2, d_1 + d_2, d_2 - d_1, d_1 - d_3]``, each with
  ``tiles`` rows along ``axis``.
  """
  d = [lax.slice_in_dim(x, k, k + 2 * tiles - 1, 2, axis) for k in range(4)]
  return [d[0] - d[2], d[1] + d[2], d[2] - d[1], d[1] - d[3]]


def _winograd_input_rows_adjoint(v, axis: int):
  """The adjoint of :func:`_winograd_input_rows`: from the four transformed rows ``v`` (``tiles`` rows along
  ``axis`` each) to the gradient of the ``2 * tiles + 2`` input rows.

  Tile ``i``'s rows ``d_0..d_3`` get ``B v = [v_0, v_1 - v_2 + v_3, v_1 + v_2 - v_0, -v_3]``; input rows ``2i``
  and ``2i + 1`` are row 0 and 1 of tile ``i`` and rows 2 and 3 of tile ``i - 1``, so each is a sum of two
  terms, computed with the tile axis shifted by padding, never by padding between rows.
  """
  v0, v1, v2, v3 = v
  d = [v0, v1 - v2 + v3, v1 + v2 - v0, -v3]
  after = [(0, 0)] * v0.ndim
  after[axis] = (0, 1)
  before = [(0, 0)] * v0.ndim
  before[axis] = (1, 0)
  even = jnp.pad(d[0], after) + jnp.pad(d[2], before)
  odd = jnp.pad(d[1], after) + jnp.pad(d[3], before)
  rows = jnp.stack([even, odd], axis=axis + 1)
  return rows.reshape(rows.shape[:axis] + (-1,) + rows.shape[axis + 2:])


def _winograd_output_rows(m0, m1, m2, m3):
  """``A^T m``: a tile's two output rows from its four Winograd-domain rows."""
  return m0 + m1 + m2, m1 - m2 - m3


def _tile_count(outputs: int) -> int:
  """2x2 output blocks along an axis of ``outputs`` outputs (the last one half cropped when ``outputs`` is odd)."""
  return -(-outputs // 2)


def _winograd_geometry(shape, padding):
  """``(H_out, W_out, tile rows, tile columns)`` of a stride-1 3x3 convolution of an NHWC input ``shape``."""
  (top, bottom), (left, right) = padding
  out_height, out_width = shape[1] + top + bottom - 2, shape[2] + left + right - 2
  return out_height, out_width, _tile_count(out_height), _tile_count(out_width)


def _winograd_tiles(x, padding):
  """``V = B^T d B`` of every 4x4 input tile ``d``: 16 arrays ``[B * tile rows * tile columns, C_in]``."""
  (top, bottom), (left, right) = padding
  out_height, out_width, tile_rows, tile_columns = _winograd_geometry(x.shape, padding)
  x = jnp.pad(x, ((0, 0), (top, bottom + 2 * tile_rows - out_height), (left, right + 2 * tile_columns - out_width),
                  (0, 0)))
  return [column.reshape(-1, x.shape[3]) for row in _winograd_input_rows(x, tile_rows, 1)
          for column in _winograd_input_rows(row, tile_columns, 2)]


def _winograd_tiles_adjoint(dv, x_shape, padding):
  """The adjoint of :func:`_winograd_tiles`: ``dL/dx [B, H, W, C_in]`` from the 16 ``dL/dV`` arrays
  ``[B * tile rows * tile columns, C_in]``."""
  (top, _), (left, _) = padding
  batch, height, width, channels = x_shape
  _, _, tile_rows, tile_columns = _winograd_geometry(x_shape, padding)
  dv = [p.reshape(batch, tile_rows, tile_columns, channels) for p in dv]
  rows = [_winograd_input_rows_adjoint(dv[4 * r:4 * r + 4], 2) for r in range(4)]
  padded = _winograd_input_rows_adjoint(rows, 1)
  return padded[:, top:top + height, left:left + width]


def _winograd_filter_rows(taps, axis: int):
  """``G`` of ``WINOGRAD_FILTER_TRANSFORM`` applied along ``axis`` of ``taps`` (3 long there): the 4 rows
  ``(t0, (t0 + t1 + t2) / 2, (t0 - t1 + t2) / 2, t2)``, stacked on that axis."""
  t0, t1, t2 = (lax.index_in_dim(taps, i, axis, keepdims=False) for i in range(3))
  half_outer, half_middle = 0.5 * (t0 + t2), 0.5 * t1
  return jnp.stack((t0, half_outer + half_middle, half_outer - half_middle, t2), axis=axis)


def _winograd_filter(w):
  """``U = G w G^T`` of ``w [3, 3, C_in, C_out]``: ``[16, C_in, C_out]``.

  Written as sums of the filter's taps, not as the einsum ``G w G^T``: XLA:CPU
  ran that einsum as matmuls contracting 3 long axes, 10x slower (6.4 against
  0.6 ms for 256 -> 256 filters, 26 against 2.2 ms for 512 -> 512; 2026-12-06),
  and a step recomputes it for every Winograd layer, twice when it trains.
  """
  return _winograd_filter_rows(_winograd_filter_rows(w, 0), 1).reshape(16, w.shape[2], w.shape[3])


def _winograd_untile(m, output_shape):
  """``A^T M A`` of the 16 products ``m`` (each ``[tiles, C_out]``): the output ``[B, H_out, W_out, C_out]``."""
  batch, out_height, out_width, channels = output_shape
  tile_rows, tile_columns = _tile_count(out_height), _tile_count(out_width)
  m = [p.reshape(batch, tile_rows, tile_columns, channels) for p in m]
  rows = [_winograd_output_rows(*m[j::4]) for j in range(4)]  # rows[j][a]: output row a of Winograd column j
  blocks = [[_winograd_output_rows(*[rows[j][a] for j in range(4)])[b] for b in range(2)] for a in range(2)]
  y = jnp.stack([jnp.stack(blocks[a], axis=3) for a in range(2)], axis=2)  # [B, rows, 2, columns, 2, C_out]
  return y.reshape(batch, 2 * tile_rows, 2 * tile_columns, channels)[:, :out_height, :out_width]


def _winograd_untile_adjoint(g):
  """The adjoint of :func:`_winograd_untile`: ``dM = A dY A^T`` of every 2x2 block of ``g [B, H_out, W_out, C]``.

  ``A`` maps a block's two rows ``(g0, g1)`` to four: ``(g0, g0 + g1, g0 - g1, -g1)``.
  Returns the 16 ``[B * tile rows * tile columns, C]`` arrays, as :func:`_winograd_tiles` orders them.
  """
  batch, out_height, out_width, channels = g.shape
  tile_rows, tile_columns = _tile_count(out_height), _tile_count(out_width)
  g = jnp.pad(g, ((0, 0), (0, 2 * tile_rows - out_height), (0, 2 * tile_columns - out_width), (0, 0)))
  g = g.reshape(batch, tile_rows, 2, tile_columns, 2, channels)
  spread = lambda g0, g1: (g0, g0 + g1, g0 - g1, -g1)
  columns = [spread(g[:, :, a, :, 0], g[:, :, a, :, 1]) for a in range(2)]  # columns[a][j]
  return [row.reshape(-1, channels) for row_pair in zip(*[spread(columns[0][j], columns[1][j]) for j in range(4)])
          for row in row_pair]


def winograd_conv3x3(x, w, padding: Tuple[Tuple[int, int], ...]):
  """A stride-1 3x3 NHWC convolution by Winograd's F(2x2, 3x3): ``x [B, H, W, C_in]``, ``w [3, 3, C_in, C_out]``.

  The output ``[B, H_out, W_out, C_out]`` (``H_out = H + top + bottom - 2``)
  is computed in 2x2 blocks; block ``(i, j)`` reads the 4x4 input tile at
  padded rows ``2i..2i+3`` and columns ``2j..2j+3`` (the input is padded
  further at the bottom and right when ``H_out`` or ``W_out`` is odd, and the
  extra row or column cropped). With the tiles ``d`` transformed to
  ``V = B^T d B`` and the filter to ``U = G w G^T`` (16 positions each), the
  products ``M[p] = V[p] @ U[p]`` (``[tiles, C_in] @ [C_in, C_out]``) give the
  block ``A^T M A``. 16 matmuls rather than one batched over a stack of the
  16 arrays: 5-20% faster forward and backward on the CPU.
  """
  return winograd_conv3x3_maps((x,), w, padding)[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def winograd_conv3x3_maps(xs, w, padding: Tuple[Tuple[int, int], ...]):
  """:func:`winograd_conv3x3` of each map of ``xs`` by the same filter ``w``, with one matmul per Winograd position.

  ``xs`` is a tuple of NHWC maps of ``C_in`` channels (any batch and size):
  the tiles of all of them are stacked along the tile axis, so each product
  ``M[p] = V[p] @ U[p]`` covers every map (and in the backward pass the
  filter gradient's ``V[p]^T @ dM[p]`` sums over them). A head that shares
  its filters across the pyramid levels (RetinaNet's towers, the RPN's
  conv) runs one set of 16 matmuls per layer instead of one per level; the
  small levels, too small for Winograd alone (``WINOGRAD_MIN_POSITIONS``),
  ride along. Returns the tuple of outputs, in the order of ``xs``.
  """
  return _winograd_forward(xs, w, padding)[0]


def _stacked_tiles(xs, padding):
  """The 16 Winograd-domain arrays of the maps ``xs``, each ``[sum of the maps' tiles, C_in]``."""
  per_map = [_winograd_tiles(x, padding) for x in xs]
  return [jnp.concatenate([tiles[p] for tiles in per_map]) for p in range(16)]


def _tile_slices(xs, padding):
  """Where each map's tiles lie in the stack of :func:`_stacked_tiles`: one ``slice`` of its rows per map."""
  slices, first = [], 0
  for x in xs:
    _, _, tile_rows, tile_columns = _winograd_geometry(x.shape, padding)
    slices.append(slice(first, first + x.shape[0] * tile_rows * tile_columns))
    first = slices[-1].stop
  return slices


def _unstack_outputs(m, xs, out_channels: int, padding):
  """The maps' outputs from the 16 stacked products ``m`` (each ``[sum of the maps' tiles, C_out]``)."""
  outputs = []
  for x, rows in zip(xs, _tile_slices(xs, padding)):
    out_height, out_width, _, _ = _winograd_geometry(x.shape, padding)
    outputs.append(_winograd_untile([p[rows] for p in m], (x.shape[0], out_height, out_width, out_channels)))
  return tuple(outputs)


@functools.partial(jax.jit, static_argnums=2)
def _winograd_forward(xs, w, padding):
  v, u = _stacked_tiles(xs, padding), _winograd_filter(w)
  return _unstack_outputs([v[p] @ u[p] for p in range(16)], xs, w.shape[3], padding), (xs, w)


@functools.partial(jax.jit, static_argnums=0)
def _winograd_backward(padding, residuals, gs):
  """``dL/dxs, dL/dw`` from the output gradients ``gs``: each of the three transforms' adjoint, and two matmuls per
  Winograd position: ``dV[p] = dM[p] @ U[p]^T``, ``dU[p] = V[p]^T @ dM[p]``. The tiles' adjoint is written out
  (:func:`_winograd_tiles_adjoint`); ``jax.vjp`` of the tiling made one zero-interleaved copy of the map per
  strided slice and summed them."""
  xs, w = residuals
  v = _stacked_tiles(xs, padding)
  u, filter_adjoint = jax.vjp(_winograd_filter, w)
  per_map = [_winograd_untile_adjoint(g) for g in gs]
  dm = [jnp.concatenate([adjoint[p] for adjoint in per_map]) for p in range(16)]
  dv = [dm[p] @ u[p].T for p in range(16)]
  du = jnp.stack([v[p].T @ dm[p] for p in range(16)])
  dxs = tuple(_winograd_tiles_adjoint([p[rows] for p in dv], x.shape, padding)
              for x, rows in zip(xs, _tile_slices(xs, padding)))
  return dxs, filter_adjoint(du)[0]


winograd_conv3x3_maps.defvjp(_winograd_forward, _winograd_backward)


def _xla_conv(x, w, strides: Tuple[int, int], padding: Tuple[Tuple[int, int], ...]):
  return lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=NHWC)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv_with_split_filter_gradient(x, w, strides, padding):
  """XLA's convolution, whose filter gradient is computed in parts: by bands of output rows when it has stride 1 and
  spans several bands, otherwise per tap (the module docstring)."""
  return _xla_conv(x, w, strides, padding)


def _forward(x, w, strides, padding):
  return _xla_conv(x, w, strides, padding), (x, w)


def xla_filter_gradient(x, g, kernel_size: Tuple[int, int], strides: Tuple[int, int],
                        padding: Sequence[Tuple[int, int]]):
  """``dL/dW [kh, kw, C_in, C_out]`` of an NHWC convolution by XLA's filter-gradient convolution.

  ``x [B, H, W, C_in]`` is the input, ``g [B, H_out, W_out, C_out]`` the
  output gradient: ``dW[i, j] = sum_bhw xpad[b, s*h + i, s*w + j, :]^T g[b, h, w, :]``,
  a convolution of ``x`` (batch as the contracted feature) by ``g`` dilated by
  the strides. The high padding is trimmed (negative where the convolution
  never reads the last rows or columns) so that the result is ``kh x kw``.
  """
  (top, _), (left, _) = padding
  bottom = (g.shape[1] - 1) * strides[0] + kernel_size[0] - top - x.shape[1]
  right = (g.shape[2] - 1) * strides[1] + kernel_size[1] - left - x.shape[2]
  return lax.conv_general_dilated(x, g, window_strides=(1, 1), padding=((top, bottom), (left, right)),
                                  rhs_dilation=strides, dimension_numbers=("CHWN", "IHWO", "HWNC"))


def banded_filter_gradient(x, g, kernel_size: Tuple[int, int], strides: Tuple[int, int],
                           padding: Sequence[Tuple[int, int]]):
  """``dL/dW`` as the sum of :func:`xla_filter_gradient` over bands of :func:`band_rows` output rows.

  Band ``[r0, r1)`` of ``g`` reads input rows ``[s*r0 - top, s*(r1 - 1) - top + kh)``,
  the part outside ``x`` being the band's own padding.
  """
  (top, _), columns = padding
  rows = band_rows(g.shape)
  total = None
  for first in range(0, g.shape[1], rows):
    last = min(g.shape[1], first + rows)
    start, stop = first * strides[0] - top, (last - 1) * strides[0] + kernel_size[0] - top
    low, high = max(start, 0), min(stop, x.shape[1])
    band = xla_filter_gradient(x[:, low:high], g[:, first:last], kernel_size, strides,
                               ((low - start, stop - high), columns))
    total = band if total is None else total + band
  return total


def tap_filter_gradient(x, g, kernel_size: Tuple[int, int], strides: Tuple[int, int],
                        padding: Sequence[Tuple[int, int]]):
  """``dL/dW [kh, kw, C_in, C_out]`` of an NHWC convolution as one matmul per filter tap.

  Tap ``(i, j)`` is ``X_ij^T @ G``: ``X_ij [positions, C_in]`` the input
  positions that tap reads (a strided window of the padded input), ``G
  [positions, C_out]`` the output gradient.
  """
  (top, bottom), (left, right) = padding
  batch, out_height, out_width, out_channels = g.shape
  padded = lax.pad(x, jnp.zeros((), x.dtype), ((0, 0, 0), (top, bottom, 0), (left, right, 0), (0, 0, 0)))
  flat_g = g.reshape(-1, out_channels)
  taps = []
  for i in range(kernel_size[0]):
    for j in range(kernel_size[1]):
      window = lax.slice(padded, (0, i, j, 0),
                         (batch, i + (out_height - 1) * strides[0] + 1, j + (out_width - 1) * strides[1] + 1,
                          x.shape[3]), (1,) + tuple(strides) + (1,))
      taps.append(lax.dot_general(window.reshape(-1, x.shape[3]), flat_g, (((0,), (0,)), ((), ()))))
  return jnp.stack(taps).reshape(kernel_size + (x.shape[3], out_channels))


def _backward(strides, padding, residuals, g):
  x, w = residuals
  _, input_gradient = jax.vjp(lambda x: _xla_conv(x, w, strides, padding), x)
  banded = tuple(strides) == (1, 1) and _several_bands(g.shape)
  filter_gradient = banded_filter_gradient if banded else tap_filter_gradient
  return input_gradient(g)[0], filter_gradient(x, g, w.shape[:2], strides, padding).astype(w.dtype)


_conv_with_split_filter_gradient.defvjp(_forward, _backward)


def _output_shape(lhs_shape, rhs_shape, strides, padding) -> Tuple[int, int, int, int]:
  """``[B, H_out, W_out, C_out]`` of an NHWC convolution without dilation."""
  sizes = [(size + low + high - kernel) // stride + 1
           for size, kernel, stride, (low, high) in zip(lhs_shape[1:3], rhs_shape[:2], strides, padding)]
  return (lhs_shape[0], sizes[0], sizes[1], rhs_shape[3])


def _several_bands(output_shape) -> bool:
  """Whether the filter gradient of a convolution with this output shape spans more than one band."""
  return band_rows(output_shape) < output_shape[1]


def _wide(lhs) -> bool:
  """Whether a convolution of one band takes :func:`tap_filter_gradient`: at least ``TAP_MIN_CHANNELS`` input
  channels (the module docstring)."""
  return lhs.shape[3] >= TAP_MIN_CHANNELS


def materialize_cotangent(x):
  """``x`` itself, whose gradient XLA:CPU computes once, before the layers that read it.

  A Winograd convolution's backward pass reads each element of its output
  gradient into nine of its 16 products' inputs, and XLA:CPU fuses an
  elementwise producer of that gradient into every reader, computing it
  there again. For a ReLU's mask that costs little.
  RetinaNet's focal loss (about 60 operations per element, 720 channels per
  position) feeds its class convolution: at 512x512 batch 2 that
  convolution's backward pass took 0.28 s of operation time per train step
  with the loss's gradient computed in its readers, and 0.13 s with it
  materialized first (a jax.profiler trace of each; the whole step, paired
  with ``benchmarks/paired_revision.py``: -0.088 s, and -0.354 s at
  800x1344). The gradient
  passes through a ``lax.cond``, which XLA fuses nothing across
  (``lax.optimization_barrier`` is removed by XLA:CPU before fusion; a cond
  whose branches are equal is folded away). Its other branch, taken when the
  gradient's first element is NaN, makes all of it NaN; such a NaN comes from
  a non-finite loss, whose step the train loop stops or skips. Elsewhere than
  ``MATMUL_PLATFORMS`` (where no Winograd runs) ``x`` is returned as is.
  """
  if jax.default_backend() not in MATMUL_PLATFORMS:
    return x
  return _gradient_through_cond(x)


@jax.custom_vjp
def _gradient_through_cond(x):
  return x


def _gradient_through_cond_forward(x):
  return x, None


def _gradient_through_cond_backward(_, g):
  return (lax.cond(jnp.isnan(g.reshape(-1)[0]), lambda g: g * jnp.nan, lambda g: g, g),)


_gradient_through_cond.defvjp(_gradient_through_cond_forward, _gradient_through_cond_backward)


@contextlib.contextmanager
def direct_convolutions():
  """Inside, :func:`conv_general_dilated` traces no Winograd convolution.

  XLA's cost analysis then counts every convolution at the direct
  convolution's FLOPs (2 x C_in x C_out per filter tap that falls inside the
  map, summed over the output positions), the count papers and
  ``libra_jax.tools.summary`` give, where Winograd's programs do 2.25x fewer
  for the 3x3 convolutions it takes. JAX's trace caches do not see this
  switch: a function traced before keeps its trace inside, and one traced
  inside keeps its direct trace after. Trace a new function inside, or clear
  JAX's caches on the way in and out (``benchmarks/run.py``'s
  ``direct_flops``).
  """
  token = _WINOGRAD_ALLOWED.set(False)
  try:
    yield
  finally:
    _WINOGRAD_ALLOWED.reset(token)


def _winograd_applies(lhs, rhs, strides, padding, positions: int) -> bool:
  """Whether :func:`winograd_conv3x3` computes this NHWC convolution of ``positions`` output positions (batch x rows x
  width, over every map it is applied to): 3x3, stride 1, float32, above both thresholds, no negative padding (a
  crop, which ``jnp.pad`` does not do)."""
  return (_WINOGRAD_ALLOWED.get() and rhs.shape[:2] == (3, 3) and tuple(strides) == (1, 1)
          and lhs.dtype == rhs.dtype == jnp.float32 and lhs.shape[3] >= WINOGRAD_MIN_CHANNELS
          and positions >= WINOGRAD_MIN_POSITIONS and min(min(p) for p in padding) >= 0)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count: int = 1, batch_group_count: int = 1,
                         precision=None, preferred_element_type=None):
  """``lax.conv_general_dilated``, by matmuls, Winograd or banded filter gradients where they apply (module doc)."""
  plain = (feature_group_count == 1 and batch_group_count == 1 and precision is None
           and preferred_element_type is None and lhs.ndim == 4 and not isinstance(padding, str)
           and all(d == 1 for d in (lhs_dilation or (1, 1))) and all(d == 1 for d in (rhs_dilation or (1, 1)))
           and lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
           == lax.conv_dimension_numbers(lhs.shape, rhs.shape, NHWC)
           and jax.default_backend() in MATMUL_PLATFORMS)
  if plain and rhs.shape[:2] == (1, 1) and all(tuple(p) == (0, 0) for p in padding):
    return pointwise_conv(lhs, rhs, tuple(window_strides))
  output_shape = _output_shape(lhs.shape, rhs.shape, window_strides, padding) if plain else None
  if plain and _winograd_applies(lhs, rhs, window_strides, padding, math.prod(output_shape[:3])):
    lhs, rhs = vary_alike(lhs, rhs), vary_alike(rhs, lhs)
    return winograd_conv3x3(lhs, rhs, tuple(tuple(p) for p in padding))
  if plain and (_several_bands(output_shape) or _wide(lhs)):
    lhs, rhs = vary_alike(lhs, rhs), vary_alike(rhs, lhs)
    return _conv_with_split_filter_gradient(lhs, rhs, tuple(window_strides), tuple(tuple(p) for p in padding))
  return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
                                  feature_group_count, batch_group_count, precision, preferred_element_type)


def conv_maps(xs: Sequence[jnp.ndarray], w, padding: Sequence[Tuple[int, int]]) -> Tuple[jnp.ndarray, ...]:
  """One stride-1 NHWC convolution filter ``w [kh, kw, C_in, C_out]`` applied to each map of ``xs`` (``[B, H, W,
  C_in]``, any batch and size): the tuple of :func:`conv_general_dilated` of each.

  Where Winograd applies to the maps' output positions together (a 3x3
  float32 filter on the CPU, ``WINOGRAD_MIN_CHANNELS``, ``WINOGRAD_MIN_POSITIONS``
  over all maps), :func:`winograd_conv3x3_maps` computes them all with one
  set of matmuls, so maps too small for Winograd alone get it too.
  """
  padding = tuple(tuple(p) for p in padding)
  positions = sum(math.prod(_output_shape(x.shape, w.shape, (1, 1), padding)[:3]) for x in xs)
  if (jax.default_backend() in MATMUL_PLATFORMS and all(x.ndim == 4 and x.dtype == xs[0].dtype for x in xs)
      and _winograd_applies(xs[0], w, (1, 1), padding, positions)):
    w = functools.reduce(vary_alike, xs, w)
    return winograd_conv3x3_maps(tuple(vary_alike(x, w) for x in xs), w, padding)
  return tuple(conv_general_dilated(x, w, (1, 1), padding, dimension_numbers=NHWC) for x in xs)

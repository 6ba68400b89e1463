"""RoIAlign with the adaptive sample grid (mmcv's ``sampling_ratio=0``), static shapes.

With ``sampling_ratio=0`` each RoI chooses its own grid: ``g_y = ceil(bin_h)``
samples per bin down and ``g_x = ceil(bin_w)`` across, where ``bin_h`` and
``bin_w`` are the bin's size in map pixels. The number of samples per RoI is
therefore data-dependent, and a static-shape implementation cannot loop over
samples. It loops over the *pixels* a bin touches instead:

- Along one axis the samples of a bin are ``bin / g <= 1`` pixel apart, so
  their bilinear taps cover at most ``g + 1`` consecutive pixels, starting at
  the lower tap ``p0`` of the bin's first sample. A pixel's weight is the sum of
  the bilinear weights of the samples within one pixel of it; with samples at
  least half a pixel apart (or a single one) that is at most six candidate
  samples, found in closed form and then recomputed with the reference's own
  arithmetic, so the weights are the reference's.
- A bin's value is separable: ``sum_{p, q} w_y(p) w_x(q) F[p, q]``. Each RoI
  has ``n_y * n_x`` such pixel pairs per bin (``n`` = the most pixels any of its
  bins touches along the axis), numbered ``k -> (k // n_x, k % n_x)``. Every
  step of a ``while_loop`` gathers pair ``k`` of every bin of every RoI, as one
  ``[K, out_h, out_w, C]`` slice, until the largest ``n_y * n_x`` is done.

- A loop over every RoI would run as long as the largest RoI needs (a few
  dozen pairs for long, thin proposals) while most need a handful. So the RoIs
  are ordered by their pairs (an argsort of ``K`` integers) and pooled in
  groups of at most ``GROUP_SIZE`` (``lax.map``), each group's loop ending at
  its own largest grid; the results go back to the RoIs' order. On 512
  random RoIs at 800x1216 (``benchmarks/bench_roi_align.py``, 2026-12-03)
  this took the forward pass from 136 to 93 ms and forward plus backward
  from 260 to 184 ms; Faster R-CNN R-50 inference at 512x512 batch 2 (1,000
  proposals per image) went from 2.0 to 1.4 s per step. Each RoI's sum is
  the same, term for term.
- Each step of a loop finds the pixels and weights of both axes' bins in
  one elementwise pass (:class:`BinGrids`: row and column bins side by side,
  the candidate samples added one by one). Two passes with a candidate axis
  and a reduction over it had made six small XLA operations per step, each
  tens of microseconds on the CPU whatever its size, together as long as
  the step's gather. Both versions' steps in turns in one process
  (2026-12-05, median of the rounds' differences, 8-10 rounds, every round
  faster): Faster R-CNN R-50 inference at 512x512 batch 2 0.887 -> 0.822 s,
  Libra Faster R-CNN's at 800x1344 1.762 -> 1.590 s and its train step at
  512x512 batch 2 2.864 -> 2.701 s; Faster R-CNN's train step at 800x1344
  (fewer, larger RoIs) moved by -0.038 s, within noise.

So the shapes are static, each loop's trip count is its group's largest RoI
grid (16 taps are what ``sampling_ratio=2`` gathers), and nothing is bounded
by assumption: any RoI, inside the map or not, is exact.
The loop's trip count is data-dependent, so the backward pass is a custom VJP:
the same loop scatter-adds the cotangent into the features. The RoIs get no
gradient (as in mmcv).
"""

import functools
from typing import NamedTuple, Tuple

import jax
import jax.numpy as jnp
import numpy as np

# Candidate samples per pixel: every sample within one pixel of it (see the module docstring).
_CANDIDATES = 6
# RoIs per pooling loop (see the module docstring): 64 to 256 measured alike.
GROUP_SIZE = 128
# Pixel pairs per step of the pooling loops, in pair order. Pairs past a group's last contribute exact
# zeros, so any value adds the same terms in the same order (XLA may round the last bit differently). One
# on the CPU, where each pair is a large gather and the loop's steps cost nothing. On a GPU each step also
# waits for the loop's condition on the host: Faster R-CNN R-50 at 800x1344 batch 2 ran 660 pair steps
# forward and as many backward in a train step, and Libra Faster R-CNN's larger random-weight proposals
# 944, which matches its 7.6 ms (16%) longer step on an H200 (2026-12-04; 17 ms longer inference, 816
# steps against 421). Larger values await a GPU measurement (benchmarks/bench_roi_align.py).
PAIRS_PER_STEP = 1


class AxisGrid(NamedTuple):
  """The adaptive sample grid of every RoI along one axis (y or x); shapes ``[K]`` unless noted.

  Attributes:
    grid_starts: ``[K, bins]`` float32 start of each bin in map pixels
      (the RoI's start, scaled and shifted, plus whole bins).
    bin_size: float32 bin length in map pixels.
    samples: int32 samples per bin, ``ceil(bin_size)`` (0 or less: none).
    extent: float32 size of the map along the axis.
    first_pixel: ``[K, bins]`` int32 lowest pixel each bin touches.
    num_pixels: int32 most pixels any bin of the RoI touches (at least 1).
  """
  grid_starts: jnp.ndarray
  bin_size: jnp.ndarray
  samples: jnp.ndarray
  extent: jnp.ndarray
  first_pixel: jnp.ndarray
  num_pixels: jnp.ndarray


def _sample_coordinate(grid_start, bin_size, samples, index):
  """Coordinate of sample ``index`` of a bin starting at ``grid_start``, with mmcv's operation order."""
  return grid_start + (index.astype(jnp.float32) + 0.5) * bin_size / samples.astype(jnp.float32)


def bilinear_taps(coord, extent):
  """``(inside, low, high, frac)`` of samples at ``coord`` on an axis of ``extent`` pixels (RoIAlign's rules)."""
  inside = (coord >= -1.0) & (coord <= extent)
  coord = jnp.maximum(coord, 0.0)
  low = jnp.floor(coord)
  at_edge = low >= extent - 1.0
  low = jnp.where(at_edge, extent - 1.0, low)
  high = jnp.where(at_edge, low, low + 1.0)
  frac = jnp.where(at_edge, 0.0, coord - low)
  return inside, low.astype(jnp.int32), high.astype(jnp.int32), frac


def axis_grid(start, end, extent, num_bins: int, aligned: bool) -> AxisGrid:
  """The adaptive grid along one axis for RoIs spanning ``[start, end]`` map pixels (``[K]`` float32 each)."""
  length = end - start
  if not aligned:
    length = jnp.maximum(length, 1.0)
  bin_size = length / num_bins
  samples = jnp.ceil(bin_size).astype(jnp.int32)
  grid_starts = start[:, None] + np.arange(num_bins, dtype=np.float32) * bin_size[:, None]
  some = jnp.maximum(samples, 1)[:, None]
  _, first, _, _ = bilinear_taps(_sample_coordinate(grid_starts, bin_size[:, None], some, jnp.zeros_like(some)),
                                  extent[:, None])
  _, _, last, _ = bilinear_taps(_sample_coordinate(grid_starts, bin_size[:, None], some, some - 1),
                                 extent[:, None])
  num_pixels = jnp.where(samples > 0, jnp.max(last - first, axis=1) + 1, 1)
  return AxisGrid(grid_starts, bin_size, samples, extent, first, num_pixels)


class BinGrids(NamedTuple):
  """The axis grids of every bin of ``K`` RoIs, rows then columns, side by side: ``[K, out_h + out_w]`` each.

  Column ``j`` holds the grid of row bin ``j`` (``j < out_h``) or of column
  bin ``j - out_h``; the per-RoI fields of :class:`AxisGrid` are repeated over
  the bins of their axis, so that one elementwise computation serves both axes.
  """
  grid_starts: jnp.ndarray
  bin_size: jnp.ndarray
  samples: jnp.ndarray
  extent: jnp.ndarray
  first_pixel: jnp.ndarray


def bin_grids(y: AxisGrid, x: AxisGrid) -> BinGrids:
  """The grids of ``y`` (``out_h`` bins) and ``x`` (``out_w`` bins) as one :class:`BinGrids`."""

  def side_by_side(y_field, x_field):
    if y_field.ndim == 1:
      y_field = jnp.broadcast_to(y_field[:, None], y.grid_starts.shape)
      x_field = jnp.broadcast_to(x_field[:, None], x.grid_starts.shape)
    return jnp.concatenate([y_field, x_field], axis=1)

  return BinGrids(*(side_by_side(getattr(y, name), getattr(x, name)) for name in BinGrids._fields))


def pixel_weights(grids: BinGrids, offset) -> Tuple[jnp.ndarray, jnp.ndarray]:
  """Pixel ``first_pixel + offset`` of every bin and its weight in the bin's average along the bin's axis.

  Args:
    grids: the grids of ``K`` RoIs' ``n`` bins.
    offset: ``[K, n]`` int32 pixel offset from each bin's first pixel.

  Returns:
    ``(pixels, weights)``, both ``[K, n]``: int32 pixels clamped into the
    map, and float32 weights (the sum of the bilinear weights of the bin's
    samples at that pixel, divided by the samples per bin; 0 where no sample
    reads the pixel).
  """
  pixels = grids.first_pixel + offset
  grid_starts = grids.grid_starts
  samples = jnp.maximum(grids.samples, 1)
  bin_size = grids.bin_size
  # The first sample within one pixel below `pixels`, less one for rounding, kept inside [0, samples - 1].
  spacing = jnp.where(bin_size > 0, bin_size / samples.astype(jnp.float32), 1.0)
  estimate = jnp.floor((pixels.astype(jnp.float32) - 1.0 - grid_starts) / spacing - 0.5) - 1.0
  first = jnp.clip(estimate, 0.0, (samples - 1).astype(jnp.float32)).astype(jnp.int32)
  # The candidates one by one, summed elementwise: one small fusion, where a candidate axis and a reduction over
  # it made three (at 125 RoIs each small fusion costs tens of microseconds on the CPU, whatever its size).
  weights = jnp.zeros(pixels.shape, jnp.float32)
  for candidate in range(_CANDIDATES):
    index = first + candidate
    inside, low, high, frac = bilinear_taps(_sample_coordinate(grid_starts, bin_size, samples, index), grids.extent)
    counted = inside & (index < grids.samples)
    weights = weights + jnp.where(counted & (low == pixels), 1.0 - frac, 0.0) + jnp.where(
        counted & (high == pixels), frac, 0.0)
  weights = weights / samples.astype(jnp.float32)
  return jnp.minimum(pixels, grids.extent.astype(jnp.int32) - 1), weights


class _Plan(NamedTuple):
  """What the pooling loop needs: the two axis grids (alone and side by side) and where each RoI's map lies in
  the flat features."""
  y: AxisGrid
  x: AxisGrid
  bins: BinGrids
  row_offsets: jnp.ndarray
  row_widths: jnp.ndarray


def _num_pairs(plan: _Plan) -> jnp.ndarray:
  """Scalar int32: the most pixel pairs any bin of any RoI reads."""
  return jnp.max(plan.y.num_pixels * plan.x.num_pixels)


def _pair_indices_and_weights(plan: _Plan, pair):
  """Flat-feature row and weight of pixel pair ``pair`` (int32 scalar) of every bin: ``[K, out_h, out_w]`` each."""
  out_h, out_w = plan.y.grid_starts.shape[1], plan.x.grid_starts.shape[1]
  dy = pair // plan.x.num_pixels
  dx = pair % plan.x.num_pixels
  num_rois = dy.shape[0]
  offsets = jnp.concatenate([jnp.broadcast_to(dy[:, None], (num_rois, out_h)),
                             jnp.broadcast_to(dx[:, None], (num_rois, out_w))], axis=1)
  pixels, weights = pixel_weights(plan.bins, offsets)
  rows, cols = pixels[:, :out_h], pixels[:, out_h:]
  y_weights, x_weights = weights[:, :out_h], weights[:, out_h:]
  indices = (plan.row_offsets[:, None, None] + rows[:, :, None] * plan.row_widths[:, None, None] + cols[:, None, :])
  return indices, y_weights[:, :, None] * x_weights[:, None, :]


def _pool(flat_features, plan: _Plan):
  """Forward pass of the RoIs of ``plan``: ``[K, out_h, out_w, C]`` in float32 (or wider)."""
  accum_dtype = jnp.promote_types(flat_features.dtype, jnp.float32)

  def pair_values(pair):
    indices, weights = _pair_indices_and_weights(plan, pair)
    values = flat_features.at[indices].get(mode="promise_in_bounds")
    return values.astype(accum_dtype) * weights[..., None].astype(accum_dtype)

  def body(carry):
    pair, total = carry
    for step in range(PAIRS_PER_STEP):
      total = total + pair_values(pair + step)
    return pair + PAIRS_PER_STEP, total

  num_pairs = _num_pairs(plan)
  # Pair 0 starts the sum (every RoI has it), so that the carry has the features' per-device type under shard_map.
  first = jnp.minimum(num_pairs, 0)
  _, pooled = jax.lax.while_loop(lambda carry: carry[0] < num_pairs, body, (first + 1, pair_values(first)))
  return pooled


def _add_pairs(grad, plan: _Plan, cotangent):
  """Backward pass of the RoIs of ``plan``: ``grad [N, C]`` plus their ``cotangent [K, out_h, out_w, C]`` scattered
  back onto the pixels they read."""

  def add_pair(grad, pair):
    indices, weights = _pair_indices_and_weights(plan, pair)
    return grad.at[indices].add(cotangent * weights[..., None].astype(grad.dtype), mode="promise_in_bounds")

  def body(carry):
    pair, grad = carry
    for step in range(PAIRS_PER_STEP):
      grad = add_pair(grad, pair + step)
    return pair + PAIRS_PER_STEP, grad

  num_pairs = _num_pairs(plan)
  first = jnp.minimum(num_pairs, 0)
  _, grad = jax.lax.while_loop(lambda carry: carry[0] < num_pairs, body, (first + 1, add_pair(grad, first)))
  return grad


def _group_shape(num_rois: int) -> Tuple[int, int]:
  """``(groups, RoIs per group)``: the fewest groups of at most ``GROUP_SIZE`` RoIs, all of one size."""
  groups = max(-(-num_rois // GROUP_SIZE), 1)
  return groups, -(-num_rois // groups)


def _grouped(plan: _Plan):
  """``(plan, order)``: the RoIs of ``plan`` ordered by their pixel pairs, as ``[groups, size, ...]`` arrays
  (padded with copies of the RoI of fewest pairs), and that order (``[K]``)."""
  num_rois = plan.row_offsets.shape[0]
  groups, size = _group_shape(num_rois)
  order = jnp.argsort(plan.y.num_pixels * plan.x.num_pixels)
  padded = jnp.concatenate([order, jnp.broadcast_to(order[:1], (groups * size - num_rois,))])
  return jax.tree.map(lambda a: a[padded].reshape((groups, size) + a.shape[1:]), plan), order


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _pool_with_vjp(feature_type: jax.ShapeDtypeStruct, flat_features, plan: _Plan):
  num_rois = plan.row_offsets.shape[0]
  if _group_shape(num_rois)[0] == 1:
    return _pool(flat_features, plan).astype(feature_type.dtype)
  grouped, order = _grouped(plan)
  pooled = jax.lax.map(functools.partial(_pool, flat_features), grouped)
  pooled = pooled.reshape((-1,) + pooled.shape[2:])[:num_rois]
  inverse = jnp.zeros_like(order).at[order].set(jnp.arange(num_rois, dtype=order.dtype))
  return pooled[inverse].astype(feature_type.dtype)


def _pool_forward(feature_type, flat_features, plan: _Plan):
  return _pool_with_vjp(feature_type, flat_features, plan), plan


def _pool_backward(feature_type, plan, cotangent):
  grad = jnp.zeros(feature_type.shape, jnp.promote_types(feature_type.dtype, jnp.float32))
  cotangent = cotangent.astype(grad.dtype)
  num_rois = plan.row_offsets.shape[0]
  groups, size = _group_shape(num_rois)
  if groups == 1:
    return _add_pairs(grad, plan, cotangent).astype(feature_type.dtype), None  # the RoIs get no gradient
  grouped, order = _grouped(plan)
  # The padding rows repeat a RoI: their cotangent is zero.
  cotangent = jnp.concatenate([cotangent[order], jnp.zeros((groups * size - num_rois,) + cotangent.shape[1:],
                                                           cotangent.dtype)])
  cotangent = cotangent.reshape((groups, size) + cotangent.shape[1:])
  groups = jax.tree.map(lambda a: a[1:], (grouped, cotangent))
  # The first group outside the scan, so that the carry has the cotangent's per-device type under shard_map.
  start = _add_pairs(grad, *jax.tree.map(lambda a: a[0], (grouped, cotangent)))
  grad, _ = jax.lax.scan(lambda grad, group: (_add_pairs(grad, *group), None), start, groups)
  return grad.astype(feature_type.dtype), None


_pool_with_vjp.defvjp(_pool_forward, _pool_backward)


def adaptive_roi_bins(flat_features, scaled_rois, heights, widths, row_widths, row_offsets,
                      output_size: Tuple[int, int], aligned: bool) -> jnp.ndarray:
  """RoIAlign with mmcv's adaptive grid of each RoI from its own map inside ``flat_features``.

  Args:
    flat_features: ``[N, C]``: row-major flattened ``[H, W, C]`` maps,
      concatenated along the first axis.
    scaled_rois: ``[K, 4]`` float32 xyxy RoIs in their map's pixels, already
      shifted by the alignment offset.
    heights, widths: ``[K]`` float32 extent of each RoI's map that sampling sees.
    row_widths: ``[K]`` int32 row length of each RoI's map in ``flat_features``.
    row_offsets: ``[K]`` int32 first row of each RoI's map in ``flat_features``.
    output_size: ``(out_h, out_w)``.
    aligned: when False, RoIs are at least one map pixel long.

  Returns:
    ``[K, out_h, out_w, C]`` in the dtype of ``flat_features``; the gradient
    flows to the features only.
  """
  out_h, out_w = output_size
  scaled_rois = jax.lax.stop_gradient(scaled_rois)
  y = axis_grid(scaled_rois[:, 1], scaled_rois[:, 3], heights, out_h, aligned)
  x = axis_grid(scaled_rois[:, 0], scaled_rois[:, 2], widths, out_w, aligned)
  plan = _Plan(y=y, x=x, bins=bin_grids(y, x),
               row_offsets=row_offsets, row_widths=row_widths)
  return _pool_with_vjp(jax.ShapeDtypeStruct(flat_features.shape, flat_features.dtype), flat_features, plan)


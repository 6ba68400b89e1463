"""RoIAlign on one feature map or on an FPN pyramid, as gathers.

Semantics are those of the classic RoIAlign ("avg" mode of mmcv/torchvision).
With a fixed ``sampling_ratio`` every output bin averages
``sampling_ratio ** 2`` bilinear samples placed on a regular grid inside the
bin. Each sample reads its four neighbouring feature pixels by gathering rows
of the flattened ``[H * W, C]`` map(s), so the cost is proportional to the
number of samples and never to the size of the map, and the gradient with
respect to the features is a scatter-add. The RoIs also get a gradient,
through the bilinear weights; mmcv's op gives them none, so callers that want
its behaviour apply ``jax.lax.stop_gradient`` to them.

``sampling_ratio=0`` is mmcv's adaptive grid (``ceil(bin size)`` samples per
bin along each axis, chosen per RoI), implemented in ``adaptive_roi_align``;
there the RoIs get no gradient.

Boxes are xyxy in absolute image pixels (width ``x2 - x1``); feature maps are
``[H, W, C]`` (NHWC for one image; vmap for a batch). All shapes are static,
so the functions work under ``jit``, ``vmap`` and ``grad``.
"""

from typing import Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

from libra_jax.ops.adaptive_roi_align import adaptive_roi_bins, bilinear_taps

ArrayLike = Union[jnp.ndarray, np.ndarray]
OutputSize = Union[int, Tuple[int, int]]


def _pair(output_size: OutputSize) -> Tuple[int, int]:
  """``output_size`` as ``(out_h, out_w)`` positive Python ints."""
  if isinstance(output_size, (int, np.integer)):
    size = (int(output_size), int(output_size))
  else:
    size = tuple(int(s) for s in output_size)
  if len(size) != 2 or min(size) < 1:
    raise ValueError(f"output_size must be a positive int or (h, w) pair, got {output_size}")
  return size


def _check_sampling_ratio(sampling_ratio: int) -> int:
  """``sampling_ratio`` as a Python int: at least 1, or 0 for the adaptive grid."""
  if int(sampling_ratio) != sampling_ratio or sampling_ratio < 0:
    raise ValueError(f"sampling_ratio must be an int >= 1, or 0 for mmcv's adaptive grid; got {sampling_ratio}")
  return int(sampling_ratio)


def _axis_taps(start, end, extent, num_bins, sampling_ratio, aligned):
  """Bilinear taps along one axis (y or x) of every sample of every RoI.

  A bin's sample grid is the product of its y and x samples, and so are the
  out-of-map test and the bilinear weights, so each axis is handled on its own
  and the caller combines them.

  Args:
    start, end: ``[K]`` float32 RoI extent on this axis in map pixels (already
      scaled and shifted by the alignment offset).
    extent: ``[K]`` float32 size of the map on this axis (H or W) in pixels.
    num_bins: output bins on this axis.
    sampling_ratio: samples per bin on this axis.
    aligned: when False, RoIs are at least one pixel long.

  Returns:
    ``(taps, weights)``, both ``[2 * sampling_ratio, K, num_bins]``: for the
    ``i``-th sample of each bin, ``taps[i]`` (int32) is its lower neighbour
    pixel and ``taps[sampling_ratio + i]`` its upper one. The float32
    weights are the bilinear weights divided by ``sampling_ratio``, so that
    summing over the taps of both axes averages the bin's samples; they are
    zero for a sample outside ``[-1, extent]``.
  """
  length = end - start
  if not aligned:
    length = jnp.maximum(length, 1.0)
  bin_size = (length / num_bins)[None, :, None]
  bins = np.arange(num_bins, dtype=np.float32)[None, None, :]
  sub_offsets = np.arange(sampling_ratio, dtype=np.float32)[:, None, None] + 0.5
  coord = start[None, :, None] + bins * bin_size + sub_offsets * bin_size / sampling_ratio

  inside, low, high, frac = bilinear_taps(coord, extent[None, :, None])
  scale = jnp.where(inside, 1.0 / sampling_ratio, 0.0)
  return jnp.concatenate([low, high]), jnp.concatenate([(1.0 - frac) * scale, frac * scale])


def _gather_roi_bins(flat_features, rois, heights, widths, row_widths, row_offsets, spatial_scales,
                     output_size, sampling_ratio, aligned):
  """RoIAlign of each RoI from its own map inside ``flat_features``.

  Each output bin is a weighted sum of ``(2 * sampling_ratio) ** 2`` feature
  pixels (four bilinear corners per sample). A ``scan`` over these
  taps gathers one ``[K, out_h, out_w, C]`` slice per step and accumulates it,
  so neither pass holds all taps at once (the forward pass would otherwise
  keep ``16 * K * out_h * out_w * C`` values for ``sampling_ratio = 2``), and
  the backward pass scatter-adds into a single feature-sized cotangent.

  Args:
    flat_features: ``[N, C]``: one or more row-major flattened ``[H, W, C]``
      maps, concatenated along the first axis.
    rois: ``[K, 4]`` xyxy in image pixels.
    heights, widths: ``[K]`` float32 extent of each RoI's map that sampling
      sees (H, W), where its borders are: the whole map, or less.
    row_widths: ``[K]`` int32 row length (W) of each RoI's map in ``flat_features``.
    row_offsets: ``[K]`` int32 first row of each RoI's map in
      ``flat_features``.
    spatial_scales: ``[K]`` float32 map pixels per image pixel of each RoI's
      map (1 / stride).
    output_size: ``(out_h, out_w)``.
    sampling_ratio: samples per bin along each axis, >= 1; 0 for the
      adaptive grid.
    aligned: shift by half a pixel (pixel centres at ``i + 0.5``).

  Returns:
    ``[K, out_h, out_w, C]`` in the dtype of ``flat_features``.
  """
  out_h, out_w = output_size
  num_rois = rois.shape[0]
  offset = 0.5 if aligned else 0.0
  scaled = jnp.asarray(rois, jnp.float32) * spatial_scales[:, None] - offset
  if sampling_ratio == 0:
    return adaptive_roi_bins(flat_features, scaled, heights, widths, row_widths, row_offsets, output_size, aligned)
  y_taps, y_weights = _axis_taps(scaled[:, 1], scaled[:, 3], heights, out_h,
                                 sampling_ratio, aligned)
  x_taps, x_weights = _axis_taps(scaled[:, 0], scaled[:, 2], widths, out_w,
                                 sampling_ratio, aligned)

  # All (y tap, x tap) pairs: [T = (2 * sampling_ratio) ** 2, K, out_h, out_w].
  row_starts = y_taps * row_widths[:, None] + row_offsets[:, None]
  indices = row_starts[:, None, :, :, None] + x_taps[None, :, :, None, :]
  weights = y_weights[:, None, :, :, None] * x_weights[None, :, :, None, :]
  num_taps = (2 * sampling_ratio) ** 2
  indices = indices.reshape(num_taps, num_rois, out_h, out_w)
  # Low-precision features are weighted and summed in float32.
  accum_dtype = jnp.promote_types(flat_features.dtype, jnp.float32)
  weights = weights.reshape(num_taps, num_rois, out_h, out_w).astype(accum_dtype)

  def weighted_tap(tap_indices, tap_weights):
    values = flat_features.at[tap_indices].get(mode="promise_in_bounds")
    return values.astype(accum_dtype) * tap_weights[..., None]

  def accumulate(total, tap):
    return total + weighted_tap(*tap), None

  # The first tap starts the sum (rather than zeros) so that the carry has the
  # features' per-device type under shard_map.
  pooled, _ = jax.lax.scan(accumulate, weighted_tap(indices[0], weights[0]), (indices[1:], weights[1:]))
  return pooled.astype(flat_features.dtype)


def roi_align(features: ArrayLike, rois: ArrayLike, output_size: OutputSize,
              spatial_scale: float, sampling_ratio: int = 2,
              aligned: bool = True) -> jnp.ndarray:
  """RoIAlign of ``rois`` on one feature map.

  For a bin of a RoI, ``sampling_ratio ** 2`` points are placed at
  ``start + (bin + (i + 0.5) / sampling_ratio) * bin_size`` along each axis,
  where ``start = roi * spatial_scale - 0.5`` (``- 0`` when not ``aligned``)
  and ``bin_size = roi_size * spatial_scale / output_size``; the bin is the
  mean of their bilinear samples. A sample farther than one pixel outside the
  map is 0; one between -1 and 0 reads the border (it is clamped to 0), and
  one past the last pixel centre reads the last row/column.

  Args:
    features: ``[H, W, C]`` feature map of one image, any float dtype.
    rois: ``[K, 4]`` float xyxy boxes in image pixels.
    output_size: bins per side, an int or an ``(out_h, out_w)`` pair.
    spatial_scale: map pixels per image pixel (1 / stride), e.g. 0.25.
    sampling_ratio: samples per bin along each axis, an int >= 1; 0 for
      mmcv's adaptive grid, ``ceil(roi_size * spatial_scale / output_size)``
      samples per bin along each axis for each RoI.
    aligned: shift the box by half a pixel so that pixel centres sit at
      ``i + 0.5`` (the detectron2/mmcv default); when False, RoIs are at least
      one map pixel wide and tall (the original RoIAlign).

  Returns:
    ``[K, out_h, out_w, C]`` in the dtype of ``features`` (the weighted sums
    of bfloat16/float16 features are accumulated in float32).

  Raises:
    ValueError: on a negative or non-integer ``sampling_ratio`` or a bad
      ``output_size``.
  """
  output_size = _pair(output_size)
  sampling_ratio = _check_sampling_ratio(sampling_ratio)
  features = jnp.asarray(features)
  rois = jnp.asarray(rois)
  height, width, channels = features.shape
  num_rois = rois.shape[0]
  return _gather_roi_bins(
      features.reshape(height * width, channels), rois,
      heights=jnp.full((num_rois,), height, jnp.float32),
      widths=jnp.full((num_rois,), width, jnp.float32),
      row_widths=jnp.full((num_rois,), width, jnp.int32),
      row_offsets=jnp.zeros((num_rois,), jnp.int32),
      spatial_scales=jnp.full((num_rois,), spatial_scale, jnp.float32),
      output_size=output_size, sampling_ratio=sampling_ratio, aligned=aligned)


def map_roi_levels(rois: ArrayLike, num_levels: int, finest_scale: float = 56) -> jnp.ndarray:
  """FPN level of each RoI: mmdetection's ``SingleRoIExtractor.map_roi_levels``.

  ``level = floor(log2(sqrt(w * h) / finest_scale + 1e-6))`` clamped to
  ``[0, num_levels - 1]``: with ``finest_scale = 56``, scales below 112 go to
  level 0, [112, 224) to 1, [224, 448) to 2 and the rest to 3.

  Args:
    rois: ``[..., 4]`` float xyxy boxes in image pixels. Negative widths and
      heights count as 0, so degenerate boxes go to level 0.
    num_levels: number of pyramid levels.
    finest_scale: scale (sqrt of area, in pixels) of the level-0 boxes.

  Returns:
    ``[...]`` int32 level indices.
  """
  rois = jnp.asarray(rois, jnp.float32)
  width = jnp.maximum(rois[..., 2] - rois[..., 0], 0.0)
  height = jnp.maximum(rois[..., 3] - rois[..., 1], 0.0)
  scale = jnp.sqrt(width * height)
  levels = jnp.floor(jnp.log2(scale / finest_scale + 1e-6))
  return jnp.clip(levels, 0, num_levels - 1).astype(jnp.int32)


def multilevel_roi_align(features: Sequence[ArrayLike], rois: ArrayLike,
                         output_size: OutputSize, strides: Sequence[float],
                         sampling_ratio: int = 2, finest_scale: float = 56,
                         aligned: bool = True, valid_size: ArrayLike = None) -> jnp.ndarray:
  """RoIAlign of each RoI of one image on the pyramid level chosen by ``map_roi_levels``.

  Args:
    features: sequence of ``[H_l, W_l, C]`` maps of one image, finest first
      (e.g. P2..P5), all with the same ``C`` and dtype.
    rois: ``[K, 4]`` float xyxy boxes in image pixels.
    output_size: bins per side, an int or an ``(out_h, out_w)`` pair.
    strides: image pixels per map pixel of each level, e.g. (4, 8, 16, 32).
    sampling_ratio: samples per bin along each axis, an int >= 1; 0 for
      the adaptive grid (see ``roi_align``).
    finest_scale: see ``map_roi_levels``.
    aligned: see ``roi_align``.
    valid_size: optional ``[2]`` (height, width) in image pixels of the part
      of the image the maps cover, e.g. the image's own padded area inside a
      larger bucket: level ``l`` then ends at ``ceil(valid_size / stride_l)``
      pixels (at most the map's size) for the sampling rules, as if the map
      were that small. May be traced.

  Returns:
    ``[K, out_h, out_w, C]`` in the dtype of the features.

  Raises:
    ValueError: on mismatched ``features``/``strides`` lengths, a
      negative or non-integer ``sampling_ratio`` or a bad ``output_size``.
  """
  return batched_multilevel_roi_align([jnp.asarray(level)[None] for level in features], jnp.asarray(rois)[None],
                                      output_size, strides, sampling_ratio, finest_scale, aligned,
                                      None if valid_size is None else jnp.asarray(valid_size)[None])[0]


def batched_multilevel_roi_align(features: Sequence[ArrayLike], rois: ArrayLike,
                                 output_size: OutputSize, strides: Sequence[float],
                                 sampling_ratio: int = 2, finest_scale: float = 56,
                                 aligned: bool = True, valid_size: ArrayLike = None) -> jnp.ndarray:
  """``multilevel_roi_align`` of a batch: each image's RoIs on its own maps, as one call.

  Every level of every image is flattened into one ``[B * sum_l H_l * W_l, C]``
  array; each RoI looks up the size, first row and scale of its image's level
  and gathers only from it. One call for the batch (rather than a ``vmap``)
  keeps the adaptive grid's loop unbatched: it runs to the batch's largest
  RoI grid once, without a per-image select over its carry at every step.

  Args:
    features: sequence of ``[B, H_l, W_l, C]`` maps, finest first.
    rois: ``[B, K, 4]`` float xyxy boxes in image pixels.
    output_size, strides, sampling_ratio, finest_scale, aligned: as for
      ``multilevel_roi_align``.
    valid_size: optional ``[B, 2]``, each image's as for ``multilevel_roi_align``.

  Returns:
    ``[B, K, out_h, out_w, C]`` in the dtype of the features.

  Raises:
    ValueError: as ``multilevel_roi_align``.
  """
  output_size = _pair(output_size)
  sampling_ratio = _check_sampling_ratio(sampling_ratio)
  if len(features) != len(strides):
    raise ValueError(f"got {len(features)} feature levels but {len(strides)} strides")
  features = [jnp.asarray(level) for level in features]
  rois = jnp.asarray(rois)
  batch, num_rois = rois.shape[:2]
  shapes = np.array([level.shape[1:3] for level in features], np.int64)
  sizes = shapes[:, 0] * shapes[:, 1]
  per_image = int(sizes.sum())
  flat_features = jnp.concatenate(
      [level.reshape(batch, size, level.shape[3]) for level, size in zip(features, sizes)], axis=1)
  flat_features = flat_features.reshape(batch * per_image, flat_features.shape[2])
  offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])

  rois = rois.reshape(batch * num_rois, 4)
  levels = map_roi_levels(rois, len(features), finest_scale)
  images = np.repeat(np.arange(batch), num_rois)
  extents = jnp.broadcast_to(jnp.asarray(shapes, jnp.int32), (batch,) + shapes.shape)
  if valid_size is not None:
    strides_int = np.asarray(strides, np.int64)[None, :, None]
    extents = jnp.minimum(extents, -(-jnp.asarray(valid_size, jnp.int32)[:, None, :] // strides_int))
  pooled = _gather_roi_bins(
      flat_features, rois,
      heights=extents[images, levels, 0].astype(jnp.float32),
      widths=extents[images, levels, 1].astype(jnp.float32),
      row_widths=jnp.asarray(shapes[:, 1], jnp.int32)[levels],
      row_offsets=jnp.asarray(offsets, jnp.int32)[levels] + jnp.asarray(images * per_image, jnp.int32),
      spatial_scales=jnp.asarray(1.0 / np.asarray(strides, np.float64), jnp.float32)[levels],
      output_size=output_size, sampling_ratio=sampling_ratio, aligned=aligned)
  return pooled.reshape((batch, num_rois) + pooled.shape[1:])

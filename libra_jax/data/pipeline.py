"""The input pipeline: TFDS detection datasets -> numpy batches of static shapes (DESIGN.md batch contract).

Each call first reads the light metadata of its data (``metadata.py``: sizes
from the image headers, and boxes), then plans the batches from
it alone (``plan.py``), then runs a tf.data pipeline that reads, decodes,
resizes, flips, normalizes and pads just the images of the planned batches,
in parallel; the ground truth is attached in numpy (``targets.py``).

Train: images without any box, or with a side below ``data.min_size``, are
skipped; crowd boxes stay as ``is_crowd`` rows; each bucket's images come in
reshuffled passes with random flips; the stream never ends and batch ``k`` is
a pure function of the seed and ``k`` (``start_batch`` resumes exactly, with
no image read for the skipped batches). The split is cut into contiguous data
shards, one per device of the run; each shard has its own passes and fills its
device's share of every batch, and host ``shard_index`` of ``num_shards``
reads (metadata included) only the examples of its ``shards_per_host``
shards. So a global batch depends on the device count, never on how the
devices are spread over processes: 2 processes x 2 devices train on exactly
what 1 process x 4 devices does. All hosts follow one sequence of buckets,
from the bucket shares of the whole split, summed over the hosts by
``all_hosts``.

Eval: every decodable image of the split exactly once over all hosts, unflipped,
in one-bucket batches; each host reads and decodes only its contiguous share of
the split, and the hosts agree (through ``all_hosts``) on how many batches
each bucket takes; slots past a host's images are ``valid=False``.

``all_hosts`` maps this host's ``[k]`` array to the ``[num_hosts, k]`` stack of
every host's, in host order (``runtime.all_processes`` in a JAX run); the
default is a run of one host.

Every repair and drop is logged, one line per reason, and counted in the
iterator's ``stats``.
"""

import collections
import logging
from typing import Callable, Deque, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import tensorflow_datasets as tfds

from libra_jax.data import geometry, images, metadata, records, sources, targets
from libra_jax.data.config import check_data_config
from libra_jax.data.plan import PlannedBatch, TrainPlan, eval_batch_counts, eval_plan
from libra_jax.data.report import Report, stats
from libra_jax.data.tf_runtime import tf
from libra_jax.errors import ConfigError, DataError

DatasetInfo = sources.DatasetInfo
dataset_info = sources.dataset_info

PREFETCH_BATCHES = 2

AllHosts = Callable[[np.ndarray], np.ndarray]


def one_host(values: np.ndarray) -> np.ndarray:
  """``all_hosts`` of a run with one host: ``[k] -> [1, k]``."""
  return np.asarray(values)[None]

_log = logging.getLogger("libra_jax.data")


class Batches:
  """An iterator of numpy batches in the batch contract.

  Attributes:
    stats: ``{"dropped": {reason: n}, "repaired": {reason: n}, "truncated":
      n}``: images, boxes and instances dropped or repaired, by reason
      (``report.REASONS``), and instances beyond ``max_instances``. Counted
      once over the data this iterator draws from (the split's whole
      preparation report for ``coco_folder``), not per epoch.
    num_batches: batches in the stream; None for the endless train stream.
    num_images: images this host draws from (valid slots, for eval).
    table: the metadata of the split (slice) the batches come from.
  """

  def __init__(self, builder: tfds.core.DatasetBuilder, table: metadata.ImageTable, plan: Iterable[PlannedBatch],
               data_config, batch_size: int, reports: Sequence[Report], num_batches: Optional[int],
               num_images: int):
    self.stats = stats(reports)
    self.num_batches = num_batches
    self.num_images = num_images
    self.table = table
    self._builder = builder
    self._max_instances = data_config.max_instances
    self._height, self._width = geometry.resized_size(table.height, table.width, data_config.scale)
    # The planned batches handed to tf.data and not delivered yet, oldest first (tf.data keeps their order).
    self._pending: Deque[PlannedBatch] = collections.deque()
    if num_batches == 0:
      self._iterator = iter(())
    else:
      dataset = _image_stream(builder, table, self._recorded(plan), self._height, self._width, data_config,
                              batch_size)
      self._iterator = dataset.as_numpy_iterator()

  def _recorded(self, plan: Iterable[PlannedBatch]) -> Iterator[PlannedBatch]:
    for batch in plan:
      self._pending.append(batch)
      yield batch

  def __iter__(self):
    return self

  def __next__(self) -> Dict[str, np.ndarray]:
    try:
      element = next(self._iterator)
    except tf.errors.OpError as error:
      self._iterator = iter(())  # the stream cannot go on past a batch it failed to read
      raise self._decode_error(error) from None
    self._pending.popleft()
    planned = PlannedBatch(rows=element["row"], flips=element["flip"], valid=element["valid"], bucket=-1)
    batch = targets.annotate(self.table, self._height, self._width, planned, self._max_instances)
    batch["image"] = element["image"]
    return batch

  def _decode_error(self, error: Exception) -> DataError:
    """The error for a batch that tf.data failed to read: it names the image that does not decode."""
    source = self.table.report.source
    batch = self._pending[0] if self._pending else None
    for row in batch.rows[batch.valid] if batch is not None else ():
      name, problem = metadata.decode_problem(self._builder, self.table.records, int(row))
      if problem:
        return DataError(f"{source}: image {name} cannot be decoded ({problem}); its header reads, so the metadata "
                         f"pass kept it. Replace the image file, or delete it, and prepare the dataset again")
    return DataError(f"{source}: reading a batch failed: {metadata.decoder_message(error)}")


def _image_stream(builder, table, plan, height, width, data_config, batch_size) -> tf.data.Dataset:
  """Images of the planned batches, ``{"image": [B, H, W, 3] float32, "row", "flip", "valid": [B]}``."""
  buckets = np.asarray(data_config.buckets, np.int32)

  def planned_batches():
    for batch in plan:
      yield {"row": batch.rows, "flip": batch.flips, "valid": batch.valid, "height": height[batch.rows],
             "width": width[batch.rows], "bucket_height": np.full(batch_size, buckets[batch.bucket, 0], np.int32),
             "bucket_width": np.full(batch_size, buckets[batch.bucket, 1], np.int32)}

  signature = {"row": tf.TensorSpec([batch_size], tf.int64), "flip": tf.TensorSpec([batch_size], tf.bool),
               "valid": tf.TensorSpec([batch_size], tf.bool)}
  signature.update({key: tf.TensorSpec([batch_size], tf.int32)
                    for key in ("height", "width", "bucket_height", "bucket_width")})
  features = builder.info.features
  mean, std = tuple(data_config.mean), tuple(data_config.std)

  def preprocess(element):
    def decoded():
      encoded = features.deserialize_example(element["serialized"],
                                             decoders={"image": tfds.decode.SkipDecoding()})["image"]
      return images.preprocess(images.decode(encoded), element["height"], element["width"], element["flip"],
                               element["bucket_height"], element["bucket_width"], mean, std)

    # A padding slot (valid=False) decodes nothing: its image is zeros of the bucket's shape.
    padding = lambda: tf.zeros(tf.stack([element["bucket_height"], element["bucket_width"], 3]), tf.float32)
    image = tf.cond(element["valid"], decoded, padding)
    return {"image": image, "row": element["row"], "flip": element["flip"], "valid": element["valid"]}

  dataset = tf.data.Dataset.from_generator(planned_batches, output_signature=signature).unbatch()
  dataset = records.read_examples(table.records, dataset)
  dataset = dataset.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  dataset = dataset.batch(batch_size, drop_remainder=True).prefetch(PREFETCH_BATCHES)
  options = tf.data.Options()
  options.deterministic = True
  return dataset.with_options(options)


def _check_shard(batch_size: int, shard_index: int, num_shards: int) -> None:
  if batch_size < 1:
    raise ValueError(f"batch_size must be at least 1, got {batch_size}")
  if not 0 <= shard_index < num_shards:
    raise ValueError(f"shard_index must be in [0, num_shards={num_shards}), got {shard_index}")


def check_splits(data_config) -> None:
  """Raises ``ConfigError`` naming the key unless ``train_split`` and ``eval_split`` each read one prepared split."""
  builder = sources.prepared_builder(data_config)
  for key in ("train_split", "eval_split"):
    try:
      _split_range(builder, data_config[key])
    except ConfigError as error:
      raise ConfigError(f"config.data.{key}: {error}") from error


def _split_range(builder: tfds.core.DatasetBuilder, spec: str) -> Tuple[str, int, int]:
  """A split or a slice of one (``"train"``, ``"validation[:16]"``, ``"train[10%:20%]"``) -> (split, start, stop)."""
  try:
    instructions = tfds.core.ReadInstruction.from_spec(spec).to_absolute(builder.info.splits)
  except ValueError as error:
    raise ConfigError(f"{builder.info.full_name} has no split {spec!r} ({error}); it has "
                      f"{sorted(builder.info.splits)}") from error
  if len(instructions) != 1:
    raise ConfigError(f"data split {spec!r} joins several splits; name one split or a slice of one")
  (instruction,) = instructions
  size = builder.info.splits[instruction.splitname].num_examples
  return (instruction.splitname, instruction.from_ or 0, size if instruction.to is None else instruction.to)


def _preparation_report(builder: tfds.core.DatasetBuilder, split: str) -> List[Report]:
  """What preparing the split found, where the builder recorded it (``coco_folder``)."""
  reports = builder.info.metadata.get("reports", {}) if builder.info.metadata else {}
  if split not in reports:
    return []
  return [Report.from_json(f"{builder.info.full_name.rsplit('/', 1)[0]} {split} (prepared)", reports[split])]


def _trainable(table: metadata.ImageTable, data_config, report: Report) -> np.ndarray:
  """``[N]`` bool: decodable images with a box and both sides at least ``min_size``; counts the rest."""
  too_small = table.decodable & (np.minimum(table.height, table.width) < data_config.min_size)
  no_gt = table.decodable & ~too_small & (table.num_instances() == 0)
  for reason, rows in (("image_too_small", too_small), ("image_no_gt", no_gt)):
    for row in np.flatnonzero(rows):
      report.add(reason, table.filename[row])
  return table.decodable & ~too_small & ~no_gt


def _count_truncated(table: metadata.ImageTable, rows: np.ndarray, max_instances: int, report: Report) -> None:
  extra = table.num_instances()[rows] - max_instances
  for row, count in zip(rows[extra > 0], extra[extra > 0]):
    report.add("instances_truncated", table.filename[row], int(count))


def _rows_by_bucket(table: metadata.ImageTable, rows: np.ndarray, data_config) -> List[np.ndarray]:
  height, width = geometry.resized_size(table.height[rows], table.width[rows], data_config.scale)
  bucket = geometry.bucket_index(height, width, data_config.buckets)
  return [rows[bucket == b] for b in range(len(data_config.buckets))]


def _shard_range(first: int, last: int, shard: int, num_shards: int) -> Tuple[int, int]:
  """Examples ``[start, stop)`` of data shard ``shard`` of ``num_shards`` contiguous shards of ``first..last-1``."""
  return first + (last - first) * shard // num_shards, first + (last - first) * (shard + 1) // num_shards


def _interleave(plans: Sequence[TrainPlan], start_batch: int) -> Iterator[PlannedBatch]:
  """The host's batches: shard by shard, each shard's batch of the same step (all plans share one bucket sequence)."""
  for parts in zip(*(plan.batches(start_batch) for plan in plans)):
    yield PlannedBatch(rows=np.concatenate([p.rows for p in parts]), flips=np.concatenate([p.flips for p in parts]),
                       valid=np.concatenate([p.valid for p in parts]), bucket=parts[0].bucket)


def train_batches(data_config, batch_size: int, seed: int, start_batch: int = 0, shard_index: int = 0,
                  num_shards: int = 1, shards_per_host: int = 1, all_hosts: AllHosts = one_host) -> Batches:
  """This host's endless training batches, from batch ``start_batch`` on.

  Args:
    data_config: ``config.data``.
    batch_size: images per batch on this host (a multiple of ``shards_per_host``).
    seed: fixes every pass's order and every flip.
    start_batch: index of the first batch to yield (a resumed run's step).
    shard_index, num_shards: this host and the number of hosts.
    shards_per_host: data shards per host (the run's devices per process);
      each fills ``batch_size // shards_per_host`` slots of every batch.
    all_hosts: gathers an array from every host (see the module docstring).

  Returns:
    A ``Batches`` iterator; every batch has one bucket's shape.
  """
  check_data_config(data_config)
  _check_shard(batch_size, shard_index, num_shards)
  if start_batch < 0:
    raise ValueError(f"start_batch must be >= 0, got {start_batch}")
  if shards_per_host < 1 or batch_size % shards_per_host:
    raise ValueError(f"batch_size {batch_size} must be a multiple of shards_per_host {shards_per_host}")
  builder = sources.prepared_builder(data_config)
  split, first, last = _split_range(builder, data_config.train_split)
  shards = range(shard_index * shards_per_host, (shard_index + 1) * shards_per_host)
  total_shards = num_shards * shards_per_host
  start = _shard_range(first, last, shards[0], total_shards)[0]
  stop = _shard_range(first, last, shards[-1], total_shards)[1]
  table = metadata.load(builder, split, start, stop)
  selection = Report(f"{table.report.source} training", images=len(table))
  rows = np.flatnonzero(_trainable(table, data_config, selection))
  selection.totals["instances"] = int(table.num_instances()[rows].sum())
  _count_truncated(table, rows, data_config.max_instances, selection)
  counts = np.array([len(r) for r in _rows_by_bucket(table, rows, data_config)], np.int64)
  counts = all_hosts(counts).sum(0)
  if not counts.sum():
    raise DataError(f"none of the images of {builder.info.full_name} {data_config.train_split} can be used for "
                    f"training (see the log for why)")
  reports = _preparation_report(builder, split) + [table.report, selection]
  for report in reports:
    report.log()
  plans = []
  for shard in shards:
    shard_start, shard_stop = _shard_range(first, last, shard, total_shards)
    mine = rows[(rows >= shard_start - start) & (rows < shard_stop - start)]
    plans.append(TrainPlan(_rows_by_bucket(table, mine, data_config), counts / counts.sum(),
                           batch_size // shards_per_host, seed, shard, data_config.flip_prob))
  return Batches(builder, table, _interleave(plans, start_batch), data_config, batch_size, reports, None, len(rows))


def eval_batches(data_config, batch_size: int, shard_index: int = 0, num_shards: int = 1,
                 all_hosts: AllHosts = one_host) -> Batches:
  """Every decodable image of the eval split once over all hosts, in batches of one bucket each.

  Host ``shard_index`` of ``num_shards`` reads its contiguous share of the
  split. Images are neither flipped nor skipped for lacking boxes. Slots past
  the end of a host's images of a bucket have ``valid=False`` (and no ground
  truth); all hosts yield the same number of batches with the same shapes in
  turn (``all_hosts`` gathers each host's batch counts).
  """
  check_data_config(data_config)
  _check_shard(batch_size, shard_index, num_shards)
  builder = sources.prepared_builder(data_config)
  split, first, last = _split_range(builder, data_config.eval_split)
  table = metadata.load(builder, split, *_shard_range(first, last, shard_index, num_shards))
  rows = np.flatnonzero(table.decodable)
  selection = Report(f"{table.report.source} evaluation", instances=int(table.num_instances()[rows].sum()))
  _count_truncated(table, rows, data_config.max_instances, selection)
  reports = _preparation_report(builder, split) + [table.report, selection]
  for report in reports:
    report.log()
  rows_by_bucket = _rows_by_bucket(table, rows, data_config)
  agreed = all_hosts(eval_batch_counts(rows_by_bucket, batch_size)).max(0)
  if agreed.sum() and not len(table):
    raise DataError(f"host {shard_index} of {num_shards} has no example of {data_config.eval_split} to evaluate; "
                    f"evaluate on a larger split or with fewer processes")
  plan = eval_plan(rows_by_bucket, batch_size, agreed)
  return Batches(builder, table, plan, data_config, batch_size, reports, len(plan), len(rows))


def padding_batch(data_config, batch_size: int, height: int, width: int) -> Dict[str, np.ndarray]:
  """A batch of ``batch_size`` padding slots in a ``height x width`` bucket: every key, dtype and shape of the batch
  contract (``train_batches`` and ``eval_batches`` give the same), zero images, no objects, ``valid`` False."""
  instances = data_config.max_instances
  return {"image_shape": np.zeros((batch_size, 2), np.int32), "scale": np.zeros((batch_size, 2), np.float32),
          "image_id": np.full(batch_size, -1, np.int64), "boxes": np.zeros((batch_size, instances, 4), np.float32),
          "labels": np.full((batch_size, instances), -1, np.int32),
          "is_crowd": np.zeros((batch_size, instances), bool), "valid": np.zeros(batch_size, bool),
          "image": np.zeros((batch_size, height, width, 3), np.float32)}


def first_bucket_image(data_config) -> np.ndarray:
  """A zero image ``[1, H, W, 3]`` float32 in the first bucket's shape (what a model is initialized on)."""
  height, width = data_config.buckets[0]
  return np.zeros((1, height, width, 3), np.float32)

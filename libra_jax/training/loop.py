"""``train_and_evaluate``: the training loop, readable top to bottom.

Builds the model, optimizer, mesh and input pipeline from the config,
restores the latest checkpoint of ``workdir`` if there is one (the input
position is the step: batch ``k`` is a pure function of the seed and ``k``),
then trains, logs, checkpoints and evaluates; an evaluation's COCOeval runs in
a background thread while training goes on. A non-finite loss stops the run
(the last good checkpoint stays as it is) unless ``config.skip_nonfinite``
asks to skip such steps and count them.
"""

import concurrent.futures
import json
import logging
import pathlib
import time
from typing import Dict, Iterator, List, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from jax.experimental import multihost_utils

from libra_jax import convert, losses
from libra_jax.data import pipeline
from libra_jax.evaluation import ground_truth
from libra_jax.evaluation.coco_eval import CocoAccumulator
from libra_jax.models.detectors import build_detector
from libra_jax.training import optim
from libra_jax.training.checkpoint import Checkpointer, abstract_like
from libra_jax.training.metrics import MetricWriter
from libra_jax.training.step import (TrainState, batch_sharding, make_mesh, make_predict_step, make_train_step,
                                     replicated)

LOSS_PREFIX = "loss"

_log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
  """The loss became NaN or infinite."""


class ConfigError(ValueError):
  """A config value that cannot work (reported in one line by train.py)."""


def enable_compilation_cache(config, workdir: pathlib.Path) -> None:
  """Turns on JAX's persistent compilation cache (``config.compilation_cache_dir`` or ``workdir/xla_cache``)."""
  directory = config.get("compilation_cache_dir") or str(workdir / "xla_cache")
  jax.config.update("jax_compilation_cache_dir", directory)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def shapes_batch(data_config, batch_size: int) -> Dict[str, np.ndarray]:
  """An all-padding batch of the first bucket's shape (for initialization)."""
  height, width = data_config.buckets[0]
  instances = data_config.max_instances
  return dict(image=np.zeros((batch_size, height, width, 3), np.float32),
              image_shape=np.tile(np.array([[height, width]], np.int32), (batch_size, 1)),
              boxes=np.zeros((batch_size, instances, 4), np.float32),
              labels=np.full((batch_size, instances), -1, np.int32),
              is_crowd=np.zeros((batch_size, instances), bool), valid=np.ones((batch_size,), bool))


def load_backbone(config, variables):
  """Imports ``config.backbone_checkpoint`` (if set) into the backbone."""
  path = config.get("backbone_checkpoint")
  if not path:
    return variables
  if not pathlib.Path(path).is_file():
    raise FileNotFoundError(
        f"backbone checkpoint {path} not found: put torchvision's ImageNet weights there (.pth, .safetensors "
        f"or .npz), or pass --config.backbone_checkpoint='' to train the backbone from scratch")
  variables, report = convert.import_backbone(convert.load_state_dict(path), variables)
  _log.info("backbone from %s: %s", path, report)
  return variables


def to_global(batch: Dict[str, np.ndarray], mesh) -> Dict[str, jax.Array]:
  """This process's batch -> global arrays split over the ``'data'`` mesh axis."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}


def detect_eval_split(predict, variables, config, mesh, info) -> CocoAccumulator:
  """Runs ``predict`` over the evaluation split (every image once); returns the detections, ready for COCOeval.

  Batch ``k + 1`` is dispatched before batch ``k``'s detections are fetched
  and converted, so the host work overlaps the device's.
  """
  per_host = config.eval_batch_size // jax.process_count()
  batches = pipeline.eval_batches(config.data, per_host, shard_index=jax.process_index(),
                                  num_shards=jax.process_count())
  accumulator = CocoAccumulator(
      ground_truth.eval_ground_truth(config.data, batches.table, info.category_ids, info.class_names),
      info.category_ids)
  keys = ("image_id", "image_shape", "scale", "valid")

  def collect(batch, detections):
    gathered = multihost_utils.process_allgather({"meta": {k: batch[k] for k in keys}, "det": detections},
                                                 tiled=True)
    accumulator.add(gathered["meta"], jax.tree.map(np.asarray, gathered["det"]))

  pending = None
  for batch in batches:
    detections = predict(variables, to_global({k: v for k, v in batch.items() if k != "image_id"}, mesh))
    if pending is not None:
      collect(*pending)
    pending = batch, detections
  if pending is not None:
    collect(*pending)
  return accumulator


def score_detections(accumulator: CocoAccumulator, workdir=None, step: int = -1) -> Dict[str, float]:
  """COCOeval of the collected detections.

  With ``workdir``, the metrics go to ``workdir/eval_<step>.json`` and the
  detections, in COCO's results format, to ``workdir/results_<step>.json``.
  """
  metrics = accumulator.evaluate()
  if workdir is not None and jax.process_index() == 0:
    (pathlib.Path(workdir) / f"eval_{step}.json").write_text(json.dumps(metrics, indent=1))
    (pathlib.Path(workdir) / f"results_{step}.json").write_text(json.dumps(accumulator.results))
  return metrics


def evaluate(predict, variables, config, mesh, info, workdir=None, step: int = -1) -> Dict[str, float]:
  """COCO metrics of the model on the evaluation split (``detect_eval_split`` then ``score_detections``)."""
  return score_detections(detect_eval_split(predict, variables, config, mesh, info), workdir, step)


def format_metrics(metrics: Dict[str, float]) -> str:
  """The COCO metrics as a two-line table."""
  names = [n for n in metrics if n in ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR100")]
  return " ".join(f"{n:>7}" for n in names) + "\n" + " ".join(f"{metrics[n]:7.3f}" for n in names)


def _initial_state(config, model, optimizer, mesh, example) -> TrainState:
  init = jax.jit(lambda key, batch: model.init(key, batch, train=False))
  variables = init(jax.random.key(config.seed), example)
  variables = load_backbone(config, jax.tree.map(np.asarray, variables))
  params = variables["params"]
  state = TrainState(step=jnp.int32(0), params=params, batch_stats=variables["batch_stats"],
                     opt_state=optimizer.init(params),
                     rng=jax.random.key_data(jax.random.fold_in(jax.random.key(config.seed), 1)),
                     skipped_steps=jnp.int32(0))
  return jax.device_put(state, replicated(mesh))


def build_checked(config, mesh):
  """The dataset info and the model of ``config``, or a ``ConfigError`` saying what is wrong."""
  info = pipeline.dataset_info(config.data)
  if config.model.num_classes != info.num_classes:
    raise ConfigError(f"config.model.num_classes is {config.model.num_classes} but dataset "
                      f"{config.data.dataset!r} has {info.num_classes} classes")
  for name in ("global_batch_size", "eval_batch_size"):
    if config[name] % mesh.size or config[name] % jax.process_count():
      raise ConfigError(f"config.{name}={config[name]} must be a multiple of the {mesh.size} devices")
  try:
    model = build_detector(config.model)
    heads = [config.model.rpn, config.model.rcnn] if config.model.type == "faster_rcnn" else [config.model.head]
    for head in heads:
      for loss in ("loss_cls", "loss_bbox"):
        losses.build_loss(head[loss])
  except (KeyError, ValueError, TypeError) as error:
    raise ConfigError(f"bad model config: {error}") from error
  return info, model


def train_and_evaluate(config, workdir) -> Dict[str, float]:
  """Trains ``config`` in ``workdir`` (resuming from its latest checkpoint); returns the final metrics."""
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  enable_compilation_cache(config, workdir)
  mesh = make_mesh()
  info, model = build_checked(config, mesh)
  per_host = config.global_batch_size // jax.process_count()

  example = shapes_batch(config.data, config.global_batch_size)
  optimizer = optim.make_optimizer(config.optim, config.global_batch_size, config.steps_per_epoch,
                                   jax.eval_shape(lambda k: model.init(k, example, train=False),
                                                  jax.random.key(0))["params"],
                                   config.model.backbone.frozen_stages)
  state = _initial_state(config, model, optimizer, mesh, example)
  checkpointer = Checkpointer(workdir, config.keep)
  start = checkpointer.latest_step()
  if start is not None:
    state, meta = checkpointer.restore(start, abstract_like(state))
    _log.info("resumed from step %d (input position %d)", start, meta["input_position"])
  start = int(state.step)

  schedule = optim.schedule_from_config(config.optim, config.global_batch_size, config.steps_per_epoch)
  train_step = make_train_step(model, optimizer, mesh, skip_nonfinite=config.skip_nonfinite)
  predict = make_predict_step(model, mesh)
  batches: Iterator = pipeline.train_batches(config.data, per_host, seed=config.seed, start_batch=start,
                                              shard_index=jax.process_index(), num_shards=jax.process_count())
  writer = MetricWriter(workdir, enabled=jax.process_index() == 0)
  known_nonfinite = int(state.skipped_steps)
  eval_metrics: Dict[str, float] = {}
  progress = tqdm.tqdm(total=config.total_steps, initial=start, unit="step", dynamic_ncols=True,
                       disable=jax.process_index() != 0)
  last_time, last_step = time.perf_counter(), start
  # COCOeval of an evaluation runs in this thread while training goes on; its metrics are logged when ready.
  scoring = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="cocoeval")
  scored: List[Tuple[int, concurrent.futures.Future]] = []

  def log_scored(wait: bool) -> None:
    nonlocal eval_metrics
    while scored and (wait or scored[0][1].done()):
      at, future = scored.pop(0)
      eval_metrics = future.result()
      writer.write(at, eval_metrics, kind="eval")
      progress.write(f"step {at}: " + ", ".join(f"{k} {v:.3f}" for k, v in eval_metrics.items()
                                               if not k.startswith("AR")))

  try:
    for step in range(start + 1, config.total_steps + 1):
      state, metrics = train_step(state, to_global(next(batches), mesh))
      progress.update(1)
      log_scored(wait=False)
      boundary = step == config.total_steps
      if step % config.log_every == 0 or step % config.checkpoint_every == 0 or boundary:
        nonfinite = int(state.skipped_steps)
        if nonfinite > known_nonfinite and not config.skip_nonfinite:
          losses = {k: float(v) for k, v in jax.device_get(metrics).items() if k.startswith(LOSS_PREFIX)}
          raise NonFiniteLossError(
              f"non-finite loss at or before step {step} (losses at step {step}: {losses}); stopping. The last "
              f"good checkpoint (step {checkpointer.latest_step()}) is kept; check the data or lower the "
              f"learning rate, or set --config.skip_nonfinite=True to skip such steps")
        known_nonfinite = nonfinite
      if step % config.log_every == 0 or boundary:
        now = time.perf_counter()
        scalars = {k: float(v) for k, v in jax.device_get(metrics).items()}
        scalars.update(lr=float(schedule(step - 1)), skipped_steps=known_nonfinite,
                       images_per_sec=(step - last_step) * config.global_batch_size / (now - last_time))
        last_time, last_step = now, step
        writer.write(step, scalars)
        progress.set_postfix(loss=f"{scalars['loss']:.4f}", lr=f"{scalars['lr']:.2e}",
                             img_s=f"{scalars['images_per_sec']:.1f}")
      if step % config.checkpoint_every == 0 or boundary:
        checkpointer.save(step, state, {"input_position": step})
      if step % config.eval_every == 0 or boundary:
        log_scored(wait=True)
        detections = detect_eval_split(predict, {"params": state.params, "batch_stats": state.batch_stats},
                                       config, mesh, info)
        scored.append((step, scoring.submit(score_detections, detections, workdir, step)))
    log_scored(wait=True)
    if not eval_metrics:
      # Nothing left to train (a finished run started again): report the final model.
      eval_metrics = evaluate(predict, {"params": state.params, "batch_stats": state.batch_stats}, config, mesh,
                              info, workdir, start)
  finally:
    scoring.shutdown(cancel_futures=True)
    progress.close()
    checkpointer.close()
    writer.close()
  return eval_metrics


def load_trained_variables(config, model, workdir, checkpoint: Optional[str] = None):
  """``{"params", "batch_stats"}`` from a weights ``checkpoint`` file or the latest checkpoint of ``workdir``."""
  example = shapes_batch(config.data, 1)
  target = jax.eval_shape(lambda k: model.init(k, example, train=False), jax.random.key(0))
  if checkpoint:
    variables, report = convert.import_detector(convert.load_state_dict(checkpoint), target)
    _log.info("weights from %s: %s", checkpoint, report)
    return variables
  checkpointer = Checkpointer(workdir, config.keep)
  step = checkpointer.latest_step()
  if step is None:
    raise FileNotFoundError(f"no checkpoint in {pathlib.Path(workdir) / 'checkpoints'}; train first or pass "
                            f"--checkpoint")
  optimizer = optim.make_optimizer(config.optim, config.global_batch_size, config.steps_per_epoch,
                                   target["params"], config.model.backbone.frozen_stages)
  abstract = jax.eval_shape(lambda v: TrainState(
      step=jnp.int32(0), params=v["params"], batch_stats=v["batch_stats"], opt_state=optimizer.init(v["params"]),
      rng=jax.random.key_data(jax.random.key(0)), skipped_steps=jnp.int32(0)), target)
  sharding = replicated(make_mesh())
  abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), abstract)
  state, _ = checkpointer.restore(step, abstract)
  checkpointer.close()
  return {"params": state.params, "batch_stats": state.batch_stats}


def evaluate_checkpoint(config, workdir, checkpoint: Optional[str] = None) -> Dict[str, float]:
  """COCO metrics of the latest checkpoint in ``workdir``, or of a weights ``checkpoint`` file (e.g. mmdetection's)."""
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  enable_compilation_cache(config, workdir)
  mesh = make_mesh()
  info, model = build_checked(config, mesh)
  variables = jax.device_put(load_trained_variables(config, model, workdir, checkpoint), replicated(mesh))
  metrics = evaluate(make_predict_step(model, mesh), variables, config, mesh, info, workdir)
  MetricWriter(workdir, enabled=jax.process_index() == 0).write(-1, metrics, kind="eval")
  return metrics

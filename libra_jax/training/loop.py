"""``train_and_evaluate``: the training loop, readable top to bottom.

Builds the model, optimizer, mesh and input pipeline from the config,
restores the newest readable checkpoint of ``workdir`` if there is one (the
input position is the step: batch ``k`` is a pure function of the seed and
``k``), then trains, logs, checkpoints and evaluates; an evaluation's COCOeval
runs in a background thread while training goes on.

What keeps a run safe:
- the work directory is locked for the run (``workdir.WorkdirLock``) and
  records its config; a restart with a config that changes shapes, the
  schedule or the data order is refused unless allowed;
- every step's loss is checked for finiteness while the next step runs, and
  always before a save or an evaluation: a non-finite loss stops the run
  before its weights are saved or evaluated, unless ``config.skip_nonfinite``
  asks to skip such steps and count them;
- a failed background save stops the run at the next step;
- SIGTERM or SIGINT stops the run after the step in progress with a
  synchronous checkpoint (``preemption.StopRequest``; the same step on every
  process), and ``errors.Stopped`` says where.

On the CPU, where the command kept freed host memory by default, the loop asks
``host_memory.keep_if_affordable`` after the first step of each image size
whether that fits the host, given the step's temporary buffers.

The train step runs under JAX's transfer guard (``disallow``): every value the
loop reads from the devices is fetched with an explicit ``jax.device_get``.
``metrics.jsonl`` gets a ``kind="compile"`` record after the first step (its
wall time, compiling or loading the step included) and each train record counts the train
step's compilations, one per bucket shape; more is a bug.
"""

import concurrent.futures
import logging
import pathlib
import time
from typing import Dict, Iterator, List, Optional, Tuple

import jax
import numpy as np
import tqdm

from libra_jax import convert, host_memory, runtime
from libra_jax.data import pipeline
from libra_jax.errors import NonFiniteLossError, Stopped, UserError
from libra_jax.evaluation import driver
from libra_jax.evaluation.predict_step import make_predict_step
from libra_jax.models.detectors import jitted_init
from libra_jax.training import optim, precompile
from libra_jax.training.checkpoint import Checkpointer, abstract_like
from libra_jax.training.metrics import MetricWriter
from libra_jax.training.preemption import StopRequest
from libra_jax.training.step import make_train_step, optimizer_and_state
from libra_jax.training.workdir import WorkdirLock, check_and_record_config

LOSS_PREFIX = "loss"

_log = logging.getLogger(__name__)


def temporary_bytes(jitted, *args) -> int:
  """The temporary buffers of ``jitted``'s program for ``args`` in this process, in bytes: XLA's memory analysis
  gives one device's, and each of the process's devices has one (0 where the backend gives none). Call it after a
  call on arguments of those shapes: the program is then found, not compiled."""
  analysis = jitted.lower(*args).compile().memory_analysis()
  return 0 if analysis is None else int(analysis.temp_size_in_bytes) * jax.local_device_count()


def backbone_file(config) -> Optional[str]:
  """``config.backbone_checkpoint``, or None where it is not set; a FileNotFoundError that says what to do where
  it is not a file."""
  path = config.get("backbone_checkpoint")
  if path and not pathlib.Path(path).is_file():
    raise FileNotFoundError(
        f"backbone checkpoint {path} not found: put torchvision's ImageNet weights there (.pth, .safetensors "
        f"or .npz), or pass --config.backbone_checkpoint='' to train the backbone from scratch")
  return path or None


def load_backbone(config, variables):
  """Imports ``config.backbone_checkpoint`` (if set) into the backbone."""
  path = backbone_file(config)
  if path is None:
    return variables
  variables, report = convert.import_backbone(convert.load_state_dict(path), variables)
  _log.info("backbone from %s: %s", path, report)
  return variables


def _initial_variables(config, model, mesh, image, fine_tune: bool):
  """The weights of step 0: with ``fine_tune``, those of ``config.init_checkpoint``; otherwise fresh variables,
  with the backbone's ImageNet weights if configured."""
  if fine_tune:
    variables = driver.load_trained_variables(config, model, None, config.init_checkpoint, mesh)
    _log.info("fine-tuning from %s", config.init_checkpoint)
    return jax.device_get(variables)
  variables = jitted_init(model)(jax.random.key(config.seed), image)
  return load_backbone(config, jax.tree.map(np.asarray, variables))


def _lock_on_every_process(lock: WorkdirLock) -> None:
  """Process 0 takes the work directory's lock; every process stops with its message if that failed."""
  refusal = ""
  if jax.process_index() == 0:
    try:
      lock.acquire()
    except UserError as error:
      refusal = str(error)
  refusal = runtime.gather_objects(refusal)[0]
  if refusal:
    raise UserError(refusal)


def train_and_evaluate(config, workdir, allow_config_change: bool = False) -> Dict[str, float]:
  """Trains ``config`` in ``workdir`` (resuming from its newest readable checkpoint); returns the final metrics.

  ``allow_config_change`` lets a restart proceed with a config that differs
  from the recorded one. Raises ``errors.Stopped`` after saving when a
  SIGTERM or SIGINT arrives.
  """
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  lock = WorkdirLock(workdir)
  _lock_on_every_process(lock)
  stop = StopRequest().install()
  try:
    return _train(config, workdir, allow_config_change, stop)
  finally:
    stop.uninstall()
    lock.release()


def _check_finite(config, step: int, metrics, checkpointer: Checkpointer) -> None:
  """Raises ``NonFiniteLossError`` if step ``step``'s loss was not finite (unless such steps are skipped)."""
  if config.skip_nonfinite or jax.device_get(metrics["finite"]):
    return
  losses = {k: float(v) for k, v in jax.device_get(metrics).items() if k.startswith(LOSS_PREFIX)}
  latest = checkpointer.latest_step()
  kept = f"the checkpoint of step {latest} is the last good one" if latest else "no checkpoint was saved yet"
  raise NonFiniteLossError(
      f"non-finite loss at step {step} ({losses}); stopped before saving or evaluating it, and {kept}. Check the "
      f"data or lower the learning rate, or set --config.skip_nonfinite=True to skip such steps")


def _train(config, workdir: pathlib.Path, allow_config_change: bool, stop: StopRequest) -> Dict[str, float]:
  runtime.enable_compilation_cache(config, workdir)
  mesh = runtime.make_mesh()
  info, model = driver.checked_model(config, mesh)
  checkpointer = Checkpointer(workdir, config.keep)
  latest_step = checkpointer.latest_step()
  check_and_record_config(config, workdir, latest_step, allow_config_change, write=jax.process_index() == 0)
  per_host = config.global_batch_size // jax.process_count()

  fine_tune = bool(config.get("init_checkpoint")) and latest_step is None
  if config.get("init_checkpoint") and not fine_tune:
    _log.info("resuming from %s's own checkpoints; config.init_checkpoint is not read", workdir)
  if precompile.wanted(config, latest_step):
    if not fine_tune:
      backbone_file(config)  # a missing file is reported now, not after the compiles
    precompile.compile_in_fresh_process(config, workdir, stop)
  variables = _initial_variables(config, model, mesh, pipeline.first_bucket_image(config.data), fine_tune)
  optimizer, state = optimizer_and_state(config, variables, mesh)
  restored = checkpointer.restore_latest(abstract_like(state))
  if restored is not None:
    step, state, meta = restored
    _log.info("resumed from step %d (input position %d)", step, meta["input_position"])
  start = int(jax.device_get(state.step))

  schedule = optim.schedule_from_config(config.optim, config.global_batch_size, config.steps_per_epoch)
  train_step = make_train_step(model, optimizer, mesh, skip_nonfinite=config.skip_nonfinite)
  predict = make_predict_step(model, mesh)
  batches: Iterator = pipeline.train_batches(
      config.data, per_host, seed=config.seed, start_batch=start, shard_index=jax.process_index(),
      num_shards=jax.process_count(), shards_per_host=mesh.size // jax.process_count(),
      all_hosts=runtime.all_processes)
  writer = MetricWriter(workdir, enabled=jax.process_index() == 0, keep_until=start)
  eval_metrics: Dict[str, float] = {}
  progress = tqdm.tqdm(total=config.total_steps, initial=start, unit="step", dynamic_ncols=True,
                       disable=jax.process_index() != 0)
  last_time, last_step = time.perf_counter(), start
  # COCOeval of an evaluation runs in this thread while training goes on; its metrics are logged when ready.
  scoring = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="cocoeval")
  scored: List[Tuple[int, concurrent.futures.Future]] = []
  unchecked: Optional[Tuple[int, Dict]] = None  # the step whose finiteness is checked while the next one runs

  def log_scored(wait: bool) -> None:
    nonlocal eval_metrics
    while scored and (wait or scored[0][1].done()):
      at, future = scored.pop(0)
      eval_metrics = future.result()
      writer.write(at, eval_metrics, kind="eval")
      progress.write(f"step {at}: " + ", ".join(f"{k} {v:.3f}" for k, v in eval_metrics.items()
                                               if not k.startswith("AR")))

  compilation = runtime.CompilationLog("train step")
  try:
    for step in range(start + 1, config.total_steps + 1):
      batch = runtime.to_global(next(batches), mesh)
      sizes_seen = len(compilation.sizes)
      with jax.transfer_guard("disallow"), compilation.around(batch["image"]):
        state, metrics = train_step(state, batch)
      if step == start + 1:
        jax.block_until_ready(metrics)
        first_step_seconds = time.perf_counter() - last_time
        writer.write(step, {"first_step_seconds": first_step_seconds,
                            "train_step_compilations": train_step._cache_size()}, kind="compile")
        _log.info("first step (compiling or loading the step included): %.1f s", first_step_seconds)
      if len(compilation.sizes) > sizes_seen and host_memory.made_by_default():
        jax.block_until_ready(metrics)  # the resident memory counts this step's temporary buffers
        host_memory.keep_if_affordable(temporary_bytes(train_step, state, batch))
      if unchecked is not None:
        _check_finite(config, *unchecked, checkpointer)
      unchecked = step, metrics
      checkpointer.check_for_errors(step)
      progress.update(1)
      log_scored(wait=False)
      boundary = step == config.total_steps
      stopping = not boundary and stop.reached(step)
      logging_step = step % config.log_every == 0 or boundary
      saving = step % config.checkpoint_every == 0 or boundary or stopping
      evaluating = (step % config.eval_every == 0 or boundary) and not stopping
      if logging_step or saving or evaluating:
        _check_finite(config, step, metrics, checkpointer)
        unchecked = None
      if logging_step:
        now = time.perf_counter()
        scalars = {k: float(v) for k, v in jax.device_get(metrics).items()}
        scalars.update(lr=float(schedule(step - 1)), skipped_steps=int(jax.device_get(state.skipped_steps)),
                       train_step_compilations=train_step._cache_size(),
                       images_per_sec=(step - last_step) * config.global_batch_size / (now - last_time),
                       host_memory_peak_gb=host_memory.peak_resident_gb())
        last_time, last_step = now, step
        writer.write(step, scalars)
        progress.set_postfix(loss=f"{scalars['loss']:.4f}", lr=f"{scalars['lr']:.2e}",
                             img_s=f"{scalars['images_per_sec']:.1f}", host_gb=f"{scalars['host_memory_peak_gb']:.1f}")
      if saving:
        checkpointer.save(step, state, {"input_position": step}, wait=stopping)
      if stopping:
        reason = stop.signal_name or "a preemption notice"
        raise Stopped(f"{reason} received: saved the checkpoint of step {step} in {checkpointer.directory}; run "
                      f"the same command to resume")
      if evaluating:
        log_scored(wait=True)
        detections = driver.detect_eval_split(predict, {"params": state.params, "batch_stats": state.batch_stats},
                                              config, mesh, info)
        scored.append((step, scoring.submit(driver.score_detections, detections, workdir, step)))
    log_scored(wait=True)
    if not eval_metrics:
      # Nothing left to train (a finished run started again): report the final model.
      eval_metrics = driver.evaluate(predict, {"params": state.params, "batch_stats": state.batch_stats}, config,
                                     mesh, info, workdir, start)
  finally:
    scoring.shutdown(cancel_futures=True)
    progress.close()
    checkpointer.close()
    writer.close()
  return eval_metrics

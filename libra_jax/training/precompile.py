"""A CPU run's programs compiled in a fresh process before training, so that training runs as fast as a restart.

On a host where JAX computes on the CPU, a process that has compiled a large
XLA program runs programs more slowly afterwards: the compiler leaves the
heap fragmented, and under ``libra_jax.host_memory``'s malloc settings the
steps' allocations then search long free lists under one lock (the README's
benchmark section). The quick start's train step ran at 28 images/s in the
process that compiled it and at 37.5 in one that loaded it from the
persistent compilation cache (2026-12-06).

So, before anything compiles, ``train_and_evaluate`` runs
:func:`compile_run_programs` in a fresh (spawned) process, which compiles
into the run's persistent cache the programs training will run: the
initialization, and the train step and the detection step for every bucket
shape of ``config.data.buckets``, on batches of padding slots with the
batch contract's keys, dtypes and shapes. The training process then loads
them from the cache. Programs it compiles anyway (other shapes, small
helpers, ones JAX's cache settings leave out) are compiled as before, so the
run computes the same thing either way.

It applies where JAX computes on the host and the run is one process
(:func:`wanted`); ``config.precompile_in_fresh_process=False`` turns it off.
If the fresh process fails, the run logs a warning and compiles in its own
process.
"""

import concurrent.futures
import logging
import multiprocessing

import jax
import numpy as np

from libra_jax import host_memory, runtime
from libra_jax.data import pipeline
from libra_jax.evaluation import driver
from libra_jax.evaluation.predict_step import make_predict_step
from libra_jax.models.detectors import build_detector, jitted_init
from libra_jax.training.step import make_train_step, optimizer_and_state

_log = logging.getLogger(__name__)


def wanted(config) -> bool:
  """Whether a run of ``config`` compiles its programs in a fresh process first: on by config, JAX computing on the
  host, and one process."""
  return (bool(config.get("precompile_in_fresh_process", True)) and host_memory.jax_computes_on_host()
          and jax.process_count() == 1)


def compile_run_programs(config, workdir) -> int:
  """Compiles, into the persistent compilation cache that a run of ``config`` in ``workdir`` uses, the programs of
  its training and evaluation (see the module docstring). Runs only the initialization. Returns the number of
  train and detection steps compiled (two per bucket)."""
  runtime.enable_compilation_cache(config, workdir)
  mesh = runtime.make_mesh()
  model = build_detector(config.model)
  variables = jitted_init(model)(jax.random.key(config.seed), pipeline.first_bucket_image(config.data))
  optimizer, state = optimizer_and_state(config, jax.tree.map(np.asarray, variables), mesh)
  train_step = make_train_step(model, optimizer, mesh, skip_nonfinite=config.skip_nonfinite)
  predict = make_predict_step(model, mesh)
  weights = {"params": state.params, "batch_stats": state.batch_stats}
  compiled = 0
  for height, width in config.data.buckets:
    train_batch = pipeline.padding_batch(config.data, config.global_batch_size, height, width)
    train_step.lower(state, runtime.to_global(train_batch, mesh)).compile()
    eval_batch = pipeline.padding_batch(config.data, config.eval_batch_size, height, width)
    predict.lower(weights, driver.detection_inputs(eval_batch, mesh)).compile()
    compiled += 2
  return compiled


def compile_in_fresh_process(config, workdir) -> None:
  """:func:`compile_run_programs` in a fresh (spawned) process, waited for; a failure there is logged as a warning
  (the run then compiles in its own process)."""
  context = multiprocessing.get_context("spawn")
  try:
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
      compiled = pool.submit(compile_run_programs, config, str(workdir)).result()
  except Exception as error:  # pylint: disable=broad-except
    _log.warning("compiling the run's programs in a fresh process failed (%s: %s); compiling them here, where "
                 "on the CPU the steps then run more slowly (restart the run to load them from the cache)",
                 type(error).__name__, error)
    return
  _log.info("compiled %d train and detection steps in a fresh process; this one loads them from the cache",
            compiled)

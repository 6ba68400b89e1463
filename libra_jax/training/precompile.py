"""A CPU run's programs compiled in a fresh process before training, so that training runs as fast as a restart.

On a host where JAX computes on the CPU, a process that has compiled a large
XLA program runs programs more slowly afterwards: the compiler leaves the
heap fragmented, and under ``libra_jax.host_memory``'s malloc settings the
steps' allocations then search long free lists under one lock (the README's
benchmark section). The quick start's training ran at 25.7 images/s in the
process that compiled its steps and at 35.8 with this module, which took
its run from 235 to 182 s (README, Training; 2026-12-06).

So, before anything compiles, ``train_and_evaluate`` runs
:func:`compile_run_programs` in a fresh (spawned) process, which compiles
into the run's persistent cache the programs training will run: the
initialization, and the train step and the detection step for every bucket
shape of ``config.data.buckets``, on batches of padding slots with the
batch contract's keys, dtypes and shapes. The training process then loads
them from the cache. Programs it compiles anyway (other shapes, small
helpers, ones JAX's cache settings leave out) are compiled as before, so the
run computes the same thing either way.

It applies where JAX computes on the CPU, the run is one process, it is
the process's first training run (:func:`wanted`; JAX fixes its persistent
cache's directory at a process's first compile, so an ablation's later rows
could not load what a fresh process put in theirs) and it has steps left to
train (a finished run started again only evaluates);
``config.precompile_in_fresh_process=False`` turns it off. The fresh process
imports the ``--import`` modules of the command first
(``cli.imported_modules``), so that a loss they register is known there.
A SIGTERM or Ctrl-C while the fresh process compiles ends it and stops the
run before anything trained; on Linux it also ends when the training process
dies without that chance (a SIGKILL, or a second SIGTERM). If the fresh
process fails, the run logs a warning with the reason and compiles in its
own process.
"""

import ctypes
import logging
import multiprocessing
import os
import signal
import sys
from typing import Optional, Sequence

import jax
import numpy as np

from libra_jax import cli, errors, runtime
from libra_jax.data import pipeline
from libra_jax.evaluation import driver
from libra_jax.evaluation.predict_step import make_predict_step
from libra_jax.models.detectors import build_detector, jitted_init
from libra_jax.training.preemption import StopRequest
from libra_jax.training.step import make_train_step, optimizer_and_state

# How often the training process looks for a stop request while the fresh process compiles, in seconds.
POLL_SECONDS = 0.2
# prctl's option that gives a process a signal for its parent's death (linux/prctl.h).
PR_SET_PDEATHSIG = 1

_log = logging.getLogger(__name__)
# Training runs this process has started (see wanted).
_runs_started = 0


def wanted(config, latest_step: Optional[int]) -> bool:
  """Whether the training run of ``config``, whose newest checkpoint is of step ``latest_step`` (None: none yet),
  compiles its programs in a fresh process first now (see the module docstring): on by config, JAX computing on the
  CPU, one process, the process's first run, and steps left to train. Call it once per run."""
  global _runs_started
  _runs_started += 1
  return (bool(config.get("precompile_in_fresh_process", True)) and jax.default_backend() == "cpu"
          and jax.process_count() == 1 and _runs_started == 1 and (latest_step or 0) < config.total_steps)


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


def _end_with_parent(parent_pid: int) -> None:
  """Has Linux kill this process when the process ``parent_pid`` that started it dies, so that a training process
  killed outright leaves no compile running alone. Elsewhere it does nothing."""
  if not sys.platform.startswith("linux"):
    return
  libc = ctypes.CDLL(None, use_errno=True)
  if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL) != 0:
    _log.debug("prctl(PR_SET_PDEATHSIG) failed: %s; this process outlives a killed parent",
               os.strerror(ctypes.get_errno()))
  if os.getppid() != parent_pid:  # the parent died before the request took effect
    os._exit(1)


def _compile_and_answer(config, workdir: str, modules: Sequence[str], parent_pid: int, connection) -> None:
  """In the fresh process: imports ``modules`` (the command's ``--import`` ones), then runs
  :func:`compile_run_programs`; sends ``("done", count)`` or ``("error", one line)``."""
  _end_with_parent(parent_pid)
  signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the training process's to act on: it ends this one
  try:
    cli.import_modules(modules)
    connection.send(("done", compile_run_programs(config, workdir)))
  except Exception as error:  # pylint: disable=broad-except  # reported by the training process
    first_line = (errors.message(error).splitlines() or [""])[0]
    connection.send(("error", f"{type(error).__name__}: {first_line}"))


def compile_in_fresh_process(config, workdir, stop: StopRequest) -> None:
  """:func:`compile_run_programs` in a fresh (spawned) process, waited for. A failure there is logged as a warning
  with its reason (the run then compiles in its own process).

  Raises:
    errors.Stopped: ``stop`` received a signal meanwhile; the fresh process is ended first.
  """
  context = multiprocessing.get_context("spawn")
  answers, connection = context.Pipe(duplex=False)
  process = context.Process(target=_compile_and_answer,
                            args=(config, str(workdir), cli.imported_modules(), os.getpid(), connection), daemon=True)
  try:
    process.start()
    connection.close()  # the fresh process's end: when it exits, reading here ends (EOFError)
    while not answers.poll(POLL_SECONDS):
      if stop.signal_name is not None:
        raise errors.Stopped(f"{stop.signal_name} received while compiling the run's programs in a fresh process, "
                             f"before training; run the same command to start")
    try:
      status, detail = answers.recv()
    except EOFError:
      process.join()
      status, detail = "error", f"it ended with exit code {process.exitcode}"
  finally:
    if process.is_alive():
      process.terminate()
    if process.pid is not None:
      process.join()
    answers.close()
  if status == "error":
    _log.warning("compiling the run's programs in a fresh process failed (%s); compiling them here, where on the "
                 "CPU the steps then run more slowly (restart the run to load them from the cache)", detail)
    return
  _log.info("compiled %d train and detection steps in a fresh process; this one loads them from the cache",
            detail)

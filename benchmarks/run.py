"""Train and inference throughput, compile time, memory and FLOP/s of the detectors, beside torchvision's.

    python benchmarks/run.py [--quick | --accelerator] [--models=NAME[,NAME...]] [--json]

Rows (each measured in a fresh subprocess, so that its peak RSS is its own):
  * Libra Faster R-CNN (configs/libra_faster_rcnn_r50_fpn_1x_coco.py), the
    Faster R-CNN baseline (configs/faster_rcnn_r50_fpn_1x_coco.py) and the
    RetinaNet baseline (configs/retinanet_r50_fpn_1x_coco.py): ``train`` (one
    step of ``make_train_step``: forward, losses, backward, SGD update) and
    ``infer`` (``make_predict_step``), on a ``make_mesh()`` of all devices.
  * The cost of each Libra part: the baseline's train step with one part
    added (``+bfp``: the balanced feature pyramid; ``+iou_sampling``: the
    IoU-balanced R-CNN sampler and the RPN sampler's ``neg_pos_ub=5``;
    ``+balanced_l1``: balanced L1 as the R-CNN box loss), and all three (the
    Libra row), as extra seconds per step over the baseline.
  * The cost of mmcv's adaptive RoIAlign grid (``sampling_ratio=0``, the
    configs' default): Libra Faster R-CNN with the fixed ``sampling_ratio=2``
    (``+fixed_roi_grid``), train and infer at 800 x 1344, as seconds per step
    over the Libra row (negative: the fixed grid is that much faster).
  * The cost of computing each image as if padded only to its own multiple
    of 32 at test time (``model.test.own_padding``, the default): Libra
    Faster R-CNN inference with the bucket's padding instead
    (``+bucket_padding``) at 800 x 1344, as seconds per step over the Libra row.
  * torchvision's Faster R-CNN and RetinaNet R50-FPN, ``train`` (train mode
    with targets, loss backward, SGD step) and ``infer`` (eval mode, no grad),
    when torch and torchvision import (``pip install -e .[bench]``). They run
    on the CPU, built as ``fasterrcnn_resnet50_fpn`` /
    ``retinanet_resnet50_fpn`` build them (the same construction for any
    ResNet depth; a test compares it with the builders at depth 50) with our
    80 COCO classes (and, for RetinaNet, the reference's P6 from C5 and 100
    detections an image), in two setups:
      - ``torchvision``: the setup the builders choose for training from
        ImageNet weights (``weights_backbone=...``), which is also ours and
        mmdetection's: FrozenBatchNorm2d everywhere, the stem and layer1
        frozen (``trainable_backbone_layers=3``). The fair comparison.
      - ``torchvision_plain`` (train only): what they build without any
        weights: batch-statistics BatchNorm, every layer trained, so somewhat
        more work per step. (In eval mode both setups compute the same.)
    They run with our rows' initial weights and images
    (``benchmarks/torchvision_weights.py``): one network in two frameworks,
    whose maps and head outputs agree to about 1e-6 (a test asserts 1e-5;
    RetinaNet's P7 differs: torchvision puts a ReLU before it), so that
    the work that depends on the weights (how many proposals survive the
    RPN's NMS, how many detections pass the score threshold) is the same.
    Its transform's ``min_size``/``max_size`` are set so that images are not
    resized; ``ran_height``/``ran_width`` report the padded size it ran at.
    Its default proposal counts (2,000 after NMS when training) differ from
    the reference's 1,000. Our rows get ``ratio_vs_torchvision`` (ours /
    torchvision's images per second, same model, mode and shape, fair setup)
    and, for training, ``ratio_vs_torchvision_plain``. On the CPU our Faster
    R-CNN and RetinaNet rows are then timed again in turns with that fair
    torchvision row, the two steps in two live processes, each waiting for
    the other (``ratio_vs_torchvision_in_turns``,
    :func:`measure_in_turns_with_torchvision`): rows measured minutes apart
    see these shared cores at different speeds (the same step took 4.8 and
    6.0 s in two processes an hour apart on 2026-12-06).

Shapes: 800 x 1344 batch 1 (COCO's 1333 x 800 bucket) and 512 x 512 batch 2.
Inputs are synthetic batches in the input contract (random images, 8 real
boxes per image), already on the device; parameters are randomly initialized
(``model.init``; no pretrained weights). Each row: two warm-up steps, then
``steps`` timed steps, each waited for; ``step_s`` is their median and
``images_per_sec = batch / step_s``. The median, not the mean: on this
project's 2-core virtual machine about one step in five of an 8-9 s train
step took 13-15 s instead (2026-12-04, paired runs of this version's step
and the one before it, after the warm-up steps, in both), and one such step
in three moves a mean by 20%. ``compile_s``: tracing, lowering and compiling
the step (the cyclic garbage collector paused, as the train loop compiles)
with an empty persistent compilation cache (the run's own, fresh temporary
directory; each row's step is a program no earlier row compiled, which the
row checks), in a process of its own (``compile_peak_rss_mb``: its peak
memory); ``compile_cached_s``: the same in a fresh process, served from that
cache, as a restarted run compiles. That process then times the steps. The
two processes are separate because on the CPU a process that compiled the
step cold runs it slower: the Faster R-CNN R-50 train step at 800 x 1344
took 5.7-6.0 s there against 4.4-4.7 s after only loading it from the cache
(2026-12-06, three alternating pairs of processes; benchmarks/README.md).
``flops_per_sec``: the step's FLOPs by XLA's cost analysis (loop bodies
counted once, every convolution counted as a direct one and the test-time R-CNN
head over all 1,000 proposal slots: ``run.direct_flops``;
the lowered program's count, which was within 0.3% of the compiled one's for
a train step) over the measured step time; ``flops_fraction``: that over the
machine's float32 matmul rate (a jitted 2048 x 2048 matmul, in the header).
``extra_s_per_step``: what a row adds to its baseline's step at the same shape.
A part or variant row (``+bfp``, ``+fixed_roi_grid``, ...) and the Libra
train row (all three parts, against the Faster R-CNN baseline) time their
step in turns with the baseline's, both compiled in the row's process (the
baseline's from the cache its own row filled), twice as many rounds as the
setting's timed steps, and take the median of the differences: separate rows
differ by up to 10% run to run on these shared cores, more than a part costs.
``peak_rss_mb``: the row's process's peak resident memory (for a row with a
baseline, with the baseline's step too).
``proposals_per_image`` (Faster R-CNN inference, ours and torchvision's): the
mean number of RPN proposals per image after NMS, what the second stage runs
on. torchvision's R-CNN head runs on exactly its proposals, ours up to the
last eighth of the 1,000 slots that holds one (``detectors.RCNN_TEST_CHUNKS``).
Before the two frameworks shared weights (until 2026-12-05) each had random
weights of its own, and the counts differed twofold (512 x 512 batch 2: ours
572, torchvision's 267); with our weights in both they agree to about 2%
(a test checks at ResNet-18).

Every row's process, ours and torchvision's alike, first sets glibc's malloc
to keep freed memory, as every libra_jax command does on the CPU
(``libra_jax.host_memory``; ``LIBRA_JAX_KEEP_HOST_MEMORY=0`` declines it, here
too): otherwise each step page-faults its large buffers in anew. Both
frameworks gain from it; we gain more, having more temporary memory per step
(benchmarks/README.md has the paired measurements). Each row records
whether it was done in ``keeps_freed_host_memory``. Unlike training, the rows
keep it whatever their step's size, so a row whose step training would find
too large for the host (R-50 at 800 x 1344 batch 2 on a 25 GB host) measures
the faster setting, which training would give back.

The full run: ResNet-50, both shapes, 5 timed steps per row, the Libra-part
rows at both shapes, the fixed-grid and bucket-padding rows at 800 x 1344
only; 33 rows with torchvision.

``--models=NAME[,NAME...]`` keeps only the rows of those models (the
table's ``model`` column: ``retinanet_r50_fpn`` measures torchvision's
RetinaNet rows and ours, at both shapes).

``--quick`` checks that everything works: ResNet-18 instead of ResNet-50
(ours and torchvision's; every other setting unchanged), one shape, 256 x 256
batch 1, 2 timed steps, and only the rows Libra Faster R-CNN train, the
baseline train and infer, and torchvision's Faster R-CNN train and infer
(both setups for train; no Libra-part rows, no RetinaNet). Each of our rows still initializes the model
and compiles its step cold (15 to 70 s on 2 cores) and from the cache in
another process, and the Faster R-CNN rows step in turns with torchvision's
in two more, so it takes 3 to 4 minutes on a 2-core CPU (2 min 55 s on
2026-12-06).

``--accelerator`` measures one GPU or TPU (JAX's default device; torch's
CUDA device for torchvision): ResNet-50 at 800 x 1344 batch 2, mmdetection's
training shape and per-GPU batch, 10 timed steps; torchvision's four rows
in the fair setup, then our six main rows (no Libra-part rows: Libra Faster
R-CNN's train row, paired with the baseline's, gives their sum; on one H200
it took about 9 minutes before that row was paired, 4 of them the first row's
compile, which tunes each convolution's algorithm once for all the rows).
Libra Faster R-CNN's train row also gets ``ratio_vs_mmdetection_v100``: its
images/s over one V100's share of mmdetection's published 0.216 s an
iteration (8 V100s, 2 images each: 9.26 images/s a GPU). Memory is still the host's peak RSS.

A SIGTERM (from ``timeout``, say) stops the run but not the report: the row
being measured and the rows after it are reported as not measured, the
others in full, so an accelerator run cut at its time limit keeps what it has.

Output: a table on stdout; with ``--json``, one JSON object per row on stdout
instead and the table on stderr. Progress goes to stderr.
"""

import concurrent.futures
import contextlib
import datetime
import functools
import importlib.metadata
import importlib.util
import json
import multiprocessing
import pathlib
import resource
import signal
import statistics
import sys
import tempfile
import time
from typing import Any, Callable, Dict, Iterator, List, NamedTuple, Optional, Sequence, Set, Tuple

ROOT = pathlib.Path(__file__).resolve().parent.parent
# Import this checkout's libra_jax and configs, not an installed copy. JAX and torch are imported only inside
# the row functions, in the worker processes: this process stays small (its memory would otherwise count in the
# workers' peak RSS) and torch stays optional.
sys.path.insert(0, str(ROOT))
from libra_jax import cli, host_memory  # noqa: E402  (argparse, logging and ctypes only)

CONFIGS = {"libra_faster_rcnn": "configs/libra_faster_rcnn_r50_fpn_1x_coco.py",
           "faster_rcnn": "configs/faster_rcnn_r50_fpn_1x_coco.py",
           "retinanet": "configs/retinanet_r50_fpn_1x_coco.py"}
LIBRA_PARTS = ("bfp", "iou_sampling", "balanced_l1")
# torchvision's setups (see the docstring) -> the field of our rows that compares with them.
TORCHVISION_SETUPS = {"torchvision": "ratio_vs_torchvision", "torchvision_plain": "ratio_vs_torchvision_plain"}
# Classes of our COCO configs; torchvision's Faster R-CNN counts the background as one more.
NUM_CLASSES = 80
BOXES_PER_IMAGE = 8
# The second step still page-faults in memory the heap adds (libra_jax.host_memory). The heap can grow at a later
# step too (README, "Host memory on the CPU"), and such a step stays in the median.
WARMUP_STEPS = 2
# A part or variant row's rounds in turns with its baseline (paired_seconds), per timed step of the setting: a part
# costs 0.1-0.3 s of a 3-6 s step, and the rounds' differences scatter by about that much.
PAIRED_ROUNDS_PER_STEP = 2
MATMUL_SIZE = 2048
FULL = dict(depth=50, shapes=((800, 1344, 1), (512, 512, 2)), steps=5,
            ours=(("faster_rcnn", "train"), ("faster_rcnn", "infer"), ("libra_faster_rcnn", "train"),
                  ("libra_faster_rcnn", "infer"), ("retinanet", "train"), ("retinanet", "infer")),
            parts=LIBRA_PARTS, part_shapes=((800, 1344, 1), (512, 512, 2)), grid_shapes=((800, 1344, 1),),
            torchvision=("faster_rcnn", "retinanet"))
QUICK = dict(depth=18, shapes=((256, 256, 1),), steps=2,
             ours=(("faster_rcnn", "train"), ("faster_rcnn", "infer"), ("libra_faster_rcnn", "train")),
             parts=(), part_shapes=(), grid_shapes=(), torchvision=("faster_rcnn",))
# One GPU or TPU: mmdetection's training shape and per-GPU batch (images padded to 800 x 1344 in the 1333 x 800
# bucket, 2 a GPU), torchvision on torch's CUDA device.
# No part rows and no plain torchvision: on an H200 (2026-12-04) the first row's cold compile took 246 s, most of it
# tuning every convolution's algorithm once (the later rows found the tunings in the shared cache: 12-34 s each);
# this plan is meant to fit one device call of 10 minutes.
ACCELERATOR = dict(depth=50, shapes=((800, 1344, 2),), steps=10, ours=FULL["ours"], parts=(), part_shapes=(),
                   grid_shapes=(), torchvision=("faster_rcnn", "retinanet"), torchvision_setups=("torchvision",),
                   accelerator=True)
SETTINGS = {"full": FULL, "quick": QUICK, "accelerator": ACCELERATOR}
# mmdetection's published training speed of Libra Faster R-CNN R-50 FPN 1x: 0.216 s an iteration on 8 V100s, 2
# images a GPU; so one V100's share, in images per second.
MMDETECTION_V100_IMAGES_PER_SEC = 2 / 0.216


def model_name(family: str, depth: int, part: Optional[str] = None) -> str:
  """Row name: ``faster_rcnn_r50_fpn``, ``libra_faster_rcnn_r18_fpn``, ``faster_rcnn_r50_fpn+bfp``."""
  return f"{family}_r{depth}_fpn" + (f"+{part}" if part else "")


def plan(setting_name: str, with_torchvision: bool) -> List[Dict[str, Any]]:
  """The rows of ``SETTINGS[setting_name]`` to measure, in order: dicts of what a worker needs (JSON-able).

  Per shape: torchvision's rows (seconds each), our main rows, then the part
  and variant rows, so that a run cut short has the comparisons first. A row
  with a baseline comes after the baseline's own row, whose cold compile must
  be the first of its program (the row compiles the baseline's step again,
  from the cache).
  """
  setting = SETTINGS[setting_name]
  depth = setting["depth"]
  rows = []
  for height, width, batch in setting["shapes"]:
    shape = dict(height=height, width=width, batch=batch, depth=depth, steps=setting["steps"],
                 accelerator=setting.get("accelerator", False))
    if with_torchvision:
      setups = setting.get("torchvision_setups", tuple(TORCHVISION_SETUPS))
      rows += [dict(shape, framework=framework, family=family, mode=mode, model=model_name(family, depth))
               for family in setting["torchvision"]
               for framework, mode in (("torchvision", "train"), ("torchvision_plain", "train"),
                                       ("torchvision", "infer")) if framework in setups]
    for config, mode in setting["ours"]:
      row = dict(shape, framework="libra_jax", config=config, part=None, mode=mode,
                 model=model_name(config, depth))
      if with_torchvision and not shape["accelerator"] and config in setting["torchvision"]:
        row["in_turns_with_torchvision"] = True
      if config == "libra_faster_rcnn" and mode == "train":
        row["baseline_config"] = "faster_rcnn"
      rows.append(row)
    for part in setting["parts"] if (height, width, batch) in setting["part_shapes"] else ():
      rows.append(dict(shape, framework="libra_jax", config="faster_rcnn", part=part, mode="train",
                       model=model_name("faster_rcnn", depth, part), baseline_config="faster_rcnn"))
    variants = (("fixed_roi_grid", "train"), ("fixed_roi_grid", "infer"), ("bucket_padding", "infer"))
    for part, mode in variants if (height, width, batch) in setting["grid_shapes"] else ():
      rows.append(dict(shape, framework="libra_jax", config="libra_faster_rcnn", part=part, mode=mode,
                       model=model_name("libra_faster_rcnn", depth, part), baseline_config="libra_faster_rcnn"))
  return rows


def only_models(rows: List[Dict[str, Any]], models: Sequence[str]) -> List[Dict[str, Any]]:
  """The rows whose ``model`` (the table's first column) is one of ``models``, in their order.

  Raises:
    cli.UsageError: a name that no row of ``rows`` has (it lists theirs).
  """
  known = list(dict.fromkeys(row["model"] for row in rows))
  unknown = [name for name in models if name not in known]
  if unknown:
    raise cli.UsageError(f"--models: no row measures {', '.join(unknown)}; this plan's models are {', '.join(known)}")
  return [row for row in rows if row["model"] in models]


def peak_rss_mb() -> float:
  """Peak resident memory of this process so far, MiB (Linux reports KiB)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def seconds_per_step(step: Callable[[], None], warmup: int, steps: int) -> float:
  """Median wall time of ``step()`` (which must wait for its result) over ``steps`` calls after ``warmup``."""
  for _ in range(warmup):
    step()
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    step()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def paired_seconds(step: Callable[[], None], baseline_step: Callable[[], None], warmup: int,
                   rounds: int) -> Dict[str, float]:
  """A step's time, its baseline's, and what the step adds, measured in turns.

  After ``warmup`` calls of each, ``rounds`` rounds call both once each, the
  order alternating from round to round, so that both see the same state of
  the machine. Returns the medians ``step_s`` and ``baseline_step_s``,
  ``extra_s_per_step``, the median of the rounds' differences, and
  ``extra_s_per_round``, the differences in the order measured.
  """
  for _ in range(warmup):
    step()
    baseline_step()
  pairs = []
  for index in range(rounds):
    seconds = {}
    for name, function in (("step", step), ("baseline", baseline_step))[::1 if index % 2 == 0 else -1]:
      start = time.perf_counter()
      function()
      seconds[name] = time.perf_counter() - start
    pairs.append((seconds["step"], seconds["baseline"]))
  differences = [a - b for a, b in pairs]
  return dict(step_s=statistics.median(a for a, _ in pairs), baseline_step_s=statistics.median(b for _, b in pairs),
              extra_s_per_step=statistics.median(differences), extra_s_per_round=differences)


def synthetic_targets(height: int, width: int, batch: int, seed: int = 0):
  """``BOXES_PER_IMAGE`` random boxes per image and their labels.

  Returns ``(boxes [B, K, 4] float32 xyxy pixels, sides 32 px to half the
  shorter image side, inside the image; labels [B, K] int64 in 0..79)``.
  """
  import numpy as np
  rng = np.random.default_rng(seed)
  count = (batch, BOXES_PER_IMAGE)
  sizes = rng.uniform(32, min(height, width) / 2, count + (2,))
  corners = rng.uniform(0, 1, count + (2,)) * (np.array([width, height]) - sizes)
  boxes = np.concatenate([corners, corners + sizes], axis=-1).astype(np.float32)
  return boxes, rng.integers(0, NUM_CLASSES, count)


def synthetic_batch(height: int, width: int, batch: int, max_instances: int, seed: int = 0):
  """A batch in the input contract (DESIGN.md) of numpy arrays: random images, ``BOXES_PER_IMAGE`` real gt rows."""
  import numpy as np
  boxes, labels = synthetic_targets(height, width, batch, seed)
  padded_boxes = np.zeros((batch, max_instances, 4), np.float32)
  padded_boxes[:, :BOXES_PER_IMAGE] = boxes
  padded_labels = np.full((batch, max_instances), -1, np.int32)
  padded_labels[:, :BOXES_PER_IMAGE] = labels
  image = np.random.default_rng(seed).normal(size=(batch, height, width, 3)).astype(np.float32)
  return dict(image=image, image_shape=np.tile(np.array([[height, width]], np.int32), (batch, 1)),
              boxes=padded_boxes, labels=padded_labels, is_crowd=np.zeros((batch, max_instances), bool),
              valid=np.ones((batch,), bool))


def detector_config(row: Dict[str, Any]):
  """The experiment config of a row: its config file, its backbone depth, and its part (if any)."""
  from configs import base_faster_rcnn
  from libra_jax.config_loader import load_config
  config = load_config(str(ROOT / CONFIGS[row["config"]]))
  config.model.backbone.depth = row["depth"]
  libra = base_faster_rcnn.model_config(libra=True)
  if row["part"] == "bfp":
    config.model.neck.bfp = libra.neck.bfp
  elif row["part"] == "iou_sampling":
    config.model.train.rcnn.sampler = libra.train.rcnn.sampler
    config.model.train.rpn.sampler.neg_pos_ub = libra.train.rpn.sampler.neg_pos_ub
  elif row["part"] == "balanced_l1":
    config.model.rcnn.loss_bbox = libra.rcnn.loss_bbox
  elif row["part"] == "fixed_roi_grid":
    config.model.rcnn.sampling_ratio = 2
  elif row["part"] == "bucket_padding":
    config.model.test.own_padding = False
  return config


def cached_programs(cache_dir) -> Set[str]:
  """The programs in JAX's persistent compilation cache in ``cache_dir``: its ``*-cache`` files' names (one per
  program; the cache may keep other files beside them, such as access times)."""
  return {path.name for path in pathlib.Path(cache_dir).glob("*-cache")}


def cache_every_program(cache_dir: str) -> None:
  """Turns on JAX's persistent compilation cache in ``cache_dir`` for every program, however small or quick to
  compile. Call it before this process compiles anything: JAX reads the directory at its first compile."""
  import jax
  jax.config.update("jax_compilation_cache_dir", cache_dir)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def compile_timed(jitted, args, cache_dir: pathlib.Path, expect: str, pause_collector: bool = True):
  """Compiles ``jitted`` for ``args`` through the persistent cache in ``cache_dir`` and times it.

  The time covers tracing, lowering and compiling (or loading from the
  cache); with ``pause_collector``, Python's cyclic garbage collector is
  paused meanwhile, as the train and evaluation loops compile
  (``runtime.CompilationLog``). ``expect``: ``"cold"``, the program must not
  be in the cache yet (the compile must add an entry), or ``"cached"``, it
  must be there (the compile must add none); otherwise a RuntimeError, since
  the time would be of the other kind. Returns ``(compiled, seconds)``.
  """
  from libra_jax.runtime import cyclic_gc_paused
  if expect not in ("cold", "cached"):
    raise ValueError(f"expect must be 'cold' or 'cached', got {expect!r}")
  collector = cyclic_gc_paused if pause_collector else contextlib.nullcontext
  entries = cached_programs(cache_dir)
  start = time.perf_counter()
  with collector():
    compiled = jitted.lower(*args).compile()
  seconds = time.perf_counter() - start
  added = bool(cached_programs(cache_dir) - entries)
  if expect == "cold" and not added:
    raise RuntimeError(f"the cold compile added nothing to the persistent cache {cache_dir}: the program was "
                       f"already there, or the cache is off, so the compile time would be wrong")
  if expect == "cached" and added:
    raise RuntimeError(f"the cached compile added an entry to the persistent cache {cache_dir}: the program was "
                       f"not there, so the time is a cold compile's")
  return compiled, seconds


def direct_flops(jitted, args) -> float:
  """FLOPs of ``jitted(*args)`` by XLA's cost analysis of its lowered program, every convolution counted as a direct
  one and the test-time R-CNN head over every proposal slot (``detectors.flop_count_trace``). JAX's caches are
  cleared before and after, so that ``jitted`` is traced anew here and keeps no such trace for later calls."""
  import jax

  from libra_jax.models.detectors import flop_count_trace
  jax.clear_caches()
  try:
    with flop_count_trace():
      return jitted.lower(*args).cost_analysis()["flops"]
  finally:
    jax.clear_caches()


class CompiledRow(NamedTuple):
  """A libra_jax row's step, compiled (:func:`compiled_row`).

  ``step()`` takes one step and waits for it. ``count_flops()`` traces the
  step again for its FLOPs per step (:func:`direct_flops`) and
  ``count_proposals()`` runs the first stage once for the mean number of RPN
  proposals per image (None but for Faster R-CNN inference), so that callers
  who only time the compiles pay for neither. ``keeps_freed_host_memory``:
  whether the process set ``libra_jax.host_memory``'s malloc setting.
  """
  compiled: Any
  compile_s: Optional[float]
  step: Callable[[], None]
  count_flops: Callable[[], float]
  count_proposals: Callable[[], Optional[float]]
  keeps_freed_host_memory: bool


def compiled_row(row: Dict[str, Any], config, cache_dir: str, pause_collector: bool = True,
                 compile: Optional[str] = None) -> CompiledRow:
  """The step of a libra_jax row and of its experiment ``config``, compiled through the persistent cache in
  ``cache_dir``: timed as ``compile`` says (``"cold"`` or ``"cached"``: :func:`compile_timed`, its seconds in
  ``compile_s``), or untimed (None). Run in a fresh process: it sets up JAX's persistent cache."""
  kept = host_memory.keep_freed_host_memory_where_wanted()
  import jax
  cache_every_program(cache_dir)
  from libra_jax.models.detectors import FasterRCNN, build_detector
  from libra_jax.training import optim
  from libra_jax.evaluation.predict_step import make_predict_step
  from libra_jax.runtime import batch_sharding, make_mesh, replicated
  from libra_jax.training.step import make_train_step, new_train_state

  if row["accelerator"] and jax.default_backend() == "cpu":
    raise RuntimeError("an accelerator row, but JAX sees only the CPU (install jax[cuda12] or jax[tpu])")

  def compile_step(jitted, args):
    if compile is not None:
      return compile_timed(jitted, args, pathlib.Path(cache_dir), compile, pause_collector)
    return jitted.lower(*args).compile(), None
  model = build_detector(config.model)
  mesh = make_mesh()
  example = synthetic_batch(row["height"], row["width"], row["batch"], config.data.max_instances)
  batch = jax.device_put(example, batch_sharding(mesh))
  variables = jax.jit(lambda key, b: model.init(key, b, train=False))(jax.random.key(config.seed), batch)
  if row["mode"] == "train":
    optimizer = optim.make_optimizer(config.optim, row["batch"], config.steps_per_epoch, variables["params"],
                                     config.model.backbone.frozen_stages)
    state = new_train_state(variables, optimizer, jax.random.fold_in(jax.random.key(config.seed), 1))
    state = jax.device_put(state, replicated(mesh))
    jitted, args = make_train_step(model, optimizer, mesh), (state, batch)
    compiled, seconds = compile_step(jitted, args)

    def step():
      nonlocal state
      state, metrics = compiled(state, batch)
      jax.block_until_ready(metrics)
  else:
    variables = jax.device_put(variables, replicated(mesh))
    jitted, args = make_predict_step(model, mesh), (variables, batch)
    compiled, seconds = compile_step(jitted, args)

    def step():
      jax.block_until_ready(compiled(variables, batch))

  def count_proposals():
    if row["mode"] != "infer" or not isinstance(model, FasterRCNN):
      return None
    proposals = jax.jit(lambda v, b: model.apply(v, b, train=False, method=FasterRCNN.proposals))(variables, batch)
    return float(jax.numpy.mean(jax.numpy.sum(proposals.valid, axis=1)))
  return CompiledRow(compiled, seconds, step, lambda: direct_flops(jitted, args), count_proposals, kept)


def baseline_row(row: Dict[str, Any]) -> Dict[str, Any]:
  """The row that a row with a ``baseline_config`` (a part or variant row, or the Libra train row) is measured
  against: for a part or variant, its config without the part; for the Libra row, the Faster R-CNN baseline."""
  return dict(row, part=None, config=row["baseline_config"], model=model_name(row["baseline_config"], row["depth"]))


def compile_cold(row: Dict[str, Any], cache_dir: str) -> Dict[str, float]:
  """Compiles a libra_jax row's step into the persistent cache in ``cache_dir``, which must not hold it yet (run in
  a fresh process of its own, which ends after it). Returns ``compile_s`` and the process's peak memory,
  ``compile_peak_rss_mb``. The step of the row's baseline, if it has one, is compiled there too, untimed (from the
  cache, if the baseline's own row ran), so that the timing process only loads programs.

  The row's steps are timed in another process (:func:`measure_ours`), which
  loads the step from the cache, as a restarted run does: on the CPU a
  process that compiled a train step cold runs its steps slower, and loads
  programs from the cache slower (see benchmarks/README.md).
  """
  compiled = compiled_row(row, detector_config(row), cache_dir, compile="cold")
  if row.get("baseline_config"):
    baseline = baseline_row(row)
    compiled_row(baseline, detector_config(baseline), cache_dir)
  return dict(compile_s=compiled.compile_s, compile_peak_rss_mb=peak_rss_mb())


def measure_ours(row: Dict[str, Any], cache_dir: str) -> Dict[str, Any]:
  """Measures one libra_jax row whose step :func:`compile_cold` put in the cache (run in a fresh process: it sets
  up JAX's persistent cache). ``compile_cached_s``: loading it from there, timed.

  A row with a ``baseline_config`` is timed in turns with its baseline's step in the same process
  (:func:`paired_seconds`, ``PAIRED_ROUNDS_PER_STEP`` rounds per timed step):
  its ``extra_s_per_step`` is the median of their differences (``extra_s_per_round``: each round's) and
  ``paired_baseline_step_s`` the baseline's time there. Its peak memory then includes the baseline's step.
  """
  import jax
  row_step = compiled_row(row, detector_config(row), cache_dir, compile="cached")
  paired = {}
  if row.get("baseline_config"):
    baseline = baseline_row(row)
    baseline_step = compiled_row(baseline, detector_config(baseline), cache_dir).step
    times = paired_seconds(row_step.step, baseline_step, WARMUP_STEPS, PAIRED_ROUNDS_PER_STEP * row["steps"])
    seconds = times["step_s"]
    paired = dict(extra_s_per_step=times["extra_s_per_step"], extra_s_per_round=times["extra_s_per_round"],
                  paired_baseline_step_s=times["baseline_step_s"])
  else:
    seconds = seconds_per_step(row_step.step, WARMUP_STEPS, row["steps"])
  peak = peak_rss_mb()  # before counting FLOPs and proposals, which trace and compile more
  flops = row_step.count_flops()
  return dict(row, **paired, version=jax.__version__, device=jax.devices()[0].platform,
              device_kind=jax.devices()[0].device_kind, step_s=seconds,
              images_per_sec=row["batch"] / seconds, compile_cached_s=row_step.compile_s,
              flops_per_step=flops, flops_per_sec=flops / seconds, peak_rss_mb=peak,
              proposals_per_image=row_step.count_proposals(),
              keeps_freed_host_memory=row_step.keeps_freed_host_memory)


def torchvision_detector(family: str, depth: int, height: int, width: int, pretrained_setup: bool):
  """torchvision's detector with a ResNet-``depth`` FPN, random weights, for ``height x width`` inputs.

  The construction of ``fasterrcnn_resnet50_fpn`` / ``retinanet_resnet50_fpn``
  for any ResNet depth, with our class counts and two settings of the
  reference's RetinaNet: P6 from C5 (mmdetection's ``add_extra_convs=
  'on_input'``, as torchvision's ``retinanet_resnet50_fpn_v2``; the v1
  builder takes P5) and 100 detections per image (the builder keeps 300).
  ``pretrained_setup``: as they build it with ImageNet backbone weights
  (FrozenBatchNorm2d, stem and layer1 frozen), else as without weights
  (BatchNorm2d, every layer trainable). ``min_size`` and ``max_size`` are
  the shorter and longer input side, so the transform keeps images at their
  size.
  """
  import torch
  from torchvision.models import detection
  from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
  from torchvision.ops import FrozenBatchNorm2d
  from torchvision.ops.feature_pyramid_network import LastLevelP6P7
  size = dict(min_size=min(height, width), max_size=max(height, width))
  backbone = dict(backbone_name=f"resnet{depth}", weights=None,
                  norm_layer=FrozenBatchNorm2d if pretrained_setup else torch.nn.BatchNorm2d,
                  trainable_layers=3 if pretrained_setup else 5)
  if family == "faster_rcnn":
    return detection.FasterRCNN(resnet_fpn_backbone(**backbone), num_classes=NUM_CLASSES + 1, **size)
  c5_channels = 2048 if depth >= 50 else 512
  return detection.RetinaNet(resnet_fpn_backbone(**backbone, returned_layers=[2, 3, 4],
                                                 extra_blocks=LastLevelP6P7(c5_channels, 256)),
                             num_classes=NUM_CLASSES, detections_per_img=100, **size)


def our_setup(family: str, depth: int) -> Dict[str, Any]:
  """What torchvision's rows of ``family`` at ``depth`` take from ours (computed in a process of its own).

  ``weights``: our detector's initial weights (its config's seed), as our
  rows initialize them, under torchvision's names
  (``benchmarks.torchvision_weights``), numpy arrays. ``optim``: the
  config's optimizer settings (``lr_per_16``, ``momentum``, ``weight_decay``,
  ``grad_clip_norm``: 0 for none) and ``warmup_factors`` (``warmup_factors``).
  """
  import jax
  from benchmarks import torchvision_weights
  from libra_jax.convert import export_detector
  from libra_jax.models.detectors import build_detector, jitted_init
  config = detector_config(dict(config=family, depth=depth, part=None))
  variables = jitted_init(build_detector(config.model))(jax.random.key(config.seed), jax.numpy.zeros((1, 64, 64, 3)))
  weights = torchvision_weights.torchvision_state_dict(export_detector(jax.device_get(variables)), family)
  optim = {key: config.optim[key] for key in ("lr_per_16", "momentum", "weight_decay", "grad_clip_norm")}
  optim["warmup_factors"] = warmup_factors(config.optim)
  return dict(weights=weights, optim=optim)


@functools.lru_cache(maxsize=None)
def our_setup_once(family: str, depth: int) -> Dict[str, Any]:
  """``our_setup(family, depth)``, computed in a process of its own once per run and kept for the family's other
  torchvision rows (each row's process gets a copy)."""
  return run_isolated(our_setup, family, depth)


def warmup_factors(optim_config) -> List[float]:
  """Our learning rate's factor at steps 0 to ``optim_config.warmup_steps`` under its warm-up (our
  ``optim.learning_rate_schedule``, before any decay): the last is 1, and so is every later step's."""
  from libra_jax.training import optim
  schedule = optim.learning_rate_schedule(1.0, optim_config.warmup_steps, optim_config.warmup_ratio, milestones=(),
                                          gamma=1.0)
  return [float(schedule(step)) for step in range(max(optim_config.warmup_steps, 0) + 1)]


def torchvision_step(row: Dict[str, Any],
                     setup: Dict[str, Any]) -> Tuple[Callable[[], None], Callable[[float], Dict[str, Any]]]:
  """The step of one torchvision row, built in this (fresh) process on the CPU, or on torch's CUDA device for an
  accelerator row, and how to report it.

  Returns ``(step, report)``: ``step()`` takes one step and waits for it;
  ``report(step_s)`` is the measured row, given its step time.

  ``setup``: ``our_setup`` of the row's family and depth (computed in another
  process, so that JAX's memory is not this row's). The model runs with its
  weights, on our synthetic batch's images in torchvision's input space
  (``torchvision_weights.torchvision_images``), and trains with our SGD
  settings and learning-rate warm-up: at the full rate from the first step
  our weights diverge (a train row at 512 x 512 reached a loss of 1e34 by its
  third step and NaN after, keeping no proposals, so the step lost its
  second stage's work). ``finite_loss`` (train rows): every step's loss was
  finite.

  On the CPU torch flushes denormal floats to zero (``flush_denormal``: it
  could), as XLA:CPU always does: with random weights the gradients and
  momenta of the frozen-statistics layers reach the denormal range within a
  few steps, and there x86 arithmetic slows down many times over (torchvision's
  Faster R-CNN at 800 x 1344: backward 3.5 s a step, then 10-12 s from the
  fifth step on without flushing; 3.3-3.7 s throughout with it).

  On CUDA each step ends with ``torch.cuda.synchronize()``, as ours waits for
  its result; torch's defaults stand (TF32 in cuDNN convolutions, which
  XLA's GPU convolutions use too; no ``cudnn.benchmark``, as mmdetection).
  """
  kept = host_memory.keep_freed_host_memory_where_wanted()
  import torch
  import torchvision
  from benchmarks import torchvision_weights
  if row["accelerator"] and not torch.cuda.is_available():
    raise RuntimeError("an accelerator row, but torch sees no CUDA device")
  device = torch.device("cuda" if row["accelerator"] else "cpu")
  flush_denormal = torch.set_flush_denormal(True) if device.type == "cpu" else None
  torch.manual_seed(0)
  height, width, batch = row["height"], row["width"], row["batch"]
  model = torchvision_detector(row["family"], row["depth"], height, width,
                               pretrained_setup=row["framework"] == "torchvision")
  weights = setup.pop("weights")  # freed once loaded: the row's peak memory is torchvision's own
  missing, unexpected = model.load_state_dict({name: torch.from_numpy(value) for name, value in weights.items()},
                                              strict=False)
  del weights
  if unexpected or any(not name.endswith("num_batches_tracked") for name in missing):
    raise RuntimeError(f"our weights do not fit torchvision's {row['family']}: missing {missing}, "
                       f"unexpected {unexpected}")
  model = model.to(device)
  boxes, labels = synthetic_targets(height, width, batch)
  # Faster R-CNN's class 0 is the background; RetinaNet has none.
  labels = labels + (1 if row["family"] == "faster_rcnn" else 0)
  image = synthetic_batch(height, width, batch, BOXES_PER_IMAGE)["image"]
  images = list(torch.from_numpy(torchvision_weights.torchvision_images(image)).to(device))
  targets = [dict(boxes=torch.from_numpy(b).to(device), labels=torch.from_numpy(l).to(device))
             for b, l in zip(boxes, labels)]

  def wait():
    if device.type == "cuda":
      torch.cuda.synchronize()
  with torch.no_grad():
    ran_height, ran_width = model.transform(images)[0].tensors.shape[-2:]
  if row["mode"] == "train":
    model.train()
    optim = setup["optim"]
    optimizer = torch.optim.SGD(model.parameters(), lr=optim["lr_per_16"] * batch / 16, momentum=optim["momentum"],
                                weight_decay=optim["weight_decay"])
    factors = optim["warmup_factors"]
    warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: factors[min(step, len(factors) - 1)])
    finite = []

    def step():
      loss = sum(model(images, targets).values())
      optimizer.zero_grad()
      loss.backward()
      if optim["grad_clip_norm"]:
        torch.nn.utils.clip_grad_norm_(model.parameters(), optim["grad_clip_norm"])
      optimizer.step()
      warmup.step()
      finite.append(bool(torch.isfinite(loss)))
      wait()
  else:
    model.eval()

    def step():
      with torch.inference_mode():
        model(images)
      wait()

  def report(seconds: float) -> Dict[str, Any]:
    proposals_per_image = None
    if row["mode"] == "infer" and row["family"] == "faster_rcnn":
      with torch.inference_mode():
        image_list, _ = model.transform(images)
        proposals, _ = model.rpn(image_list, model.backbone(image_list.tensors))
      proposals_per_image = sum(len(boxes) for boxes in proposals) / batch
    # JAX calls a CUDA device's platform "gpu": the comparisons pair rows by that name.
    return dict(row, version=f"torch {torch.__version__}, torchvision {torchvision.__version__}",
                device="gpu" if device.type == "cuda" else "cpu",
                device_kind=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                step_s=seconds, images_per_sec=batch / seconds, compile_s=None, compile_cached_s=None,
                flops_per_step=None, flops_per_sec=None, peak_rss_mb=peak_rss_mb(),
                ran_height=int(ran_height), ran_width=int(ran_width), proposals_per_image=proposals_per_image,
                finite_loss=all(finite) if row["mode"] == "train" else None, flush_denormal=flush_denormal,
                keeps_freed_host_memory=kept)
  return step, report


def measure_torchvision(row: Dict[str, Any], setup: Dict[str, Any]) -> Dict[str, Any]:
  """Measures one torchvision row (in a fresh process): :func:`torchvision_step`, timed."""
  step, report = torchvision_step(row, setup)
  return report(seconds_per_step(step, WARMUP_STEPS, row["steps"]))


def matmul_flops_per_sec(size: int = MATMUL_SIZE, calls: int = 10) -> float:
  """float32 FLOP/s of a jitted ``size x size`` matmul on JAX's default device (2 size^3 FLOPs a call)."""
  import jax
  import jax.numpy as jnp
  a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32)
  matmul = jax.jit(jnp.matmul)
  seconds = seconds_per_step(lambda: jax.block_until_ready(matmul(a, a)), 2, calls)
  return 2 * size ** 3 / seconds


def run_isolated(function: Callable, *args):
  """``function(*args)`` in a fresh Python interpreter (spawned, not forked: it shares no memory with this one)."""
  context = multiprocessing.get_context("spawn")
  with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
    return pool.submit(function, *args).result()


def serve_steps(connection, build: Callable[..., Callable[[], None]], *args) -> None:
  """Builds a step, ``build(*args)``, then takes one step for each ``"step"`` received on ``connection`` and answers
  ``("done", None)``, until it receives anything else. Runs in a process of its own (:func:`stepping_process`).

  First answers ``("ready", None)``. If the build or a step raises, it answers ``("error", message)`` and ends.
  """
  try:
    step = build(*args)
    connection.send(("ready", None))
    while connection.recv() == "step":
      step()
      connection.send(("done", None))
  except Exception as error:  # reported to the measuring process, which raises it there
    connection.send(("error", f"{type(error).__name__}: {error}"))


def _ask(connection, process, message: Optional[str], doing: str) -> None:
  """Sends ``message`` (unless None) to ``process`` (see :func:`serve_steps`) and waits for its answer; a
  RuntimeError if the answer is an error (``doing`` says what failed) or the process ended instead."""
  try:
    if message is not None:
      connection.send(message)
    status, error = connection.recv()
  except (EOFError, OSError):  # the process ended: its end of the pipe closed
    process.join()
    raise RuntimeError(f"the stepping process ended (exit code {process.exitcode})") from None
  if status == "error":
    raise RuntimeError(f"{doing} failed: {error}")


@contextlib.contextmanager
def stepping_process(build: Callable[..., Callable[[], None]], *args) -> Iterator[Callable[[], None]]:
  """A step built by ``build(*args)`` in a fresh (spawned) process, as a function here that takes one step there and
  returns when it is done. Entering waits until the step is built; a failed build raises RuntimeError with its
  message. Leaving ends the process. ``build`` and ``args`` must pickle (a module-level function and plain data).
  """
  context = multiprocessing.get_context("spawn")
  here, there = context.Pipe()
  process = context.Process(target=serve_steps, args=(there, build) + args)
  try:
    process.start()
    there.close()  # this process's copy: the pipe then reports the child's end (EOFError) if the child dies
    _ask(here, process, None, "building the step")
    yield lambda: _ask(here, process, "step", "the step")
  finally:
    with contextlib.suppress(OSError):
      here.send("stop")
    if process.pid is not None:
      process.join(timeout=60)
      if process.is_alive():
        process.terminate()
        process.join()
    here.close()
    there.close()


def our_step(row: Dict[str, Any], cache_dir: str) -> Callable[[], None]:
  """The step of a libra_jax row, compiled (through the persistent cache in ``cache_dir``) in this process."""
  return compiled_row(row, detector_config(row), cache_dir).step


def torchvision_step_alone(row: Dict[str, Any], setup: Dict[str, Any]) -> Callable[[], None]:
  """The step of :func:`torchvision_step`, without its report."""
  return torchvision_step(row, setup)[0]


def torchvision_row_of(row: Dict[str, Any]) -> Dict[str, Any]:
  """The fair-setup torchvision row of the same model, mode and shape as our ``row``."""
  return dict(row, framework="torchvision", family=row["config"])


def measure_in_turns_with_torchvision(row: Dict[str, Any], cache_dir: str) -> Dict[str, Any]:
  """Our row's step and torchvision's (fair setup, same model, mode and shape), stepping in turns.

  Each step is built in a process of its own (:func:`stepping_process`;
  ours from the cache its row filled), the two processes live side by side,
  and :func:`paired_seconds` calls them in turns (the order alternating, each
  waiting for the other), so that both see the same state of the machine:
  separate rows of one run differ by up to 0.14x in their ratio on these
  shared cores, and the machine's speed drifts between rows minutes apart.
  ``ratio_vs_torchvision_in_turns``: torchvision's median step time over
  ours (ours / theirs in images per second); ``in_turns_step_s`` and
  ``in_turns_torchvision_step_s``: the medians; ``in_turns_extra_s_per_round``:
  each round's difference, ours minus theirs.
  """
  setup = our_setup_once(row["config"], row["depth"])
  with stepping_process(our_step, row, cache_dir) as ours, \
       stepping_process(torchvision_step_alone, torchvision_row_of(row), setup) as theirs:
    times = paired_seconds(ours, theirs, WARMUP_STEPS, PAIRED_ROUNDS_PER_STEP * row["steps"])
  return dict(in_turns_step_s=times["step_s"], in_turns_torchvision_step_s=times["baseline_step_s"],
              ratio_vs_torchvision_in_turns=times["baseline_step_s"] / times["step_s"],
              in_turns_extra_s_per_round=times["extra_s_per_round"])


def add_comparisons(rows: List[Dict[str, Any]], matmul_rate: float) -> None:
  """Fills in ``flops_fraction``, ``ratio_vs_torchvision[_plain]`` and ``ratio_vs_mmdetection_v100`` where they
  apply (``extra_s_per_step`` a row measures itself, in turns with its baseline: :func:`measure_ours`).

  ``ratio_vs_torchvision`` (``_plain``): a libra_jax row's images/s over the
  ``torchvision`` (``torchvision_plain``) row of the same model, mode, shape
  and device kind. ``ratio_vs_mmdetection_v100``
  (Libra Faster R-CNN R-50 training at 800 x 1344 on an accelerator): its
  images/s over one V100's share of mmdetection's published speed. Rows with
  an ``error`` are left as they are and match nothing.
  """
  def key(row, model):
    return model, row["mode"], row["height"], row["width"], row["batch"]

  done = [row for row in rows if "error" not in row]
  theirs = {(r["framework"],) + key(r, r["model"]) + (r["device"],): r for r in done
            if r["framework"] in TORCHVISION_SETUPS}
  for row in done:
    if row["flops_per_sec"] is not None:
      row["flops_fraction"] = row["flops_per_sec"] / matmul_rate
    if row["framework"] != "libra_jax":
      continue
    for framework, field in TORCHVISION_SETUPS.items():
      other = theirs.get((framework,) + key(row, row["model"]) + (row["device"],))
      if other is not None:
        row[field] = row["images_per_sec"] / other["images_per_sec"]
    if (row["model"], row["mode"], row["height"], row["width"]) == (model_name("libra_faster_rcnn", 50), "train",
                                                                    800, 1344) and row["device"] != "cpu":
      row["ratio_vs_mmdetection_v100"] = row["images_per_sec"] / MMDETECTION_V100_IMAGES_PER_SEC


def shape_label(row: Dict[str, Any]) -> str:
  """``800x1344 b1``: height x width and batch size."""
  return f"{row['height']}x{row['width']} b{row['batch']}"


def _number(field: str, spec: str, scale: float = 1.0) -> Callable[[Dict[str, Any]], str]:
  """A table cell: ``row[field] * scale`` formatted by ``spec``, ``-`` where the field does not apply."""
  return lambda row: "-" if row.get(field) is None else spec.format(row[field] * scale)


COLUMNS = (("model", lambda row: row["model"]), ("framework", lambda row: row["framework"]),
           ("mode", lambda row: row["mode"]), ("shape", shape_label),
           ("img/s", _number("images_per_sec", "{:.3f}")), ("s/step", _number("step_s", "{:.3f}")),
           ("compile s", _number("compile_s", "{:.1f}")), ("cached s", _number("compile_cached_s", "{:.1f}")),
           ("peak MB", _number("peak_rss_mb", "{:.0f}")), ("GFLOP/s", _number("flops_per_sec", "{:.1f}", 1e-9)),
           ("of matmul", _number("flops_fraction", "{:.0%}")),
           ("proposals", _number("proposals_per_image", "{:.0f}")),
           ("vs tv", _number("ratio_vs_torchvision", "{:.2f}x")),
           ("vs tv plain", _number("ratio_vs_torchvision_plain", "{:.2f}x")),
           ("vs tv in turns", _number("ratio_vs_torchvision_in_turns", "{:.2f}x")),
           ("extra s/step", _number("extra_s_per_step", "{:+.3f}")),
           ("vs mmdet V100", _number("ratio_vs_mmdetection_v100", "{:.2f}x")))
TEXT_COLUMNS = 4


def format_table(rows: List[Dict[str, Any]], header: str) -> str:
  """``header``, then one aligned line per row (``-`` where a value does not apply; a failed row says why)."""
  cells = [[title for title, _ in COLUMNS]]
  failures = []
  for row in rows:
    if "error" in row:
      failures.append(f"{row['model']} {row['mode']} {shape_label(row)}: failed: {row['error']}")
    else:
      cells.append([cell(row) for _, cell in COLUMNS])
      if "in_turns_error" in row:
        failures.append(f"{row['model']} {row['mode']} {shape_label(row)}: in turns with torchvision: failed: "
                        f"{row['in_turns_error']}")
  widths = [max(len(line[i]) for line in cells) for i in range(len(COLUMNS))]
  lines = [header] + ["  ".join(cell.ljust(w) if i < TEXT_COLUMNS else cell.rjust(w)
                                for i, (cell, w) in enumerate(zip(line, widths))) for line in cells]
  return "\n".join(lines + failures)


def torchvision_available() -> bool:
  """Whether torch and torchvision can be imported (found without importing them)."""
  return all(importlib.util.find_spec(name) is not None for name in ("torch", "torchvision"))


# SIGTERMs received since stop_on_sigterm: a row's later phases do not start after one.
_SIGTERMS_RECEIVED: List[int] = []


def measure(row: Dict[str, Any], cache_dir: str) -> Dict[str, Any]:
  """One row in its own process; a failure becomes the row with an ``error``. A row marked
  ``in_turns_with_torchvision`` is then also timed in turns with torchvision's
  (:func:`measure_in_turns_with_torchvision`); a failure there becomes its ``in_turns_error``."""
  try:
    if row["framework"] in TORCHVISION_SETUPS:
      return run_isolated(measure_torchvision, row, our_setup_once(row["family"], row["depth"]))
    compiled = run_isolated(compile_cold, row, cache_dir)
    if _SIGTERMS_RECEIVED:
      raise RuntimeError("stopped (SIGTERM) after the cold compile")
    measured = dict(run_isolated(measure_ours, row, cache_dir), **compiled)
  except Exception as error:  # a crashed worker, an out-of-memory kill, an exception in the row
    return dict(row, error=f"{type(error).__name__}: {error}")
  if row.get("in_turns_with_torchvision"):
    if _SIGTERMS_RECEIVED:
      measured["in_turns_error"] = "not measured: the run was stopped (SIGTERM)"
      return measured
    try:
      measured.update(measure_in_turns_with_torchvision(row, cache_dir))
    except Exception as error:  # the row's own measurements stand
      stopped = " (stopped by SIGTERM)" if _SIGTERMS_RECEIVED else ""
      measured["in_turns_error"] = f"{type(error).__name__}: {error}{stopped}"
  return measured


def stop_on_sigterm() -> Callable[[], bool]:
  """From now on, SIGTERM (``timeout``'s signal) ends the row in flight instead of the run.

  The handler terminates this process's worker processes, so the row being
  measured fails at once, and :func:`measure` starts none of the row's later
  phases. Returns a function that tells whether a SIGTERM came: then the
  caller measures no more rows and reports those it has.
  """
  def handler(signum, frame):
    _SIGTERMS_RECEIVED.append(signum)
    for child in multiprocessing.active_children():
      child.terminate()

  signal.signal(signal.SIGTERM, handler)
  return lambda: bool(_SIGTERMS_RECEIVED)


def main(argv) -> int:
  parser = cli.ArgumentParser(prog="python benchmarks/run.py", description=__doc__.split("\n")[0], config=None)
  parser.add_argument("--quick", action="store_true", help="ResNet-18, 256x256 batch 1, fewer rows (minutes)")
  parser.add_argument("--accelerator", action="store_true",
                      help="ResNet-50 at 800x1344 batch 2 on JAX's GPU/TPU and torch's CUDA device")
  parser.add_argument("--json", action="store_true", help="JSON lines on stdout, the table on stderr")
  parser.add_argument("--models", metavar="NAME[,NAME...]",
                      help="measure only the rows of these models (the table's model column, e.g. retinanet_r50_fpn)")
  args = parser.parse_args(argv)
  if args.quick and args.accelerator:
    parser.error("--quick and --accelerator are two different sets of rows: choose one")
  with_torchvision = torchvision_available()
  if not with_torchvision:
    print("torch/torchvision not importable: torchvision rows skipped (pip install -e .[bench])", file=sys.stderr)
  rows = plan("quick" if args.quick else "accelerator" if args.accelerator else "full", with_torchvision)
  if args.models:
    rows = only_models(rows, args.models.split(","))
  matmul_rate = run_isolated(matmul_flops_per_sec)
  date = datetime.date.today().isoformat()
  results = []
  stopped = stop_on_sigterm()
  with tempfile.TemporaryDirectory(prefix="libra_jax_bench_xla_cache_") as cache_dir:
    for index, row in enumerate(rows, 1):
      if stopped():
        results.append(dict(row, date=date, error="not measured: the run was stopped (SIGTERM)"))
        continue
      start = time.perf_counter()
      results.append(dict(measure(row, cache_dir), date=date))
      if stopped() and "error" in results[-1]:  # a row measured in full keeps its numbers
        results[-1] = dict(row, date=date, error="stopped (SIGTERM) while being measured")
      done = results[-1]
      outcome = done.get("error") or (f"{done['images_per_sec']:.3f} images/s, {done['step_s']:.4f} s/step"
                                      + (f", compile {done['compile_s']:.1f} s" if done["compile_s"] else ""))
      print(f"[{index}/{len(rows)}] {row['model']} {row['framework']} {row['mode']} {shape_label(row)}: "
            f"{outcome} ({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
  add_comparisons(results, matmul_rate)
  versions = [f"jax {importlib.metadata.version('jax')}"]
  if with_torchvision:
    versions += [f"torch {importlib.metadata.version('torch')}",
                 f"torchvision {importlib.metadata.version('torchvision')}"]
  kinds = sorted({row["device_kind"] for row in results if "device_kind" in row})
  header = (f"libra_jax benchmarks, {date}, {', '.join(versions)}, on {' and '.join(kinds) or '?'}; float32 matmul "
            f"{MATMUL_SIZE}x{MATMUL_SIZE}: {matmul_rate / 1e9:.1f} GFLOP/s")
  table = format_table(results, header)
  if args.json:
    for result in results:
      print(json.dumps(dict(result, matmul_flops_per_sec=matmul_rate)))
  print(table, file=sys.stderr if args.json else sys.stdout)
  return 0


if __name__ == "__main__":
  cli.run(main)

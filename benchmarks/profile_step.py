"""Where a Faster R-CNN train step's time goes: each stage timed alone, forward and backward.

    python benchmarks/profile_step.py --config=configs/libra_faster_rcnn_r50_fpn_1x_coco.py \
        [--height 800 --width 1344 --batch 1] [--repeats 3] [--json] [--trace DIR]

Stages, in the step's order (the functions the detector itself calls, from
``libra_jax.models.detectors``):

  backbone_neck   ResNet and FPN (and the balanced feature pyramid): forward, backward to the parameters
  rpn_head        the RPN convolutions: forward, backward to the parameters and the features
  rpn_loss        anchor assignment, anchor sampling and the RPN losses: forward, backward to the head's outputs
  proposals       decode, per-level top-k, NMS (no gradient flows through them)
  rcnn_sampling   proposal assignment and R-CNN sampling (no gradient)
  roi_align       multi-level RoIAlign: forward, backward to the features
  rcnn_head       the box head's fully connected layers: forward, backward to the parameters and RoI features
  rcnn_loss       the R-CNN losses: forward, backward to the head's outputs
  optimizer       the SGD update of every parameter

and ``step``, the whole train step (``make_train_step`` on one device).

Method. The inputs of each stage are what the step would give it: the stages
before it, run once on a synthetic batch (``benchmarks.run.synthetic_batch``:
random images, 8 boxes each) with randomly initialized parameters. Each stage
is its own jitted function; its time is the median of ``--repeats`` calls
after a warm-up call (which compiles). The backward time is that of the
jitted forward-and-backward (``jax.vjp`` with a cotangent of ones) minus the
forward's. Stages timed alone need not add up to the step: in the step XLA
fuses across their borders and skips gradients nobody uses (the frozen stem
and layer1), so ``stages_sum_s`` is printed beside ``step_s``.

``non_conv_fraction`` = 1 - (backbone_neck + rpn_head + rcnn_head, forward and
backward) / ``step_s``: the share of the step spent outside the convolutions
and the box head's matmuls (clipped to [0, 1]).

The staged losses are checked against the model's own on the same batch and
keys (``staged_loss``, ``model_loss``): the stages are the step's.

Two fresh processes do the work, one after the other. The first compiles
every program into a persistent compilation cache of its own (a temporary
directory) and times nothing. The second loads them all from that cache
and times them. On the CPU a process that has compiled large programs runs
them more slowly afterwards (benchmarks/README.md): measured in
the compiling process, Libra Faster R-CNN R-50's step at 800x1344 took
6.0-6.1 s against its stages' 5.1-5.3 s, and loaded from the cache
4.7-4.9 s against 4.7-5.2 s in four runs (a fifth: 5.8 against 5.0 s;
2026-12-06). ``compiled_while_timing``
counts the programs the second process had to compile after all (0 unless
the cache missed).

``--trace DIR`` also records two whole steps with ``jax.profiler`` into DIR
(TensorBoard's profile plugin and Perfetto read it). On the CPU it then
measures the same share a second way, inside the whole step:
``non_conv_fraction_ops`` is the traced steps' time in operations that are
neither convolutions nor matmuls (``benchmarks/trace_ops.py``: each XLA
operation's own time, a fusion counted under the convolution or matmul it
contains) over the time of all of them, and ``op_seconds`` gives the seconds
per step of each kind (operation time, which may exceed the step's wall time
where operations overlap). That share is stricter than the stages': BatchNorm,
ReLU and the residual adds inside the backbone count as non-convolution work
there (XLA:CPU does not fuse them into its convolutions; an accelerator's
compiler mostly does). ``stage_op_seconds`` divides the same operation
time among the stages above by the code that made each operation (its
``op_name``: the modules' names and the ``jax.named_scope``s that the detector
and the train step put around the proposals, the sampling, RoIAlign, the
losses and the optimizer; ``STAGE_SCOPES``), forward and backward together,
and ``unscoped`` (operations that no stage's code made: the losses' sum, the
gradient norm and other metrics, the anchors, and convolutions and layout
copies that XLA's passes leave without metadata), which
``unscoped_op_seconds`` splits by kind. ``non_conv_fraction_in_step`` = 1 -
(backbone_neck + rpn_head + rcnn_head + the unscoped convolutions and
matmuls) / all of it: the stage method's share, measured inside the whole
step rather than stage by stage, so nothing falls between the stages.

``--json`` prints one JSON object (``step_s``, ``stages``: name -> seconds,
forward plus backward; ``forward``, ``backward``: name -> seconds;
``non_conv_fraction``, ``op_seconds``, ``non_conv_fraction_ops``,
``stage_op_seconds``, ``unscoped_op_seconds``, ``non_conv_fraction_in_step``,
...). Run
it with the cores to itself.
"""

import contextlib
import json
import pathlib
import sys
import tempfile
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import trace_ops  # noqa: E402
from libra_jax import cli, host_memory  # noqa: E402

STAGES = ("backbone_neck", "rpn_head", "rpn_loss", "proposals", "rcnn_sampling", "roi_align", "rcnn_head",
          "rcnn_loss", "optimizer")
CONV_STAGES = ("backbone_neck", "rpn_head", "rcnn_head")
# Stage -> the op_name components that mark its operations in the compiled step: the modules' names and the
# ``jax.named_scope``s of ``libra_jax.models.detectors`` and ``libra_jax.training.step`` (forward and backward alike).
STAGE_SCOPES = {"backbone_neck": ("backbone", "neck"), "rpn_head": ("rpn_head",), "rpn_loss": ("rpn_loss",),
                "proposals": ("proposals",), "rcnn_sampling": ("rcnn_sampling",), "roi_align": ("roi_align",),
                "rcnn_head": ("roi_head",), "rcnn_loss": ("rcnn_loss",), "optimizer": ("optimizer",)}
TRACED_STEPS = 2


def median_seconds(function: Callable, args: Sequence[Any], repeats: int) -> float:
  """Median wall time of ``function(*args)``, waited for, over ``repeats`` calls after one warm-up call."""
  import jax

  from benchmarks.run import seconds_per_step
  return seconds_per_step(lambda: jax.block_until_ready(function(*args)), 1, repeats)


def compile_only(function: Callable, args: Sequence[Any]) -> float:
  """Compiles jitted ``function`` for ``args`` (through the persistent cache, where one is set up) without running
  it; 0 seconds. A plain function (the train step's ``one_step``, compiled already) is left alone."""
  if hasattr(function, "lower"):
    function.lower(*args).compile()
  return 0.0


def forward_and_backward(function: Callable) -> Callable:
  """``function(*args)`` -> a jitted ``(*args) -> gradients of every arg`` under a cotangent of ones."""
  import jax
  import jax.numpy as jnp

  def both(*args):
    out, pullback = jax.vjp(function, *args)
    return pullback(jax.tree.map(jnp.ones_like, out))

  return jax.jit(both)


@contextlib.contextmanager
def cache_keyed_by_metadata():
  """Within: JAX's persistent compilation cache (where one is set up) keys programs by their metadata too.

  By default its key leaves out source locations, and with them the
  ``op_name``s that ``trace_ops.seconds_by_scope`` reads: an executable
  cached by older code would bring that code's names (a stale entry left
  every named scope of the step out, 2026-12-05).
  """
  import jax
  before = jax.config.jax_compilation_cache_include_metadata_in_key
  jax.config.update("jax_compilation_cache_include_metadata_in_key", True)
  try:
    yield
  finally:
    jax.config.update("jax_compilation_cache_include_metadata_in_key", before)


def compiled_train_step(model, optimizer, variables, batch) -> Tuple[Callable[[], Any], Any]:
  """``make_train_step`` on one device, compiled now for ``batch`` (numpy).

  Returns ``(one_step, compiled)``: a call of ``one_step()`` takes one step
  and returns its metrics; ``compiled`` is the compiled program. The state
  starts from ``variables`` (whose arrays the first call donates) and
  carries from call to call.
  """
  import jax

  from libra_jax import runtime
  from libra_jax.training.step import make_train_step, new_train_state

  mesh = runtime.make_mesh(jax.devices()[:1])
  state = jax.device_put(new_train_state(variables, optimizer, jax.random.key(2)), runtime.replicated(mesh))
  global_batch = runtime.to_global(batch, mesh)
  with cache_keyed_by_metadata():
    compiled = make_train_step(model, optimizer, mesh).lower(state, global_batch).compile()

  def one_step():
    nonlocal state
    state, metrics = compiled(state, global_batch)
    return metrics

  return one_step, compiled


def profile(config, height: int, width: int, batch_size: int, repeats: int, trace_dir=None,
            timer: Optional[Callable[[Callable, Sequence[Any]], float]] = None) -> Dict[str, Any]:
  """Times the stages of ``config``'s train step on a ``batch_size x height x width`` batch; see the module doc.

  ``timer(function, args)`` gives the seconds of one program: by default the median of ``repeats`` calls
  (:func:`median_seconds`); :func:`compile_only` only compiles each program (its result's times are then 0).
  """
  if timer is None:
    timer = lambda function, args: median_seconds(function, args, repeats)  # noqa: E731
  import jax
  import jax.numpy as jnp
  import optax

  from benchmarks.run import synthetic_batch
  from libra_jax.models import detectors
  from libra_jax.models.roi_head import rcnn_loss
  from libra_jax.models.rpn import rpn_loss
  from libra_jax.training import optim

  model = detectors.build_detector(config.model)
  cfg = model.cfg
  batch = jax.tree.map(jnp.asarray, synthetic_batch(height, width, batch_size, config.data.max_instances))
  variables = detectors.jitted_init(model)(jax.random.key(config.seed), batch["image"])
  params, batch_stats = variables["params"], variables["batch_stats"]
  keys = jax.random.split(jax.random.key(1), batch_size)
  rpn_keys, rcnn_keys = detectors.stage_keys(keys)
  gt_valid, ignore_valid = detectors.gt_masks(batch)
  example_valid = batch["valid"].astype(jnp.float32)

  # Each stage is jitted once: the same program computes the next stage's inputs, is timed, and is differentiated.
  def part(names, method):
    """A jitted ``(params of the named children, x) -> method(module, x)`` with the model's BatchNorm statistics."""
    return jax.jit(lambda p, x: model.apply({"params": p, "batch_stats": batch_stats}, x, method=method)), \
        {name: params[name] for name in names}

  backbone_neck, backbone_params = part(("backbone", "neck"), lambda m, image: m.features(image))
  rpn_head, rpn_params = part(("rpn_head",), lambda m, features: m.rpn_outputs(features))
  box_head, box_params = part(("roi_head",), lambda m, pooled: m.box_head(pooled))

  features = backbone_neck(backbone_params, batch["image"])
  logits, deltas = rpn_head(rpn_params, features)
  per_level, anchors, anchor_valid = detectors.feature_anchors(features, cfg["anchors"], batch["image_shape"])

  @jax.jit
  def rpn_losses(logits, deltas):
    losses = rpn_loss(rpn_keys, logits, deltas, anchors, anchor_valid, batch["boxes"], gt_valid, ignore_valid,
                      example_valid, train_cfg=cfg["train"]["rpn"], loss_cfg=cfg["rpn"])
    return losses["loss_rpn_cls"] + losses["loss_rpn_bbox"]

  @jax.jit
  def proposals_of(logits, deltas):
    return detectors.batch_proposals(logits, deltas, per_level, anchor_valid, batch["image_shape"],
                                     cfg["train"]["rpn_proposal"])

  proposals = proposals_of(logits, deltas)

  @jax.jit
  def sampling(proposals):
    return detectors.batch_sample_rois(rcnn_keys, proposals, batch, model.roi_head.num_classes,
                                       cfg["train"]["rcnn"])

  sampled = sampling(proposals)
  align = jax.jit(lambda features: detectors.align_rois(features, sampled.rois, cfg["rcnn"]))
  pooled = align(features)
  cls_logits, reg_deltas = box_head(box_params, pooled)

  @jax.jit
  def rcnn_losses(cls_logits, reg_deltas):
    losses = rcnn_loss(cls_logits, reg_deltas, sampled, example_valid, cfg=cfg["rcnn"])
    return losses["loss_cls"] + losses["loss_bbox"]

  optimizer = optim.make_optimizer(config.optim, batch_size, config.steps_per_epoch, params,
                                   config.model.backbone.frozen_stages)
  opt_state = optimizer.init(params)
  update = jax.jit(lambda grads, state, p: optax.apply_updates(p, optimizer.update(grads, state, p)[0]))

  timed = {  # name -> (jitted forward function, its arguments, whether it has a backward pass)
      "backbone_neck": (backbone_neck, (backbone_params, batch["image"]), True),
      "rpn_head": (rpn_head, (rpn_params, features), True),
      "rpn_loss": (rpn_losses, (logits, deltas), True),
      "proposals": (proposals_of, (logits, deltas), False),
      "rcnn_sampling": (sampling, (proposals,), False),
      "roi_align": (align, (features,), True),
      "rcnn_head": (box_head, (box_params, pooled), True),
      "rcnn_loss": (rcnn_losses, (cls_logits, reg_deltas), True),
  }
  forward, backward = {}, {}
  for name, (function, args, differentiable) in timed.items():
    forward[name] = timer(function, args)
    backward[name] = max(timer(forward_and_backward(function), args) - forward[name], 0.0) \
        if differentiable else 0.0
  forward["optimizer"], backward["optimizer"] = timer(update, (params, opt_state, params)), 0.0

  staged_loss = float(rpn_losses(logits, deltas) + rcnn_losses(cls_logits, reg_deltas))
  model_loss = float(jax.jit(lambda v, b, k: model.apply(v, b, train=True, keys=k)["loss"])(variables, batch, keys))
  # The train step donates its state, which starts from these very arrays: it comes last.
  one_step, compiled = compiled_train_step(model, optimizer, variables, jax.device_get(batch))
  step_s = timer(one_step, ())
  stage_op_seconds = None
  if trace_dir:
    with jax.profiler.trace(str(trace_dir)):
      for _ in range(TRACED_STEPS):
        jax.block_until_ready(one_step())
    if jax.devices()[0].platform == "cpu":
      stage_op_seconds = trace_ops.seconds_by_scope(trace_dir, compiled.as_text(), STAGE_SCOPES, steps=TRACED_STEPS)

  stages = {name: forward[name] + backward[name] for name in STAGES}
  conv = sum(stages[name] for name in CONV_STAGES)
  return {"config_model": config.model.type, "depth": config.model.backbone.depth, "height": height, "width": width,
          "batch": batch_size, "repeats": repeats, "device": jax.devices()[0].platform, "jax": jax.__version__,
          "step_s": step_s, "stages": stages, "forward": forward, "backward": backward,
          "stages_sum_s": sum(stages.values()),
          "non_conv_fraction": min(max(1.0 - conv / step_s, 0.0), 1.0) if step_s else None,
          "staged_loss": staged_loss, "model_loss": model_loss, **op_shares(stage_op_seconds)}


def op_shares(stage_op_seconds) -> Dict[str, Any]:
  """The result's fields from the traced steps' seconds per stage and kind of operation
  (``trace_ops.seconds_by_scope``; none without a CPU trace)."""
  if stage_op_seconds is None:
    return {}
  op_seconds = {kind: sum(kinds[kind] for kinds in stage_op_seconds.values()) for kind in trace_ops.KINDS}
  by_stage = {name: sum(kinds.values()) for name, kinds in stage_op_seconds.items()}
  unscoped = stage_op_seconds[trace_ops.UNSCOPED]
  conv = sum(by_stage[name] for name in CONV_STAGES) + unscoped["conv"] + unscoped["dot"]
  return {"op_seconds": op_seconds, "non_conv_fraction_ops": op_seconds["other"] / sum(op_seconds.values()),
          "stage_op_seconds": by_stage, "unscoped_op_seconds": unscoped,
          "non_conv_fraction_in_step": 1.0 - conv / sum(by_stage.values())}


def profile_with_cache(cache_dir: str, config, height: int, width: int, batch_size: int, repeats: int,
                       trace_dir=None, only_compile: bool = False) -> Dict[str, Any]:
  """:func:`profile` through JAX's persistent compilation cache in ``cache_dir`` (run in a fresh process: it sets the
  cache up, and ``host_memory``'s malloc settings where JAX computes on the host). ``only_compile``: fill the cache
  (:func:`compile_only`), time nothing and return an empty dict."""
  from benchmarks.run import cache_every_program

  host_memory.keep_freed_host_memory_where_wanted()
  cache_every_program(cache_dir)
  # One call for both passes: the train step's cache key includes its metadata, whose stack frames name this line.
  result = profile(config, height, width, batch_size, repeats, None if only_compile else trace_dir,
                   compile_only if only_compile else None)
  return {} if only_compile else result


def profile_in_two_processes(config, height: int, width: int, batch_size: int, repeats: int,
                             trace_dir=None) -> Dict[str, Any]:
  """:func:`profile`, its programs compiled in one fresh process and timed in another that loads them from the
  first's cache (see the module doc); the result also has ``compiled_while_timing``."""
  from benchmarks.run import cached_programs, run_isolated

  with tempfile.TemporaryDirectory(prefix="profile_step_cache_") as cache_dir:
    run_isolated(profile_with_cache, cache_dir, config, height, width, batch_size, repeats, None, True)
    compiled = cached_programs(cache_dir)
    result = run_isolated(profile_with_cache, cache_dir, config, height, width, batch_size, repeats, trace_dir)
    return dict(result, compiled_while_timing=len(cached_programs(cache_dir) - compiled))


def format_table(result: Dict[str, Any]) -> str:
  lines = [f"{result['config_model']} R-{result['depth']}, {result['height']}x{result['width']} batch "
           f"{result['batch']}, {result['device']}, median of {result['repeats']}",
           f"{'stage':<15}{'forward s':>11}{'backward s':>12}{'total s':>10}{'of step':>9}"]
  for name in STAGES:
    total = result["stages"][name]
    lines.append(f"{name:<15}{result['forward'][name]:>11.3f}{result['backward'][name]:>12.3f}{total:>10.3f}"
                 f"{total / result['step_s']:>9.1%}")
  summed = result["stages_sum_s"]
  lines.append(f"{'stages, summed':<38}{summed:>10.3f}{summed / result['step_s']:>9.1%}")
  lines.append(f"{'step':<38}{result['step_s']:>10.3f}")
  lines.append(f"non_conv_fraction {result['non_conv_fraction']:.3f}; staged loss {result['staged_loss']:.6f}, "
               f"model loss {result['model_loss']:.6f}")
  if "op_seconds" in result:
    seconds = result["op_seconds"]
    lines.append(f"traced step by operation: convolutions {seconds['conv']:.3f} s, matmuls {seconds['dot']:.3f} s, "
                 f"other {seconds['other']:.3f} s; non_conv_fraction_ops {result['non_conv_fraction_ops']:.3f}")
    by_stage = result["stage_op_seconds"]
    total = sum(by_stage.values())
    lines.append(f"traced step by stage (operation time, {total:.3f} s): " + ", ".join(
        f"{name} {by_stage[name]:.3f}" for name in (*STAGES, trace_ops.UNSCOPED)))
    unscoped = result["unscoped_op_seconds"]
    lines.append(f"of which unscoped: convolutions {unscoped['conv']:.3f} s, matmuls {unscoped['dot']:.3f} s, other "
                 f"{unscoped['other']:.3f} s; non_conv_fraction_in_step {result['non_conv_fraction_in_step']:.3f}")
  return "\n".join(lines)


def add_step_flags(parser: cli.ArgumentParser, height: int, width: int, batch: int,
                   repeats_help: str = "timed calls of each program (the median is reported)") -> None:
  """``--height``, ``--width``, ``--batch`` (with these defaults) and ``--repeats``: the step a benchmark times."""
  parser.add_argument("--height", type=int, default=height, help="padded image height in pixels")
  parser.add_argument("--width", type=int, default=width, help="padded image width in pixels")
  parser.add_argument("--batch", type=int, default=batch, help="images per step")
  parser.add_argument("--repeats", type=int, default=3, help=repeats_help)


def parse_step_flags(parser: cli.ArgumentParser, argv):
  """``parser.parse_args(argv)``, with a usage error unless the ``add_step_flags`` values are at least 1."""
  args = parser.parse_args(argv)
  for flag in ("height", "width", "batch", "repeats"):
    if getattr(args, flag) < 1:
      parser.error(f"--{flag} must be at least 1")
  return args


def main(argv) -> int:
  parser = cli.ArgumentParser(prog="python benchmarks/profile_step.py", description=__doc__.split("\n")[0])
  add_step_flags(parser, height=800, width=1344, batch=1)
  parser.add_argument("--json", action="store_true", help="one JSON object on stdout instead of the table")
  parser.add_argument("--trace", metavar="DIR", help="also write a jax.profiler trace of two whole steps to DIR")
  args = parse_step_flags(parser, argv)
  if args.config.model.type != "faster_rcnn":
    raise cli.UsageError(f"--config: profile_step times the stages of a two-stage detector (model.type "
                         f"'faster_rcnn'); this config's model.type is {args.config.model.type!r}")
  result = profile_in_two_processes(args.config, args.height, args.width, args.batch, args.repeats, args.trace)
  if result["compiled_while_timing"]:
    print(f"warning: {result['compiled_while_timing']} programs missed the cache and were compiled in the timing "
          f"process; its times may be slower than a restarted run's", file=sys.stderr)
  print(json.dumps(result) if args.json else format_table(result))
  return 0


if __name__ == "__main__":
  cli.run(main)

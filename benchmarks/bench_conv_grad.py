"""Convolutions on this backend: XLA's own against ``libra_jax.ops.conv``'s matmuls, Winograd and banded gradients.

    python benchmarks/bench_conv_grad.py [--config=FILE] [--height 512 --width 512 --batch 2] [--repeats 3] [--json]

Three parts, each pair measured in this one process, one after the other:

1. Layers: convolutions of the shapes a ResNet-50 FPN has at 800 x 1344
   (stride-4 and stride-8 maps, 1x1 and 3x3 filters, a stride-2 3x3): XLA's
   forward pass, the 1x1 ones also as a matmul (``matmul_forward_s``), XLA's
   filter gradient and ours (``ours_filter_gradient_s``: a matmul for 1x1
   filters, Winograd's for the stride-1 3x3 filters it takes, one matmul per
   tap for strided filters of several bands
   (:func:`libra_jax.ops.conv.tap_filter_gradient`), else
   :func:`libra_jax.ops.conv.banded_filter_gradient`), each the median of
   ``--repeats`` jitted calls, as seconds and GFLOP/s (2 x output positions x
   C_in x C_out x k^2 FLOPs).
2. Winograd: stride-1 3x3 convolutions (``WINOGRAD_LAYERS``), the direct path
   (XLA's forward pass and input gradient, the banded filter gradient) against
   :func:`libra_jax.ops.conv.winograd_conv3x3`: the forward pass, and the
   forward pass with both gradients under a random output gradient
   (``jax.vjp``), each the median of ``--repeats`` jitted calls.
3. The whole train step of ``--config`` (default: Libra Faster R-CNN R-50) at
   ``--height x --width``, batch ``--batch``, on one device: with XLA's
   convolutions throughout (``MATMUL_PLATFORMS`` emptied while it is traced),
   with ``libra_jax.ops.conv``'s but no Winograd, and with all of them;
   ``speedup`` is the first time over the third, ``winograd_speedup`` the
   second over the third.
"""
import contextlib
import json
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.profile_step import add_step_flags, parse_step_flags  # noqa: E402
from libra_jax import cli  # noqa: E402

# (height, width, C_in, C_out, kernel, stride) of ResNet-50 FPN convolutions at 800 x 1344.
LAYERS = ((200, 336, 256, 64, 1, 1), (200, 336, 64, 256, 1, 1), (200, 336, 64, 64, 3, 1),
          (200, 336, 256, 256, 3, 1), (100, 168, 128, 128, 3, 1), (200, 336, 128, 128, 3, 2))
# (batch, height, width, C_in, C_out) of stride-1 3x3 convolutions: FPN, RPN and RetinaNet head layers at 800 x 1344
# and at 512 x 512 batch 2, then three below Winograd's thresholds (64 channels; 512 channels on small maps).
WINOGRAD_LAYERS = ((1, 200, 336, 256, 256), (1, 100, 168, 256, 256), (2, 128, 128, 256, 256), (1, 100, 168, 256, 720),
                   (1, 50, 84, 256, 256), (2, 64, 64, 128, 128), (2, 32, 32, 256, 256), (1, 200, 336, 64, 64),
                   (1, 25, 42, 512, 512), (2, 16, 16, 512, 512))
CONVOLUTION_PATHS = ("xla", "ours_without_winograd", "ours")


@contextlib.contextmanager
def convolution_path(name: str):
  """Inside, ``libra_jax.ops.conv`` traces convolutions as one of ``CONVOLUTION_PATHS``; restored on exit.

  ``xla``: XLA's own throughout; ``ours_without_winograd``: matmuls and banded
  filter gradients (``conv.direct_convolutions``); ``ours``: everything the
  module does on this platform.
  """
  from libra_jax.ops import conv

  platforms = conv.MATMUL_PLATFORMS
  if name == "xla":
    conv.MATMUL_PLATFORMS = ()
  try:
    with contextlib.nullcontext() if name == "ours" else conv.direct_convolutions():
      yield
  finally:
    conv.MATMUL_PLATFORMS = platforms


def layer_rows(repeats: int):
  """One row per ``LAYERS`` shape: forward (and matmul forward for 1x1), XLA's and our filter gradient times."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax import lax

  from benchmarks.profile_step import median_seconds
  from libra_jax.ops import conv

  rows = []
  for height, width, c_in, c_out, kernel, stride in LAYERS:
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(1, height, width, c_in)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(kernel, kernel, c_in, c_out)), jnp.float32)
    padding = ((kernel // 2, kernel // 2),) * 2
    forward = jax.jit(lambda x, w: lax.conv_general_dilated(x, w, (stride, stride), padding,
                                                            dimension_numbers=conv.NHWC))
    g = jnp.ones_like(forward(x, w))
    xla = jax.jit(lambda x, w, g: jax.vjp(lambda w: forward(x, w), w)[1](g)[0])
    ours = jax.jit(lambda x, w, g: jax.vjp(lambda w: conv.conv_general_dilated(x, w, (stride, stride), padding,
                                                                              dimension_numbers=conv.NHWC), w)[1](g)[0])
    flops = 2 * g.shape[1] * g.shape[2] * c_in * c_out * kernel * kernel
    times = {"forward_s": median_seconds(forward, (x, w), repeats),
             "matmul_forward_s": (median_seconds(jax.jit(lambda x, w: conv.pointwise_conv(x, w, (stride, stride))),
                                                 (x, w), repeats) if kernel == 1 else None),
             "xla_filter_gradient_s": median_seconds(xla, (x, w, g), repeats),
             "ours_filter_gradient_s": median_seconds(ours, (x, w, g), repeats)}
    rows.append(dict(layer=f"{height}x{width} {c_in}->{c_out} {kernel}x{kernel}/{stride}", flops=flops, **times,
                     speedup=times["xla_filter_gradient_s"] / times["ours_filter_gradient_s"]))
  return rows


def winograd_rows(repeats: int):
  """One row per ``WINOGRAD_LAYERS`` shape: the direct path's and Winograd's forward and forward + backward times."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from benchmarks.profile_step import median_seconds
  from libra_jax.ops import conv

  padding = ((1, 1), (1, 1))
  rows = []
  for batch, height, width, c_in, c_out in WINOGRAD_LAYERS:
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(batch, height, width, c_in)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(3, 3, c_in, c_out)) / (3 * c_in ** 0.5), jnp.float32)
    g = jnp.asarray(rng.normal(size=(batch, height, width, c_out)), jnp.float32)
    direct = lambda x, w: conv.conv_general_dilated(x, w, (1, 1), padding, dimension_numbers=conv.NHWC)
    winograd = lambda x, w: conv.winograd_conv3x3(x, w, padding)
    both = lambda f: jax.jit(lambda x, w, g: (lambda y, back: (y, back(g)))(*jax.vjp(f, x, w)))
    with convolution_path("ours_without_winograd"):  # traced and compiled at the first (warm-up) call
      times = {"direct_forward_s": median_seconds(jax.jit(direct), (x, w), repeats),
               "direct_forward_backward_s": median_seconds(both(direct), (x, w, g), repeats)}
    times.update(winograd_forward_s=median_seconds(jax.jit(winograd), (x, w), repeats),
                 winograd_forward_backward_s=median_seconds(both(winograd), (x, w, g), repeats))
    rows.append(dict(layer=f"{batch}x{height}x{width} {c_in}->{c_out}", **times,
                     speedup=times["direct_forward_backward_s"] / times["winograd_forward_backward_s"]))
  return rows


def step_seconds(config, height: int, width: int, batch_size: int, repeats: int, path: str) -> float:
  """Median seconds of ``config``'s train step on one device, convolutions traced as ``path`` (CONVOLUTION_PATHS)."""
  import jax

  from benchmarks.profile_step import compiled_train_step, median_seconds
  from benchmarks.run import synthetic_batch
  from libra_jax.models.detectors import build_detector, jitted_init
  from libra_jax.training import optim

  model = build_detector(config.model)
  batch = synthetic_batch(height, width, batch_size, config.data.max_instances)
  variables = jax.device_get(jitted_init(model)(jax.random.key(0), batch["image"]))
  optimizer = optim.make_optimizer(config.optim, batch_size, config.steps_per_epoch, variables["params"],
                                   config.model.backbone.frozen_stages)
  with convolution_path(path):  # the step is traced and compiled here
    one_step, _ = compiled_train_step(model, optimizer, variables, batch)
  return median_seconds(one_step, (), repeats)


def main(argv) -> int:
  parser = cli.ArgumentParser(prog="python benchmarks/bench_conv_grad.py", description=__doc__.split("\n")[0],
                              config="optional",
                              default_config=str(ROOT / "configs/libra_faster_rcnn_r50_fpn_1x_coco.py"))
  add_step_flags(parser, height=512, width=512, batch=2)
  parser.add_argument("--skip_layers", action="store_true", help="only the whole train step")
  parser.add_argument("--json", action="store_true", help="one JSON object on stdout instead of tables")
  args = parse_step_flags(parser, argv)
  import jax
  layers = [] if args.skip_layers else layer_rows(args.repeats)
  winograd = [] if args.skip_layers else winograd_rows(args.repeats)
  step = {path: step_seconds(args.config, args.height, args.width, args.batch, args.repeats, path)
          for path in CONVOLUTION_PATHS}
  result = {"device": jax.devices()[0].platform, "jax": jax.__version__, "layers": layers, "winograd": winograd,
            "step": {"model": args.config.model.type, "depth": args.config.model.backbone.depth,
                     "height": args.height, "width": args.width, "batch": args.batch,
                     "xla_convolutions_s": step["xla"], "ours_without_winograd_s": step["ours_without_winograd"],
                     "ours_s": step["ours"], "speedup": step["xla"] / step["ours"],
                     "winograd_speedup": step["ours_without_winograd"] / step["ours"]}}
  if args.json:
    print(json.dumps(result))
    return 0
  if layers:
    print(f"{'layer (800x1344 input)':<28}{'forward':>16}{'matmul forward':>18}{'XLA filter grad':>18}"
          f"{'our filter grad':>20}{'speedup':>9}")
    for row in layers:
      rate = lambda s: "-" if s is None else f"{s * 1e3:7.1f} ms {row['flops'] / s / 1e9:4.0f} GF/s"
      print(f"{row['layer']:<28}{rate(row['forward_s']):>16}{rate(row['matmul_forward_s']):>18}"
            f"{rate(row['xla_filter_gradient_s']):>18}{rate(row['ours_filter_gradient_s']):>20}"
            f"{row['speedup']:>8.2f}x")
  if winograd:
    print(f"\n{'3x3 stride 1, ms':<24}{'forward: direct':>16}{'Winograd':>10}{'fwd+bwd: direct':>17}{'Winograd':>10}"
          f"{'speedup':>9}")
    for row in winograd:
      print(f"{row['layer']:<24}{row['direct_forward_s'] * 1e3:>16.1f}{row['winograd_forward_s'] * 1e3:>10.1f}"
            f"{row['direct_forward_backward_s'] * 1e3:>17.1f}{row['winograd_forward_backward_s'] * 1e3:>10.1f}"
            f"{row['speedup']:>8.2f}x")
  step = result["step"]
  print(f"train step, {step['model']} R-{step['depth']} {step['height']}x{step['width']} batch {step['batch']}: "
        f"XLA convolutions {step['xla_convolutions_s']:.3f} s, ours without Winograd "
        f"{step['ours_without_winograd_s']:.3f} s, ours {step['ours_s']:.3f} s: {step['speedup']:.2f}x "
        f"(Winograd {step['winograd_speedup']:.2f}x)")
  return 0


if __name__ == "__main__":
  cli.run(main)

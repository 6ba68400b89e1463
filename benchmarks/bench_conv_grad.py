"""Convolutions on this backend: XLA's own against matmuls and banded filter gradients (``libra_jax.ops.conv``).

    python benchmarks/bench_conv_grad.py [--config=FILE] [--height 512 --width 512 --batch 2] [--repeats 3] [--json]

Two parts, each pair measured in this one process, one after the other:

1. Layers: convolutions of the shapes a ResNet-50 FPN has at 800 x 1344
   (stride-4 and stride-8 maps, 1x1 and 3x3 filters, a stride-2 3x3): XLA's
   forward pass, the 1x1 ones also as a matmul (``matmul_forward_s``), XLA's
   filter gradient and ours (``ours_filter_gradient_s``: a matmul for 1x1
   filters, :func:`libra_jax.ops.conv.banded_filter_gradient` for larger
   ones), each the median of ``--repeats`` jitted calls, as seconds and
   GFLOP/s (2 x output positions x C_in x C_out x k^2 FLOPs).
2. The whole train step of ``--config`` (default: Libra Faster R-CNN R-50) at
   ``--height x --width``, batch ``--batch``, on one device: with XLA's
   convolutions throughout (``MATMUL_PLATFORMS`` emptied while it is traced)
   and with ``libra_jax.ops.conv``'s; ``speedup`` is the first time over the
   second.
"""

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


def step_seconds(config, height: int, width: int, batch_size: int, repeats: int, ours: bool) -> float:
  """Median seconds of ``config``'s train step on one device, with ``libra_jax.ops.conv``'s convolutions or XLA's."""
  import jax

  from benchmarks.profile_step import compiled_train_step, median_seconds
  from benchmarks.run import synthetic_batch
  from libra_jax.models.detectors import build_detector, jitted_init
  from libra_jax.ops import conv
  from libra_jax.training import optim

  model = build_detector(config.model)
  batch = synthetic_batch(height, width, batch_size, config.data.max_instances)
  variables = jax.device_get(jitted_init(model)(jax.random.key(0), batch["image"]))
  optimizer = optim.make_optimizer(config.optim, batch_size, config.steps_per_epoch, variables["params"],
                                   config.model.backbone.frozen_stages)
  platforms = conv.MATMUL_PLATFORMS
  conv.MATMUL_PLATFORMS = platforms if ours else ()
  try:  # the step is traced and compiled here, with the filter gradients chosen above
    one_step, _ = compiled_train_step(model, optimizer, variables, batch)
  finally:
    conv.MATMUL_PLATFORMS = platforms
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
  xla = step_seconds(args.config, args.height, args.width, args.batch, args.repeats, ours=False)
  ours = step_seconds(args.config, args.height, args.width, args.batch, args.repeats, ours=True)
  result = {"device": jax.devices()[0].platform, "jax": jax.__version__, "layers": layers,
            "step": {"model": args.config.model.type, "depth": args.config.model.backbone.depth,
                     "height": args.height, "width": args.width, "batch": args.batch,
                     "xla_convolutions_s": xla, "ours_s": ours, "speedup": xla / ours}}
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
  step = result["step"]
  print(f"train step, {step['model']} R-{step['depth']} {step['height']}x{step['width']} batch {step['batch']}: "
        f"XLA convolutions {xla:.3f} s, ours {ours:.3f} s: {step['speedup']:.2f}x")
  return 0


if __name__ == "__main__":
  cli.run(main)

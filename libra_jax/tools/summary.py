"""Parameter counts and forward FLOPs of a config's detector, without running it.

``python -m libra_jax.tools.summary --config=configs/libra_faster_rcnn_r50_fpn_1x_coco.py [--config.KEY=VALUE ...]
[--json]``

Counts come from ``jax.eval_shape`` of the initialiser; FLOPs from XLA's cost
analysis of the lowered inference program at ``config.input_size`` (batch 1),
every convolution counted as a direct one and the R-CNN head over every
proposal slot (``detectors.flop_count_trace``: the CPU's Winograd convolutions
compute the same with fewer, and the test-time head skips slots without a
proposal).
Nothing is allocated or executed at full size.
"""

import functools
import json
from typing import Any, Dict

import jax
import jax.numpy as jnp
import numpy as np

from libra_jax import cli
from libra_jax.models.detectors import build_detector, flop_count_trace
from libra_jax.models.resnet import frozen_param_prefixes


def abstract_batch(height: int, width: int, batch: int = 1, max_instances: int = 100) -> Dict[str, Any]:
  """Shape structs of one batch in the input contract."""
  return dict(image=jax.ShapeDtypeStruct((batch, height, width, 3), jnp.float32),
              image_shape=jax.ShapeDtypeStruct((batch, 2), jnp.int32),
              boxes=jax.ShapeDtypeStruct((batch, max_instances, 4), jnp.float32),
              labels=jax.ShapeDtypeStruct((batch, max_instances), jnp.int32),
              is_crowd=jax.ShapeDtypeStruct((batch, max_instances), bool),
              valid=jax.ShapeDtypeStruct((batch,), bool))


def _count(tree) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def summarize(config) -> Dict[str, Any]:
  """Parameter counts per part, trainable vs frozen, BN statistics, and forward FLOPs."""
  model = build_detector(config.model)
  height, width = config.input_size
  batch = abstract_batch(height, width)
  init = functools.partial(model.init, train=False)
  variables = jax.eval_shape(init, jax.random.key(0), batch)
  params = variables["params"]
  frozen_parts = frozen_param_prefixes(config.model.backbone.frozen_stages)
  frozen = sum(_count(params["backbone"][name]) for name in frozen_parts if name in params["backbone"])
  total = _count(params)
  with flop_count_trace():
    lowered = jax.jit(lambda v, b: model.apply(v, b, train=False)).lower(variables, batch)
  flops = lowered.cost_analysis().get("flops", float("nan"))
  return {
      "model": config.model.type,
      "input_size": [height, width],
      "parts": {name: _count(tree) for name, tree in params.items()},
      "params_total": total,
      "params_trainable": total - frozen,
      "params_frozen": frozen,
      "batch_stats": _count(variables.get("batch_stats", {})),
      "flops": float(flops),
  }


def format_table(summary: Dict[str, Any]) -> str:
  lines = [f"{summary['model']} at {summary['input_size'][0]}x{summary['input_size'][1]}",
           f"{'part':<12}{'parameters':>16}"]
  lines += [f"{name:<12}{count:>16,}" for name, count in summary["parts"].items()]
  lines += [f"{'total':<12}{summary['params_total']:>16,}",
            f"{'trainable':<12}{summary['params_trainable']:>16,}",
            f"{'frozen':<12}{summary['params_frozen']:>16,}",
            f"{'BN stats':<12}{summary['batch_stats']:>16,}  (frozen statistics, not parameters)",
            f"forward FLOPs (batch 1): {summary['flops'] / 1e9:,.1f} G"]
  return "\n".join(lines)


def main(argv) -> int:
  parser = cli.ArgumentParser(prog="python -m libra_jax.tools.summary", description=__doc__.split("\n")[0])
  parser.add_argument("--json", action="store_true", help="print one JSON object")
  args = parser.parse_args(argv)
  summary = summarize(args.config)
  print(json.dumps(summary) if args.json else format_table(summary))
  return 0


if __name__ == "__main__":
  cli.run(main)

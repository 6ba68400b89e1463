"""Runs two train steps of a tiny Libra Faster R-CNN on all visible devices, then its predict step; saves the
parameters, the detections and each image's proposal count.

test_step.py runs it in a subprocess, so that the number of (fake CPU) devices
can be set with XLA_FLAGS before JAX starts (usage: step_runner.py OUT.npz),
and calls ``two_steps`` in its own one-device process.
"""

import pathlib
import sys

import jax
import ml_collections
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
from support import synthetic_batch, tiny_model_config, tiny_variables  # noqa: E402
from libra_jax import runtime  # noqa: E402
from libra_jax.evaluation.predict_step import make_predict_step  # noqa: E402
from libra_jax.models.detectors import RCNN_TEST_CHUNKS, FasterRCNN, build_detector  # noqa: E402
from libra_jax.training import optim, step as step_lib  # noqa: E402

GLOBAL_BATCH = 4
OPTIM = dict(lr_per_16=0.02, momentum=0.9, weight_decay=1e-4, warmup_steps=2, warmup_ratio=0.5, milestone_epochs=(100,),
             gamma=0.1, grad_clip_norm=None)


def two_steps() -> dict:
  """Losses of two steps on all visible devices, the device count, the parameters after them by key path, then
  the predict step's detections with those parameters (``detections.*``) and the chunks of proposal slots whose
  R-CNN head each image needs (``chunks_needed``: devices stop the test-time head's loop at different chunks)."""
  model = build_detector(tiny_model_config("faster"))
  variables = tiny_variables("faster")
  optimizer = optim.make_optimizer(ml_collections.ConfigDict(OPTIM), GLOBAL_BATCH, 1, variables["params"], 1)
  mesh = runtime.make_mesh()
  state = step_lib.new_train_state(variables, optimizer, jax.random.key(3))
  state = jax.device_put(state, runtime.replicated(mesh))
  train_step = step_lib.make_train_step(model, optimizer, mesh)
  losses = []
  for i in range(2):
    batch = jax.device_put(synthetic_batch(seed=i, batch=GLOBAL_BATCH), runtime.batch_sharding(mesh))
    state, metrics = train_step(state, batch)
    losses.append(float(metrics["loss"]))
  flat = {jax.tree_util.keystr(path): np.asarray(leaf)
          for path, leaf in jax.tree_util.tree_flatten_with_path(state.params)[0]}
  trained = {"params": state.params, "batch_stats": state.batch_stats}
  # Room for 400 proposals an image, of which the RPN keeps a different number in each; every detection kept.
  predict_config = tiny_model_config("faster")
  predict_config.test.rpn_proposal.max_per_img = 400
  predict_config.test.rcnn.score_thr = 0.0
  predictor = build_detector(predict_config)
  batch = synthetic_batch(seed=2, batch=GLOBAL_BATCH)
  detections = make_predict_step(predictor, mesh)(trained, jax.device_put(batch, runtime.batch_sharding(mesh)))
  valid = jax.jit(lambda v, b: predictor.apply(v, b, train=False, method=FasterRCNN.proposals).valid)(trained, batch)
  slots = valid.shape[1]
  last_slot = np.max(np.where(np.asarray(valid), np.arange(1, slots + 1), 0), axis=1)
  chunk = -(-slots // RCNN_TEST_CHUNKS)
  return dict(losses=np.array(losses), devices=len(jax.devices()), chunks_needed=-(-last_slot // chunk),
              **{f"detections.{name}": np.asarray(value) for name, value in detections._asdict().items()}, **flat)


if __name__ == "__main__":
  np.savez(sys.argv[1], **two_steps())

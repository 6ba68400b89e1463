"""Builders shared by the model and training tests: tiny detector configs and synthetic batches.

Kept out of conftest.py so that test modules import them by a name no other
folder's conftest shadows (``from support import ...``; pytest puts tests/ on
the path for tests/conftest.py).
"""

import functools

import numpy as np

from libra_jax import host_memory

# For the few test programs that run long rather than compile long (a ResNet-50 on 800x1216 images): XLA's own
# default backend optimization instead of the suite's level 0 (tests/conftest.py), whose unoptimized elementwise
# loops ran the end-to-end reference's program 2.9x slower (16.3 against 5.7 s, compiles of 4.7 and 6.6 s).
# ``jax.jit(f, compiler_options=OPTIMIZED_CODE)``.
OPTIMIZED_CODE = {"xla_backend_optimization_level": 3}
# Every environment variable that decides how a process's malloc behaves (libra_jax.host_memory): a test that wants
# glibc's defaults, or one variable alone, removes them all first.
MALLOC_SETTING_VARIABLES = host_memory.GLIBC_MALLOC_ENV + (host_memory.SWITCH_ENV, "GLIBC_TUNABLES")


def tiny_model_config(family: str = "faster", libra: bool = True, num_classes: int = 3):
  """A full detector config shrunk to run forward and backward in seconds on a CPU."""
  from configs import base_faster_rcnn, base_retinanet
  if family == "faster":
    model = base_faster_rcnn.model_config(libra=libra, num_classes=num_classes)
    model.rpn.feat_channels = 16
    model.rcnn.fc_channels = 32
    model.train.rpn_proposal.update(nms_pre=200, max_per_img=100)
    model.test.rpn_proposal.update(nms_pre=200, max_per_img=100)
    model.train.rcnn.sampler.num = 64
  else:
    model = base_retinanet.model_config(libra=libra, num_classes=num_classes)
    model.head.update(feat_channels=16, stacked_convs=2)
    model.test.nms_pre = 200
  model.backbone.update(depth=18, base_channels=8)
  model.neck.out_channels = 16
  return model


def tiny_variables(family: str = "faster", libra: bool = True):
  """Variables of ``build_detector(tiny_model_config(family, libra))`` (key 0), initialized once per process.

  Each call returns fresh copies: a train step donates (and so deletes) the arrays of its state.
  """
  import jax
  return jax.tree.map(lambda x: x.copy(), _initialized(family, libra))


@functools.lru_cache(maxsize=None)
def _initialized(family: str, libra: bool):
  import jax
  from libra_jax.models.detectors import build_detector, jitted_init
  model = build_detector(tiny_model_config(family, libra))
  return jitted_init(model)(jax.random.key(0), synthetic_batch()["image"])


def synthetic_batch(seed: int = 0, batch: int = 2, height: int = 128, width: int = 160, max_instances: int = 6,
                    num_classes: int = 3):
  """A batch in the input contract with random images and boxes; the last gt row is padding."""
  import jax.numpy as jnp
  rng = np.random.default_rng(seed)
  xy = rng.uniform(0, 0.5 * min(height, width), (batch, max_instances, 2))
  wh = rng.uniform(12, 0.45 * min(height, width), (batch, max_instances, 2))
  labels = rng.integers(0, num_classes, (batch, max_instances))
  labels[:, -1] = -1
  boxes = np.concatenate([xy, xy + wh], -1)
  boxes[:, -1] = 0
  image_shape = np.tile([[height, width]], (batch, 1))
  image_shape[-1] = [height - 28, width]
  return dict(image=jnp.asarray(rng.normal(size=(batch, height, width, 3)), jnp.float32),
              image_shape=jnp.asarray(image_shape, jnp.int32),
              boxes=jnp.asarray(boxes, jnp.float32), labels=jnp.asarray(labels, jnp.int32),
              is_crowd=jnp.zeros((batch, max_instances), bool), valid=jnp.ones((batch,), bool),
              image_id=jnp.arange(batch), scale=jnp.ones((batch, 2), jnp.float32))


def assert_drawn_where_detected(original, png_path, detections):
  """The PNG is ``original`` except on the detections' boxes and labels, and each box's last-drawn outline shows.

  Args:
    original: ``[H, W, 3]`` uint8, the image before drawing.
    png_path: the drawn PNG (``libra_jax.predict.draw``).
    detections: its JSON entries ``{"box": [x1, y1, x2, y2], "class_name", "score", ...}``.
  """
  from PIL import Image, ImageDraw
  with Image.open(png_path) as image:
    assert image.mode == "RGB" and image.size == (original.shape[1], original.shape[0])
    drawn = np.asarray(image)
  allowed = np.zeros(original.shape[:2], bool)
  measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
  for det in detections:
    x1, y1, x2, y2 = det["box"]
    allowed[max(int(y1) - 2, 0):int(y2) + 3, max(int(x1) - 2, 0):int(x2) + 3] = True
    left, top, right, bottom = measure.textbbox((x1 + 2, y1 + 1), f"{det['class_name']} {det['score']:.2f}")
    allowed[max(int(top) - 1, 0):int(bottom) + 2, max(int(left) - 1, 0):int(right) + 2] = True
  changed = np.any(drawn != original, axis=-1)
  assert not np.any(changed & ~allowed), "pixels changed away from every box and label"
  if detections:
    # The last box drawn is on top: its left edge, below its label, has the colour of its class.
    from libra_jax.predict import PALETTE
    x1, y1, x2, y2 = detections[-1]["box"]
    colour = PALETTE[detections[-1]["class"] % len(PALETTE)]
    rows = drawn[int(y1) + 16:int(y2) - 2, int(x1):int(x1) + 2]
    assert rows.size == 0 or np.any(np.all(rows == colour, axis=-1), axis=1).all()


def tiny_train_overrides(tfds_dir, cache_dir, **extra):
  """``config key -> value`` that train the shapes config's detector, shrunk, on the prepared shapes dataset."""
  values = {
      "data.tfds_data_dir": tfds_dir, "data.eval_split": "validation[:16]", "compilation_cache_dir": cache_dir,
      "model.backbone.base_channels": 8, "model.neck.out_channels": 16, "model.rpn.feat_channels": 16,
      "model.rcnn.fc_channels": 32, "model.train.rcnn.sampler.num": 64, "global_batch_size": 4,
      "eval_batch_size": 4, "log_every": 2, "checkpoint_every": 4, "eval_every": 1000,
      # Compiling in a fresh process first costs each run a process start; tests/training/test_precompile.py has it.
      "precompile_in_fresh_process": False,
      # One square bucket holds both orientations of the shapes images: one compilation per step function.
      "data.buckets": ((192, 192),),
  }
  values.update(extra)
  return values


def shapes_config(values):
  """The shapes config (``configs/shapes_libra_faster_rcnn.py``) with the ``"a.b" -> value`` overrides ``values``."""
  from configs import shapes_libra_faster_rcnn
  return apply_overrides(shapes_libra_faster_rcnn.get_config(), values)


def apply_overrides(config, values):
  """Sets ``config[a][b] = value`` for each ``"a.b" -> value`` of ``values``; returns ``config``."""
  for path, value in values.items():
    node = config
    *parents, key = path.split(".")
    for parent in parents:
      node = node[parent]
    node[key] = value
  return config


def summary_steps(workdir, tag):
  """The steps of the TensorBoard scalars named ``tag`` in ``workdir``'s event files, in file order."""
  import pathlib

  import tensorflow as tf
  steps = []
  for path in sorted(pathlib.Path(workdir).glob("events.out.tfevents.*")):
    for event in tf.compat.v1.train.summary_iterator(str(path)):
      steps += [event.step for value in event.summary.value if value.tag == tag]
  return steps


def largest_file(directory):
  """The biggest file under ``directory`` (a checkpoint's array data)."""
  import pathlib
  return max((p for p in pathlib.Path(directory).rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def records(workdir, kind="train"):
  """The ``metrics.jsonl`` records of ``workdir`` of one ``kind`` (``"train"``, ``"eval"``, ``"compile"``)."""
  import json
  import pathlib
  lines = (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()
  return [r for r in map(json.loads, lines) if r["kind"] == kind]

"""Builders shared by the model and training tests: tiny detector configs and synthetic batches.

Kept out of conftest.py so that test modules import them by a name no other
folder's conftest shadows (``from support import ...``; pytest puts tests/ on
the path for tests/conftest.py).
"""

import numpy as np


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

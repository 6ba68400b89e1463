"""TensorFlow for the input pipeline only: blind to GPUs and TPUs, so JAX keeps them.

Every module of ``libra_jax.data`` that runs TensorFlow ops imports ``tf``
from here (the package ``__init__`` has already quieted TensorFlow's logs).
"""

import logging

import tensorflow as tf

_log = logging.getLogger(__name__)

for _kind in ("GPU", "TPU"):
  try:
    tf.config.set_visible_devices([], _kind)
  except (RuntimeError, ValueError):
    # TensorFlow ran before this module and may already hold the devices.
    if tf.config.get_visible_devices(_kind):
      _log.warning("TensorFlow was initialized before libra_jax.data and sees %s devices; the input pipeline "
                   "may take accelerator memory", _kind)

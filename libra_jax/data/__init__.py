"""Input: TFDS sources (COCO, any COCO-format folder, the synthetic ``shapes``) and static-shape batches.

``default_data_config`` builds ``config.data`` without importing TensorFlow;
``libra_jax.data.pipeline`` holds ``train_batches``, ``eval_batches`` and
``dataset_info``. Importing this package quiets TensorFlow's logs for the
submodules that load it.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

from libra_jax.data.config import default_data_config  # noqa: E402

__all__ = ["default_data_config"]

"""Flax linen modules of the detectors: backbones, necks, heads and the detectors.

``build_detector(config.model)`` builds a whole detector (``FasterRCNN`` or
``RetinaNet``); ``init_variables`` and ``jitted_init`` give its variables.
"""

from libra_jax.models.detectors import FasterRCNN, RetinaNet, build_detector, init_variables, jitted_init

__all__ = ["FasterRCNN", "RetinaNet", "build_detector", "init_variables", "jitted_init"]

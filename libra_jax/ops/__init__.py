"""Static-shape detection ops as pure ``jnp`` functions.

Submodules: ``boxes`` (overlaps, delta coder), ``anchors``, ``assign``
(MaxIoU assigner), ``nms`` and ``roi_align``.
"""

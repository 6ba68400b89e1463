"""Flax linen modules of the detectors: backbones, necks, heads and the detectors."""

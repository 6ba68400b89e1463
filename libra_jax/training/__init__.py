"""Training: optimizer and schedule, the data-parallel step, checkpoints and the loop."""

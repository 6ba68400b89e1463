"""Command-line tools: ``python -m libra_jax.tools.<name>``."""

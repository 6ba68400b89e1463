"""Scalars to ``<workdir>/metrics.jsonl`` (one JSON object per line) and TensorBoard."""

import json
import math
import pathlib
from typing import Dict


class MetricWriter:
  """Appends ``{"step", "kind", **scalars}`` lines and writes the same scalars as TensorBoard summaries.

  Train lines have ``kind="train"``; evaluation lines ``kind="eval"`` (step -1
  for a stand-alone evaluation). Only one process of a multi-host run writes.
  """

  def __init__(self, workdir, enabled: bool = True):
    self.enabled = enabled
    self.path = pathlib.Path(workdir) / "metrics.jsonl"
    self._summary = None
    if enabled:
      import tensorflow as tf
      self._tf = tf
      self._summary = tf.summary.create_file_writer(str(workdir))

  def write(self, step: int, scalars: Dict[str, float], kind: str = "train") -> None:
    if not self.enabled:
      return
    record = {"step": int(step), "kind": kind}
    record.update({k: (float(v) if math.isfinite(float(v)) else str(float(v))) for k, v in scalars.items()})
    with self.path.open("a") as f:
      f.write(json.dumps(record) + "\n")
    with self._summary.as_default(step=max(int(step), 0)):
      for name, value in scalars.items():
        self._tf.summary.scalar(f"{kind}/{name}", float(value))
    self._summary.flush()

  def close(self) -> None:
    if self._summary is not None:
      self._summary.close()

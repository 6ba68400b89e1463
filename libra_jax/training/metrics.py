"""Scalars to ``<workdir>/metrics.jsonl`` (one JSON object per line) and TensorBoard."""

import json
import math
import pathlib
from typing import Dict, List, Optional

EVENT_FILES = "events.out.tfevents.*"


class MetricWriter:
  """Appends ``{"step", "kind", **scalars}`` lines and writes the same scalars as TensorBoard summaries.

  Train lines have ``kind="train"``; evaluation lines ``kind="eval"`` (step -1
  for a stand-alone evaluation). Only one process of a multi-host run writes.

  A run resumed from the checkpoint of step ``keep_until`` recomputes the
  steps after it, so their earlier records are dropped from
  ``metrics.jsonl``, and the summaries are written afresh from what is kept:
  every step appears once in both.
  """

  def __init__(self, workdir, enabled: bool = True, keep_until: Optional[int] = None):
    self.enabled = enabled
    self.path = pathlib.Path(workdir) / "metrics.jsonl"
    self._summary = None
    if enabled:
      kept = self._drop_after(keep_until) if keep_until is not None else []
      import tensorflow as tf
      self._tf = tf
      self._summary = tf.summary.create_file_writer(str(workdir))
      for record in kept:
        self._summarize(record["step"], {k: v for k, v in record.items() if k not in ("step", "kind")},
                        record["kind"])

  def _drop_after(self, step: int) -> List[dict]:
    """Keeps the records of steps up to ``step`` (and stand-alone evaluations); removes the old summaries."""
    if not self.path.exists():
      return []
    records = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
    kept = [r for r in records if r["step"] <= step]
    self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
    for events in self.path.parent.glob(EVENT_FILES):
      events.unlink()
    return kept

  def write(self, step: int, scalars: Dict[str, float], kind: str = "train") -> None:
    if not self.enabled:
      return
    record = {"step": int(step), "kind": kind}
    record.update({k: (float(v) if math.isfinite(float(v)) else str(float(v))) for k, v in scalars.items()})
    with self.path.open("a") as f:
      f.write(json.dumps(record) + "\n")
    self._summarize(step, scalars, kind)

  def _summarize(self, step: int, scalars: Dict[str, float], kind: str) -> None:
    with self._summary.as_default(step=max(int(step), 0)):
      for name, value in scalars.items():
        self._tf.summary.scalar(f"{kind}/{name}", float(value))
    self._summary.flush()

  def close(self) -> None:
    if self._summary is not None:
      self._summary.close()

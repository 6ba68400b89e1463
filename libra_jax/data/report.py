"""Counts of what bad or unusual input needed (repairs, drops), and their log lines.

Every reason has one entry in ``REASONS``: what is wrong, what was done, and
what is counted. A ``Report`` adds up occurrences, keeps the first few file
names and the first detail (e.g. the decoder's message), and logs one line per
reason, e.g. ``coco/2017 train: image 000123.jpg: cannot decode (Invalid JPEG
data); skipped, 1 of 5000 images``.
"""

import collections
import dataclasses
import logging
from typing import Dict, Iterable, List, Optional

_log = logging.getLogger("libra_jax.data")

DROPPED, REPAIRED, TRUNCATED = "dropped", "repaired", "truncated"


@dataclasses.dataclass(frozen=True)
class Reason:
  what: str  # what is wrong
  action: str  # what was done about it
  unit: str  # what is counted: images, boxes, annotations or instances
  kind: str  # DROPPED, REPAIRED or TRUNCATED
  level: int = logging.WARNING


REASONS: Dict[str, Reason] = {
    # Found while preparing a COCO-format folder (libra_jax.data.coco_folder).
    "image_missing": Reason("image file not found", "skipped", "images", DROPPED),
    "image_path_escapes": Reason("file name escapes the image directory", "skipped", "images", DROPPED),
    "image_unreadable": Reason("not a readable image file", "skipped", "images", DROPPED),
    "image_duplicate_id": Reason("image id listed twice", "skipped", "images", DROPPED),
    "image_size_from_file": Reason("width/height in the annotations differ from the file", "used the file's size",
                                   "images", REPAIRED),
    "annotation_unknown_image": Reason("annotation of an image id not listed", "ignored", "annotations", DROPPED),
    "box_unknown_category": Reason("unknown category id", "dropped", "boxes", DROPPED),
    "box_malformed": Reason("bbox is not [x, y, width, height]", "dropped", "boxes", DROPPED),
    "box_nonfinite": Reason("non-finite box coordinates", "dropped", "boxes", DROPPED),
    "box_negative_size": Reason("negative box width or height", "dropped", "boxes", DROPPED),
    "box_clipped": Reason("box partly outside the image", "clipped to the image", "boxes", REPAIRED),
    # Found while reading any prepared dataset (libra_jax.data.metadata).
    "image_undecodable": Reason("cannot decode", "skipped", "images", DROPPED),
    "image_grayscale": Reason("grayscale image", "converted to RGB", "images", REPAIRED),
    "image_alpha": Reason("image with an alpha channel", "converted to RGB (alpha dropped)", "images", REPAIRED),
    "image_cmyk": Reason("CMYK image", "converted to RGB", "images", REPAIRED),
    "image_palette": Reason("palette image", "converted to RGB", "images", REPAIRED),
    "box_too_small": Reason("box narrower or shorter than 1 pixel", "dropped", "boxes", DROPPED),
    # Training only (libra_jax.data.pipeline).
    "image_no_gt": Reason("no usable box", "skipped in training", "images", DROPPED, logging.INFO),
    "image_too_small": Reason("shorter side below data.min_size", "skipped in training", "images", DROPPED),
    "instances_truncated": Reason("more instances than data.max_instances", "extra instances dropped (crowd first)",
                                  "instances", TRUNCATED),
}

NAMES_KEPT = 5


def stats(reports: Iterable["Report"]) -> Dict[str, object]:
  """Counts of ``reports`` added up: ``{"dropped": {reason: n}, "repaired": {reason: n}, "truncated": n}``."""
  result = {DROPPED: collections.Counter(), REPAIRED: collections.Counter(), TRUNCATED: 0}
  for report in reports:
    for reason, count in report.counts.items():
      if REASONS[reason].kind == TRUNCATED:
        result[TRUNCATED] += count
      else:
        result[REASONS[reason].kind][reason] += count
  return {DROPPED: dict(sorted(result[DROPPED].items())), REPAIRED: dict(sorted(result[REPAIRED].items())),
          TRUNCATED: result[TRUNCATED]}


class Report:
  """Occurrences per reason for one source, e.g. ``"coco_folder train"``.

  ``totals`` maps a unit ("images", "boxes", ...) to how many were looked at,
  for the "k of n" of the log lines.
  """

  def __init__(self, source: str, **totals: int):
    self.source = source
    self.totals: Dict[str, int] = dict(totals)
    self.counts: Dict[str, int] = collections.Counter()
    self.names: Dict[str, List[str]] = collections.defaultdict(list)
    self.details: Dict[str, str] = {}

  def add(self, reason: str, name: str, count: int = 1, detail: Optional[str] = None) -> None:
    """Counts ``count`` occurrences of ``reason`` (a key of ``REASONS``) in file ``name``."""
    if reason not in REASONS:
      raise KeyError(f"unknown reason {reason!r}")
    if count <= 0:
      return
    self.counts[reason] += count
    if len(self.names[reason]) < NAMES_KEPT:
      self.names[reason].append(name)
    if detail and reason not in self.details:
      self.details[reason] = detail

  def to_json(self) -> Dict[str, Dict[str, object]]:
    """A JSON-ready copy (e.g. for a dataset's metadata)."""
    return {"totals": dict(self.totals), "counts": dict(self.counts), "names": dict(self.names),
            "details": dict(self.details)}

  @classmethod
  def from_json(cls, source: str, data: Dict[str, Dict[str, object]]) -> "Report":
    report = cls(source, **data["totals"])
    report.counts.update(data["counts"])
    report.names.update({reason: list(names) for reason, names in data["names"].items()})
    report.details.update(data["details"])
    return report

  def log(self) -> None:
    """One line per reason."""
    totals = self.totals
    for reason in sorted(self.counts):
      info, count, names = REASONS[reason], self.counts[reason], self.names[reason]
      detail = f" ({self.details[reason]})" if reason in self.details else ""
      total = f" of {totals[info.unit]}" if info.unit in totals else ""
      others = ", ".join(names[1:]) + (", ..." if count > len(names) else "")
      more = f"; also {others}" if len(names) > 1 else ""
      _log.log(info.level, "%s: %s: %s%s; %s, %d%s %s%s", self.source, names[0], info.what, detail, info.action,
               count, total, info.unit, more)

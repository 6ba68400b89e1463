"""benchmarks/bucket_study.py: padding shares against sizes worked out by hand, and the modelled COCO sizes."""

import json

import numpy as np
import pytest

from benchmarks import bucket_study
from libra_jax.data.config import COCO_BUCKETS


def test_padding_shares_by_hand():
  # 480x640 resizes by min(1333 / 640, 800 / 480) to 800x1067 (own area 800x1088); 427x640 by 800 / 427 to
  # 800x1199 (800x1216); the portrait 640x480 to 1067x800.
  height, width = np.array([480, 427, 640]), np.array([640, 640, 480])
  rows = {row["name"]: row for row in bucket_study.study(height, width)}
  pair = rows["one per orientation"]
  assert pair["buckets_used"] == 2 and not pair["default"]
  assert pair["padding_share"] == pytest.approx(1 - (1067 + 1199 + 1067) / (3 * 1344), abs=1e-4)
  assert pair["over_own_share"] == pytest.approx(1 - (1088 + 1216 + 1088) / (3 * 1344), abs=1e-4)
  default = rows["+ 4:3, 3:2"]
  assert default["default"] and default["buckets"] == len(COCO_BUCKETS) and default["buckets_used"] == 3
  assert default["padding_share"] == pytest.approx(1 - (1067 + 1199 + 1067) / (1088 + 1216 + 1088), abs=1e-4)
  assert default["over_own_share"] == 0


def test_modelled_sizes_have_the_published_statistics_and_more_buckets_pad_less():
  height, width = bucket_study.modelled_coco_sizes(20000)
  assert width.mean() == pytest.approx(580, abs=6) and height.mean() == pytest.approx(479, abs=6)
  assert np.median(width / height) == pytest.approx(4 / 3) and (width / height).mean() == pytest.approx(1.27, abs=0.02)
  rows = bucket_study.study(height, width)
  shares = [row["padding_share"] for row in rows]
  assert shares == sorted(shares, reverse=True) and sum(row["default"] for row in rows) == 1


def test_annotation_file_sizes_and_a_bad_file(tmp_path, capsys):
  path = tmp_path / "instances.json"
  path.write_text(json.dumps({"images": [{"id": 1, "height": 480, "width": 640}]}))
  assert bucket_study.main([f"--annotations={path}", "--json"]) == 0
  rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
  assert rows[0]["padding_share"] == pytest.approx(1 - 1067 / 1344, abs=1e-4)
  path.write_text("[]")
  with pytest.raises(Exception, match="cannot read the images' width and height"):
    bucket_study.main([f"--annotations={path}"])

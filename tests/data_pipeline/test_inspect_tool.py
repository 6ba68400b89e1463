"""The inspect tool: its report (and --json keys), PNG grids, and the command line entry point."""

import json
import pathlib
import subprocess
import sys

from PIL import Image

from data_support import TEST_BUCKETS, TEST_MAX_INSTANCES, TEST_SCALE
from libra_jax.data import inspect

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _write_config(tmp_path, folder, data_dir) -> str:
  path = tmp_path / "inspect_config.py"
  path.write_text(f'''
import ml_collections
from libra_jax.data import default_data_config


def get_config():
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.data = default_data_config("coco_folder")
  config.data.update(tfds_data_dir={data_dir!r}, train_annotations={folder.train_annotations!r},
                     train_images={folder.train_images!r}, val_annotations={folder.val_annotations!r},
                     val_images={folder.val_images!r}, scale={TEST_SCALE!r}, buckets={TEST_BUCKETS!r},
                     max_instances={TEST_MAX_INSTANCES})
  return config
''')
  return str(path)


def test_json_report_and_pictures(tmp_path, folder, folder_config, capsys):
  config = _write_config(tmp_path, folder, folder_config().tfds_data_dir)
  out = tmp_path / "pictures"
  assert inspect.main([f"--config={config}", "--split=validation", "--batch_size=2", "--json", f"--out={out}"]) == 0
  report = json.loads(capsys.readouterr().out)
  assert {"images", "instances", "dropped", "repaired", "images_per_sec"} <= set(report)
  # 5 validation images: 4 landscape (2 batches) and 1 portrait with a padding slot.
  assert (report["images"], report["batches"]) == (5, 3)
  assert report["buckets"] == {"96x128": 2, "128x96": 1}
  # v1 has 1 box + 1 crowd region, v2 1, v3 none, v4 1, v5 1.
  assert (report["instances"], report["crowd"]) == (4, 1)
  assert report["repaired"] == {"image_grayscale": 1} and report["images_per_sec"] > 0
  # Every valid image is 107 x 80 in a 128 x 96 bucket (or the transpose): 1 - 8560 / 12288 padding.
  assert abs(report["padding_fraction"] - (1 - 107 * 80 / (128 * 96))) < 1e-9
  pictures = sorted(out.glob("*.png"))
  assert len(pictures) == 3
  assert Image.open(pictures[0]).size == (2 * 128, 96)


def test_text_report_on_the_training_stream(tmp_path, folder, folder_config, capsys):
  config = _write_config(tmp_path, folder, folder_config().tfds_data_dir)
  assert inspect.main([f"--config={config}", "--num_batches=2", "--batch_size=2"]) == 0
  text = capsys.readouterr().out
  assert "2 batches, 4 images" in text and "dropped image_undecodable: 1" in text and "images/s" in text


def test_command_line(tmp_path, folder, folder_config):
  config = _write_config(tmp_path, folder, folder_config().tfds_data_dir)
  result = subprocess.run([sys.executable, "-m", "libra_jax.data.inspect", f"--config={config}", "--split=validation",
                           "--json"], cwd=ROOT, capture_output=True, text=True, timeout=300, check=True)
  assert json.loads(result.stdout)["images"] == 5

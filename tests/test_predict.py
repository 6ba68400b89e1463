"""Tests of libra_jax.predict: drawn PNGs at the images' own sizes, JSON, and unreadable files."""

import json

import numpy as np
from PIL import Image

from configs import shapes_libra_faster_rcnn
from support import assert_drawn_where_detected, tiny_model_config
from libra_jax import predict
from libra_jax.data import pipeline


def test_prepare_follows_the_input_contract():
  config = shapes_libra_faster_rcnn.get_config()
  batch = predict.prepare(np.full((100, 150, 3), 128, np.uint8), config.data)
  # Keep-ratio to (192, 160): factor min(192 / 150, 160 / 100) = 1.28 -> 128 x 192, landscape bucket 160 x 192.
  assert batch["image"].shape == (1, 160, 192, 3) and tuple(batch["image_shape"][0]) == (128, 192)
  np.testing.assert_allclose(batch["scale"][0], [1.28, 1.28])
  expected = (128 - np.array(config.data.mean)) / np.array(config.data.std)
  np.testing.assert_allclose(batch["image"][0, :128, :192], np.broadcast_to(expected, (128, 192, 3)), rtol=1e-5)
  assert not batch["image"][0, 128:].any()


def test_predict_files_writes_pngs_and_json(tmp_path, shapes_tfds_dir, tiny_faster, capsys):
  config = shapes_libra_faster_rcnn.get_config()
  config.model = tiny_model_config("faster")
  config.data.tfds_data_dir = shapes_tfds_dir
  config.eval_batch_size = 2
  _, variables = tiny_faster
  rng = np.random.default_rng(0)
  Image.fromarray(rng.integers(0, 255, (120, 170, 3), dtype=np.uint8)).save(tmp_path / "a.png")
  Image.fromarray(rng.integers(0, 255, (190, 130), dtype=np.uint8)).save(tmp_path / "gray.png")
  Image.fromarray(rng.integers(0, 255, (100, 160, 3), dtype=np.uint8)).save(tmp_path / "b.png")
  (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
  out = tmp_path / "out"
  files = [tmp_path / name for name in ("a.png", "broken.jpg", "gray.png", "b.png")]
  results = predict.predict_files(config, variables, files, out)
  assert "broken.jpg: cannot read the image" in capsys.readouterr().err
  # Three readable images: two landscape ones batched together, a portrait one alone.
  assert set(json.loads((out / "detections.json").read_text())) == {str(files[i]) for i in (0, 2, 3)}
  for index in (0, 2, 3):
    original = predict.read_rgb(files[index])
    assert_drawn_where_detected(original, out / f"{files[index].stem}.png", results[str(files[index])])
    height, width = original.shape[:2]
    for det in results[str(files[index])]:
      x1, y1, x2, y2 = det["box"]
      assert 0 <= x1 <= x2 <= width and 0 <= y1 <= y2 <= height
      assert det["class_name"] in pipeline.dataset_info(config.data).class_names and 0 < det["score"] <= 1

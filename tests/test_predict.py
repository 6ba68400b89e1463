"""Tests of libra_jax.predict: drawn PNGs at the images' own sizes, JSON, unreadable files, and the pixels the
model sees (the input pipeline's)."""

import io
import json
import logging

import numpy as np
import pytest
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


def test_predict_files_writes_pngs_and_json(tmp_path, shapes_tfds_dir, tiny_faster, capsys, caplog):
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
  (tmp_path / "other").mkdir()
  Image.fromarray(rng.integers(0, 255, (110, 150, 3), dtype=np.uint8)).save(tmp_path / "other" / "a.png")
  out = tmp_path / "out"
  files = [tmp_path / name for name in ("a.png", "broken.jpg", "gray.png", "b.png", "other/a.png")]
  with caplog.at_level(logging.INFO, logger="libra_jax.runtime"):
    results = predict.predict_files(config, variables, files, out)
  assert "broken.jpg: cannot read the image" in capsys.readouterr().err
  # One compilation (announced, with the garbage collector paused) per bucket: landscape and portrait.
  assert sum(record.getMessage().startswith("compiling the detection step") for record in caplog.records) == 2
  # Four readable images: three landscape ones in two batches, a portrait one alone. The two a.png get a drawing
  # each, named apart.
  readable = (0, 2, 3, 4)
  assert set(json.loads((out / "detections.json").read_text())) == {str(files[i]) for i in readable}
  drawings = dict(zip(readable, predict.drawing_names([str(files[i]) for i in readable])))
  assert drawings[2] == "gray.png" and drawings[0] != drawings[4] and drawings[0].startswith("a-")
  assert sorted(p.name for p in out.glob("*.png")) == sorted(drawings.values())
  for index in readable:
    original = predict.read_rgb(files[index])
    assert_drawn_where_detected(original, out / drawings[index], results[str(files[index])])
    height, width = original.shape[:2]
    for det in results[str(files[index])]:
      x1, y1, x2, y2 = det["box"]
      assert 0 <= x1 <= x2 <= width and 0 <= y1 <= y2 <= height
      assert det["class_name"] in pipeline.dataset_info(config.data).class_names and 0 < det["score"] <= 1


def test_predict_sees_the_pixels_evaluation_sees(shapes_tfds_dir):
  # The first images of the evaluation split, through the evaluation pipeline and through predict.
  config = shapes_libra_faster_rcnn.get_config()
  config.data.tfds_data_dir = shapes_tfds_dir
  config.data.eval_split = "validation[:4]"
  batch = next(iter(pipeline.eval_batches(config.data, batch_size=4)))
  named = dict(predict.read_eval_images(config.data, 4))
  table = pipeline.eval_batches(config.data, batch_size=4).table
  for slot in np.flatnonzero(batch["valid"]):
    name = table.filename[list(table.image_id).index(batch["image_id"][slot])]
    mine = predict.prepare(named[name], config.data)
    assert mine["image"].shape[1:] == batch["image"].shape[1:]
    np.testing.assert_array_equal(mine["image_shape"][0], batch["image_shape"][slot])
    np.testing.assert_allclose(mine["image"][0], batch["image"][slot], rtol=0, atol=1e-5)


def test_images_read_as_the_pipeline_decodes_them(monkeypatch):
  # A 16-bit PNG keeps its gradient (PIL's RGB conversion saturates it to white), and an image over PIL's
  # decompression-bomb limit is read as training reads it.
  values = np.arange(256, dtype=np.uint16).reshape(4, 64) * 257
  encoded = io.BytesIO()
  Image.fromarray(values).save(encoded, format="PNG")
  assert Image.open(io.BytesIO(encoded.getvalue())).mode == "I;16"
  image = predict.decode_rgb(encoded.getvalue())
  assert image.shape == (4, 64, 3) and image.dtype == np.uint8
  np.testing.assert_array_equal(image[..., 0], values // 257)
  large = io.BytesIO()
  Image.fromarray(np.full((64, 64, 3), 7, np.uint8)).save(large, format="PNG")
  monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
  with pytest.raises(Image.DecompressionBombError):
    Image.open(io.BytesIO(large.getvalue()))
  assert (predict.decode_rgb(large.getvalue()) == 7).all()
  with pytest.raises(ValueError, match="[Ii]mage"):
    predict.decode_rgb(b"not an image")

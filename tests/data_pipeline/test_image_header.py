"""Image sizes from headers (no decoding), the damage the header checks catch, and the damage only decoding shows."""

import io
import json
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from data_support import small_config
from libra_jax.data import image_header, pipeline
from libra_jax.data.tf_runtime import tf
from libra_jax.errors import DataError


def encoded(image_format: str, mode: str = "RGB", size=(83, 61), **save) -> bytes:
  pixels = np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
  buffer = io.BytesIO()
  Image.fromarray(pixels).convert(mode).save(buffer, format=image_format, **save)
  return buffer.getvalue()


@pytest.mark.parametrize("image_format, mode", [("JPEG", "RGB"), ("JPEG", "L"), ("JPEG", "CMYK"), ("PNG", "RGB"),
                                                ("PNG", "RGBA"), ("PNG", "P"), ("GIF", "P"), ("BMP", "RGB"),
                                                ("WEBP", "RGB")])
def test_the_header_gives_the_size_that_decoding_gives(image_format, mode):
  data = encoded(image_format, mode)
  header = image_header.read(data)
  decoded = tf.io.decode_image(data, channels=3, expand_animations=False)
  assert (header.height, header.width, 3) == tuple(decoded.shape) == (61, 83, 3)
  assert header.format == image_format and header.mode == mode


def with_thumbnail(jpeg: bytes, thumbnail: bytes) -> bytes:
  """``jpeg`` with a whole JPEG ``thumbnail`` in an APP1 segment after its start marker, as EXIF stores one."""
  return jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(thumbnail) + 2) + thumbnail + jpeg[2:]


@pytest.mark.parametrize("data, reason", [
    (encoded("JPEG")[:-300], "JPEG data ends before its end-of-image marker"),
    (encoded("JPEG", progressive=True)[:-300], "JPEG data ends before"),
    (with_thumbnail(encoded("JPEG"), encoded("JPEG", size=(16, 12)))[:-300], "JPEG data ends before"),
    (encoded("PNG")[:-40], "PNG chunks are damaged or cut off"),
    (encoded("TIFF"), "TIFF image; the pipeline decodes JPEG, MPO, PNG, GIF, BMP, WEBP"),
    (b"this is not an image", "not an image file PIL can identify"),
])
def test_cut_off_unsupported_and_unreadable_files_are_refused_from_the_header(data, reason):
  with pytest.raises(image_header.HeaderError, match=reason):
    image_header.read(data)
  with pytest.raises(tf.errors.InvalidArgumentError):  # what decoding them would have done
    tf.io.decode_image(data, channels=3, expand_animations=False)


def test_a_phone_cameras_multi_picture_jpeg_is_read_by_its_first_picture():
  picture = Image.fromarray(np.random.default_rng(1).integers(0, 256, (61, 83, 3), dtype=np.uint8))
  buffer = io.BytesIO()
  picture.save(buffer, format="MPO", save_all=True, append_images=[picture.resize((40, 30))])
  data = buffer.getvalue()
  header = image_header.read(data)
  assert header.format == "MPO" and (header.height, header.width) == (61, 83)
  assert tuple(tf.io.decode_image(data, channels=3, expand_animations=False).shape) == (61, 83, 3)
  # The decoder reads the first picture only, so a cut in the second one does not matter; one in the first does.
  first_end = data.index(b"\xff\xd9") + 2
  assert image_header.read(data[:first_end + 40]).width == 83
  with pytest.raises(image_header.HeaderError, match="truncated"):
    image_header.read(data[:first_end - 40])


def test_a_whole_jpeg_with_a_thumbnail_passes():
  data = with_thumbnail(encoded("JPEG"), encoded("JPEG", size=(16, 12)))
  assert (image_header.read(data).height, image_header.read(data).width) == (61, 83)


def corrupt_png_data(png: bytes) -> bytes:
  """``png`` with its compressed pixel data garbled behind valid chunk checksums: only decoding can tell."""
  start = png.index(b"IDAT") - 4
  length = struct.unpack(">I", png[start:start + 4])[0]
  garbled = png[start + 8:start + 10] + bytes(255 - b for b in png[start + 10:start + 8 + length])
  chunk = struct.pack(">I", length) + b"IDAT" + garbled + struct.pack(">I", zlib.crc32(b"IDAT" + garbled))
  return png[:start] + chunk + png[start + 12 + length:]


def test_an_image_whose_data_only_decoding_finds_damaged_stops_the_pipeline_with_its_name(tmp_path):
  damaged = corrupt_png_data(encoded("PNG", size=(80, 60)))
  assert image_header.read(damaged).width == 80
  images = tmp_path / "images"
  images.mkdir()
  names = [f"whole_{i}.png" for i in range(5)] + ["damaged.png", "whole_5.png"]  # ids 1-7, damaged 6
  for name in names:
    (images / name).write_bytes(damaged if name == "damaged.png" else encoded("PNG", size=(80, 60)))
  annotations = {"images": [{"id": i, "file_name": name, "width": 80, "height": 60} for i, name in enumerate(names, 1)],
                 "annotations": [{"id": i, "image_id": i, "category_id": 1, "bbox": [10, 10, 20, 20], "area": 400,
                                  "iscrowd": 0} for i in range(1, len(names) + 1)],
                 "categories": [{"id": 1, "name": "thing"}]}
  path = tmp_path / "instances.json"
  path.write_text(json.dumps(annotations))
  config = small_config("coco_folder", tfds_data_dir=str(tmp_path / "tfds"), train_annotations=str(path),
                        train_images=str(images), val_annotations=str(path), val_images=str(images))
  # Evaluation reads the images in record order, two at a time: the batches before the damaged image's come
  # through (tf.data reads ahead of them), then its own stops the stream.
  batches = pipeline.eval_batches(config, 2)
  position = list(batches.table.filename).index("damaged.png")
  assert position >= 4  # TFDS's preparation puts the records in the order of ids 3, 7, 4, 2, 5, 1, 6
  for _ in range(position // 2):
    assert batches.table.image_id[position] not in next(batches)["image_id"]
  with pytest.raises(DataError, match=r"coco_folder/instances_\w+ validation: image damaged.png cannot be decoded "
                                      r"\(.+\); its header reads, so the metadata pass kept it. Replace the image "
                                      r"file, or delete it"):
    next(batches)
  with pytest.raises(StopIteration):  # the stream ends there
    next(batches)
  training = pipeline.train_batches(config, 2, seed=0)
  with pytest.raises(DataError, match="train: image damaged.png cannot be decoded"):
    for _ in range(8):  # a pass over the seven images takes four batches
      next(training)

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
    (with_thumbnail(encoded("JPEG"), encoded("JPEG", size=(16, 12)))[:-300], "JPEG data ends before"),
    (encoded("PNG")[:-40], "PNG chunks are damaged or cut off"),
    (encoded("TIFF"), "TIFF image; the pipeline decodes JPEG, PNG, GIF, BMP, WEBP"),
    (b"this is not an image", "not an image file PIL can identify"),
])
def test_cut_off_unsupported_and_unreadable_files_are_refused_from_the_header(data, reason):
  with pytest.raises(image_header.HeaderError, match=reason):
    image_header.read(data)
  with pytest.raises(tf.errors.InvalidArgumentError):  # what decoding them would have done
    tf.io.decode_image(data, channels=3, expand_animations=False)


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
  (images / "whole.png").write_bytes(encoded("PNG", size=(80, 60)))
  (images / "damaged.png").write_bytes(damaged)
  annotations = {"images": [{"id": 1, "file_name": "whole.png", "width": 80, "height": 60},
                            {"id": 2, "file_name": "damaged.png", "width": 80, "height": 60}],
                 "annotations": [{"id": i, "image_id": i, "category_id": 1, "bbox": [10, 10, 20, 20], "area": 400,
                                  "iscrowd": 0} for i in (1, 2)],
                 "categories": [{"id": 1, "name": "thing"}]}
  path = tmp_path / "instances.json"
  path.write_text(json.dumps(annotations))
  config = small_config("coco_folder", tfds_data_dir=str(tmp_path / "tfds"), train_annotations=str(path),
                        train_images=str(images), val_annotations=str(path), val_images=str(images))
  with pytest.raises(DataError, match=r"coco_folder/instances_\w+ train: image damaged.png cannot be decoded \(.+\); "
                                      r"its header reads, so the metadata pass kept it. Replace the image file, or "
                                      r"delete it"):
    next(pipeline.train_batches(config, 2, seed=0))
  with pytest.raises(DataError, match="image damaged.png cannot be decoded"):
    next(pipeline.eval_batches(config, 2))

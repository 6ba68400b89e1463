"""What an encoded image's header says — format, size, colour mode — read without decoding its pixels.

The metadata pass learns every image's size here: PIL parses only the
header (a JPEG's frame marker, a PNG's IHDR chunk), so a table of 118,000
COCO images takes seconds instead of minutes of decoding. The cheap checks
that catch what most often goes wrong with a file come with it: a format
TensorFlow's decoder does not read, a JPEG cut off before its end marker, a
PNG whose chunks are cut off or fail their checksums. Damage that only
decoding reveals (a PNG whose compressed data is corrupt behind valid
checksums) is found when the pipeline decodes the image, and named there.
"""

import dataclasses
import io
from typing import Optional

from PIL import Image

# The formats ``tf.io.decode_image`` reads, by PIL's name for them.
DECODABLE_FORMATS = ("JPEG", "PNG", "GIF", "BMP", "WEBP")

_JPEG_START_OF_SCAN = b"\xff\xda"
_JPEG_END_OF_IMAGE = b"\xff\xd9"


@dataclasses.dataclass(frozen=True)
class Header:
  """``height`` and ``width`` in pixels; ``mode`` is PIL's (``"RGB"``, ``"L"``, ``"CMYK"``, ...)."""
  format: str
  height: int
  width: int
  mode: str


class HeaderError(ValueError):
  """The encoded bytes are not an image the pipeline can decode; the message says why."""


def read(encoded: bytes) -> Header:
  """The header of ``encoded`` image bytes; raises ``HeaderError`` for an unreadable, unsupported or cut-off file."""
  try:
    opened = Image.open(io.BytesIO(encoded))
  except Exception as error:  # noqa: BLE001  (PIL raises many types for unreadable data)
    raise HeaderError(f"not an image file PIL can identify: {error}") from None
  header = Header(format=opened.format, height=opened.height, width=opened.width, mode=opened.mode)
  if header.format not in DECODABLE_FORMATS:
    raise HeaderError(f"{header.format} image; the pipeline decodes {', '.join(DECODABLE_FORMATS)}")
  problem = _incomplete(header.format, encoded)
  if problem:
    raise HeaderError(problem)
  return header


def _incomplete(image_format: str, encoded: bytes) -> Optional[str]:
  """Why the file's data is cut off or damaged, as far as that shows without decoding; None if it looks whole."""
  if image_format == "JPEG":
    # Entropy-coded data never holds 0xFFD9 (a 0xFF there is followed by 0x00 or a restart marker), so the end
    # marker after the last scan's start shows that the data runs to its end. An EXIF thumbnail's own end marker
    # comes before the main image's scans.
    if encoded.rfind(_JPEG_END_OF_IMAGE) < encoded.rfind(_JPEG_START_OF_SCAN):
      return "the JPEG data ends before its end-of-image marker (the file is truncated)"
  elif image_format == "PNG":
    try:
      Image.open(io.BytesIO(encoded)).verify()  # walks the chunks and checks their CRCs, decompresses nothing
    except Exception as error:  # noqa: BLE001
      return f"the PNG chunks are damaged or cut off: {error}"
  return None

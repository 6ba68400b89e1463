"""What an encoded image's header says — format, size, colour mode — read without decoding its pixels.

The metadata pass learns every image's size here: PIL parses only the
header (a JPEG's frame marker, a PNG's IHDR chunk), with no pixel decoded
(about 1 ms an image in the pass, most of it reading the record). The cheap checks
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

# The formats ``tf.io.decode_image`` reads, by PIL's name for them. MPO is a JPEG with more pictures after the
# first (phone cameras write them); the decoder reads the first.
DECODABLE_FORMATS = ("JPEG", "MPO", "PNG", "GIF", "BMP", "WEBP")

_JPEG_START_OF_SCAN, _JPEG_END_OF_IMAGE = 0xDA, 0xD9
_JPEG_STANDALONE = frozenset(range(0xD0, 0xD8)) | {0x01}  # restart markers and TEM carry no length


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
  except Image.DecompressionBombError as error:
    raise HeaderError(f"larger than PIL's limit for one image: {error}") from None
  except Exception as error:  # noqa: BLE001  (PIL raises many types for unreadable data)
    raise HeaderError(f"not an image file PIL can identify: {error}") from None
  header = Header(format=opened.format, height=opened.height, width=opened.width, mode=opened.mode)
  if header.format not in DECODABLE_FORMATS:
    raise HeaderError(f"{header.format} image; the pipeline decodes {', '.join(DECODABLE_FORMATS)}")
  problem = _incomplete(opened, encoded)
  if problem:
    raise HeaderError(problem)
  return header


def _incomplete(opened: Image.Image, encoded: bytes) -> Optional[str]:
  """Why the file's data is cut off or damaged, as far as that shows without decoding; None if it looks whole.

  ``opened`` is the file as PIL opened it; its pixels are not loaded (a PNG's
  ``verify`` consumes it).
  """
  if opened.format in ("JPEG", "MPO") and not _first_jpeg_picture_is_whole(encoded):
    return "the JPEG data ends before its end-of-image marker (the file is truncated)"
  elif opened.format == "PNG":
    try:
      opened.verify()  # walks the chunks and checks their CRCs, decompresses nothing
    except Exception as error:  # noqa: BLE001
      return f"the PNG chunks are damaged or cut off: {error}"
  return None


def _first_jpeg_picture_is_whole(encoded: bytes) -> bool:
  """Whether the first picture of a JPEG (or MPO) runs from its start marker to its end-of-image marker.

  Walks the marker segments by their lengths, so an EXIF thumbnail inside an
  APP segment is skipped whole, and each scan's entropy-coded data up to the
  next marker (a 0xFF there is followed by 0x00 or a restart marker). The
  pictures an MPO appends after the first are not read: the decoder takes the
  first.
  """
  position, size = 2, len(encoded)
  while position + 1 < size:
    if encoded[position] != 0xFF:
      return False
    marker = encoded[position + 1]
    if marker == 0xFF:  # fill byte before a marker
      position += 1
    elif marker == _JPEG_END_OF_IMAGE:
      return True
    elif marker in _JPEG_STANDALONE:
      position += 2
    else:
      if position + 4 > size:
        return False
      position += 2 + int.from_bytes(encoded[position + 2:position + 4], "big")
      if marker == _JPEG_START_OF_SCAN:
        position = _end_of_entropy_data(encoded, position)
  return False


def _end_of_entropy_data(encoded: bytes, position: int) -> int:
  """The offset of the first marker at or after ``position`` that ends a scan's entropy-coded data."""
  while True:
    position = encoded.find(b"\xff", position)
    if position < 0 or position + 1 >= len(encoded):
      return len(encoded)
    following = encoded[position + 1]
    if following == 0x00 or following in _JPEG_STANDALONE - {0x01}:
      position += 2
    elif following == 0xFF:
      position += 1
    else:
      return position

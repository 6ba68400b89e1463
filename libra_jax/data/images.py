"""Per-image TensorFlow transforms: decode to RGB, resize, flip, normalize, pad to the bucket."""

from typing import Sequence

from libra_jax.data.tf_runtime import tf


def decode(encoded: tf.Tensor) -> tf.Tensor:
  """JPEG/PNG/GIF/BMP/WebP bytes -> ``[h, w, 3]`` uint8 RGB.

  Grayscale is repeated to three channels, alpha dropped, CMYK and palettes
  converted; the first frame of an animation is kept. Raises
  ``InvalidArgumentError`` on data it cannot decode.
  """
  image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
  image.set_shape([None, None, 3])
  return image


def preprocess(image: tf.Tensor, height: tf.Tensor, width: tf.Tensor, flip: tf.Tensor, bucket_height: tf.Tensor,
               bucket_width: tf.Tensor, mean: Sequence[float], std: Sequence[float]) -> tf.Tensor:
  """Decoded ``image`` -> ``[bucket_height, bucket_width, 3]`` float32, normalized and zero-padded bottom-right.

  The image is resized (bilinear, half-pixel centres, as OpenCV's
  ``INTER_LINEAR``) to ``height x width`` pixels, mirrored left-right if
  ``flip``, and normalized as ``(pixel - mean) / std`` per RGB channel.
  """
  resized = tf.image.resize(tf.cast(image, tf.float32), tf.stack([height, width]), method="bilinear")
  resized = tf.cond(flip, lambda: tf.reverse(resized, axis=[1]), lambda: resized)
  inverse_std = 1.0 / tf.constant(std, tf.float32)
  normalized = resized * inverse_std - tf.constant(mean, tf.float32) * inverse_std
  return tf.pad(normalized, [[0, bucket_height - height], [0, bucket_width - width], [0, 0]])

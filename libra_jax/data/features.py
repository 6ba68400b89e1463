"""The TFDS features every detection source of the project shares: those of ``coco/2017``."""

import numpy as np
import tensorflow_datasets as tfds


def detection_features(label: tfds.features.ClassLabel) -> tfds.features.FeaturesDict:
  """JPEG image, file name, id, and objects with normalized ``[ymin, xmin, ymax, xmax]`` boxes and ``label``."""
  return tfds.features.FeaturesDict({
      "image": tfds.features.Image(encoding_format="jpeg"),
      "image/filename": tfds.features.Text(),
      "image/id": np.int64,
      "objects": tfds.features.Sequence({
          "id": np.int64,
          "area": np.int64,
          "bbox": tfds.features.BBoxFeature(),
          "label": label,
          "is_crowd": np.bool_,
      }),
  })

"""Fixtures of the input pipeline tests: the mini COCO folder, TFDS's real coco/2017 prepared from its zips, shapes.

Each dataset is prepared once per test session in a temporary directory.
"""

import pytest
import tensorflow_datasets as tfds
from tensorflow_datasets.core.download import checksums
from tensorflow_datasets.object_detection import coco

import mini_coco
from data_support import small_config

tfds.disable_progress_bar()

@pytest.fixture(scope="session")
def folder(tmp_path_factory) -> mini_coco.MiniCoco:
  return mini_coco.write_folder(tmp_path_factory.mktemp("mini_coco"))


@pytest.fixture(scope="session")
def folder_config(folder, tmp_path_factory):
  """A function of overrides -> ``config.data`` of the mini folder through the coco_folder builder."""
  data_dir = str(tmp_path_factory.mktemp("folder_tfds"))

  def make(**overrides):
    return small_config("coco_folder", tfds_data_dir=data_dir, train_annotations=folder.train_annotations,
                        train_images=folder.train_images, val_annotations=folder.val_annotations,
                        val_images=folder.val_images, **overrides)

  return make


@pytest.fixture(scope="session")
def coco2017_dir(tmp_path_factory) -> str:
  """A TFDS data dir with the real ``coco/2017`` builder prepared offline from the mini dataset's zips."""
  root = tmp_path_factory.mktemp("coco2017")
  zips = mini_coco.write_coco_zips(root / "manual")
  # The builder expects COCO's real files; give it the checksums of ours.
  expected = {url: checksums.compute_url_info(zips[info.filename])
              for url, info in coco.Coco.url_infos.items() if info.filename in zips}
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(coco.Coco, "url_infos", expected)
    builder = tfds.builder("coco/2017", data_dir=str(root / "tfds"))
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(root / "manual")))
  return str(root / "tfds")


@pytest.fixture(scope="session")
def shapes_dir(shapes_tfds_dir) -> str:
  """The session's TFDS data dir where the pipeline prepared ``shapes`` (easy) on first use."""
  return shapes_tfds_dir

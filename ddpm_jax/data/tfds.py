"""TFDS image datasets, read with random access from their ArrayRecord files.

The paper's, in `PAPER_DATASETS`, read as stored (their shape is checked against `config.data`):
  'cifar10'              32x32x3, splits 'train' (50,000) / 'test' (10,000).
  'celeb_a_hq/256'       256x256x3, split 'train' only (30,000); TFDS needs a manual download.
  'lsun/church_outdoor'  JPEGs of varying size, center-cropped to a square and resized to
  'lsun/bedroom'         `config.data.image_size`; splits 'train' / 'validation'.
  'lsun/cat'             As above, split 'train' only (TFDS has no LSUN validation split for the
                         object categories).
Any other TFDS name (e.g. 'mnist', 'oxford_flowers102', 'tf_flowers', 'lsun/kitchen',
'mnist:3.0.1') is fitted to the configured size and channels (`images.fit_image`); the feature
read is its only `tfds.features.Image`, or the one named 'image' where it has several. TFDS
learns a dataset's split names when it prepares it, so before that it has none.

The data is read through `tfds.data_source` under `config.data.data_dir` (None: $TFDS_DATA_DIR,
else ~/tensorflow_datasets). On first use (`config.data.download`, True by default) the dataset
is downloaded and prepared there: process 0 runs TFDS's `download_and_prepare` (with its progress
bars; a no-op once prepared) while the other processes wait for it at a barrier, so on several
hosts `data_dir` must be storage they all see (a gs:// bucket). With `config.data.download =
False` an unprepared dataset stops the run with the command that prepares it beforehand, e.g. for
CIFAR10:
  python -c "import tensorflow_datasets as tfds; tfds.data_source('cifar10',
    builder_kwargs={'file_format': 'array_record'})"
(add `data_dir='...'` to both that call and the config to use another directory).
TFDS, and TensorFlow with the accelerators hidden from it (`tf_support`), are imported only here:
by `Tfds.info` for a name not in `PAPER_DATASETS`, else when a split is opened.
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from ddpm_jax import tf_support
from ddpm_jax.data import core, images

PAPER_DATASETS = {
  info.name: info
  for info in (
    core.DatasetInfo('cifar10', 32, 3, ('train', 'test')),
    core.DatasetInfo('celeb_a_hq/256', 256, 3, ('train',), manual_download=True),
    core.DatasetInfo('lsun/church_outdoor', None, 3, ('train', 'validation')),
    core.DatasetInfo('lsun/bedroom', None, 3, ('train', 'validation')),
    core.DatasetInfo('lsun/cat', None, 3, ('train',)),
  )
}


class NotTfdsError(ValueError):
  """`tfds.builder` knows no dataset of this name; `tfds_names` are those it knows."""

  def __init__(self, name: str, tfds_names: list[str]):
    super().__init__(f'{name!r} is not a TFDS dataset.')
    self.tfds_names = tfds_names


def _import_tfds():
  tf_support.import_tensorflow()  # Before TFDS, which may import TF to read the data.
  import tensorflow_datasets as tfds  # Only TFDS datasets need it; slow to import.

  return tfds


def base_name(name: str) -> str:
  """'lsun/church_outdoor:3.1.0' -> 'lsun': the dataset without its config and version."""
  return name.split(':')[0].split('/')[0]


def _builder(name: str, data_dir: str | None, **kwargs):
  """`tfds.builder(name)`; a `NotTfdsError` for a name TFDS does not know."""
  tfds = _import_tfds()
  try:
    return tfds.builder(name, data_dir=data_dir, **kwargs)
  except (ValueError, AssertionError) as e:  # DatasetNotFoundError is a ValueError.
    tfds_names = tfds.list_builders(with_community_datasets=False)
    if base_name(name) in tfds_names:  # An unknown config or version of a TFDS dataset.
      raise ValueError(f'TFDS cannot open dataset {name!r}: {e}') from e
    raise NotTfdsError(name, tfds_names) from None  # TFDS's message lists all its datasets.


def _builder_info(name: str, data_dir: str | None) -> core.DatasetInfo:
  """The info of a TFDS image dataset, from its builder's features and (once prepared) splits."""
  tfds = _import_tfds()
  builder = _builder(name, data_dir)
  features = builder.info.features
  items = features.items() if isinstance(features, tfds.features.FeaturesDict) else ()
  keys = [key for key, feature in items if isinstance(feature, tfds.features.Image)]
  if len(keys) > 1 and 'image' in keys:
    keys = ['image']
  if len(keys) != 1:
    problem = f'several image features ({", ".join(keys)})' if keys else 'no image feature'
    raise ValueError(
      f'TFDS dataset {name!r} has {problem}; the pipeline reads datasets with one '
      f'tfds.features.Image (or one named "image"). Its features: {features}'
    )
  feature = features[keys[0]]
  if np.dtype(feature.np_dtype) != np.uint8:
    raise ValueError(
      f'TFDS dataset {name!r} stores {keys[0]!r} as {np.dtype(feature.np_dtype)}; the pipeline '
      'reads uint8 images only.'
    )
  height, width, channels = feature.shape
  return core.DatasetInfo(
    name,
    height if height is not None and height == width else None,
    channels,
    tuple(builder.info.splits),
    manual_download=bool(getattr(builder, 'MANUAL_DOWNLOAD_INSTRUCTIONS', None)),
    image_key=keys[0],
  )


class TfdsSource:
  """Random access to one split of a TFDS dataset prepared in ArrayRecord format.

  Reads and decodes only the requested examples, one by one, and keeps only their images.
  """

  def __init__(
    self,
    info: core.DatasetInfo,
    split: str,
    *,
    data_dir: str | None,
    image_size: int,
    num_channels: int,
    download: bool,
  ):
    """Opens the split, preparing the dataset first if `download`.

    Args:
      info: the dataset, from `data.get_dataset_info`.
      split: the split to read.
      data_dir: the TFDS data_dir of the prepared dataset; None means TFDS's default
        ($TFDS_DATA_DIR, else ~/tensorflow_datasets).
      image_size: side of the returned images (`images.fit_image`).
      num_channels: channels of the returned images (`images.fit_image`).
      download: whether to download and prepare the dataset if it is not prepared
        (`prepare_tfds_dataset`).

    Raises:
      FileNotFoundError: (saying how to prepare it) for a dataset not prepared in ArrayRecord
        format, or a manual download missing.
    """
    self.info = info
    self.image_size = image_size
    self.num_channels = num_channels
    tfds = _import_tfds()
    if download:
      prepare_tfds_dataset(info, data_dir=data_dir)
    try:
      # No `file_format` here: TFDS then opens whichever random-access format the prepared data
      # has, and naming one fails for data prepared in several formats.
      self._source = tfds.data_source(info.name, split=split, data_dir=data_dir, download=False)
    except (KeyError, NotImplementedError) as e:  # Not prepared / prepared as TFRecord only.
      problem = f'(split {split!r}) is not prepared in ArrayRecord format in {_where(data_dir)}'
      if download:
        problem += (
          ', although process 0 prepared it on first use: on several hosts, '
          'config.data.data_dir must be storage that all of them see.'
        )
      else:
        problem += ', and config.data.download = False.'
      raise FileNotFoundError(_prepare_instructions(info, data_dir, problem)) from e

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, indices: np.ndarray) -> np.ndarray:
    """indices: int [n] in [0, len(self)) -> uint8 [n, image_size, image_size, num_channels]."""
    return images.fit_batch(
      lambda i: self._source[i][self.info.image_key], indices, self.image_size, self.num_channels
    )


def prepare_tfds_dataset(info: core.DatasetInfo, *, data_dir: str | None) -> None:
  """Downloads and prepares a TFDS dataset in ArrayRecord format, on process 0, if it is not.

  Process 0 runs TFDS's `download_and_prepare` (a no-op for a prepared dataset; TFDS shows its
  progress) while the other processes wait for it at a barrier, as the Flax examples do: every
  process must call this at the same point. On several hosts `data_dir` must be storage they all
  see.

  Raises:
    FileNotFoundError: for a dataset that needs a manual download and does not have it.
  """
  if jax.process_index() == 0:
    builder = _builder(info.name, data_dir, file_format='array_record')
    if not builder.is_prepared():
      logging.info('Preparing TFDS dataset %s in %s (first use).', info.name, builder.data_dir)
    try:
      builder.download_and_prepare()
    except AssertionError as e:  # TFDS's error for a missing manual download.
      if not info.manual_download:
        raise
      problem = f'cannot be prepared in {_where(data_dir)} without its manual download.'
      raise FileNotFoundError(_prepare_instructions(info, data_dir, problem)) from e
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f'ddpm_jax: TFDS dataset {info.name} prepared')


def _prepare_instructions(info: core.DatasetInfo, data_dir: str | None, problem: str) -> str:
  """'TFDS dataset <name> <problem>', then the command that prepares it (and where a manual
  download goes)."""
  message = (
    f'TFDS dataset {info.name!r} {problem} Prepare it once, before training, with\n'
    f'  python -c "import tensorflow_datasets as tfds; tfds.data_source({info.name!r}, '
    f"data_dir={data_dir!r}, builder_kwargs={{'file_format': 'array_record'}})\""
  )
  if info.manual_download and info.name.startswith('celeb_a_hq'):
    message += (
      f'\n{info.name!r} needs a manual download first: put the data<size>x<size>.tar files made '
      "with ProGAN's dataset tool in <data_dir>/downloads/manual/ "
      '(https://www.tensorflow.org/datasets/catalog/celeb_a_hq).'
    )
  elif info.manual_download:
    message += (
      f'\n{info.name!r} needs a manual download first, into <data_dir>/downloads/manual/ '
      f'(https://www.tensorflow.org/datasets/catalog/{base_name(info.name)}).'
    )
  return message


def _where(data_dir: str | None) -> str:
  return data_dir or '$TFDS_DATA_DIR or ~/tensorflow_datasets'


class Tfds:
  """A TFDS dataset as a `core.Dataset`."""

  def __init__(self, data: ml_collections.ConfigDict):
    self.data = data

  def info(self) -> core.DatasetInfo:
    """The paper's datasets from `PAPER_DATASETS` (no TFDS import), others from TFDS.

    Raises:
      NotTfdsError: for a name TFDS does not know.
      ValueError: for a paper dataset of another shape than the config's, an unknown config or
        version of a TFDS dataset, or one without a uint8 image feature or with several.
    """
    name = self.data.dataset
    if name in PAPER_DATASETS:
      core.check_stored_shape(PAPER_DATASETS[name], self.data)
      return PAPER_DATASETS[name]
    return _builder_info(name, self.data.data_dir)

  def open(self, info: core.DatasetInfo, split: str) -> TfdsSource:
    data = self.data
    return TfdsSource(
      info,
      split,
      data_dir=data.data_dir,
      image_size=data.image_size,
      num_channels=data.num_channels,
      download=data.download,
    )

  def content_key(self, split: str) -> dict[str, Any]:
    """Nothing beyond the name, split and shape: TFDS fixes a dataset's content by its name."""
    return {}

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

Class labels (read when `config.model.num_classes` > 0) are a `tfds.features.ClassLabel` feature:
`config.data.label_key`, or where that is None the one named 'label', else the only one; the
class names are the feature's (`ClassLabel.names`). Of the paper's datasets only cifar10 has one
('label', 10 classes). A dataset without a ClassLabel has no labels; one whose ClassLabel cannot
be picked (a `label_key` that is not one, several and none named 'label') is an error only when
the run reads labels. Each example is read once: its label is kept as its image is read.

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

import dataclasses
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
    core.DatasetInfo(
      'cifar10',
      32,
      3,
      ('train', 'test'),
      # The names TFDS writes when it prepares cifar10, from the download's batches.meta.txt.
      class_names=(
        'airplane',
        'automobile',
        'bird',
        'cat',
        'deer',
        'dog',
        'frog',
        'horse',
        'ship',
        'truck',
      ),
      label_key='label',
    ),
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


def import_tfds():
  """The tensorflow_datasets module, imported after TensorFlow (`tf_support`)."""
  tf_support.import_tensorflow()  # Before TFDS, which may import TF to read the data.
  import tensorflow_datasets as tfds  # Only TFDS datasets need it; slow to import.

  return tfds


def base_name(name: str) -> str:
  """'lsun/church_outdoor:3.1.0' -> 'lsun': the dataset without its config and version."""
  return name.split(':')[0].split('/')[0]


def _builder(name: str, data_dir: str | None, **kwargs):
  """`tfds.builder(name)`; a `NotTfdsError` for a name TFDS does not know."""
  tfds = import_tfds()
  try:
    return tfds.builder(name, data_dir=data_dir, **kwargs)
  except (ValueError, AssertionError) as e:  # DatasetNotFoundError is a ValueError.
    tfds_names = tfds.list_builders(with_community_datasets=False)
    if base_name(name) in tfds_names:  # An unknown config or version of a TFDS dataset.
      raise ValueError(f'TFDS cannot open dataset {name!r}: {e}') from e
    raise NotTfdsError(name, tfds_names) from None  # TFDS's message lists all its datasets.


def _builder_info(
  name: str, data_dir: str | None
) -> tuple[core.DatasetInfo, dict[str, tuple[str, ...]]]:
  """The info of a TFDS image dataset, from its builder's features and (once prepared) splits,
  without labels; and its `ClassLabel` features, {key: class names}."""
  tfds = import_tfds()
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
  info = core.DatasetInfo(
    name,
    height if height is not None and height == width else None,
    channels,
    tuple(builder.info.splits),
    manual_download=bool(getattr(builder, 'MANUAL_DOWNLOAD_INSTRUCTIONS', None)),
    image_key=keys[0],
  )
  class_labels = {
    key: tuple(feature.names)
    for key, feature in items
    if isinstance(feature, tfds.features.ClassLabel)
  }
  return info, class_labels


def _label_feature(
  name: str,
  class_labels: dict[str, tuple[str, ...]],
  label_key: str | None,
  *,
  required: bool,
) -> str | None:
  """The `ClassLabel` feature that holds the labels (module docstring), or None for none.

  Args:
    name: the dataset.
    class_labels: its ClassLabel features, {key: class names}.
    label_key: `config.data.label_key`; None picks 'label', else the only ClassLabel.
    required: whether the run reads labels; only then is a ClassLabel that cannot be picked an
      error (else there are no labels).

  Raises:
    ValueError: where `required`, for a `label_key` that is not a ClassLabel feature, or for
      several ClassLabel features and none named 'label' (with `label_key` None).
  """
  if label_key is None:
    keys = ['label'] if 'label' in class_labels else list(class_labels)
    if len(keys) > 1 and required:
      raise ValueError(
        f'TFDS dataset {name!r} has several tfds.features.ClassLabel features '
        f"({', '.join(keys)}) and none named 'label': set config.data.label_key to the one "
        'that holds the classes.'
      )
    return keys[0] if len(keys) == 1 else None
  if label_key not in class_labels and required:
    raise ValueError(
      f'config.data.label_key = {label_key!r} is not a tfds.features.ClassLabel feature of TFDS '
      f'dataset {name!r}; its ClassLabel features: {", ".join(class_labels) or "none"}.'
    )
  return label_key if label_key in class_labels else None


class TfdsSource:
  """Random access to one split of a TFDS dataset prepared in ArrayRecord format.

  Reads and decodes only the requested examples, one by one, and keeps only their images and,
  with `with_labels`, their labels: those of the examples whose images were read are kept (an
  int64 per example of the split), so that `labels` after `source[indices]` reads nothing again.
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
    with_labels: bool,
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
      with_labels: whether `labels` reads the labels (feature `info.label_key`, which must be
        set); else it raises.

    Raises:
      FileNotFoundError: (saying how to prepare it) for a dataset not prepared in ArrayRecord
        format, or a manual download missing.
    """
    self.info = info
    self.split = split
    self.image_size = image_size
    self.num_channels = num_channels
    tfds = import_tfds()
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
    # The labels of the examples read so far (`_has_label`), where the run reads labels.
    self._labels = np.zeros(len(self._source), np.int64) if with_labels else None
    self._has_label = np.zeros(len(self._source), bool) if with_labels else None

  def __len__(self) -> int:
    return len(self._source)

  def _read(self, index: int) -> np.ndarray:
    """Example `index`'s image, as stored; its label is kept where the run reads labels.
    Raises ValueError naming the example where TFDS cannot read or decode it."""
    try:
      example = self._source[index]
    except Exception as e:  # A damaged record or image: ArrayRecord's, TFDS's or PIL's error.
      raise ValueError(
        f'Cannot read example {index} of split {self.split!r} of TFDS dataset '
        f'{self.info.name!r}: {type(e).__name__}: {e}'
      ) from e
    if self._labels is not None:
      self._labels[index] = example[self.info.label_key]
      self._has_label[index] = True
    return example[self.info.image_key]

  def __getitem__(self, indices: np.ndarray) -> np.ndarray:
    """indices: int [n] in [0, len(self)) -> uint8 [n, image_size, image_size, num_channels]."""
    return images.fit_batch(self._read, indices, self.image_size, self.num_channels)

  def labels(self, indices: np.ndarray) -> np.ndarray:
    """indices: int [n] in [0, len(self)) -> int64 [n] in [0, len(info.class_names)).

    Reads only the examples whose images have not been read yet.

    Raises:
      ValueError: for a source opened without labels, or an example without a class (TFDS
        stores -1 for an example of unknown class).
    """
    if self._labels is None:
      raise ValueError(
        f'TFDS dataset {self.info.name!r} was opened without labels (config.model.num_classes = 0).'
      )
    indices = np.asarray(indices, np.int64)
    for index in indices[~self._has_label[indices]]:
      self._read(int(index))
    labels = self._labels[indices]
    if len(labels) and labels.min() < 0:
      index = int(indices[np.argmin(labels)])
      raise ValueError(
        f'Example {index} of split {self.split!r} of TFDS dataset {self.info.name!r} has label '
        f'{labels.min()} in {self.info.label_key!r}: no class. A class-conditional model trains '
        'and evaluates on splits whose examples all have one.'
      )
    return labels


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
  """A TFDS dataset as a `core.Dataset`; `with_labels`: whether the run reads class labels."""

  def __init__(self, data: ml_collections.ConfigDict, *, with_labels: bool):
    self.data = data
    self.with_labels = with_labels

  def info(self) -> core.DatasetInfo:
    """The paper's datasets from `PAPER_DATASETS` (no TFDS import), others from TFDS; the
    labels of the `ClassLabel` feature `_label_feature` picks.

    Raises:
      NotTfdsError: for a name TFDS does not know.
      ValueError: for a paper dataset of another shape than the config's, an unknown config or
        version of a TFDS dataset, one without a uint8 image feature or with several, or (with
        labels) a ClassLabel that cannot be picked (`_label_feature`).
    """
    name = self.data.dataset
    if name in PAPER_DATASETS:
      info = PAPER_DATASETS[name]
      core.check_stored_shape(info, self.data)
      class_labels = {info.label_key: info.class_names} if info.label_key else {}
    else:
      info, class_labels = _builder_info(name, self.data.data_dir)
    label_key = _label_feature(name, class_labels, self.data.label_key, required=self.with_labels)
    return dataclasses.replace(info, label_key=label_key, class_names=class_labels.get(label_key))

  def open(self, info: core.DatasetInfo, split: str) -> TfdsSource:
    data = self.data
    return TfdsSource(
      info,
      split,
      data_dir=data.data_dir,
      image_size=data.image_size,
      num_channels=data.num_channels,
      download=data.download,
      with_labels=self.with_labels,
    )

  def content_key(self, split: str) -> dict[str, Any]:
    """Nothing beyond the name, split and shape: TFDS fixes a dataset's content by its name."""
    return {}

"""What every source of images offers the pipeline: its `DatasetInfo`, and random access.

A source module (`digits`, `tfds`, `folder`) holds one `Dataset` class, built from `config.data`
(and, for a TFDS dataset or a folder, whether the run reads class labels) without reading
anything. `Dataset.info()` checks the config against the dataset and says its splits and class
names; `Dataset.open(info, split)` gives a `Source`, random access to the images of the split
and, for a dataset with class names, to their labels; `Dataset.content_key(split)` names what,
beyond `config.data`'s name, split and image shape, fixes those images (evaluation's cache key).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

import ml_collections
import numpy as np


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What the pipeline knows about a dataset before reading it.

  Attributes:
    name: as in `config.data.dataset`: 'digits', 'folder' or a TFDS name.
    image_size: side of the stored square images, or None when they vary in size or are not
      square; images are center-cropped and resized to `config.data.image_size`.
    num_channels: channels of the stored images (1 or 3; 4 for RGBA), or None when they vary (a
      folder); images are converted to `config.data.num_channels`.
    splits: the split names the dataset has; empty for a TFDS dataset that is not prepared yet.
    eval_split: the held-out split for evaluation (bits/dim), or None when there is none. A
      source leaves it None: `data.get_dataset_info` sets it, from `config.data.eval_split` or
      the splits (`held_out_split`), the one rule for every dataset.
    manual_download: whether TFDS needs the source files downloaded by hand first.
    image_key: the TFDS feature that holds the image.
    class_names: the names of the classes in label order (label k is `class_names[k]`), or None
      when the dataset has no labels (or, for a folder, the run reads none).
    label_key: the TFDS `ClassLabel` feature that holds the label, or None.
  """

  name: str
  image_size: int | None
  num_channels: int | None
  splits: tuple[str, ...]
  eval_split: str | None = None
  manual_download: bool = False
  image_key: str = 'image'
  class_names: tuple[str, ...] | None = None
  label_key: str | None = None


def held_out_split(splits: tuple[str, ...]) -> str | None:
  """A dataset's own eval split: 'test' if it has one, else 'validation', else None."""
  return next((split for split in ('test', 'validation') if split in splits), None)


def check_stored_shape(info: DatasetInfo, data: ml_collections.ConfigDict) -> None:
  """Raises ValueError unless `config.data` asks for the channels (and, where the dataset has one
  size, the size) of a dataset whose images are read as stored: the paper's datasets."""
  if data.num_channels != info.num_channels:
    raise ValueError(
      f'config.data.num_channels = {data.num_channels}, but {info.name!r} images have '
      f'{info.num_channels} channel(s).'
    )
  if info.image_size is not None and data.image_size != info.image_size:
    raise ValueError(
      f'config.data.image_size = {data.image_size}, but {info.name!r} images are '
      f'{info.image_size}x{info.image_size} (only LSUN images are resized).'
    )


class Source(Protocol):
  """Random access to one split: `len(source)` examples, `source[indices]` their images and
  `source.labels(indices)` their class labels (a source of a dataset without class names raises
  ValueError there)."""

  def __len__(self) -> int: ...

  def __getitem__(self, indices: np.ndarray) -> np.ndarray:
    """indices: int [n] in [0, len(self)) -> uint8 [n, H, W, C] in 0..255."""
    ...

  def labels(self, indices: np.ndarray) -> np.ndarray:
    """indices: int [n] in [0, len(self)) -> int64 [n] in [0, K), K = len(info.class_names)."""
    ...


class InMemorySource:
  """A split held in memory, or in a memory-mapped file: the digits, a training split decoded
  once (`decoded`).

  Attributes:
    images: uint8 [N, H, W, C] in 0..255 (a NumPy array or memmap).
    all_labels: int64 [N] class labels, or None for a split read without labels.
  """

  def __init__(self, images: np.ndarray, labels: np.ndarray | None):
    self.images = images
    self.all_labels = labels

  def __len__(self) -> int:
    return len(self.images)

  def __getitem__(self, indices: np.ndarray) -> np.ndarray:
    """indices: int [n] in [0, N) -> uint8 [n, H, W, C]."""
    return np.asarray(self.images[indices])

  def labels(self, indices: np.ndarray) -> np.ndarray:
    """indices: int [n] in [0, N) -> int64 [n], their class labels."""
    if self.all_labels is None:
      raise ValueError('This split was read without labels (config.model.num_classes = 0).')
    return self.all_labels[indices]


class Dataset(Protocol):
  """One dataset named by `config.data.dataset`, built from `config.data` without I/O."""

  def info(self) -> DatasetInfo:
    """Checks `config.data` against the dataset (reading metadata, never examples)."""
    ...

  def open(self, info: DatasetInfo, split: str) -> Source:
    """The images of `split`, H = W = config.data.image_size, C = config.data.num_channels, and
    their labels where `info.class_names` is set."""
    ...

  def content_key(self, split: str) -> dict[str, Any]:
    """JSON-serializable settings that, with the name, split and image shape, fix the images
    (and their labels, where the run reads them)."""
    ...

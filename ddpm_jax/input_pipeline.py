"""Input pipeline: uint8 images in an order that is a pure function of (seed, step).

Every batch is uint8 `[B_local, H, W, C]` with values in 0..255; the train step on device scales
it to [-1, 1] (x / 127.5 - 1) and applies the random horizontal flip, so nothing here does.

Order. The global example stream is the concatenation of per-epoch permutations of the training
split, permutation `e` drawn from `np.random.default_rng([seed, e])`; global batch `s` is stream
positions [s * B, (s + 1) * B), and process p of P reads only its contiguous share
[p * B / P, (p + 1) * B / P) of it. A run resumed at step s therefore reads exactly the batches an
uninterrupted run would, in O(1) (no skipping through data), and the global batch does not depend
on the number of processes or devices. This holds for every dataset below.

Datasets (`config.data.dataset`). The paper's, in `DATASETS`:
  'digits'               scikit-learn's bundled 8x8 handwritten digits, 1 channel, embedded (no
                         download): 1,497 train / 300 test examples.
  'cifar10'              32x32x3, splits 'train' (50,000) / 'test' (10,000).
  'celeb_a_hq/256'       256x256x3, split 'train' only (30,000); TFDS needs a manual download.
  'lsun/church_outdoor'  JPEGs of varying size, center-cropped to a square and resized to
  'lsun/bedroom'         `config.data.image_size`; splits 'train' / 'validation'.
  'lsun/cat'             As above, split 'train' only (TFDS has no LSUN validation split for the
                         object categories).
Their image size and channels are checked against `config.data` (a mismatch is a config mistake).
Any other image dataset:
  any other TFDS name    e.g. 'mnist', 'oxford_flowers102', 'tf_flowers', 'lsun/kitchen',
                         'mnist:3.0.1'. The feature read is its only `tfds.features.Image`, or the
                         one named 'image' where it has several.
  'folder'               the PNG and JPEG files under `config.data.image_dir` (below).
Their images are made `config.data.num_channels` deep, then `config.data.image_size` square
(`fit_image`): greyscale becomes RGB by repeating the channel, RGB becomes greyscale by the
ITU-R 601-2 luma L = 0.299 R + 0.587 G + 0.114 B as PIL's `convert('L')` computes it (`to_luma`),
an alpha channel is dropped; then the central square is cropped and resized with PIL's
antialiasing Lanczos filter (`center_crop_and_resize`). Images already of that size and depth
are read unchanged.

Splits. Training reads `config.data.split` ('train'). The held-out split for bits/dim (and the
test images of the interpolation figure) is `config.data.eval_split`, or where that is None the
dataset's own: 'test' for digits and cifar10, 'validation' for LSUN church and bedroom, none for
celeb_a_hq and LSUN cat; for other TFDS datasets 'test' if it has one, else 'validation', else
none. TFDS learns a dataset's split names when it prepares it, so before that it has none.

A folder. Split 'train' is the files under `config.data.image_dir`, split 'test' those under
`config.data.eval_image_dir` (if set; it is then the eval split). Both are local (or mounted)
directories, searched recursively for files named *.png, *.jpg or *.jpeg (any case), skipping
files and directories whose names start with '.'. Example i is the i-th file in the order of
their paths relative to the directory ('a.png' < 'a/b.png' < 'b.jpg', POSIX separators, compared
as strings), listed once when the source is created; each is decoded with PIL when read (8-bit
greyscale, palette, RGB, RGBA, CMYK, ...: greyscale stays one channel, the rest become RGB). A
file PIL cannot decode raises an error that names it, when it is read.

TFDS datasets are read with random access through `tfds.data_source`, from their ArrayRecord
files under `config.data.data_dir` (None: $TFDS_DATA_DIR, else ~/tensorflow_datasets). On first
use (`config.data.download`, True by default) the dataset is downloaded and prepared there:
process 0 runs TFDS's `download_and_prepare` (with its progress bars; a no-op once prepared) while
the other processes wait for it at a barrier, so on several hosts `data_dir` must be storage they
all see (a gs:// bucket). With `config.data.download = False` an unprepared dataset stops the run
with the command that prepares it beforehand, e.g. for CIFAR10:
  python -c "import tensorflow_datasets as tfds; tfds.data_source('cifar10',
    builder_kwargs={'file_format': 'array_record'})"
(add `data_dir='...'` to both that call and the config to use another directory).
TFDS, and TensorFlow with the accelerators hidden from it (`tf_support`), are imported only for
TFDS datasets: by `get_dataset_info` for a name not in `DATASETS`, else when a split is opened.
The digits and folders need neither.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import os
import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

import jax
import ml_collections
import numpy as np
import PIL.Image
from absl import logging
from jax.experimental import multihost_utils
from sklearn import datasets as sklearn_datasets

from ddpm_jax import tf_support

T = TypeVar('T')


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
    eval_split: the held-out split for evaluation (bits/dim), or None when there is none.
    manual_download: whether TFDS needs the source files downloaded by hand first.
    image_key: the TFDS feature that holds the image.
  """

  name: str
  image_size: int | None
  num_channels: int | None
  splits: tuple[str, ...]
  eval_split: str | None
  manual_download: bool = False
  image_key: str = 'image'


DATASETS = {
  info.name: info
  for info in (
    DatasetInfo('digits', 8, 1, ('train', 'test'), 'test'),
    DatasetInfo('cifar10', 32, 3, ('train', 'test'), 'test'),
    DatasetInfo('celeb_a_hq/256', 256, 3, ('train',), None, manual_download=True),
    DatasetInfo('lsun/church_outdoor', None, 3, ('train', 'validation'), 'validation'),
    DatasetInfo('lsun/bedroom', None, 3, ('train', 'validation'), 'validation'),
    DatasetInfo('lsun/cat', None, 3, ('train',), None),
  )
}

FOLDER = 'folder'
IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg')

# The digits split: a fixed permutation of the 1,797 examples, the first 300 held out as 'test'.
DIGITS_NUM_TEST = 300
_DIGITS_SPLIT_SEED = 0


def get_dataset_info(config: ml_collections.ConfigDict) -> DatasetInfo:
  """Validates `config.data` against the dataset it names and returns that dataset's info.

  Call it at startup, before anything is compiled. It reads no examples and downloads nothing:
  for a TFDS dataset not in `DATASETS` it reads the dataset's metadata (TFDS's code, or the
  prepared dataset's), for a folder it looks for one image file.

  Raises:
    ValueError: for an unknown dataset name (the message lists the known ones and the closest
      TFDS names), a TFDS dataset without a uint8 image feature or with several, a folder without
      images, an `image_size` / `num_channels` that the dataset cannot produce, or a `split` /
      `eval_split` that it does not have.
    FileNotFoundError: for a folder that does not exist.
  """
  data = config.data
  name = data.dataset
  image_size = data.image_size
  if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
    raise ValueError(f'config.data.image_size must be a positive int, got {image_size!r}.')
  if name in DATASETS:
    info = DATASETS[name]
    if data.num_channels != info.num_channels:
      raise ValueError(
        f'config.data.num_channels = {data.num_channels}, but {name!r} images have '
        f'{info.num_channels} channel(s).'
      )
    if info.image_size is not None and image_size != info.image_size:
      raise ValueError(
        f'config.data.image_size = {image_size}, but {name!r} images are '
        f'{info.image_size}x{info.image_size} (only LSUN images are resized).'
      )
  elif name == FOLDER:
    info = _folder_info(data)
  else:
    info = _tfds_info(name, data.data_dir)
  if data.num_channels not in (1, 3):
    raise ValueError(
      f'config.data.num_channels must be 1 (greyscale) or 3 (RGB), got {data.num_channels!r}.'
    )
  for field in ('split', 'eval_split'):
    split = data[field]
    if split is not None and info.splits and split not in info.splits:
      raise ValueError(
        f'config.data.{field} = {split!r}, but {name!r} has the splits: {", ".join(info.splits)}.'
      )
  if data.eval_split is not None:
    info = dataclasses.replace(info, eval_split=data.eval_split)
  return info


def _folder_info(data: ml_collections.ConfigDict) -> DatasetInfo:
  """A folder's info; raises unless `image_dir` (and `eval_image_dir`, if set) hold images."""
  if data.image_dir is None:
    raise ValueError(
      f'config.data.dataset = {FOLDER!r} reads the images under config.data.image_dir, which is '
      'not set.'
    )
  for field in ('image_dir', 'eval_image_dir'):
    directory = data[field]
    if directory is None:
      continue
    if not os.path.isdir(directory):
      raise FileNotFoundError(f'config.data.{field} = {directory!r} is not a directory.')
    if next(_find_images(directory), None) is None:
      raise ValueError(
        f'config.data.{field} = {directory!r} holds no image files (*.png, *.jpg, *.jpeg; '
        "searched recursively, skipping names that start with '.')."
      )
  if data.eval_image_dir is None:
    return DatasetInfo(FOLDER, None, None, ('train',), None)
  return DatasetInfo(FOLDER, None, None, ('train', 'test'), 'test')


def _folder_directory(data: ml_collections.ConfigDict, split: str) -> str:
  """The directory of a folder dataset's split: 'train' is image_dir, 'test' eval_image_dir."""
  return data.image_dir if split == 'train' else data.eval_image_dir


def _import_tfds():
  tf_support.import_tensorflow()  # Before TFDS, which may import TF to read the data.
  import tensorflow_datasets as tfds  # Only TFDS datasets need it; slow to import.

  return tfds


def _tfds_builder(name: str, data_dir: str | None, **kwargs):
  """`tfds.builder(name)`; a ValueError naming the closest datasets for an unknown name."""
  tfds = _import_tfds()
  try:
    return tfds.builder(name, data_dir=data_dir, **kwargs)
  except (ValueError, AssertionError) as e:  # DatasetNotFoundError is a ValueError.
    tfds_names = tfds.list_builders(with_community_datasets=False)
    base_name = _tfds_base_name(name)
    if base_name in tfds_names:  # An unknown config or version of a TFDS dataset.
      raise ValueError(f'TFDS cannot open dataset {name!r}: {e}') from e
    close = difflib.get_close_matches(base_name, [*DATASETS, FOLDER, *tfds_names], n=5)
    suggestion = f' Closest names: {", ".join(close)}.' if close else ''
    raise ValueError(
      f'Unknown dataset {name!r}: not one of {", ".join(DATASETS)}, nor {FOLDER!r} (the images '
      f'under config.data.image_dir), nor a TFDS dataset.{suggestion}'
    ) from None  # TFDS's message lists all its datasets.


def _tfds_base_name(name: str) -> str:
  """'lsun/church_outdoor:3.1.0' -> 'lsun': the dataset without its config and version."""
  return name.split(':')[0].split('/')[0]


def _tfds_info(name: str, data_dir: str | None) -> DatasetInfo:
  """The info of a TFDS image dataset, from its builder's features and (once prepared) splits."""
  tfds = _import_tfds()
  builder = _tfds_builder(name, data_dir)
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
  splits = tuple(builder.info.splits)
  eval_split = next((split for split in ('test', 'validation') if split in splits), None)
  return DatasetInfo(
    name,
    height if height is not None and height == width else None,
    channels,
    splits,
    eval_split,
    manual_download=bool(getattr(builder, 'MANUAL_DOWNLOAD_INSTRUCTIONS', None)),
    image_key=keys[0],
  )


# --------------------------------------------------------------------------------------------
# Images: channels and size.
# --------------------------------------------------------------------------------------------


def to_luma(image: np.ndarray) -> np.ndarray:
  """uint8 RGB [..., 3] -> uint8 greyscale [..., 1]: the ITU-R 601-2 luma.

  L = 0.299 R + 0.587 G + 0.114 B, computed as PIL's `Image.convert('L')` does: in 16-bit fixed
  point, (19595 R + 38470 G + 7471 B + 2^15) >> 16, i.e. rounded to the nearest integer.
  """
  rgb = image.astype(np.uint32)
  luma = (rgb[..., 0] * 19595 + rgb[..., 1] * 38470 + rgb[..., 2] * 7471 + 0x8000) >> 16
  return luma.astype(np.uint8)[..., None]


def convert_channels(image: np.ndarray, num_channels: int) -> np.ndarray:
  """uint8 [h, w, c], c = 1 or 3 (2 or 4 with alpha) -> uint8 [h, w, num_channels].

  Drops an alpha channel, then repeats a grey channel into RGB or takes the luma of RGB
  (`to_luma`).
  """
  if image.shape[-1] in (2, 4):
    image = image[..., :-1]
  if image.shape[-1] == num_channels:
    return image
  if num_channels == 3:
    return np.repeat(image, 3, axis=-1)
  return to_luma(image)


def center_crop_and_resize(image: np.ndarray, size: int) -> np.ndarray:
  """Crops the central square of `image` and resizes it to `size` x `size`.

  As ProGAN's `dataset_tool.py create_lsun` prepared LSUN (the format the original DDPM code read
  LSUN from): crop min(h, w) x min(h, w) around the center (offsets rounded down), then resize
  with PIL's antialiasing Lanczos filter (formerly `PIL.Image.ANTIALIAS`).

  Args:
    image: uint8 [h, w, C] in 0..255, any h, w; C = 1 or 3.
    size: output side.

  Returns:
    uint8 [size, size, C] in 0..255.
  """
  height, width, channels = image.shape
  crop = min(height, width)
  top, left = (height - crop) // 2, (width - crop) // 2
  square = image[top : top + crop, left : left + crop]
  pil_image = PIL.Image.fromarray(square[..., 0] if channels == 1 else square)
  resized = np.asarray(pil_image.resize((size, size), PIL.Image.Resampling.LANCZOS))
  return resized.reshape(size, size, channels)


def fit_image(image: np.ndarray, *, size: int, num_channels: int) -> np.ndarray:
  """uint8 [h, w, c] -> uint8 [size, size, num_channels]: `convert_channels`, then
  `center_crop_and_resize` unless the image is already `size` x `size` (then read unchanged)."""
  image = convert_channels(image, num_channels)
  if image.shape[:2] != (size, size):
    image = center_crop_and_resize(image, size)
  return image


def _fit_batch(
  read: Callable[[int], np.ndarray], indices: np.ndarray, size: int, num_channels: int
) -> np.ndarray:
  """uint8 [n, size, size, num_channels]: the examples `read(index)` of `indices`, decoded one
  by one and each put through `fit_image`."""
  images = np.empty((len(indices), size, size, num_channels), np.uint8)
  for row, index in enumerate(indices):
    images[row] = fit_image(read(int(index)), size=size, num_channels=num_channels)
  return images


# --------------------------------------------------------------------------------------------
# Sources: random access to the examples of one split.
# --------------------------------------------------------------------------------------------


@functools.cache
def _load_digits() -> tuple[np.ndarray, np.ndarray]:
  """All 1,797 digits as read-only uint8 images [1797, 8, 8, 1] in 0..255 and int64 labels."""
  digits = sklearn_datasets.load_digits()
  # Values 0..16 -> 0..255, rounded half to even.
  images = np.round(digits.images * (255 / 16)).astype(np.uint8)[..., None]
  labels = digits.target.astype(np.int64)
  images.flags.writeable = labels.flags.writeable = False
  return images, labels


def _digits_split_indices(split: str) -> np.ndarray:
  """Sorted indices into `load_digits()` of split 'train' (int64 [1497]) or 'test' ([300])."""
  permutation = np.random.default_rng(_DIGITS_SPLIT_SEED).permutation(1797)
  chosen = permutation[:DIGITS_NUM_TEST] if split == 'test' else permutation[DIGITS_NUM_TEST:]
  return np.sort(chosen)


class InMemorySource:
  """A split held in memory (the embedded digits).

  Attributes:
    images: uint8 [N, H, W, C] in 0..255.
    labels: int64 [N] class labels (0..9 for digits).
  """

  def __init__(self, images: np.ndarray, labels: np.ndarray):
    self.images = images
    self.labels = labels

  def __len__(self) -> int:
    return len(self.images)

  def __getitem__(self, indices: np.ndarray) -> np.ndarray:
    """indices: int [n] in [0, N) -> uint8 [n, H, W, C]."""
    return self.images[indices]


class TfdsSource:
  """Random access to one split of a TFDS dataset prepared in ArrayRecord format.

  Reads and decodes only the requested examples, one by one, and keeps only their images.
  """

  def __init__(
    self,
    info: DatasetInfo,
    split: str,
    *,
    data_dir: str | None,
    image_size: int,
    num_channels: int,
    download: bool,
  ):
    """Opens the split, preparing the dataset first if `download`.

    Args:
      info: the dataset, from `get_dataset_info`.
      split: the split to read.
      data_dir: the TFDS data_dir of the prepared dataset; None means TFDS's default
        ($TFDS_DATA_DIR, else ~/tensorflow_datasets).
      image_size: side of the returned images (`fit_image`).
      num_channels: channels of the returned images (`fit_image`).
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
    return _fit_batch(
      lambda i: self._source[i][self.info.image_key], indices, self.image_size, self.num_channels
    )


def prepare_tfds_dataset(info: DatasetInfo, *, data_dir: str | None) -> None:
  """Downloads and prepares a TFDS dataset in ArrayRecord format, on process 0, if it is not.

  Process 0 runs TFDS's `download_and_prepare` (a no-op for a prepared dataset; TFDS shows its
  progress) while the other processes wait for it at a barrier, as the Flax examples do: every
  process must call this at the same point. On several hosts `data_dir` must be storage they all
  see.

  Raises:
    FileNotFoundError: for a dataset that needs a manual download and does not have it.
  """
  if jax.process_index() == 0:
    builder = _tfds_builder(info.name, data_dir, file_format='array_record')
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


def _prepare_instructions(info: DatasetInfo, data_dir: str | None, problem: str) -> str:
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
      f'(https://www.tensorflow.org/datasets/catalog/{_tfds_base_name(info.name)}).'
    )
  return message


def _where(data_dir: str | None) -> str:
  return data_dir or '$TFDS_DATA_DIR or ~/tensorflow_datasets'


def _find_images(directory: str) -> Iterator[str]:
  """The image files under `directory` (module docstring), as POSIX paths relative to it."""
  for root, dirs, files in os.walk(directory):
    dirs[:] = [d for d in dirs if not d.startswith('.')]
    for file in files:
      if not file.startswith('.') and os.path.splitext(file)[1].lower() in IMAGE_EXTENSIONS:
        yield os.path.relpath(os.path.join(root, file), directory).replace(os.sep, '/')


_GREY_MODES = ('1', 'L', 'LA', 'La')
_HIGH_DEPTH_MODES = ('I', 'F')


def read_image(path: str) -> np.ndarray:
  """An image file decoded with PIL: uint8 [h, w, 1] for greyscale, else uint8 [h, w, 3].

  Greyscale modes ('1', 'L', 'LA') become 'L', all other 8-bit modes (palette, RGBA, CMYK, ...)
  'RGB' (alpha dropped). Raises ValueError naming the file if PIL cannot decode it, or for 16-bit
  and float images.
  """
  try:
    with PIL.Image.open(path) as image:
      if image.mode.startswith(_HIGH_DEPTH_MODES):
        raise ValueError(f'PIL mode {image.mode!r}: only 8-bit images are read')
      array = np.asarray(image.convert('L' if image.mode in _GREY_MODES else 'RGB'))
  except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ... for a broken file.
    raise ValueError(f'Cannot read image file {path}: {e}') from e
  return array[..., None] if array.ndim == 2 else array


class FolderSource:
  """Random access to the image files under a directory (module docstring, "A folder").

  Attributes:
    directory: the directory.
    paths: the files, relative to `directory` in POSIX form, sorted; example i is `paths[i]`.
  """

  def __init__(self, directory: str, *, image_size: int, num_channels: int):
    self.directory = directory
    self.paths = sorted(_find_images(directory))
    self.image_size = image_size
    self.num_channels = num_channels

  def __len__(self) -> int:
    return len(self.paths)

  def __getitem__(self, indices: np.ndarray) -> np.ndarray:
    """indices: int [n] in [0, len(self)) -> uint8 [n, image_size, image_size, num_channels]."""
    return _fit_batch(
      lambda i: read_image(os.path.join(self.directory, self.paths[i])),
      indices,
      self.image_size,
      self.num_channels,
    )


def create_source(
  config: ml_collections.ConfigDict, split: str
) -> InMemorySource | TfdsSource | FolderSource:
  """Random access to `split` of `config.data.dataset`.

  For a TFDS dataset not prepared yet this downloads and prepares it, on process 0, unless
  `config.data.download` is False: call it on all processes at the same point.

  Returns:
    An object with `len(source)` and `source[indices]` -> uint8 [n, H, W, C] in 0..255 for int
    indices [n], H = W = config.data.image_size, C = config.data.num_channels. For 'digits' it
    is an `InMemorySource`, which also has `labels`.

  Raises:
    ValueError: for an invalid `config.data` (see `get_dataset_info`) or a split the dataset does
      not have.
    FileNotFoundError: for a TFDS dataset not prepared in ArrayRecord format (and not downloaded).
  """
  info = get_dataset_info(config)
  if info.splits and split not in info.splits:
    raise ValueError(
      f'{info.name!r} has no split {split!r}; its splits are: {", ".join(info.splits)}.'
    )
  data = config.data
  if info.name == 'digits':
    images, labels = _load_digits()
    indices = _digits_split_indices(split)
    return InMemorySource(images[indices], labels[indices])
  if info.name == FOLDER:
    return FolderSource(
      _folder_directory(data, split), image_size=data.image_size, num_channels=data.num_channels
    )
  return TfdsSource(
    info,
    split,
    data_dir=data.data_dir,
    image_size=data.image_size,
    num_channels=data.num_channels,
    download=data.download,
  )


def split_settings(config: ml_collections.ConfigDict, split: str) -> dict[str, Any]:
  """What fixes the images `create_source(config, split)` yields, JSON-serializable: the key of
  results computed from them (ddpm_jax/evaluation.py). A folder is named by its absolute path."""
  data = config.data
  settings = {
    'dataset': data.dataset,
    'split': split,
    'image_size': data.image_size,
    'num_channels': data.num_channels,
  }
  if data.dataset == FOLDER:
    settings['directory'] = os.path.abspath(_folder_directory(data, split))
  return settings


# --------------------------------------------------------------------------------------------
# Order: which examples each process reads at each step.
# --------------------------------------------------------------------------------------------


def local_batch_size(global_batch_size: int, process_count: int) -> int:
  """The per-process share B / P of a global batch; a ValueError unless P divides B."""
  if global_batch_size < 1 or global_batch_size % process_count:
    raise ValueError(
      f'The global batch size ({global_batch_size}) must be a positive multiple of the number '
      f'of processes ({process_count}): each process reads an equal share of every batch.'
    )
  return global_batch_size // process_count


@functools.lru_cache(maxsize=4)
def _epoch_permutation(seed: int, epoch: int, num_examples: int) -> np.ndarray:
  """Permutation `epoch` of the training split: int64 [num_examples], read-only."""
  permutation = np.random.default_rng([seed, epoch]).permutation(num_examples)
  permutation.flags.writeable = False
  return permutation


def train_indices(
  *,
  step: int,
  num_examples: int,
  global_batch_size: int,
  seed: int,
  process_index: int,
  process_count: int,
) -> np.ndarray:
  """The training examples process `process_index` reads at `step`.

  Global batch `step` is positions [step * B, (step + 1) * B) of the stream of per-epoch
  permutations (see the module docstring); this process reads positions
  [step * B + p * B / P, step * B + (p + 1) * B / P). A pure function of its arguments.

  Args:
    step: the training step, >= 0.
    num_examples: N, the size of the training split.
    global_batch_size: B, summed over all processes; P must divide it.
    seed: the data-order seed, >= 0.
    process_index: p in [0, P).
    process_count: P.

  Returns:
    int64 [B / P], indices into the split in [0, num_examples).
  """
  size = local_batch_size(global_batch_size, process_count)
  start = step * global_batch_size + process_index * size
  epochs, offsets = np.divmod(np.arange(start, start + size, dtype=np.int64), num_examples)
  indices = np.empty(size, np.int64)
  for epoch in np.unique(epochs):  # One epoch, or two where the batch straddles a boundary.
    in_epoch = epochs == epoch
    indices[in_epoch] = _epoch_permutation(seed, int(epoch), num_examples)[offsets[in_epoch]]
  return indices


# --------------------------------------------------------------------------------------------
# Batches, read on a background thread.
# --------------------------------------------------------------------------------------------


_END = object()


@dataclasses.dataclass(frozen=True)
class _Failure:
  error: Exception


class PrefetchIterator(Generic[T], Iterator[T]):
  """Runs an iterator on a background thread, keeping up to `buffer_size` items ready.

  Reading and decoding thus overlap the training step. An exception raised while reading is
  re-raised by `next()`. Use as a context manager, or call `close()`, to stop the thread.
  """

  def __init__(self, items: Iterator[T], buffer_size: int = 2):
    self._queue = queue.Queue(maxsize=buffer_size)
    self._stop = threading.Event()
    self._final: BaseException | None = None  # What every `next()` raises once set.
    self._thread = threading.Thread(
      target=self._produce, args=(items,), name='input_pipeline_prefetch', daemon=True
    )
    self._thread.start()

  def _produce(self, items: Iterator[T]) -> None:
    try:
      for item in items:
        self._queue.put(item)
        if self._stop.is_set():
          return
      self._queue.put(_END)
    except Exception as e:  # Handed to the consumer, which re-raises it.
      self._queue.put(_Failure(e))

  def __next__(self) -> T:
    if self._final is not None:
      raise self._final
    item = self._queue.get()
    if item is _END:
      self._final = StopIteration()
      raise self._final
    if isinstance(item, _Failure):
      self._final = item.error
      raise item.error
    return item

  def close(self) -> None:
    """Stops the reading thread and waits for it; `next()` then raises StopIteration."""
    self._stop.set()
    # Free the queue so that a blocked `put` returns; the producer then sees `_stop` and exits
    # after at most one more `put`, which fits in the emptied queue.
    while self._thread.is_alive():
      try:
        self._queue.get(timeout=0.01)
      except queue.Empty:
        pass
    if self._final is None:
      self._final = StopIteration()

  def __enter__(self) -> PrefetchIterator[T]:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()


def _process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  """(p, P), defaulting to this JAX process; tests pass them to simulate several processes."""
  if process_index is None:
    process_index = jax.process_index()
  if process_count is None:
    process_count = jax.process_count()
  return process_index, process_count


def train_batches(
  config: ml_collections.ConfigDict,
  *,
  global_batch_size: int,
  start_step: int,
  seed: int,
  process_index: int | None = None,
  process_count: int | None = None,
  buffer_size: int = 2,
) -> PrefetchIterator[tuple[int, np.ndarray]]:
  """Endless training batches of split `config.data.split`, from `start_step` on.

  Reads `buffer_size` steps ahead on a background thread.

  Args:
    config: the experiment config; reads `config.data`.
    global_batch_size: B, summed over all processes; P must divide it.
    start_step: the first step to yield (0, or the restored step when resuming).
    seed: the data-order seed; the batches are a function of (seed, step) only.
    process_index: p; None means `jax.process_index()`.
    process_count: P; None means `jax.process_count()`.
    buffer_size: how many steps are read ahead.

  Returns:
    A `PrefetchIterator` yielding `(step, images)` for step = start_step, start_step + 1, ...,
    images uint8 [B / P, H, W, C] in 0..255: this process's share of global batch `step`.
  """
  process_index, process_count = _process(process_index, process_count)
  local_batch_size(global_batch_size, process_count)  # Raise here, not on the reading thread.
  source = create_source(config, config.data.split)

  def batches() -> Iterator[tuple[int, np.ndarray]]:
    step = start_step
    while True:
      indices = train_indices(
        step=step,
        num_examples=len(source),
        global_batch_size=global_batch_size,
        seed=seed,
        process_index=process_index,
        process_count=process_count,
      )
      yield step, source[indices]
      step += 1

  return PrefetchIterator(batches(), buffer_size)


def eval_batches(
  config: ml_collections.ConfigDict,
  *,
  split: str,
  global_batch_size: int,
  num_examples: int | None = None,
  process_index: int | None = None,
  process_count: int | None = None,
  buffer_size: int = 2,
) -> PrefetchIterator[tuple[np.ndarray, np.ndarray]]:
  """The first `num_examples` examples of `split`, in order, in padded batches of one shape.

  Global batch k is examples [k * B, (k + 1) * B), of which process p reads its contiguous share
  of B / P rows; rows past `num_examples` (in the last batch) are zeros with mask False. Every
  process yields the same number of batches, ceil(num_examples / B).

  Args:
    config: the experiment config; reads `config.data`.
    split: e.g. `get_dataset_info(config).eval_split`.
    global_batch_size: B, summed over all processes; P must divide it.
    num_examples: how many examples to evaluate; None means the whole split.
    process_index: p; None means `jax.process_index()`.
    process_count: P; None means `jax.process_count()`.
    buffer_size: how many batches are read ahead.

  Returns:
    A `PrefetchIterator` yielding `(images, mask)`: images uint8 [B / P, H, W, C] in 0..255,
    mask bool [B / P], True for real examples.
  """
  process_index, process_count = _process(process_index, process_count)
  size = local_batch_size(global_batch_size, process_count)
  source = create_source(config, split)
  if num_examples is None:
    num_examples = len(source)
  if not 0 < num_examples <= len(source):
    raise ValueError(
      f'num_examples must be in [1, {len(source)}] for split {split!r}, got {num_examples}.'
    )
  shape = (size, config.data.image_size, config.data.image_size, config.data.num_channels)

  def batches() -> Iterator[tuple[np.ndarray, np.ndarray]]:
    for batch in range(-(-num_examples // global_batch_size)):
      start = batch * global_batch_size + process_index * size
      positions = np.arange(start, start + size)
      mask = positions < num_examples
      images = np.zeros(shape, np.uint8)
      images[mask] = source[positions[mask]]
      yield images, mask

  return PrefetchIterator(batches(), buffer_size)

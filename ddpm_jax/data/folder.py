"""A folder of images: the PNG and JPEG files under `config.data.image_dir`.

Split 'train' is the files under `config.data.image_dir`, split 'test' those under
`config.data.eval_image_dir` (if set; it is then the eval split). Both are local (or mounted)
directories, searched recursively for files named *.png, *.jpg or *.jpeg (any case), skipping
files and directories whose names start with '.'. Example i is the i-th file in the order of
their paths relative to the directory ('a.png' < 'a/b.png' < 'b.jpg', POSIX separators, compared
as strings), listed once when the source is opened; each is decoded with PIL when read (8-bit
greyscale, palette, RGB, RGBA, CMYK, ...: greyscale stays one channel, the rest become RGB), then
fitted to the configured size and channels (`images.fit_image`). A file PIL cannot decode raises
an error that names it, when it is read.

Class labels (read only when `config.model.num_classes` > 0; a folder has none otherwise): one
subdirectory of `image_dir` per class. The classes are the sorted names of its immediate
subdirectories that hold images (skipping names that start with '.'), and an example's label is
the index of its top-level subdirectory: 'cat/a.png' and 'cat/x/b.png' are of class 'cat'. An
image directly in `image_dir` is then an error, and `eval_image_dir` must have the same classes.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import ml_collections
import numpy as np
import PIL.Image

from ddpm_jax.data import core, images

NAME = 'folder'
IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg')

_GREY_MODES = ('1', 'L', 'LA', 'La')
_HIGH_DEPTH_MODES = ('I', 'F')


def _is_image(file: str) -> bool:
  """Whether a file name is one the folder reads: not hidden, with an image extension."""
  return not file.startswith('.') and os.path.splitext(file)[1].lower() in IMAGE_EXTENSIONS


def _find_images(directory: str) -> Iterator[str]:
  """The image files under `directory` (module docstring), as POSIX paths relative to it."""
  for root, dirs, files in os.walk(directory):
    dirs[:] = [d for d in dirs if not d.startswith('.')]
    for file in files:
      if _is_image(file):
        yield os.path.relpath(os.path.join(root, file), directory).replace(os.sep, '/')


def _find_classes(directory: str, field: str) -> tuple[str, ...]:
  """The classes of the images under `directory` (module docstring): the sorted names of its
  immediate subdirectories that hold images.

  Reads the top level of `directory` and looks for one image in each subdirectory. `field`
  names the config field of `directory` in the error.

  Raises:
    ValueError: naming the first image file (in sorted order) directly in `directory`.
  """
  root, dirs, files = next(os.walk(directory))
  top_level = sorted(file for file in files if _is_image(file))
  if top_level:
    raise ValueError(
      f'{os.path.join(root, top_level[0])} is directly in config.data.{field} = '
      f'{directory!r}: with config.model.num_classes > 0 the images of each class are in a '
      'subdirectory named after it (ddpm_jax/data/folder.py), so every image is in one.'
    )
  # As in `_find_images`: hidden directories, and links (os.walk does not follow them), hold none.
  paths = [os.path.join(root, d) for d in sorted(dirs) if not d.startswith('.')]
  return tuple(
    os.path.basename(path)
    for path in paths
    if not os.path.islink(path) and next(_find_images(path), None) is not None
  )


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
  """Random access to the image files under a directory (module docstring).

  Attributes:
    directory: the directory.
    paths: the files, relative to `directory` in POSIX form, sorted; example i is `paths[i]`.
    class_names: the classes (`_find_classes`), or None when the run reads no labels.
  """

  def __init__(
    self,
    directory: str,
    *,
    image_size: int,
    num_channels: int,
    class_names: tuple[str, ...] | None = None,
  ):
    self.directory = directory
    self.paths = sorted(_find_images(directory))
    self.image_size = image_size
    self.num_channels = num_channels
    self.class_names = class_names
    if class_names is not None:
      label_of = {name: label for label, name in enumerate(class_names)}
      self._labels = np.array([label_of[path.split('/')[0]] for path in self.paths], np.int64)

  def __len__(self) -> int:
    return len(self.paths)

  def __getitem__(self, indices: np.ndarray) -> np.ndarray:
    """indices: int [n] in [0, len(self)) -> uint8 [n, image_size, image_size, num_channels]."""
    return images.fit_batch(
      lambda i: read_image(os.path.join(self.directory, self.paths[i])),
      indices,
      self.image_size,
      self.num_channels,
    )

  def labels(self, indices: np.ndarray) -> np.ndarray:
    """indices: int [n] in [0, len(self)) -> int64 [n]: the index in `class_names` of each
    file's top-level subdirectory. Raises ValueError for a source opened without classes."""
    if self.class_names is None:
      raise ValueError(
        f'The folder {self.directory!r} was opened without classes (config.model.num_classes = 0).'
      )
    return self._labels[indices]


class Folder:
  """A folder as a `core.Dataset`: split 'train' is `image_dir`, 'test' `eval_image_dir`;
  `with_labels`: whether the run reads class labels (the subdirectories)."""

  def __init__(self, data: ml_collections.ConfigDict, *, with_labels: bool):
    self.data = data
    self.with_labels = with_labels

  def _field(self, split: str) -> str:
    """The field of `config.data` that names the directory of `split`."""
    return 'image_dir' if split == 'train' else 'eval_image_dir'

  def info(self) -> core.DatasetInfo:
    """Raises unless `image_dir` (and `eval_image_dir`, if set) are directories with images,
    and, with labels, have classes (`_find_classes`), the same in both."""
    data = self.data
    if data.image_dir is None:
      raise ValueError(
        f'config.data.dataset = {NAME!r} reads the images under config.data.image_dir, which is '
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
    splits = ('train',) if data.eval_image_dir is None else ('train', 'test')
    if not self.with_labels:
      return core.DatasetInfo(NAME, None, None, splits)
    classes = _find_classes(data.image_dir, 'image_dir')
    if data.eval_image_dir is not None:
      eval_classes = _find_classes(data.eval_image_dir, 'eval_image_dir')
      if eval_classes != classes:
        only_train = sorted(set(classes) - set(eval_classes))
        only_eval = sorted(set(eval_classes) - set(classes))
        raise ValueError(
          f'config.data.eval_image_dir = {data.eval_image_dir!r} must have the classes of '
          f'config.data.image_dir = {data.image_dir!r} (its subdirectories with images), but '
          f'only image_dir has: {", ".join(only_train) or "none"}; only eval_image_dir has: '
          f'{", ".join(only_eval) or "none"}.'
        )
    return core.DatasetInfo(NAME, None, None, splits, class_names=classes)

  def open(self, info: core.DatasetInfo, split: str) -> FolderSource:
    return FolderSource(
      self.data[self._field(split)],
      image_size=self.data.image_size,
      num_channels=self.data.num_channels,
      class_names=info.class_names,
    )

  def content_key(self, split: str) -> dict[str, Any]:
    """The folder, by its absolute path, and with labels its classes (`_find_classes`)."""
    field = self._field(split)
    key = {'directory': os.path.abspath(self.data[field])}
    if self.with_labels:
      key['class_names'] = list(_find_classes(self.data[field], field))
    return key

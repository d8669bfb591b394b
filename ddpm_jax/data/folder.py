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


def _find_images(directory: str) -> Iterator[str]:
  """The image files under `directory` (module docstring), as POSIX paths relative to it."""
  for root, dirs, files in os.walk(directory):
    dirs[:] = [d for d in dirs if not d.startswith('.')]
    for file in files:
      if not file.startswith('.') and os.path.splitext(file)[1].lower() in IMAGE_EXTENSIONS:
        yield os.path.relpath(os.path.join(root, file), directory).replace(os.sep, '/')


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
    return images.fit_batch(
      lambda i: read_image(os.path.join(self.directory, self.paths[i])),
      indices,
      self.image_size,
      self.num_channels,
    )


class Folder:
  """A folder as a `core.Dataset`: split 'train' is `image_dir`, 'test' `eval_image_dir`."""

  def __init__(self, data: ml_collections.ConfigDict):
    self.data = data

  def _directory(self, split: str) -> str:
    return self.data.image_dir if split == 'train' else self.data.eval_image_dir

  def info(self) -> core.DatasetInfo:
    """Raises unless `image_dir` (and `eval_image_dir`, if set) are directories with images."""
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
    return core.DatasetInfo(NAME, None, None, splits)

  def open(self, info: core.DatasetInfo, split: str) -> FolderSource:
    return FolderSource(
      self._directory(split),
      image_size=self.data.image_size,
      num_channels=self.data.num_channels,
    )

  def content_key(self, split: str) -> dict[str, Any]:
    """The folder, by its absolute path."""
    return {'directory': os.path.abspath(self._directory(split))}

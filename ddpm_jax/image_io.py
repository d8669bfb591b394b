"""Images and arrays in and out: the [-1, 1] <-> uint8 conversions, grids, PNG and npz files.

Paths may be local or on any file system etils supports (gs://...). Writers are called on one
process only (the callers check `jax.process_index() == 0`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image
from etils import epath


def to_model_range(images):
  """uint8 images in 0..255 -> float32 in [-1, 1] (x / 127.5 - 1, as the original); jittable."""
  return images.astype(jnp.float32) / 127.5 - 1.0


def to_uint8(x: jax.Array | np.ndarray) -> np.ndarray:
  """Images in [-1, 1] -> uint8 in 0..255 (clipped, then (x + 1) * 127.5 rounded)."""
  x = np.clip(np.asarray(x, np.float32), -1.0, 1.0)
  return np.round((x + 1.0) * 127.5).astype(np.uint8)


def image_grid(images: np.ndarray, num_cols: int | None = None, padding: int = 1) -> np.ndarray:
  """Tiles uint8 images [N, H, W, C] into one uint8 image, rows of `num_cols` (default
  ceil(sqrt(N))), with `padding` pixels of black between them."""
  n, h, w, c = images.shape
  num_cols = num_cols or math.ceil(math.sqrt(n))
  num_rows = math.ceil(n / num_cols)
  grid = np.zeros(
    (num_rows * (h + padding) + padding, num_cols * (w + padding) + padding, c), np.uint8
  )
  for i, image in enumerate(images):
    row, col = divmod(i, num_cols)
    top, left = padding + row * (h + padding), padding + col * (w + padding)
    grid[top : top + h, left : left + w] = image
  return grid


def class_grid(images: np.ndarray, labels: np.ndarray, classes: tuple[int, ...]) -> np.ndarray:
  """`image_grid` with one row per class of `classes` (in that order): the images of label c,
  in their order, on row c's, black where a class has fewer than the most; a square
  `image_grid` for a single class."""
  if len(set(classes)) == 1:
    return image_grid(images)
  rows = [images[labels == c] for c in dict.fromkeys(classes)]
  num_cols = max(len(row) for row in rows)
  padded = [
    np.concatenate([row, np.zeros((num_cols - len(row), *images.shape[1:]), np.uint8)])
    for row in rows
  ]
  return image_grid(np.concatenate(padded), num_cols)


def upscale_factor(image_size: int) -> int:
  """How much to enlarge small images (8x8 digits) in PNG grids so that they can be seen."""
  return max(1, 64 // image_size)


def save_png(path: epath.PathLike, image: np.ndarray, upscale: int = 1) -> None:
  """Writes a uint8 image [H, W, C] (C = 1 or 3) as PNG, each pixel repeated `upscale` times."""
  image = np.repeat(np.repeat(image, upscale, axis=0), upscale, axis=1)
  pil_image = PIL.Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  with path.open('wb') as f:
    pil_image.save(f, format='PNG')


def save_grid(path: epath.PathLike, images: np.ndarray, num_cols: int | None = None) -> None:
  """Writes uint8 images [N, H, W, C] as one PNG grid (`image_grid`), small images enlarged."""
  save_png(path, image_grid(images, num_cols), upscale=upscale_factor(images.shape[1]))


def save_figure(path: epath.PathLike, figure: np.ndarray) -> None:
  """Writes a figure, float32 [rows, cols, H, W, C] in [-1, 1], as a PNG grid of rows x cols."""
  rows, cols = figure.shape[:2]
  save_grid(path, to_uint8(figure.reshape(rows * cols, *figure.shape[2:])), num_cols=cols)


def save_npz(path: epath.PathLike, **arrays: np.ndarray) -> None:
  """Writes arrays by name as an uncompressed .npz (local or gs:// paths), atomically: a reader,
  or a run resumed after an interruption, never sees half a file."""
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.parent / f'{path.name}.tmp'
  with tmp.open('wb') as f:
    np.savez(f, **arrays)
  tmp.replace(path)


def load_npz(path: epath.PathLike) -> dict[str, np.ndarray]:
  """All arrays of an .npz (local or gs:// paths), read into memory."""
  with epath.Path(path).open('rb') as f, np.load(f) as npz:
    return {name: npz[name] for name in npz.files}

"""Images made the configured depth and size: what TFDS and folder examples go through.

An image is made `config.data.num_channels` deep, then `config.data.image_size` square
(`fit_image`): greyscale becomes RGB by repeating the channel, RGB becomes greyscale by the
ITU-R 601-2 luma L = 0.299 R + 0.587 G + 0.114 B as PIL's `convert('L')` computes it (`to_luma`),
an alpha channel is dropped; then the central square is cropped and resized with PIL's
antialiasing Lanczos filter (`center_crop_and_resize`). Images already of that size and depth
are read unchanged. The paper's digits are held as stored and need none of this.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import PIL.Image


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


def fit_batch(
  read: Callable[[int], np.ndarray], indices: np.ndarray, size: int, num_channels: int
) -> np.ndarray:
  """uint8 [n, size, size, num_channels]: the examples `read(index)` of `indices`, decoded one
  by one and each put through `fit_image`."""
  images = np.empty((len(indices), size, size, num_channels), np.uint8)
  for row, index in enumerate(indices):
    images[row] = fit_image(read(int(index)), size=size, num_channels=num_channels)
  return images

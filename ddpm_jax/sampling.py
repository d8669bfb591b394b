"""Drawing samples from a trained model, and writing them as arrays and image grids."""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import numpy as np
import PIL.Image
from etils import epath
from flax import linen as nn

from ddpm_jax import diffusion as diffusion_lib


def make_model_fn(model: nn.Module, params) -> diffusion_lib.ModelFn:
  """The network as `model_fn(x, t)` for the diffusion functions, in inference mode."""
  return lambda x, t: model.apply({'params': params}, x, t, train=False)


def create_sample_fn(
  diffusion: diffusion_lib.GaussianDiffusion,
  model: nn.Module,
  *,
  shape: tuple[int, ...],
  sharding: jax.sharding.Sharding,
) -> Callable[[object, jax.Array], jax.Array]:
  """A compiled `sample(params, rng) -> images` with the paper's ancestral sampler (all T steps).

  The batch `shape` [N, H, W, C] is sharded with `sharding` (N over all devices); the images
  are float32 in [-1, 1] and do not depend on the device count.
  """

  def sample(params, rng):
    model_fn = make_model_fn(model, params)

    def sharded_model_fn(x, t):
      return model_fn(jax.lax.with_sharding_constraint(x, sharding), t)

    return diffusion.p_sample_loop(sharded_model_fn, shape, rng)

  return jax.jit(sample, out_shardings=sharding)


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


def save_png(path: epath.PathLike, image: np.ndarray, upscale: int = 1) -> None:
  """Writes a uint8 image [H, W, C] (C = 1 or 3) as PNG, each pixel repeated `upscale` times."""
  image = np.repeat(np.repeat(image, upscale, axis=0), upscale, axis=1)
  pil_image = PIL.Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  with path.open('wb') as f:
    pil_image.save(f, format='PNG')


def upscale_factor(image_size: int) -> int:
  """How much to enlarge small images (8x8 digits) in PNG grids so that they can be seen."""
  return max(1, 64 // image_size)

"""Editing images with a trained DDPM, without training: inpainting (RePaint) and SDEdit.

Levels. A sampler of K steps (`ddpm_jax/samplers.py`) walks down a chain of levels: level k + 1
is x diffused to timestep ts[k], ts = `Sampler.timesteps(T)` (k < K), level 0 the data; step
K-1-k calls the network at ts[k] and takes x from level k + 1 to level k. Both editors run on it.

RePaint (Lugmayr et al. 2022, "RePaint: Inpainting using Denoising Diffusion Probabilistic
Models"), `RePaint`: given x_0 and a mask (True / 1 = keep), every step down to level k writes in
the known region the original diffused to that level, q_sample(x_0, ts[k-1], noise) (eq. 4; x_0
itself at level 0), and in the unknown region the sampler's step; the start, x_T, has
q_sample(x_0, ts[K-1], x_T) there. Resampling: after reaching level j*n (0 <= j*n < K - n,
n = `jump_length`), the chain jumps back up n levels, x_{k+1} ~ q(x_{k+1} | x_k) =
N(sqrt(1 - beta'_k) x_k, beta'_k I) with beta'_k = 1 - abar_{ts[k]} / abar_{ts[k-1]}
(`diffusion.subsequence_betas`), and walks down again, `jump_n_sample` - 1 times at each such
level (the paper's r; the paper's and diffusers' defaults are n = r = 10, on K = 250 steps): the
two regions are harmonized by the noise of the steps taken again. `RePaint.levels` is the walk,
the same as the paper's code and diffusers' `RePaintScheduler`. With a mask of all ones the result
is x_0; with all zeros and no jumps (jump_n_sample = 1) it is the sampler's sample.
  Which samplers: those whose step reads only x and its timesteps, so that the walk can enter the
  chain at any level again: `ancestral` (all T levels), `respaced` (the paper's setting: the
  ancestral sampler on 250 of the 1,000 timesteps of the guided-diffusion models) and `ddim`
  (any eta; diffusers' `RePaintScheduler` is DDIM with eta, 0 by default, with these jumps). Not
  `dpm_solver++` (`samplers.DPMSolver.inpaints`): its multistep update extrapolates from the x_0
  predicted one level before, which after a jump is that of another trajectory, and as an ODE
  solver it adds none of the noise through which resampling harmonizes the regions.
  Random keys: move i (a step down or a jump up) draws its noise, of the known region or of the
  jump, from normal(fold_in(loop_rng, T + i)); the sampler's step down from a level reached for
  the first time gets loop_rng itself (so that it draws fold_in(loop_rng, t) as in sampling),
  from a level walked down again fold_in(fold_in(loop_rng, T + i), 1).

SDEdit (Meng et al. 2022, "SDEdit: Guided Image Synthesis and Editing with Stochastic
Differential Equations"), `sdedit_level` and `sdedit_start`: the input is diffused to level
k0 = ceil(strength K), x = q_sample(x_0, ts[k0-1], x_T) (eq. 4), and the sampler's last k0 steps
denoise it. Strength 1 starts from x_T itself, as sampling does (q(x_T | x_0) is N(0, I) up to
abar_{T-1}: 4e-5 for the paper's schedule), so it is sampling; any sampler applies (a multistep
one takes its first step first order: `Sampler.step_fn`'s first_step).

Masks (`make_masks`): the named shapes of `MASKS` (the region named is the one inpainted) or a
mask image. Inputs (`load_images`): the dataset's test split, an npz or a folder. `check_config`
checks every `config.sampling` field of the editing kinds, naming it, before anything compiles.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ddpm_jax import data, image_io, samplers, validation
from ddpm_jax import diffusion as diffusion_lib
from ddpm_jax.data import folder
from ddpm_jax.data import images as images_lib

# The named masks of `config.sampling.inpaint_mask`: the region named is inpainted.
MASKS = ('center', 'left_half', 'bottom_half', 'random_boxes')
RANDOM_BOXES = 3  # 'random_boxes': this many boxes an image, sides in [size / 4, size / 2].

# ----------------------------------------------------------------------------------------------
# RePaint.
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RePaint:
  """RePaint's resampling (module docstring): `jump_length` n, `jump_n_sample` r (1: none)."""

  jump_length: int = 10
  jump_n_sample: int = 10

  @classmethod
  def from_config(cls, sampling: ml_collections.ConfigDict) -> RePaint:
    return cls(int(sampling.jump_length), int(sampling.jump_n_sample))

  @property
  def tag(self) -> str:
    """For file names: 'jump10x10' (n = 10, r = 10)."""
    return f'jump{self.jump_length}x{self.jump_n_sample}'

  def levels(self, num_steps: int) -> np.ndarray:
    """int [M + 1]: the levels of the walk on K = num_steps steps, from K to 0; move i goes from
    levels[i] to levels[i + 1], one level down (a step of the sampler) or up (a jump). For K > n
    there are K + (r - 1) n ceil((K - n) / n) steps down and (r - 1) n ceil((K - n) / n) up:
    (r - 1) n from each level j n, 0 <= j n < K - n."""
    jump_levels = range(0, num_steps - self.jump_length, self.jump_length)
    jumps_left = {level: self.jump_n_sample - 1 for level in jump_levels}
    level, levels = num_steps, [num_steps]
    while level > 0:
      level -= 1
      levels.append(level)
      if jumps_left.get(level, 0) > 0:
        jumps_left[level] -= 1
        levels.extend(range(level + 1, level + self.jump_length + 1))
        level += self.jump_length
    return np.asarray(levels)

  def num_moves(self, num_steps: int) -> int:
    """M: the moves of the walk (steps down, each one network evaluation, and jumps up)."""
    return len(self.levels(num_steps)) - 1

  def step_fn(
    self,
    diffusion: diffusion_lib.GaussianDiffusion,
    sampler: samplers.Sampler,
    step: diffusion_lib.StepFn,
    x_start: jax.Array,
    mask: jax.Array,
  ) -> diffusion_lib.StepFn:
    """The `StepFn` of the walk's M moves, of the sampler's `step` (a `StepFn` of `sampler` on
    `diffusion`), inpainting x_start, float32 [B, H, W, C] in [-1, 1], where mask, bool
    [B, H, W, 1], is False. Move i is a step down or a jump up (module docstring)."""
    num_timesteps = diffusion.num_timesteps
    timesteps = sampler.timesteps(num_timesteps)
    num_steps = len(timesteps)
    levels = self.levels(num_steps)
    down = levels[1:] < levels[:-1]
    # How many times each move's level was walked down from before it.
    walked, visits = collections.Counter(), np.zeros(len(down), np.int32)
    for i in np.flatnonzero(down):
      visits[i] = walked[levels[i]]
      walked[levels[i]] += 1
    levels, down, visits = jnp.asarray(levels), jnp.asarray(down), jnp.asarray(visits)
    ts = jnp.asarray(timesteps)
    jump_betas = jnp.asarray(
      diffusion_lib.subsequence_betas(diffusion.betas, timesteps), jnp.float32
    )

    def move(i, x, prev_pred_xstart, loop_rng):
      level, target = levels[i], levels[i + 1]
      move_rng = jax.random.fold_in(loop_rng, num_timesteps + i)
      noise = jax.random.normal(move_rng, x.shape, x.dtype)

      def step_down(_):
        rng = jax.lax.cond(
          visits[i] == 0, lambda: loop_rng, lambda: jax.random.fold_in(move_rng, 1)
        )
        out = step(num_steps - level, x, prev_pred_xstart, rng)
        t = jnp.full(x.shape[:1], ts[jnp.maximum(target - 1, 0)], jnp.int32)
        known = jnp.where(target == 0, x_start, diffusion.q_sample(x_start, t, noise))
        return jnp.where(mask, known, out['sample']), out['pred_xstart']

      def jump_up(_):
        beta = jump_betas[level]
        return jnp.sqrt(1.0 - beta) * x + jnp.sqrt(beta) * noise, prev_pred_xstart

      sample, pred_xstart = jax.lax.cond(down[i], step_down, jump_up, None)
      return {'sample': sample, 'pred_xstart': pred_xstart}

    return move


def inpaint_start(
  diffusion: diffusion_lib.GaussianDiffusion,
  x_T: jax.Array,
  x_start: jax.Array,
  mask: jax.Array,
  *,
  timestep: int,
) -> jax.Array:
  """RePaint's start: x_T [B, H, W, C] with q_sample(x_start, timestep, x_T) (the top level's
  timestep) where mask [B, H, W, 1] is True."""
  t = jnp.full(x_T.shape[:1], timestep, jnp.int32)
  return jnp.where(mask, diffusion.q_sample(x_start, t, x_T), x_T)


# ----------------------------------------------------------------------------------------------
# SDEdit.
# ----------------------------------------------------------------------------------------------


def sdedit_level(strength: float, num_steps: int) -> int:
  """k0 = ceil(strength K), in [1, K] for strength in (0, 1]: SDEdit runs the last k0 steps."""
  return min(num_steps, max(1, math.ceil(strength * num_steps - 1e-9)))


def sdedit_start(
  diffusion: diffusion_lib.GaussianDiffusion,
  x_T: jax.Array,
  x_start: jax.Array,
  *,
  timestep: int,
  from_noise: bool,
) -> jax.Array:
  """SDEdit's start: x_start [B, H, W, C] diffused to `timestep` with the noise x_T,
  q_sample(x_start, timestep, x_T) (eq. 4); x_T itself `from_noise` (strength 1)."""
  if from_noise:
    return x_T
  return diffusion.q_sample(x_start, jnp.full(x_T.shape[:1], timestep, jnp.int32), x_T)


# ----------------------------------------------------------------------------------------------
# Masks and input images.
# ----------------------------------------------------------------------------------------------


def named_mask(name: str, image_size: int, rng: np.random.Generator) -> np.ndarray:
  """bool [H, W, 1], H = W = image_size, False on the region `name` (of `MASKS`) inpaints."""
  size, half, quarter = image_size, image_size // 2, image_size // 4
  keep = np.ones((size, size, 1), bool)
  if name == 'center':
    keep[quarter : size - quarter, quarter : size - quarter] = False
  elif name == 'left_half':
    keep[:, :half] = False
  elif name == 'bottom_half':
    keep[half:] = False
  elif name == 'random_boxes':
    for _ in range(RANDOM_BOXES):
      height, width = rng.integers(max(quarter, 1), max(half, 1) + 1, size=2)
      top, left = rng.integers(0, size - height + 1), rng.integers(0, size - width + 1)
      keep[top : top + height, left : left + width] = False
  else:
    raise ValueError(f'Unknown mask {name!r}; expected one of {", ".join(MASKS)}.')
  return keep


def make_masks(config: ml_collections.ConfigDict, num_images: int) -> np.ndarray:
  """bool [N, H, W, 1] of `config.sampling.inpaint_mask` (True: keep): a name of `MASKS` (the
  random boxes drawn from default_rng(config.seed), a different set for each image), or the path
  of a mask image of the model's size, the same for every image: white (luma >= 128) is kept,
  black inpainted. Raises ValueError, naming the field, for a mask image of another size."""
  mask, size = config.sampling.inpaint_mask, config.data.image_size
  if mask in MASKS:
    rng = np.random.default_rng(config.seed)
    return np.stack([named_mask(mask, size, rng) for _ in range(num_images)])
  image = images_lib.convert_channels(folder.read_image(mask), 1)
  validation.require(
    image.shape[:2] == (size, size),
    f'config.sampling.inpaint_mask = {mask!r} is a {image.shape[0]}x{image.shape[1]} image; the '
    f'model inpaints {size}x{size} images (config.data.image_size).',
  )
  return np.broadcast_to(image >= 128, (num_images, size, size, 1))


def mask_tag(mask: str) -> str:
  """For file names: the mask's name, or 'mask_<file stem>' for a mask image."""
  return mask if mask in MASKS else f'mask_{os.path.splitext(os.path.basename(mask))[0]}'


def load_images(config: ml_collections.ConfigDict) -> np.ndarray:
  """The first `config.sampling.edit_num_images` images of `config.sampling.edit_images`,
  uint8 [N, H, W, C] in 0..255: None, the dataset's eval split ('train' where it has none); a
  path ending in '.npz', its array 'images' (or its only array), uint8 [n, H, W, C]; else a
  folder of images (`ddpm_jax/data/folder.py`: PNG and JPEG, in the order of their paths).
  Images must be the model's size and channels (greyscale and RGB are converted, nothing is
  resized). Raises ValueError, naming the field, for fewer images or another size."""
  sampling, data_config = config.sampling, config.data
  source, num = sampling.edit_images, sampling.edit_num_images
  field = f'config.sampling.edit_images = {source!r}'
  shape = (data_config.image_size, data_config.image_size, data_config.num_channels)
  if source is None:
    split = data.get_dataset_info(config).eval_split or 'train'
    dataset = data.create_source(config, split)
    available = len(dataset)
    field = f'The {split!r} split of {data_config.dataset!r} (config.sampling.edit_images = None)'
    images = dataset[np.arange(min(num, available))]
  elif source.endswith('.npz'):
    arrays = image_io.load_npz(source)
    images = arrays.get('images', next(iter(arrays.values())) if len(arrays) == 1 else None)
    validation.require(
      images is not None, f'{field} holds {sorted(arrays)}: no array named images.'
    )
    validation.require(
      images.dtype == np.uint8 and images.ndim == 4 and images.shape[1:] == shape,
      f'{field} holds {images.dtype} {list(images.shape)}: expected uint8 [N, '
      f'{", ".join(map(str, shape))}] (config.data.image_size, num_channels).',
    )
    available, images = len(images), images[:num]
  else:
    paths = folder.FolderSource(source, image_size=shape[0], num_channels=shape[2]).paths
    available = len(paths)
    images = np.zeros((min(num, available), *shape), np.uint8)
    for row, path in enumerate(paths[:num]):
      image = images_lib.convert_channels(folder.read_image(os.path.join(source, path)), shape[2])
      validation.require(
        image.shape == shape,
        f'{field}: {path} is {image.shape[0]}x{image.shape[1]}; the model edits '
        f'{shape[0]}x{shape[1]} images (config.data.image_size).',
      )
      images[row] = image
  validation.require(
    available >= num,
    f'{field} has {available} images; config.sampling.edit_num_images asks for {num}.',
  )
  return images


# ----------------------------------------------------------------------------------------------
# Checks before anything compiles.
# ----------------------------------------------------------------------------------------------


def _positive_int(sampling: ml_collections.ConfigDict, field: str) -> None:
  value = sampling[field]
  validation.require(
    validation.is_int(value) and value >= 1,
    f'config.sampling.{field} must be a positive integer, got {value!r}.',
  )


def check_config(
  config: ml_collections.ConfigDict, diffusion: diffusion_lib.GaussianDiffusion
) -> None:
  """Raises ValueError, naming the field, for `config.sampling` settings of the kinds 'inpaint'
  and 'sdedit' (those asked for) that cannot edit; the images and mask files are read and
  checked by `load_images` and `make_masks`."""
  del diffusion
  sampling = config.sampling
  kinds = samplers.parse_kinds(sampling.kinds)
  if 'inpaint' not in kinds and 'sdedit' not in kinds:
    return
  _positive_int(sampling, 'edit_num_images')
  source = sampling.edit_images
  validation.require(
    source is None or os.path.isdir(source) or (source.endswith('.npz') and os.path.isfile(source)),
    f'config.sampling.edit_images = {source!r} is neither an .npz file nor a folder of images '
    "(None: the dataset's test split).",
  )
  if 'inpaint' in kinds:
    sampler = samplers.SAMPLERS[sampling.sampler]
    validation.require(
      sampler.inpaints,
      f'config.sampling.sampler = {sampler.name!r} cannot inpaint (RePaint needs a step that can '
      'be taken again after a jump: ddpm_jax/editing.py); use ancestral, respaced or ddim, e.g. '
      '--config.sampling.sampler=respaced --config.sampling.steps=250.',
    )
    _positive_int(sampling, 'jump_length')
    _positive_int(sampling, 'jump_n_sample')
    mask = sampling.inpaint_mask
    validation.require(
      isinstance(mask, str) and (mask in MASKS or os.path.isfile(mask)),
      f'config.sampling.inpaint_mask = {mask!r} is neither one of {", ".join(MASKS)} nor a mask '
      'image file.',
    )
  if 'sdedit' in kinds:
    strength = sampling.sdedit_strength
    validation.require(
      isinstance(strength, int | float) and not isinstance(strength, bool) and 0 < strength <= 1,
      f'config.sampling.sdedit_strength must be in (0, 1] (1: sampling from noise), got '
      f'{strength!r}.',
    )

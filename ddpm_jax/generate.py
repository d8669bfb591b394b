"""The --mode=sample job: `sample(config, workdir)`, which `main.py --mode=sample` runs.

`sample` restores the EMA parameters of a checkpoint in `<workdir>/checkpoints` (written by
training, or by the importer of the official weights, `python -m ddpm_jax.pretrained`) and writes
to `<workdir>/samples/` each of the comma-separated `config.sampling.kinds`:

  samples          `num_samples` images from the sampler `config.sampling.sampler` (and its
                   settings: `ddpm_jax/samplers.py`), as
                   `samples_<sampler tag>_step_<step>_seed_<seed>.npz` holding `samples`, uint8
                   [N, H, W, C] in 0..255, and a PNG grid of the first 256 beside it. For a
                   class-conditional model (`ddpm_jax/conditioning.py`), of the classes of
                   `class_labels` in turn with `guidance_scale`: the tag names them, the npz
                   also holds `labels` (int32 [N]) and `class_names` (those training wrote in
                   `<workdir>/classes.json`, else the dataset's), and the grid has a row per
                   class.
  progressive      paper Fig. 6: for `progressive_images` samples, the predicted x_0 at
                   t = T-1, T-1-every, ... and the final sample; a row per image.
  denoising_chain  paper Fig. 7: one ancestral trajectory stops at each t of `chain_t`, and
                   `chain_samples` samples of p(x_0 | x_t) are drawn from that shared x_t; a row
                   per t: x_t, then the samples.
  interpolation    paper Fig. 8: test images x_0, x_0' (consecutive pairs of
                   `interpolation_images`) are diffused to x_t, x_t' ~ q(x_t | x_0) with one
                   noise draw, and (1 - lambda) x_t + lambda x_t' for `interpolation_steps`
                   lambdas in [0, 1] are denoised from t by the reverse process; a row per pair:
                   x_0, the decoded images, x_0'.
  inpaint          RePaint (`ddpm_jax/editing.py`): the `edit_num_images` images of
                   `edit_images` with the region of `inpaint_mask` filled in by the sampler,
                   with `jump_length` and `jump_n_sample`, as
                   `inpaint_<sampler tag>_<mask>_jump<n>x<r>_<suffix>.npz` (`originals`,
                   `masks`, `results`) and a PNG grid, a row per image: original, masked (grey
                   where inpainted), result.
  sdedit           SDEdit: the same images diffused by `sdedit_strength` and denoised by the
                   sampler, as `sdedit_<sampler tag>_strength<s>_<suffix>.npz` (`originals`,
                   `results`, `timestep`: t0) and a PNG grid: original, diffused, result.
The figures use the ancestral sampler and are PNG grids; for a class-conditional model the rows
of the progressive figure and the samples of the denoising chain take the classes in turn, and
the interpolation is decoded by the unconditional model (the null class, unguided), as the edits
are unless `class_labels` names classes (then image i is edited as of the i-th in turn, guided).
Every path written is printed.

The samples and figures are drawn by the compiled loops of `ddpm_jax/sample_loop.py` (its
docstring says how they are sharded and why they do not depend on chunking, devices or
processes). Random keys are functions of `config.seed`: batch b of 'samples' starts from
fold_in(key(seed), b) (`sample_loop.seed_batch_rng`), and a figure from
fold_in(key(seed), FIGURE_KEYS[kind]), split as its function says; batch b of an edit starts
from fold_in(fold_in(key(seed), FIGURE_KEYS[kind]), b) (`edit`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm
from absl import logging
from etils import epath
from flax import linen as nn

from ddpm_jax import (
  checkpoints,
  checks,
  conditioning,
  data,
  editing,
  image_io,
  models,
  progress,
  sample_loop,
  samplers,
  validation,
)
from ddpm_jax import diffusion as diffusion_lib
from ddpm_jax import mesh as mesh_lib

# Key of a figure: fold_in(key(seed), FIGURE_KEYS[kind]), far above any batch index of 'samples'.
FIGURE_KEYS = {
  'progressive': 2**30,
  'denoising_chain': 2**30 + 1,
  'interpolation': 2**30 + 2,
  'inpaint': 2**30 + 3,
  'sdedit': 2**30 + 4,
}
MAX_GRID_IMAGES = 256  # The PNG grid of 'samples' shows at most this many.


def figure_rng(seed: int, kind: str) -> jax.Array:
  return jax.random.fold_in(jax.random.key(seed), FIGURE_KEYS[kind])


# ----------------------------------------------------------------------------------------------
# The kinds of sampling: arrays of images in [-1, 1].
# ----------------------------------------------------------------------------------------------


def progressive(
  loop: sample_loop.ChunkedLoop,
  init: Callable,
  rng: jax.Array,
  *,
  num_images: int,
  every: int,
  image_shape: tuple[int, int, int],
  num_timesteps: int,
  classes: conditioning.Conditioning | None = None,
) -> np.ndarray:
  """Paper Fig. 6: float32 [num_images, K + 1, H, W, C] in [-1, 1].

  Column k < K is the predicted x_0 at t = T-1-k*every (K = ceil(T / every)), the last column the
  final sample; `init(shape, rng)` starts the ancestral loop, as `p_sample_loop_progressive`.
  Row i of a class-conditional model is of class `classes.labels(i, 1)`.
  """
  x, loop_rng = init((mesh_lib.round_up(num_images, jax.device_count()), *image_shape), rng)
  # The pred_xstart of step k * every is that of the range ending after it.
  boundaries = list(range(1, num_timesteps + 1, every))
  labels = _labels(x, classes)
  x, kept = loop.run(x, loop_rng, 0, num_timesteps, keep=boundaries, labels=labels)
  columns = [mesh_lib.gather(kept[s][1]) for s in boundaries] + [mesh_lib.gather(x)]
  return np.stack(columns, axis=1)[:num_images]


def denoising_chain(
  loop: sample_loop.ChunkedLoop,
  init: Callable,
  broadcast_first: Callable[[jax.Array], jax.Array],
  rng: jax.Array,
  *,
  ts: tuple[int, ...],
  num_samples: int,
  image_shape: tuple[int, int, int],
  num_timesteps: int,
  classes: conditioning.Conditioning | None = None,
) -> np.ndarray:
  """Paper Fig. 7: float32 [len(ts), 1 + num_samples, H, W, C], x_t then samples of p(x_0 | x_t).

  The shared x_t come from one ancestral trajectory (row 0 of a batch started with
  `init(shape, reference_rng)`), stopped at each t (0-based, as the rows, in decreasing order);
  the samples of row t continue the loop from x_t with loop key `fold_in(branch_rng, t)`, where
  (reference_rng, branch_rng) = split(rng). For a class-conditional model, sample i (and row i
  of the trajectory's batch) is of class `classes.labels(i, 1)`.
  """
  reference_rng, branch_rng = jax.random.split(rng)
  shape = (mesh_lib.round_up(num_samples, jax.device_count()), *image_shape)
  x, loop_rng = init(shape, reference_rng)
  labels = _labels(x, classes)
  starts = [num_timesteps - 1 - t for t in ts]  # x_t is the state after T-1-t steps.
  _, kept = loop.run(x, loop_rng, 0, max(starts), keep=starts, labels=labels)
  rows = []
  for t, start in zip(ts, starts, strict=True):
    x_t = broadcast_first(kept[start][0])
    samples, _ = loop.run(
      x_t, jax.random.fold_in(branch_rng, t), start, num_timesteps, labels=labels
    )
    rows.append(np.concatenate([mesh_lib.gather(x_t)[:1], mesh_lib.gather(samples)[:num_samples]]))
  return np.stack(rows)


def interpolation_latents(
  diffusion: diffusion_lib.GaussianDiffusion,
  images: jax.Array,
  rng: jax.Array,
  *,
  t: int,
  num_steps: int,
  num_rows: int,
) -> jax.Array:
  """The interpolated latents of paper Fig. 8, float32 [num_rows, H, W, C] (zero-padded rows).

  images: uint8 [2P, H, W, C] in 0..255, the pairs (x_0, x_0') in consecutive rows. Each is
  diffused to x_t ~ q(x_t | x_0) (eq. 4) with noise normal(rng, [2P, H, W, C]); row
  p * num_steps + j is (1 - lambda_j) x_t + lambda_j x_t' for lambda_j = j / (num_steps - 1).
  """
  x_start = image_io.to_model_range(images)
  noise = jax.random.normal(rng, x_start.shape, jnp.float32)
  x_t = diffusion.q_sample(x_start, jnp.full((x_start.shape[0],), t, jnp.int32), noise)
  x_t = x_t.reshape(-1, 2, 1, *x_t.shape[1:])  # [P, 2, 1, H, W, C]
  lambdas = jnp.linspace(0.0, 1.0, num_steps).reshape(1, num_steps, 1, 1, 1)
  latents = (1.0 - lambdas) * x_t[:, 0] + lambdas * x_t[:, 1]  # [P, num_steps, H, W, C]
  latents = latents.reshape(-1, *latents.shape[2:])
  return jnp.pad(latents, [(0, num_rows - latents.shape[0])] + [(0, 0)] * 3)


def interpolation(
  loop: sample_loop.ChunkedLoop,
  make_latents: Callable[[np.ndarray, jax.Array], jax.Array],
  images: np.ndarray,
  rng: jax.Array,
  *,
  t: int,
  num_steps: int,
  num_timesteps: int,
) -> np.ndarray:
  """Paper Fig. 8: float32 [P, num_steps + 2, H, W, C] in [-1, 1], a row x_0, decoded, x_0'.

  images: uint8 [2P, H, W, C], the pairs in consecutive rows. The latents are
  `make_latents(images, noise_rng)` (`interpolation_latents`), decoded with loop key loop_rng,
  where (noise_rng, loop_rng) = split(rng). They are decoded without labels: a
  class-conditional model by its unconditional model (the null label, unguided:
  `sample_loop.make_model_fn`), since the pairs may differ in class.
  """
  noise_rng, loop_rng = jax.random.split(rng)
  latents = make_latents(images, noise_rng)
  decoded, _ = loop.run(latents, loop_rng, num_timesteps - 1 - t, num_timesteps)
  num_pairs = len(images) // 2
  decoded = mesh_lib.gather(decoded)[: num_pairs * num_steps].reshape(
    num_pairs, num_steps, *images.shape[1:]
  )
  x_start = np.asarray(image_io.to_model_range(images)).reshape(num_pairs, 2, 1, *images.shape[1:])
  return np.concatenate([x_start[:, 0], decoded, x_start[:, 1]], axis=1)


def edit(
  loop: sample_loop.ChunkedLoop,
  init: Callable,
  start: Callable[[jax.Array, jax.Array, jax.Array | None], jax.Array],
  images: np.ndarray,
  masks: np.ndarray | None,
  rng: jax.Array,
  *,
  steps: tuple[int, int],
  batch_size: int,
  classes: conditioning.Conditioning | None = None,
) -> tuple[np.ndarray, np.ndarray]:
  """Edits `images`, uint8 [N, H, W, C], in batches of `batch_size` (padded to the device
  count): (starts, results), float32 [N, H, W, C] in [-1, 1] (the starts unclipped).

  Batch b: (x_T, loop_rng) = init(shape, fold_in(rng, b)), x = start(x_T, x_start, mask) with
  x_start the images in [-1, 1], then steps [first, stop) = `steps` of the loop. masks: bool
  [N, H, W, 1], given to the loop's inpainting chunk function with x_start; None for SDEdit.
  Image i of a class-conditional model is of class `classes.labels(i, 1)`; classes None: of
  the unconditional model.
  """
  num_images = len(images)
  batch_size = min(batch_size, mesh_lib.round_up(num_images, jax.device_count()))
  starts, results = [], []
  for b in range(-(-num_images // batch_size)):
    rows = slice(b * batch_size, (b + 1) * batch_size)
    padding = [(0, batch_size - len(images[rows]))] + [(0, 0)] * 3
    x_T, loop_rng = init((batch_size, *images.shape[1:]), jax.random.fold_in(rng, b))
    x_start = sample_loop.sharded_like(x_T, image_io.to_model_range(np.pad(images[rows], padding)))
    mask = None if masks is None else sample_loop.sharded_like(x_T, np.pad(masks[rows], padding))
    x = start(x_T, x_start, mask)
    labels = None
    if classes is not None:
      labels = sample_loop.sharded_like(x_T, classes.labels(b * batch_size, batch_size))
    known = None if masks is None else (x_start, mask)
    starts.append(mesh_lib.gather(x)[: len(images[rows])])
    x, _ = loop.run(x, loop_rng, *steps, labels=labels, known=known)
    results.append(mesh_lib.gather(x)[: len(images[rows])])
  return np.concatenate(starts), np.concatenate(results)


def _labels(x: jax.Array, classes: conditioning.Conditioning | None) -> jax.Array | None:
  """The labels of the rows of x, sharded like it: `classes.labels(0, B)`; None for None."""
  if classes is None:
    return None
  return sample_loop.sharded_like(x, classes.labels(0, x.shape[0]))


# ----------------------------------------------------------------------------------------------
# The test images of the interpolation, checked before anything compiles.
# ----------------------------------------------------------------------------------------------


def load_test_images(config: ml_collections.ConfigDict) -> np.ndarray:
  """The images of `config.sampling.interpolation_images`: uint8 [2P, H, W, C] in 0..255.

  They come from the dataset's evaluation split, or from 'train' where it has none. Raises
  ValueError for an odd count or an index out of range.
  """
  indices = tuple(config.sampling.interpolation_images)
  split = data.get_dataset_info(config).eval_split or 'train'
  source = data.create_source(config, split)
  validation.require(
    bool(indices) and len(indices) % 2 == 0,
    f'config.sampling.interpolation_images = {indices} must list pairs: an even, positive count.',
  )
  validation.require(
    all(validation.is_int(i) and 0 <= i < len(source) for i in indices),
    f'config.sampling.interpolation_images = {indices}: the {split!r} split of '
    f'{config.data.dataset!r} has {len(source)} images.',
  )
  return source[np.asarray(indices)]


# ----------------------------------------------------------------------------------------------
# --mode=sample: each kind drawn from the restored model.
# ----------------------------------------------------------------------------------------------

# {file name: function that writes that file to a path}: what a kind draws, not yet written.
_Files = dict[str, Callable[[epath.Path], None]]


@dataclasses.dataclass(frozen=True)
class _Setup:
  """What every kind is drawn with: the restored EMA params and the compiled loops."""

  config: ml_collections.ConfigDict
  diffusion: diffusion_lib.GaussianDiffusion
  mesh: jax.sharding.Mesh
  model: nn.Module
  params: Any
  step: int  # The checkpoint's.
  init: Callable  # `sample_loop.create_init_fn`.
  ancestral: sample_loop.ChunkFn  # With config.sampling's guidance scale: the figures' sampler.
  classes: conditioning.Conditioning | None
  class_names: tuple[str, ...] | None  # Of a class-conditional model: the run's, else the data's.
  test_images: np.ndarray | None  # `load_test_images`, for the interpolation.
  edit_images: np.ndarray | None  # `editing.load_images`, for inpaint and sdedit.
  edit_masks: np.ndarray | None  # `editing.make_masks`, for inpaint.

  @property
  def image_shape(self) -> tuple[int, int, int]:
    size = self.config.data.image_size
    return size, size, self.config.data.num_channels

  @property
  def suffix(self) -> str:
    """The end of every file name: 'step_<step>_seed_<seed>'."""
    return f'step_{self.step:08d}_seed_{self.config.seed}'

  def figure_loop(self, kind: str, total: int) -> tuple[sample_loop.ChunkedLoop, tqdm.tqdm]:
    """The ancestral loop of a figure, and its progress bar of `total` steps."""
    bar = progress.bar(total, kind, unit='step')
    return sample_loop.ChunkedLoop(self.ancestral, self.params, bar), bar


def _draw_samples(setup: _Setup) -> _Files:
  """'samples': `num_samples` images of config.sampling's sampler, as an npz and a PNG grid."""
  config, classes = setup.config, setup.classes
  sampling = config.sampling
  sampler = samplers.from_config(config)
  run_chunk = setup.ancestral  # Compiled already, for the figures.
  if sampler != samplers.Ancestral():
    run_chunk = sample_loop.create_chunk_fn(
      setup.diffusion, setup.model, setup.mesh, sampler, sampling.guidance_scale
    )
  images = sample_loop.draw_samples(
    run_chunk,
    setup.init,
    setup.params,
    batch_rng=sample_loop.seed_batch_rng(config.seed),
    num_samples=sampling.num_samples,
    batch_size=sampling.batch_size,
    image_shape=setup.image_shape,
    num_steps=sampler.num_steps(setup.diffusion.num_timesteps),
    classes=classes,
  )
  name = f'samples_{samplers.samples_tag(sampler, classes)}_{setup.suffix}'
  if classes is None:
    grid = functools.partial(image_io.save_grid, images=images[:MAX_GRID_IMAGES])
    arrays = {'samples': images}
  else:
    labels = classes.labels(0, len(images))
    shown = slice(0, MAX_GRID_IMAGES)
    grid = functools.partial(
      image_io.save_png,
      image=image_io.class_grid(images[shown], labels[shown], classes.classes),
      upscale=image_io.upscale_factor(config.data.image_size),
    )
    arrays = {'samples': images, 'labels': labels}
    if setup.class_names is not None:
      arrays['class_names'] = np.asarray(setup.class_names)
  return {f'{name}.npz': functools.partial(image_io.save_npz, **arrays), f'{name}.png': grid}


def _draw_progressive(setup: _Setup, rng: jax.Array) -> np.ndarray:
  """Paper Fig. 6, `progressive` with config.sampling's settings."""
  sampling, num_timesteps = setup.config.sampling, setup.diffusion.num_timesteps
  loop, bar = setup.figure_loop('progressive', num_timesteps)
  with bar:
    return progressive(
      loop,
      setup.init,
      rng,
      num_images=sampling.progressive_images,
      every=sampling.progressive_every,
      image_shape=setup.image_shape,
      num_timesteps=num_timesteps,
      classes=setup.classes,
    )


def _draw_denoising_chain(setup: _Setup, rng: jax.Array) -> np.ndarray:
  """Paper Fig. 7, `denoising_chain` with config.sampling's settings."""
  sampling, num_timesteps = setup.config.sampling, setup.diffusion.num_timesteps
  ts = tuple(sorted(set(sampling.chain_t), reverse=True))
  broadcast_first = jax.jit(
    lambda x: jnp.broadcast_to(x[:1], x.shape), out_shardings=mesh_lib.batch_sharded(setup.mesh)
  )
  loop, bar = setup.figure_loop(
    'denoising_chain', num_timesteps - 1 - min(ts) + sum(t + 1 for t in ts)
  )
  with bar:
    return denoising_chain(
      loop,
      setup.init,
      broadcast_first,
      rng,
      ts=ts,
      num_samples=sampling.chain_samples,
      image_shape=setup.image_shape,
      num_timesteps=num_timesteps,
      classes=setup.classes,
    )


def _draw_interpolation(setup: _Setup, rng: jax.Array) -> np.ndarray:
  """Paper Fig. 8, `interpolation` of the test images with config.sampling's settings."""
  sampling = setup.config.sampling
  num_rows = len(setup.test_images) // 2 * sampling.interpolation_steps
  make_latents = jax.jit(
    functools.partial(
      interpolation_latents,
      setup.diffusion,
      t=sampling.interpolation_t,
      num_steps=sampling.interpolation_steps,
      num_rows=mesh_lib.round_up(num_rows, jax.device_count()),
    ),
    out_shardings=mesh_lib.batch_sharded(setup.mesh),
  )
  loop, bar = setup.figure_loop('interpolation', sampling.interpolation_t + 1)
  with bar:
    return interpolation(
      loop,
      make_latents,
      setup.test_images,
      rng,
      t=sampling.interpolation_t,
      num_steps=sampling.interpolation_steps,
      num_timesteps=setup.diffusion.num_timesteps,
    )


def _draw_edit(setup: _Setup, kind: str) -> _Files:
  """'inpaint' or 'sdedit' of the edit images with config.sampling's sampler and settings, as
  an npz and a PNG grid of rows original | masked or diffused | result."""
  config, diffusion = setup.config, setup.diffusion
  sampling = config.sampling
  sampler = samplers.from_config(config)
  timesteps = sampler.timesteps(diffusion.num_timesteps)
  num_steps = len(timesteps)
  # The unconditional model, unless classes are asked for (module docstring).
  classes = setup.classes if sampling.class_labels is not None else None
  tag = samplers.samples_tag(sampler, classes)
  originals = setup.edit_images
  if kind == 'inpaint':
    repaint = editing.RePaint.from_config(sampling)
    steps, first_step, masks = (0, repaint.num_moves(num_steps)), 0, setup.edit_masks
    start = functools.partial(editing.inpaint_start, diffusion, timestep=int(timesteps[-1]))
    name = f'inpaint_{tag}_{editing.mask_tag(sampling.inpaint_mask)}_{repaint.tag}'
  else:
    repaint, masks = None, None
    level = editing.sdedit_level(sampling.sdedit_strength, num_steps)
    steps, first_step = (num_steps - level, num_steps), num_steps - level

    def start(x_T, x_start, mask):
      del mask  # None: SDEdit keeps no region.
      return editing.sdedit_start(
        diffusion,
        x_T,
        x_start,
        timestep=int(timesteps[level - 1]),
        from_noise=level == num_steps,
      )

    name = f'sdedit_{tag}_strength{sampling.sdedit_strength:g}'
  run_chunk = sample_loop.create_chunk_fn(
    diffusion,
    setup.model,
    setup.mesh,
    sampler,
    sampling.guidance_scale,
    first_step=first_step,
    inpainting=repaint,
  )
  with progress.bar(
    -(-len(originals) // sampling.batch_size) * (steps[1] - steps[0]), kind, unit='step'
  ) as bar:
    starts, results = edit(
      sample_loop.ChunkedLoop(run_chunk, setup.params, bar),
      setup.init,
      jax.jit(start, out_shardings=mesh_lib.batch_sharded(setup.mesh)),
      originals,
      masks,
      figure_rng(config.seed, kind),
      steps=steps,
      batch_size=sampling.batch_size,
      classes=classes,
    )
  x_start = image_io.to_model_range(originals)
  if kind == 'inpaint':
    middle = np.where(masks, x_start, 0.0)
    arrays = {'masks': masks}
  else:
    middle = starts
    arrays = {'timestep': np.int32(timesteps[level - 1])}
  arrays = {'originals': originals, **arrays, 'results': image_io.to_uint8(results)}
  figure = np.stack([x_start, middle, results], axis=1)
  name = f'{name}_{setup.suffix}'
  return {
    f'{name}.npz': functools.partial(image_io.save_npz, **arrays),
    f'{name}.png': functools.partial(image_io.save_figure, figure=figure),
  }


# `draw(setup, rng) -> figure` of each figure kind, float32 [rows, columns, H, W, C] in [-1, 1].
_FIGURES = {
  'progressive': _draw_progressive,
  'denoising_chain': _draw_denoising_chain,
  'interpolation': _draw_interpolation,
}


def _draw_figure(setup: _Setup, kind: str) -> _Files:
  """A figure kind, drawn from `figure_rng(seed, kind)`, as a PNG grid."""
  figure = _FIGURES[kind](setup, figure_rng(setup.config.seed, kind))
  return {f'{kind}_{setup.suffix}.png': functools.partial(image_io.save_figure, figure=figure)}


def _write(files: _Files, out_dir: epath.Path) -> list[str]:
  """Writes the files to out_dir on process 0, printing each path; returns the paths."""
  paths = []
  for filename, save in files.items():
    path = out_dir / filename
    if jax.process_index() == 0:
      save(path)
      print(f'Wrote {path}', flush=True)
    paths.append(str(path))
  return paths


def sample(config: ml_collections.ConfigDict, workdir: str) -> list[str]:
  """Draws what `config.sampling.kinds` asks for from the EMA params of a checkpoint in workdir.

  Writes to `<workdir>/samples/` (process 0 only), prints each path written and returns them.
  Every setting and the checkpoint are checked before anything compiles or is written: a bad
  one raises ValueError, a workdir without checkpoints FileNotFoundError.
  """
  # Check everything that can be checked before compiling.
  diffusion = checks.check_config(config, samplers.check_config, editing.check_config)
  kinds = samplers.parse_kinds(config.sampling.kinds)
  test_images = load_test_images(config) if 'interpolation' in kinds else None
  edits = 'inpaint' in kinds or 'sdedit' in kinds
  edit_images = editing.load_images(config) if edits else None
  edit_masks = editing.make_masks(config, len(edit_images)) if 'inpaint' in kinds else None

  # Set up mesh and model; restore the EMA params.
  mesh = mesh_lib.create_mesh()
  model = models.create_model(config)
  abstract_params = models.param_shapes(model, config.data.image_size, config.data.num_channels)
  step, params = checkpoints.restore_ema_params(
    workdir,
    checkpoints.abstract_like(abstract_params, mesh_lib.replicated(mesh)),
    step=config.sampling.checkpoint_step,
  )
  logging.info(
    'Sampling %s from the EMA params at step %d in %s, computing in %s on %d devices.',
    ', '.join(kinds),
    step,
    checkpoints.checkpoint_dir(workdir),
    model.dtype.name,
    jax.device_count(),
  )
  out_dir = epath.Path(workdir) / 'samples'
  if jax.process_index() == 0:
    validation.ensure_writable(str(out_dir))

  # The compiled loops, shared by the kinds.
  classes = conditioning.Conditioning.from_config(config)
  setup = _Setup(
    config=config,
    diffusion=diffusion,
    mesh=mesh,
    model=model,
    params=params,
    step=step,
    init=sample_loop.create_init_fn(diffusion, mesh),
    ancestral=sample_loop.create_chunk_fn(
      diffusion, model, mesh, samplers.Ancestral(), config.sampling.guidance_scale
    ),
    classes=classes,
    class_names=None
    if classes is None
    else conditioning.read_class_names(workdir) or data.get_dataset_info(config).class_names,
    test_images=test_images,
    edit_images=edit_images,
    edit_masks=edit_masks,
  )

  # Sample and write, kind by kind.
  written = []
  for kind in kinds:
    if kind == 'samples':
      files = _draw_samples(setup)
    elif kind in ('inpaint', 'sdedit'):
      files = _draw_edit(setup, kind)
    else:
      files = _draw_figure(setup, kind)
    written.extend(_write(files, out_dir))
  return written

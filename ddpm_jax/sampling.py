"""Sampling: `sample(config, workdir)`, which `main.py --mode=sample` runs, and its parts.

`sample` restores the EMA parameters of a checkpoint in `<workdir>/checkpoints` (written by
training, or by the importer of the official weights, `python -m ddpm_jax.pretrained`) and writes
to `<workdir>/samples/` each of the comma-separated `config.sampling.kinds`:

  samples          `num_samples` images from the sampler `config.sampling.sampler`: 'ancestral'
                   (the paper's Algorithm 2, all T steps) or 'ddim' (DDIM, `ddim_steps` steps,
                   `ddim_eta`), as `samples_<sampler>_step_<step>_seed_<seed>.npz` holding
                   `samples`, uint8 [N, H, W, C] in 0..255, and a PNG grid of the first 256
                   beside it.
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
The figures use the ancestral sampler and are PNG grids. Every path written is printed.

Compiled loops. A sampler is one compiled `run_chunk(params, x, loop_rng, start, stop)` that runs
its steps [start, stop) in a `lax.fori_loop`; `ChunkedLoop` calls it on consecutive ranges sized
to take about `SECONDS_PER_CHUNK` each, so that a progress bar moves. start and stop are traced
(one compilation serves every range) and step t draws its noise from `fold_in(loop_rng, t)`, so
the split does not change the result: it equals `GaussianDiffusion.p_sample_loop` (or
`ddim_sample_loop`) bit for bit.

Sharding. Parameters are replicated and every batch is sharded along its first axis over all
devices of all processes (`ddpm_jax.mesh`); a batch is padded to a multiple of the device count
and trimmed after the gather.

Random keys. Everything is a function of `config.seed`:
  batch b of 'samples'   rng_b = fold_in(key(seed), b): (init, loop) = split(rng_b),
                         x_T = normal(init, [B, H, W, C]), the noise of step t
                         normal(fold_in(loop, t), [B, H, W, C]) (`sample_loop_init`);
  a figure               fold_in(key(seed), FIGURE_KEYS[kind]), split as its function says.
Each draw is made for the whole global batch inside jit and threefry is partitionable, so the
images do not depend on the number of devices or processes; and threefry counts the elements of
a shape in row-major order, so a batch padded with more rows has the same first rows: padding
does not change them either.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import PIL.Image
import tqdm
from absl import logging
from etils import epath
from flax import linen as nn
from jax.experimental import multihost_utils

from ddpm_jax import checkpoints, input_pipeline, models, validation
from ddpm_jax import diffusion as diffusion_lib
from ddpm_jax import mesh as mesh_lib

KINDS = ('samples', 'progressive', 'denoising_chain', 'interpolation')
SAMPLERS = ('ancestral', 'ddim')
# How long one compiled chunk of steps should take: how often the progress bar moves.
SECONDS_PER_CHUNK = 2.0
# Key of a figure: fold_in(key(seed), FIGURE_KEYS[kind]), far above any batch index of 'samples'.
FIGURE_KEYS = {'progressive': 2**30, 'denoising_chain': 2**30 + 1, 'interpolation': 2**30 + 2}
MAX_GRID_IMAGES = 256  # The PNG grid of 'samples' shows at most this many.

# `run_chunk(params, x, loop_rng, start, stop) -> (x, pred_xstart)`.
ChunkFn = Callable[[Any, jax.Array, jax.Array, Any, Any], tuple[jax.Array, jax.Array]]


def make_model_fn(
  model: nn.Module, params, sharding: jax.sharding.Sharding | None = None
) -> diffusion_lib.ModelFn:
  """The network as `model_fn(x, t)` for the diffusion functions, in inference mode.

  With `sharding` (inside jit), x is constrained to it: the batch stays split over the devices.
  """

  def model_fn(x, t):
    if sharding is not None:
      x = jax.lax.with_sharding_constraint(x, sharding)
    return model.apply({'params': params}, x, t, train=False)

  return model_fn


def abstract_params(config: ml_collections.ConfigDict, model: nn.Module) -> Any:
  """The parameters of `model` for `config.data` images, as jax.ShapeDtypeStruct (no arrays)."""
  size, channels = config.data.image_size, config.data.num_channels
  return jax.eval_shape(
    functools.partial(model.init, train=False),
    jax.random.key(0),
    jax.ShapeDtypeStruct((1, size, size, channels), jnp.float32),
    jax.ShapeDtypeStruct((1,), jnp.int32),
  )['params']


# ----------------------------------------------------------------------------------------------
# Compiled loops, and their driver.
# ----------------------------------------------------------------------------------------------


def create_chunk_fn(
  diffusion: diffusion_lib.GaussianDiffusion,
  model: nn.Module,
  mesh: jax.sharding.Mesh,
  *,
  sampler: str = 'ancestral',
  ddim_steps: int | None = None,
  ddim_eta: float = 0.0,
) -> ChunkFn:
  """The compiled `run_chunk(params, x, loop_rng, start, stop) -> (x, pred_xstart)`.

  Runs steps [start, stop) of the sampler on x, float32 [B, H, W, C] (B a multiple of the device
  count; the result is sharded along B); step i of 'ancestral' is t = T-1-i
  (`GaussianDiffusion.p_sample_steps`), of 'ddim' the i-th of its strided timesteps
  (`ddim_sample_steps`). pred_xstart, in [-1, 1], is that of step stop-1. start and stop are
  traced: one compilation per batch shape serves every range.
  """
  batch_sharding = mesh_lib.batch_sharded(mesh)

  def run_chunk(params, x, loop_rng, start, stop):
    model_fn = make_model_fn(model, params, batch_sharding)
    if sampler == 'ddim':
      out = diffusion.ddim_sample_steps(
        model_fn, x, loop_rng, start, stop, num_steps=ddim_steps, eta=ddim_eta
      )
    else:
      out = diffusion.p_sample_steps(model_fn, x, loop_rng, start, stop)
    return out['sample'], out['pred_xstart']

  return jax.jit(run_chunk, out_shardings=(batch_sharding, batch_sharding))


def create_init_fn(
  diffusion: diffusion_lib.GaussianDiffusion, mesh: jax.sharding.Mesh
) -> Callable[[tuple[int, ...], jax.Array], tuple[jax.Array, jax.Array]]:
  """The compiled `init(shape, rng) -> (x_T, loop_rng)` of `sample_loop_init`, x_T sharded."""
  return jax.jit(
    diffusion.sample_loop_init,
    static_argnums=0,
    out_shardings=(mesh_lib.batch_sharded(mesh), mesh_lib.replicated(mesh)),
  )


class ChunkedLoop:
  """Runs a compiled `run_chunk` over ranges of steps that take about SECONDS_PER_CHUNK each.

  The first range is one step (its call may compile); each next one is sized from the time of
  the last, growing at most fourfold. On several processes all take process 0's size, so that
  they make the same calls. `bar` (a tqdm bar) advances by the steps done.
  """

  def __init__(self, run_chunk: ChunkFn, params: Any, bar: tqdm.tqdm):
    self._run_chunk = run_chunk
    self._params = params
    self._bar = bar
    self._chunk_steps = 1

  def run(
    self, x: jax.Array, loop_rng: jax.Array, start: int, stop: int, keep: Iterable[int] = ()
  ) -> tuple[jax.Array, dict[int, tuple[jax.Array, jax.Array | None]]]:
    """Runs steps [start, stop) on x.

    Returns the final x and, for each s in `keep` (start <= s <= stop), the state after steps
    [start, s): `(x, pred_xstart of step s - 1)`, with pred_xstart None for s == start.
    """
    kept = {}
    pred_xstart = None
    step = start
    for boundary in sorted({*keep, stop}):
      while step < boundary:
        size = min(self._chunk_steps, boundary - step)
        began = time.perf_counter()
        x, pred_xstart = self._run_chunk(
          self._params, x, loop_rng, np.int32(step), np.int32(step + size)
        )
        x.block_until_ready()
        self._resize(size, time.perf_counter() - began)
        step += size
        self._bar.update(size)
      kept[boundary] = (x, pred_xstart)
    return x, kept

  def _resize(self, steps: int, seconds: float) -> None:
    size = steps * SECONDS_PER_CHUNK / max(seconds, 1e-6)
    size = int(np.clip(size, 1, 4 * max(steps, self._chunk_steps)))
    if jax.process_count() > 1:
      size = int(multihost_utils.broadcast_one_to_all(np.int32(size)))
    self._chunk_steps = size


def progress(total: int, desc: str, *, initial: int = 0, unit: str = 'it') -> tqdm.tqdm:
  """A console progress bar (a context manager) on process 0; a silent one elsewhere."""
  return tqdm.tqdm(
    total=total,
    desc=desc,
    initial=initial,
    unit=unit,
    dynamic_ncols=True,
    disable=jax.process_index() > 0,
  )


def gather(tree: Any) -> Any:
  """Arrays sharded over all processes' devices (a pytree of them), whole on every process as
  NumPy."""
  return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def figure_rng(seed: int, kind: str) -> jax.Array:
  return jax.random.fold_in(jax.random.key(seed), FIGURE_KEYS[kind])


# ----------------------------------------------------------------------------------------------
# The kinds of sampling: arrays of images in [-1, 1].
# ----------------------------------------------------------------------------------------------


def draw_samples(
  loop: ChunkedLoop,
  init: Callable,
  *,
  seed: int,
  num_samples: int,
  batch_size: int,
  image_shape: tuple[int, int, int],
  num_steps: int,
  bar: tqdm.tqdm,
) -> np.ndarray:
  """`num_samples` images, float32 [N, H, W, C] in [-1, 1], in batches of `batch_size`.

  Batch b starts from `init(shape, fold_in(key(seed), b))`; when N is below the batch size, the
  one batch is N rounded up to the device count (the same images: see the module docstring).
  """
  batch_size = min(batch_size, _round_up(num_samples, jax.device_count()))
  batches = []
  for b in range(math.ceil(num_samples / batch_size)):
    x, loop_rng = init((batch_size, *image_shape), jax.random.fold_in(jax.random.key(seed), b))
    x, _ = loop.run(x, loop_rng, 0, num_steps)
    batches.append(gather(x))
    bar.set_postfix_str(f'{min((b + 1) * batch_size, num_samples)}/{num_samples} images')
  return np.concatenate(batches)[:num_samples]


def progressive(
  loop: ChunkedLoop,
  init: Callable,
  rng: jax.Array,
  *,
  num_images: int,
  every: int,
  image_shape: tuple[int, int, int],
  num_timesteps: int,
) -> np.ndarray:
  """Paper Fig. 6: float32 [num_images, K + 1, H, W, C] in [-1, 1].

  Column k < K is the predicted x_0 at t = T-1-k*every (K = ceil(T / every)), the last column the
  final sample; `init(shape, rng)` starts the ancestral loop, as `p_sample_loop_progressive`.
  """
  x, loop_rng = init((_round_up(num_images, jax.device_count()), *image_shape), rng)
  # The pred_xstart of step k * every is that of the range ending after it.
  boundaries = list(range(1, num_timesteps + 1, every))
  x, kept = loop.run(x, loop_rng, 0, num_timesteps, keep=boundaries)
  columns = [gather(kept[s][1]) for s in boundaries] + [gather(x)]
  return np.stack(columns, axis=1)[:num_images]


def denoising_chain(
  loop: ChunkedLoop,
  init: Callable,
  broadcast_first: Callable[[jax.Array], jax.Array],
  rng: jax.Array,
  *,
  ts: tuple[int, ...],
  num_samples: int,
  image_shape: tuple[int, int, int],
  num_timesteps: int,
) -> np.ndarray:
  """Paper Fig. 7: float32 [len(ts), 1 + num_samples, H, W, C], x_t then samples of p(x_0 | x_t).

  The shared x_t come from one ancestral trajectory (row 0 of a batch started with
  `init(shape, reference_rng)`), stopped at each t (0-based, as the rows, in decreasing order);
  the samples of row t continue the loop from x_t with loop key `fold_in(branch_rng, t)`, where
  (reference_rng, branch_rng) = split(rng).
  """
  reference_rng, branch_rng = jax.random.split(rng)
  shape = (_round_up(num_samples, jax.device_count()), *image_shape)
  x, loop_rng = init(shape, reference_rng)
  starts = [num_timesteps - 1 - t for t in ts]  # x_t is the state after T-1-t steps.
  _, kept = loop.run(x, loop_rng, 0, max(starts), keep=starts)
  rows = []
  for t, start in zip(ts, starts, strict=True):
    x_t = broadcast_first(kept[start][0])
    samples, _ = loop.run(x_t, jax.random.fold_in(branch_rng, t), start, num_timesteps)
    rows.append(np.concatenate([gather(x_t)[:1], gather(samples)[:num_samples]]))
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
  x_start = input_pipeline.to_model_range(images)
  noise = jax.random.normal(rng, x_start.shape, jnp.float32)
  x_t = diffusion.q_sample(x_start, jnp.full((x_start.shape[0],), t, jnp.int32), noise)
  x_t = x_t.reshape(-1, 2, 1, *x_t.shape[1:])  # [P, 2, 1, H, W, C]
  lambdas = jnp.linspace(0.0, 1.0, num_steps).reshape(1, num_steps, 1, 1, 1)
  latents = (1.0 - lambdas) * x_t[:, 0] + lambdas * x_t[:, 1]  # [P, num_steps, H, W, C]
  latents = latents.reshape(-1, *latents.shape[2:])
  return jnp.pad(latents, [(0, num_rows - latents.shape[0])] + [(0, 0)] * 3)


def interpolation(
  loop: ChunkedLoop,
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
  where (noise_rng, loop_rng) = split(rng).
  """
  noise_rng, loop_rng = jax.random.split(rng)
  decoded, _ = loop.run(
    make_latents(images, noise_rng), loop_rng, num_timesteps - 1 - t, num_timesteps
  )
  num_pairs = len(images) // 2
  decoded = gather(decoded)[: num_pairs * num_steps].reshape(
    num_pairs, num_steps, *images.shape[1:]
  )
  x_start = np.asarray(input_pipeline.to_model_range(images)).reshape(
    num_pairs, 2, 1, *images.shape[1:]
  )
  return np.concatenate([x_start[:, 0], decoded, x_start[:, 1]], axis=1)


# ----------------------------------------------------------------------------------------------
# Checks before anything compiles.
# ----------------------------------------------------------------------------------------------


def parse_kinds(kinds: str) -> tuple[str, ...]:
  """'samples,progressive' -> ('samples', 'progressive'); ValueError for unknown names."""
  parsed = tuple(kind.strip() for kind in kinds.split(',') if kind.strip())
  unknown = [kind for kind in parsed if kind not in KINDS]
  if unknown or not parsed:
    raise ValueError(
      f'config.sampling.kinds = {kinds!r} names unknown kinds {unknown}; expected comma-separated '
      f'names among {", ".join(KINDS)}.'
    )
  return parsed


def _require(condition: bool, message: str) -> None:
  if not condition:
    raise ValueError(message)


def _is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def validate_sampler(
  config: ml_collections.ConfigDict, diffusion: diffusion_lib.GaussianDiffusion
) -> None:
  """Raises ValueError unless `config.sampling`'s sampler, its settings and the batch size can
  draw samples (checked by --mode=sample and, for its samples, by --mode=eval)."""
  sampling = config.sampling
  num_timesteps = diffusion.num_timesteps
  _require(
    sampling.sampler in SAMPLERS,
    f'Unknown sampler {sampling.sampler!r} (config.sampling.sampler); expected one of '
    f'{", ".join(SAMPLERS)}.',
  )
  validation.validate_batch_size(sampling.batch_size, 'config.sampling.batch_size')
  if sampling.sampler == 'ddim':
    _require(
      _is_int(sampling.ddim_steps) and 1 <= sampling.ddim_steps <= num_timesteps,
      f'config.sampling.ddim_steps must be in [1, T = {num_timesteps}], got '
      f'{sampling.ddim_steps!r}.',
    )
    _require(
      sampling.ddim_eta >= 0,
      f'config.sampling.ddim_eta must be non-negative, got {sampling.ddim_eta}.',
    )


def validate_sampling_config(
  config: ml_collections.ConfigDict, diffusion: diffusion_lib.GaussianDiffusion
) -> tuple[str, ...]:
  """Raises ValueError for a `config.sampling` that cannot be sampled; returns the kinds.

  Every setting is checked, whichever kinds are asked for, except that the figures' settings are
  checked only for the figures asked for.
  """
  sampling = config.sampling
  num_timesteps = diffusion.num_timesteps
  kinds = parse_kinds(sampling.kinds)
  validate_sampler(config, diffusion)
  _require(
    _is_int(sampling.num_samples) and sampling.num_samples >= 1,
    f'config.sampling.num_samples must be a positive integer, got {sampling.num_samples!r}.',
  )
  if 'progressive' in kinds:
    _require(
      _is_int(sampling.progressive_every) and 1 <= sampling.progressive_every <= num_timesteps,
      f'config.sampling.progressive_every must be in [1, T = {num_timesteps}], got '
      f'{sampling.progressive_every!r}.',
    )
    _require(
      sampling.progressive_images >= 1,
      f'config.sampling.progressive_images must be positive, got {sampling.progressive_images}.',
    )
  if 'denoising_chain' in kinds:
    ts = tuple(sampling.chain_t)
    _require(
      bool(ts) and all(_is_int(t) and 0 <= t < num_timesteps for t in ts),
      f'config.sampling.chain_t = {ts} must name timesteps in [0, T = {num_timesteps}) '
      '(0-based: t = T-1 is pure noise).',
    )
    _require(
      sampling.chain_samples >= 1,
      f'config.sampling.chain_samples must be positive, got {sampling.chain_samples}.',
    )
  if 'interpolation' in kinds:
    t = sampling.interpolation_t
    _require(
      _is_int(t) and 0 <= t < num_timesteps,
      f'config.sampling.interpolation_t = {t!r} must be in [0, T = {num_timesteps}).',
    )
    _require(
      sampling.interpolation_steps >= 2,
      f'config.sampling.interpolation_steps must be at least 2 (lambda = 0 and 1), got '
      f'{sampling.interpolation_steps}.',
    )
  return kinds


def load_test_images(config: ml_collections.ConfigDict) -> np.ndarray:
  """The images of `config.sampling.interpolation_images`: uint8 [2P, H, W, C] in 0..255.

  They come from the dataset's evaluation split, or from 'train' where it has none. Raises
  ValueError for an odd count or an index out of range.
  """
  indices = tuple(config.sampling.interpolation_images)
  split = input_pipeline.get_dataset_info(config).eval_split or 'train'
  source = input_pipeline.create_source(config, split)
  _require(
    bool(indices) and len(indices) % 2 == 0,
    f'config.sampling.interpolation_images = {indices} must list pairs: an even, positive count.',
  )
  _require(
    all(_is_int(i) and 0 <= i < len(source) for i in indices),
    f'config.sampling.interpolation_images = {indices}: the {split!r} split of '
    f'{config.data.dataset!r} has {len(source)} images.',
  )
  return source[np.asarray(indices)]


# ----------------------------------------------------------------------------------------------
# Parameters.
# ----------------------------------------------------------------------------------------------


def _flat_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  """{'down_0/block_0/conv1/kernel': shape} of the arrays (or array metadata) of a params tree."""
  return {
    '/'.join(str(getattr(key, 'key', key)) for key in path): tuple(leaf.shape)
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
  }


def check_checkpoint_architecture(step_dir: epath.Path, abstract_params: Any) -> None:
  """Raises ValueError when the EMA params stored in `step_dir` do not fit `abstract_params`.

  Lists the parameters missing, unexpected or shaped differently, e.g. for a workdir trained or
  converted with another config. Does nothing when the metadata cannot be read: restoring then
  falls back to an older checkpoint, or says why none can be read.
  """
  try:
    stored = ocp.StandardCheckpointHandler().metadata(step_dir / 'ema_params')
  except (OSError, ValueError):
    return
  stored, wanted = _flat_shapes(stored), _flat_shapes(abstract_params)
  problems = [
    f'{name}: checkpoint {stored[name]}, config {shape}'
    for name, shape in wanted.items()
    if name in stored and stored[name] != shape
  ]
  missing = sorted(set(wanted) - set(stored))
  unexpected = sorted(set(stored) - set(wanted))
  if missing:
    problems.append(f'not in the checkpoint ({len(missing)}): {", ".join(missing[:10])}')
  if unexpected:
    problems.append(f'not in the config ({len(unexpected)}): {", ".join(unexpected[:10])}')
  if problems:
    raise ValueError(
      f'The checkpoint {step_dir} does not fit the U-Net of this config; sample with the config '
      'it was trained or converted with.\n  ' + '\n  '.join(problems[:20])
    )


def restore_ema_params(
  config: ml_collections.ConfigDict, workdir: str, abstract_params: Any
) -> tuple[int, Any]:
  """The EMA params of the checkpoint at `config.sampling.checkpoint_step` (None: the latest).

  Raises FileNotFoundError, writing nothing, when the workdir has no checkpoint; ValueError when
  the checkpoint does not fit the config's U-Net (`check_checkpoint_architecture`).
  """
  directory = checkpoints.checkpoint_dir(workdir)
  steps = (
    [int(p.name) for p in directory.iterdir() if p.name.isdigit()] if directory.is_dir() else []
  )
  if not steps:
    raise FileNotFoundError(
      f'No checkpoint in {directory}: train first (--mode=train) or convert official weights '
      'with `python -m ddpm_jax.pretrained` (README.md, "Sample").'
    )
  step = config.sampling.checkpoint_step
  check_checkpoint_architecture(
    directory / str(max(steps) if step is None else step), abstract_params
  )
  return checkpoints.restore_ema_params(workdir, abstract_params, step=step)


# ----------------------------------------------------------------------------------------------
# Writing.
# ----------------------------------------------------------------------------------------------


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


def save_npz(path: epath.PathLike, **arrays: np.ndarray) -> None:
  """Writes arrays by name as an uncompressed .npz (local or gs:// paths), atomically: a reader,
  or a run resumed after an interruption, never sees half a file."""
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.parent / f'{path.name}.tmp'
  with tmp.open('wb') as f:
    np.savez(f, **arrays)
  tmp.replace(path)


def upscale_factor(image_size: int) -> int:
  """How much to enlarge small images (8x8 digits) in PNG grids so that they can be seen."""
  return max(1, 64 // image_size)


def save_figure(path: epath.PathLike, figure: np.ndarray) -> None:
  """Writes a figure, float32 [rows, cols, H, W, C] in [-1, 1], as a PNG grid of rows x cols."""
  rows, cols, size = figure.shape[:3]
  grid = image_grid(to_uint8(figure.reshape(rows * cols, *figure.shape[2:])), num_cols=cols)
  save_png(path, grid, upscale=upscale_factor(size))


# ----------------------------------------------------------------------------------------------
# --mode=sample.
# ----------------------------------------------------------------------------------------------


def sample(config: ml_collections.ConfigDict, workdir: str) -> list[str]:
  """Draws what `config.sampling.kinds` asks for from the EMA params of a checkpoint in workdir.

  Writes to `<workdir>/samples/` (process 0 only), prints each path written and returns them.
  Every setting and the checkpoint are checked before anything compiles or is written: a bad
  one raises ValueError, a workdir without checkpoints FileNotFoundError.
  """
  sampling = config.sampling
  # ---------------------------------------------------------------------------------------------
  # Check everything that can be checked before compiling.
  # ---------------------------------------------------------------------------------------------
  diffusion = validation.validate_config(config)
  kinds = validate_sampling_config(config, diffusion)
  test_images = load_test_images(config) if 'interpolation' in kinds else None

  # ---------------------------------------------------------------------------------------------
  # Set up mesh and model; restore the EMA params.
  # ---------------------------------------------------------------------------------------------
  mesh = mesh_lib.create_mesh()
  batch_sharding = mesh_lib.batch_sharded(mesh)
  model = models.create_model(config)
  size = config.data.image_size
  image_shape = (size, size, config.data.num_channels)
  step, params = restore_ema_params(
    config,
    workdir,
    checkpoints.abstract_like(abstract_params(config, model), mesh_lib.replicated(mesh)),
  )
  logging.info(
    'Sampling %s from the EMA params at step %d in %s, on %d devices.',
    ', '.join(kinds),
    step,
    checkpoints.checkpoint_dir(workdir),
    jax.device_count(),
  )
  out_dir = epath.Path(workdir) / 'samples'
  if jax.process_index() == 0:
    validation.ensure_writable(str(out_dir))

  # ---------------------------------------------------------------------------------------------
  # The compiled loops.
  # ---------------------------------------------------------------------------------------------
  init = create_init_fn(diffusion, mesh)
  ancestral = create_chunk_fn(diffusion, model, mesh)
  num_timesteps = diffusion.num_timesteps
  suffix = f'step_{step:08d}_seed_{config.seed}'

  def draw_kind(kind: str) -> dict[str, Callable[[epath.Path], None]]:
    """Samples one kind; returns {file name: function that writes that file to a path}."""
    if kind == 'samples':
      chunk_fn, name = ancestral, 'samples_ancestral'
      if sampling.sampler == 'ddim':
        chunk_fn = create_chunk_fn(
          diffusion,
          model,
          mesh,
          sampler='ddim',
          ddim_steps=sampling.ddim_steps,
          ddim_eta=sampling.ddim_eta,
        )
        name = f'samples_ddim{sampling.ddim_steps}_eta{sampling.ddim_eta:g}'
      num_steps = sampling.ddim_steps if sampling.sampler == 'ddim' else num_timesteps
      num_batches = math.ceil(sampling.num_samples / sampling.batch_size)
      with progress(num_batches * num_steps, kind, unit='step') as bar:
        images = draw_samples(
          ChunkedLoop(chunk_fn, params, bar),
          init,
          seed=config.seed,
          num_samples=sampling.num_samples,
          batch_size=sampling.batch_size,
          image_shape=image_shape,
          num_steps=num_steps,
          bar=bar,
        )
      images = to_uint8(images)
      grid = image_grid(images[:MAX_GRID_IMAGES])
      return {
        f'{name}_{suffix}.npz': functools.partial(save_npz, samples=images),
        f'{name}_{suffix}.png': functools.partial(
          save_png, image=grid, upscale=upscale_factor(size)
        ),
      }

    rng = figure_rng(config.seed, kind)
    if kind == 'progressive':
      with progress(num_timesteps, kind, unit='step') as bar:
        figure = progressive(
          ChunkedLoop(ancestral, params, bar),
          init,
          rng,
          num_images=sampling.progressive_images,
          every=sampling.progressive_every,
          image_shape=image_shape,
          num_timesteps=num_timesteps,
        )
    elif kind == 'denoising_chain':
      ts = tuple(sorted(set(sampling.chain_t), reverse=True))
      broadcast_first = jax.jit(
        lambda x: jnp.broadcast_to(x[:1], x.shape), out_shardings=batch_sharding
      )
      total = num_timesteps - 1 - min(ts) + sum(t + 1 for t in ts)
      with progress(total, kind, unit='step') as bar:
        figure = denoising_chain(
          ChunkedLoop(ancestral, params, bar),
          init,
          broadcast_first,
          rng,
          ts=ts,
          num_samples=sampling.chain_samples,
          image_shape=image_shape,
          num_timesteps=num_timesteps,
        )
    else:
      num_rows = len(test_images) // 2 * sampling.interpolation_steps
      make_latents = jax.jit(
        functools.partial(
          interpolation_latents,
          diffusion,
          t=sampling.interpolation_t,
          num_steps=sampling.interpolation_steps,
          num_rows=_round_up(num_rows, jax.device_count()),
        ),
        out_shardings=batch_sharding,
      )
      with progress(sampling.interpolation_t + 1, kind, unit='step') as bar:
        figure = interpolation(
          ChunkedLoop(ancestral, params, bar),
          make_latents,
          test_images,
          rng,
          t=sampling.interpolation_t,
          num_steps=sampling.interpolation_steps,
          num_timesteps=num_timesteps,
        )
    return {f'{kind}_{suffix}.png': functools.partial(save_figure, figure=figure)}

  # ---------------------------------------------------------------------------------------------
  # Sample and write, kind by kind.
  # ---------------------------------------------------------------------------------------------
  written = []
  for kind in kinds:
    for filename, save in draw_kind(kind).items():
      path = out_dir / filename
      if jax.process_index() == 0:
        save(path)
        print(f'Wrote {path}', flush=True)
      written.append(str(path))
  return written

"""The compiled sample loop, run in chunks, and the one loop that draws batches of samples.

Training (its sample grids), `--mode=sample` and `--mode=eval` all draw samples here, with a
sampler of `ddpm_jax/samplers.py` (its `StepFn`; the math is in `ddpm_jax/diffusion.py`); the
edits of `--mode=sample` (`ddpm_jax/editing.py`) run on the same compiled loop.

Compiled loops. A sampler is one compiled `run_chunk(params, x, pred_xstart, loop_rng, start,
stop)` that runs its steps [start, stop) in a `lax.fori_loop`; `ChunkedLoop` calls it on
consecutive ranges sized to take about `SECONDS_PER_CHUNK` each, so that a progress bar moves.
start and stop are traced (one compilation serves every range), step t draws its noise from
`fold_in(loop_rng, t)` and the predicted x_0 of the last step is carried from one range to the
next (DPM-Solver++'s multistep update reads it), so the split does not change the result: it
equals `GaussianDiffusion.sample_loop` bit for bit.

Sharding. Parameters are replicated and every batch is sharded along its first axis over all
devices of all processes (`ddpm_jax.mesh`); a batch is padded to a multiple of the device count
and trimmed after the gather.

Random keys. Batch b of `draw_samples` starts from rng_b = batch_rng(b) (`fold_in(key(seed), b)`
for --mode=sample and --mode=eval): (init, loop) = split(rng_b), x_T = normal(init, [B, H, W, C]),
the noise of step t normal(fold_in(loop, t), [B, H, W, C]) (`sample_loop_init`). Each draw is
made for the whole global batch inside jit and threefry is partitionable, so the images do not
depend on the number of devices or processes; and threefry counts the elements of a shape in
row-major order, so a batch padded with more rows has the same first rows: padding does not
change them either.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from flax import linen as nn
from jax.experimental import multihost_utils

from ddpm_jax import conditioning, editing, image_io, progress, samplers
from ddpm_jax import diffusion as diffusion_lib
from ddpm_jax import mesh as mesh_lib

# How long one compiled chunk of steps should take: how often the progress bar moves.
SECONDS_PER_CHUNK = 2.0

# `run_chunk(params, x, pred_xstart, loop_rng, start, stop, labels, known) -> (x, pred_xstart)`.
ChunkFn = Callable[..., tuple[jax.Array, jax.Array]]


def make_model_fn(
  model: nn.Module,
  params,
  sharding: jax.sharding.Sharding | None = None,
  *,
  labels: jax.Array | None = None,
  guidance_scale: float = 1.0,
) -> diffusion_lib.ModelFn:
  """The network as `model_fn(x, t)` for the diffusion functions, in inference mode.

  With `sharding` (inside jit), x is constrained to it: the batch stays split over the devices.
  A class-conditional network (`model.num_classes` = K > 0, as the U-Net's) is given `labels`
  int [B] and guided with `guidance_scale` (`conditioning.guided_model_fn`); with labels None it
  is the unconditional model of classifier-free guidance, the network with the null label K,
  unguided (`conditioning.unconditional_model_fn`). An unconditional network (K = 0) takes
  labels None.
  """

  def apply(x, t, y=None):
    if sharding is not None:
      x = jax.lax.with_sharding_constraint(x, sharding)
    inputs = (x, t) if y is None else (x, t, y)
    return model.apply({'params': params}, *inputs, train=False)

  if labels is not None:
    return conditioning.guided_model_fn(apply, labels, guidance_scale, model.num_classes)
  if model.num_classes:
    return conditioning.unconditional_model_fn(apply, model.num_classes)
  return apply


def create_chunk_fn(
  diffusion: diffusion_lib.GaussianDiffusion,
  model: nn.Module,
  mesh: jax.sharding.Mesh,
  sampler: samplers.Sampler,
  guidance_scale: float = 1.0,
  *,
  first_step: int = 0,
  inpainting: editing.RePaint | None = None,
) -> ChunkFn:
  """The compiled `run_chunk(params, x, pred_xstart, loop_rng, start, stop, labels=None,
  known=None) -> (x, pred_xstart)`.

  Runs steps [start, stop) of the sampler (`GaussianDiffusion.sample_steps` of its `StepFn`) on
  x, float32 [B, H, W, C] (B a multiple of the device count; the result is sharded along B);
  pred_xstart is that of step start-1 in, that of step stop-1 out. start and stop are traced:
  one compilation per batch shape serves every range. labels: int32 [B], the classes of a
  class-conditional model, guided with `guidance_scale`; None for an unconditional model, or
  for a class-conditional one's unconditional model (the null label, unguided: `make_model_fn`).
  first_step: the step the loop starts at (`Sampler.step_fn`; SDEdit). With `inpainting`, the
  steps are the moves of RePaint's walk (`editing.RePaint.step_fn`), and known is (x_start
  float32 [B, H, W, C], mask bool [B, H, W, 1]), the images and where they are kept.
  """
  batch_sharding = mesh_lib.batch_sharded(mesh)

  def run_chunk(params, x, pred_xstart, loop_rng, start, stop, labels=None, known=None):
    model_fn = make_model_fn(
      model, params, batch_sharding, labels=labels, guidance_scale=guidance_scale
    )
    step = sampler.step_fn(diffusion, model_fn, first_step)
    if inpainting is not None:
      step = inpainting.step_fn(diffusion, sampler, step, *known)
    out = diffusion.sample_steps(step, x, pred_xstart, loop_rng, start, stop)
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
    self,
    x: jax.Array,
    loop_rng: jax.Array,
    start: int,
    stop: int,
    keep: Iterable[int] = (),
    labels: jax.Array | None = None,
    known: tuple[jax.Array, jax.Array] | None = None,
  ) -> tuple[jax.Array, dict[int, tuple[jax.Array, jax.Array | None]]]:
    """Runs steps [start, stop) on x (for a multistep sampler, the first_step of its chunk
    function), of the classes `labels` (int32 [B], sharded like x) for a class-conditional
    model; labels None: of the unconditional model (`make_model_fn`). known: the images and
    mask of an inpainting chunk function (`create_chunk_fn`), sharded like x.

    Returns the final x and, for each s in `keep` (start <= s <= stop), the state after steps
    [start, s): `(x, pred_xstart of step s - 1)`, with pred_xstart None for s == start.
    """
    kept = {}
    pred_xstart = jnp.zeros_like(x)
    step = start
    for boundary in sorted({*keep, stop}):
      while step < boundary:
        size = min(self._chunk_steps, boundary - step)
        began = time.perf_counter()
        x, pred_xstart = self._run_chunk(
          self._params,
          x,
          pred_xstart,
          loop_rng,
          np.int32(step),
          np.int32(step + size),
          labels,
          known,
        )
        x.block_until_ready()
        self._resize(size, time.perf_counter() - began)
        step += size
        self._bar.update(size)
      kept[boundary] = (x, pred_xstart if boundary > start else None)
    return x, kept

  def _resize(self, steps: int, seconds: float) -> None:
    size = steps * SECONDS_PER_CHUNK / max(seconds, 1e-6)
    size = int(np.clip(size, 1, 4 * max(steps, self._chunk_steps)))
    if jax.process_count() > 1:
      size = int(multihost_utils.broadcast_one_to_all(np.int32(size)))
    self._chunk_steps = size


def sharded_like(x: jax.Array, values: np.ndarray) -> jax.Array:
  """`values` [B, ...] (the same on every process) as a global array sharded along B like x."""
  return jax.make_array_from_callback(values.shape, x.sharding, lambda index: values[index])


def seed_batch_rng(seed: int) -> Callable[[int], jax.Array]:
  """batch_rng of --mode=sample and --mode=eval: batch b starts from fold_in(key(seed), b)."""
  return lambda b: jax.random.fold_in(jax.random.key(seed), b)


def draw_samples(
  run_chunk: ChunkFn,
  init: Callable,
  params: Any,
  *,
  batch_rng: Callable[[int], jax.Array],
  num_samples: int,
  batch_size: int,
  image_shape: tuple[int, int, int],
  num_steps: int,
  desc: str = 'samples',
  load: Callable[[int], np.ndarray | None] | None = None,
  save: Callable[[int, np.ndarray], None] | None = None,
  classes: conditioning.Conditioning | None = None,
) -> np.ndarray:
  """`num_samples` images, uint8 [N, H, W, C] in 0..255, in batches of `batch_size`.

  Batch b starts from `init(shape, batch_rng(b))` and runs `num_steps` steps of `run_chunk`,
  with a progress bar. When N is below the batch size, the one batch is N rounded up to the
  device count (the same images: see the module docstring). For a class-conditional model,
  `classes` gives sample i its label, `classes.labels(i, 1)`.

  Resuming (eval): `load(b)` returns batch b's images if they were drawn before (else None), and
  `save(b, images)` is called with every batch drawn, the last one trimmed to N.
  """
  batch_size = min(batch_size, mesh_lib.round_up(num_samples, jax.device_count()))
  num_batches = math.ceil(num_samples / batch_size)
  batches = []
  with progress.bar(num_batches * num_steps, desc, unit='step') as bar:
    loop = ChunkedLoop(run_chunk, params, bar)
    for b in range(num_batches):
      images = load(b) if load is not None else None
      if images is None:
        x, loop_rng = init((batch_size, *image_shape), batch_rng(b))
        labels = None
        if classes is not None:
          labels = sharded_like(x, classes.labels(b * batch_size, batch_size))
        x, _ = loop.run(x, loop_rng, 0, num_steps, labels=labels)
        images = image_io.to_uint8(mesh_lib.gather(x))[: num_samples - b * batch_size]
        if save is not None:
          save(b, images)
      else:
        bar.update(num_steps)
      batches.append(images)
      bar.set_postfix_str(f'{min((b + 1) * batch_size, num_samples)}/{num_samples} images')
  return np.concatenate(batches)

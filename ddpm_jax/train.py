"""Training: `train(config, workdir)`, the loop that `main.py --mode=train` runs.

Params are replicated, and each batch is sharded, over a `jax.sharding.Mesh` of all devices of all
processes; Adam's moments and the EMA params are split over them (`state_sharding`), so that each
device updates its part of them only. One pure step (`create_train_step`) does the
loss, Adam with the original warmup and clipping, and the EMA update, and one `jax.jit`-compiled
call (`jit_train_call`) runs up to `config.training.steps_per_call` of them in a loop, so the host
dispatches once per call. `train` restores or initializes the state, then runs the calls and,
between them, logs, saves checkpoints and writes sample grids (the functions above it).
Every random draw is a function of (seed, step) and the data order too, so a run resumed from a
checkpoint continues exactly as an uninterrupted one would, whatever the number of devices and
of steps per call.
"""

from __future__ import annotations

import functools
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from jax.experimental import multihost_utils

from ddpm_jax import (
  checkpoints,
  checks,
  conditioning,
  data,
  image_io,
  models,
  sample_loop,
  samplers,
  tf_support,
  validation,
)
from ddpm_jax import diffusion as diffusion_lib
from ddpm_jax import mesh as mesh_lib


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: the number of updates done.
  params: Any
  ema_params: Any
  opt_state: optax.OptState


LR_DECAYS = ('none', 'cosine')


def create_optimizer(
  config: ml_collections.ConfigDict,
) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Adam after global-norm clipping, lr * min(step / warmup, 1) (the original's schedule;
  the first update, at step 0, has learning rate 0 as there), times, with
  `training.lr_decay = 'cosine'`, 0.5 (1 + cos(pi * (step - warmup) / (num_train_steps - warmup)))
  after the warmup: a decay to 0 at the last step."""
  training = config.training

  def schedule(step):
    factor = jnp.minimum(step / max(training.warmup_steps, 1), 1.0)
    if training.lr_decay == 'cosine':
      span = max(training.num_train_steps - training.warmup_steps, 1)
      progress = jnp.clip((step - training.warmup_steps) / span, 0.0, 1.0)
      factor = factor * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
    return training.learning_rate * factor

  tx = optax.chain(
    optax.clip_by_global_norm(training.grad_clip),
    optax.adam(schedule, b1=training.adam_b1, b2=training.adam_b2, eps=training.adam_eps),
  )
  return tx, schedule


def root_rngs(seed: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The run's three independent key streams: (init, train steps, sample grids)."""
  init_rng, train_rng, sample_rng = jax.random.split(jax.random.key(seed), 3)
  return init_rng, train_rng, sample_rng


def step_rngs(seed: int, step: jax.Array) -> jax.Array:
  """The key of one training step: a function of the seed and the global step only."""
  return jax.random.fold_in(root_rngs(seed)[1], step)


def preprocess(images: jax.Array, rng: jax.Array, random_flip: bool) -> jax.Array:
  """uint8 images [B, H, W, C] -> float32 in [-1, 1], randomly mirrored left-right."""
  x = image_io.to_model_range(images)
  if random_flip:
    flip = jax.random.bernoulli(rng, 0.5, (x.shape[0], 1, 1, 1))
    x = jnp.where(flip, x[:, :, ::-1, :], x)
  return x


def create_train_step(
  config,
  model,
  diffusion: diffusion_lib.GaussianDiffusion,
  tx,
  schedule,
  *,
  ema_starts_as_copy: bool,
  sharding: TrainState | None = None,
):
  """The pure update `(state, batch) -> (state, metrics)` (to be compiled by the caller).

  batch: {'image': uint8 [B, H, W, C]}, and for a class-conditional model 'label': int32 [B],
  each label replaced by the null class with probability `training.label_dropout`
  (`conditioning.drop_labels`). `ema_starts_as_copy`: whether the update of step 0 makes the
  EMA a copy of the params, as the original does for a fresh run; a run from
  `training.init_from` passes False, to continue the EMA it starts from. `sharding`: the
  state's (`state_sharding`) under jit, or None. With it, the gradients and the new params are
  whole on every device, like the params: the gradients summed whole (an all-reduce), Adam and
  the EMA updated on each device's part, the new params gathered whole. Left to itself, XLA
  split more, at a cost by its own accounting (BENCHMARKS.md, "Where a TPU step's bytes go"):
  the kernels' gradient convolutions on a v5e-8, and on a v5p-8 the params carried through the
  train call's loop, gathered at every use.
  """

  def whole(tree):
    return tree if sharding is None else jax.lax.with_sharding_constraint(tree, sharding.params)

  ema_decay = config.training.ema_decay
  num_classes = config.model.num_classes

  def train_step(state: TrainState, batch: dict[str, jax.Array]):
    rng = step_rngs(config.seed, state.step)
    # A fifth key for the labels' dropout: the four of an unconditional step stay as they were.
    flip_rng, t_rng, noise_rng, dropout_rng, *label_rng = jax.random.split(
      rng, 5 if num_classes else 4
    )
    x_start = preprocess(batch['image'], flip_rng, config.data.random_flip)
    t = jax.random.randint(t_rng, (x_start.shape[0],), 0, diffusion.num_timesteps)
    noise = jax.random.normal(noise_rng, x_start.shape, x_start.dtype)
    labels = None
    if num_classes:
      rate = config.training.label_dropout
      labels = conditioning.drop_labels(batch['label'], label_rng[0], rate, num_classes)

    def loss_fn(params):
      def model_fn(x, t):
        inputs = (x, t) if labels is None else (x, t, labels)
        return model.apply({'params': params}, *inputs, train=True, rngs={'dropout': dropout_rng})

      with jax.named_scope('loss'):
        return jnp.mean(diffusion.training_losses(model_fn, x_start, t, noise))

    # The scopes name the ops in the compiled program (benchmarks/hlo_bytes.py).
    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    grads = whole(grads)
    with jax.named_scope('optimizer'):
      updates, opt_state = tx.update(grads, state.opt_state, state.params)
      params = whole(optax.apply_updates(state.params, updates))
    # The original starts the EMA as a copy: decay 1e-10 at the first step.
    decay = jnp.where(state.step == 0, 1e-10, ema_decay) if ema_starts_as_copy else ema_decay
    with jax.named_scope('ema'):
      ema_params = jax.tree.map(
        lambda e, p: decay * e + (1.0 - decay) * p, state.ema_params, params
      )
    new_state = TrainState(
      step=state.step + 1, params=params, ema_params=ema_params, opt_state=opt_state
    )
    metrics = {
      'loss': loss,
      'grad_norm': optax.global_norm(grads),
      'learning_rate': schedule(state.step),
    }
    return new_state, metrics

  return train_step


def create_train_call(train_step):
  """One call of the loop, `(state, batches, n) -> (state, metrics, each [k])`: n <= k updates
  of `train_step`, the one pure step of `create_train_step`.

  batches: the batches of k steps stacked, {'image': uint8 [k, B, H, W, C]} (and 'label' int32
  [k, B] for a class-conditional model). A `fori_loop` of `train_step` over batches 0, ..., n - 1
  (those of n consecutive steps), so the host dispatches once per n steps; metrics[i] is that of
  the update of batch i, zero for i >= n. The trip count n is an argument, not a shape, so one
  compiled program runs every call of a run, the short ones that end at a boundary too. It also
  keeps the updates bitwise the same for any k and n: XLA compiles the step differently at the top
  level, and inside a loop of known trip count differently for each count (on CPU the params
  differ after a few steps), but the body of a loop of traced trip count the same way for every
  k.
  """

  def train_call(state: TrainState, batches: dict[str, jax.Array], num_steps: jax.Array):
    def body(i, carry):
      state, metrics = carry
      state, step_metrics = train_step(state, jax.tree.map(lambda b: b[i], batches))
      return state, jax.tree.map(lambda m, v: m.at[i].set(v), metrics, step_metrics)

    first = jax.tree.map(lambda b: b[0], batches)
    step_metrics = jax.eval_shape(train_step, state, first)[1]
    num_batches = batches['image'].shape[0]
    metrics = jax.tree.map(lambda m: jnp.zeros((num_batches, *m.shape), m.dtype), step_metrics)
    return jax.lax.fori_loop(0, num_steps, body, (state, metrics))

  return train_call


def jit_train_call(
  config, model, diffusion, tx, schedule, mesh, state_sharding, *, ema_starts_as_copy: bool
):
  """`create_train_call` of `create_train_step`, jitted as the training loop runs it: the state
  sharded as `state_sharding` (a `TrainState` of shardings: `state_sharding()`'s) and donated, the
  batches of a call sharded over their batch axis."""
  replicated = mesh_lib.replicated(mesh)
  train_step = create_train_step(
    config,
    model,
    diffusion,
    tx,
    schedule,
    ema_starts_as_copy=ema_starts_as_copy,
    sharding=state_sharding,
  )
  return jax.jit(
    create_train_call(train_step),
    in_shardings=(state_sharding, mesh_lib.stacked_batches_sharded(mesh), replicated),
    out_shardings=(state_sharding, replicated),
    donate_argnums=0,
  )


def state_sharding(abstract_state: TrainState, mesh: jax.sharding.Mesh) -> TrainState:
  """The sharding of each array of the state: the step and the params replicated (every device
  runs the whole network), the EMA params and the optimizer state (Adam's moments, its counts)
  split over the devices where their shapes allow (`ddpm_jax.mesh.split`): no device holds or
  updates more than its part of them (ZeRO's stage 1, Rajbhandari et al. 2020)."""
  split = lambda tree: jax.tree.map(lambda x: mesh_lib.split(mesh, x.shape), tree)
  return TrainState(
    step=mesh_lib.replicated(mesh),
    params=jax.tree.map(lambda _: mesh_lib.replicated(mesh), abstract_state.params),
    ema_params=split(abstract_state.ema_params),
    opt_state=split(abstract_state.opt_state),
  )


def call_length(step: int, training: ml_collections.ConfigDict) -> int:
  """How many steps the call that starts after `step` updates runs: `training.steps_per_call`,
  or fewer so as to end at the next step at which the loop must act (log, checkpoint, sample
  grid, or the last step)."""
  intervals = (training.log_every_steps, training.checkpoint_every_steps)
  intervals += (training.sample_every_steps,) if training.sample_every_steps else ()
  next_boundary = min(training.num_train_steps, *((step // n + 1) * n for n in intervals))
  return min(training.steps_per_call, next_boundary - step)


def create_train_state(config, model, tx, rng: jax.Array) -> TrainState:
  """Fresh parameters (the original initializers), EMA = params, Adam state zero."""
  size, channels = config.data.image_size, config.data.num_channels
  x = jnp.zeros((1, size, size, channels), jnp.float32)
  inputs = (x, jnp.zeros((1,), jnp.int32))
  if config.model.num_classes:
    inputs += (jnp.zeros((1,), jnp.int32),)  # A label.
  params = model.init(rng, *inputs, train=False)['params']
  return TrainState(
    step=jnp.zeros((), jnp.int32), params=params, ema_params=params, opt_state=tx.init(params)
  )


# -------------------------------------------------------------------------------------------------
# Checks, restore or initialize.
# -------------------------------------------------------------------------------------------------


def check_config(
  config: ml_collections.ConfigDict, diffusion: diffusion_lib.GaussianDiffusion
) -> None:
  """Raises ValueError, naming the field, for a `config.training` that cannot work, before
  anything compiles: batch sizes that do not split over the devices, the sampler, classes and
  guidance of the sample grids (`config.sampling`'s), label_dropout, steps_per_call, lr_decay.
  (Run by `checks.check_config` after
  the data, model and diffusion; a checkpoint to resume or start from is checked as it is
  restored, `restore_or_initialize`.)"""
  training = config.training
  validation.validate_batch_size(training.batch_size, 'config.training.batch_size')
  validation.validate_batch_size(training.num_sample_images, 'config.training.num_sample_images')
  samplers.check_sampler(config, diffusion)
  if config.model.num_classes:
    conditioning.check_training(config)
  validation.require(
    validation.is_int(training.steps_per_call) and training.steps_per_call >= 1,
    'config.training.steps_per_call must be a positive integer (the train steps of one compiled '
    f'call), got {training.steps_per_call!r}.',
  )
  validation.require(
    training.lr_decay in LR_DECAYS,
    f'Unknown config.training.lr_decay {training.lr_decay!r}; expected one of {LR_DECAYS}.',
  )


def restore_or_initialize(
  config: ml_collections.ConfigDict,
  workdir: str,
  manager,
  abstract_state: TrainState,
  initialize: Callable[[], TrainState],
) -> TrainState:
  """The state a run starts from: that of the latest readable checkpoint of `workdir` (`resume`);
  else, with `training.init_from`, a step-0 state with that checkpoint's params and EMA params
  (`fine_tune`); else `initialize()`, a fresh state (`create_train_state`).

  `abstract_state` holds the jax.ShapeDtypeStruct of every array of the state, with its sharding.
  Raises ValueError when the latest checkpoint of `workdir` holds imported weights.
  """
  latest = manager.latest_step()
  directory = checkpoints.checkpoint_dir(workdir)
  if latest is not None and checkpoints.is_imported(directory / str(latest)):
    raise ValueError(
      f'The checkpoint at step {latest} in {directory} holds imported weights without optimizer '
      'state, so a run cannot resume from it. To train from them, start a new workdir with '
      f'--config.training.init_from={workdir}'
    )
  items = {name: getattr(abstract_state, name) for name in ('params', 'ema_params', 'opt_state')}
  restored = checkpoints.restore(manager, items)
  if restored is not None:
    step, items = restored
    return resume(config, step, items, abstract_state.step.sharding)
  if config.training.init_from:
    return fine_tune(config.training.init_from, items['params'], items['ema_params'], initialize)
  logging.info('No checkpoint in %s: starting from step 0.', directory)
  return initialize()


def resume(
  config: ml_collections.ConfigDict, step: int, items: dict[str, Any], step_sharding
) -> TrainState:
  """The state of the checkpoint `items` restored at `step`; warns when it was written with
  another seed or batch size, whose data order and random draws differ."""
  meta = items['meta']
  if meta.get('seed') != config.seed or meta.get('batch_size') != config.training.batch_size:
    logging.warning(
      'Checkpoint at step %d was written with seed %s and batch size %s; this run has %s and '
      '%s, so its data order and random draws differ from the uninterrupted run.',
      step,
      meta.get('seed'),
      meta.get('batch_size'),
      config.seed,
      config.training.batch_size,
    )
  logging.info('Resumed from the checkpoint at step %d.', step)
  return TrainState(
    step=jax.device_put(jnp.asarray(step, jnp.int32), step_sharding),
    params=items['params'],
    ema_params=items['ema_params'],
    opt_state=items['opt_state'],
  )


def fine_tune(
  init_from: str,
  abstract_params: Any,
  abstract_ema_params: Any,
  initialize: Callable[[], TrainState],
) -> TrainState:
  """A fresh run from another checkpoint's weights (`training.init_from`): step 0, the params and
  EMA params of that checkpoint (restored as the state shards them), the optimizer state of a
  new run."""
  step_dir, params, ema_params = checkpoints.restore_weights(
    init_from, abstract_params, abstract_ema_params
  )
  state = initialize().replace(params=params, ema_params=ema_params)
  logging.info('Starting from step 0 with the params and EMA params of %s.', step_dir)
  return state


# -------------------------------------------------------------------------------------------------
# What the loop does between calls: send batches, log, save, write sample grids.
# -------------------------------------------------------------------------------------------------


def call_batches(
  batches: Iterator[tuple[int, dict[str, np.ndarray]]],
  step: int,
  training: ml_collections.ConfigDict,
  sharding: jax.sharding.Sharding,
) -> tuple[dict[str, jax.Array], int]:
  """The batches of the call that starts after `step` updates, on the devices, and their number.

  Returns (batches, n): n = `call_length(step)`, and the batches of steps step, ...,
  step + n - 1 (the next n of `batches`, (step, batch) of this process), then k - n of zeros
  (k = steps_per_call: one shape for every call), stacked and sharded over B: 'image' uint8
  [k, B, H, W, C] (and 'label' int32 [k, B]). The transfer does not wait for the call that is
  running: sent right after that call is dispatched, it overlaps that call's compute.
  """
  num_steps = call_length(step, training)
  local = []
  for expected_step in range(step, step + num_steps):
    batch_step, batch = next(batches)
    assert batch_step == expected_step, (batch_step, expected_step)
    local.append(batch)
  local += [jax.tree.map(np.zeros_like, local[0])] * (training.steps_per_call - num_steps)
  stacked = jax.tree.map(lambda *arrays: np.stack(arrays), *local)
  return jax.tree.map(
    lambda a: jax.make_array_from_process_local_data(sharding, a), stacked
  ), num_steps


def log_metrics(
  pending: list[tuple[int, dict[str, jax.Array]]],
  step: int,
  last_log: tuple[int, float],
  writer,
  config: ml_collections.ConfigDict,
  workdir: str,
  report: Callable[[int, dict[str, float]], None] | None,
) -> tuple[int, float]:
  """Checks that the loss of every step since the last log is finite, and logs their means.

  pending: (n, metrics [k]) of each call since the last log: its first n values are of its n
    steps, last_log[0] + 1, ..., `step` in all.
  last_log: (step, time.time()) of the last log; returns those of this one.
  Raises FloatingPointError naming the first step whose loss is not finite.
  """
  last_log_step, last_log_time = last_log
  host_metrics = jax.device_get(pending)
  # {name: [step - last_log_step]}: the values of steps last_log_step + 1, ..., step.
  metrics = {k: np.concatenate([m[k][:n] for n, m in host_metrics]) for k in host_metrics[0][1]}
  non_finite = np.flatnonzero(~np.isfinite(metrics['loss']))
  if non_finite.size:
    raise FloatingPointError(
      f'Non-finite loss {metrics["loss"][non_finite[0]]} at step '
      f'{last_log_step + 1 + non_finite[0]}; stopping. The last good checkpoint in '
      f'{checkpoints.checkpoint_dir(workdir)} is kept.'
    )
  summary = {k: float(np.mean(values)) for k, values in metrics.items()}
  now = time.time()
  steps_per_sec = (step - last_log_step) / max(now - last_log_time, 1e-9)
  summary['steps_per_sec'] = steps_per_sec
  writer.write_scalars(step, summary)
  if report is not None and jax.process_index() == 0:
    report(step, summary)
  num_train_steps = config.training.num_train_steps
  eta = (num_train_steps - step) / max(steps_per_sec, 1e-9)
  logging.info(
    'step %d/%d  loss %.5f  grad_norm %.3f  lr %.2e  %.2f steps/s  ETA %s',
    step,
    num_train_steps,
    summary['loss'],
    summary['grad_norm'],
    summary['learning_rate'],
    steps_per_sec,
    _format_seconds(eta),
  )
  return step, now


def save_checkpoint(manager, state: TrainState, config: ml_collections.ConfigDict) -> None:
  """Saves `state` (asynchronously) at its step; raises FloatingPointError, saving nothing, when
  its params are not finite."""
  step = int(state.step)
  if not bool(_all_finite(state.params)):
    raise FloatingPointError(
      f'Parameters are not finite at step {step}; the last good checkpoint is kept.'
    )
  checkpoints.save(
    manager,
    step,
    params=state.params,
    ema_params=state.ema_params,
    opt_state=state.opt_state,
    meta={
      'seed': config.seed,
      'batch_size': config.training.batch_size,
      'examples_seen': step * config.training.batch_size,
    },
  )


def create_sample_grid_fn(
  config: ml_collections.ConfigDict, diffusion, model, mesh
) -> Callable[[Any], np.ndarray]:
  """`ema_params -> grid`: `training.num_sample_images` samples of config.sampling's sampler,
  from the same x_T at every grid of a run (the seed's sample key), tiled into one uint8 image
  [rows * (H + 1) + 1, cols * (W + 1) + 1, C] (`image_io.image_grid`); for a class-conditional
  model, of config.sampling's classes and guidance, one row per class (`image_io.class_grid`)."""
  sampler = samplers.from_config(config)
  classes = conditioning.Conditioning.from_config(config)
  sample_init = sample_loop.create_init_fn(diffusion, mesh)
  sample_chunk = sample_loop.create_chunk_fn(
    diffusion, model, mesh, sampler, config.sampling.guidance_scale
  )
  sample_rng = root_rngs(config.seed)[2]
  size, channels = config.data.image_size, config.data.num_channels
  num_images = config.training.num_sample_images

  def sample_grid(ema_params) -> np.ndarray:
    images = sample_loop.draw_samples(
      sample_chunk,
      sample_init,
      mesh_lib.reshard(ema_params, mesh_lib.replicated(mesh)),  # Split in the train state.
      batch_rng=lambda _: sample_rng,
      num_samples=num_images,
      batch_size=num_images,
      image_shape=(size, size, channels),
      num_steps=sampler.num_steps(diffusion.num_timesteps),
      classes=classes,
    )
    if classes is None:
      return image_io.image_grid(images)
    return image_io.class_grid(images, classes.labels(0, num_images), classes.classes)

  return sample_grid


def write_samples(
  grid: np.ndarray, step: int, config: ml_collections.ConfigDict, workdir_path, writer
) -> None:
  """Writes the sample grid of the EMA model at `step` (`create_sample_grid_fn`): as
  samples/step_<step>.png on process 0, and to TensorBoard."""
  if jax.process_index() == 0:
    path = workdir_path / 'samples' / f'step_{step:08d}.png'
    image_io.save_png(path, grid, upscale=image_io.upscale_factor(config.data.image_size))
    tag = samplers.from_config(config).tag
    logging.info('Wrote samples of the EMA model (sampler %s) to %s', tag, path)
  writer.write_images(step, {'samples': grid[None]})


class _PreemptionWatch:
  """Tells, after the same call on every process, that the job was asked to stop (SIGTERM).

  Several processes use JAX's preemption sync point (the distributed runtime catches the
  signal), which needs an id that grows by 1 from one check to the next: the number of calls
  made, not the step, which grows by up to `steps_per_call`. One process installs its own
  SIGTERM handler.
  """

  def __init__(self):
    self._signalled = False
    self._previous = None
    if jax.process_count() == 1:
      self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    self._signalled = True

  def reached(self, num_calls: int) -> bool:
    if jax.process_count() > 1:
      return multihost_utils.reached_preemption_sync_point(num_calls)
    return self._signalled

  def close(self):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


# -------------------------------------------------------------------------------------------------
# The loop.
# -------------------------------------------------------------------------------------------------


def train(
  config: ml_collections.ConfigDict,
  workdir: str,
  *,
  report: Callable[[int, dict[str, float]], None] | None = None,
) -> TrainState:
  """Trains (or resumes training) until `config.training.num_train_steps`; returns the state.

  Writes checkpoints, TensorBoard logs and the sample grids of the EMA model in `workdir`, and
  the config, `<workdir>/config.json` (`checkpoints.write_config`), as each launch starts.
  `report(step, metrics)`, if given, is called on process 0 with what is logged every
  `log_every_steps` steps (the mean loss, grad_norm and learning_rate since the last log, and
  steps_per_sec): e.g. for a progress bar and a loss plot in a notebook.
  """
  training = config.training
  # Check everything that can be checked before compiling.
  diffusion = checks.check_config(config, check_config)
  workdir_path = validation.ensure_writable(workdir)
  if config.model.num_classes:  # For sampling: the names of the labels.
    conditioning.write_class_names(workdir_path, data.get_dataset_info(config).class_names)

  # Set up mesh, model, optimizer; restore the latest checkpoint, or start afresh.
  mesh = mesh_lib.create_mesh()
  model = models.create_model(config)
  tx, schedule = create_optimizer(config)
  init_fn = functools.partial(create_train_state, config, model, tx)
  init_rng = root_rngs(config.seed)[0]
  shapes = jax.eval_shape(init_fn, init_rng)
  sharding = state_sharding(shapes, mesh)
  abstract_state = checkpoints.abstract_like(shapes, sharding)
  num_params = sum(x.size for x in jax.tree.leaves(abstract_state.params))
  logging.info(
    'Model: %s parameters, computing in %s; %d devices over %d processes.',
    f'{num_params:,}',
    model.dtype.name,
    jax.device_count(),
    jax.process_count(),
  )
  manager = checkpoints.create_manager(workdir, max_to_keep=training.keep_checkpoints)
  initialize = lambda: jax.jit(init_fn, out_shardings=sharding)(init_rng)
  state = restore_or_initialize(config, workdir, manager, abstract_state, initialize)
  start_step = int(state.step)
  # The config of the run, for what reads the workdir without it (python -m ddpm_jax.export);
  # written once the run is sure to start, so that a refused one leaves the workdir as it was.
  checkpoints.write_config(workdir_path, config)

  # Compiled once: every call, the shorter ones that end where the loop must act (`call_length`)
  # too, has its batches padded to steps_per_call and the number of steps as an argument.
  train_call = jit_train_call(
    config,
    model,
    diffusion,
    tx,
    schedule,
    mesh,
    sharding,
    ema_starts_as_copy=not training.init_from,
  )
  sample_grid = create_sample_grid_fn(config, diffusion, model, mesh)
  writer = tf_support.create_metric_writer(str(workdir_path), just_logging=jax.process_index() > 0)
  if start_step == 0:
    writer.write_hparams(_flatten(config.to_dict()))

  # Train.
  preemption = _PreemptionWatch()
  # Two calls' worth of batches read ahead on the host.
  batches = data.train_batches(
    config,
    global_batch_size=training.batch_size,
    start_step=start_step,
    seed=config.seed,
    buffer_size=2 * training.steps_per_call,
  )
  # The batches of one call, [k, B, ...]: the batch axis B split over all devices.
  batches_sharding = mesh_lib.stacked_batches_sharded(mesh)
  pending_metrics = []  # (n, metrics [k]) of each call since the last log.
  last_log = start_step, time.time()
  try:
    step, num_calls = start_step, 0
    if step < training.num_train_steps:
      call_input, num_steps = call_batches(batches, step, training, batches_sharding)
    while step < training.num_train_steps:
      # Dispatched: it runs while the host goes on.
      state, metrics = train_call(state, call_input, num_steps)
      pending_metrics.append((num_steps, metrics))
      step += num_steps
      num_calls += 1
      done = step == training.num_train_steps
      if not done:
        # The next call's input, sent before waiting on this call.
        call_input, num_steps = call_batches(batches, step, training, batches_sharding)
      preempted = preemption.reached(num_calls)
      save = step % training.checkpoint_every_steps == 0 or done or preempted
      if save or step % training.log_every_steps == 0:
        # Every checkpoint follows the check of the losses before it.
        last_log = log_metrics(pending_metrics, step, last_log, writer, config, workdir, report)
        pending_metrics.clear()
      if save:
        save_checkpoint(manager, state, config)
      if preempted:
        logging.warning('Asked to stop (SIGTERM): saved the checkpoint at step %d.', step)
        break
      if training.sample_every_steps and (step % training.sample_every_steps == 0 or done):
        write_samples(sample_grid(state.ema_params), step, config, workdir_path, writer)
  finally:
    batches.close()
    preemption.close()
    manager.wait_until_finished()
    manager.close()
    writer.flush()
  return state


@jax.jit
def _all_finite(tree) -> jax.Array:
  return jnp.all(jnp.array([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def _format_seconds(seconds: float) -> str:
  seconds = int(seconds)
  hours, rest = divmod(seconds, 3600)
  return f'{hours}h{rest // 60:02d}m' if hours else f'{rest // 60}m{rest % 60:02d}s'


def _flatten(tree: dict, prefix: str = '') -> dict[str, Any]:
  """{'a': {'b': 1}} -> {'a.b': 1}, with sequences as strings (for TensorBoard hparams)."""
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(_flatten(value, f'{prefix}{key}.'))
    else:
      flat[f'{prefix}{key}'] = (
        str(value) if isinstance(value, (list, tuple)) or value is None else value
      )
  return flat

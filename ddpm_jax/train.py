"""Training: `train_and_evaluate(config, workdir)`, the loop that `main.py --mode=train` runs.

Params, EMA params and optimizer state are replicated, and each batch is sharded, over a
`jax.sharding.Mesh` of all devices of all processes; one pure step does the loss, Adam with the
original warmup and clipping, and the EMA update, and one `jax.jit`-compiled call runs up to
`config.training.steps_per_call` of them in a loop, so the host dispatches once per call.
Every random draw is a function of (seed, step) and the data order too, so a run resumed from a
checkpoint continues exactly as an uninterrupted one would, whatever the number of devices and
of steps per call.
"""

from __future__ import annotations

import functools
import signal
import time
from collections.abc import Callable
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
  image_io,
  input_pipeline,
  models,
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


def create_train_step(config, model, diffusion: diffusion_lib.GaussianDiffusion, tx, schedule):
  """The pure update `(state, images) -> (state, metrics)` (to be compiled by the caller)."""
  ema_decay = config.training.ema_decay

  def train_step(state: TrainState, images: jax.Array):
    rng = step_rngs(config.seed, state.step)
    flip_rng, t_rng, noise_rng, dropout_rng = jax.random.split(rng, 4)
    x_start = preprocess(images, flip_rng, config.data.random_flip)
    t = jax.random.randint(t_rng, (x_start.shape[0],), 0, diffusion.num_timesteps)
    noise = jax.random.normal(noise_rng, x_start.shape, x_start.dtype)

    def loss_fn(params):
      def model_fn(x, t):
        return model.apply({'params': params}, x, t, train=True, rngs={'dropout': dropout_rng})

      return jnp.mean(diffusion.training_losses(model_fn, x_start, t, noise))

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    # The original starts the EMA as a copy: decay 1e-10 at the first step; a run from
    # `training.init_from` continues the EMA it starts from.
    decay = ema_decay if config.training.init_from else jnp.where(state.step == 0, 1e-10, ema_decay)
    ema_params = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema_params, params)
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
  """One call of the loop, `(state, images uint8 [k, B, H, W, C], n) -> (state, metrics, each
  [k])`: n <= k updates of `train_step`, the one pure step of `create_train_step`.

  A `fori_loop` of `train_step` over images[0], ..., images[n - 1] (the batches of n consecutive
  steps), so the host dispatches once per n steps; metrics[i] is that of the update of
  images[i], zero for i >= n. The trip count n is an argument, not a shape, so one compiled
  program runs every call of a run, the short ones that end at a boundary too. It also keeps the
  updates bitwise the same for any k and n: XLA compiles the step differently at the top level,
  and inside a loop of known trip count differently for each count (on CPU the params differ
  after a few steps), but the body of a loop of traced trip count the same way for every k.
  """

  def train_call(state: TrainState, images: jax.Array, num_steps: jax.Array):
    def body(i, carry):
      state, metrics = carry
      state, step_metrics = train_step(state, images[i])
      return state, jax.tree.map(lambda m, v: m.at[i].set(v), metrics, step_metrics)

    step_metrics = jax.eval_shape(train_step, state, images[0])[1]
    metrics = jax.tree.map(lambda m: jnp.zeros((images.shape[0], *m.shape), m.dtype), step_metrics)
    return jax.lax.fori_loop(0, num_steps, body, (state, metrics))

  return train_call


def jit_train_call(config, model, diffusion, tx, schedule, mesh, state_sharding):
  """`create_train_call` of `create_train_step`, jitted as the training loop runs it: state
  replicated and donated, the batches of a call sharded over their batch axis."""
  replicated = mesh_lib.replicated(mesh)
  return jax.jit(
    create_train_call(create_train_step(config, model, diffusion, tx, schedule)),
    in_shardings=(state_sharding, mesh_lib.stacked_batches_sharded(mesh), replicated),
    out_shardings=(state_sharding, replicated),
    donate_argnums=0,
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
  params = model.init(rng, x, jnp.zeros((1,), jnp.int32), train=False)['params']
  return TrainState(
    step=jnp.zeros((), jnp.int32), params=params, ema_params=params, opt_state=tx.init(params)
  )


def _all_finite(tree) -> jax.Array:
  return jnp.all(jnp.array([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


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


def train_and_evaluate(
  config: ml_collections.ConfigDict,
  workdir: str,
  *,
  report: Callable[[int, dict[str, float]], None] | None = None,
) -> TrainState:
  """Trains (or resumes training) until `config.training.num_train_steps`; returns the state.

  `report(step, metrics)`, if given, is called on process 0 with what is logged every
  `log_every_steps` steps (the mean loss, grad_norm and learning_rate since the last log, and
  steps_per_sec): e.g. for a progress bar and a loss plot in a notebook.
  """
  training = config.training
  # ---------------------------------------------------------------------------------------------
  # Check everything that can be checked before compiling.
  # ---------------------------------------------------------------------------------------------
  validation.validate_config(config)
  diffusion = diffusion_lib.GaussianDiffusion.from_config(config.diffusion)
  validation.validate_batch_size(training.batch_size, 'config.training.batch_size')
  validation.validate_batch_size(training.num_sample_images, 'config.training.num_sample_images')
  samplers.validate_sampler(config, diffusion)  # The sample grids use config.sampling's sampler.
  validation.validate_steps_per_call(training.steps_per_call)
  validation.require(
    training.lr_decay in LR_DECAYS,
    f'Unknown config.training.lr_decay {training.lr_decay!r}; expected one of {LR_DECAYS}.',
  )
  workdir_path = validation.ensure_writable(workdir)

  # ---------------------------------------------------------------------------------------------
  # Set up mesh, model, optimizer.
  # ---------------------------------------------------------------------------------------------
  mesh = mesh_lib.create_mesh()
  replicated = mesh_lib.replicated(mesh)
  # The batches of one call, uint8 [k, B, H, W, C]: the batch axis B split over all devices.
  batches_sharding = mesh_lib.stacked_batches_sharded(mesh)
  model = models.create_model(config)
  tx, schedule = create_optimizer(config)

  init_fn = functools.partial(create_train_state, config, model, tx)
  init_rng, _, sample_rng = root_rngs(config.seed)
  abstract_state = jax.eval_shape(init_fn, init_rng)
  state_sharding = jax.tree.map(lambda _: replicated, abstract_state)
  num_params = sum(x.size for x in jax.tree.leaves(abstract_state.params))
  logging.info(
    'Model: %s parameters; %d devices over %d processes.',
    f'{num_params:,}',
    jax.device_count(),
    jax.process_count(),
  )

  # ---------------------------------------------------------------------------------------------
  # Restore the latest checkpoint, or start afresh.
  # ---------------------------------------------------------------------------------------------
  manager = checkpoints.create_manager(workdir, max_to_keep=training.keep_checkpoints)
  abstract_items = {
    name: checkpoints.abstract_like(getattr(abstract_state, name), replicated)
    for name in ('params', 'ema_params', 'opt_state')
  }
  latest = manager.latest_step()
  if latest is not None and checkpoints.is_imported(
    checkpoints.checkpoint_dir(workdir) / str(latest)
  ):
    raise ValueError(
      f'The checkpoint at step {latest} in {checkpoints.checkpoint_dir(workdir)} holds imported '
      'weights without optimizer state, so a run cannot resume from it. To train from them, '
      f'start a new workdir with --config.training.init_from={workdir}'
    )
  restored = checkpoints.restore(manager, abstract_items)
  if restored is None and training.init_from:
    # A fresh run from another checkpoint's weights: step 0, the optimizer state of a new run.
    step_dir, params, ema_params = checkpoints.restore_init_params(
      training.init_from, abstract_items['params']
    )
    state = jax.jit(init_fn, out_shardings=state_sharding)(init_rng)
    state = state.replace(params=params, ema_params=ema_params)
    logging.info('Starting from step 0 with the params and EMA params of %s.', step_dir)
  elif restored is None:
    state = jax.jit(init_fn, out_shardings=state_sharding)(init_rng)
    logging.info('No checkpoint in %s: starting from step 0.', checkpoints.checkpoint_dir(workdir))
  else:
    step, items = restored
    meta = items['meta']
    if meta.get('seed') != config.seed or meta.get('batch_size') != training.batch_size:
      logging.warning(
        'Checkpoint at step %d was written with seed %s and batch size %s; this run has %s and '
        '%s, so its data order and random draws differ from the uninterrupted run.',
        step,
        meta.get('seed'),
        meta.get('batch_size'),
        config.seed,
        training.batch_size,
      )
    state = TrainState(
      step=jax.device_put(jnp.asarray(step, jnp.int32), replicated),
      params=items['params'],
      ema_params=items['ema_params'],
      opt_state=items['opt_state'],
    )
    logging.info('Resumed from the checkpoint at step %d.', step)
  start_step = int(state.step)

  # ---------------------------------------------------------------------------------------------
  # Compile the update steps and the sampler of the sample grids.
  # ---------------------------------------------------------------------------------------------
  # Compiled once: every call, the shorter ones that end where the loop must act (`call_length`)
  # too, has its batches padded to steps_per_call and the number of steps as an argument.
  train_call = jit_train_call(config, model, diffusion, tx, schedule, mesh, state_sharding)
  all_finite = jax.jit(_all_finite)
  size, channels = config.data.image_size, config.data.num_channels
  sample_init = samplers.create_init_fn(diffusion, mesh)
  grid_sampler = samplers.Sampler.from_config(config)
  sample_chunk = samplers.create_chunk_fn(diffusion, model, mesh, grid_sampler)

  writer = tf_support.create_metric_writer(str(workdir_path), just_logging=jax.process_index() > 0)
  if start_step == 0:
    writer.write_hparams(_flatten(config.to_dict()))

  def save_checkpoint(state: TrainState):
    step = int(state.step)
    if not bool(all_finite(state.params)):
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
        'batch_size': training.batch_size,
        'examples_seen': step * training.batch_size,
      },
    )

  def write_samples(state: TrainState):
    step = int(state.step)
    images = samplers.draw_samples(
      sample_chunk,
      sample_init,
      state.ema_params,
      batch_rng=lambda _: sample_rng,
      num_samples=training.num_sample_images,
      batch_size=training.num_sample_images,
      image_shape=(size, size, channels),
      num_steps=grid_sampler.num_steps(diffusion.num_timesteps),
    )
    grid = image_io.image_grid(images)
    if jax.process_index() == 0:
      path = workdir_path / 'samples' / f'step_{step:08d}.png'
      image_io.save_png(path, grid, upscale=image_io.upscale_factor(size))
      logging.info('Wrote samples of the EMA model (sampler %s) to %s', grid_sampler.tag, path)
    writer.write_images(step, {'samples': grid[None]})

  # ---------------------------------------------------------------------------------------------
  # Train.
  # ---------------------------------------------------------------------------------------------
  preemption = _PreemptionWatch()
  # Two calls' worth of batches read ahead on the host.
  batches = input_pipeline.train_batches(
    config,
    global_batch_size=training.batch_size,
    start_step=start_step,
    seed=config.seed,
    buffer_size=2 * training.steps_per_call,
  )
  # (n, metrics [k]) of each call since the last flush: its first n values are of its n steps.
  pending_metrics: list[tuple[int, dict[str, jax.Array]]] = []
  last_log_time, last_log_step = time.time(), start_step

  def call_batches(step: int) -> tuple[jax.Array, int]:
    """The batches of the call that starts after `step` updates, on the devices, and their number.

    Returns (images, n): n = `call_length(step)`, and images uint8 [k, B, H, W, C] sharded over
    B, the batches of steps step, ..., step + n - 1, then k - n of zeros (k = steps_per_call:
    one shape for every call). The transfer does not wait for the call that is running: sent
    right after that call is dispatched, it overlaps that call's compute.
    """
    num_steps = call_length(step, training)
    local_images = []
    for expected_step in range(step, step + num_steps):
      batch_step, images = next(batches)
      assert batch_step == expected_step, (batch_step, expected_step)
      local_images.append(images)
    local_images += [np.zeros_like(local_images[0])] * (training.steps_per_call - num_steps)
    images = jax.make_array_from_process_local_data(batches_sharding, np.stack(local_images))
    return images, num_steps

  def flush_metrics(step: int):
    """Checks that the loss of every step since the last flush is finite, and logs their mean."""
    nonlocal last_log_time, last_log_step
    if not pending_metrics:
      return
    host_metrics = jax.device_get(pending_metrics)
    pending_metrics.clear()
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
    eta = (training.num_train_steps - step) / max(steps_per_sec, 1e-9)
    logging.info(
      'step %d/%d  loss %.5f  grad_norm %.3f  lr %.2e  %.2f steps/s  ETA %s',
      step,
      training.num_train_steps,
      summary['loss'],
      summary['grad_norm'],
      summary['learning_rate'],
      steps_per_sec,
      _format_seconds(eta),
    )
    last_log_time, last_log_step = now, step

  try:
    step, num_calls = start_step, 0
    if step < training.num_train_steps:
      images, num_steps = call_batches(step)
    while step < training.num_train_steps:
      # Dispatched: it runs while the host goes on.
      state, metrics = train_call(state, images, num_steps)
      pending_metrics.append((num_steps, metrics))
      step += num_steps
      num_calls += 1
      done = step == training.num_train_steps
      if not done:
        # The next call's input, sent before waiting on this call.
        images, num_steps = call_batches(step)
      preempted = preemption.reached(num_calls)
      if step % training.log_every_steps == 0 or done or preempted:
        flush_metrics(step)
      if step % training.checkpoint_every_steps == 0 or done or preempted:
        flush_metrics(step)
        save_checkpoint(state)
      if preempted:
        logging.warning('Asked to stop (SIGTERM): saved the checkpoint at step %d.', step)
        break
      if training.sample_every_steps and (step % training.sample_every_steps == 0 or done):
        write_samples(state)
  finally:
    batches.close()
    preemption.close()
    manager.wait_until_finished()
    manager.close()
    writer.flush()
  return state


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

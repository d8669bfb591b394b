"""The train step's parts against independent float64 NumPy references: the loss it reports and
differentiates (L_simple averaged over batch, height, width and channels), the optimizer
(global-norm clipping, then Adam with the configured constants and the warmup schedule), the
random flip, the EMA recurrence with the configured decay, and the labels of a class-conditional
step with their dropout. Each uses constants unlike the
defaults, so that a constant that does not reach its place fails the test."""

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import tiny_digits_config, train_step_setup

from ddpm_jax import diffusion as diffusion_lib
from ddpm_jax import models, train


def test_optimizer_clips_the_global_norm_then_applies_adam_with_the_warmup():
  config = tiny_digits_config(
    10,
    **{
      'training.learning_rate': 0.1,
      'training.warmup_steps': 4,
      'training.grad_clip': 0.5,
      'training.adam_b1': 0.8,
      'training.adam_b2': 0.95,
      'training.adam_eps': 1e-3,
    },
  )
  tx, schedule = train.create_optimizer(config)
  rng = np.random.default_rng(0)
  params = {'a': rng.standard_normal((3, 4)), 'b': rng.standard_normal(5)}
  # Gradients of global norm 2.0 (clipped to 0.5), 0.2 (kept), 3.0, ...
  norms = [2.0, 0.2, 3.0, 0.4, 1.0, 0.05]
  grads = []
  for norm in norms:
    g = {k: rng.standard_normal(v.shape) for k, v in params.items()}
    scale = norm / np.sqrt(sum(np.sum(x**2) for x in g.values()))
    grads.append({k: v * scale for k, v in g.items()})

  # float64 reference (Kingma & Ba, Algorithm 1, after clip-by-global-norm).
  b1, b2, eps, lr, warmup, clip = 0.8, 0.95, 1e-3, 0.1, 4, 0.5
  expected = {k: v.copy() for k, v in params.items()}
  m = {k: np.zeros_like(v) for k, v in params.items()}
  v2 = {k: np.zeros_like(v) for k, v in params.items()}
  for step, g in enumerate(grads):
    norm = np.sqrt(sum(np.sum(x**2) for x in g.values()))
    g = {k: x * min(1.0, clip / norm) for k, x in g.items()}
    rate = lr * min(step / warmup, 1.0)
    assert np.isclose(float(schedule(step)), rate)
    for k in params:
      m[k] = b1 * m[k] + (1 - b1) * g[k]
      v2[k] = b2 * v2[k] + (1 - b2) * g[k] ** 2
      m_hat, v_hat = m[k] / (1 - b1 ** (step + 1)), v2[k] / (1 - b2 ** (step + 1))
      expected[k] = expected[k] - rate * m_hat / (np.sqrt(v_hat) + eps)

  actual = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
  state = tx.init(actual)
  for g in grads:
    updates, state = tx.update(jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), g), state)
    actual = jax.tree.map(lambda p, u: p + u, actual, updates)
  for k in params:
    # The moves are ~0.1 per step; float32 keeps ~1e-7 of them.
    np.testing.assert_allclose(actual[k], expected[k], rtol=0, atol=1e-5, err_msg=k)


def test_cosine_decay_after_the_warmup():
  # Expected, written out: lr * step / warmup during the warmup, then
  # lr * (1 + cos(pi * (step - warmup) / (steps - warmup))) / 2, 0 at the last step.
  config = tiny_digits_config(
    100,
    **{'training.learning_rate': 0.1, 'training.warmup_steps': 20, 'training.lr_decay': 'cosine'},
  )
  _, schedule = train.create_optimizer(config)
  expected = {0: 0.0, 10: 0.05, 20: 0.1, 40: 0.05 * (1 + np.cos(np.pi / 4)), 60: 0.05, 100: 0.0}
  for step, rate in expected.items():
    np.testing.assert_allclose(float(schedule(step)), rate, rtol=1e-6, atol=1e-9, err_msg=step)


def test_flip_mirrors_along_the_width():
  images = np.arange(16 * 3 * 5, dtype=np.uint8).reshape(16, 3, 5, 1)  # H != W, no symmetry.
  x = np.asarray(train.preprocess(jnp.asarray(images), jax.random.key(0), random_flip=True))
  scaled = images.astype(np.float64) / 127.5 - 1  # [0, 255] -> [-1, 1].
  flipped = [np.allclose(x[i], scaled[i, :, ::-1], atol=1e-6) for i in range(16)]
  kept = [np.allclose(x[i], scaled[i], atol=1e-6) for i in range(16)]
  assert all(f != k for f, k in zip(flipped, kept, strict=True))  # Each image one or the other.
  assert 0 < sum(flipped) < 16
  np.testing.assert_allclose(
    train.preprocess(jnp.asarray(images), jax.random.key(0), random_flip=False), scaled, atol=1e-6
  )


def test_ema_follows_the_recurrence_with_the_configured_decay():
  # e_0 = p_0; the first step copies (decay 1e-10, as the original); then
  # e_k = d e_{k-1} + (1 - d) p_k with the configured d, here 0.5 (the default is 0.9999).
  config = tiny_digits_config(
    5, **{'training.ema_decay': 0.5, 'training.warmup_steps': 1, 'training.learning_rate': 1e-2}
  )
  _, _, state, step = train_step_setup(config)
  images = jnp.asarray(
    np.random.default_rng(0).integers(0, 256, (config.training.batch_size, 8, 8, 1)), jnp.uint8
  )

  expected = jax.tree.map(lambda p: np.asarray(p, np.float64), state.params)
  for k in range(5):
    state, _ = step(state, {'image': images})
    decay = 1e-10 if k == 0 else 0.5
    expected = jax.tree.map(
      lambda e, p, d=decay: d * e + (1 - d) * np.asarray(p, np.float64), expected, state.params
    )
  moved = max(
    float(np.abs(np.asarray(e) - np.asarray(p)).max())
    for e, p in zip(jax.tree.leaves(state.ema_params), jax.tree.leaves(state.params), strict=True)
  )
  assert moved > 1e-3  # The params moved, so the decay matters.
  for path, actual in jax.tree.leaves_with_path(state.ema_params):
    reference = jax.tree_util.tree_flatten_with_path(expected)[0]
    np.testing.assert_allclose(
      actual, dict(reference)[path], rtol=1e-6, atol=1e-7, err_msg=jax.tree_util.keystr(path)
    )


class _LinearEps(nn.Module):
  """eps_theta(x_t, t) = w_c x_t + b_c per channel c: a network whose output is known in closed
  form. Each call hands (x_t, t) to `record` on the host."""

  record: Callable[[jax.Array, jax.Array], None]

  @nn.compact
  def __call__(self, x, t, train):
    del train
    jax.debug.callback(self.record, x, t)
    w = self.param('w', nn.initializers.zeros, (x.shape[-1],))
    b = self.param('b', nn.initializers.zeros, (x.shape[-1],))
    return w * x + b


def test_loss_is_l_simple_averaged_over_batch_height_width_and_channels():
  # Paper eq. (14), L_simple = E_{t, x_0, eps} ||eps - eps_theta(x_t, t)||^2, as the original:
  # one mean over all of [B, H, W, C], every example weighted alike. The reference is float64
  # NumPy from the inputs the network saw: x_t and t, with eps recovered from eq. (4),
  # eps = (x_t - sqrt(abar_t) x_0) / sqrt(1 - abar_t), and the paper's linear betas. A sum over
  # the batch would multiply the loss by 8, a sum over channels by 3, and weights such as
  # (t + 1) / mean(t + 1) move it by 15%; the gradient norm the step reports checks that the
  # same loss is the one differentiated.
  config = tiny_digits_config(1, **{'data.random_flip': False})
  seen = []
  model = _LinearEps(record=lambda x, t: seen.append((np.asarray(x), np.asarray(t))))
  diffusion = diffusion_lib.GaussianDiffusion.from_config(config.diffusion)
  tx, schedule = train.create_optimizer(config)
  params = {'w': jnp.array([0.5, -0.3, 0.8]), 'b': jnp.array([0.1, -0.2, 0.05])}
  state = train.TrainState(
    step=jnp.zeros((), jnp.int32), params=params, ema_params=params, opt_state=tx.init(params)
  )
  # B, H, W, C = 8, 4, 6, 3: C > 1 and H != W, so that no two axes can be confused.
  images = np.random.default_rng(0).integers(0, 256, (8, 4, 6, 3), dtype=np.uint8)
  _, metrics = jax.jit(
    train.create_train_step(config, model, diffusion, tx, schedule, ema_starts_as_copy=True)
  )(state, {'image': jnp.asarray(images)})
  assert seen
  x_t, t = seen[-1][0].astype(np.float64), seen[-1][1]
  assert len(set(t.tolist())) > 1  # Examples at different t, so their losses differ.

  num_steps = config.diffusion.num_diffusion_timesteps
  betas = np.linspace(1e-4, 0.02, num_steps, dtype=np.float64)  # The paper's, at T = 100 here.
  abar = np.cumprod(1.0 - betas)[t][:, None, None, None]
  x_0 = images.astype(np.float64) / 127.5 - 1.0
  eps = (x_t - np.sqrt(abar) * x_0) / np.sqrt(1.0 - abar)  # Eq. (4) solved for eps.
  w, b = np.array([0.5, -0.3, 0.8]), np.array([0.1, -0.2, 0.05])
  error = eps - (w * x_t + b)
  expected_loss = np.mean(error**2)  # Over B, H, W and C at once.
  grad_w = np.mean(-2.0 * error * x_t, axis=(0, 1, 2)) / 3  # d/dw_c of the mean over 3 channels.
  grad_b = np.mean(-2.0 * error, axis=(0, 1, 2)) / 3
  expected_grad_norm = np.sqrt(np.sum(grad_w**2) + np.sum(grad_b**2))

  # Measured on CPU: 9e-8 (loss) and 5e-7 (gradient norm) relative, with t from 0 to 95 (eps
  # recovered at t = 0 through 1 / sqrt(1 - abar_0) = 100 times the float32 rounding of x_t).
  np.testing.assert_allclose(metrics['loss'], expected_loss, rtol=1e-5)
  np.testing.assert_allclose(metrics['grad_norm'], expected_grad_norm, rtol=1e-5)


class _LabelRecorder(nn.Module):
  """A conditional network of zeros that hands the labels it is given to `record`."""

  record: Callable[[jax.Array], None]
  num_classes: int = 10

  @nn.compact
  def __call__(self, x, t, y, train):
    del t, train
    jax.debug.callback(self.record, y)
    return x * self.param('w', nn.initializers.zeros, ())


@pytest.mark.parametrize('rate', [0.0, 0.3])
def test_train_step_feeds_the_labels_with_dropout_to_the_null_class(rate):
  # Expected: the network sees each batch label unchanged, or the null label 10 with probability
  # `training.label_dropout` (classifier-free guidance's training, Ho & Salimans 2021, Alg. 1):
  # of 4,000 labels the dropped share is the rate within 5 binomial standard deviations.
  config = tiny_digits_config(
    1, **{'model.num_classes': 10, 'training.label_dropout': rate, 'training.batch_size': 4000}
  )
  seen = []
  model = _LabelRecorder(record=lambda y: seen.append(np.asarray(y)))
  diffusion = diffusion_lib.GaussianDiffusion.from_config(config.diffusion)
  tx, schedule = train.create_optimizer(config)
  params = {'w': jnp.zeros(())}
  state = train.TrainState(
    step=jnp.zeros((), jnp.int32), params=params, ema_params=params, opt_state=tx.init(params)
  )
  rng = np.random.default_rng(0)
  batch = {
    'image': jnp.asarray(rng.integers(0, 256, (4000, 2, 2, 1)), jnp.uint8),
    'label': jnp.asarray(rng.integers(0, 10, 4000), jnp.int32),
  }
  jax.jit(train.create_train_step(config, model, diffusion, tx, schedule, ema_starts_as_copy=True))(
    state, batch
  )
  labels = seen[-1]
  dropped = labels == 10
  np.testing.assert_array_equal(labels[~dropped], np.asarray(batch['label'])[~dropped])
  assert abs(dropped.mean() - rate) <= 5 * np.sqrt(rate * (1 - rate) / 4000)
  if rate:
    assert dropped.any()


def test_state_sharding_splits_ema_and_adam_moments_and_replicates_params():
  # Over 8 devices (an abstract mesh: only shapes and names): each EMA array and Adam moment split
  # along its first axis that 8 divides, the last axis only where no other is, and left whole
  # where none is; the params and the step replicated. Expected shards from the shapes by hand.
  config = tiny_digits_config(1)
  model = models.create_model(config)
  tx, _ = train.create_optimizer(config)
  shapes = jax.eval_shape(
    lambda rng: train.create_train_state(config, model, tx, rng), jax.random.key(0)
  )
  mesh = jax.sharding.AbstractMesh((8,), ('data',))
  sharding = train.state_sharding(shapes, mesh)
  expected = {(3, 3, 1, 32): (3, 3, 1, 4), (3, 3, 32, 1): (3, 3, 4, 1), (128, 32): (16, 32)}
  expected |= {(3, 3, 32, 64): (3, 3, 4, 64), (32,): (4,), (1,): (1,), (): ()}

  def parts(name):  # (shape, the shape of one device's part) of each array of the item.
    shardings, arrays = (
      jax.tree.leaves(getattr(sharding, name)),
      jax.tree.leaves(getattr(shapes, name)),
    )
    return [(x.shape, s.shard_shape(x.shape)) for s, x in zip(shardings, arrays, strict=True)]

  for name in ('ema_params', 'opt_state'):
    assert len(parts(name)) == len(jax.tree.leaves(getattr(shapes, name))) > 8
    for shape, part in parts(name):
      if shape in expected:
        assert part == expected[shape], (name, shape)
      else:  # Shapes not listed: split 8 ways along one axis, or whole when 8 divides none.
        assert np.prod(part) * (8 if any(d % 8 == 0 for d in shape) else 1) == np.prod(shape)
  assert all(part == shape for shape, part in parts('params') + parts('step'))

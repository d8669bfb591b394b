"""The train step's parts against independent float64 NumPy references: the optimizer (global-norm
clipping, then Adam with the configured constants and the warmup schedule), the random flip,
and the EMA recurrence with the configured decay. Each uses constants unlike the defaults, so
that a constant that does not reach its place fails the test."""

import jax
import jax.numpy as jnp
import numpy as np
from helpers import tiny_digits_config

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
  model = models.create_model(config)
  diffusion = diffusion_lib.GaussianDiffusion.from_config(config.diffusion)
  tx, schedule = train.create_optimizer(config)
  state = train.create_train_state(config, model, tx, jax.random.key(0))
  step = jax.jit(train.create_train_step(config, model, diffusion, tx, schedule))
  images = jnp.asarray(
    np.random.default_rng(0).integers(0, 256, (config.training.batch_size, 8, 8, 1)), jnp.uint8
  )

  expected = jax.tree.map(lambda p: np.asarray(p, np.float64), state.params)
  for k in range(5):
    state, _ = step(state, images)
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

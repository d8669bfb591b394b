"""Tests of class-conditional sampling and training (`ddpm_jax/conditioning.py`): the guidance
combination and label dropout against float64 references, every sampler on an exact network,
and the checks of the settings."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tqdm
from helpers import tiny_digits_config

from ddpm_jax import conditioning, sample_loop, samplers
from ddpm_jax import diffusion as diffusion_lib
from ddpm_jax import mesh as mesh_lib

# ----------------------------------------------------------------------------------------------
# The guidance combination.
# ----------------------------------------------------------------------------------------------


def test_guide_is_ho_and_salimans_combination_on_the_mean_output_only():
  # Ho & Salimans 2021, eq. (6): eps~ = (1 + w) eps_c - w eps_u; here s = 1 + w, so the float64
  # reference is (1 + w) cond - w uncond on the first C channels; the variance channels (the
  # second C of a learned variance) are the conditional output's.
  rng = np.random.default_rng(0)
  cond, uncond = rng.normal(size=(2, 3, 4, 4, 6))
  for w in (0.0, 0.5, 2.0, -1.0):
    out = conditioning.guide(jnp.asarray(cond), jnp.asarray(uncond), 1.0 + w, num_channels=3)
    expected_mean = (1.0 + w) * cond[..., :3] - w * uncond[..., :3]
    np.testing.assert_allclose(out[..., :3], expected_mean, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(out[..., 3:], np.float32(cond[..., 3:]))


@pytest.mark.parametrize('mean_type', ['xstart', 'xprev'])
def test_guiding_any_mean_output_equals_guiding_eps(mean_type):
  # The module docstring's claim: each mean output is an affine function of eps at (x_t, t), so
  # guiding it equals guiding eps and converting. Float64 NumPy, from the paper's eq. (4) (x_0
  # from eps) and eq. (7) (the posterior mean), on the linear schedule at T = 1000.
  betas = np.linspace(1e-4, 0.02, 1000)
  abar = np.cumprod(1 - betas)
  abar_prev = np.append(1.0, abar[:-1])
  t = np.array([0, 10, 500, 999])[:, None]
  rng = np.random.default_rng(1)
  x_t, eps_c, eps_u = rng.normal(size=(3, 4, 5))

  def from_eps(eps):
    x0 = (x_t - np.sqrt(1 - abar[t]) * eps) / np.sqrt(abar[t])
    if mean_type == 'xstart':
      return x0
    coef1 = betas[t] * np.sqrt(abar_prev[t]) / (1 - abar[t])
    coef2 = (1 - abar_prev[t]) * np.sqrt(1 - betas[t]) / (1 - abar[t])
    return coef1 * x0 + coef2 * x_t

  s = 3.0
  guided = conditioning.guide(jnp.asarray(from_eps(eps_c)), jnp.asarray(from_eps(eps_u)), s, 5)
  expected = from_eps(eps_u + s * (eps_c - eps_u))
  # float32 arithmetic on values up to ~150 (x_0 from eps at t = 999): 1e-5 relative.
  np.testing.assert_allclose(guided, expected, rtol=1e-5, atol=1e-4)


def test_guided_model_fn_makes_one_call_on_the_doubled_batch():
  # Expected: one network call on [x; x], [t; t], [labels; K] (the null label is K = 10 here),
  # and the result guide(first half, second half); s = 1 calls the network once on the batch.
  calls = []

  def apply(x, t, y):
    calls.append((x.shape, np.asarray(t), np.asarray(y)))
    return x * (1.0 + y[:, None, None, None].astype(jnp.float32))

  x = jnp.asarray(np.random.default_rng(2).normal(size=(3, 2, 2, 1)), jnp.float32)
  t, labels = jnp.array([5, 6, 7]), jnp.array([0, 4, 9])
  out = conditioning.guided_model_fn(apply, labels, 2.5, num_classes=10)(x, t)
  assert len(calls) == 1
  shape, seen_t, seen_y = calls[0]
  assert shape == (6, 2, 2, 1)
  np.testing.assert_array_equal(seen_t, [5, 6, 7, 5, 6, 7])
  np.testing.assert_array_equal(seen_y, [0, 4, 9, 10, 10, 10])
  cond, uncond = (
    np.asarray(x) * (1.0 + np.array([0, 4, 9]))[:, None, None, None],
    np.asarray(x) * 11,
  )
  np.testing.assert_allclose(out, uncond + 2.5 * (cond - uncond), rtol=1e-6)

  calls.clear()
  conditioning.guided_model_fn(apply, labels, 1.0, num_classes=10)(x, t)
  assert [c[0] for c in calls] == [(3, 2, 2, 1)]


def test_drop_labels_replaces_each_label_by_the_null_class_at_the_rate():
  # Expected: a label is either kept or K; the dropped share of 100,000 labels is the rate
  # within 5 binomial standard deviations (sqrt(p (1 - p) / n) = 0.00095 at p = 0.1).
  labels = jnp.asarray(np.random.default_rng(3).integers(0, 10, 100_000), jnp.int32)
  for rate in (0.0, 0.1, 0.5):
    out = np.asarray(conditioning.drop_labels(labels, jax.random.key(4), rate, num_classes=10))
    dropped = out == 10
    np.testing.assert_array_equal(out[~dropped], np.asarray(labels)[~dropped])
    assert abs(dropped.mean() - rate) <= 5 * np.sqrt(rate * (1 - rate) / labels.size)


def test_labels_take_the_classes_in_turn_whatever_the_batches():
  classes = conditioning.Conditioning((3, 5, 7), 2.0)
  np.testing.assert_array_equal(classes.labels(0, 7), [3, 5, 7, 3, 5, 7, 3])
  np.testing.assert_array_equal(classes.labels(4, 3), [5, 7, 3])  # Samples 4, 5, 6.
  assert classes.tag == 'classes3-5-7_guidance2'
  assert conditioning.Conditioning((7,), 1.5).tag == 'class7_guidance1.5'
  assert conditioning.Conditioning(tuple(range(10)), 3.0, every_class=True).tag == 'guidance3'
  assert conditioning.Conditioning((0, 1), 3.0).tag == 'classes0-1_guidance3'


# ----------------------------------------------------------------------------------------------
# Every sampler on an exact network: one point per class.
# ----------------------------------------------------------------------------------------------

# A data set of one 4x4 grey image per class, far apart in [-1, 1].
POINTS = np.stack([np.full((4, 4, 1), v, np.float32) for v in (-0.8, -0.3, 0.2, 0.7)])
POINTS[1, :2] = 0.6  # Not constant images: the network must get every pixel right.


class ExactPoints(nn.Module):
  """The exact denoiser of a data set of one point per class, as `mean_type` predicts it.

  For label y < K, p(x_0 | y) is the point c_y, so E[x_0 | x_t, y] = c_y; for the null label K,
  p(x_0) is the uniform mixture of the points, whose posterior weights are the softmax of
  -||x_t - sqrt(abar_t) c_k||^2 / (2 (1 - abar_t)). The output is the mean type's
  parameterization of that x_0 at (x_t, t): eps = (x_t - sqrt(abar) x_0) / sqrt(1 - abar), or
  x_0, or the posterior mean (eq. 7), or v = sqrt(abar) eps - sqrt(1 - abar) x_0.
  """

  diffusion: diffusion_lib.GaussianDiffusion
  num_classes: int = len(POINTS)

  @nn.compact
  def __call__(self, x, t, y, *, train):
    del train
    d = self.diffusion
    points = jnp.asarray(POINTS)
    abar = d.alphas_cumprod[t][:, None, None, None]
    distances = jnp.sum((x[:, None] - jnp.sqrt(abar)[:, None] * points) ** 2, axis=(2, 3, 4))
    weights = jax.nn.softmax(-distances / (2 * (1 - abar[:, 0, 0])), axis=1)
    mixture = jnp.einsum('bk,khwc->bhwc', weights, points)
    x0 = jnp.where(
      (y < self.num_classes)[:, None, None, None], points[y % self.num_classes], mixture
    )
    eps = (x - jnp.sqrt(abar) * x0) / jnp.sqrt(1 - abar)
    if d.model_mean_type == 'xstart':
      return x0
    if d.model_mean_type == 'xprev':
      return d.q_posterior_mean_variance(x0, x, t)[0]
    if d.model_mean_type == 'v':
      return jnp.sqrt(abar) * eps - jnp.sqrt(1 - abar) * x0
    return eps


def _samplers():
  return [samplers.Ancestral(), samplers.DDIM(20), samplers.Respaced(50), samplers.DPMSolver(20)]


@pytest.mark.parametrize('mean_type', [m for m in diffusion_lib.MODEL_MEAN_TYPES])
def test_every_sampler_lands_on_the_requested_class_point(mean_type):
  # Expected: each sample of label y is the point c_y (within 0.02 of [-1, 1], the 8-bit step is
  # 0.008), for every sampler, with and without guidance, through the compiled chunked loop of
  # --mode=sample (`create_chunk_fn` and `draw_samples` with the classes in turn).
  betas = diffusion_lib.get_beta_schedule(
    'cosine', beta_start=0, beta_end=0, num_diffusion_timesteps=200
  )
  diffusion = diffusion_lib.GaussianDiffusion.create(
    betas, model_mean_type=mean_type, model_var_type='fixedsmall', loss_type='mse'
  )
  model = ExactPoints(diffusion)
  mesh = mesh_lib.create_mesh()
  init = sample_loop.create_init_fn(diffusion, mesh)
  classes = conditioning.Conditioning((2, 0, 3, 1), 1.0)
  for sampler in _samplers():
    for scale in (1.0, 3.0):
      classes = conditioning.Conditioning(classes.classes, scale)
      run_chunk = sample_loop.create_chunk_fn(diffusion, model, mesh, sampler, scale)
      images = sample_loop.draw_samples(
        run_chunk,
        init,
        {},
        batch_rng=sample_loop.seed_batch_rng(0),
        num_samples=8,
        batch_size=8,
        image_shape=(4, 4, 1),
        num_steps=sampler.num_steps(diffusion.num_timesteps),
        classes=classes,
      )
      x0 = images.astype(np.float64) / 127.5 - 1
      expected = POINTS[classes.labels(0, 8)]
      np.testing.assert_allclose(x0, expected, atol=0.02, err_msg=f'{sampler.tag} s={scale}')


# ----------------------------------------------------------------------------------------------
# The checks.
# ----------------------------------------------------------------------------------------------


def _config(**overrides):
  return tiny_digits_config(1, **overrides)


@pytest.mark.parametrize(
  ('overrides', 'message'),
  [
    ({'sampling.guidance_scale': 2.0}, 'for a class-conditional model'),
    ({'sampling.class_labels': (3,)}, 'for a class-conditional model'),
    ({'model.num_classes': 10, 'sampling.class_labels': (10,)}, r'classes in \[0, 10\)'),
    ({'model.num_classes': 10, 'sampling.class_labels': ()}, r'classes in \[0, 10\)'),
    ({'model.num_classes': 10, 'sampling.guidance_scale': -1.0}, 'guidance_scale must be'),
  ],
)
def test_check_sampling_names_the_field(overrides, message):
  with pytest.raises(ValueError, match=message):
    conditioning.check_sampling(_config(**overrides))


def test_check_training_refuses_a_label_dropout_outside_0_1():
  for rate in (-0.1, 1.0, True):
    with pytest.raises(ValueError, match='label_dropout'):
      conditioning.check_training(_config(**{'training.label_dropout': rate}))


def test_chunked_loop_passes_the_labels_to_every_chunk():
  # The labels reach the network of each chunk, however the steps are split: the samples of a
  # loop run in chunks of 1, 2, ... steps equal those of one call (bit for bit).
  betas = diffusion_lib.get_beta_schedule(
    'cosine', beta_start=0, beta_end=0, num_diffusion_timesteps=50
  )
  diffusion = diffusion_lib.GaussianDiffusion.create(
    betas, model_mean_type='eps', model_var_type='fixedsmall', loss_type='mse'
  )
  model = ExactPoints(diffusion)
  mesh = mesh_lib.create_mesh()
  run_chunk = sample_loop.create_chunk_fn(diffusion, model, mesh, samplers.DPMSolver(10), 2.0)
  x, loop_rng = sample_loop.create_init_fn(diffusion, mesh)((4, 4, 4, 1), jax.random.key(0))
  labels = sample_loop.sharded_like(x, np.array([0, 1, 2, 3], np.int32))
  whole, _ = run_chunk({}, x, jnp.zeros_like(x), loop_rng, np.int32(0), np.int32(10), labels)
  with tqdm.tqdm(disable=True) as bar:
    chunked, _ = sample_loop.ChunkedLoop(run_chunk, {}, bar).run(x, loop_rng, 0, 10, labels=labels)
  np.testing.assert_array_equal(chunked, whole)

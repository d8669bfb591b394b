"""Tests of ddpm_jax.diffusion against float64 NumPy references written from the paper.

The references below (`Ref*`, `*_reference`) are written from the equations of Ho et al. 2020
(and improved DDPM, DDIM and DPM-Solver++ for their parts) without calling the code under test;
float32 results must match them to 1e-5 relative (1e-4 for bits/dim terms), as the issues
require. DPM-Solver++ is also checked against diffusers' DPMSolverMultistepScheduler.
"""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from scipy import special

from ddpm_jax import diffusion as dm

T = 1000
SCHEDULE_ARGS = dict(beta_start=1e-4, beta_end=0.02, num_diffusion_timesteps=T)
SHAPE = (4, 6, 6, 3)


def rel_err(actual, expected):
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  return np.linalg.norm(actual - expected) / max(np.linalg.norm(expected), 1e-30)


def make_diffusion(mean='eps', var='fixedlarge', loss=None, schedule='linear', num_steps=T):
  if loss is None:
    loss = 'kl' if var.startswith('learned') else 'mse'
  betas = dm.get_beta_schedule(
    schedule, beta_start=1e-4, beta_end=0.02, num_diffusion_timesteps=num_steps
  )
  return dm.GaussianDiffusion.create(
    betas, model_mean_type=mean, model_var_type=var, loss_type=loss
  )


class Ref:
  """Float64 reference of the DDPM quantities, from the paper's equations."""

  def __init__(self, betas):
    self.betas = np.asarray(betas, np.float64)
    self.abar = np.cumprod(1.0 - self.betas)
    self.abar_prev = np.concatenate([[1.0], self.abar[:-1]])
    # Eq. (7): mu_tilde_t = post_coef1 x_0 + post_coef2 x_t.
    self.post_coef1 = np.sqrt(self.abar_prev) * self.betas / (1 - self.abar)
    self.post_coef2 = np.sqrt(1 - self.betas) * (1 - self.abar_prev) / (1 - self.abar)
    # Eq. (7): beta_tilde_t = (1 - abar_{t-1}) / (1 - abar_t) beta_t.
    self.post_var = (1.0 - self.abar_prev) / (1.0 - self.abar) * self.betas

  def b(self, table, t):
    return table[t][:, None, None, None]

  def q_sample(self, x0, t, noise):  # Eq. (4).
    return np.sqrt(self.b(self.abar, t)) * x0 + np.sqrt(1.0 - self.b(self.abar, t)) * noise

  def velocity(self, x0, t, noise):  # Salimans & Ho 2022, sec. 4: v = alpha_t eps - sigma_t x0.
    return np.sqrt(self.b(self.abar, t)) * noise - np.sqrt(1.0 - self.b(self.abar, t)) * x0

  def post_mean(self, x0, xt, t):  # Eq. (7): mu_tilde_t.
    return self.b(self.post_coef1, t) * x0 + self.b(self.post_coef2, t) * xt

  def post_logvar_clipped(self, t):
    clipped = self.post_var.copy()
    clipped[0] = self.post_var[1]
    return self.b(np.log(clipped), t)

  def model_logvar(self, var_type, t, var_out=None):
    if var_type == 'fixedlarge':
      v = self.betas.copy()
      v[0] = self.post_var[1]
      return self.b(np.log(v), t)
    if var_type == 'fixedsmall':
      return self.post_logvar_clipped(t)
    if var_type == 'learned':
      return var_out
    frac = (var_out + 1) / 2  # Improved DDPM eq. (15).
    return frac * self.b(np.log(self.betas), t) + (1 - frac) * self.post_logvar_clipped(t)

  def pred_x0(self, mean_type, xt, t, out, clip):
    abar = self.b(self.abar, t)
    if mean_type == 'eps':  # Eq. (4) solved for x0.
      x0 = (xt - np.sqrt(1 - abar) * out) / np.sqrt(abar)
    elif mean_type == 'xstart':
      x0 = out
    elif mean_type == 'v':  # Salimans & Ho 2022, sec. 4: x0 = alpha_t x_t - sigma_t v.
      x0 = np.sqrt(abar) * xt - np.sqrt(1 - abar) * out
    else:  # Eq. (7) solved for x0.
      x0 = (out - self.b(self.post_coef2, t) * xt) / self.b(self.post_coef1, t)
    return np.clip(x0, -1, 1) if clip else x0

  def p_mean_var(self, mean_type, var_type, xt, t, model_out, clip):
    c = xt.shape[-1]
    out, var_out = model_out[..., :c], model_out[..., c:]
    x0 = self.pred_x0(mean_type, xt, t, out, clip)
    mean = out if mean_type == 'xprev' else self.post_mean(x0, xt, t)
    logvar = self.model_logvar(var_type, t, var_out)
    return mean, np.broadcast_to(logvar, xt.shape), x0

  @staticmethod
  def kl(m1, lv1, m2, lv2):  # KL between Gaussians.
    return 0.5 * (-1 + lv2 - lv1 + np.exp(lv1 - lv2) + (m1 - m2) ** 2 * np.exp(-lv2))

  @staticmethod
  def decoder_logprob(x, mean, logvar):
    """Eq. (13) with the original code's tanh CDF approximation, in float64."""

    def cdf(z):
      return 0.5 * (1 + np.tanh(np.sqrt(2 / np.pi) * (z + 0.044715 * z**3)))

    inv_std = np.exp(-0.5 * logvar)
    hi = cdf(inv_std * (x - mean + 1 / 255))
    lo = cdf(inv_std * (x - mean - 1 / 255))
    return np.where(
      x < -0.999,
      np.log(np.maximum(hi, 1e-12)),
      np.where(x > 0.999, np.log(np.maximum(1 - lo, 1e-12)), np.log(np.maximum(hi - lo, 1e-12))),
    )

  def vb_term(self, mean_type, var_type, x0, xt, t, model_out, clip):
    mean, logvar, pred_x0 = self.p_mean_var(mean_type, var_type, xt, t, model_out, clip)
    true_mean = self.post_mean(x0, xt, t)
    true_logvar = np.broadcast_to(self.post_logvar_clipped(t), xt.shape)
    kl = self.kl(true_mean, true_logvar, mean, logvar).mean(axis=(1, 2, 3)) / np.log(2)
    nll = -self.decoder_logprob(x0, mean, logvar).mean(axis=(1, 2, 3)) / np.log(2)
    return np.where(t == 0, nll, kl), pred_x0


def quantized_images(rng, shape=SHAPE):
  """Images on the 256-level grid in [-1, 1], as the data are, including both edge values."""
  x = rng.integers(0, 256, size=shape).astype(np.float64) / 127.5 - 1.0
  x.flat[0], x.flat[1] = -1.0, 1.0
  return x


def linear_model(rng, channels_out, channels_in=SHAPE[-1]):
  """A smooth model_fn (x, t) -> output with a float64 twin, for end-to-end comparisons."""
  w = rng.normal(size=(channels_in, channels_out)) * 0.3
  b = rng.normal(size=(channels_out,)) * 0.1

  def np_fn(x, t):
    return np.tanh(x @ w + b + (t / T)[:, None, None, None])

  def jax_fn(x, t):
    tt = (t.astype(jnp.float32) / T)[:, None, None, None]
    return jnp.tanh(x @ jnp.asarray(w, jnp.float32) + jnp.asarray(b, jnp.float32) + tt)

  return np_fn, jax_fn


# ----------------------------------------------------------------------------------------------
# Schedules.
# ----------------------------------------------------------------------------------------------


def test_linear_schedule_definition():
  # Expected: linspace(1e-4, 0.02, 1000) (paper Sec. 4), float64.
  betas = dm.get_beta_schedule('linear', **SCHEDULE_ARGS)
  assert betas.dtype == np.float64 and betas.shape == (T,)
  assert betas[0] == 1e-4 and betas[-1] == 0.02
  np.testing.assert_allclose(np.diff(betas), (0.02 - 1e-4) / (T - 1), rtol=1e-9)


@pytest.mark.parametrize(
  'name, expected',
  [
    ('quad', lambda: np.linspace(1e-2, math.sqrt(0.02), T) ** 2),
    ('const', lambda: np.full(T, 0.02)),
    ('jsd', lambda: 1.0 / (T - np.arange(T))),
    (
      'warmup10',
      lambda: np.concatenate([np.linspace(1e-4, 0.02, 100), np.full(T - 100, 0.02)]),
    ),
    (
      'warmup50',
      lambda: np.concatenate([np.linspace(1e-4, 0.02, 500), np.full(T - 500, 0.02)]),
    ),
  ],
)
def test_other_schedules(name, expected):
  # Expected: the definitions of REFERENCE.md, written out independently.
  np.testing.assert_allclose(dm.get_beta_schedule(name, **SCHEDULE_ARGS), expected(), rtol=1e-12)


def test_cosine_schedule_matches_improved_ddpm():
  # Improved DDPM eq. (17): abar(t) = f(t)/f(0), f(t) = cos(((t/T + s)/(1 + s)) pi/2)^2, and
  # beta_t = min(1 - abar(t)/abar(t-1), 0.999). Check abar through the product of 1 - beta.
  betas = dm.get_beta_schedule('cosine', **SCHEDULE_ARGS)
  s = 0.008

  def f(t):
    return np.cos((t / T + s) / (1 + s) * np.pi / 2) ** 2

  abar = f(np.arange(1, T + 1)) / f(0)
  unclipped = betas < 0.999
  np.testing.assert_allclose(np.cumprod(1 - betas)[:-1][unclipped[:-1]], abar[:-1][unclipped[:-1]])
  assert betas.max() == pytest.approx(0.999)  # The last step is clipped.


def test_unknown_schedule_raises():
  with pytest.raises(ValueError, match="Unknown beta schedule 'cubic'"):
    dm.get_beta_schedule('cubic', **SCHEDULE_ARGS)


# ----------------------------------------------------------------------------------------------
# Tables and the forward process.
# ----------------------------------------------------------------------------------------------


def test_golden_posterior_variance():
  # Golden values from REFERENCE.md (linear 1e-4..0.02, T = 1000).
  diff = make_diffusion()
  assert diff.posterior_variance.dtype == jnp.float32
  np.testing.assert_allclose(
    np.asarray(diff.posterior_variance)[[0, 487, 999]], [0.0, 0.0097916, 0.0199999], atol=1e-7
  )


def test_tables_match_float64_reference():
  diff = make_diffusion()
  ref = Ref(dm.get_beta_schedule('linear', **SCHEDULE_ARGS))
  np.testing.assert_allclose(diff.alphas_cumprod, ref.abar, rtol=1e-6)
  np.testing.assert_allclose(diff.posterior_variance[1:], ref.post_var[1:], rtol=1e-6)
  clipped = np.log(np.concatenate([[ref.post_var[1]], ref.post_var[1:]]))
  np.testing.assert_allclose(diff.posterior_log_variance_clipped, clipped, rtol=1e-6)


@pytest.mark.parametrize('schedule', dm.BETA_SCHEDULES)
def test_q_functions_match_reference(schedule):
  diff = make_diffusion(schedule=schedule)
  ref = Ref(dm.get_beta_schedule(schedule, **SCHEDULE_ARGS))
  rng = np.random.default_rng(0)
  x0 = quantized_images(rng)
  noise = rng.normal(size=SHAPE)
  t = np.array([0, 1, 487, 999])

  xt = jax.jit(diff.q_sample)(x0.astype(np.float32), t, noise.astype(np.float32))
  assert rel_err(xt, ref.q_sample(x0, t, noise)) < 1e-5

  mean, var, logvar = jax.jit(diff.q_mean_variance)(x0.astype(np.float32), t)
  assert rel_err(mean, np.sqrt(ref.b(ref.abar, t)) * x0) < 1e-5
  assert rel_err(var, 1 - ref.b(ref.abar, t)) < 1e-5
  assert rel_err(logvar, np.log(1 - ref.b(ref.abar, t))) < 1e-5

  xt64 = ref.q_sample(x0, t, noise)
  mean, var, logvar = jax.jit(diff.q_posterior_mean_variance)(
    x0.astype(np.float32), xt64.astype(np.float32), t
  )
  assert rel_err(mean, ref.post_mean(x0, xt64, t)) < 1e-5
  assert rel_err(var, ref.b(ref.post_var, t)) < 1e-5
  assert rel_err(logvar, ref.post_logvar_clipped(t)) < 1e-5


def test_q_posterior_at_t0_returns_x0():
  # abar_{-1} = 1 makes coef1 = 1 and coef2 = 0 at t = 0: the posterior mean is x0 itself.
  diff = make_diffusion()
  rng = np.random.default_rng(1)
  x0 = quantized_images(rng).astype(np.float32)
  xt = rng.normal(size=SHAPE).astype(np.float32)
  mean, var, _ = diff.q_posterior_mean_variance(x0, xt, jnp.zeros(SHAPE[0], jnp.int32))
  np.testing.assert_allclose(mean, x0, rtol=1e-6, atol=1e-7)
  np.testing.assert_array_equal(var, 0.0)


def test_q_sample_moments():
  # Eq. (4): x_t | x_0 ~ N(sqrt(abar_t) x_0, (1 - abar_t) I). Over 200k draws the standard
  # error of the mean is sqrt(var / n) < 2.3e-3, so 5 sigma bounds are 1.2e-2 (mean) and 1% (var).
  diff = make_diffusion()
  n, t_val = 200_000, 300
  x0 = jnp.full((n, 1, 1, 1), 0.5)
  t = jnp.full((n,), t_val, jnp.int32)
  noise = jax.random.normal(jax.random.key(0), x0.shape)
  xt = np.asarray(diff.q_sample(x0, t, noise), np.float64).ravel()
  abar = Ref(dm.get_beta_schedule('linear', **SCHEDULE_ARGS)).abar[t_val]
  assert abs(xt.mean() - np.sqrt(abar) * 0.5) < 5 * np.sqrt((1 - abar) / n)
  assert abs(xt.var() / (1 - abar) - 1) < 5 * np.sqrt(2 / n)


# ----------------------------------------------------------------------------------------------
# The reverse process.
# ----------------------------------------------------------------------------------------------

ALL_TYPES = list(itertools.product(dm.MODEL_MEAN_TYPES, dm.MODEL_VAR_TYPES))


@pytest.mark.parametrize('mean_type, var_type', ALL_TYPES)
@pytest.mark.parametrize('clip', [True, False])
def test_p_mean_variance_matches_reference(mean_type, var_type, clip):
  diff = make_diffusion(mean_type, var_type)
  ref = Ref(dm.get_beta_schedule('linear', **SCHEDULE_ARGS))
  rng = np.random.default_rng(2)
  channels = SHAPE[-1] * (2 if diff.learned_variance else 1)
  np_fn, jax_fn = linear_model(rng, channels)
  x = rng.normal(size=SHAPE)
  t = np.array([0, 5, 487, 999])
  out = jax.jit(lambda x, t: diff.p_mean_variance(jax_fn, x, t, clip_denoised=clip))(
    x.astype(np.float32), t
  )
  mean, logvar, x0 = ref.p_mean_var(mean_type, var_type, x, t, np_fn(x, t), clip)
  assert rel_err(out['pred_xstart'], x0) < 1e-5
  assert rel_err(out['mean'], mean) < 1e-5
  assert rel_err(np.broadcast_to(out['log_variance'], SHAPE), logvar) < 1e-5
  assert rel_err(np.broadcast_to(out['variance'], SHAPE), np.exp(logvar)) < 1e-5


@pytest.mark.parametrize('mean_type', dm.MODEL_MEAN_TYPES)
def test_exact_model_recovers_true_posterior_mean(mean_type):
  # A model_fn returning the exact target (true noise, true x0, true posterior mean, true v) must
  # make p's mean equal q's posterior mean mu_tilde(x_t, x_0) (eq. 7), computed in float64.
  diff = make_diffusion(mean_type, 'fixedlarge')
  ref = Ref(dm.get_beta_schedule('linear', **SCHEDULE_ARGS))
  rng = np.random.default_rng(3)
  x0 = quantized_images(rng)
  noise = rng.normal(size=SHAPE)
  t = np.array([1, 10, 500, 998])
  xt = ref.q_sample(x0, t, noise)
  true_mean = ref.post_mean(x0, xt, t)
  target = {
    'eps': noise,
    'xstart': x0,
    'xprev': true_mean,
    'v': ref.velocity(x0, t, noise),
  }[mean_type]
  out = diff.p_mean_variance(
    lambda *_: jnp.asarray(target, jnp.float32), xt.astype(np.float32), t, clip_denoised=True
  )
  assert rel_err(out['mean'], true_mean) < 1e-5
  # x0 is recovered too, within the conditioning of float32: eps divides by sqrt(abar_t)
  # (6e-3 at t = 998, so float32 rounding of x_t grows 160-fold, hence 1e-4); xprev divides
  # by the posterior coefficient of x0 (1.2e-4 at t = 998: 1e4-fold), so only the rows
  # t = 1, 10, whose coefficient is above 1e-2, are compared for it; v divides by nothing
  # (x0 = sqrt(abar_t) x_t - sqrt(1 - abar_t) v).
  rows = slice(None) if mean_type != 'xprev' else slice(0, 2)
  tol = {'eps': 1e-4, 'xstart': 1e-7, 'xprev': 1e-5, 'v': 1e-6}[mean_type]
  assert rel_err(out['pred_xstart'][rows], x0[rows]) < tol


def test_p_sample_adds_no_noise_at_t0():
  diff = make_diffusion()
  rng = np.random.default_rng(4)
  _, jax_fn = linear_model(rng, SHAPE[-1])
  x = jnp.asarray(rng.normal(size=SHAPE), jnp.float32)
  t = jnp.array([0, 0, 3, 3], jnp.int32)
  out = diff.p_sample(jax_fn, x, t, jax.random.key(0))
  mean = diff.p_mean_variance(jax_fn, x, t)['mean']
  np.testing.assert_array_equal(out['sample'][:2], mean[:2])
  assert np.all(np.abs(out['sample'][2:] - mean[2:]) > 0)


def test_p_sample_loop_is_traced_once_and_matches_python_loop():
  # A 1000-step loop must compile to one loop: the model function is traced exactly once.
  diff = make_diffusion()
  traces = []

  def model_fn(x, t):
    traces.append(1)
    return 0.1 * x + 1e-4 * t[:, None, None, None]

  shape = (2, 4, 4, 1)
  rng = jax.random.key(5)
  samples = jax.jit(lambda r: diff.p_sample_loop(model_fn, shape, r))(rng)
  assert len(traces) == 1
  assert samples.shape == shape and np.all(np.isfinite(samples))

  # Same draws as Algorithm 2 written as a Python loop over the documented keys.
  init_rng, loop_rng = jax.random.split(rng)
  x = jax.random.normal(init_rng, shape)
  step = jax.jit(lambda x, t, r: diff.p_sample(model_fn, x, t, r)['sample'])
  for t in range(T - 1, -1, -1):
    x = step(x, jnp.full((2,), t, jnp.int32), jax.random.fold_in(loop_rng, t))
  np.testing.assert_allclose(samples, x, rtol=1e-5, atol=1e-5)


def test_progressive_matches_p_sample_loop():
  diff = make_diffusion(num_steps=100)

  def model_fn(x, t):
    return 0.5 * x

  shape, rng = (2, 4, 4, 1), jax.random.key(6)
  samples = jax.jit(lambda r: diff.p_sample_loop(model_fn, shape, r))(rng)
  final, snaps = jax.jit(lambda r: diff.p_sample_loop_progressive(model_fn, shape, r, 25))(rng)
  np.testing.assert_allclose(final, samples, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(snaps['t'], [99, 74, 49, 24])
  assert snaps['x_t'].shape == snaps['pred_xstart'].shape == (4,) + shape
  # The first snapshot is x_T itself, drawn from the documented key.
  np.testing.assert_array_equal(snaps['x_t'][0], jax.random.normal(jax.random.split(rng)[0], shape))
  with pytest.raises(ValueError, match='divisor'):
    diff.p_sample_loop_progressive(model_fn, shape, rng, 30)


# ----------------------------------------------------------------------------------------------
# DDIM.
# ----------------------------------------------------------------------------------------------


def ddim_reference(ref, np_fn, x_init, num_steps, eta=0.0, noises=None):
  """DDIM eq. (12) in float64 with the eps-model of np_fn (no clipping triggered)."""
  seq = np.arange(num_steps) * (T // num_steps)
  x = x_init.astype(np.float64)
  for i in range(num_steps - 1, -1, -1):
    t = np.full(x.shape[0], seq[i])
    eps = np_fn(x, t)
    abar = ref.abar[seq[i]]
    abar_prev = ref.abar[seq[i - 1]] if i > 0 else 1.0
    x0 = (x - np.sqrt(1 - abar) * eps) / np.sqrt(abar)
    sigma = eta * np.sqrt((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev))
    x = np.sqrt(abar_prev) * x0 + np.sqrt(1 - abar_prev - sigma**2) * eps
    if eta:
      x = x + sigma * noises[seq[i]]
  return x


@pytest.mark.parametrize('num_steps', [T, 50])
def test_ddim_eta0_matches_float64_recursion(num_steps):
  diff = make_diffusion()
  ref = Ref(dm.get_beta_schedule('linear', **SCHEDULE_ARGS))
  rng = np.random.default_rng(7)
  np_fn, _ = linear_model(rng, 1, channels_in=1)

  def jax_fn(x, t):  # The eps model: small, so that x0 stays inside [-1, 1] (no clipping).
    return 0.1 * jnp.tanh(x)

  def np_eps(x, t):
    return 0.1 * np.tanh(x)

  shape, key = (2, 3, 3, 1), jax.random.key(8)
  sample_fn = jax.jit(
    lambda r: diff.sample_loop(
      diff.ddim_step(jax_fn, num_steps=num_steps, clip_denoised=False), num_steps, shape, r
    )
  )
  samples = sample_fn(key)
  np.testing.assert_array_equal(samples, sample_fn(key))  # Deterministic.
  x_init = np.asarray(jax.random.normal(jax.random.split(key)[0], shape))
  expected = ddim_reference(ref, np_eps, x_init, num_steps)
  assert rel_err(samples, expected) < 1e-5


def test_ddim_eta1_uses_documented_noise():
  diff = make_diffusion()
  ref = Ref(dm.get_beta_schedule('linear', **SCHEDULE_ARGS))
  shape, key, num_steps = (2, 3, 3, 1), jax.random.key(9), 20
  step = diff.ddim_step(
    lambda x, t: 0.1 * jnp.tanh(x), num_steps=num_steps, eta=1.0, clip_denoised=False
  )
  samples = diff.sample_loop(step, num_steps, shape, key)
  init_rng, loop_rng = jax.random.split(key)
  noises = {
    t: np.asarray(jax.random.normal(jax.random.fold_in(loop_rng, t), shape))
    for t in np.arange(num_steps) * (T // num_steps)
  }
  expected = ddim_reference(
    ref,
    lambda x, t: 0.1 * np.tanh(x),
    np.asarray(jax.random.normal(init_rng, shape)),
    num_steps,
    eta=1.0,
    noises=noises,
  )
  assert rel_err(samples, expected) < 1e-5


# ----------------------------------------------------------------------------------------------
# The fast samplers: timesteps, respaced ancestral sampling, DPM-Solver++(2M).
# ----------------------------------------------------------------------------------------------

SAMPLER_SHAPE = (2, 4, 4, 2)


def sampler_model(ref, mean_type, seed=11):
  """(np_fn, jax_fn): a synthetic network of `mean_type` with a float64 twin, all of whose
  outputs depend on x and t through z = x W + b + t / T: eps = tanh(z); x_0 = 1.3 tanh(z) (so
  that some |x_0| exceed 1 and the thresholdings act); x_{t-1} = the posterior mean (eq. 7) of
  that x_0; v = (sqrt(abar_t) x_t - x_0) / sqrt(1 - abar_t), the v (Salimans & Ho 2022) of x_t
  and that x_0; with float32 copies of the float64 coefficients in the float32 twin."""
  rng = np.random.default_rng(seed)
  c = SAMPLER_SHAPE[-1]
  w, b = rng.normal(size=(c, c)) * 0.8, rng.normal(size=(c,)) * 0.2
  c1, c2 = ref.post_coef1, ref.post_coef2
  alpha, sigma = np.sqrt(ref.abar), np.sqrt(1 - ref.abar)

  def make(xp, table, z_of):
    def fn(x, t):
      z = xp.tanh(z_of(x, t))
      if mean_type == 'eps':
        return z
      if mean_type == 'xstart':
        return 1.3 * z
      if mean_type == 'v':
        at = lambda a: table(a)[t][:, None, None, None]  # noqa: E731
        return (at(alpha) * x - 1.3 * z) / at(sigma)
      return table(c1)[t][:, None, None, None] * 1.3 * z + table(c2)[t][:, None, None, None] * x

    return fn

  np_fn = make(np, lambda a: a, lambda x, t: x @ w + b + (t / T)[:, None, None, None])
  jax_fn = make(
    jnp,
    lambda a: jnp.asarray(a, jnp.float32),
    lambda x, t: (
      x @ jnp.asarray(w, jnp.float32)
      + jnp.asarray(b, jnp.float32)
      + (t.astype(jnp.float32) / T)[:, None, None, None]
    ),
  )
  return np_fn, jax_fn


def sampler_start(key):
  """x_T (float64) and the loop key of `sample_loop_init`, the documented way."""
  init_rng, loop_rng = jax.random.split(key)
  return np.asarray(jax.random.normal(init_rng, SAMPLER_SHAPE), np.float64), loop_rng


def test_sampler_timesteps():
  # Expected: the spacings as documented, written out for T = 1000 (improved DDPM rounds
  # i (T-1) / (K-1); DPM-Solver's time-uniform points are round(i (T-1) / K), i = 1..K). Their
  # valid ranges are the samplers' (tests/test_samplers.py).
  np.testing.assert_array_equal(dm.ddim_timesteps(T, 4), [0, 250, 500, 750])
  np.testing.assert_array_equal(dm.respaced_timesteps(T, 5), [0, 250, 500, 749, 999])
  np.testing.assert_array_equal(dm.dpm_solver_timesteps(T, 4), [250, 500, 749, 999])
  np.testing.assert_array_equal(dm.respaced_timesteps(T, T), np.arange(T))
  np.testing.assert_array_equal(dm.dpm_solver_timesteps(T, T - 1), np.arange(1, T))


def respaced_reference(ref, np_fn, mean_type, var_type, x, loop_rng, k_values, num_steps):
  """Improved DDPM sec. 4 in float64: the steps k in `k_values` (decreasing) of ancestral
  sampling on S = the respaced timesteps, abar'_k = abar_{S_k}, beta'_k = 1 - abar'_k /
  abar'_{k-1}, eqs. (6)-(7) with these, the network called at S_k; clip_denoised."""
  seq = np.round(np.arange(num_steps) * (T - 1) / (num_steps - 1)).astype(int)
  abar = ref.abar[seq]
  abar_prev = np.concatenate([[1.0], abar[:-1]])
  betas = 1 - abar / abar_prev
  post_var = betas * (1 - abar_prev) / (1 - abar)
  for k in k_values:
    t = np.full(x.shape[0], seq[k])
    out = np_fn(x, t)
    x0 = ref.pred_x0(mean_type, x, t, out[..., : x.shape[-1]], clip=True)
    mean = (np.sqrt(abar_prev[k]) * betas[k] / (1 - abar[k])) * x0 + (
      np.sqrt(1 - betas[k]) * (1 - abar_prev[k]) / (1 - abar[k])
    ) * x
    if k == 0:
      x = mean
      continue
    if var_type == 'fixedlarge':
      logvar = np.log(betas[k])
    elif var_type == 'fixedsmall':
      logvar = np.log(post_var[k])
    else:  # Improved DDPM eq. (15) with the respaced betas and posterior variances.
      frac = (out[..., x.shape[-1] :] + 1) / 2
      logvar = frac * np.log(betas[k]) + (1 - frac) * np.log(post_var[k])
    noise = np.asarray(jax.random.normal(jax.random.fold_in(loop_rng, seq[k]), x.shape))
    x = mean + np.exp(0.5 * logvar) * noise
  return x


def with_variance_output(fn, xp):
  """fn's output with a learned_range variance output in [-1, 1] appended."""
  return lambda x, t: xp.concatenate([fn(x, t), xp.sin(3 * x)], axis=-1)


@pytest.mark.parametrize(
  'mean_type, var_type',
  [(m, 'fixedlarge') for m in dm.MODEL_MEAN_TYPES]
  + [('eps', 'fixedsmall'), ('eps', 'learned_range')],
)
def test_respaced_matches_float64_reference(mean_type, var_type):
  diff = make_diffusion(mean_type, var_type)
  ref = Ref(dm.get_beta_schedule('linear', **SCHEDULE_ARGS))
  np_fn, jax_fn = sampler_model(ref, mean_type)
  if var_type == 'learned_range':
    np_fn, jax_fn = with_variance_output(np_fn, np), with_variance_output(jax_fn, jnp)
  num_steps = 8
  x_init, loop_rng = sampler_start(jax.random.key(12))
  step = diff.respaced_step(jax_fn, num_steps=num_steps)
  # One step (i = 2: k = 5) from x_T, then the whole loop; with the float64 reference.
  out = jax.jit(step)(jnp.int32(2), jnp.asarray(x_init, jnp.float32), jnp.zeros(0), loop_rng)
  expected = respaced_reference(ref, np_fn, mean_type, var_type, x_init, loop_rng, [5], num_steps)
  assert rel_err(out['sample'], expected) < 1e-5
  samples = jax.jit(lambda r: diff.sample_loop(step, num_steps, SAMPLER_SHAPE, r))(
    jax.random.key(12)
  )
  expected = respaced_reference(
    ref, np_fn, mean_type, var_type, x_init, loop_rng, range(num_steps - 1, -1, -1), num_steps
  )
  assert rel_err(samples, expected) < 1e-5


def test_respaced_on_all_timesteps_is_the_ancestral_sampler():
  # Expected: with K = T the respaced process is the process itself (Algorithm 2).
  diff = make_diffusion(num_steps=100)
  _, jax_fn = linear_model(np.random.default_rng(13), 1, channels_in=1)
  shape, key = (2, 3, 3, 1), jax.random.key(14)
  respaced = jax.jit(
    lambda r: diff.sample_loop(diff.respaced_step(jax_fn, num_steps=100), 100, shape, r)
  )(key)
  ancestral = jax.jit(lambda r: diff.p_sample_loop(jax_fn, shape, r))(key)
  assert rel_err(respaced, ancestral) < 1e-5


def dpm_solver_reference(ref, np_fn, mean_type, thresholding, x, num_steps, steps, prev=None):
  """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2; REFERENCE.md) in float64: steps i in
  `steps` (consecutive) from x, with x0 of step i - 1 = prev; tau_i = round((K - i) (T-1) / K)
  for i < K (time-uniform), then the data (sigma = 0); first order at the first and last step."""
  taus = np.round(np.arange(num_steps, 0, -1) * (T - 1) / num_steps).astype(int)
  alpha, sigma = np.sqrt(ref.abar[taus]), np.sqrt(1 - ref.abar[taus])
  lam = np.log(alpha / sigma)
  for i in steps:
    t = np.full(x.shape[0], taus[i])
    x0 = ref.pred_x0(mean_type, x, t, np_fn(x, t), clip=False)
    if thresholding == 'static':
      x0 = np.clip(x0, -1, 1)
    elif thresholding == 'dynamic':  # Imagen: s = the 99.5% quantile of |x0|, at least 1.
      s = np.maximum(np.quantile(np.abs(x0).reshape(len(x0), -1), 0.995, axis=1), 1)
      s = s[:, None, None, None]
      x0 = np.clip(x0, -s, s) / s
    if i == num_steps - 1:
      x = x0
    else:
      h = lam[i + 1] - lam[i]
      d = x0
      if i > 0:
        r = (lam[i] - lam[i - 1]) / h
        d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * prev
      x = sigma[i + 1] / sigma[i] * x - alpha[i + 1] * (np.exp(-h) - 1) * d
    prev = x0
  return x, prev


@pytest.mark.parametrize(
  'mean_type, thresholding',
  [(m, 'none') for m in dm.MODEL_MEAN_TYPES] + [('eps', 'static'), ('eps', 'dynamic')],
)
def test_dpm_solver_matches_float64_reference(mean_type, thresholding):
  diff = make_diffusion(mean_type, 'fixedsmall')
  ref = Ref(dm.get_beta_schedule('linear', **SCHEDULE_ARGS))
  np_fn, jax_fn = sampler_model(ref, mean_type)
  num_steps = 10
  x_init, loop_rng = sampler_start(jax.random.key(15))
  step = jax.jit(diff.dpm_solver_step(jax_fn, num_steps=num_steps, thresholding=thresholding))
  # Single steps: the first (first order), a second-order one, the last (onto the data).
  rng = np.random.default_rng(16)
  for i in [0, 4, num_steps - 1]:
    x = x_init * (1.0 if i == 0 else 0.3)
    prev = 1.2 * np.tanh(rng.normal(size=SAMPLER_SHAPE))
    out = step(jnp.int32(i), jnp.asarray(x, jnp.float32), jnp.asarray(prev, jnp.float32), loop_rng)
    expected, _ = dpm_solver_reference(ref, np_fn, mean_type, thresholding, x, num_steps, [i], prev)
    assert rel_err(out['sample'], expected) < 1e-5, i
  samples = jax.jit(lambda r: diff.sample_loop(step, num_steps, SAMPLER_SHAPE, r))(
    jax.random.key(15)
  )
  expected, x0 = dpm_solver_reference(
    ref, np_fn, mean_type, thresholding, x_init, num_steps, range(num_steps)
  )
  assert rel_err(samples, expected) < 1e-5
  if thresholding != 'none':
    assert np.abs(expected).max() <= 1 + 1e-12
  else:
    assert np.abs(x0).max() > 1  # The model's x_0 leaves [-1, 1]: the thresholdings act.


def test_dpm_solver_matches_diffusers():
  # Expected: diffusers' DPMSolverMultistepScheduler (an independent implementation) with
  # DPM-Solver++(2M), linspace (time-uniform) timesteps, the last step first order onto sigma = 0
  # and no thresholding, in float64 on the same eps network.
  from diffusers import DPMSolverMultistepScheduler

  diff = make_diffusion('eps', 'fixedsmall')
  ref = Ref(dm.get_beta_schedule('linear', **SCHEDULE_ARGS))
  np_fn, jax_fn = sampler_model(ref, 'eps')
  num_steps = 12
  scheduler = DPMSolverMultistepScheduler(
    num_train_timesteps=T,
    beta_start=1e-4,
    beta_end=0.02,
    beta_schedule='linear',
    solver_order=2,
    algorithm_type='dpmsolver++',
    solver_type='midpoint',
    timestep_spacing='linspace',
    final_sigmas_type='zero',
    lower_order_final=True,
  )
  scheduler.set_timesteps(num_steps)
  x_init, _ = sampler_start(jax.random.key(17))
  x = torch.from_numpy(x_init)
  for t in scheduler.timesteps:
    eps = np_fn(x.numpy(), np.full(len(x), int(t)))
    x = scheduler.step(torch.from_numpy(eps), t, x).prev_sample
  step = diff.dpm_solver_step(jax_fn, num_steps=num_steps, thresholding='none')
  samples = jax.jit(lambda r: diff.sample_loop(step, num_steps, SAMPLER_SHAPE, r))(
    jax.random.key(17)
  )
  np.testing.assert_array_equal(
    scheduler.timesteps.numpy(), dm.dpm_solver_timesteps(T, num_steps)[::-1]
  )
  assert rel_err(samples, x.numpy()) < 1e-5


EXACT_SAMPLERS = [
  ('ancestral', None),
  ('ddim', dict(num_steps=10, eta=0.0)),
  ('ddim', dict(num_steps=10, eta=1.0)),
  ('respaced', dict(num_steps=10)),
  ('dpm_solver++', dict(num_steps=10, thresholding='static')),
  ('dpm_solver++', dict(num_steps=10, thresholding='none')),
]


@pytest.mark.parametrize('mean_type', dm.MODEL_MEAN_TYPES)
@pytest.mark.parametrize('var_type', ['fixedlarge', 'fixedsmall'])
@pytest.mark.parametrize('sampler, settings', EXACT_SAMPLERS)
def test_exact_model_of_a_single_point_recovers_it(sampler, settings, mean_type, var_type):
  # Data = one point x*: the exact network (eps = (x_t - sqrt(abar_t) x*) / sqrt(1 - abar_t),
  # x_0 = x*, the true posterior mean, or v = sqrt(abar_t) eps - sqrt(1 - abar_t) x*
  # = (sqrt(abar_t) x_t - x*) / sqrt(1 - abar_t)) makes every sampler land on x*.
  diff = make_diffusion(mean_type, var_type)
  ref = Ref(dm.get_beta_schedule('linear', **SCHEDULE_ARGS))
  point = np.random.default_rng(18).uniform(-0.9, 0.9, size=(1, *SAMPLER_SHAPE[1:]))
  alpha = jnp.asarray(np.sqrt(ref.abar), jnp.float32)
  sigma = jnp.asarray(np.sqrt(1 - ref.abar), jnp.float32)  # float64 1 - abar: 1e-4 at t = 0.
  c1 = jnp.asarray(ref.post_coef1, jnp.float32)
  c2 = jnp.asarray(ref.post_coef2, jnp.float32)
  x_star = jnp.asarray(point, jnp.float32)

  def exact(x, t):
    b = lambda a: a[t][:, None, None, None]  # noqa: E731
    if mean_type == 'eps':
      return (x - b(alpha) * x_star) / b(sigma)
    if mean_type == 'xstart':
      return jnp.broadcast_to(x_star, x.shape)
    if mean_type == 'v':
      return (b(alpha) * x - x_star) / b(sigma)
    return b(c1) * x_star + b(c2) * x

  if sampler == 'ancestral':
    step, num_steps = diff.ancestral_step(exact), T
  else:
    factory = {'ddim': diff.ddim_step, 'respaced': diff.respaced_step}.get(
      sampler, diff.dpm_solver_step
    )
    step, num_steps = factory(exact, **settings), settings['num_steps']
  samples = jax.jit(lambda r: diff.sample_loop(step, num_steps, SAMPLER_SHAPE, r))(
    jax.random.key(19)
  )
  np.testing.assert_allclose(samples, np.broadcast_to(point, SAMPLER_SHAPE), atol=2e-5)


# ----------------------------------------------------------------------------------------------
# Losses and the variational bound.
# ----------------------------------------------------------------------------------------------

LOSS_COMBOS = [
  (mean, var, loss)
  for mean, var, loss in itertools.product(dm.MODEL_MEAN_TYPES, dm.MODEL_VAR_TYPES, dm.LOSS_TYPES)
  if not (loss == 'mse' and var.startswith('learned'))
  and not (loss == 'hybrid' and not var.startswith('learned'))
]


def loss_inputs(diff, seed: int):
  """(float64 reference, linear model as NumPy and JAX functions, x0, noise, t) of a loss test:
  the linear schedule, images of SHAPE, t at both ends and between."""
  ref = Ref(dm.get_beta_schedule('linear', **SCHEDULE_ARGS))
  rng = np.random.default_rng(seed)
  channels = SHAPE[-1] * (2 if diff.learned_variance else 1)
  np_fn, jax_fn = linear_model(rng, channels)
  x0 = quantized_images(rng)
  noise = rng.normal(size=SHAPE)
  return ref, np_fn, jax_fn, x0, noise, np.array([0, 1, 250, 999])


@pytest.mark.parametrize('mean_type, var_type, loss_type', LOSS_COMBOS)
def test_training_losses_match_reference(mean_type, var_type, loss_type):
  diff = make_diffusion(mean_type, var_type, loss_type)
  ref, np_fn, jax_fn, x0, noise, t = loss_inputs(diff, seed=10)
  loss = jax.jit(lambda x0, t, n: diff.training_losses(jax_fn, x0, t, n))(
    x0.astype(np.float32), t, noise.astype(np.float32)
  )
  assert loss.shape == (SHAPE[0],)
  xt = ref.q_sample(x0, t, noise)
  out = np_fn(xt, t)
  target = {
    'eps': noise,
    'xstart': x0,
    'xprev': ref.post_mean(x0, xt, t),
    'v': ref.velocity(x0, t, noise),
  }[mean_type]
  mse = ((target - out[..., : SHAPE[-1]]) ** 2).mean(axis=(1, 2, 3))
  vb = ref.vb_term(mean_type, var_type, x0, xt, t, out, clip=False)[0]
  expected = {'mse': mse, 'kl': vb, 'hybrid': mse + 1e-3 * T * vb}[loss_type]
  assert rel_err(loss, expected) < 1e-4


def test_hybrid_bound_term_trains_only_the_variance():
  # Improved DDPM: the L_vlb part of L_hybrid sees the mean through a stop-gradient, so the
  # gradient w.r.t. the mean channels is that of L_simple alone.
  diff = make_diffusion('eps', 'learned_range', 'hybrid')
  rng = np.random.default_rng(11)
  x0 = jnp.asarray(quantized_images(rng), jnp.float32)
  noise = jnp.asarray(rng.normal(size=SHAPE), jnp.float32)
  t = jnp.array([0, 1, 250, 999])
  out0 = jnp.asarray(rng.normal(size=SHAPE[:-1] + (6,)) * 0.1, jnp.float32)
  grad = jax.grad(lambda o: diff.training_losses(lambda *_: o, x0, t, noise).sum())(out0)
  expected_mean_grad = 2 * (out0[..., :3] - noise) / np.prod(SHAPE[1:])
  np.testing.assert_allclose(grad[..., :3], expected_mean_grad, rtol=1e-5, atol=1e-9)
  assert np.abs(grad[..., 3:]).sum() > 0


@pytest.mark.parametrize('mean_type, var_type', ALL_TYPES)
def test_calc_bpd_loop_matches_reference(mean_type, var_type):
  num_steps = 50
  betas = dm.get_beta_schedule(
    'linear', beta_start=1e-4, beta_end=0.2, num_diffusion_timesteps=num_steps
  )
  diff = dm.GaussianDiffusion.create(
    betas, model_mean_type=mean_type, model_var_type=var_type, loss_type='kl'
  )
  ref = Ref(betas)
  rng = np.random.default_rng(12)
  channels = SHAPE[-1] * (2 if diff.learned_variance else 1)
  np_fn, jax_fn = linear_model(rng, channels)
  x0 = quantized_images(rng)
  key = jax.random.key(13)
  out = jax.jit(lambda x, r: diff.calc_bpd_loop(jax_fn, x, r))(x0.astype(np.float32), key)
  assert out['terms_bpd'].shape == out['mse'].shape == (SHAPE[0], num_steps)

  terms, mses = [], []
  for t_val in range(num_steps):
    t = np.full(SHAPE[0], t_val)
    noise = np.asarray(jax.random.normal(jax.random.fold_in(key, t_val), SHAPE), np.float64)
    xt = ref.q_sample(x0, t, noise)
    vb, pred_x0 = ref.vb_term(mean_type, var_type, x0, xt, t, np_fn(xt, t), clip=True)
    terms.append(vb)
    mses.append(((pred_x0 - x0) ** 2).mean(axis=(1, 2, 3)))
  terms, mses = np.stack(terms, 1), np.stack(mses, 1)
  # Prior L_T: KL(N(sqrt(abar_T) x0, 1 - abar_T) || N(0, 1)).
  abar_t = ref.abar[-1]
  prior = ref.kl(np.sqrt(abar_t) * x0, np.log(1 - abar_t), 0.0, 0.0).mean(axis=(1, 2, 3))
  prior /= np.log(2)
  assert rel_err(out['terms_bpd'], terms) < 1e-4
  assert rel_err(out['mse'], mses) < 1e-4
  assert rel_err(out['prior_bpd'], prior) < 1e-4
  assert rel_err(out['total_bpd'], terms.sum(1) + prior) < 1e-4


def test_kl_training_loss_equals_bpd_term():
  # training_losses('kl') at t with the noise of calc_bpd_loop's term t is that very term.
  diff = make_diffusion('eps', 'fixedsmall', 'kl', num_steps=20)
  rng = np.random.default_rng(14)
  _, jax_fn = linear_model(rng, SHAPE[-1])
  x0 = jnp.asarray(quantized_images(rng), jnp.float32)
  key = jax.random.key(15)
  bpd = diff.calc_bpd_loop(jax_fn, x0, key, clip_denoised=False)
  for t_val in (0, 1, 7, 19):
    noise = jax.random.normal(jax.random.fold_in(key, t_val), SHAPE)
    t = jnp.full((SHAPE[0],), t_val, jnp.int32)
    loss = diff.training_losses(jax_fn, x0, t, noise)
    np.testing.assert_allclose(loss, bpd['terms_bpd'][:, t_val], rtol=1e-6)


def test_decoder_far_from_the_mean_matches_float64():
  # Bins 4.5-6 standard deviations above or below the mean have probabilities (1e-11..1e-6)
  # below float32's rounding of 1 but above the 1e-12 clamp; the float64 evaluation of the
  # original formula (Ref.decoder_logprob) is the reference.
  x = np.array([-0.5, 0.2, 0.5, 0.9, -0.9, -1.0, 1.0])
  means = x + np.array([0.0225, -0.025, 0.03, -0.028, 0.026, 0.025, -0.027])
  logvar = np.full_like(x, 2 * np.log(0.005))
  got = dm.discretized_gaussian_log_likelihood(
    jnp.asarray(x, jnp.float32),
    means=jnp.asarray(means, jnp.float32),
    log_scales=jnp.asarray(0.5 * logvar, jnp.float32),
  )
  expected = Ref.decoder_logprob(x, means, logvar)
  assert np.all(expected > np.log(1e-12))
  np.testing.assert_allclose(got, expected, rtol=1e-4)


def test_normal_kl_against_closed_form():
  # KL of univariate Gaussians from SciPy's entropy integrals: KL = cross-entropy - entropy.
  m1, lv1, m2, lv2 = 0.3, np.log(0.5), -0.2, np.log(2.0)
  s1, s2 = np.sqrt(0.5), np.sqrt(2.0)
  cross_entropy = 0.5 * np.log(2 * np.pi * s2**2) + (s1**2 + (m1 - m2) ** 2) / (2 * s2**2)
  entropy = 0.5 * np.log(2 * np.pi * np.e * s1**2)
  np.testing.assert_allclose(dm.normal_kl(m1, lv1, m2, lv2), cross_entropy - entropy, rtol=1e-6)


def test_approx_cdf_close_to_exact():
  # The tanh approximation is within 2e-4 of the exact normal CDF (SciPy's ndtr).
  z = np.linspace(-6, 6, 1001)
  np.testing.assert_allclose(dm.approx_standard_normal_cdf(z), special.ndtr(z), atol=2e-4)


# ----------------------------------------------------------------------------------------------
# The v parameterization (Salimans & Ho 2022).
# ----------------------------------------------------------------------------------------------


def per_row_rel_err(actual, expected):
  """rel_err of each row (each t) of [B, ...] arrays, [B]."""
  return np.array([rel_err(a, e) for a, e in zip(actual, expected, strict=True)])


@pytest.mark.parametrize('schedule', ['linear', 'cosine'])
def test_velocity_and_its_inverses_match_float64(schedule):
  # Salimans & Ho 2022, sec. 4, in float64 at every t: v = alpha_t eps - sigma_t x0 with
  # alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t); x0 = alpha_t x_t - sigma_t v and (the path
  # DDIM takes, through that x0) eps = (x_t - alpha_t x0) / sigma_t recover the x0 and eps that
  # made x_t. x0 from v divides by nothing: float32 rounding of the inputs, 1e-6. eps from x0
  # divides by sigma_t (and rounds x_t / alpha_t - x0, which cancels to sigma_t / alpha_t eps):
  # at t = 0 that is 1e-2 (linear) or 6e-3 (cosine), so its float32 rounding grows ~200-fold.
  diff = make_diffusion('v', schedule=schedule)
  ref = Ref(dm.get_beta_schedule(schedule, **SCHEDULE_ARGS))
  rng = np.random.default_rng(20)
  shape = (T, 2, 2, 1)
  x0 = quantized_images(rng, shape)
  noise = rng.normal(size=shape)
  t = np.arange(T)
  v = ref.velocity(x0, t, noise)
  xt = ref.q_sample(x0, t, noise)
  x0_32, noise_32 = jnp.asarray(x0, jnp.float32), jnp.asarray(noise, jnp.float32)
  xt_32, v_32 = jnp.asarray(xt, jnp.float32), jnp.asarray(v, jnp.float32)
  assert per_row_rel_err(diff.velocity(x0_32, t, noise_32), v).max() < 1e-6
  pred_x0 = diff.predict_xstart_from_v(xt_32, t, v_32)
  assert per_row_rel_err(pred_x0, x0).max() < 1e-6
  pred_eps = diff.predict_eps_from_xstart(xt_32, t, pred_x0)
  assert per_row_rel_err(pred_eps, noise).max() < 3e-5


def test_v_training_loss_matches_float64_reference():
  # L_simple with the v target (Salimans & Ho 2022): mean((alpha_t eps - sigma_t x0 - out)^2)
  # for a fixed network output, in float64; for 'hybrid' plus 1e-3 T L_{t-1} (improved DDPM)
  # with the bound term of that output read as v (x0 = alpha_t x_t - sigma_t v, eq. 7 mean).
  ref = Ref(dm.get_beta_schedule('linear', **SCHEDULE_ARGS))
  rng = np.random.default_rng(21)
  x0 = quantized_images(rng)
  noise = rng.normal(size=SHAPE)
  out = np.concatenate([rng.normal(size=SHAPE), np.tanh(rng.normal(size=SHAPE))], axis=-1)
  t = np.array([0, 1, 500, 999])
  xt = ref.q_sample(x0, t, noise)
  mse = ((ref.velocity(x0, t, noise) - out[..., :3]) ** 2).mean(axis=(1, 2, 3))
  for var_type, loss_type, channels in [('fixedlarge', 'mse', 3), ('learned_range', 'hybrid', 6)]:
    diff = make_diffusion('v', var_type, loss_type)
    out_32 = jnp.asarray(out[..., :channels], jnp.float32)
    loss = diff.training_losses(
      lambda *_, o=out_32: o, jnp.asarray(x0, jnp.float32), t, jnp.asarray(noise, jnp.float32)
    )
    expected = mse
    if loss_type == 'hybrid':
      vb, _ = ref.vb_term('v', var_type, x0, xt, t, out, clip=False)
      expected = mse + 1e-3 * T * vb
    assert rel_err(loss, expected) < 1e-5, loss_type


@pytest.mark.parametrize('var_type', ['fixedlarge', 'learned_range'])
def test_bpd_of_v_equals_bpd_of_eps_for_the_same_network(var_type):
  # One network written as v and as eps: v_hat from a smooth model, eps_hat = sigma_t x_t +
  # alpha_t v_hat (from x_t = alpha_t x0 + sigma_t eps and v = alpha_t eps - sigma_t x0, both
  # give x0_hat = alpha_t x_t - sigma_t v_hat), the same variance output. The bound (eq. 5)
  # reads a network only through x0_hat and the variance, so bits/dim must agree: every term,
  # the total and the x0 mse, within float32 (eps' x0 divides by alpha_t >= 0.08 here: 1e-5).
  num_steps = 50
  betas = dm.get_beta_schedule(
    'linear', beta_start=1e-4, beta_end=0.2, num_diffusion_timesteps=num_steps
  )
  loss_type = 'kl'
  by_type = {
    m: dm.GaussianDiffusion.create(
      betas, model_mean_type=m, model_var_type=var_type, loss_type=loss_type
    )
    for m in ('eps', 'v')
  }
  rng = np.random.default_rng(22)
  channels = SHAPE[-1] * (2 if var_type == 'learned_range' else 1)
  _, v_fn = linear_model(rng, channels)
  alpha = by_type['v'].sqrt_alphas_cumprod
  sigma = by_type['v'].sqrt_one_minus_alphas_cumprod

  def eps_fn(x, t):
    out = v_fn(x, t)
    at = lambda a: a[t][:, None, None, None]  # noqa: E731
    eps = at(sigma) * x + at(alpha) * out[..., : SHAPE[-1]]
    return jnp.concatenate([eps, out[..., SHAPE[-1] :]], axis=-1)

  x0 = jnp.asarray(quantized_images(rng), jnp.float32)
  key = jax.random.key(23)
  bpd_v = jax.jit(lambda x: by_type['v'].calc_bpd_loop(v_fn, x, key))(x0)
  bpd_eps = jax.jit(lambda x: by_type['eps'].calc_bpd_loop(eps_fn, x, key))(x0)
  for name in ('total_bpd', 'terms_bpd', 'mse'):
    assert rel_err(bpd_v[name], bpd_eps[name]) < 1e-5, name
  np.testing.assert_array_equal(bpd_v['prior_bpd'], bpd_eps['prior_bpd'])


# ----------------------------------------------------------------------------------------------
# Min-SNR-gamma loss weighting (Hang et al. 2023).
# ----------------------------------------------------------------------------------------------


def min_snr_diffusion(mean_type, gamma, var='fixedlarge', loss='mse', schedule='linear'):
  betas = dm.get_beta_schedule(schedule, **SCHEDULE_ARGS)
  return dm.GaussianDiffusion.create(
    betas,
    model_mean_type=mean_type,
    model_var_type=var,
    loss_type=loss,
    loss_weighting='min_snr',
    min_snr_gamma=gamma,
  )


def min_snr_weight_reference(ref, mean_type, gamma, t):
  """float64: min(SNR_t, gamma) on ||x0 - x0_hat||^2 (Hang et al. 2023), SNR_t = abar_t /
  (1 - abar_t), carried to the target space of each mean type by its error's factor (eq. 4 for
  eps, x0 = alpha_t x_t - sigma_t v for v, eq. 7 for x_{t-1})."""
  snr = ref.abar[t] / (1 - ref.abar[t])
  clipped = np.minimum(snr, gamma)
  return {
    'eps': clipped / snr,  # x0 - x0_hat = (eps_hat - eps) / sqrt(SNR_t).
    'xstart': clipped,
    'v': clipped / (snr + 1),  # x0 - x0_hat = sigma_t (v_hat - v), sigma_t^2 = 1 / (SNR + 1).
    'xprev': clipped / ref.post_coef1[t] ** 2,  # mu - mu_hat = coef1_t (x0 - x0_hat).
  }[mean_type]


@pytest.mark.parametrize('schedule', ['linear', 'cosine'])
@pytest.mark.parametrize('mean_type', dm.MODEL_MEAN_TYPES)
def test_min_snr_weights_match_float64(mean_type, schedule):
  # Expected: min_snr_weight_reference at every t, gamma = 5 (the paper's default).
  diff = min_snr_diffusion(mean_type, 5.0, schedule=schedule)
  ref = Ref(dm.get_beta_schedule(schedule, **SCHEDULE_ARGS))
  t = np.arange(T)
  expected = min_snr_weight_reference(ref, mean_type, 5.0, t)
  np.testing.assert_allclose(diff.min_snr_weight(jnp.asarray(t)), expected, rtol=1e-5)


def test_min_snr_weights_where_abar_is_zero():
  # jsd ends with beta = 1: abar = 0, SNR = 0 at t = T-1. Then min(SNR, g) / SNR -> 1 (eps: the
  # limit, not 0 / 0), min(SNR, g) = 0 (x0) and min(SNR, g) / (SNR + 1) = 0 (v).
  betas = dm.get_beta_schedule('jsd', **SCHEDULE_ARGS)
  t = jnp.array([T - 1])
  weights = {
    m: dm.GaussianDiffusion.create(
      betas, model_mean_type=m, model_var_type='fixedlarge', loss_type='mse'
    ).min_snr_weight(t)
    for m in ('eps', 'xstart', 'v')
  }
  np.testing.assert_array_equal(weights['eps'], [1.0])
  np.testing.assert_array_equal(weights['xstart'], [0.0])
  np.testing.assert_array_equal(weights['v'], [0.0])


MIN_SNR_LOSSES = [(m, 'fixedlarge', 'mse') for m in dm.MODEL_MEAN_TYPES] + [
  ('eps', 'learned_range', 'hybrid'),
  ('v', 'learned_range', 'hybrid'),
]


@pytest.mark.parametrize('mean_type, var_type, loss_type', MIN_SNR_LOSSES)
def test_min_snr_loss_is_min_snr_times_the_x0_loss(mean_type, var_type, loss_type):
  # Hang et al. 2023's definition, whatever the mean type: L_simple becomes
  # min(SNR_t, gamma) mean((x0 - x0_hat)^2), with x0_hat the x_0 the output implies (float64,
  # Ref.pred_x0); 'hybrid' adds its bound term 1e-3 T L_{t-1} unweighted. gamma = 5.
  gamma = 5.0
  diff = min_snr_diffusion(mean_type, gamma, var_type, loss_type)
  ref, np_fn, jax_fn, x0, noise, t = loss_inputs(diff, seed=24)
  loss = diff.training_losses(
    jax_fn, jnp.asarray(x0, jnp.float32), t, jnp.asarray(noise, jnp.float32)
  )
  xt = ref.q_sample(x0, t, noise)
  out = np_fn(xt, t)
  pred_x0 = ref.pred_x0(mean_type, xt, t, out[..., : SHAPE[-1]], clip=False)
  snr = ref.abar[t] / (1 - ref.abar[t])
  expected = np.minimum(snr, gamma) * ((x0 - pred_x0) ** 2).mean(axis=(1, 2, 3))
  if loss_type == 'hybrid':
    expected = expected + 1e-3 * T * ref.vb_term(mean_type, var_type, x0, xt, t, out, False)[0]
  assert rel_err(loss, expected) < 1e-5
  # The weights are those of min_snr_weight_reference, so the weighted loss is not L_simple.
  unweighted = make_diffusion(mean_type, var_type, loss_type).training_losses(
    jax_fn, jnp.asarray(x0, jnp.float32), t, jnp.asarray(noise, jnp.float32)
  )
  assert rel_err(loss, unweighted) > 1e-2


@pytest.mark.parametrize('mean_type', dm.MODEL_MEAN_TYPES)
def test_min_snr_with_gamma_above_every_snr_is_the_eps_loss(mean_type):
  # With gamma >= max_t SNR_t (9999 at t = 0 here) min(SNR_t, gamma) = SNR_t, and
  # SNR_t ||x0 - x0_hat||^2 = ||eps - eps_hat||^2 (eq. 4: x0 - x0_hat = sigma_t / alpha_t
  # (eps_hat - eps)): every mean type's loss becomes the paper's L_simple (eq. 14) of the eps
  # its output implies, eps_hat = (x_t - alpha_t x0_hat) / sigma_t in float64. That is the
  # identity only for eps, whose weight gamma / max(SNR_t, gamma) is then exactly 1; for x0, v
  # and x_{t-1} the weights are SNR_t, abar_t and SNR_t / coef1_t^2.
  gamma = 1e5
  diff = min_snr_diffusion(mean_type, gamma)
  ref = Ref(dm.get_beta_schedule('linear', **SCHEDULE_ARGS))
  assert (ref.abar / (1 - ref.abar)).max() < gamma
  rng = np.random.default_rng(25)
  np_fn, jax_fn = linear_model(rng, SHAPE[-1])
  x0 = quantized_images(rng)
  noise = rng.normal(size=SHAPE)
  t = np.array([0, 1, 250, 999])
  x0_32, noise_32 = jnp.asarray(x0, jnp.float32), jnp.asarray(noise, jnp.float32)
  loss = diff.training_losses(jax_fn, x0_32, t, noise_32)
  xt = ref.q_sample(x0, t, noise)
  pred_x0 = ref.pred_x0(mean_type, xt, t, np_fn(xt, t), clip=False)
  abar = ref.b(ref.abar, t)
  pred_eps = (xt - np.sqrt(abar) * pred_x0) / np.sqrt(1 - abar)
  assert rel_err(loss, ((noise - pred_eps) ** 2).mean(axis=(1, 2, 3))) < 1e-5
  if mean_type == 'eps':
    unweighted = make_diffusion('eps').training_losses(jax_fn, x0_32, t, noise_32)
    np.testing.assert_array_equal(loss, unweighted)


def test_loss_weighting_reaches_every_process():
  # The defaults keep today's callers and the paper's loss; from_config and respaced carry the
  # settings of config.diffusion.
  import configs.default

  plain = make_diffusion()
  assert (plain.loss_weighting, plain.min_snr_gamma) == ('none', 5.0)
  config = configs.default.get_config().diffusion
  assert (config.loss_weighting, config.min_snr_gamma) == ('none', 5.0)
  config.loss_weighting, config.min_snr_gamma = 'min_snr', 2.0
  diff = dm.GaussianDiffusion.from_config(config)
  assert (diff.loss_weighting, diff.min_snr_gamma) == ('min_snr', 2.0)
  respaced = diff.respaced(10)
  assert (respaced.loss_weighting, respaced.min_snr_gamma) == ('min_snr', 2.0)
  # Static fields: the pytree's leaves are the tables alone.
  assert len(jax.tree.leaves(diff)) == len(jax.tree.leaves(plain))


@pytest.mark.parametrize(
  'kwargs, message',
  [
    (dict(loss_weighting='snr'), "Unknown loss_weighting 'snr'"),
    (dict(loss_weighting='min_snr', min_snr_gamma=0.0), 'min_snr_gamma must be a number > 0'),
    (dict(loss_weighting='min_snr', min_snr_gamma=-1.0), 'min_snr_gamma must be a number > 0'),
    (dict(loss_weighting='min_snr', min_snr_gamma=math.nan), 'min_snr_gamma must be'),
    (dict(loss_weighting='min_snr', loss_type='kl'), "loss_weighting 'min_snr'.*loss_type 'kl'"),
  ],
)
def test_bad_loss_weighting_raises(kwargs, message):
  settings = dict(model_mean_type='eps', model_var_type='fixedlarge', loss_type='mse')
  with pytest.raises(ValueError, match=message):
    dm.GaussianDiffusion.create(
      dm.get_beta_schedule('linear', **SCHEDULE_ARGS), **{**settings, **kwargs}
    )


# ----------------------------------------------------------------------------------------------
# Validation.
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
  'kwargs, message',
  [
    (dict(model_mean_type='eps', model_var_type='learned', loss_type='mse'), "'mse' cannot"),
    (dict(model_mean_type='eps', model_var_type='fixedsmall', loss_type='hybrid'), 'hybrid'),
    (
      dict(model_mean_type='score', model_var_type='fixedsmall', loss_type='mse'),
      'model_mean_type',
    ),
    (dict(model_mean_type='eps', model_var_type='fixed', loss_type='mse'), 'model_var_type'),
    (dict(model_mean_type='eps', model_var_type='fixedsmall', loss_type='l1'), 'loss_type'),
  ],
)
def test_invalid_combinations_raise(kwargs, message):
  with pytest.raises(ValueError, match=message):
    dm.GaussianDiffusion.create(dm.get_beta_schedule('linear', **SCHEDULE_ARGS), **kwargs)


def test_diffusion_is_a_pytree_usable_as_jit_argument():
  diff = make_diffusion()
  leaves = jax.tree.leaves(diff)
  assert all(leaf.dtype == jnp.float32 and leaf.shape == (T,) for leaf in leaves)
  x0 = jnp.zeros(SHAPE)
  t = jnp.zeros(SHAPE[0], jnp.int32)
  out = jax.jit(lambda d, x: d.q_sample(x, t, jnp.ones_like(x)))(diff, x0)
  np.testing.assert_allclose(out, np.sqrt(1e-4), rtol=1e-6)  # sqrt(1 - abar_0) = sqrt(beta_0).

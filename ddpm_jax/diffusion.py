"""The diffusion math of DDPM (Ho, Jain, Abbeel 2020) as pure, jit-compatible JAX functions.

Conventions follow the original code (REFERENCE.md): the time index `t` is 0-based, int32 `[B]`,
with t == 0 meaning "diffused for one step"; images `x` are float32 `[B, H, W, C]` in [-1, 1];
`model_fn(x, t)` returns the network output `[B, H, W, C]` (`[B, H, W, 2C]` for learned
variances, the second half being the variance output). Schedules and tables are computed in
float64 NumPy and stored as float32. Every loop over timesteps is one compiled `lax.scan` /
`lax.fori_loop`.

Equation numbers refer to Ho et al. 2020; `learned_range`, `hybrid` and `respaced_step` come from
improved DDPM (Nichol & Dhariwal 2021); `ddim_step` from DDIM (Song, Meng, Ermon 2021);
`dpm_solver_step` from DPM-Solver++ (Lu et al. 2022); the `v` mean type from progressive
distillation (Salimans & Ho 2022) and the `min_snr` loss weighting from Hang et al. 2023. Each
sampler is a `StepFn` (see "Samplers as step functions" below) that `sample_steps` and
`sample_loop` run.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]

# What the network's mean output predicts: the noise eps, x_0, the posterior mean of x_{t-1}, or
# the velocity v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0 (Salimans & Ho 2022).
MODEL_MEAN_TYPES = ('eps', 'xstart', 'xprev', 'v')
MODEL_VAR_TYPES = ('fixedlarge', 'fixedsmall', 'learned', 'learned_range')
# The variance types for which the network also outputs a (log-)variance: 2C channels, not C.
LEARNED_VAR_TYPES = ('learned', 'learned_range')
LOSS_TYPES = ('mse', 'kl', 'hybrid')
# 'none': the paper's unweighted L_simple; 'min_snr': Hang et al. 2023 (`min_snr_weight`).
LOSS_WEIGHTINGS = ('none', 'min_snr')
BETA_SCHEDULES = ('linear', 'quad', 'warmup10', 'warmup50', 'const', 'jsd', 'cosine')

# Weight of the variational bound in improved DDPM's L_hybrid = L_simple + lambda * L_vlb.
HYBRID_VB_WEIGHT = 1e-3


def get_beta_schedule(
  name: str, *, beta_start: float, beta_end: float, num_diffusion_timesteps: int
) -> np.ndarray:
  """Returns the float64 betas `[T]` of a named schedule (the original code's definitions).

  `cosine` is improved DDPM's schedule (s = 0.008, betas clipped at 0.999); it ignores
  `beta_start` and `beta_end`.
  """
  t = num_diffusion_timesteps
  if t < 1:
    raise ValueError(f'num_diffusion_timesteps must be positive, got {t}.')
  if name == 'linear':
    betas = np.linspace(beta_start, beta_end, t, dtype=np.float64)
  elif name == 'quad':
    betas = np.linspace(beta_start**0.5, beta_end**0.5, t, dtype=np.float64) ** 2
  elif name in ('warmup10', 'warmup50'):
    frac = 0.1 if name == 'warmup10' else 0.5
    betas = beta_end * np.ones(t, dtype=np.float64)
    warmup_time = int(t * frac)
    betas[:warmup_time] = np.linspace(beta_start, beta_end, warmup_time, dtype=np.float64)
  elif name == 'const':
    betas = beta_end * np.ones(t, dtype=np.float64)
  elif name == 'jsd':  # 1/T, 1/(T-1), ..., 1.
    betas = 1.0 / np.linspace(t, 1, t, dtype=np.float64)
  elif name == 'cosine':
    s = 0.008
    steps = np.arange(t + 1, dtype=np.float64) / t
    alphas_cumprod = np.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    betas = np.minimum(1 - alphas_cumprod[1:] / alphas_cumprod[:-1], 0.999)
  else:
    raise ValueError(f'Unknown beta schedule {name!r}; expected one of {BETA_SCHEDULES}.')
  assert betas.shape == (t,)
  return betas


# ----------------------------------------------------------------------------------------------
# Distributions and likelihoods.
# ----------------------------------------------------------------------------------------------


def mean_flat(x: jax.Array) -> jax.Array:
  """Mean over all non-batch dimensions: `[B, ...]` -> `[B]`."""
  return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def normal_kl(mean1, logvar1, mean2, logvar2):
  """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))), elementwise, in nats."""
  return 0.5 * (
    -1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * jnp.exp(-logvar2)
  )


def approx_standard_normal_cdf(x: jax.Array) -> jax.Array:
  """The original code's approximation of the standard normal CDF.

  0.5 (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), written as the identical sigmoid(2 (...)),
  which keeps float32's relative precision in the lower tail instead of rounding it to 0.
  """
  return jax.nn.sigmoid(2.0 * math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3))


def discretized_gaussian_log_likelihood(
  x: jax.Array, *, means: jax.Array, log_scales: jax.Array
) -> jax.Array:
  """Log-likelihood of data x in [-1, 1] (256 levels) under a discretized Gaussian, in nats.

  The decoder L_0 of eq. (13): each pixel's bin is [x - 1/255, x + 1/255], the edge bins
  extend to -inf / +inf, probabilities are clamped at 1e-12 as in the original. The original
  takes CDF(plus) - CDF(min), which cancels to 0 in float32 when the bin lies far above the
  mean; by the CDF's symmetry (1 - CDF(z) = CDF(-z)) this computes the same difference from the
  upper tail there, so float32 agrees with a float64 evaluation. Returns the elementwise
  log-probabilities, shaped like `x`.
  """
  centered_x = x - means
  inv_stdv = jnp.exp(-log_scales)
  plus_in = inv_stdv * (centered_x + 1.0 / 255.0)
  min_in = inv_stdv * (centered_x - 1.0 / 255.0)
  cdf_plus = approx_standard_normal_cdf(plus_in)
  one_minus_cdf_min = approx_standard_normal_cdf(-min_in)
  cdf_delta = jnp.where(
    centered_x > 0,
    one_minus_cdf_min - approx_standard_normal_cdf(-plus_in),
    cdf_plus - approx_standard_normal_cdf(min_in),
  )
  log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
  log_one_minus_cdf_min = jnp.log(jnp.maximum(one_minus_cdf_min, 1e-12))
  log_cdf_delta = jnp.log(jnp.maximum(cdf_delta, 1e-12))
  return jnp.where(
    x < -0.999, log_cdf_plus, jnp.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta)
  )


def _extract(table: jax.Array, t: jax.Array, ndim: int) -> jax.Array:
  """Gathers `table[t]` for t `[B]` and shapes it `[B, 1, ..., 1]` to broadcast over images."""
  return table[t].reshape((t.shape[0],) + (1,) * (ndim - 1))


# ----------------------------------------------------------------------------------------------
# The samplers' timesteps and DPM-Solver++'s coefficients.
# ----------------------------------------------------------------------------------------------

# `step(i, x, prev_pred_xstart, loop_rng) -> {'sample', 'pred_xstart'}` (GaussianDiffusion).
StepFn = Callable[[jax.Array, jax.Array, jax.Array, jax.Array], dict]

THRESHOLDINGS = ('none', 'static', 'dynamic')
# Imagen's dynamic thresholding (Saharia et al. 2022), as DPM-Solver++ uses it: s is this
# quantile of |x_0| over each image, and x_0 becomes clip(x_0, -s, s) / s when s > 1.
DYNAMIC_THRESHOLDING_QUANTILE = 0.995


def ddim_timesteps(num_timesteps: int, num_steps: int) -> np.ndarray:
  """The K = num_steps timesteps (0-based, increasing) of DDIM: i * (T // K), i < K, the
  strided "uniform" skip of the DDIM paper (1 <= K <= T)."""
  return np.arange(num_steps) * (num_timesteps // num_steps)


def respaced_timesteps(num_timesteps: int, num_steps: int) -> np.ndarray:
  """The K = num_steps timesteps (0-based, increasing) of the respaced sampler:
  round(i (T-1) / (K-1)), i < K, K evenly spaced timesteps from 0 to T-1, as improved DDPM's
  respacing with one section (2 <= K <= T)."""
  return np.round(np.arange(num_steps) * ((num_timesteps - 1) / (num_steps - 1))).astype(np.int64)


def dpm_solver_timesteps(num_timesteps: int, num_steps: int) -> np.ndarray:
  """The K = num_steps timesteps (0-based, increasing) at which DPM-Solver++ calls the network:
  round(i (T-1) / K), 0 < i <= K, DPM-Solver's "time_uniform" spacing (uniform in the time of
  its discrete-time wrapper; its authors' code recommends it for high-resolution pixel data)
  rounded onto the model's integer timesteps, with the last point, t = 0, replaced by the data
  itself (diffusers' "linspace" spacing); 1 <= K <= T-1, so that the points are distinct."""
  return np.round(np.arange(1, num_steps + 1) * ((num_timesteps - 1) / num_steps)).astype(np.int64)


def threshold(pred_xstart: jax.Array, thresholding: str) -> jax.Array:
  """x_0 thresholded: 'static' clips it to [-1, 1], 'dynamic' rescales each image by
  s = max(1, the DYNAMIC_THRESHOLDING_QUANTILE quantile of |x_0|) after clipping to [-s, s],
  'none' returns it."""
  _check_choice('thresholding', thresholding, THRESHOLDINGS)
  if thresholding == 'static':
    return jnp.clip(pred_xstart, -1.0, 1.0)
  if thresholding == 'dynamic':
    flat = jnp.abs(pred_xstart).reshape(pred_xstart.shape[0], -1)
    s = jnp.maximum(jnp.quantile(flat, DYNAMIC_THRESHOLDING_QUANTILE, axis=1), 1.0)
    s = s.reshape((-1,) + (1,) * (pred_xstart.ndim - 1))
    return jnp.clip(pred_xstart, -s, s) / s
  return pred_xstart


def subsequence_betas(betas: np.ndarray, timesteps: np.ndarray) -> np.ndarray:
  """float64 [K]: the betas of the process on the increasing timesteps S = `timesteps` [K],
  beta'_k = 1 - abar_{S_k} / abar_{S_{k-1}} (abar_{S_{-1}} = 1), from `betas` [T] in float64:
  log(abar_{S_k} / abar_{S_{k-1}}) is the sum of log(1 - beta_j) over S_{k-1} < j <= S_k."""
  log_alphas = np.log1p(-np.asarray(betas, np.float64))
  segments = np.add.reduceat(log_alphas, np.concatenate([[0], np.asarray(timesteps)[:-1] + 1]))
  return -np.expm1(segments)


def dpm_solver_coefficients(
  sqrt_alphas_cumprod: np.ndarray,
  sqrt_one_minus_alphas_cumprod: np.ndarray,
  num_steps: int,
  first_step: int = 0,
) -> np.ndarray:
  """float32 [K, 3]: per step i of DPM-Solver++(2M), the coefficients (a_i, b_i, c_i) of
  x_{i+1} = a_i x_i + b_i ((1 + c_i) x0_i - c_i x0_{i-1}), computed in float64 from the tables
  alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t) (`GaussianDiffusion.dpm_solver_step` has
  the equations): a_i = sigma_{i+1} / sigma_i, b_i = -alpha_{i+1} expm1(-h_i), c_i = 1 / (2 r_i)
  for first_step < i < K-1 and 0 for the first-order first and last steps; the last is
  (0, 1, 0). first_step: the step a loop starts at (SDEdit starts part-way), which has no x_0
  prediction before it."""
  alpha = np.asarray(sqrt_alphas_cumprod, np.float64)
  sigma = np.asarray(sqrt_one_minus_alphas_cumprod, np.float64)
  taus = dpm_solver_timesteps(alpha.size, num_steps)[::-1]
  lam = np.log(alpha[taus]) - np.log(sigma[taus])
  coefficients = np.zeros((num_steps, 3))
  coefficients[-1] = (0.0, 1.0, 0.0)
  h = np.diff(lam)  # h[i]: from tau_i to tau_{i+1}, i < K-1.
  for i in range(num_steps - 1):
    coefficients[i, 0] = sigma[taus[i + 1]] / sigma[taus[i]]
    coefficients[i, 1] = -alpha[taus[i + 1]] * np.expm1(-h[i])
    if i > first_step:
      coefficients[i, 2] = h[i] / (2.0 * h[i - 1])
  return coefficients.astype(np.float32)


# ----------------------------------------------------------------------------------------------
# The diffusion process.
# ----------------------------------------------------------------------------------------------


@flax.struct.dataclass
class GaussianDiffusion:
  """The forward process q and the learned reverse process p of DDPM, with its tables.

  An immutable pytree: the float32 tables `[T]` are leaves, the type names are static. Make one
  with `GaussianDiffusion.create(...)` or `GaussianDiffusion.from_config(config.diffusion)`.
  """

  betas: jax.Array
  alphas_cumprod: jax.Array
  alphas_cumprod_prev: jax.Array
  sqrt_alphas_cumprod: jax.Array
  sqrt_one_minus_alphas_cumprod: jax.Array
  log_one_minus_alphas_cumprod: jax.Array
  sqrt_recip_alphas_cumprod: jax.Array
  sqrt_recipm1_alphas_cumprod: jax.Array
  posterior_variance: jax.Array
  posterior_log_variance_clipped: jax.Array
  posterior_mean_coef1: jax.Array
  posterior_mean_coef2: jax.Array
  # fixedlarge: beta_t, with entry 0 replaced by the posterior variance at t = 1.
  fixedlarge_variance: jax.Array
  fixedlarge_log_variance: jax.Array
  num_timesteps: int = flax.struct.field(pytree_node=False)
  model_mean_type: str = flax.struct.field(pytree_node=False)
  model_var_type: str = flax.struct.field(pytree_node=False)
  loss_type: str = flax.struct.field(pytree_node=False)
  # The weighting of the mse loss (and of hybrid's L_simple) over t; see `min_snr_weight`.
  loss_weighting: str = flax.struct.field(pytree_node=False, default='none')
  min_snr_gamma: float = flax.struct.field(pytree_node=False, default=5.0)

  @classmethod
  def create(
    cls,
    betas: np.ndarray,
    *,
    model_mean_type: str,
    model_var_type: str,
    loss_type: str,
    loss_weighting: str = 'none',
    min_snr_gamma: float = 5.0,
  ) -> GaussianDiffusion:
    """Builds the tables from float64 `betas` `[T]`; raises ValueError on invalid settings.

    loss_weighting 'none' is the paper's unweighted L_simple; 'min_snr' weights it by
    `min_snr_weight` with gamma = min_snr_gamma (> 0), and needs loss_type 'mse' or 'hybrid'.
    """
    betas = np.asarray(betas, dtype=np.float64)
    if betas.ndim != 1 or betas.size < 2:
      raise ValueError(f'betas must be a 1-D array of at least 2 steps, got shape {betas.shape}.')
    if not np.all((betas > 0) & (betas <= 1)):
      raise ValueError('betas must lie in (0, 1].')
    _check_choice('model_mean_type', model_mean_type, MODEL_MEAN_TYPES)
    _check_choice('model_var_type', model_var_type, MODEL_VAR_TYPES)
    _check_choice('loss_type', loss_type, LOSS_TYPES)
    _check_choice('loss_weighting', loss_weighting, LOSS_WEIGHTINGS)
    if isinstance(min_snr_gamma, bool) or not (
      isinstance(min_snr_gamma, numbers.Real) and min_snr_gamma > 0
    ):
      raise ValueError(f'min_snr_gamma must be a number > 0, got {min_snr_gamma!r}.')
    if loss_weighting == 'min_snr' and loss_type == 'kl':
      raise ValueError(
        "loss_weighting 'min_snr' weights the mse loss (and the L_simple term of 'hybrid'); "
        "loss_type 'kl' has none: use loss_weighting 'none' or loss_type 'mse' or 'hybrid'."
      )
    learned_var = model_var_type in LEARNED_VAR_TYPES
    if loss_type == 'mse' and learned_var:
      raise ValueError(
        f"loss_type 'mse' cannot train a learned variance (model_var_type {model_var_type!r}); "
        "use 'hybrid' or 'kl', or a fixed variance type."
      )
    if loss_type == 'hybrid' and not learned_var:
      raise ValueError(
        "loss_type 'hybrid' trains the variance through its bound term and needs "
        f"model_var_type 'learned' or 'learned_range', got {model_var_type!r}."
      )

    alphas = 1.0 - betas
    alphas_cumprod = np.cumprod(alphas)
    # `jsd` ends with beta = 1, i.e. abar = 0 (pure noise); 1 / abar is then inf there, as in
    # the original code.
    with np.errstate(divide='ignore'):
      recip_alphas_cumprod = 1.0 / alphas_cumprod
    alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])  # abar_{-1} = 1.
    # Posterior q(x_{t-1} | x_t, x_0), eqs. (6)-(7).
    posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
    fixedlarge_variance = np.append(posterior_variance[1], betas[1:])
    tables = dict(
      betas=betas,
      alphas_cumprod=alphas_cumprod,
      alphas_cumprod_prev=alphas_cumprod_prev,
      sqrt_alphas_cumprod=np.sqrt(alphas_cumprod),
      sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - alphas_cumprod),
      log_one_minus_alphas_cumprod=np.log(1.0 - alphas_cumprod),
      sqrt_recip_alphas_cumprod=np.sqrt(recip_alphas_cumprod),
      sqrt_recipm1_alphas_cumprod=np.sqrt(recip_alphas_cumprod - 1.0),
      posterior_variance=posterior_variance,
      # var(t = 0) = 0, so the log is clipped by replacing entry 0 with entry 1.
      posterior_log_variance_clipped=np.log(
        np.append(posterior_variance[1], posterior_variance[1:])
      ),
      posterior_mean_coef1=betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
      posterior_mean_coef2=(1.0 - alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - alphas_cumprod),
      fixedlarge_variance=fixedlarge_variance,
      fixedlarge_log_variance=np.log(fixedlarge_variance),
    )
    return cls(
      **{k: jnp.asarray(v, dtype=jnp.float32) for k, v in tables.items()},
      num_timesteps=int(betas.size),
      model_mean_type=model_mean_type,
      model_var_type=model_var_type,
      loss_type=loss_type,
      loss_weighting=loss_weighting,
      min_snr_gamma=float(min_snr_gamma),
    )

  @classmethod
  def from_config(cls, config) -> GaussianDiffusion:
    """Builds the process from a `config.diffusion` ConfigDict (see configs/default.py)."""
    betas = get_beta_schedule(
      config.beta_schedule,
      beta_start=config.beta_start,
      beta_end=config.beta_end,
      num_diffusion_timesteps=config.num_diffusion_timesteps,
    )
    return cls.create(
      betas,
      model_mean_type=config.model_mean_type,
      model_var_type=config.model_var_type,
      loss_type=config.loss_type,
      loss_weighting=config.loss_weighting,
      min_snr_gamma=config.min_snr_gamma,
    )

  @property
  def learned_variance(self) -> bool:
    """Whether the network emits 2C channels, the second half a variance output."""
    return self.model_var_type in LEARNED_VAR_TYPES

  # --- The forward process q. ----------------------------------------------------------------

  def q_mean_variance(self, x_start, t):
    """Mean, variance and log-variance of q(x_t | x_0) (eq. 4)."""
    mean = _extract(self.sqrt_alphas_cumprod, t, x_start.ndim) * x_start
    variance = _extract(1.0 - self.alphas_cumprod, t, x_start.ndim)
    log_variance = _extract(self.log_one_minus_alphas_cumprod, t, x_start.ndim)
    return mean, variance, log_variance

  def q_sample(self, x_start, t, noise):
    """Draws x_t ~ q(x_t | x_0) = sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise (eq. 4)."""
    return (
      _extract(self.sqrt_alphas_cumprod, t, x_start.ndim) * x_start
      + _extract(self.sqrt_one_minus_alphas_cumprod, t, x_start.ndim) * noise
    )

  def q_posterior_mean_variance(self, x_start, x_t, t):
    """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0) (eqs. 6-7)."""
    mean = (
      _extract(self.posterior_mean_coef1, t, x_t.ndim) * x_start
      + _extract(self.posterior_mean_coef2, t, x_t.ndim) * x_t
    )
    variance = _extract(self.posterior_variance, t, x_t.ndim)
    log_variance_clipped = _extract(self.posterior_log_variance_clipped, t, x_t.ndim)
    return mean, variance, log_variance_clipped

  # --- The reverse process p. ----------------------------------------------------------------

  def predict_xstart_from_eps(self, x_t, t, eps):
    """x_0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t), the inverse of eq. (4)."""
    return (
      _extract(self.sqrt_recip_alphas_cumprod, t, x_t.ndim) * x_t
      - _extract(self.sqrt_recipm1_alphas_cumprod, t, x_t.ndim) * eps
    )

  def predict_eps_from_xstart(self, x_t, t, pred_xstart):
    """eps = (x_t / sqrt(abar_t) - x_0) / sqrt(1 / abar_t - 1), the inverse of eq. (4)."""
    return (_extract(self.sqrt_recip_alphas_cumprod, t, x_t.ndim) * x_t - pred_xstart) / _extract(
      self.sqrt_recipm1_alphas_cumprod, t, x_t.ndim
    )

  def velocity(self, x_start, t, noise):
    """v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0, the target of the `v` mean type.

    Progressive distillation (Salimans & Ho 2022, sec. 4): with x_t = alpha_t x_0 + sigma_t eps
    (eq. 4 here: alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t), alpha_t^2 + sigma_t^2 = 1)
    seen as a rotation of (x_0, eps) by the angle phi_t = arctan(sigma_t / alpha_t),
    v = d x_t / d phi_t = alpha_t eps - sigma_t x_0 is its velocity. Shaped like x_start.
    """
    return (
      _extract(self.sqrt_alphas_cumprod, t, x_start.ndim) * noise
      - _extract(self.sqrt_one_minus_alphas_cumprod, t, x_start.ndim) * x_start
    )

  def predict_xstart_from_v(self, x_t, t, v):
    """x_0 = sqrt(abar_t) x_t - sqrt(1 - abar_t) v (Salimans & Ho 2022, sec. 4).

    From x_t = alpha_t x_0 + sigma_t eps and v = alpha_t eps - sigma_t x_0:
    alpha_t x_t - sigma_t v = (alpha_t^2 + sigma_t^2) x_0 = x_0. Unlike x_0 from eps, this
    divides by nothing, so it is as well conditioned at t = T-1 as at t = 0.
    """
    return (
      _extract(self.sqrt_alphas_cumprod, t, x_t.ndim) * x_t
      - _extract(self.sqrt_one_minus_alphas_cumprod, t, x_t.ndim) * v
    )

  def predict_xstart_from_xprev(self, x_t, t, xprev):
    """Inverts the posterior mean (eq. 7) for x_0 given mu = x_{t-1} prediction."""
    coef1 = _extract(self.posterior_mean_coef1, t, x_t.ndim)
    coef2 = _extract(self.posterior_mean_coef2, t, x_t.ndim)
    return (xprev - coef2 * x_t) / coef1

  def _model_log_variance(self, var_output, x, t):
    """The log-variance of p(x_{t-1} | x_t), `[B, H, W, C]` or broadcastable to it."""
    if self.model_var_type == 'learned':
      return var_output
    if self.model_var_type == 'learned_range':
      # Improved DDPM eq. (15): interpolate log beta_t and the clipped log posterior variance.
      min_log = _extract(self.posterior_log_variance_clipped, t, x.ndim)
      max_log = _extract(jnp.log(self.betas), t, x.ndim)
      frac = (var_output + 1.0) / 2.0
      return frac * max_log + (1.0 - frac) * min_log
    if self.model_var_type == 'fixedlarge':
      return _extract(self.fixedlarge_log_variance, t, x.ndim)
    return _extract(self.posterior_log_variance_clipped, t, x.ndim)

  def _split_output(self, model_output, x) -> tuple[jax.Array, jax.Array | None]:
    """The network output as (mean output, variance output or None) for this variance type."""
    if not self.learned_variance:
      return model_output, None
    channels = x.shape[-1]
    if model_output.shape[-1] != 2 * channels:
      raise ValueError(
        f'model_var_type {self.model_var_type!r} needs {2 * channels} output channels, '
        f'got {model_output.shape[-1]}.'
      )
    return model_output[..., :channels], model_output[..., channels:]

  def _predict_xstart(self, model_output, x, t, clip_denoised: bool):
    """The x_0 that the mean output (eps, x_0, x_{t-1} or v) at timestep t of this process
    implies, clipped when asked. Every sampler and the bound read the network through this."""
    if self.model_mean_type == 'xprev':
      pred_xstart = self.predict_xstart_from_xprev(x, t, model_output)
    elif self.model_mean_type == 'xstart':
      pred_xstart = model_output
    elif self.model_mean_type == 'v':
      pred_xstart = self.predict_xstart_from_v(x, t, model_output)
    else:
      pred_xstart = self.predict_xstart_from_eps(x, t, model_output)
    return jnp.clip(pred_xstart, -1.0, 1.0) if clip_denoised else pred_xstart

  def p_mean_variance(self, model_fn: ModelFn, x, t, clip_denoised: bool = True):
    """Mean and variance of p(x_{t-1} | x_t) (eq. 1) and the predicted x_0.

    Returns a dict of `mean`, `variance`, `log_variance` (each shaped like x, or
    `[B, 1, 1, 1]` for fixed variances) and `pred_xstart` (clipped to [-1, 1] when
    `clip_denoised`).
    """
    model_output, var_output = self._split_output(model_fn(x, t), x)
    log_variance = self._model_log_variance(var_output, x, t)
    pred_xstart = self._predict_xstart(model_output, x, t, clip_denoised)
    if self.model_mean_type == 'xprev':
      mean = model_output
    else:
      mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x, t)
    return {
      'mean': mean,
      'variance': jnp.exp(log_variance),
      'log_variance': log_variance,
      'pred_xstart': pred_xstart,
    }

  def p_sample(self, model_fn: ModelFn, x, t, rng, clip_denoised: bool = True):
    """One ancestral step x_{t-1} ~ p(x_{t-1} | x_t) (Algorithm 2); no noise where t == 0.

    Returns a dict of `sample` (x_{t-1}) and `pred_xstart`.
    """
    out = self.p_mean_variance(model_fn, x, t, clip_denoised=clip_denoised)
    noise = jax.random.normal(rng, x.shape, x.dtype)
    nonzero_mask = (t != 0).astype(x.dtype).reshape((x.shape[0],) + (1,) * (x.ndim - 1))
    sample = out['mean'] + nonzero_mask * jnp.exp(0.5 * out['log_variance']) * noise
    return {'sample': sample, 'pred_xstart': out['pred_xstart']}

  def sample_loop_init(self, shape, rng) -> tuple[jax.Array, jax.Array]:
    """How every sampler here starts: x_T ~ N(0, I) float32 `shape` and the per-step key.

    `(init_rng, loop_rng) = split(rng)` and x_T = normal(init_rng, shape); a stochastic step at
    timestep t then draws its noise from `fold_in(loop_rng, t)`, so samplers that share a seed
    share their trajectory whatever the way their loop is split.
    """
    init_rng, loop_rng = jax.random.split(rng)
    return jax.random.normal(init_rng, shape, jnp.float32), loop_rng

  # --- Samplers as step functions. -----------------------------------------------------------
  # A sampler of K steps is a `StepFn`, `step(i, x, prev_pred_xstart, loop_rng)` -> dict of
  # `sample` and `pred_xstart`: step i (0 <= i < K, traced) maps the state after i steps to the
  # state after i + 1, evaluating the network once. prev_pred_xstart is the pred_xstart of step
  # i - 1 (any array shaped like x at i = 0): only DPM-Solver++'s multistep update reads it.
  # `sample_steps` runs a range of steps in one loop, `sample_loop` all K from `sample_loop_init`.

  def ancestral_step(self, model_fn: ModelFn) -> StepFn:
    """The paper's Algorithm 2 (K = T): step i is `p_sample` at t = T-1-i with the noise of
    `fold_in(loop_rng, t)`."""

    def step(i, x, prev_pred_xstart, loop_rng):
      del prev_pred_xstart
      t_scalar = self.num_timesteps - 1 - i
      t = jnp.full((x.shape[0],), t_scalar, dtype=jnp.int32)
      return self.p_sample(model_fn, x, t, jax.random.fold_in(loop_rng, t_scalar))

    return step

  def ddim_step(
    self, model_fn: ModelFn, *, num_steps: int, eta: float = 0.0, clip_denoised: bool = True
  ) -> StepFn:
    """DDIM (Song et al. 2021, eq. 12) on the `num_steps` timesteps of `ddim_timesteps`.

    Step i goes from t = ts[K-1-i] to ts[K-2-i] (to x_0, abar = 1, at the last step). eta = 0 is
    the deterministic sampler, eta = 1 has the variance of the ancestral sampler, with the noise
    of `fold_in(loop_rng, t)`. The predicted x_0 is clipped when `clip_denoised` and the noise
    is recomputed from it.
    """
    timesteps = jnp.asarray(ddim_timesteps(self.num_timesteps, num_steps))

    def step(i, x, prev_pred_xstart, loop_rng):
      del prev_pred_xstart
      t_scalar = timesteps[num_steps - 1 - i]
      t = jnp.full((x.shape[0],), t_scalar, dtype=jnp.int32)
      pred_xstart = self.p_mean_variance(model_fn, x, t, clip_denoised)['pred_xstart']
      eps = self.predict_eps_from_xstart(x, t, pred_xstart)
      alpha_bar = _extract(self.alphas_cumprod, t, x.ndim)
      t_prev = timesteps[jnp.maximum(num_steps - 2 - i, 0)]
      alpha_bar_prev = jnp.where(i == num_steps - 1, 1.0, self.alphas_cumprod[t_prev])
      sigma = (
        eta
        * jnp.sqrt((1.0 - alpha_bar_prev) / (1.0 - alpha_bar))
        * jnp.sqrt(1.0 - alpha_bar / alpha_bar_prev)
      )
      noise = jax.random.normal(jax.random.fold_in(loop_rng, t_scalar), x.shape, jnp.float32)
      sample = (
        jnp.sqrt(alpha_bar_prev) * pred_xstart
        + jnp.sqrt(1.0 - alpha_bar_prev - sigma**2) * eps
        + sigma * noise
      )
      return {'sample': sample, 'pred_xstart': pred_xstart}

    return step

  def respaced(self, num_steps: int) -> GaussianDiffusion:
    """The process on the subsequence S = `respaced_timesteps(T, K)` (improved DDPM,
    Nichol & Dhariwal 2021, sec. 4): abar'_k = abar_{S_k}, beta'_k = 1 - abar_{S_k} / abar_{S_{k-1}}
    (abar_{S_{-1}} = 1), and every table recomputed from these betas (float64, from the float32
    betas of this process, which must be concrete). Its index k stands for timestep S_k here.
    Raises ValueError for model_var_type 'learned', which has no respaced counterpart."""
    if self.model_var_type == 'learned':
      raise ValueError(
        "The respaced sampler cannot use model_var_type 'learned': its output is the variance "
        "of one step of T; use 'learned_range', a fixed variance, or another sampler."
      )
    return GaussianDiffusion.create(
      subsequence_betas(self.betas, respaced_timesteps(self.num_timesteps, num_steps)),
      model_mean_type=self.model_mean_type,
      model_var_type=self.model_var_type,
      loss_type=self.loss_type,
      loss_weighting=self.loss_weighting,
      min_snr_gamma=self.min_snr_gamma,
    )

  def respaced_step(
    self, model_fn: ModelFn, *, num_steps: int, clip_denoised: bool = True
  ) -> StepFn:
    """Ancestral sampling (eq. 1, Algorithm 2) of the `respaced(num_steps)` process.

    Step i is k = K-1-i, t = S_k: the network, called at t, gives the predicted x_0 as this
    process reads its output (eps, x_0, the posterior mean of its one step t -> t-1 inverted
    with this process's eq. 7, or v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0 with this
    process's abar_t: the tables of the T-step process at t, which the network was trained on,
    never the respaced ones at k), clipped when `clip_denoised`; x_{S_{k-1}} is drawn from the
    respaced posterior q'(x_{k-1} | x_k, x_0) mean with the respaced fixed variance (beta'_k or
    the posterior variance), or improved DDPM's learned_range interpolation of the two, and the
    noise of `fold_in(loop_rng, t)`; none at k = 0, whose mean is the predicted x_0.
    """
    respaced = self.respaced(num_steps)
    timesteps = jnp.asarray(respaced_timesteps(self.num_timesteps, num_steps))

    def step(i, x, prev_pred_xstart, loop_rng):
      del prev_pred_xstart
      k = jnp.full((x.shape[0],), num_steps - 1 - i, dtype=jnp.int32)
      t_scalar = timesteps[num_steps - 1 - i]
      t = jnp.full((x.shape[0],), t_scalar, dtype=jnp.int32)
      model_output, var_output = self._split_output(model_fn(x, t), x)
      pred_xstart = self._predict_xstart(model_output, x, t, clip_denoised)
      mean, _, _ = respaced.q_posterior_mean_variance(pred_xstart, x, k)
      log_variance = respaced._model_log_variance(var_output, x, k)
      noise = jax.random.normal(jax.random.fold_in(loop_rng, t_scalar), x.shape, x.dtype)
      nonzero_mask = (k != 0).astype(x.dtype).reshape((x.shape[0],) + (1,) * (x.ndim - 1))
      sample = mean + nonzero_mask * jnp.exp(0.5 * log_variance) * noise
      return {'sample': sample, 'pred_xstart': pred_xstart}

    return step

  def dpm_solver_step(
    self, model_fn: ModelFn, *, num_steps: int, thresholding: str = 'static', first_step: int = 0
  ) -> StepFn:
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2: multistep, second order, data prediction).

    Time points tau_0 > ... > tau_{K-1}, the timesteps of `dpm_solver_timesteps`
    in decreasing order, then tau_K = the data (alpha = 1, sigma = 0, lambda = +inf), with
    alpha = sqrt(abar), sigma = sqrt(1 - abar) and lambda = log(alpha / sigma) from this
    process's discrete tables. Step i evaluates x0_i = x0_hat(x, tau_i) (from the model's eps,
    x_0, posterior mean or v; `thresholding` below) and, with h_i = lambda_{tau_{i+1}} -
    lambda_{tau_i} and r_i = h_{i-1} / h_i, moves to
      x_{i+1} = (sigma_{i+1} / sigma_i) x_i - alpha_{i+1} (exp(-h_i) - 1) D_i,
      D_i = (1 + 1 / (2 r_i)) x0_i - (1 / (2 r_i)) x0_{i-1},
    taking D_i = x0_i (first order, DDIM) at the first step and at the last, which lands on the
    data: x_K = x0_{K-1}. thresholding: 'static' clips x0_hat to [-1, 1] (as the other samplers
    here do), 'dynamic' is Imagen's (Saharia et al. 2022), which the DPM-Solver++ paper
    combines with its solver for pixel-space models, 'none' leaves it. first_step: the step the
    loop starts at (SDEdit starts part-way: `ddpm_jax/editing.py`), taken first order too.
    """
    coefficients = jnp.asarray(
      dpm_solver_coefficients(
        self.sqrt_alphas_cumprod, self.sqrt_one_minus_alphas_cumprod, num_steps, first_step
      )
    )
    timesteps = jnp.asarray(dpm_solver_timesteps(self.num_timesteps, num_steps))

    def step(i, x, prev_pred_xstart, loop_rng):
      del loop_rng
      t = jnp.full((x.shape[0],), timesteps[num_steps - 1 - i], dtype=jnp.int32)
      model_output, _ = self._split_output(model_fn(x, t), x)
      pred_xstart = threshold(self._predict_xstart(model_output, x, t, False), thresholding)
      x_coef, d_coef, prev_weight = coefficients[i]
      d = (1.0 + prev_weight) * pred_xstart - prev_weight * prev_pred_xstart
      return {'sample': x_coef * x + d_coef * d, 'pred_xstart': pred_xstart}

    return step

  def sample_steps(self, step: StepFn, x, pred_xstart, loop_rng, start, stop):
    """Steps [start, stop) of a sampler's `step` applied to x, in one `lax.fori_loop`.

    pred_xstart is that of step start - 1 (any array shaped like x when start = 0). `start` and
    `stop` may be traced; the result does not depend on how [0, K) is split into ranges. Returns
    a dict of `sample` (x after the steps) and `pred_xstart` (that of step stop - 1; the one
    given when the range is empty), both shaped like x.
    """

    def body(i, carry):
      out = step(i, *carry, loop_rng)
      return out['sample'], out['pred_xstart']

    sample, pred_xstart = jax.lax.fori_loop(start, stop, body, (x, pred_xstart))
    return {'sample': sample, 'pred_xstart': pred_xstart}

  def sample_loop(self, step: StepFn, num_steps: int, shape, rng):
    """Draws samples `shape` = [B, H, W, C]: all `num_steps` steps of `step` from
    `sample_loop_init(shape, rng)`."""
    x_init, loop_rng = self.sample_loop_init(shape, rng)
    return self.sample_steps(step, x_init, jnp.zeros_like(x_init), loop_rng, 0, num_steps)['sample']

  def p_sample_loop(self, model_fn: ModelFn, shape, rng):
    """Draws samples `shape` = [B, H, W, C] with all T ancestral steps (Algorithm 2)."""
    return self.sample_loop(self.ancestral_step(model_fn), self.num_timesteps, shape, rng)

  def p_sample_loop_progressive(self, model_fn: ModelFn, shape, rng, every: int):
    """`p_sample_loop` that also records x_t and the predicted x_0 every `every` steps.

    Snapshots are taken at t = T-1, T-1-every, ..., i.e. T // every of them (paper Fig. 6);
    `every` must divide T. Returns `(samples, snapshots)` where samples equal
    `p_sample_loop(model_fn, shape, rng)` and snapshots is a dict of `t` `[K]`, `x_t`
    `[K, B, H, W, C]` and `pred_xstart` `[K, B, H, W, C]`.
    """
    if every < 1 or self.num_timesteps % every:
      raise ValueError(f'every={every} must be a positive divisor of T={self.num_timesteps}.')
    x_init, loop_rng = self.sample_loop_init(shape, rng)
    step = self.ancestral_step(model_fn)

    def chunk(x, k):
      first = k * every
      out = self.sample_steps(step, x, jnp.zeros_like(x), loop_rng, first, first + 1)
      x_next = self.sample_steps(
        step, out['sample'], out['pred_xstart'], loop_rng, first + 1, first + every
      )['sample']
      snapshot = {
        't': self.num_timesteps - 1 - first,
        'x_t': x,
        'pred_xstart': out['pred_xstart'],
      }
      return x_next, snapshot

    samples, snapshots = jax.lax.scan(chunk, x_init, jnp.arange(self.num_timesteps // every))
    return samples, snapshots

  # --- Losses and the variational bound. -----------------------------------------------------

  def _vb_terms_bpd(self, model_fn: ModelFn, x_start, x_t, t, clip_denoised: bool):
    """The bound term L_{t-1} (eq. 5) in bits/dim, `[B]`: the KL for t > 0, the decoder NLL
    at t == 0. Also returns the predicted x_0."""
    true_mean, _, true_log_variance = self.q_posterior_mean_variance(x_start, x_t, t)
    out = self.p_mean_variance(model_fn, x_t, t, clip_denoised=clip_denoised)
    kl = normal_kl(true_mean, true_log_variance, out['mean'], out['log_variance'])
    kl = mean_flat(kl) / math.log(2.0)
    decoder_nll = -discretized_gaussian_log_likelihood(
      x_start, means=out['mean'], log_scales=0.5 * out['log_variance']
    )
    decoder_nll = mean_flat(decoder_nll) / math.log(2.0)
    return jnp.where(t == 0, decoder_nll, kl), out['pred_xstart']

  def min_snr_weight(self, t):
    """Min-SNR-gamma (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting
    Strategy"), `[B]`: the weight of the mse loss in this mean type's target space at timesteps
    t `[B]`, with gamma = `min_snr_gamma`.

    Hang et al. weight the x_0-space loss ||x_0 - x0_hat||^2 by min(SNR_t, gamma), with
    SNR_t = alpha_t^2 / sigma_t^2 = abar_t / (1 - abar_t). The mse loss is taken in the target
    space of the mean type, whose error is a fixed multiple of the x_0 error at each t:
      eps:    x0_hat = (x_t - sigma_t eps_hat) / alpha_t (eq. 4), so
              x_0 - x0_hat = (sigma_t / alpha_t)(eps_hat - eps), ||.||^2 = ||eps err||^2 / SNR_t
              and the weight is min(SNR_t, gamma) / SNR_t = gamma / max(SNR_t, gamma);
      xstart: the x_0 error itself: min(SNR_t, gamma);
      v:      x0_hat = alpha_t x_t - sigma_t v_hat (`predict_xstart_from_v`), so
              x_0 - x0_hat = sigma_t (v_hat - v), ||.||^2 = sigma_t^2 ||v err||^2 with
              sigma_t^2 = 1 / (SNR_t + 1): min(SNR_t, gamma) / (SNR_t + 1)
              = min(alpha_t^2, gamma sigma_t^2);
      xprev:  mu = coef1_t x_0 + coef2_t x_t (eq. 7), so mu - mu_hat = coef1_t (x_0 - x0_hat):
              min(SNR_t, gamma) / coef1_t^2 (coef1 = `posterior_mean_coef1`, 1 at t = 0).
    With gamma >= max_t SNR_t only the eps weight is 1 (the unweighted L_simple); the others
    become the x_0-space SNR weighting, which equals the eps loss of the implied eps.
    alpha_t^2 and sigma_t^2 are squared from their float32 tables (each the float64 value
    rounded), not 1 - abar_t from float32 abar_t, which loses digits at small t.
    """
    alpha2 = self.sqrt_alphas_cumprod[t] ** 2
    sigma2 = self.sqrt_one_minus_alphas_cumprod[t] ** 2
    gamma = self.min_snr_gamma
    snr = alpha2 / sigma2
    if self.model_mean_type == 'eps':
      return gamma / jnp.maximum(snr, gamma)  # No 0 / 0 where abar_t = 0 (`jsd` at T-1).
    if self.model_mean_type == 'xstart':
      return jnp.minimum(snr, gamma)
    if self.model_mean_type == 'v':
      return jnp.minimum(alpha2, gamma * sigma2)
    return jnp.minimum(snr, gamma) / self.posterior_mean_coef1[t] ** 2

  def training_losses(self, model_fn: ModelFn, x_start, t, noise):
    """The per-example training loss `[B]` at timesteps t with the given noise.

    `mse`: L_simple (eq. 14) generalized to the mean type's target (noise, x_0, the posterior
    mean, or v = `velocity`, Salimans & Ho 2022); `kl`: the bound term L_{t-1} in bits/dim;
    `hybrid`: improved DDPM's L_simple + lambda L_vlb, where the one-term estimate of L_vlb is
    T * L_{t-1} and the bound term sees the mean through a stop-gradient, so it trains only the
    variance. With loss_weighting 'min_snr' the mse term (L_simple) is multiplied by
    `min_snr_weight(t)`; 'none' leaves it as the paper's.
    """
    x_t = self.q_sample(x_start, t, noise)
    if self.loss_type == 'kl':
      return self._vb_terms_bpd(model_fn, x_start, x_t, t, clip_denoised=False)[0]

    model_output = model_fn(x_t, t)
    channels = x_start.shape[-1]
    mean_output = model_output[..., :channels]
    if self.model_mean_type == 'eps':
      target = noise
    elif self.model_mean_type == 'xstart':
      target = x_start
    elif self.model_mean_type == 'v':
      target = self.velocity(x_start, t, noise)
    else:
      target = self.q_posterior_mean_variance(x_start, x_t, t)[0]
    loss = mean_flat((target - mean_output) ** 2)
    if self.loss_weighting == 'min_snr':
      loss = self.min_snr_weight(t) * loss
    if self.loss_type == 'hybrid':
      frozen_output = jnp.concatenate(
        [jax.lax.stop_gradient(mean_output), model_output[..., channels:]], axis=-1
      )
      vb, _ = self._vb_terms_bpd(lambda *_: frozen_output, x_start, x_t, t, clip_denoised=False)
      loss = loss + HYBRID_VB_WEIGHT * self.num_timesteps * vb
    return loss

  def prior_bpd(self, x_start):
    """KL(q(x_T | x_0) || N(0, I)) in bits/dim, `[B]` (L_T of eq. 5)."""
    t = jnp.full((x_start.shape[0],), self.num_timesteps - 1, dtype=jnp.int32)
    mean, _, log_variance = self.q_mean_variance(x_start, t)
    kl = normal_kl(mean, log_variance, 0.0, 0.0)
    return mean_flat(kl) / math.log(2.0)

  def calc_bpd_loop(self, model_fn: ModelFn, x_start, rng, clip_denoised: bool = True):
    """The full variational bound (eq. 5) of x_0 in bits/dim, one compiled loop over all t.

    The noise of term t is `normal(fold_in(rng, t), x_start.shape)`. Returns a dict of
    `total_bpd` `[B]`, `prior_bpd` `[B]`, `terms_bpd` `[B, T]` (L_{t-1} at index t, the decoder
    at index 0) and `mse` `[B, T]` (squared error of the predicted x_0).
    """

    def term(_, t_scalar):
      t = jnp.full((x_start.shape[0],), t_scalar, dtype=jnp.int32)
      noise = jax.random.normal(jax.random.fold_in(rng, t_scalar), x_start.shape, x_start.dtype)
      x_t = self.q_sample(x_start, t, noise)
      vb, pred_xstart = self._vb_terms_bpd(model_fn, x_start, x_t, t, clip_denoised)
      return None, (vb, mean_flat((pred_xstart - x_start) ** 2))

    _, (terms_bpd, mse) = jax.lax.scan(term, None, jnp.arange(self.num_timesteps))
    terms_bpd, mse = terms_bpd.T, mse.T
    prior_bpd = self.prior_bpd(x_start)
    return {
      'total_bpd': jnp.sum(terms_bpd, axis=1) + prior_bpd,
      'prior_bpd': prior_bpd,
      'terms_bpd': terms_bpd,
      'mse': mse,
    }


def _check_choice(field: str, value: str, choices: tuple[str, ...]) -> None:
  if value not in choices:
    raise ValueError(f'Unknown {field} {value!r}; expected one of {choices}.')

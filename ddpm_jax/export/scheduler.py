"""The diffusion of a run as the config of diffusers' `DDPMScheduler` (scheduler_config.json).

What each setting means in diffusers was read from its DDPMScheduler (0.42; `__init__`, `step`,
`_get_variance`), and only what samples as ours does is mapped:
- betas: our schedules that it names with the same betas (to float32 rounding, as
  tests/test_export.py checks): 'linear' (beta_start..beta_end), 'quad' (its 'scaled_linear':
  the squares of a linspace of square roots) and improved DDPM's 'cosine' (its
  'squaredcos_cap_v2', GLIDE's: s = 0.008, betas clipped at 0.999); any other schedule as its
  float64 betas, `trained_betas`.
- the mean output: eps -> 'epsilon', xstart -> 'sample', v -> 'v_prediction' (x_0 =
  sqrt(abar_t) x_t - sqrt(1 - abar_t) v there as here). No prediction type is the posterior mean
  itself: an xprev network is refused.
- the variance: fixedlarge -> 'fixed_large' (beta_t), fixedsmall -> 'fixed_small' (the
  posterior variance), learned_range -> 'learned_range' (improved DDPM's interpolation of their
  logs by (v + 1) / 2). They differ from ours only at t = 0 (diffusers: beta_0, the unclipped
  posterior variance 0 clamped at 1e-20, and its log; ours: the posterior variance at t = 1),
  where neither sampler adds noise. diffusers' 'learned' takes the network's variance output as
  the variance itself, ours as its log: a learned model is refused.
- the predicted x_0 is clipped to [-1, 1] (clip_sample, clip_sample_range 1.0), as our samplers
  clip it.
diffusers computes its tables in float32 (REFERENCE.md), ours in float64: the same process, to
float32 rounding (tests/test_export.py has the numbers).
"""

from typing import Any

import ml_collections
import numpy as np

from ddpm_jax import diffusion as diffusion_lib

# Our beta schedule -> diffusers' beta_schedule of the same betas.
BETA_SCHEDULES = {'linear': 'linear', 'quad': 'scaled_linear', 'cosine': 'squaredcos_cap_v2'}
# Our model_mean_type -> diffusers' prediction_type.
PREDICTION_TYPES = {'eps': 'epsilon', 'xstart': 'sample', 'v': 'v_prediction'}
# Our model_var_type -> diffusers' variance_type.
VARIANCE_TYPES = {
  'fixedlarge': 'fixed_large',
  'fixedsmall': 'fixed_small',
  'learned_range': 'learned_range',
}
# What diffusers' DDPMScheduler cannot sample as ours does, and why.
_REFUSED = {
  ('model_mean_type', 'xprev'): (
    'the network predicts the posterior mean x_{t-1}, and DDPMScheduler has no prediction type '
    "for it (only 'epsilon', 'sample' and 'v_prediction')"
  ),
  ('model_var_type', 'learned'): (
    "the network's variance output is a log-variance, and DDPMScheduler's variance_type "
    "'learned' takes it as the variance itself (its 'learned_range', improved DDPM's, is "
    'exported as ours)'
  ),
}


def scheduler_config(diffusion: ml_collections.ConfigDict) -> dict[str, Any]:
  """The `DDPMScheduler` config (scheduler_config.json) of a `config.diffusion` section.

  Raises:
    ValueError: before anything is computed, for a diffusion that DDPMScheduler cannot sample
      (an xprev network, a learned log-variance), naming the setting and why.
  """
  for (field, value), why in _REFUSED.items():
    if diffusion[field] == value:
      raise ValueError(
        f"diffusers cannot sample this model (diffusion.{field} = '{value}'): {why}."
      )
  num_timesteps = diffusion.num_diffusion_timesteps
  betas = diffusion_lib.get_beta_schedule(
    diffusion.beta_schedule,
    beta_start=diffusion.beta_start,
    beta_end=diffusion.beta_end,
    num_diffusion_timesteps=num_timesteps,
  )
  config = {'_class_name': 'DDPMScheduler', 'num_train_timesteps': num_timesteps}
  if diffusion.beta_schedule in BETA_SCHEDULES:
    config['beta_schedule'] = BETA_SCHEDULES[diffusion.beta_schedule]
    config['beta_start'] = float(diffusion.beta_start)
    config['beta_end'] = float(diffusion.beta_end)
    config['trained_betas'] = None
  else:
    config['trained_betas'] = [float(beta) for beta in np.asarray(betas, np.float64)]
  return {
    **config,
    'variance_type': VARIANCE_TYPES[diffusion.model_var_type],
    'prediction_type': PREDICTION_TYPES[diffusion.model_mean_type],
    'clip_sample': True,
    'clip_sample_range': 1.0,
    'thresholding': False,
  }

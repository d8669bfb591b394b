"""The diffusion of a run as the config of diffusers' `DDPMScheduler` (scheduler_config.json),
written by the export (`scheduler_config`), and such a config read back by the importer as the
`config.diffusion` fields it sets (`diffusion_from_scheduler`, `load_scheduler`), through the same
tables.

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

Reading is the inverse, for `DDPMScheduler` and the schedulers that describe the same training
diffusion with the same keys (`SCHEDULER_CLASSES`: the Hub's DDPM repos and pipelines carry
DDIM, PNDM and DPM-Solver configs too), keys a config omits taking DDPMScheduler's defaults:
`trained_betas` become the schedule of ours that gives them (to float32 rounding, which is all
that diffusers keeps of them), with the config's beta_start / beta_end or their first and last
beta. What ddpm-jax cannot sample as diffusers would is refused, naming the key and its value:
another beta schedule, betas none of ours gives, another prediction or variance type, no
clipping or another range, dynamic thresholding, zero-terminal-SNR rescaling. The keys that set
only how their own samplers step (timestep_spacing, steps_offset, set_alpha_to_one, solver
orders, ...) are not part of the diffusion and are not read. A scheduler without a variance
(all but DDPMScheduler) leaves `model_var_type` to the config.
"""

import json
import os
from collections.abc import Mapping
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
  config = {
    '_class_name': 'DDPMScheduler',
    'num_train_timesteps': num_timesteps,
    # Written for every schedule, though diffusers reads them only for a named one: the importer
    # gives trained betas back the schedule's own beta_start and beta_end.
    'beta_start': float(diffusion.beta_start),
    'beta_end': float(diffusion.beta_end),
  }
  if diffusion.beta_schedule in BETA_SCHEDULES:
    config['beta_schedule'] = BETA_SCHEDULES[diffusion.beta_schedule]
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


# ---------------------------------------------------------------------------------------------
# And back: a scheduler config as the diffusion of a project config (the importer).
# ---------------------------------------------------------------------------------------------

# The scheduler classes whose config describes the training diffusion as DDPMScheduler's does.
SCHEDULER_CLASSES = (
  'DDPMScheduler',
  'DDIMScheduler',
  'PNDMScheduler',
  'DPMSolverMultistepScheduler',
)
# DDPMScheduler.__init__'s defaults (diffusers 0.42; the others share them), for omitted keys.
SCHEDULER_DEFAULTS = {
  'num_train_timesteps': 1000,
  'beta_start': 0.0001,
  'beta_end': 0.02,
  'beta_schedule': 'linear',
  'trained_betas': None,
  'prediction_type': 'epsilon',
  'clip_sample': True,
  'clip_sample_range': 1.0,
  'thresholding': False,
  'rescale_betas_zero_snr': False,
}
# Where a diffusers model folder keeps its scheduler: a pipeline's scheduler/ folder, or the top
# of a repo that holds the U-Net there too (the Hub's google/ddpm-* repos).
SCHEDULER_FILES = ('scheduler/scheduler_config.json', 'scheduler_config.json')
# Trained betas within this relative difference of a schedule's are its betas: diffusers keeps
# betas in float32, and float32 computations of one schedule differ by a few ulp (about 1e-7).
_BETAS_RTOL = 1e-6


# diffusers' names -> ours: the tables above, read backwards.
_OUR_BETA_SCHEDULES = {theirs: ours for ours, theirs in BETA_SCHEDULES.items()}
_OUR_PREDICTION_TYPES = {theirs: ours for ours, theirs in PREDICTION_TYPES.items()}
_OUR_VARIANCE_TYPES = {theirs: ours for ours, theirs in VARIANCE_TYPES.items()}


def _schedule_of_betas(
  betas: np.ndarray, beta_start: float, beta_end: float
) -> dict[str, Any] | None:
  """The first of our schedules (name, beta_start, beta_end) whose float64 betas are `betas` to
  float32 rounding, with the given beta_start / beta_end or the first and last beta; None if
  none is."""
  ends = [(beta_start, beta_end), (float(betas[0]), float(betas[-1]))]
  for name in diffusion_lib.BETA_SCHEDULES:
    for start, end in ends:
      ours = diffusion_lib.get_beta_schedule(
        name, beta_start=start, beta_end=end, num_diffusion_timesteps=len(betas)
      )
      if np.all(np.abs(ours - betas) <= _BETAS_RTOL * np.abs(betas)):
        return {'beta_schedule': name, 'beta_start': start, 'beta_end': end}
  return None


def diffusion_from_scheduler(scheduler: Mapping[str, Any]) -> dict[str, Any]:
  """The `config.diffusion` fields that a diffusers scheduler config (scheduler_config.json)
  sets: beta_schedule, beta_start, beta_end, num_diffusion_timesteps, model_mean_type and, for
  a DDPMScheduler, model_var_type (the module docstring says how each is read).

  Raises:
    ValueError: listing every key whose value ddpm-jax cannot sample as diffusers would.
  """
  get = lambda key: scheduler.get(key, SCHEDULER_DEFAULTS.get(key))
  problems = []

  def refuse(key: str, why: str) -> None:
    problems.append(f'{key} = {get(key)!r}: {why}')

  class_name = scheduler.get('_class_name', 'DDPMScheduler')
  if class_name not in SCHEDULER_CLASSES:
    refuse('_class_name', f'expected one of {", ".join(SCHEDULER_CLASSES)}')
  num_timesteps = get('num_train_timesteps')
  if not isinstance(num_timesteps, int) or isinstance(num_timesteps, bool) or num_timesteps < 1:
    refuse('num_train_timesteps', 'expected a positive int')
  diffusion: dict[str, Any] = {
    'num_diffusion_timesteps': num_timesteps,
    'beta_start': float(get('beta_start')),
    'beta_end': float(get('beta_end')),
  }
  if get('trained_betas') is not None:
    betas = np.asarray(get('trained_betas'), np.float64)
    schedule = None
    if betas.shape != (num_timesteps,):
      refuse('trained_betas', f'{betas.size} betas for num_train_timesteps = {num_timesteps}')
    else:
      schedule = _schedule_of_betas(betas, diffusion['beta_start'], diffusion['beta_end'])
      if schedule is None:
        refuse(
          'trained_betas',
          'not the betas of any of our schedules '
          f'({", ".join(diffusion_lib.BETA_SCHEDULES)}), to float32 rounding',
        )
    diffusion |= schedule or {}
  elif get('beta_schedule') in _OUR_BETA_SCHEDULES:
    diffusion['beta_schedule'] = _OUR_BETA_SCHEDULES[get('beta_schedule')]
  else:
    refuse('beta_schedule', f'expected one of {", ".join(BETA_SCHEDULES.values())}')
  if get('prediction_type') in _OUR_PREDICTION_TYPES:
    diffusion['model_mean_type'] = _OUR_PREDICTION_TYPES[get('prediction_type')]
  else:
    refuse('prediction_type', f'expected one of {", ".join(PREDICTION_TYPES.values())}')
  # DDPMScheduler has a variance (fixed_small unless it says); the others none, or (DPM-Solver)
  # only whether the network outputs one.
  default_variance = 'fixed_small' if class_name == 'DDPMScheduler' else None
  variance_type = scheduler.get('variance_type', default_variance)
  if variance_type in _OUR_VARIANCE_TYPES:
    diffusion['model_var_type'] = _OUR_VARIANCE_TYPES[variance_type]
  elif variance_type or class_name == 'DDPMScheduler':
    refuse('variance_type', f'expected one of {", ".join(VARIANCE_TYPES.values())}')
  if get('clip_sample') is not True:
    refuse('clip_sample', 'our samplers clip the predicted x_0 (to [-1, 1])')
  elif get('clip_sample_range') != 1.0:
    refuse('clip_sample_range', 'our samplers clip the predicted x_0 to [-1, 1]')
  if get('thresholding'):
    refuse('thresholding', 'our samplers clip the predicted x_0 to [-1, 1]')
  if get('rescale_betas_zero_snr'):
    refuse('rescale_betas_zero_snr', 'the betas of none of our schedules are rescaled')
  if problems:
    raise ValueError(f'Unsupported diffusers {class_name} config: ' + '; '.join(problems))
  return diffusion


def load_scheduler(folder: str) -> dict[str, Any] | None:
  """The `config.diffusion` fields of the scheduler config in a diffusers folder
  (`SCHEDULER_FILES`, `diffusion_from_scheduler`); None where the folder has none."""
  for name in SCHEDULER_FILES:
    path = os.path.join(folder, name)
    if os.path.exists(path):
      with open(path) as f:
        return diffusion_from_scheduler(json.load(f))
  return None


def diffusion_mismatches(
  diffusion: Mapping[str, Any], config: ml_collections.ConfigDict
) -> list[str]:
  """Each `config.diffusion` field that the scheduler's `diffusion` (`diffusion_from_scheduler`)
  sets otherwise, said as both have it; [] where the config has the scheduler's diffusion."""
  return [
    f'diffusion.{field}: the scheduler has {value!r}, the config {config.diffusion[field]!r}'
    for field, value in diffusion.items()
    if config.diffusion[field] != value
  ]


def check_diffusion_matches_config(
  diffusion: Mapping[str, Any], config: ml_collections.ConfigDict
) -> None:
  """Raises a ValueError listing the `diffusion_mismatches` of the config, if any."""
  mismatches = diffusion_mismatches(diffusion, config)
  if mismatches:
    raise ValueError(
      "The weights' scheduler does not match the config:\n  " + '\n  '.join(mismatches)
    )

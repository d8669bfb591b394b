"""The samplers, one definition each, and the checks of `config.sampling`.

A sampler is a frozen dataclass of its settings (a `Sampler`: everything about how samples are
drawn but the seed), registered in `SAMPLERS` under its `config.sampling.sampler` name. Its
definition holds all there is to know about it outside the math: its name, its valid step range,
how it reads `config.sampling` (`from_config`) and checks it (`check`), its `StepFn` (the math,
with its timesteps, is in `ddpm_jax/diffusion.py`), and the settings and file tag recorded with
its results. Adding a sampler is adding a definition here (and its step function there).

  ancestral     the paper's Algorithm 2, all T steps (`GaussianDiffusion.ancestral_step`);
  ddim          DDIM (Song et al. 2021) with `ddim_eta` (`ddim_step`, `ddim_timesteps`);
  respaced      the paper's ancestral sampler on a subsequence of the T timesteps, with the
                betas recomputed for it (Nichol & Dhariwal 2021, sec. 4; `respaced_step`);
  dpm_solver++  DPM-Solver++(2M) (Lu et al. 2022), with `thresholding` of the predicted x_0
                (`dpm_solver_step`).
All but ancestral make `config.sampling.steps` network evaluations per sample.

`check_sampler` checks the sampler settings (every mode that samples: the grids of training
too), `check_config` all of `config.sampling` but the fields of the editing kinds
(`ddpm_jax/editing.py` checks those) (--mode=sample), before anything compiles; each error
names the field.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import ml_collections
import numpy as np

from ddpm_jax import conditioning, validation
from ddpm_jax import diffusion as diffusion_lib

# The kinds of output of --mode=sample (`ddpm_jax/generate.py`); the last two edit images
# (`ddpm_jax/editing.py`).
KINDS = ('samples', 'progressive', 'denoising_chain', 'interpolation', 'inpaint', 'sdedit')
# The type of each `config.sampling` field that a sampler's settings may hold.
SETTING_TYPES = {'steps': int, 'ddim_eta': float, 'thresholding': str}


@dataclasses.dataclass(frozen=True)
class Sampler:
  """A sampler and its settings: everything about how samples are drawn but the seed.

  Its settings are its fields, named and typed as the `config.sampling` fields they come from
  (`SETTING_TYPES`); `settings()` (for results and cache keys) and `tag` (for file names, from
  `tag_format`) are made of them. Subclassed by each sampler, registered in `SAMPLERS`.
  """

  name: ClassVar[str]
  tag_format: ClassVar[str]
  # The thresholdings of the predicted x_0 it can use: all samplers but DPM-Solver++ clip it to
  # [-1, 1] as the paper does.
  thresholdings: ClassVar[tuple[str, ...]] = ('static',)
  # Whether RePaint's resampling jumps apply (`ddpm_jax/editing.py`): a step that reads nothing
  # but x and its timesteps, so that the chain can be entered again at any step after a jump.
  inpaints: ClassVar[bool] = True

  @classmethod
  def from_config(cls, sampling: ml_collections.ConfigDict) -> Sampler:
    """The sampler that `config.sampling` describes (checked first with `check`)."""
    fields = (f.name for f in dataclasses.fields(cls))
    return cls(**{field: SETTING_TYPES[field](sampling[field]) for field in fields})

  @classmethod
  def check(
    cls, sampling: ml_collections.ConfigDict, diffusion: diffusion_lib.GaussianDiffusion
  ) -> None:
    """Raises ValueError unless `config.sampling` describes a sampler of `diffusion`."""
    del diffusion
    check_shared_settings(cls, sampling)

  def num_steps(self, num_timesteps: int) -> int:
    """The steps (network evaluations) of one sample."""
    return num_timesteps

  def timesteps(self, num_timesteps: int) -> np.ndarray:
    """ts, int [K], increasing: step K-1-k calls the network at ts[k] and takes x from level
    k + 1 (x diffused to ts[k]) to level k (level 0: the data; `ddpm_jax/editing.py`)."""
    return np.arange(num_timesteps)

  def step_fn(
    self,
    diffusion: diffusion_lib.GaussianDiffusion,
    model_fn: diffusion_lib.ModelFn,
    first_step: int = 0,
  ) -> diffusion_lib.StepFn:
    """The sampler's `StepFn` on `diffusion` with the network `model_fn`, for a loop that starts
    at step `first_step` (SDEdit starts part-way; only a multistep sampler reads it)."""
    raise NotImplementedError

  @property
  def tag(self) -> str:
    """A short name for file names: 'ancestral', 'ddim50_eta0', 'respaced100',
    'dpm_solver++20_static'."""
    return self.tag_format.format(name=self.name, **dataclasses.asdict(self))

  def settings(self) -> dict[str, Any]:
    """The settings that determine the samples, for results and cache keys."""
    return {'sampler': self.name, **dataclasses.asdict(self)}


@dataclasses.dataclass(frozen=True)
class Ancestral(Sampler):
  """The paper's Algorithm 2: all T steps, T network evaluations."""

  name: ClassVar[str] = 'ancestral'
  tag_format: ClassVar[str] = '{name}'

  def step_fn(self, diffusion, model_fn, first_step=0):
    return diffusion.ancestral_step(model_fn)


@dataclasses.dataclass(frozen=True)
class FastSampler(Sampler):
  """What the samplers of K (at most T) network evaluations share: `steps` = K, checked against
  the range of `step_range`. Not a sampler itself."""

  steps: int

  @staticmethod
  def step_range(num_timesteps: int) -> tuple[int, int]:
    """The valid steps K (both ends included) on T = num_timesteps timesteps."""
    raise NotImplementedError

  @classmethod
  def check_steps(cls, steps, num_timesteps: int) -> None:
    """Raises ValueError (naming the range) unless `steps` is an int in `step_range`."""
    low, high = cls.step_range(num_timesteps)
    if not (isinstance(steps, int | np.integer) and low <= steps <= high):
      raise ValueError(
        f'{cls.name} takes between {low} and {high} steps for T = {num_timesteps}, got {steps!r}.'
      )

  @classmethod
  def check(
    cls, sampling: ml_collections.ConfigDict, diffusion: diffusion_lib.GaussianDiffusion
  ) -> None:
    """Raises ValueError unless `config.sampling` describes a sampler of `diffusion`."""
    try:
      cls.check_steps(sampling.steps, diffusion.num_timesteps)
    except ValueError as e:
      raise ValueError(f'config.sampling.steps: {e}') from None
    check_shared_settings(cls, sampling)

  def num_steps(self, num_timesteps: int) -> int:
    del num_timesteps
    return self.steps


@dataclasses.dataclass(frozen=True)
class DDIM(FastSampler):
  """DDIM (Song et al. 2021) on `ddim_timesteps`; ddim_eta: the noise scale (0: deterministic)."""

  name: ClassVar[str] = 'ddim'
  tag_format: ClassVar[str] = '{name}{steps}_eta{ddim_eta:g}'
  ddim_eta: float = 0.0

  @staticmethod
  def step_range(num_timesteps: int) -> tuple[int, int]:
    return 1, num_timesteps

  def timesteps(self, num_timesteps):
    return diffusion_lib.ddim_timesteps(num_timesteps, self.steps)

  def step_fn(self, diffusion, model_fn, first_step=0):
    return diffusion.ddim_step(model_fn, num_steps=self.steps, eta=self.ddim_eta)


@dataclasses.dataclass(frozen=True)
class Respaced(FastSampler):
  """The paper's ancestral sampler on the K timesteps of `respaced_timesteps` (improved DDPM)."""

  name: ClassVar[str] = 'respaced'
  tag_format: ClassVar[str] = '{name}{steps}'

  @staticmethod
  def step_range(num_timesteps: int) -> tuple[int, int]:
    return 2, num_timesteps

  @classmethod
  def check(
    cls, sampling: ml_collections.ConfigDict, diffusion: diffusion_lib.GaussianDiffusion
  ) -> None:
    """`FastSampler.check`, and that `diffusion` can be respaced."""
    super().check(sampling, diffusion)
    diffusion.respaced(sampling.steps)  # Raises for a variance type it cannot respace.

  def timesteps(self, num_timesteps):
    return diffusion_lib.respaced_timesteps(num_timesteps, self.steps)

  def step_fn(self, diffusion, model_fn, first_step=0):
    return diffusion.respaced_step(model_fn, num_steps=self.steps)


@dataclasses.dataclass(frozen=True)
class DPMSolver(FastSampler):
  """DPM-Solver++(2M) on `dpm_solver_timesteps`; thresholding: that of the predicted x_0."""

  name: ClassVar[str] = 'dpm_solver++'
  tag_format: ClassVar[str] = '{name}{steps}_{thresholding}'
  thresholdings: ClassVar[tuple[str, ...]] = diffusion_lib.THRESHOLDINGS
  # Its multistep update extrapolates from the x_0 predicted at the level before, which a jump
  # back up the chain makes that of another trajectory; and it solves the ODE, without the
  # noise through which RePaint's resampling harmonizes the two regions.
  inpaints: ClassVar[bool] = False
  thresholding: str = 'static'

  @staticmethod
  def step_range(num_timesteps: int) -> tuple[int, int]:
    return 1, num_timesteps - 1

  def timesteps(self, num_timesteps):
    return diffusion_lib.dpm_solver_timesteps(num_timesteps, self.steps)

  def step_fn(self, diffusion, model_fn, first_step=0):
    return diffusion.dpm_solver_step(
      model_fn, num_steps=self.steps, thresholding=self.thresholding, first_step=first_step
    )


SAMPLERS: dict[str, type[Sampler]] = {s.name: s for s in (Ancestral, DDIM, Respaced, DPMSolver)}


def from_config(config: ml_collections.ConfigDict) -> Sampler:
  """The sampler that `config.sampling` names (check it first with `check_sampler`)."""
  return SAMPLERS[config.sampling.sampler].from_config(config.sampling)


def samples_tag(sampler: Sampler, classes: conditioning.Conditioning | None) -> str:
  """The file tag of samples drawn by `sampler` (--mode=sample's npz, --mode=eval's directory):
  `sampler.tag`, then for a class-conditional model `classes.tag`
  ('dpm_solver++20_static_guidance1.25')."""
  return sampler.tag if classes is None else f'{sampler.tag}_{classes.tag}'


# ----------------------------------------------------------------------------------------------
# Checks before anything compiles.
# ----------------------------------------------------------------------------------------------


def check_shared_settings(sampler: type[Sampler], sampling: ml_collections.ConfigDict) -> None:
  """Raises ValueError for `config.sampling.ddim_eta` or `thresholding` values that no sampler
  takes, or a thresholding that `sampler` does not use (checked whatever the sampler)."""
  validation.require(
    sampling.ddim_eta >= 0,
    f'config.sampling.ddim_eta must be non-negative, got {sampling.ddim_eta}.',
  )
  validation.require(
    sampling.thresholding in diffusion_lib.THRESHOLDINGS,
    f'Unknown config.sampling.thresholding {sampling.thresholding!r}; expected one of '
    f'{", ".join(diffusion_lib.THRESHOLDINGS)}.',
  )
  validation.require(
    sampling.thresholding in sampler.thresholdings,
    f'config.sampling.thresholding = {sampling.thresholding!r} is for {DPMSolver.name}; '
    f'{sampler.name} clips the predicted x_0 to [-1, 1] (static) as the paper does.',
  )


def check_sampler(
  config: ml_collections.ConfigDict, diffusion: diffusion_lib.GaussianDiffusion
) -> None:
  """Raises ValueError unless `config.sampling`'s sampler and its settings can draw samples from
  `diffusion`, and its classes and guidance scale from `config.model` (checked by every mode
  that samples: the grids of training too)."""
  sampling = config.sampling
  validation.require(
    sampling.sampler in SAMPLERS,
    f'Unknown sampler {sampling.sampler!r} (config.sampling.sampler); expected one of '
    f'{", ".join(SAMPLERS)}.',
  )
  SAMPLERS[sampling.sampler].check(sampling, diffusion)
  conditioning.check_sampling(config)


def parse_kinds(kinds: str) -> tuple[str, ...]:
  """'samples,progressive' -> ('samples', 'progressive'); ValueError for unknown names."""
  parsed = tuple(kind.strip() for kind in kinds.split(',') if kind.strip())
  unknown = [kind for kind in parsed if kind not in KINDS]
  if unknown or not parsed:
    raise ValueError(
      f'config.sampling.kinds = {kinds!r} names unknown kinds {unknown}; expected comma-separated '
      f'names among {", ".join(KINDS)}.'
    )
  return parsed


def check_config(
  config: ml_collections.ConfigDict, diffusion: diffusion_lib.GaussianDiffusion
) -> None:
  """Raises ValueError for a `config.sampling` that cannot be sampled.

  Every setting is checked, whichever kinds are asked for, except that the figures' settings are
  checked only for the figures asked for.
  """
  sampling = config.sampling
  num_timesteps = diffusion.num_timesteps
  kinds = parse_kinds(sampling.kinds)
  check_sampler(config, diffusion)
  validation.validate_batch_size(sampling.batch_size, 'config.sampling.batch_size')
  validation.require(
    validation.is_int(sampling.num_samples) and sampling.num_samples >= 1,
    f'config.sampling.num_samples must be a positive integer, got {sampling.num_samples!r}.',
  )
  if 'progressive' in kinds:
    validation.require(
      validation.is_int(sampling.progressive_every)
      and 1 <= sampling.progressive_every <= num_timesteps,
      f'config.sampling.progressive_every must be in [1, T = {num_timesteps}], got '
      f'{sampling.progressive_every!r}.',
    )
    validation.require(
      sampling.progressive_images >= 1,
      f'config.sampling.progressive_images must be positive, got {sampling.progressive_images}.',
    )
  if 'denoising_chain' in kinds:
    ts = tuple(sampling.chain_t)
    validation.require(
      bool(ts) and all(validation.is_int(t) and 0 <= t < num_timesteps for t in ts),
      f'config.sampling.chain_t = {ts} must name timesteps in [0, T = {num_timesteps}) '
      '(0-based: t = T-1 is pure noise).',
    )
    validation.require(
      sampling.chain_samples >= 1,
      f'config.sampling.chain_samples must be positive, got {sampling.chain_samples}.',
    )
  if 'interpolation' in kinds:
    t = sampling.interpolation_t
    validation.require(
      validation.is_int(t) and 0 <= t < num_timesteps,
      f'config.sampling.interpolation_t = {t!r} must be in [0, T = {num_timesteps}).',
    )
    validation.require(
      sampling.interpolation_steps >= 2,
      f'config.sampling.interpolation_steps must be at least 2 (lambda = 0 and 1), got '
      f'{sampling.interpolation_steps}.',
    )

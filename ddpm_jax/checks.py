"""The one check of a config that every mode runs first, before anything compiles or is written.

Each section is checked by the code that owns it; `check_config` runs those checks in the order
below, so that the first bad field is named before a program compiles:
  config.data        `data.check_config`: the dataset, its splits, the image size and channels;
  config.model       `models.check_config`: a U-Net that can process those images;
  config.diffusion   `GaussianDiffusion.from_config`: the schedule and the mean / variance / loss
                     types;
  the mode's own     passed in by the mode, which owns them: `train.check_config` (config.training
                     and the sampler of its grids), `samplers.check_config` (all of
                     config.sampling, for --mode=sample, with `editing.check_config` for the
                     fields of its editing kinds), `evaluation.check_config` (config.eval
                     and the sampler of its samples).
The checks that need a workdir or a checkpoint (resuming, `training.init_from`) run as they are
restored, still before anything compiles. `validation` holds the primitives the checks share.
"""

from __future__ import annotations

from collections.abc import Callable

import ml_collections

from ddpm_jax import data, models
from ddpm_jax import diffusion as diffusion_lib

# `check(config, diffusion)`: raises ValueError, naming the field, for a section it owns.
SectionCheck = Callable[[ml_collections.ConfigDict, diffusion_lib.GaussianDiffusion], None]


def check_config(
  config: ml_collections.ConfigDict, *mode_checks: SectionCheck
) -> diffusion_lib.GaussianDiffusion:
  """Checks the data, model and diffusion sections, then runs `mode_checks` in turn; returns the
  diffusion of `config.diffusion`. Raises ValueError (naming the field) at the first bad one."""
  data.check_config(config)
  models.check_config(config)
  diffusion = diffusion_lib.GaussianDiffusion.from_config(config.diffusion)
  for check in mode_checks:
    check(config, diffusion)
  return diffusion

"""Tests of the sampler definitions (`ddpm_jax/samplers.py`): their step ranges, how they read
`config.sampling`, and the settings and file tags recorded with their results. (The checks of
`config.sampling` are tested through --mode=sample in test_generate.py, the samplers' math in
test_diffusion.py and their compiled loops in test_sample_loop.py.)"""

import re

import ml_collections
import pytest

from ddpm_jax import conditioning, samplers

T = 1000


def test_step_ranges():
  # Expected: ddim takes 1..T steps, respaced 2..T, dpm_solver++ 1..T-1 (its points distinct).
  for sampler, bad in [('ddim', 0), ('ddim', T + 1), ('respaced', 1), ('dpm_solver++', T)]:
    with pytest.raises(ValueError, match=f'{re.escape(sampler)} takes between'):
      samplers.SAMPLERS[sampler].check_steps(bad, T)
  for sampler, good in [('ddim', 1), ('ddim', T), ('respaced', 2), ('dpm_solver++', T - 1)]:
    samplers.SAMPLERS[sampler].check_steps(good, T)


def sampling_config(**sampling):
  defaults = {'steps': 20, 'ddim_eta': 0.5, 'thresholding': 'dynamic'}
  return ml_collections.ConfigDict({'sampling': {**defaults, **sampling}})


def test_from_config_reads_only_the_sampler_settings():
  assert samplers.from_config(sampling_config(sampler='ancestral')) == samplers.Ancestral()
  assert samplers.from_config(sampling_config(sampler='ddim')) == samplers.DDIM(20, 0.5)
  assert samplers.from_config(sampling_config(sampler='respaced')) == samplers.Respaced(20)
  assert samplers.from_config(sampling_config(sampler='dpm_solver++')) == samplers.DPMSolver(
    20, 'dynamic'
  )
  assert samplers.DPMSolver(20).thresholding == 'static'
  assert samplers.DDIM(20).ddim_eta == 0.0


@pytest.mark.parametrize(
  'sampler, tag, settings, num_steps',
  [
    # Expected: the tags and settings of the one `Sampler` class these definitions replaced; the
    # eval caches (keyed by a digest of the settings) and the file names depend on them.
    (samplers.Ancestral(), 'ancestral', {'sampler': 'ancestral'}, T),
    (samplers.DDIM(50), 'ddim50_eta0', {'sampler': 'ddim', 'steps': 50, 'ddim_eta': 0.0}, 50),
    (
      samplers.DDIM(20, 0.5),
      'ddim20_eta0.5',
      {'sampler': 'ddim', 'steps': 20, 'ddim_eta': 0.5},
      20,
    ),
    (samplers.Respaced(100), 'respaced100', {'sampler': 'respaced', 'steps': 100}, 100),
    (
      samplers.DPMSolver(20),
      'dpm_solver++20_static',
      {'sampler': 'dpm_solver++', 'steps': 20, 'thresholding': 'static'},
      20,
    ),
    (
      samplers.DPMSolver(10, 'dynamic'),
      'dpm_solver++10_dynamic',
      {'sampler': 'dpm_solver++', 'steps': 10, 'thresholding': 'dynamic'},
      10,
    ),
  ],
)
def test_tags_and_settings(sampler, tag, settings, num_steps):
  assert sampler.tag == tag
  assert list(sampler.settings().items()) == list(settings.items())  # The order too.
  assert sampler.num_steps(T) == num_steps
  assert samplers.SAMPLERS[settings['sampler']] is type(sampler)


def test_samples_tag_names_the_sampler_then_the_classes():
  # Expected: the file names of --mode=sample and --mode=eval (docstrings of generate.py and
  # evaluation.py): the sampler's tag, then for a class-conditional model the classes' tag.
  dpm = samplers.DPMSolver(20)
  assert samplers.samples_tag(dpm, None) == 'dpm_solver++20_static'
  every_digit = conditioning.Conditioning(tuple(range(10)), 1.25, every_class=True)
  assert samplers.samples_tag(dpm, every_digit) == 'dpm_solver++20_static_guidance1.25'
  sevens = conditioning.Conditioning((7,), 2.0)
  assert samplers.samples_tag(samplers.Ancestral(), sevens) == 'ancestral_class7_guidance2'

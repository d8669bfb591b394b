"""Every shipped config loads, passes validation, and builds the network the paper describes."""

import importlib

import jax
import pytest

from ddpm_jax import checks, models

# Parameter counts from REFERENCE.md ("The U-Net"); digits: the 1.0M of its docstring.
EXPECTED = {
  'cifar10': ('cifar10', 35_746_307),
  'celebahq256': ('celeb_a_hq/256', 113_673_219),
  'lsun_church256': ('lsun/church_outdoor', 113_673_219),
  'lsun_bedroom256': ('lsun/bedroom', 113_673_219),
  'lsun_cat256': ('lsun/cat', 113_673_219),
  'digits': ('digits', 1_001_729),
  # The unconditional counts plus the class embedding, 11 rows (10 classes and the null one) of
  # the timestep embedding's width 4 ch.
  'digits_cond': ('digits', 1_001_729 + 11 * 4 * 32),
  'cifar10_cond': ('cifar10', 35_746_307 + 11 * 4 * 128),
}


@pytest.mark.parametrize('name', sorted(EXPECTED))
def test_config(name):
  config = importlib.import_module(f'configs.{name}').get_config()
  dataset, num_params = EXPECTED[name]
  assert config.data.dataset == dataset
  checks.check_config(config)
  size, channels = config.data.image_size, config.data.num_channels
  shapes = models.param_shapes(models.create_model(config), size, channels)
  assert sum(x.size for x in jax.tree.leaves(shapes)) == num_params


def test_cifar10_is_the_papers_setup():
  # REFERENCE.md, "Training (CIFAR10)" and "Conventions of the original code".
  config = importlib.import_module('configs.cifar10').get_config()
  training, diffusion = config.training, config.diffusion
  assert (training.learning_rate, training.warmup_steps, training.grad_clip) == (2e-4, 5000, 1.0)
  assert (training.adam_b1, training.adam_b2, training.adam_eps) == (0.9, 0.999, 1e-8)
  assert (training.ema_decay, training.batch_size, training.num_train_steps) == (
    0.9999,
    128,
    800_000,
  )
  assert (config.model.dropout, config.data.random_flip) == (0.1, True)
  assert (diffusion.beta_schedule, diffusion.beta_start, diffusion.beta_end) == (
    'linear',
    1e-4,
    0.02,
  )
  assert diffusion.num_diffusion_timesteps == 1000
  assert (diffusion.model_mean_type, diffusion.model_var_type, diffusion.loss_type) == (
    'eps',
    'fixedlarge',
    'mse',
  )

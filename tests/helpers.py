"""Helpers shared by the test modules: shrunken configs and their train step, tiny networks
(a random U-Net, a smooth model with an exact float64 twin), `main.py`
subprocesses, what a training run leaves in its workdir (logged scalars, final params), a
config file read as main.py reads one, and the diffusers U-Net of the published CIFAR10 model
(its config, its forward pass)."""

import functools
import importlib.util
import os
import socket
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from configs import digits
from ddpm_jax import checkpoints, models, train
from ddpm_jax import diffusion as diffusion_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_digits_overrides(num_steps: int, **extra) -> dict:
  """A shrunken digits config: a 2-level U-Net of width 32 with attention at 4x4."""
  overrides = {
    'model.ch': 32,
    'model.ch_mult': (1, 2),
    'model.num_res_blocks': 1,
    'model.attn_resolutions': (4,),
    'model.dropout': 0.1,  # Dropout and flips on, so that their random draws are tested too.
    'data.random_flip': True,
    'diffusion.num_diffusion_timesteps': 100,
    'training.batch_size': 8,
    'training.num_train_steps': num_steps,
    'training.log_every_steps': 1,
    'training.checkpoint_every_steps': 5,
    'training.sample_every_steps': 0,
    'training.num_sample_images': 8,
    'training.warmup_steps': 2,
    # A constant rate after the warmup: tests compare runs of different lengths step by step, and
    # a cosine decay depends on num_train_steps.
    'training.lr_decay': 'none',
    'sampling.steps': 10,  # The digits config's DPM-Solver++, on T = 100 (or 20) timesteps.
  }
  overrides.update(extra)
  return overrides


def tiny_digits_config(num_steps: int, **extra) -> ml_collections.ConfigDict:
  config = digits.get_config()
  for key, value in tiny_digits_overrides(num_steps, **extra).items():
    section, field = key.split('.')
    config[section][field] = value
  return config


def train_step_setup(config: ml_collections.ConfigDict):
  """(model, diffusion, initial TrainState, jitted one-step update) of a config, as
  `train.train` builds them; the init is jitted too (eager Flax init is slower)."""
  model = models.create_model(config)
  diffusion = diffusion_lib.GaussianDiffusion.from_config(config.diffusion)
  tx, schedule = train.create_optimizer(config)
  init = jax.jit(functools.partial(train.create_train_state, config, model, tx))
  step = jax.jit(
    train.create_train_step(config, model, diffusion, tx, schedule, ema_starts_as_copy=True)
  )
  return model, diffusion, init(jax.random.key(0)), step


def main_command(workdir, num_steps: int, mode: str = 'train', **extra) -> list[str]:
  """`main.py --mode=<mode>` on the tiny digits config (`tiny_digits_overrides`) in workdir."""
  flags = [
    f'--config.{k}={_flag_value(v)}' for k, v in tiny_digits_overrides(num_steps, **extra).items()
  ]
  return [
    sys.executable,
    os.path.join(REPO, 'main.py'),
    f'--config={os.path.join(REPO, "configs", "digits.py")}',
    f'--mode={mode}',
    f'--workdir={workdir}',
    *flags,
  ]


def _flag_value(value) -> str:
  return ','.join(map(str, value)) if isinstance(value, tuple) else str(value)


def subprocess_env(num_devices: int = 1, **extra) -> dict:
  env = dict(os.environ)
  env['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={num_devices}'
  env['PYTHONPATH'] = REPO
  env.update(extra)
  return env


def run_main(workdir, num_steps: int, num_devices: int = 1, mode: str = 'train', **extra):
  """`main_command` on `num_devices` CPU devices, which must succeed."""
  result = subprocess.run(
    main_command(workdir, num_steps, mode, **extra),
    env=subprocess_env(num_devices),
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert result.returncode == 0, result.stderr[-5000:]
  return result


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def logged_scalars(workdir, tag: str = 'loss') -> dict[int, float]:
  """{step: value} of a scalar in the TensorBoard event files of `workdir`."""
  import tensorflow as tf  # Only to read event files; slow to import.

  values = {}
  for path in tf.io.gfile.glob(os.path.join(str(workdir), 'events.out.tfevents.*')):
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        if value.tag == tag:
          values[event.step] = float(tf.make_ndarray(value.tensor))
  return values


def final_params(workdir):
  """The params and EMA params of the latest checkpoint, as host NumPy trees."""
  manager = checkpoints.create_manager(str(workdir), async_save=False)
  step = manager.latest_step()
  metadata = manager.item_metadata(step)
  abstract = {
    name: jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), metadata[name])
    for name in ('params', 'ema_params')
  }
  restored_step, items = checkpoints.restore(manager, abstract)
  manager.close()
  return restored_step, jax.device_get({k: items[k] for k in abstract})


def assert_trees_equal(a, b):
  flat_a, flat_b = jax.tree.leaves_with_path(a), jax.tree.leaves_with_path(b)
  assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
  for (path, x), (_, y) in zip(flat_a, flat_b, strict=True):
    np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))


# The diffusers config of google/ddpm-cifar10-32 (REFERENCE.md), at width `ch`.
DOWN_TYPES = ['DownBlock2D', 'AttnDownBlock2D', 'DownBlock2D', 'DownBlock2D']
UP_TYPES = ['UpBlock2D', 'UpBlock2D', 'AttnUpBlock2D', 'UpBlock2D']


def load_config_file(path) -> ml_collections.ConfigDict:
  """`get_config()` of a config file (e.g. one the converter wrote), read by its path as main.py's
  --config reads it."""
  spec = importlib.util.spec_from_file_location('written_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def cifar10_diffusers_config(ch=128):
  return dict(
    _class_name='UNet2DModel',
    sample_size=32,
    in_channels=3,
    out_channels=3,
    block_out_channels=[ch, 2 * ch, 2 * ch, 2 * ch],
    layers_per_block=2,
    down_block_types=DOWN_TYPES,
    up_block_types=UP_TYPES,
    downsample_padding=0,
    norm_eps=1e-6,
    norm_num_groups=32,
    attention_head_dim=None,
    flip_sin_to_cos=False,
    freq_shift=1,
    act_fn='silu',
    center_input_sample=False,
    mid_block_scale_factor=1,
    time_embedding_type='positional',
  )


def torch_forward(model, x, t, y=None):
  """x: [B, H, W, C] NumPy, t: [B] ints, y: [B] class labels or None -> [B, H, W, C'] NumPy,
  through a diffusers UNet2DModel `model` (in its dtype: float32, or float64 after .double())."""
  import torch  # Only the tests against diffusers need it; slow to import.

  labels = None if y is None else torch.tensor(y)
  with torch.no_grad():
    out = model(torch.from_numpy(x.transpose(0, 3, 1, 2)), torch.tensor(t), labels).sample
  return out.numpy().transpose(0, 2, 3, 1)


def tiny_model_and_params(config, seed=0):
  """The tiny U-Net with random weights, perturbed so that no layer starts at zero."""
  model = models.create_model(config)
  x, t = jnp.zeros((1, 8, 8, 1)), jnp.zeros((1,), jnp.int32)
  y = (jnp.zeros((1,), jnp.int32),) if model.num_classes else ()
  params = model.init(jax.random.key(seed), x, t, *y, train=False)['params']
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  leaves = [p + 0.05 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys, strict=True)]
  return model, jax.tree.unflatten(treedef, leaves)


class LinearEps(nn.Module):
  """eps(x, t) = 0.1 tanh(x W + b + t / T): a smooth model with an exact float64 twin."""

  num_timesteps: int
  num_classes: int = 0  # Unconditional, as `sample_loop.make_model_fn` reads it.

  @nn.compact
  def __call__(self, x, t, *, train):
    del train
    h = nn.Dense(x.shape[-1], kernel_init=nn.initializers.normal(0.5))(x)
    return 0.1 * jnp.tanh(h + (t.astype(jnp.float32) / self.num_timesteps)[:, None, None, None])

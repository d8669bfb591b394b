"""Tests of sampling (--mode=sample): the chunked compiled loops of every sampler against the
diffusion loops and a float64 DDIM recursion, the files written from a tiny trained checkpoint,
reproducibility over runs, device counts and processes (the samples with DPM-Solver++, whose
multistep state crosses chunks; the figures with the ancestral sampler), official weights through
the command line, and the errors for bad input.

Runs on 8 devices and on 2 processes happen in subprocesses of `main.py` (the device count is
fixed when JAX starts).
"""

import shutil
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image
import pytest
import torch
import tqdm
from diffusers import UNet2DModel
from helpers import (
  REPO,
  cifar10_diffusers_config,
  free_port,
  main_command,
  subprocess_env,
  tiny_digits_config,
)

from ddpm_jax import diffusion as diffusion_lib
from ddpm_jax import input_pipeline, models, samplers, sampling, train
from ddpm_jax import mesh as mesh_lib

# Every kind, at sizes that pad differently on 1 and 8 devices: the figures' batches of 6 (6
# progressive rows, 6 chain samples, 2 x 3 interpolation rows) are padded to 8 on 8 devices only;
# 10 samples in batches of 8 pad the second batch on both. T = 100 (tiny_digits_config).
SAMPLE_OVERRIDES = {
  'sampling.kinds': 'samples,progressive,denoising_chain,interpolation',
  # 'samples' with the multistep sampler, whose state crosses chunks; the figures are ancestral.
  'sampling.sampler': 'dpm_solver++',
  'sampling.steps': 7,
  'sampling.num_samples': 10,
  'sampling.batch_size': 8,
  'sampling.progressive_every': 25,
  'sampling.progressive_images': 6,
  'sampling.chain_t': (99, 49, 9),
  'sampling.chain_samples': 6,
  'sampling.interpolation_t': 49,
  'sampling.interpolation_steps': 3,
  'sampling.interpolation_images': (0, 1, 2, 3),
}
STEP = 2  # The step of the trained checkpoint.
SUFFIX = f'step_{STEP:08d}_seed_0'
SAMPLES = f'samples_dpm_solver++7_static_{SUFFIX}'
OUTPUTS = [
  f'{SAMPLES}.npz',
  f'{SAMPLES}.png',
  f'progressive_{SUFFIX}.png',
  f'denoising_chain_{SUFFIX}.png',
  f'interpolation_{SUFFIX}.png',
]


def sample_config(**overrides):
  return tiny_digits_config(STEP, **{**SAMPLE_OVERRIDES, **overrides})


def sample_command(workdir, **overrides) -> list[str]:
  command = main_command(workdir, STEP, **{**SAMPLE_OVERRIDES, **overrides})
  command[command.index('--mode=train')] = '--mode=sample'
  return command


def read_outputs(workdir) -> dict[str, np.ndarray]:
  """{file name: the `samples` array of an npz, or the pixels of a PNG} in workdir/samples."""
  outputs = {}
  for path in sorted((workdir / 'samples').iterdir()):
    if path.suffix == '.npz':
      with np.load(path) as npz:
        assert list(npz.keys()) == ['samples']
        outputs[path.name] = npz['samples']
    else:
      outputs[path.name] = np.asarray(PIL.Image.open(path))
  return outputs


def all_files(directory) -> list[str]:
  return sorted(str(p.relative_to(directory)) for p in directory.rglob('*'))


@pytest.fixture(scope='module')
def trained_workdir(tmp_path_factory):
  """A workdir with the checkpoint of 2 real training steps of the tiny digits config."""
  workdir = tmp_path_factory.mktemp('trained')
  train.train(tiny_digits_config(STEP, **{'training.checkpoint_every_steps': STEP}), str(workdir))
  return workdir


def copy_checkpoints(trained_workdir, workdir):
  shutil.copytree(trained_workdir / 'checkpoints', workdir / 'checkpoints')
  return workdir


@pytest.fixture(scope='module')
def one_device_run(trained_workdir, tmp_path_factory):
  """Every kind sampled in this process (1 device): (workdir, paths returned, outputs)."""
  workdir = copy_checkpoints(trained_workdir, tmp_path_factory.mktemp('one_device'))
  paths = sampling.sample(sample_config(), str(workdir))
  return workdir, paths, read_outputs(workdir)


# ----------------------------------------------------------------------------------------------
# The compiled loops.
# ----------------------------------------------------------------------------------------------


def tiny_model_and_params(config, seed=0):
  """The tiny U-Net with random weights, perturbed so that no layer starts at zero."""
  model = models.create_model(config)
  x, t = jnp.zeros((1, 8, 8, 1)), jnp.zeros((1,), jnp.int32)
  params = model.init(jax.random.key(seed), x, t, train=False)['params']
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  leaves = [p + 0.05 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys, strict=True)]
  return model, jax.tree.unflatten(treedef, leaves)


CHUNKED_SAMPLERS = [
  samplers.Sampler('ddim', 20, 0.5),
  samplers.Sampler('respaced', 17),
  samplers.Sampler('dpm_solver++', 13),
  samplers.Sampler('dpm_solver++', 13, thresholding='dynamic'),
]


def test_chunked_loops_equal_the_diffusion_loops():
  # Expected: GaussianDiffusion.p_sample_loop / _progressive / sample_loop with the same rng and
  # params, bit for bit, however the steps are split into compiled calls. (A one-level U-Net,
  # which compiles faster; the loops do not depend on the network.)
  config = tiny_digits_config(1, **{'model.ch_mult': (1,), 'model.attn_resolutions': ()})
  diffusion = diffusion_lib.GaussianDiffusion.from_config(config.diffusion)
  model, params = tiny_model_and_params(config)
  mesh = mesh_lib.create_mesh()
  init = samplers.create_init_fn(diffusion, mesh)
  shape, rng = (4, 8, 8, 1), jax.random.key(7)

  @jax.jit
  def reference_loops(params, rng):
    model_fn = samplers.make_model_fn(model, params)
    return (
      diffusion.p_sample_loop_progressive(model_fn, shape, rng, every=25),
      [
        diffusion.sample_loop(sampler.step_fn(diffusion, model_fn), sampler.steps, shape, rng)
        for sampler in CHUNKED_SAMPLERS
      ],
    )

  (samples, snapshots), fast_samples = reference_loops(params, rng)
  np.testing.assert_array_equal(snapshots['t'], [99, 74, 49, 24])

  def run_in_chunks(run_chunk, bounds):
    x, loop_rng = init(shape, rng)
    pred_xstart = jnp.zeros_like(x)
    for start, stop in zip(bounds[:-1], bounds[1:], strict=True):
      x, pred_xstart = run_chunk(params, x, pred_xstart, loop_rng, np.int32(start), np.int32(stop))
    return x

  run_chunk = samplers.create_chunk_fn(diffusion, model, mesh)
  np.testing.assert_array_equal(run_in_chunks(run_chunk, [0, 1, 8, 8, 57, 100]), samples)

  # The driver, keeping the predicted x_0 of steps 0, 25, 50, 75 (the progressive figure).
  loop = samplers.ChunkedLoop(run_chunk, params, tqdm.tqdm(disable=True))
  boundaries = [1, 26, 51, 76]
  x, kept = loop.run(*init(shape, rng), 0, 100, keep=boundaries)
  np.testing.assert_array_equal(x, samples)
  for k, boundary in enumerate(boundaries):
    np.testing.assert_array_equal(kept[boundary][1], snapshots['pred_xstart'][k])

  # Every fast sampler, in ranges that split its multistep pairs (DPM-Solver++ reads the
  # predicted x_0 of the step before, carried over from the range before).
  for sampler, expected in zip(CHUNKED_SAMPLERS, fast_samples, strict=True):
    run_chunk = samplers.create_chunk_fn(diffusion, model, mesh, sampler)
    k = sampler.steps
    actual = run_in_chunks(run_chunk, [0, 1, 2, 2, 3, k // 2, k - 1, k])
    np.testing.assert_array_equal(actual, expected, err_msg=sampler.tag)
    # The driver: its first range is one step, so the state crosses at least one boundary.
    loop = samplers.ChunkedLoop(run_chunk, params, tqdm.tqdm(disable=True))
    x, _ = loop.run(*init(shape, rng), 0, k)
    np.testing.assert_array_equal(x, expected, err_msg=sampler.tag)
    assert not np.array_equal(expected, samples)


class LinearEps(nn.Module):
  """eps(x, t) = 0.1 tanh(x W + b + t / T): a smooth model with an exact float64 twin."""

  num_timesteps: int

  @nn.compact
  def __call__(self, x, t, *, train):
    del train
    h = nn.Dense(x.shape[-1], kernel_init=nn.initializers.normal(0.5))(x)
    return 0.1 * jnp.tanh(h + (t.astype(jnp.float32) / self.num_timesteps)[:, None, None, None])


def test_ddim_eta0_all_steps_matches_float64_recursion():
  # Expected: DDIM eq. (12) with eta = 0 over all T = 1000 timesteps of the paper's schedule,
  # computed here in float64 with the sampler's clipping of the predicted x_0 (and eps
  # recomputed from it); float32 through the sampling driver agrees to 1e-5 relative.
  config = tiny_digits_config(1, **{'diffusion.num_diffusion_timesteps': 1000})
  diffusion = diffusion_lib.GaussianDiffusion.from_config(config.diffusion)
  num_timesteps = diffusion.num_timesteps
  model = LinearEps(num_timesteps)
  shape = (2, 8, 8, 1)
  params = model.init(jax.random.key(0), jnp.zeros(shape), jnp.zeros((2,), jnp.int32), train=False)
  params = params['params']
  mesh = mesh_lib.create_mesh()
  init = samplers.create_init_fn(diffusion, mesh)
  run_chunk = samplers.create_chunk_fn(
    diffusion, model, mesh, samplers.Sampler('ddim', num_timesteps)
  )
  loop = samplers.ChunkedLoop(run_chunk, params, tqdm.tqdm(disable=True))
  rng = jax.random.key(3)
  samples, _ = loop.run(*init(shape, rng), 0, num_timesteps)

  w = np.asarray(params['Dense_0']['kernel'], np.float64)
  b = np.asarray(params['Dense_0']['bias'], np.float64)
  betas = diffusion_lib.get_beta_schedule(
    'linear', beta_start=1e-4, beta_end=0.02, num_diffusion_timesteps=num_timesteps
  )
  alphas_cumprod = np.cumprod(1.0 - betas)
  x = np.asarray(jax.random.normal(jax.random.split(rng)[0], shape), np.float64)
  clipped = 0
  for t in range(num_timesteps - 1, -1, -1):
    eps = 0.1 * np.tanh(x @ w + b + t / num_timesteps)
    abar, abar_prev = alphas_cumprod[t], alphas_cumprod[t - 1] if t > 0 else 1.0
    x0 = (x - np.sqrt(1 - abar) * eps) / np.sqrt(abar)
    clipped += np.any(np.abs(x0) > 1)
    x0 = np.clip(x0, -1, 1)
    eps = (x / np.sqrt(abar) - x0) / np.sqrt(1 / abar - 1)
    x = np.sqrt(abar_prev) * x0 + np.sqrt(1 - abar_prev) * eps
  assert clipped > 0  # The clipping is exercised.
  samples = np.asarray(samples, np.float64)
  assert np.linalg.norm(samples - x) / np.linalg.norm(x) < 1e-5


# ----------------------------------------------------------------------------------------------
# --mode=sample from a trained checkpoint.
# ----------------------------------------------------------------------------------------------


def test_sample_writes_npz_and_png_grids(one_device_run):
  workdir, paths, outputs = one_device_run
  assert paths == [str(workdir / 'samples' / name) for name in OUTPUTS]
  assert sorted(outputs) == sorted(OUTPUTS)
  samples = outputs[f'{SAMPLES}.npz']
  assert samples.shape == (10, 8, 8, 1) and samples.dtype == np.uint8
  assert len(np.unique(samples)) > 10  # Images, not a constant.
  # Grids of 8x8 images with 1 pixel of padding, enlarged 8 times: (rows, cols) of each figure.
  layouts = {
    f'{SAMPLES}.png': (3, 4),  # 10 images, ceil(sqrt(10)) per row.
    f'progressive_{SUFFIX}.png': (6, 5),  # 6 images; x_0 at t = 99, 74, 49, 24, and x_0.
    f'denoising_chain_{SUFFIX}.png': (3, 7),  # t = 99, 49, 9; x_t and 6 samples.
    f'interpolation_{SUFFIX}.png': (2, 5),  # 2 pairs; x_0, 3 lambdas, x_0'.
  }
  for name, (rows, cols) in layouts.items():
    assert outputs[name].shape == (8 * (9 * rows + 1), 8 * (9 * cols + 1)), name
  # The figures show the test images they interpolate, at the ends of each row.
  source = input_pipeline.create_source(sample_config(), 'test')
  grid = outputs[f'interpolation_{SUFFIX}.png'][::8, ::8]
  np.testing.assert_array_equal(grid[1:9, 1:9], source[np.array([0])][0, ..., 0])
  np.testing.assert_array_equal(grid[10:18, 37:45], source[np.array([3])][0, ..., 0])


def test_same_seed_gives_the_same_samples(one_device_run, trained_workdir, tmp_path):
  _, _, first = one_device_run
  workdir = copy_checkpoints(trained_workdir, tmp_path)
  sampling.sample(sample_config(**{'sampling.kinds': 'samples'}), str(workdir))
  name = f'{SAMPLES}.npz'
  np.testing.assert_array_equal(read_outputs(workdir)[name], first[name])


def test_8_devices_give_the_same_samples_and_figures(one_device_run, trained_workdir, tmp_path):
  _, _, one_device = one_device_run
  workdir = copy_checkpoints(trained_workdir, tmp_path)
  result = subprocess.run(
    sample_command(workdir), env=subprocess_env(8), capture_output=True, text=True, timeout=600
  )
  assert result.returncode == 0, result.stderr[-5000:]
  assert '8 local / 8 global devices' in result.stderr
  assert result.stdout.splitlines() == [f'Wrote {workdir / "samples" / n}' for n in OUTPUTS]
  eight_devices = read_outputs(workdir)
  assert sorted(eight_devices) == sorted(one_device)
  for name, images in one_device.items():
    np.testing.assert_array_equal(eight_devices[name], images, err_msg=name)


def test_two_processes_give_the_same_samples(one_device_run, trained_workdir, tmp_path):
  # Two processes with 2 CPU devices each (CPU collectives over gloo): the same images as one
  # process, and only process 0 writes and prints.
  _, _, one_device = one_device_run
  workdir = copy_checkpoints(trained_workdir, tmp_path)
  overrides = {'sampling.kinds': 'samples,interpolation'}
  port = free_port()
  procs = [
    subprocess.Popen(
      sample_command(workdir, **overrides)
      + [f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2', f'--process_id={i}'],
      env=subprocess_env(2, JAX_CPU_COLLECTIVES_IMPLEMENTATION='gloo'),
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for i in range(2)
  ]
  outputs = [p.communicate(timeout=600) for p in procs]
  for p, (_, stderr) in zip(procs, outputs, strict=True):
    assert p.returncode == 0, stderr[-5000:]
  names = [name for name in OUTPUTS if name.startswith(('samples', 'interpolation'))]
  wrote = [line for line in outputs[0][0].splitlines() if line.startswith('Wrote')]
  assert wrote == [f'Wrote {workdir / "samples" / name}' for name in names]
  assert 'Wrote' not in outputs[1][0]
  two_processes = read_outputs(workdir)
  assert sorted(two_processes) == sorted(names)
  for name in names:
    np.testing.assert_array_equal(two_processes[name], one_device[name], err_msg=name)


# ----------------------------------------------------------------------------------------------
# Official weights through the command line.
# ----------------------------------------------------------------------------------------------


def test_official_weights_converted_and_sampled(tmp_path):
  # A diffusers UNet2DModel in the official layout, with the tiny digits architecture (ch 32,
  # ch_mult (1, 2), 1 block per level, attention at 4x4) and random weights.
  diffusers_config = cifar10_diffusers_config(32)
  diffusers_config.update(
    sample_size=8,
    in_channels=1,
    out_channels=1,
    block_out_channels=[32, 64],
    layers_per_block=1,
    down_block_types=['DownBlock2D', 'AttnDownBlock2D'],
    up_block_types=['AttnUpBlock2D', 'UpBlock2D'],
  )
  del diffusers_config['_class_name']
  torch.manual_seed(0)
  unet = UNet2DModel(**diffusers_config)
  with torch.no_grad():
    for param in unet.parameters():
      param.add_(0.05 * torch.randn_like(param))
  unet.save_pretrained(tmp_path / 'official', safe_serialization=True)

  def convert(workdir, **overrides):
    flags = [arg for arg in main_command(workdir, 1, **overrides) if arg.startswith('--config.')]
    return subprocess.run(
      [
        sys.executable,
        '-m',
        'ddpm_jax.pretrained',
        '--config=configs/digits.py',
        *flags,
        '--format=diffusers',
        f'--source={tmp_path / "official"}',
        f'--workdir={workdir}',
      ],
      cwd=REPO,
      env=subprocess_env(1),
      capture_output=True,
      text=True,
      timeout=300,
    )

  # A folder that does not match the config (2 blocks per level there): a clear error, nothing
  # written.
  mismatched = convert(tmp_path / 'mismatched', **{'model.num_res_blocks': 2})
  assert mismatched.returncode != 0
  assert 'Official weights do not match the config' in mismatched.stderr
  assert 'model.num_res_blocks: weights have 1, config has 2' in mismatched.stderr
  assert not (tmp_path / 'mismatched' / 'checkpoints').exists()

  workdir = tmp_path / 'converted'
  converted = convert(workdir)
  assert converted.returncode == 0, converted.stderr[-5000:]
  overrides = {'sampling.kinds': 'samples,progressive', 'sampling.num_samples': 4}
  result = subprocess.run(
    sample_command(workdir, **overrides),
    env=subprocess_env(1),
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert result.returncode == 0, result.stderr[-5000:]
  names = [
    'samples_dpm_solver++7_static_step_00000000_seed_0.npz',
    'samples_dpm_solver++7_static_step_00000000_seed_0.png',
  ]
  names.append('progressive_step_00000000_seed_0.png')
  assert result.stdout.splitlines() == [f'Wrote {workdir / "samples" / n}' for n in names]
  samples = read_outputs(workdir)[names[0]]
  assert samples.shape == (4, 8, 8, 1) and samples.dtype == np.uint8
  assert len(np.unique(samples)) > 10


# ----------------------------------------------------------------------------------------------
# Bad input: a clear error, nothing written.
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
  'override, error, message',
  [
    ({'sampling.sampler': 'euler'}, ValueError, "Unknown sampler 'euler'"),
    ({'sampling.num_samples': 0}, ValueError, 'num_samples must be a positive integer, got 0'),
    ({'sampling.num_samples': -5}, ValueError, 'num_samples must be a positive integer, got -5'),
    ({'sampling.kinds': 'samples,fig9'}, ValueError, r"unknown kinds \['fig9'\]"),
    (
      {'sampling.sampler': 'ddim', 'sampling.steps': 101},
      ValueError,
      r'config.sampling.steps: ddim takes between 1 and 100 steps for T = 100, got 101',
    ),
    (
      {'sampling.sampler': 'respaced', 'sampling.steps': 1},
      ValueError,
      r'config.sampling.steps: respaced takes between 2 and 100 steps for T = 100, got 1',
    ),
    (
      {'sampling.sampler': 'dpm_solver++', 'sampling.steps': 100},
      ValueError,
      r'dpm_solver\+\+ takes between 1 and 99 steps for T = 100, got 100',
    ),
    ({'sampling.sampler': 'ddim', 'sampling.ddim_eta': -1.0}, ValueError, 'ddim_eta'),
    (
      {'sampling.sampler': 'dpm_solver++', 'sampling.thresholding': 'soft'},
      ValueError,
      r"Unknown config.sampling.thresholding 'soft'; expected one of none, static, dynamic",
    ),
    (
      {'sampling.sampler': 'ddim', 'sampling.thresholding': 'dynamic'},
      ValueError,
      r"thresholding = 'dynamic' is for dpm_solver\+\+; ddim clips",
    ),
    (
      {
        'sampling.sampler': 'respaced',
        'diffusion.model_var_type': 'learned',
        'diffusion.loss_type': 'kl',
      },
      ValueError,
      "respaced sampler cannot use model_var_type 'learned'",
    ),
    ({'sampling.chain_t': (100, 9)}, ValueError, r'chain_t = \(100, 9\) must name timesteps'),
    ({'sampling.interpolation_t': -1}, ValueError, 'interpolation_t = -1'),
    ({'sampling.interpolation_images': (0, 1, 2)}, ValueError, 'must list pairs'),
    ({'sampling.interpolation_images': (0, 300)}, ValueError, "'test' split of 'digits' has 300"),
    ({'sampling.checkpoint_step': 7}, FileNotFoundError, 'No checkpoint at step 7'),
    (
      {'model.ch': 64},
      ValueError,
      r'misshapen tensors \(\d+\): conv_in/bias \(32,\) \(expected \(64,\)\)'
      r'.*does not fit the U-Net',
    ),
    ({'model.num_res_blocks': 2}, ValueError, r'missing tensors \(\d+\): .*block_1'),
  ],
)
def test_bad_settings_are_rejected_before_writing(trained_workdir, override, error, message):
  before = all_files(trained_workdir)
  with pytest.raises(error, match=message):
    sampling.sample(sample_config(**override), str(trained_workdir))
  assert all_files(trained_workdir) == before


def test_workdir_without_checkpoint(tmp_path):
  config = sample_config()
  with pytest.raises(FileNotFoundError, match='No checkpoint in .*: train first'):
    sampling.sample(config, str(tmp_path))
  assert all_files(tmp_path) == []
  with pytest.raises(FileNotFoundError, match='No checkpoint in'):
    sampling.sample(config, str(tmp_path / 'missing'))
  assert not (tmp_path / 'missing').exists()


def test_batch_not_divisible_by_device_count(trained_workdir, monkeypatch):
  monkeypatch.setattr(jax, 'device_count', lambda: 8)
  with pytest.raises(ValueError, match=r'batch_size = 12 must be a positive multiple .* \(8'):
    sampling.sample(sample_config(**{'sampling.batch_size': 12}), str(trained_workdir))

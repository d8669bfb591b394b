"""Tests of --mode=sample (`ddpm_jax/generate.py`): the files written from a tiny trained
checkpoint, reproducibility over runs, device counts and processes (the samples with
DPM-Solver++, whose multistep state crosses chunks; the figures with the ancestral sampler),
official weights through the command line, and the errors for bad input.

Runs on 8 devices and on 2 processes happen in subprocesses of `main.py` (the device count is
fixed when JAX starts).
"""

import json
import shutil
import subprocess
import sys

import jax
import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import UNet2DModel
from helpers import (
  REPO,
  cifar10_diffusers_config,
  free_port,
  main_command,
  run_main,
  subprocess_env,
  tiny_digits_config,
)

from ddpm_jax import data, generate, train

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
  return main_command(workdir, STEP, 'sample', **{**SAMPLE_OVERRIDES, **overrides})


def run_sample(workdir, num_devices: int, **overrides) -> subprocess.CompletedProcess:
  """`main.py --mode=sample` on `num_devices` CPU devices, which must succeed."""
  return run_main(workdir, STEP, num_devices, 'sample', **{**SAMPLE_OVERRIDES, **overrides})


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
  paths = generate.sample(sample_config(), str(workdir))
  return workdir, paths, read_outputs(workdir)


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
  source = data.create_source(sample_config(), 'test')
  grid = outputs[f'interpolation_{SUFFIX}.png'][::8, ::8]
  np.testing.assert_array_equal(grid[1:9, 1:9], source[np.array([0])][0, ..., 0])
  np.testing.assert_array_equal(grid[10:18, 37:45], source[np.array([3])][0, ..., 0])


def test_same_seed_gives_the_same_samples(one_device_run, trained_workdir, tmp_path):
  _, _, first = one_device_run
  workdir = copy_checkpoints(trained_workdir, tmp_path)
  generate.sample(sample_config(**{'sampling.kinds': 'samples'}), str(workdir))
  name = f'{SAMPLES}.npz'
  np.testing.assert_array_equal(read_outputs(workdir)[name], first[name])


def test_8_devices_give_the_same_samples_and_figures(one_device_run, trained_workdir, tmp_path):
  _, _, one_device = one_device_run
  workdir = copy_checkpoints(trained_workdir, tmp_path)
  result = run_sample(workdir, 8)
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
  result = run_sample(workdir, 1, **overrides)
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
    generate.sample(sample_config(**override), str(trained_workdir))
  assert all_files(trained_workdir) == before


def test_workdir_without_checkpoint(tmp_path):
  config = sample_config()
  with pytest.raises(FileNotFoundError, match='No checkpoint in .*: train first'):
    generate.sample(config, str(tmp_path))
  assert all_files(tmp_path) == []
  with pytest.raises(FileNotFoundError, match='No checkpoint in'):
    generate.sample(config, str(tmp_path / 'missing'))
  assert not (tmp_path / 'missing').exists()


def test_batch_not_divisible_by_device_count(trained_workdir, monkeypatch):
  monkeypatch.setattr(jax, 'device_count', lambda: 8)
  with pytest.raises(ValueError, match=r'batch_size = 12 must be a positive multiple .* \(8'):
    generate.sample(sample_config(**{'sampling.batch_size': 12}), str(trained_workdir))


def test_conditional_samples_save_their_labels_and_a_row_per_class(tmp_path):
  # A class-conditional model, sampled for digits 3 and 5 in turn with guidance 2: the npz holds
  # each sample's label (3, 5, 3, 5, ...) and the class names training wrote beside the
  # checkpoints (the digits '0'..'9'); the grid has one row per class; every kind runs.
  cond = {'model.num_classes': 10, 'training.checkpoint_every_steps': STEP}
  train.train(tiny_digits_config(STEP, **cond), str(tmp_path))
  assert json.loads((tmp_path / 'classes.json').read_text()) == {
    'class_names': [str(c) for c in range(10)]
  }
  config = sample_config(
    **cond, **{'sampling.class_labels': (3, 5), 'sampling.guidance_scale': 2.0}
  )
  paths = generate.sample(config, str(tmp_path))
  name = f'samples_dpm_solver++7_static_classes3-5_guidance2_{SUFFIX}'
  assert [p.rsplit('/', 1)[1] for p in paths[:2]] == [f'{name}.npz', f'{name}.png']
  with np.load(tmp_path / 'samples' / f'{name}.npz') as npz:
    assert npz['samples'].shape == (10, 8, 8, 1)
    np.testing.assert_array_equal(npz['labels'], [3, 5] * 5)
    np.testing.assert_array_equal(npz['class_names'], [str(c) for c in range(10)])
  grid = np.asarray(PIL.Image.open(tmp_path / 'samples' / f'{name}.png'))
  assert grid.shape == (8 * (9 * 2 + 1), 8 * (9 * 5 + 1))  # 2 rows (3 and 5) of 5 samples.
  assert len(paths) == len(OUTPUTS)


# RePaint (respaced, 10 steps, n = 2, r = 2) on 3 test digits with the bottom half masked, and
# SDEdit at strength 0.5: batches of 3 on one device, padded to 8 on 8.
EDIT_OVERRIDES = {
  'sampling.kinds': 'inpaint,sdedit',
  'sampling.sampler': 'respaced',
  'sampling.steps': 10,
  'sampling.jump_length': 2,
  'sampling.jump_n_sample': 2,
  'sampling.edit_num_images': 3,
}
INPAINT = f'inpaint_respaced10_bottom_half_jump2x2_{SUFFIX}'
SDEDIT = f'sdedit_respaced10_strength0.5_{SUFFIX}'
EDIT_OUTPUTS = [f'{INPAINT}.npz', f'{INPAINT}.png', f'{SDEDIT}.npz', f'{SDEDIT}.png']


def read_edits(workdir) -> dict[str, np.ndarray]:
  """{file name/array name: the array} of the npz files, {file name: pixels} of the PNGs."""
  outputs = {}
  for name in EDIT_OUTPUTS:
    path = workdir / 'samples' / name
    if path.suffix == '.npz':
      with np.load(path) as npz:
        outputs.update({f'{name}/{key}': npz[key] for key in npz.files})
    else:
      outputs[name] = np.asarray(PIL.Image.open(path))
  return outputs


@pytest.fixture(scope='module')
def edit_run(trained_workdir, tmp_path_factory):
  """The edits in this process (1 device): (workdir, paths returned)."""
  workdir = copy_checkpoints(trained_workdir, tmp_path_factory.mktemp('edits'))
  return workdir, generate.sample(sample_config(**EDIT_OVERRIDES), str(workdir))


def test_inpaint_and_sdedit_write_grids_that_keep_the_known_region(edit_run):
  # Expected: the npz of each kind, and a PNG grid of 3 rows (one per image) of 3 columns
  # (original, masked or diffused, result); the originals are the first 3 test digits; the
  # inpainted results keep their top half exactly (uint8) and differ below; SDEdit's t0 is the
  # respaced sampler's timestep ts[4] of 10 (strength 0.5: the last 5 of its 10 steps).
  workdir, paths = edit_run
  assert paths == [str(workdir / 'samples' / name) for name in EDIT_OUTPUTS]
  outputs = read_edits(workdir)
  originals = data.create_source(sample_config(), 'test')[np.arange(3)]
  np.testing.assert_array_equal(outputs[f'{INPAINT}.npz/originals'], originals)
  masks = outputs[f'{INPAINT}.npz/masks']
  assert masks.shape == (3, 8, 8, 1) and masks[:, :4].all() and not masks[:, 4:].any()
  results = outputs[f'{INPAINT}.npz/results']
  np.testing.assert_array_equal(results[:, :4], originals[:, :4])
  assert not np.array_equal(results[:, 4:], originals[:, 4:])
  np.testing.assert_array_equal(outputs[f'{SDEDIT}.npz/originals'], originals)
  assert outputs[f'{SDEDIT}.npz/results'].shape == (3, 8, 8, 1)
  assert int(outputs[f'{SDEDIT}.npz/timestep']) == 44
  for name in (f'{INPAINT}.png', f'{SDEDIT}.png'):
    assert outputs[name].shape == (8 * (9 * 3 + 1), 8 * (9 * 3 + 1)), name


def test_edits_on_8_devices_are_those_of_one(edit_run, trained_workdir, tmp_path):
  # Expected: the same files, array for array and pixel for pixel, from `main.py` on 8 devices
  # (the batch of 3 padded to 8, sharded over the devices).
  one_device, _ = edit_run
  workdir = copy_checkpoints(trained_workdir, tmp_path)
  result = run_sample(workdir, 8, **EDIT_OVERRIDES)
  assert '8 local / 8 global devices' in result.stderr
  expected = read_edits(one_device)
  actual = read_edits(workdir)
  assert sorted(actual) == sorted(expected)
  for name, array in expected.items():
    np.testing.assert_array_equal(actual[name], array, err_msg=name)

"""Tests of the training job in subprocesses of `main.py` (the device count is fixed when JAX
starts): the same losses on 1 and 8 devices and on 2 processes, and exact resumption after
SIGKILL / SIGTERM. Losses are read back from the TensorBoard events the runs write.
"""

import signal
import subprocess
import time

import numpy as np
import PIL.Image
import psutil
import pytest
from helpers import (
  assert_trees_equal,
  final_params,
  free_port,
  logged_scalars,
  main_command,
  run_main,
  subprocess_env,
)
from train import load_config

from ddpm_jax import data

# One uninterrupted run on 1 device is the reference of the subprocess tests: its losses, logged
# at every step, for the device and process counts (whose runs are shorter: the data order and
# the learning rate are functions of the step alone), and its final params for the kills.
REFERENCE_STEPS = 40


@pytest.fixture(scope='module')
def reference_run(tmp_path_factory):
  """(step, final params, {step: loss}) of a 1-device run of REFERENCE_STEPS steps."""
  workdir = tmp_path_factory.mktemp('reference')
  run_main(workdir, REFERENCE_STEPS)
  step, params = final_params(workdir)
  return step, params, logged_scalars(workdir)


def assert_same_losses(workdir, reference_run, num_steps: int = 10):
  """The losses of a run of `num_steps` steps in `workdir` equal the reference run's."""
  losses, expected = logged_scalars(workdir), reference_run[2]
  steps = list(range(1, num_steps + 1))
  assert sorted(losses) == steps
  np.testing.assert_allclose([losses[s] for s in steps], [expected[s] for s in steps], rtol=1e-5)


def test_same_losses_on_1_and_8_devices_and_resumed_on_2(tmp_path, reference_run):
  # The EMA and Adam's moments are split over the devices (`train.state_sharding`): 8 ways in the
  # checkpoint of the 8-device run, which a 2-device run resumes, splitting them 2 ways.
  assert '8 local / 8 global devices' in run_main(tmp_path, 10, num_devices=8).stderr
  assert_same_losses(tmp_path, reference_run)
  resumed = run_main(tmp_path, 15, num_devices=2).stderr
  assert 'Resumed from the checkpoint at step 10' in resumed
  assert_same_losses(tmp_path, reference_run, 15)


def test_two_processes_match_one_process(tmp_path, reference_run):
  # Two processes with 2 CPU devices each, CPU collectives over gloo, against 1 process.
  port = free_port()
  env = subprocess_env(2, JAX_CPU_COLLECTIVES_IMPLEMENTATION='gloo')
  procs = [
    subprocess.Popen(
      main_command(tmp_path, 10)
      + [
        f'--coordinator_address=127.0.0.1:{port}',
        '--num_processes=2',
        f'--process_id={i}',
      ],
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for i in range(2)
  ]
  outputs = [p.communicate(timeout=600)[0] for p in procs]
  for p, out in zip(procs, outputs, strict=True):
    assert p.returncode == 0, out[-5000:]
  assert 'Process 1 of 2; 2 local / 4 global devices' in outputs[1]
  assert_same_losses(tmp_path, reference_run)


def _wait_for_checkpoint(workdir, proc, step: int, timeout: float = 300):
  """Waits until the checkpoint at `step` is complete in `workdir`."""
  deadline = time.time() + timeout
  target = workdir / 'checkpoints' / str(step)
  while time.time() < deadline:
    if target.is_dir() and any(target.iterdir()):
      return
    assert proc.poll() is None, 'the training process ended early'
    time.sleep(0.05)
  raise TimeoutError(f'no checkpoint at step {step} after {timeout} s')


@pytest.mark.parametrize(
  'sig, steps_per_call',
  [(signal.SIGKILL, 1), (signal.SIGTERM, 1), (signal.SIGTERM, 4)],
  ids=['sigkill', 'sigterm', 'sigterm_4_steps_per_call'],
)
def test_killed_run_resumes_bitwise(tmp_path, sig, steps_per_call, reference_run):
  # With 4 steps per call and losses logged at the end only, calls of 4 and 1 steps between the
  # checkpoints every 5 steps: SIGTERM is seen after the call it follows, at a step that need
  # not be a multiple of 4, and the resumed run equals the one of one step per call.
  extra = {'training.steps_per_call': steps_per_call}
  if steps_per_call > 1:
    extra['training.log_every_steps'] = REFERENCE_STEPS
  kill_and_resume(tmp_path, sig, extra, reference_run)


def test_killed_class_conditional_run_resumes_bitwise(tmp_path):
  # The labels follow the images' resumable order and their dropout the step's key: a
  # class-conditional run killed after its checkpoint at step 5 and resumed ends with the params
  # of an uninterrupted one, bit for bit.
  extra = {'model.num_classes': 10, 'training.label_dropout': 0.2}
  run_main(tmp_path / 'straight', REFERENCE_STEPS, **extra)
  step, params = final_params(tmp_path / 'straight')
  kill_and_resume(tmp_path, signal.SIGKILL, extra, (step, params, None))


def test_run_reading_a_folder_on_workers_is_the_digits_run(tmp_path, reference_run):
  # The digits' train split written as PNG files named in the split's order, read by a folder
  # dataset on 2 worker processes (not decoded once): the same batches, so a run killed with
  # SIGTERM (its workers with it) and resumed ends with the digits run's params, bit for bit.
  folder = tmp_path / 'images'
  folder.mkdir()
  images = data.create_source(load_config('digits'), 'train').images
  for i, image in enumerate(images):
    PIL.Image.fromarray(image[..., 0]).save(folder / f'{i:04d}.png')
  extra = {'data.dataset': 'folder', 'data.image_dir': str(folder), 'data.cache_gib': 0}
  extra['data.num_workers'] = 2
  kill_and_resume(tmp_path, signal.SIGTERM, extra, reference_run, num_workers=2)


def kill_and_resume(tmp_path, sig, extra, reference_run, num_workers=0):
  """Kills a run of `extra` overrides after its checkpoint at step 5 with `sig`, resumes it, and
  checks that it ends with the params of `reference_run`, and that none of its `num_workers`
  input workers outlived it."""
  num_steps = REFERENCE_STEPS
  workdir = tmp_path / 'killed'
  proc = subprocess.Popen(
    main_command(workdir, num_steps, **extra),
    env=subprocess_env(1),
    stdout=subprocess.DEVNULL,
    stderr=subprocess.PIPE,
    text=True,
  )
  _wait_for_checkpoint(workdir, proc, 5)
  workers = [
    child
    for child in psutil.Process(proc.pid).children()
    if 'spawn_main' in ' '.join(child.cmdline())  # The input pipeline's (ddpm_jax/data/workers.py).
  ]
  assert len(workers) == num_workers
  proc.send_signal(sig)
  _, stderr = proc.communicate(timeout=300)
  psutil.wait_procs(workers, timeout=10)
  assert not [w for w in workers if w.is_running() and w.status() != psutil.STATUS_ZOMBIE]
  saved = sorted(int(p.name) for p in (workdir / 'checkpoints').iterdir() if p.name.isdigit())
  if sig == signal.SIGTERM:
    # A clean exit that saved at the step it had reached.
    assert proc.returncode == 0, stderr[-5000:]
    assert 'Asked to stop (SIGTERM)' in stderr
  else:
    assert proc.returncode == -signal.SIGKILL
  assert saved and max(saved) < num_steps, saved

  run_main(workdir, num_steps, **extra)
  step_a, straight, _ = reference_run
  step_b, resumed = final_params(workdir)
  assert step_a == step_b == num_steps
  assert_trees_equal(resumed, straight)

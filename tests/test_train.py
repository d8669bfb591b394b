"""Tests of the training job: a real step on mock TFDS data, device-count and process-count
invariance, exact resumption after SIGKILL / SIGTERM, and the errors for bad input.

Multi-device and multi-process runs happen in subprocesses of `main.py` (the device count is
fixed when JAX starts); their losses are read back from the TensorBoard events they write.
"""

import os
import re
import signal
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from helpers import free_port, main_command, run_main, subprocess_env, tiny_digits_config

from ddpm_jax import checkpoints, image_io, input_pipeline, models, train
from ddpm_jax import diffusion as diffusion_lib


def logged_scalars(workdir, tag: str = 'loss') -> dict[int, float]:
  """{step: value} of a scalar in the TensorBoard event files of `workdir`."""
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


# ----------------------------------------------------------------------------------------------
# In-process runs.
# ----------------------------------------------------------------------------------------------


def test_one_step_on_mock_cifar10(tmp_path):
  # The real pipeline (TFDS data_source) and the real step on a shrunken CIFAR10 config.
  config = tiny_digits_config(1, **{'training.checkpoint_every_steps': 1})
  config.data.dataset = 'cifar10'
  config.data.image_size = 32
  config.data.num_channels = 3
  config.model.attn_resolutions = (16,)
  with tfds.testing.mock_data(num_examples=16):
    state = train.train_and_evaluate(config, str(tmp_path))
  assert int(state.step) == 1
  # A first update at learning rate 0 (the original's warmup) leaves the params as they were,
  # and the EMA (decay 1e-10 at step 0) is their copy.
  assert_trees_equal(jax.device_get(state.ema_params), jax.device_get(state.params))
  loss = logged_scalars(tmp_path)
  assert list(loss) == [1] and np.isfinite(loss[1])
  assert (tmp_path / 'checkpoints' / '1').is_dir()


def test_digits_run_writes_checkpoints_logs_and_samples(tmp_path):
  config = tiny_digits_config(
    6, **{'training.sample_every_steps': 6, 'training.learning_rate': 1e-3}
  )
  state = train.train_and_evaluate(config, str(tmp_path))
  assert int(state.step) == 6
  assert sorted(int(p.name) for p in (tmp_path / 'checkpoints').iterdir()) == [5, 6]
  assert sorted(logged_scalars(tmp_path)) == [1, 2, 3, 4, 5, 6]
  png = tmp_path / 'samples' / 'step_00000006.png'
  assert png.is_file() and png.stat().st_size > 0
  # The original's warmup: lr(step) = 1e-3 * min(step / 2, 1) at the update of `step`.
  lr = logged_scalars(tmp_path, 'learning_rate')
  np.testing.assert_allclose([lr[s] for s in (1, 2, 3)], [0.0, 5e-4, 1e-3], rtol=1e-6)


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
  # lr 1e30 from step 1 on: Adam moves every parameter by ~1e30 and the next loss is not finite.
  config = tiny_digits_config(
    10,
    **{
      'training.learning_rate': 1e30,
      'training.warmup_steps': 1,
      'training.checkpoint_every_steps': 1,
    },
  )
  with pytest.raises(FloatingPointError, match=r'Non-finite loss .* at step \d+') as excinfo:
    train.train_and_evaluate(config, str(tmp_path))
  bad_step = int(re.search(r'at step (\d+)', str(excinfo.value)).group(1))
  saved = sorted(int(p.name) for p in (tmp_path / 'checkpoints').iterdir() if p.name.isdigit())
  assert saved and max(saved) < bad_step
  step, params = final_params(tmp_path)
  assert step == max(saved)
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(params))


def test_non_finite_loss_inside_a_call_names_its_step(tmp_path):
  # As above, with calls of 2 steps (checkpoints every 2): the update of step 2 (lr 1e30) makes
  # the loss of step 3, the first of the call of steps 3-4, non-finite. The log at step 4 names
  # step 3, before the checkpoint of step 4 is written.
  config = tiny_digits_config(
    10,
    **{
      'training.learning_rate': 1e30,
      'training.warmup_steps': 1,
      'training.steps_per_call': 4,
      'training.log_every_steps': 4,
      'training.checkpoint_every_steps': 2,
    },
  )
  with pytest.raises(FloatingPointError, match=r'Non-finite loss .* at step 3;'):
    train.train_and_evaluate(config, str(tmp_path))
  assert sorted(int(p.name) for p in (tmp_path / 'checkpoints').iterdir()) == [2]


def call_ends(training, start_step: int = 0) -> list[int]:
  """The step at which each call of a run from `start_step` ends."""
  ends = [start_step]
  while ends[-1] < training.num_train_steps:
    ends.append(ends[-1] + train.call_length(ends[-1], training))
  return ends[1:]


def test_calls_end_at_every_step_where_the_loop_acts():
  # 4 steps per call; logs every 6 steps, checkpoints every 5, sample grids every 9, 14 steps.
  training = tiny_digits_config(
    14,
    **{
      'training.steps_per_call': 4,
      'training.log_every_steps': 6,
      'training.checkpoint_every_steps': 5,
      'training.sample_every_steps': 9,
    },
  ).training
  assert call_ends(training) == [4, 5, 6, 9, 10, 12, 14]
  assert call_ends(training, start_step=7) == [9, 10, 12, 14]  # Resumed at step 7.
  training.sample_every_steps = 0  # No sample grids.
  assert call_ends(training) == [4, 5, 6, 10, 12, 14]
  training.steps_per_call = 1
  assert call_ends(training) == list(range(1, 15))


# 8 steps, checkpoints at 6 and 8, losses logged at 6 (with the checkpoint) and 8.
STEPS_PER_CALL_RUN = {'training.log_every_steps': 8, 'training.checkpoint_every_steps': 6}


@pytest.fixture(scope='module')
def one_step_per_call_run(tmp_path_factory):
  """(final state as host arrays, logged losses) of 8 steps, one step per call."""
  workdir = tmp_path_factory.mktemp('one_step_per_call')
  config = tiny_digits_config(8, **STEPS_PER_CALL_RUN, **{'training.steps_per_call': 1})
  state = train.train_and_evaluate(config, str(workdir))
  return jax.device_get(state), logged_scalars(workdir)


def test_steps_per_call_gives_bitwise_the_same_run(tmp_path, one_step_per_call_run):
  # 4 steps per call and a checkpoint at step 8 only: two calls of 4 steps.
  config = tiny_digits_config(
    8,
    **{
      **STEPS_PER_CALL_RUN,
      'training.checkpoint_every_steps': 8,
      'training.steps_per_call': 4,
    },
  )
  assert call_ends(config.training) == [4, 8]
  state = jax.device_get(train.train_and_evaluate(config, str(tmp_path)))
  expected, expected_loss = one_step_per_call_run
  assert int(state.step) == 8
  assert_trees_equal(state.params, expected.params)
  assert_trees_equal(state.ema_params, expected.ema_params)
  # One log, at step 8, of the mean over the 8 steps of both calls: the weighted mean of the
  # logs of 6 and 2 steps of the one-step run; the learning rates of the updates of steps 0..7
  # are 2e-3 * min(step / 2, 1) (configs/digits.py), whose mean is 2e-3 * 6.5 / 8.
  loss, lr = logged_scalars(tmp_path), logged_scalars(tmp_path, 'learning_rate')
  assert list(loss) == list(lr) == [8]
  np.testing.assert_allclose(loss[8], (6 * expected_loss[6] + 2 * expected_loss[8]) / 8, rtol=1e-6)
  np.testing.assert_allclose(lr[8], 2e-3 * 6.5 / 8, rtol=1e-6)


def test_steps_per_call_resumes_bitwise_between_multiples(tmp_path, one_step_per_call_run):
  # 4 steps per call, stopped at the checkpoint of step 6 (calls of 4 and 2 steps), then resumed
  # to step 8 (a call of 2 steps): the same as 8 steps of one step per call.
  config = tiny_digits_config(6, **STEPS_PER_CALL_RUN, **{'training.steps_per_call': 4})
  assert call_ends(config.training) == [4, 6]
  train.train_and_evaluate(config, str(tmp_path))
  assert sorted(int(p.name) for p in (tmp_path / 'checkpoints').iterdir()) == [6]
  config.training.num_train_steps = 8
  assert call_ends(config.training, start_step=6) == [8]
  state = jax.device_get(train.train_and_evaluate(config, str(tmp_path)))
  expected, expected_loss = one_step_per_call_run
  assert int(state.step) == 8
  assert_trees_equal(state.params, expected.params)
  assert_trees_equal(state.ema_params, expected.ema_params)
  assert_trees_equal(state.opt_state, expected.opt_state)
  assert logged_scalars(tmp_path) == expected_loss  # The same losses at steps 6 and 8.
  step, params = final_params(tmp_path)
  assert step == 8
  assert_trees_equal(params, {'params': expected.params, 'ema_params': expected.ema_params})


def test_unreadable_latest_checkpoint_falls_back(tmp_path, caplog):
  caplog.set_level('INFO')
  config = tiny_digits_config(10)
  train.train_and_evaluate(config, str(tmp_path))  # Checkpoints at steps 5 and 10.
  for path in (tmp_path / 'checkpoints' / '10' / 'params').rglob('*'):
    if path.is_file():
      path.write_bytes(b'corrupt')
  config.training.num_train_steps = 12
  state = train.train_and_evaluate(config, str(tmp_path))
  assert int(state.step) == 12
  assert 'Could not read the checkpoint at step 10' in caplog.text
  assert 'Resumed from the checkpoint at step 5' in caplog.text


def test_all_checkpoints_unreadable_is_an_error(tmp_path):
  config = tiny_digits_config(5)
  train.train_and_evaluate(config, str(tmp_path))
  for path in (tmp_path / 'checkpoints').rglob('*'):
    if path.is_file() and 'params' in str(path):
      path.write_bytes(b'corrupt')
  config.training.num_train_steps = 7
  with pytest.raises(RuntimeError, match='None of the checkpoints'):
    train.train_and_evaluate(config, str(tmp_path))


@pytest.mark.parametrize(
  'override, message',
  [
    ({'data.dataset': 'mnistt'}, "Unknown dataset 'mnistt'.*Closest names: mnist"),
    ({'diffusion.beta_schedule': 'cubic'}, "Unknown beta schedule 'cubic'"),
    ({'diffusion.model_mean_type': 'v'}, "Unknown model_mean_type 'v'"),
    ({'diffusion.model_var_type': 'big'}, "Unknown model_var_type 'big'"),
    ({'diffusion.loss_type': 'l1'}, "Unknown loss_type 'l1'"),
    ({'model.ch_mult': (1, 2, 2, 2, 2)}, 'not divisible by 2\\^\\(len\\(ch_mult\\) - 1\\) = 16'),
    ({'model.attn_resolutions': (16,)}, 'include \\[16\\], which the network never reaches'),
    ({'model.dtype': 'float16'}, "dtype must be 'float32' or 'bfloat16'"),
    ({'model.attention_impl': 'flash'}, "attention_impl must be None, 'xla' or 'cudnn'"),
    ({'training.steps_per_call': 0}, 'steps_per_call must be a positive integer .*, got 0'),
  ],
)
def test_bad_config_is_rejected_before_compiling(tmp_path, override, message):
  config = tiny_digits_config(1, **override)
  with pytest.raises(ValueError, match=message):
    train.train_and_evaluate(config, str(tmp_path))
  assert not (tmp_path / 'checkpoints').exists()


def test_batch_not_divisible_by_device_count(tmp_path, monkeypatch):
  # Eight devices cannot split a global batch of 12 evenly.
  monkeypatch.setattr(jax, 'device_count', lambda: 8)
  config = tiny_digits_config(1, **{'training.batch_size': 12})
  with pytest.raises(
    ValueError, match='batch_size = 12 must be a positive multiple of the number of devices \\(8'
  ):
    train.train_and_evaluate(config, str(tmp_path))


def test_unwritable_workdir(tmp_path):
  blocker = tmp_path / 'a_file'
  blocker.write_text('not a directory')
  with pytest.raises(PermissionError, match='Cannot write to workdir'):
    train.train_and_evaluate(tiny_digits_config(1), str(blocker / 'workdir'))


# ----------------------------------------------------------------------------------------------
# Subprocess runs: several devices, several processes, kills.
# ----------------------------------------------------------------------------------------------


def test_same_losses_on_1_and_8_devices(tmp_path):
  run_main(tmp_path / 'one', 10, num_devices=1)
  assert '8 local / 8 global devices' in run_main(tmp_path / 'eight', 10, num_devices=8).stderr
  one, eight = logged_scalars(tmp_path / 'one'), logged_scalars(tmp_path / 'eight')
  assert sorted(one) == list(range(1, 11))
  np.testing.assert_allclose([eight[s] for s in one], list(one.values()), rtol=1e-5)


def test_two_processes_match_one_process(tmp_path):
  # Two processes with 2 CPU devices each, CPU collectives over gloo, against 1 x 4 devices.
  run_main(tmp_path / 'single', 10, num_devices=4)
  port = free_port()
  env = subprocess_env(2, JAX_CPU_COLLECTIVES_IMPLEMENTATION='gloo')
  procs = [
    subprocess.Popen(
      main_command(tmp_path / 'multi', 10)
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
  single, multi = logged_scalars(tmp_path / 'single'), logged_scalars(tmp_path / 'multi')
  assert sorted(single) == list(range(1, 11))
  np.testing.assert_allclose([multi[s] for s in single], list(single.values()), rtol=1e-5)


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


KILL_TEST_STEPS = 40


@pytest.fixture(scope='module')
def uninterrupted_run(tmp_path_factory):
  """The final params of a run of KILL_TEST_STEPS steps that nothing interrupted."""
  workdir = tmp_path_factory.mktemp('uninterrupted')
  run_main(workdir, KILL_TEST_STEPS)
  return final_params(workdir)


@pytest.mark.parametrize(
  'sig, steps_per_call',
  [(signal.SIGKILL, 1), (signal.SIGTERM, 1), (signal.SIGTERM, 4)],
  ids=['sigkill', 'sigterm', 'sigterm_4_steps_per_call'],
)
def test_killed_run_resumes_bitwise(tmp_path, sig, steps_per_call, uninterrupted_run):
  num_steps = KILL_TEST_STEPS
  # With 4 steps per call and losses logged at the end only, calls of 4 and 1 steps between the
  # checkpoints every 5 steps: SIGTERM is seen after the call it follows, at a step that need
  # not be a multiple of 4, and the resumed run equals the one of one step per call.
  extra = {'training.steps_per_call': steps_per_call}
  if steps_per_call > 1:
    extra['training.log_every_steps'] = num_steps

  workdir = tmp_path / 'killed'
  proc = subprocess.Popen(
    main_command(workdir, num_steps, **extra),
    env=subprocess_env(1),
    stdout=subprocess.DEVNULL,
    stderr=subprocess.PIPE,
    text=True,
  )
  _wait_for_checkpoint(workdir, proc, 5)
  proc.send_signal(sig)
  _, stderr = proc.communicate(timeout=300)
  saved = sorted(int(p.name) for p in (workdir / 'checkpoints').iterdir() if p.name.isdigit())
  if sig == signal.SIGTERM:
    # A clean exit that saved at the step it had reached.
    assert proc.returncode == 0, stderr[-5000:]
    assert 'Asked to stop (SIGTERM)' in stderr
  else:
    assert proc.returncode == -signal.SIGKILL
  assert saved and max(saved) < num_steps, saved

  run_main(workdir, num_steps, **extra)
  step_a, straight = uninterrupted_run
  step_b, resumed = final_params(workdir)
  assert step_a == step_b == num_steps
  assert_trees_equal(resumed, straight)


def test_bfloat16_training_lowers_the_loss_like_float32():
  # model.dtype = 'bfloat16': activations in bf16, params, Adam state and EMA in float32. From the
  # same init and on the same digit batches, 60 steps must lower the loss on a fixed evaluation
  # set (eps-prediction MSE at fixed t and noise) by as much as float32 does: the expected value
  # is the float32 run's, within 10% of its initial loss.
  def run(dtype):
    config = tiny_digits_config(60, **{'model.dtype': dtype, 'training.learning_rate': 2e-3})
    model = models.create_model(config)
    diffusion = diffusion_lib.GaussianDiffusion.from_config(config.diffusion)
    tx, schedule = train.create_optimizer(config)
    state = train.create_train_state(config, model, tx, jax.random.key(0))
    assert {x.dtype for x in jax.tree.leaves((state.params, state.opt_state))} <= {
      np.dtype(np.float32),
      np.dtype(np.int32),
    }
    step = jax.jit(train.create_train_step(config, model, diffusion, tx, schedule))
    images = input_pipeline.create_source(config, 'test')[np.arange(64)]
    x_start = image_io.to_model_range(images)
    t = jnp.arange(64) * diffusion.num_timesteps // 64
    noise = jax.random.normal(jax.random.key(1), x_start.shape)

    @jax.jit
    def eval_loss(params):
      model_fn = lambda x, t: model.apply({'params': params}, x, t, train=False)
      return jnp.mean(diffusion.training_losses(model_fn, x_start, t, noise))

    initial = float(eval_loss(state.params))
    with input_pipeline.train_batches(config, global_batch_size=8, start_step=0, seed=0) as batches:
      for _ in range(60):
        state, _ = step(state, next(batches)[1])
    assert {x.dtype for x in jax.tree.leaves(state.ema_params)} == {np.dtype(np.float32)}
    return initial, float(eval_loss(state.params))

  initial32, final32 = run('float32')
  initial16, final16 = run('bfloat16')
  print(
    f'eval loss float32 {initial32:.4f} -> {final32:.4f}, bfloat16 {initial16:.4f} -> {final16:.4f}'
  )
  assert final32 < 0.7 * initial32  # Training works at all.
  assert abs(initial16 - initial32) < 0.02 * initial32  # The same init, seen through bf16.
  assert abs(final16 - final32) < 0.1 * initial32

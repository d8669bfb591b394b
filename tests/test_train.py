"""Tests of the training job in this process: a real step on mock TFDS data, steps per call,
resumption, bfloat16, checkpoints that cannot be read, and the errors for bad input. The runs on
several devices and processes, and the kills, are in test_train_processes.py.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds
from helpers import (
  assert_trees_equal,
  final_params,
  logged_scalars,
  tiny_digits_config,
  train_step_setup,
)

from ddpm_jax import checkpoints, checks, data, image_io, train


def test_one_step_on_mock_cifar10(tmp_path):
  # The real pipeline (TFDS data_source) and the real step on a shrunken CIFAR10 config.
  config = tiny_digits_config(1, **{'training.checkpoint_every_steps': 1})
  config.data.dataset = 'cifar10'
  config.data.image_size = 32
  config.data.num_channels = 3
  config.model.attn_resolutions = (16,)
  with tfds.testing.mock_data(num_examples=16):
    state = train.train(config, str(tmp_path))
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
  reported = {}
  state = train.train(
    config, str(tmp_path), report=lambda step, metrics: reported.update({step: metrics})
  )
  assert int(state.step) == 6
  assert sorted(int(p.name) for p in (tmp_path / 'checkpoints').iterdir()) == [5, 6]
  losses = logged_scalars(tmp_path)
  assert sorted(losses) == [1, 2, 3, 4, 5, 6]
  # `report` gets what is logged, step by step.
  assert sorted(reported) == sorted(losses)
  np.testing.assert_allclose(
    [reported[s]['loss'] for s in sorted(losses)], [losses[s] for s in sorted(losses)], rtol=1e-6
  )
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
    train.train(config, str(tmp_path))
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
    train.train(config, str(tmp_path))
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
  state = train.train(config, str(workdir))
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
  state = jax.device_get(train.train(config, str(tmp_path)))
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
  train.train(config, str(tmp_path))
  assert sorted(int(p.name) for p in (tmp_path / 'checkpoints').iterdir()) == [6]
  config.training.num_train_steps = 8
  assert call_ends(config.training, start_step=6) == [8]
  state = jax.device_get(train.train(config, str(tmp_path)))
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
  train.train(config, str(tmp_path))  # Checkpoints at steps 5 and 10.
  for path in (tmp_path / 'checkpoints' / '10' / 'params').rglob('*'):
    if path.is_file():
      path.write_bytes(b'corrupt')
  config.training.num_train_steps = 12
  state = train.train(config, str(tmp_path))
  assert int(state.step) == 12
  assert 'Could not read the checkpoint at step 10' in caplog.text
  assert 'Resumed from the checkpoint at step 5' in caplog.text


def test_all_checkpoints_unreadable_is_an_error(tmp_path):
  config = tiny_digits_config(5)
  train.train(config, str(tmp_path))
  for path in (tmp_path / 'checkpoints').rglob('*'):
    if path.is_file() and 'params' in str(path):
      path.write_bytes(b'corrupt')
  config.training.num_train_steps = 7
  with pytest.raises(RuntimeError, match='None of the checkpoints'):
    train.train(config, str(tmp_path))


@pytest.mark.parametrize(
  'override, message',
  [
    ({'data.dataset': 'mnistt'}, "Unknown dataset 'mnistt'.*Closest names: mnist"),
    ({'diffusion.beta_schedule': 'cubic'}, "Unknown beta schedule 'cubic'"),
    ({'diffusion.model_mean_type': 'score'}, "Unknown model_mean_type 'score'"),
    ({'diffusion.model_var_type': 'big'}, "Unknown model_var_type 'big'"),
    ({'diffusion.loss_type': 'l1'}, "Unknown loss_type 'l1'"),
    ({'diffusion.loss_weighting': 'snr'}, "Unknown loss_weighting 'snr'"),
    ({'model.ch_mult': (1, 2, 2, 2, 2)}, 'not divisible by 2\\^\\(len\\(ch_mult\\) - 1\\) = 16'),
    ({'model.attn_resolutions': (16,)}, 'include \\[16\\], which the network never reaches'),
    ({'model.dtype': 'float16'}, "dtype must be 'float32', 'bfloat16' or None"),
    ({'model.attention_impl': 'flash'}, "attention_impl must be None, 'xla' or 'cudnn'"),
    ({'training.steps_per_call': 0}, 'steps_per_call must be a positive integer .*, got 0'),
    ({'training.lr_decay': 'linear'}, "Unknown config.training.lr_decay 'linear'"),
    # The sample grids are drawn with config.sampling's sampler.
    ({'sampling.steps': 100}, 'dpm_solver\\+\\+ takes between 1 and 99 steps for T = 100'),
  ],
)
def test_bad_config_is_rejected_before_compiling(tmp_path, override, message):
  config = tiny_digits_config(1, **override)
  with pytest.raises(ValueError, match=message):
    train.train(config, str(tmp_path))
  assert not (tmp_path / 'checkpoints').exists()


@pytest.mark.parametrize(
  'override, message',
  [
    ({'training.num_sample_images': 0}, 'num_sample_images = 0 must be a positive multiple'),
    ({'training.steps_per_call': 0}, 'steps_per_call must be a positive integer .*, got 0'),
    ({'training.lr_decay': 'linear'}, "Unknown config.training.lr_decay 'linear'"),
  ],
)
def test_check_config_alone_names_the_training_field(override, message):
  # What an entry point that checks every section before any work gets: no workdir, no compile.
  with pytest.raises(ValueError, match=message):
    checks.check_config(tiny_digits_config(1, **override), train.check_config)


def test_batch_not_divisible_by_device_count(tmp_path, monkeypatch):
  # Eight devices cannot split a global batch of 12 evenly.
  monkeypatch.setattr(jax, 'device_count', lambda: 8)
  config = tiny_digits_config(1, **{'training.batch_size': 12})
  with pytest.raises(
    ValueError, match='batch_size = 12 must be a positive multiple of the number of devices \\(8'
  ):
    train.train(config, str(tmp_path))


def test_unwritable_workdir(tmp_path):
  blocker = tmp_path / 'a_file'
  blocker.write_text('not a directory')
  with pytest.raises(PermissionError, match='Cannot write to workdir'):
    train.train(tiny_digits_config(1), str(blocker / 'workdir'))


def test_bfloat16_training_lowers_the_loss_like_float32():
  # model.dtype = 'bfloat16': activations in bf16, params, Adam state and EMA in float32. From the
  # same init and on the same digit batches, 60 steps must lower the loss on a fixed evaluation
  # set (eps-prediction MSE at fixed t and noise) by as much as float32 does: the expected value
  # is the float32 run's, within 10% of its initial loss.
  def run(dtype):
    config = tiny_digits_config(60, **{'model.dtype': dtype, 'training.learning_rate': 2e-3})
    model, diffusion, state, step = train_step_setup(config)
    assert {x.dtype for x in jax.tree.leaves((state.params, state.opt_state))} <= {
      np.dtype(np.float32),
      np.dtype(np.int32),
    }
    images = data.create_source(config, 'test')[np.arange(64)]
    x_start = image_io.to_model_range(images)
    t = jnp.arange(64) * diffusion.num_timesteps // 64
    noise = jax.random.normal(jax.random.key(1), x_start.shape)

    @jax.jit
    def eval_loss(params):
      model_fn = lambda x, t: model.apply({'params': params}, x, t, train=False)
      return jnp.mean(diffusion.training_losses(model_fn, x_start, t, noise))

    initial = float(eval_loss(state.params))
    with data.train_batches(config, global_batch_size=8, start_step=0, seed=0) as batches:
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


# ----------------------------------------------------------------------------------------------
# Fine-tuning from a trained or imported checkpoint (training.init_from).
# ----------------------------------------------------------------------------------------------


def test_init_from_starts_at_step_0_from_the_checkpoints_weights(tmp_path):
  # Expected: the first update has learning rate 0 (the warmup), so one step from a trained
  # workdir's weights leaves its params as they were, bit for bit, and moves the EMA it started
  # from once: decay * ema + (1 - decay) * params (float64 here); at step 1 of the new run (not
  # the source's step + 1), with the optimizer state of a fresh run.
  source = tmp_path / 'source'
  config = tiny_digits_config(3)
  train.train(config, str(source))
  _, expected = final_params(source)
  decay = config.training.ema_decay
  expected_ema = jax.tree.map(
    lambda e, p: decay * np.float64(e) + (1 - decay) * np.float64(p),
    expected['ema_params'],
    expected['params'],
  )
  for init_from in (source, source / 'checkpoints' / '3'):
    workdir = tmp_path / f'tuned_{init_from.name}'
    state = train.train(
      tiny_digits_config(1, **{'training.init_from': str(init_from)}), str(workdir)
    )
    step, tuned = final_params(workdir)
    assert step == 1
    assert_trees_equal(tuned['params'], expected['params'])
    jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9),
      tuned['ema_params'],
      expected_ema,
    )
    assert int(state.opt_state[1][0].count) == 1  # Adam's count: a fresh optimizer.


def test_imported_weights_train_only_through_init_from(tmp_path):
  # An imported workdir (weights, no optimizer state) cannot be resumed; the error says to start
  # a new workdir from it, which then trains.
  imported = tmp_path / 'imported'
  model, _, state, _ = train_step_setup(tiny_digits_config(1))
  del model
  checkpoints.save_imported(str(imported), params=state.params, step=0)
  before = sorted(str(p) for p in imported.rglob('*'))
  with pytest.raises(ValueError, match=r'imported weights .*--config.training.init_from='):
    train.train(tiny_digits_config(2), str(imported))
  assert sorted(str(p) for p in imported.rglob('*')) == before
  config = tiny_digits_config(1, **{'training.init_from': str(imported)})
  train.train(config, str(tmp_path / 'tuned'))
  assert_trees_equal(final_params(tmp_path / 'tuned')[1]['params'], jax.device_get(state.params))


@pytest.mark.parametrize(
  'override, error, message',
  [
    ({}, FileNotFoundError, 'No checkpoint at .*missing: expected a workdir'),
    (
      {'model.ch': 64},
      ValueError,
      r'misshapen tensors .*conv_in/bias \(32,\) \(expected \(64,\)\)',
    ),
  ],
)
def test_bad_init_from_is_rejected_before_training(tmp_path, override, error, message):
  source = tmp_path / 'source'
  if override:
    train.train(tiny_digits_config(1), str(source))
  else:
    source = tmp_path / 'missing'
  config = tiny_digits_config(1, **{'training.init_from': str(source), **override})
  with pytest.raises(error, match=message):
    train.train(config, str(tmp_path / 'tuned'))
  assert not (tmp_path / 'tuned' / 'checkpoints').exists() or not any(
    (tmp_path / 'tuned' / 'checkpoints').iterdir()
  )

"""Tests of --mode=eval: bits/dim against calc_bpd_loop itself, resumption after interruption,
the Inception path on mock CIFAR10 with random Inception weights, and the errors."""

import hashlib
import json
import shutil
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds
from etils import epath
from helpers import tiny_digits_config

from ddpm_jax import (
  checkpoints,
  data,
  diffusion,
  evaluation,
  image_io,
  inception_weights,
  metrics,
  models,
  sample_loop,
  train,
)
from ddpm_jax import mesh as mesh_lib
from ddpm_jax.models import inception

NUM_STEPS = 20  # Diffusion timesteps of the tiny models: the bound has 20 terms.


def eval_config(**extra):
  config = tiny_digits_config(
    2,
    **{
      'diffusion.num_diffusion_timesteps': NUM_STEPS,
      'training.checkpoint_every_steps': 2,
      **extra,
    },
  )
  config.eval.num_bpd_images = 10
  config.eval.bpd_batch_size = 4  # 3 batches, the last one padded.
  config.eval.num_samples = 12
  config.sampling.batch_size = 8  # 2 batches, the last one trimmed.
  return config


@pytest.fixture(scope='module')
def trained_workdir(tmp_path_factory):
  """A digits workdir trained for 2 steps with the tiny config."""
  workdir = tmp_path_factory.mktemp('trained')
  train.train(eval_config(), str(workdir))
  return workdir


def copy_workdir(src, tmp_path):
  dst = tmp_path / 'workdir'
  shutil.copytree(src, dst)
  return dst


def test_bpd_equals_calc_bpd_loop_and_its_terms(trained_workdir, tmp_path):
  workdir = copy_workdir(trained_workdir, tmp_path)
  config = eval_config()
  config.eval.num_samples = 0
  results = evaluation.evaluate(config, str(workdir))
  with (workdir / 'eval' / 'step_2' / 'results.json').open() as f:
    assert json.load(f) == results

  # Expected: calc_bpd_loop run here on the same 10 test images with batch k's key
  # fold_in(key(seed), k), averaged over the images.
  diff = diffusion.GaussianDiffusion.from_config(config.diffusion)
  model = models.create_model(config)
  step, params = checkpoints.restore_ema_params(str(workdir), models.param_shapes(model, 8, 1))
  images = data.create_source(config, 'test')[np.arange(10)]
  totals, terms = [], []
  for k, start in enumerate(range(0, 10, 4)):
    out = diff.calc_bpd_loop(
      sample_loop.make_model_fn(model, params),
      image_io.to_model_range(jnp.asarray(images[start : start + 4])),
      jax.random.fold_in(jax.random.key(config.seed), k),
    )
    totals.append(np.asarray(out['total_bpd']))
    terms.append(np.asarray(out['terms_bpd']))
  totals, terms = np.concatenate(totals), np.concatenate(terms)
  assert step == results['step'] == 2
  np.testing.assert_allclose(results['bpd'], totals.mean(), rtol=1e-5)
  np.testing.assert_allclose(results['bpd_decoder'], terms[:, 0].mean(), rtol=1e-5)
  # The total is the prior plus the sum of the terms (eq. 5).
  np.testing.assert_allclose(
    results['bpd'],
    results['bpd_prior'] + results['bpd_decoder'] + results['bpd_kl_terms'],
    rtol=1e-6,
  )
  with np.load(workdir / 'eval' / 'step_2' / 'bpd_terms.npz') as saved:
    np.testing.assert_allclose(saved['terms_bpd'], terms.mean(axis=0), rtol=1e-5)
  assert (workdir / 'eval' / 'step_2' / 'bpd_terms.png').stat().st_size > 0


class Interrupt(Exception):
  pass


def test_interrupted_eval_resumes_to_the_same_result(trained_workdir, tmp_path, monkeypatch):
  straight = evaluation.evaluate(eval_config(), str(copy_workdir(trained_workdir, tmp_path / 'a')))

  workdir = copy_workdir(trained_workdir, tmp_path / 'b')
  # First run: stopped in the second bits/dim batch.
  make_bpd_fn = evaluation.create_bpd_fn

  def failing_bpd_fn(*args):
    bpd_fn, calls = make_bpd_fn(*args), []

    def fn(*inputs):
      calls.append(1)
      if len(calls) == 2:
        raise Interrupt
      return bpd_fn(*inputs)

    return fn

  monkeypatch.setattr(evaluation, 'create_bpd_fn', failing_bpd_fn)
  with pytest.raises(Interrupt):
    evaluation.evaluate(eval_config(), str(workdir))
  monkeypatch.undo()
  (state_path,) = (workdir / 'eval' / 'step_2').glob('bpd_partial_*.npz')
  with np.load(state_path) as state:
    assert int(state['next_batch']) == 1

  # Second run: stopped in the second batch of samples, after the first was saved.
  run = sample_loop.ChunkedLoop.run
  calls = []

  def failing_run(self, *args, **kwargs):
    calls.append(1)
    if len(calls) == 2:
      raise Interrupt
    return run(self, *args, **kwargs)

  monkeypatch.setattr(sample_loop.ChunkedLoop, 'run', failing_run)
  with pytest.raises(Interrupt):
    evaluation.evaluate(eval_config(), str(workdir))
  monkeypatch.undo()
  (sample_dir,) = (workdir / 'eval' / 'step_2').glob('samples_dpm_solver++10_static_seed0_*')
  assert sorted(p.name for p in sample_dir.glob('*.npz')) == ['batch_00000.npz']

  resumed = evaluation.evaluate(eval_config(), str(workdir))
  assert resumed == straight


def random_inception_weights(path):
  """Random variables of the FID Inception's names and shapes (no network init to run):
  He-scaled kernels, zero biases, batch norms with non-trivial scales and statistics."""
  rng = np.random.default_rng(0)
  flat = {}
  for name, shape in inception.expected_shapes().items():
    leaf = name.rsplit('/', 1)[1]
    if leaf == 'kernel':  # Fan-in: all axes but the last (HWIO convolutions, [in, out] dense).
      value = rng.normal(size=shape) * np.sqrt(2 / np.prod(shape[:-1]))
    elif leaf == 'mean':
      value = rng.normal(size=shape) * 0.1
    elif leaf in ('var', 'scale'):
      value = rng.uniform(0.5, 1.5, size=shape)
    else:
      value = np.zeros(shape)
    flat[name] = value.astype(np.float32)
  np.savez(path, **flat)


def frechet_distance_by_eigenvalues(mu1, sigma1, mu2, sigma2) -> float:
  """|mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^(1/2)), the last trace as
  the sum of the square roots of the eigenvalues of sigma1^(1/2) sigma2 sigma1^(1/2), which is
  symmetric, positive semi-definite and similar to sigma1 sigma2 (float64, 7x faster than a
  general matrix square root of 2048 x 2048)."""
  w, v = np.linalg.eigh(sigma1)
  root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
  eigenvalues = np.linalg.eigvalsh(root1 @ sigma2 @ root1)
  diff = mu1 - mu2
  trace_sqrt = np.sum(np.sqrt(np.clip(eigenvalues, 0, None)))
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt)


def test_fid_and_inception_score_on_mock_cifar10(tmp_path):
  # Expected: the Frechet distance (by eigenvalues, not the SciPy sqrtm of metrics.py) and IS
  # recomputed here from the Inception features of the saved samples and of all mock training
  # images (metrics.py is tested against SciPy).
  weights = tmp_path / 'inception.npz'
  random_inception_weights(weights)
  config = eval_config()
  config.data.dataset = 'cifar10'
  config.data.image_size = 32
  config.data.num_channels = 3
  config.model.attn_resolutions = (16,)
  config.eval.num_bpd_images = 0
  config.eval.num_samples = 10
  config.eval.inception_weights = str(weights)
  config.eval.inception_batch_size = 12  # One compiled shape for every set of images here.
  workdir = tmp_path / 'workdir'
  # The U-Net at its init, saved as an imported model at step 2 (test_train trains on mock
  # CIFAR10; here a train step would only add its compilation).
  model = models.create_model(config)
  x, t = jnp.zeros((1, 32, 32, 3)), jnp.zeros((1,), jnp.int32)
  params = jax.jit(model.init, static_argnames='train')(jax.random.key(0), x, t, train=False)
  checkpoints.save_imported(str(workdir), params=params['params'], step=2)
  with tfds.testing.mock_data(num_examples=12):
    results = evaluation.evaluate(config, str(workdir))
    train_images = data.create_source(config, 'train')[np.arange(12)]
  assert len(list((workdir / 'eval').glob('inception_stats_cifar10_train_32_*.npz'))) == 1
  assert len(list((workdir / 'eval').glob('inception_stats_cifar10_test_32_*.npz'))) == 1

  samples = saved_samples(workdir)
  assert samples.shape == (10, 32, 32, 3) and samples.dtype == np.uint8
  variables = inception_weights.load_params(str(weights))
  ours = features(variables, samples)
  ref = features(variables, train_images)
  expected_fid = frechet_distance_by_eigenvalues(
    *metrics.feature_statistics(ours['pool']), *metrics.feature_statistics(ref['pool'])
  )
  np.testing.assert_allclose(results['fid_train'], expected_fid, rtol=1e-4)
  expected_is = metrics.inception_score(ours['logits'], 10)
  np.testing.assert_allclose(
    [results['inception_score'], results['inception_score_std']], expected_is, rtol=1e-4
  )
  np.testing.assert_allclose(
    results['inception_score_single_split'],
    metrics.inception_score(ours['logits'], 1)[0],
    rtol=1e-4,
  )
  assert 'fid_test' in results and results['sample_settings']['num_samples'] == 10
  assert results['inception_weights_sha256'] == hashlib.sha256(weights.read_bytes()).hexdigest()


def saved_samples(workdir, pattern='samples_*'):
  """The samples an evaluation saved under one samples directory of step 2."""
  (sample_dir,) = (workdir / 'eval' / 'step_2').glob(pattern)
  return np.concatenate([np.load(p)['samples'] for p in sorted(sample_dir.glob('*.npz'))])


def features(variables, images):
  batches = list(inception.compute_features(variables, images, batch_size=12))
  return {key: np.concatenate([b[key] for b in batches]) for key in ('pool', 'logits')}


def test_missing_inception_weights_say_what_to_do(tmp_path):
  config = eval_config()
  config.data.dataset = 'cifar10'
  config.data.image_size = 32
  config.data.num_channels = 3
  config.model.attn_resolutions = (16,)
  with pytest.raises(
    ValueError, match='(?s)inception_weights is not set.*python -m ddpm_jax.inception_weights'
  ):
    evaluation.evaluate(config, str(tmp_path))
  config.eval.inception_weights = str(tmp_path / 'nowhere.npz')
  with pytest.raises(FileNotFoundError, match='(?s)nowhere.npz.*not found.*convert'):
    evaluation.evaluate(config, str(tmp_path))


def test_config_without_eval_section(tmp_path):
  config = eval_config()
  del config['eval']
  with pytest.raises(ValueError, match='no `eval` section'):
    evaluation.evaluate(config, str(tmp_path))


def test_workdir_without_checkpoint(tmp_path):
  with pytest.raises(FileNotFoundError, match='No checkpoint in .*train first'):
    evaluation.evaluate(eval_config(), str(tmp_path))
  assert not (tmp_path / 'eval').exists()


def test_unknown_sampler_is_rejected_before_anything_runs(tmp_path):
  config = eval_config()
  config.sampling.sampler = 'euler'
  with pytest.raises(ValueError, match="Unknown sampler 'euler'"):
    evaluation.evaluate(config, str(tmp_path))
  assert not (tmp_path / 'eval').exists()


# ----------------------------------------------------------------------------------------------
# Never stale: a cached artifact is reused only by an evaluation with the settings it was made
# with. Each test fails if the cache key leaves out the setting it changes: the second
# evaluation would then reuse the first one's artifact.
# ----------------------------------------------------------------------------------------------


def test_samplers_on_one_workdir_equal_fresh_runs(trained_workdir, tmp_path):
  # Expected: each evaluation's samples and digits measure equal those of an evaluation of the
  # same settings on a fresh copy of the workdir; the samplers' (and the thresholdings') samples
  # differ, and the results record the sampler and its settings.
  def config(sampler, thresholding='static'):
    config = eval_config(
      **{
        'sampling.sampler': sampler,
        'sampling.steps': 5,
        'sampling.thresholding': thresholding,
      }
    )
    config.eval.num_bpd_images = 0
    return config

  workdir = copy_workdir(trained_workdir, tmp_path / 'shared')
  dpm = evaluation.evaluate(config('dpm_solver++'), str(workdir))
  dynamic = evaluation.evaluate(config('dpm_solver++', 'dynamic'), str(workdir))
  ancestral = evaluation.evaluate(config('ancestral'), str(workdir))
  dpm_samples = saved_samples(workdir, 'samples_dpm_solver++5_static_seed0_*')
  dynamic_samples = saved_samples(workdir, 'samples_dpm_solver++5_dynamic_seed0_*')
  ancestral_samples = saved_samples(workdir, 'samples_ancestral_seed0_*')
  assert not np.array_equal(dpm_samples, ancestral_samples)
  assert not np.array_equal(dpm_samples, dynamic_samples)
  assert dpm['sample_settings'] == {
    'sampler': 'dpm_solver++',
    'steps': 5,
    'thresholding': 'static',
    'seed': 0,
    'batch_size': 8,
    'num_samples': 12,
  }
  assert dynamic['sample_settings']['thresholding'] == 'dynamic'
  assert ancestral['sample_settings']['sampler'] == 'ancestral'
  assert 'steps' not in ancestral['sample_settings']
  assert dpm['frechet_distance'] != ancestral['frechet_distance']

  fresh = copy_workdir(trained_workdir, tmp_path / 'fresh')
  assert evaluation.evaluate(config('ancestral'), str(fresh)) == ancestral
  np.testing.assert_array_equal(saved_samples(fresh), ancestral_samples)
  # Reused, not redrawn: the saved batches give the same results again.
  assert evaluation.evaluate(config('dpm_solver++'), str(workdir)) == dpm
  assert evaluation.evaluate(config('dpm_solver++', 'dynamic'), str(workdir)) == dynamic


def test_changing_the_variance_type_recomputes_bits_per_dim(trained_workdir, tmp_path):
  # Expected: after a bits/dim evaluation with fixedlarge, one with fixedsmall on the same
  # workdir equals a fresh fixedsmall evaluation (the decoder and KL terms depend on the
  # reverse variance, so the two differ).
  def config(var_type):
    config = eval_config(**{'diffusion.model_var_type': var_type})
    config.eval.num_samples = 0
    return config

  workdir = copy_workdir(trained_workdir, tmp_path / 'shared')
  large = evaluation.evaluate(config('fixedlarge'), str(workdir))
  small = evaluation.evaluate(config('fixedsmall'), str(workdir))
  fresh = evaluation.evaluate(config('fixedsmall'), str(copy_workdir(trained_workdir, tmp_path)))
  assert small == fresh
  assert small['bpd'] != large['bpd']
  assert len(list((workdir / 'eval' / 'step_2').glob('bpd_partial_*.npz'))) == 2


def test_results_are_keyed_by_the_dtype_the_platform_computes_in(monkeypatch):
  # Expected: config.model.dtype None is keyed as the dtype it resolves to (models.compute_dtype):
  # float32 on this CPU, so the results of a run that named float32 keep their key; bfloat16 on
  # a TPU, so a workdir evaluated on both keeps two results, not one.
  config = lambda dtype: tiny_digits_config(10, **{'model.dtype': dtype})
  key = lambda dtype: evaluation.settings_key(evaluation.network_settings(config(dtype)))
  assert key(None) == key('float32') != key('bfloat16')
  monkeypatch.setattr(jax, 'devices', lambda: [types.SimpleNamespace(platform='tpu')])
  assert key(None) == key('bfloat16') != key('float32')


def test_other_inception_weights_recompute_the_reference_statistics(tmp_path, monkeypatch):
  # Expected: mu of the stand-in features (each image's mean pixel times the weights' scale,
  # in all 2048 dimensions) over the 300 test digits, recomputed for other weights and read
  # back from the cache for the same weights.
  calls = []

  def fake_features(variables, images, **kwargs):
    calls.append(variables['scale'])
    images = images[np.arange(len(images))].astype(np.float64)
    pool = np.repeat(images.mean(axis=(1, 2, 3))[:, None] * variables['scale'], 2048, axis=1)
    yield {'pool': pool}

  monkeypatch.setattr(inception, 'compute_features', fake_features)
  config = eval_config()
  test_means = data.create_source(config, 'test').images.mean(axis=(1, 2, 3))

  def stats(scale, weights_sha256):
    mu, _ = evaluation.reference_statistics(
      config,
      {'scale': scale},
      'test',
      weights_sha256=weights_sha256,
      mesh=None,
      cache_dir=epath.Path(tmp_path),
    )
    return mu

  np.testing.assert_allclose(stats(1.0, 'aaaa'), np.full(2048, test_means.mean()), rtol=1e-12)
  np.testing.assert_allclose(stats(2.0, 'bbbb'), np.full(2048, 2 * test_means.mean()), rtol=1e-12)
  np.testing.assert_allclose(stats(3.0, 'aaaa'), np.full(2048, test_means.mean()), rtol=1e-12)
  assert calls == [1.0, 2.0]  # The third call read the first one's cache.


def test_conditional_eval_is_keyed_by_its_classes_and_guidance(tmp_path):
  # A class-conditional digits model: bits/dim is that of p(x | y) with each test image's own
  # label (expected: calc_bpd_loop given those labels); the samples of each (class_labels,
  # guidance_scale) are kept apart, recorded in the results, equal to a fresh evaluation of the
  # same settings, and the requested-digit accuracy is the classifier's on them.
  workdir = tmp_path / 'workdir'
  # A large rate from step 1 on: the U-Net's output layer starts at zero (the original's init),
  # and two steps of 2e-3 leave its output, and so the classes' effect, below the 8-bit step.
  cond = {'model.num_classes': 10, 'training.warmup_steps': 1, 'training.learning_rate': 0.05}
  train.train(eval_config(**cond), str(workdir))

  def config(**extra):
    config = eval_config(**cond, **extra)
    config.eval.num_bpd_images = 4
    return config

  guided = evaluation.evaluate(config(**{'sampling.guidance_scale': 2.0}), str(workdir))
  sevens = evaluation.evaluate(
    config(**{'sampling.class_labels': (7,), 'sampling.guidance_scale': 2.0}), str(workdir)
  )
  plain = evaluation.evaluate(config(), str(workdir))
  assert guided['sample_settings']['guidance_scale'] == 2.0
  assert guided['sample_settings']['class_labels'] == list(range(10))
  assert sevens['sample_settings']['class_labels'] == [7]
  assert plain['sample_settings']['guidance_scale'] == 1.0
  dirs = sorted(p.name for p in (workdir / 'eval' / 'step_2').glob('samples_*'))
  assert len(dirs) == 3 and any('class7_guidance2' in d for d in dirs), dirs
  assert not np.array_equal(
    saved_samples(workdir, '*_static_guidance2_seed0_*'),
    saved_samples(workdir, '*_static_guidance1_seed0_*'),
  )
  # Sample i of all classes in turn is of digit i mod 10: 12 samples, digits 0 and 1 twice.
  assert set(k for k in guided if k.startswith('requested_accuracy_digit_')) == {
    f'requested_accuracy_digit_{c}' for c in range(10)
  }
  assert set(k for k in sevens if k.startswith('requested_accuracy_digit_')) == {
    'requested_accuracy_digit_7'
  }
  np.testing.assert_allclose(
    sevens['requested_accuracy'], sevens['requested_accuracy_digit_7'], rtol=0
  )

  diff = diffusion.GaussianDiffusion.from_config(config().diffusion)
  model = models.create_model(config())
  _, params = checkpoints.restore_ema_params(str(workdir), models.param_shapes(model, 8, 1))
  test = data.create_source(config(), 'test')
  model_fn = sample_loop.make_model_fn(
    model, params, labels=jnp.asarray(test.labels(np.arange(4)), jnp.int32)
  )
  out = diff.calc_bpd_loop(
    model_fn,
    image_io.to_model_range(jnp.asarray(test[np.arange(4)])),
    jax.random.fold_in(jax.random.key(0), 0),
  )
  np.testing.assert_allclose(guided['bpd'], np.mean(out['total_bpd']), rtol=1e-5)

  # The samples' labels come back with them: expected, sample i of the classes (7,) is a 7, and
  # of all 10 classes in turn the digit i mod 10 (`Conditioning.labels`); the samples are the
  # batches the evaluations above saved.
  for extra, pattern, expected in [
    ({'sampling.class_labels': (7,)}, '*_class7_guidance2_seed0_*', [7] * 12),
    ({}, '*_static_guidance2_seed0_*', np.arange(12) % 10),
  ]:
    samples, labels, _ = evaluation.draw_eval_samples(
      config(**extra, **{'sampling.guidance_scale': 2.0}),
      diff,
      model,
      params,
      mesh=mesh_lib.create_mesh(),
      eval_dir=workdir / 'eval' / 'step_2',
    )
    np.testing.assert_array_equal(labels, expected)
    np.testing.assert_array_equal(samples, saved_samples(workdir, pattern))

  fresh = tmp_path / 'fresh'
  shutil.copytree(workdir, fresh, ignore=shutil.ignore_patterns('eval'))
  assert evaluation.evaluate(config(**{'sampling.guidance_scale': 2.0}), str(fresh)) == guided

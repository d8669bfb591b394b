"""--mode=eval: test-set bits/dim with the full variational bound, and sample quality.

Parts, each skipped where it does not apply:
  bits/dim   the full T-step bound (`calc_bpd_loop`) on the first `config.eval.num_bpd_images`
             images of the held-out split, not dequantized (paper Table 2: 3.70-3.75 on CIFAR10).
  samples    `config.eval.num_samples` images from the EMA params, drawn as --mode=sample does
             (`config.sampling.sampler`, `batch_size`), kept as uint8 batches in `samples/`.
  FID / IS   RGB datasets: Inception v3 pool features and logits (ddpm_jax/models/inception.py,
             the pytorch-fid / TF-GAN graph, weights from `config.eval.inception_weights`) of the
             samples; FID against the training split (the paper's 3.17) and the test split, whose
             statistics are computed once and cached in `<workdir>/eval/`; Inception Score over
             10 splits (the paper's 9.46).
  digits     the embedded digits, where no Inception network applies: ddpm_jax/digits_classifier
             trained on the training split (cached), with the Frechet distance of samples vs the
             test split in its feature space next to the floor (as many training digits vs the
             test split), and the share of samples classified confidently, per class.

Results go to `<workdir>/eval/step_<N>/` (N: the evaluated checkpoint's step) as
`results.json`, to TensorBoard in `<workdir>/eval`, and to the console as a short table. Each
part saves its progress after every batch, so an interrupted evaluation resumes where it
stopped; the random draws of batch k are `fold_in(key(seed), k)`, so the resumed result equals
the uninterrupted one.
"""

from __future__ import annotations

import json
import math
from typing import Any

import flax
import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from ddpm_jax import (
  checkpoints,
  digits_classifier,
  input_pipeline,
  metrics,
  models,
  sampling,
  tf_support,
  validation,
)
from ddpm_jax import diffusion as diffusion_lib
from ddpm_jax import mesh as mesh_lib
from ddpm_jax.models import inception

BPD_STATE_FILE = 'bpd_partial.npz'
# Improved-GAN / TF-GAN convention for 50,000 samples.
INCEPTION_SCORE_SPLITS = 10


def _save_npz(path: epath.Path, **arrays) -> None:
  """`sampling.save_npz` on process 0 (every process holds the same arrays)."""
  if jax.process_index() == 0:
    sampling.save_npz(path, **arrays)


def create_bpd_fn(diffusion: diffusion_lib.GaussianDiffusion, model, mesh):
  """Compiled `bpd(params, images_uint8, rng) -> calc_bpd_loop dict`, batch-sharded."""
  batch_sharding = mesh_lib.batch_sharded(mesh)

  def bpd(params, images, rng):
    x_start = input_pipeline.to_model_range(images)
    return diffusion.calc_bpd_loop(sampling.make_model_fn(model, params), x_start, rng)

  return jax.jit(
    bpd,
    in_shardings=(mesh_lib.replicated(mesh), batch_sharding, mesh_lib.replicated(mesh)),
    out_shardings=batch_sharding,
  )


def evaluate_bpd(
  config: ml_collections.ConfigDict,
  diffusion: diffusion_lib.GaussianDiffusion,
  model,
  params,
  *,
  mesh,
  eval_dir: epath.Path,
) -> dict[str, Any]:
  """The negative log-likelihood bound (eq. 5) in bits/dim on the held-out split.

  The first `config.eval.num_bpd_images` images of the split, not dequantized, go through
  `calc_bpd_loop` (all T terms) in global batches of `config.eval.bpd_batch_size`. Returns the
  means over images of the total, the prior term L_T, the decoder term L_0 and the sum of the
  KL terms L_1..L_{T-1}; writes the per-t means (`bpd_terms.npz`) and their plot
  (`bpd_terms.png`).
  """
  info = input_pipeline.get_dataset_info(config)
  if info.eval_split is None:
    logging.warning('%s has no held-out split: bits/dim is not evaluated.', info.name)
    return {}
  batch_size = config.eval.bpd_batch_size
  validation.validate_batch_size(batch_size, 'config.eval.bpd_batch_size')
  num_images = config.eval.num_bpd_images
  num_steps = diffusion.num_timesteps
  state_path = eval_dir / BPD_STATE_FILE
  fingerprint = np.array([num_images, batch_size, num_steps, config.seed])

  sums = {
    'total_bpd': np.zeros(()),
    'prior_bpd': np.zeros(()),
    'terms_bpd': np.zeros(num_steps),
    'mse': np.zeros(num_steps),
  }
  next_batch = 0
  if state_path.exists():
    with state_path.open('rb') as f:
      saved = dict(np.load(f))
    if np.array_equal(saved.pop('fingerprint'), fingerprint):
      next_batch = int(saved.pop('next_batch'))
      sums = saved
      logging.info('Resuming bits/dim at batch %d.', next_batch)
    else:
      logging.warning('Ignoring %s: it was computed with other settings.', state_path)

  bpd_fn = create_bpd_fn(diffusion, model, mesh)
  num_batches = math.ceil(num_images / batch_size)
  batches = input_pipeline.eval_batches(
    config, split=info.eval_split, global_batch_size=batch_size, num_examples=num_images
  )
  with batches, sampling.progress(num_batches, 'bits/dim batches', initial=next_batch) as bar:
    for k, (local_images, _) in enumerate(batches):
      if k < next_batch:
        continue
      images = jax.make_array_from_process_local_data(mesh_lib.batch_sharded(mesh), local_images)
      out = bpd_fn(params, images, jax.random.fold_in(jax.random.key(config.seed), k))
      out = sampling.gather(out)
      real = np.arange(k * batch_size, (k + 1) * batch_size) < num_images
      for name in sums:
        sums[name] = sums[name] + np.sum(np.asarray(out[name], np.float64)[real], axis=0)
      _save_npz(state_path, fingerprint=fingerprint, next_batch=k + 1, **sums)
      bar.update(1)

  means = {name: value / num_images for name, value in sums.items()}
  _save_npz(eval_dir / 'bpd_terms.npz', terms_bpd=means['terms_bpd'], mse=means['mse'])
  if jax.process_index() == 0:
    _plot_terms(means['terms_bpd'], eval_dir / 'bpd_terms.png', info.eval_split)
  return {
    'bpd': float(means['total_bpd']),
    'bpd_prior': float(means['prior_bpd']),
    'bpd_decoder': float(means['terms_bpd'][0]),
    'bpd_kl_terms': float(np.sum(means['terms_bpd'][1:])),
    'bpd_num_images': num_images,
    'bpd_split': info.eval_split,
  }


def _plot_terms(terms_bpd: np.ndarray, path: epath.Path, split: str) -> None:
  """Bits/dim of each term L_t against t, log scale (the terms span several decades)."""
  import matplotlib

  matplotlib.use('Agg')
  from matplotlib import pyplot as plt

  fig, ax = plt.subplots(figsize=(6, 4))
  ax.semilogy(np.arange(1, len(terms_bpd)), terms_bpd[1:], label='KL terms $L_{t-1}$, t >= 1')
  ax.semilogy([0], [terms_bpd[0]], 'o', label='decoder $L_0$ (t = 0)')
  ax.set_xlabel('t')
  ax.set_ylabel('bits/dim')
  ax.set_title(f'Variational bound terms on the {split} split')
  ax.legend()
  fig.tight_layout()
  with path.open('wb') as f:
    fig.savefig(f, format='png', dpi=100)
  plt.close(fig)


# ----------------------------------------------------------------------------------------------
# Samples, and their quality.
# ----------------------------------------------------------------------------------------------


def draw_eval_samples(
  config: ml_collections.ConfigDict,
  diffusion: diffusion_lib.GaussianDiffusion,
  model,
  params,
  *,
  mesh,
  eval_dir: epath.Path,
) -> np.ndarray:
  """`config.eval.num_samples` samples, uint8 [N, H, W, C], resuming from saved batches.

  Batch b (of `config.sampling.batch_size`) starts from `fold_in(key(seed), b)`, as in
  --mode=sample, and is saved as `samples/batch_<b>.npz` once drawn.
  """
  settings = config.sampling
  num_samples = config.eval.num_samples
  batch_size = settings.batch_size
  size, channels = config.data.image_size, config.data.num_channels
  num_steps = settings.ddim_steps if settings.sampler == 'ddim' else diffusion.num_timesteps
  sample_dir = eval_dir / 'samples'
  if jax.process_index() == 0:
    sample_dir.mkdir(exist_ok=True)
  init = sampling.create_init_fn(diffusion, mesh)
  chunk_fn = sampling.create_chunk_fn(
    diffusion,
    model,
    mesh,
    sampler=settings.sampler,
    ddim_steps=settings.ddim_steps,
    ddim_eta=settings.ddim_eta,
  )
  num_batches = math.ceil(num_samples / batch_size)
  paths = [sample_dir / f'batch_{b:05d}.npz' for b in range(num_batches)]
  done = sum(path.exists() for path in paths)
  if done:
    logging.info('Resuming the samples at batch %d of %d.', done, num_batches)
  with sampling.progress(num_batches * num_steps, 'samples', unit='step') as bar:
    bar.update(done * num_steps)
    loop = sampling.ChunkedLoop(chunk_fn, params, bar)
    for b, path in enumerate(paths):
      if path.exists():
        continue
      x, loop_rng = init(
        (batch_size, size, size, channels), jax.random.fold_in(jax.random.key(config.seed), b)
      )
      x, _ = loop.run(x, loop_rng, 0, num_steps)
      images = sampling.to_uint8(sampling.gather(x))
      _save_npz(path, samples=images[: num_samples - b * batch_size])
      multihost_utils.sync_global_devices(f'eval_samples_{b}')
  batches = []
  for path in paths:
    with path.open('rb') as f:
      batches.append(np.load(f)['samples'])
  return np.concatenate(batches)


def inception_features(
  variables, images: np.ndarray, *, batch_size: int, mesh
) -> dict[str, np.ndarray]:
  """Inception pool features [N, 2048] and logits [N, 1008] of images [N, H, W, 3] uint8 that
  every process holds, in padded batches of `batch_size` sharded over all devices."""
  batch_sharding = mesh_lib.batch_sharded(mesh)
  apply = jax.jit(
    inception.apply,
    in_shardings=(mesh_lib.replicated(mesh), batch_sharding),
    out_shardings=batch_sharding,
  )
  outputs = {'pool': [], 'logits': []}
  for start in range(0, len(images), batch_size):
    batch = images[start : start + batch_size]
    padded = np.zeros((batch_size, *batch.shape[1:]), batch.dtype)
    padded[: len(batch)] = batch
    global_batch = jax.make_array_from_callback(
      padded.shape, batch_sharding, lambda index, padded=padded: padded[index]
    )
    result = sampling.gather(apply(variables, global_batch))
    for key in outputs:
      outputs[key].append(np.asarray(result[key][: len(batch)]))
  return {key: np.concatenate(value) for key, value in outputs.items()}


def reference_statistics(config, variables, split: str, *, mesh, cache_dir: epath.Path):
  """(mu, sigma) of the Inception pool features of a whole split, cached in `cache_dir`."""
  path = cache_dir / f'inception_stats_{config.data.dataset.replace("/", "_")}_{split}.npz'
  if path.exists():
    with path.open('rb') as f:
      cached = np.load(f)
      if int(cached['image_size']) == config.data.image_size:
        return cached['mu'], cached['sigma']
  source = input_pipeline.create_source(config, split)
  moments = metrics.FeatureMoments.zeros(inception.NUM_POOL_FEATURES)
  batch_size = config.eval.inception_batch_size
  num_batches = math.ceil(len(source) / batch_size)
  with sampling.progress(num_batches, f'Inception features of {split}') as bar:
    for start in range(0, len(source), batch_size):
      images = source[np.arange(start, min(start + batch_size, len(source)))]
      features = inception_features(variables, images, batch_size=batch_size, mesh=mesh)
      moments = moments.update(features['pool'])
      bar.update(1)
  mu, sigma = moments.mean_and_covariance()
  _save_npz(path, mu=mu, sigma=sigma, image_size=np.asarray(config.data.image_size))
  return mu, sigma


def inception_quality(config, samples: np.ndarray, *, mesh, cache_dir) -> dict[str, Any]:
  """FID against the training (and test) split and the Inception Score of the samples."""
  variables = inception.load_params(config.eval.inception_weights)
  features = inception_features(
    variables, samples, batch_size=config.eval.inception_batch_size, mesh=mesh
  )
  mu, sigma = metrics.feature_statistics(features['pool'])
  results = {}
  info = input_pipeline.get_dataset_info(config)
  for split in ('train', info.eval_split):
    if split is not None:
      ref = reference_statistics(config, variables, split, mesh=mesh, cache_dir=cache_dir)
      results[f'fid_{split}'] = metrics.frechet_distance(mu, sigma, *ref)
  num_splits = min(INCEPTION_SCORE_SPLITS, len(samples))
  results['inception_score'], results['inception_score_std'] = metrics.inception_score(
    features['logits'], num_splits
  )
  results['num_samples'] = len(samples)
  return results


def digits_quality(config, samples: np.ndarray, *, seed: int, cache_dir) -> dict[str, Any]:
  """The digits measure (module docstring); the classifier is trained once and cached."""
  train = input_pipeline.create_source(config, 'train')
  test = input_pipeline.create_source(config, 'test')
  path = cache_dir / 'digits_classifier.msgpack'
  if path.exists():
    template = digits_classifier.DigitsClassifier().init(jax.random.key(0), train.images[:1])
    params = flax.serialization.from_bytes(template['params'], path.read_bytes())
  else:
    params = digits_classifier.train_classifier(train.images, train.labels, seed=seed)
    if jax.process_index() == 0:
      path.write_bytes(flax.serialization.to_bytes(params))
  # The floor takes as many training digits as there are samples: the distance's bias
  # depends on the number of points, so the two numbers compare like with like.
  rng = np.random.default_rng(seed)
  floor_images = train.images[rng.permutation(len(train))[: min(len(samples), len(train))]]
  report = digits_classifier.digits_quality(
    samples,
    params=params,
    train_images=floor_images,
    test_images=test.images,
    test_labels=test.labels,
  )
  per_class = report.pop('confident_share_per_class')
  report.update({f'confident_share_digit_{c}': float(v) for c, v in enumerate(per_class)})
  report['num_samples'] = len(samples)
  return report


def evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Evaluates the EMA params of the latest (or `config.sampling.checkpoint_step`) checkpoint."""
  if 'eval' not in config:
    raise ValueError(
      'The config has no `eval` section; start from configs/default.py, which defines '
      'eval.num_bpd_images, eval.bpd_batch_size, eval.num_samples and eval.inception_weights.'
    )
  diffusion = validation.validate_config(config)
  if config.eval.num_samples:
    sampling.validate_sampler(config, diffusion)  # The samples are drawn as it says.
  is_digits = config.data.dataset == 'digits'
  if not is_digits and config.eval.num_samples:
    weights = config.eval.inception_weights
    if not weights:
      raise ValueError(
        'config.eval.inception_weights is not set: FID and IS need the FID Inception weights. '
        + inception.conversion_instructions('inception_fid.npz')
        + '\nthen pass --config.eval.inception_weights=inception_fid.npz (or set '
        'config.eval.num_samples=0 to skip FID and IS).'
      )
    inception.load_params(weights)  # A missing or wrong file fails now, not after sampling.
    validation.validate_batch_size(
      config.eval.inception_batch_size, 'config.eval.inception_batch_size'
    )
  model = models.create_model(config)
  mesh = mesh_lib.create_mesh()
  abstract_params = checkpoints.abstract_like(
    sampling.abstract_params(config, model), mesh_lib.replicated(mesh)
  )
  step, params = sampling.restore_ema_params(config, workdir, abstract_params)
  cache_dir = epath.Path(workdir) / 'eval'
  eval_dir = cache_dir / f'step_{step}'
  if jax.process_index() == 0:
    eval_dir.mkdir(parents=True, exist_ok=True)
  multihost_utils.sync_global_devices('eval_dir')

  results: dict[str, Any] = {'step': step}
  if config.eval.num_bpd_images:
    results.update(evaluate_bpd(config, diffusion, model, params, mesh=mesh, eval_dir=eval_dir))
  if config.eval.num_samples:
    samples = draw_eval_samples(config, diffusion, model, params, mesh=mesh, eval_dir=eval_dir)
    if is_digits:
      results.update(digits_quality(config, samples, seed=config.seed, cache_dir=cache_dir))
    else:
      results.update(inception_quality(config, samples, mesh=mesh, cache_dir=cache_dir))

  if jax.process_index() == 0:
    with (eval_dir / 'results.json').open('w') as f:
      json.dump(results, f, indent=2)
  writer = tf_support.create_metric_writer(
    str(epath.Path(workdir) / 'eval'), just_logging=jax.process_index() > 0
  )
  writer.write_scalars(step, {k: v for k, v in results.items() if isinstance(v, float)})
  writer.flush()
  print(format_table(results))
  print(f'Results: {eval_dir / "results.json"}')
  return results


def format_table(results: dict[str, Any]) -> str:
  """A two-column text table of the results."""
  width = max(len(k) for k in results)
  lines = [f'{"metric".ljust(width)}  value', f'{"-" * width}  -----']
  for key, value in results.items():
    shown = f'{value:.4f}' if isinstance(value, float) else str(value)
    lines.append(f'{key.ljust(width)}  {shown}')
  return '\n'.join(lines)

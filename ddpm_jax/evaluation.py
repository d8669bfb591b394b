"""--mode=eval: test-set bits/dim with the full variational bound, and sample quality.

Parts, each skipped where it does not apply:
  bits/dim   the full T-step bound (`calc_bpd_loop`) on the first `config.eval.num_bpd_images`
             images of the held-out split, not dequantized (paper Table 2: 3.70-3.75 on CIFAR10).
  samples    `config.eval.num_samples` images from the EMA params, drawn as --mode=sample does
             (`config.sampling.sampler`, `batch_size`), kept as uint8 batches (below).
  FID / IS   other datasets (greyscale is repeated into RGB): Inception v3 pool features and
             logits (ddpm_jax/models/inception.py, the pytorch-fid / TF-GAN graph, weights from
             `config.eval.inception_weights`) of the samples; FID against the training split,
             `config.data.split` (the paper's 3.17), and the held-out split, whose
             statistics are computed once and cached in `<workdir>/eval/`; Inception Score: mean and
             std over 10 splits (the usual protocol; the paper's 9.46 +- 0.11) and over all
             samples as one split (as the original TF code computed it).
  digits     the embedded digits, where no Inception network applies: ddpm_jax/digits_classifier
             trained on the training split (cached), with the Frechet distance of samples vs the
             test split in its feature space next to the floor (as many training digits vs the
             test split), and the share of samples classified confidently, per class; for a
             class-conditional model also the share of samples recognized as the digit they
             were asked to be (`requested_accuracy`), overall and per digit.
A class-conditional model's bits/dim is that of p(x | y) for each test image's own label, and
its samples take `config.sampling.class_labels` in turn with `guidance_scale`.

Results go to `<workdir>/eval/step_<N>/` (N: the evaluated checkpoint's step) as
`results.json`, to TensorBoard in `<workdir>/eval`, and to the console as a short table; each
records the settings its numbers were made with (`sample_settings`, `bpd_settings`).

Never stale. Every artifact kept for reuse is keyed by everything that determines it, in its
file or directory name (`settings_key`: a digest of the settings, which are also stored
beside it), so that evaluations with other settings live side by side and a later run reuses
only what it would have computed itself:
  samples      `step_<N>/samples_<sampler>_seed<S>_<key>/batch_<b>.npz`: the sampler and its
               settings, the classes and guidance scale of a class-conditional model, seed,
               batch size, number of samples, the U-Net and diffusion configs, the data shape
               (the checkpoint step is the directory);
  bits/dim     `step_<N>/bpd_partial_<key>.npz`, the running sums: number of images, batch size,
               seed, the diffusion (schedule, mean and variance types, T), the U-Net, the
               dataset, split and image shape (and a folder's path);
  statistics   `inception_stats_<dataset>_<split>_<size>_<key>.npz`: the dataset, split, image
               size and channels (and a folder's path), number of images and the SHA-256 of
               the Inception weights file;
  classifier   `digits_classifier_seed<S>.msgpack` (a pure function of the seed).
Each part saves its progress after every batch, so an interrupted evaluation resumes where it
stopped; the random draws of batch k are `fold_in(key(seed), k)`, so the resumed result equals
the uninterrupted one.
"""

from __future__ import annotations

import hashlib
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
  checks,
  conditioning,
  data,
  digits_classifier,
  image_io,
  inception_weights,
  metrics,
  models,
  progress,
  sample_loop,
  samplers,
  tf_support,
  validation,
)
from ddpm_jax import diffusion as diffusion_lib
from ddpm_jax import mesh as mesh_lib
from ddpm_jax.models import inception

# Improved-GAN / TF-GAN convention for 50,000 samples.
INCEPTION_SCORE_SPLITS = 10


def settings_key(settings: dict[str, Any]) -> str:
  """A short digest of JSON-serializable settings: the same settings, the same key."""
  text = json.dumps(settings, sort_keys=True)
  return hashlib.sha256(text.encode()).hexdigest()[:12]


def network_settings(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """What fixes the function the EMA params compute, besides the checkpoint step: the compute
  dtype as this platform resolves it (`models.compute_dtype`), so that a workdir evaluated on a
  CPU and on a TPU keeps both results."""
  return {
    'model': {**config.model.to_dict(), 'dtype': models.compute_dtype(config.model.dtype).name},
    'diffusion': config.diffusion.to_dict(),
    'data': {
      'dataset': config.data.dataset,
      'image_size': config.data.image_size,
      'num_channels': config.data.num_channels,
    },
  }


def _save_npz(path: epath.Path, **arrays) -> None:
  """`image_io.save_npz` on process 0 (every process holds the same arrays)."""
  if jax.process_index() == 0:
    image_io.save_npz(path, **arrays)


def _write_json(path: epath.Path, value: dict[str, Any]) -> None:
  if jax.process_index() == 0:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=2))


def create_bpd_fn(diffusion: diffusion_lib.GaussianDiffusion, model, mesh):
  """Compiled `bpd(params, batch, rng) -> calc_bpd_loop dict`, batch-sharded: batch {'image':
  uint8 [B, H, W, C]}, and 'label' int32 [B] for a class-conditional model, whose bound is then
  that of p(x | y) for the images' own labels (no guidance)."""
  batch_sharding = mesh_lib.batch_sharded(mesh)

  def bpd(params, batch, rng):
    x_start = image_io.to_model_range(batch['image'])
    model_fn = sample_loop.make_model_fn(model, params, labels=batch.get('label'))
    return diffusion.calc_bpd_loop(model_fn, x_start, rng)

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
  info = data.get_dataset_info(config)
  if info.eval_split is None:
    logging.warning('%s has no held-out split: bits/dim is not evaluated.', info.name)
    return {}
  batch_size = config.eval.bpd_batch_size
  validation.validate_batch_size(batch_size, 'config.eval.bpd_batch_size')
  num_images = config.eval.num_bpd_images
  num_steps = diffusion.num_timesteps
  settings = {
    'num_images': num_images,
    'batch_size': batch_size,
    'seed': config.seed,
    'eval_data': data.split_settings(config, info.eval_split),
    **network_settings(config),
  }
  state_path = eval_dir / f'bpd_partial_{settings_key(settings)}.npz'

  sums = {
    'total_bpd': np.zeros(()),
    'prior_bpd': np.zeros(()),
    'terms_bpd': np.zeros(num_steps),
    'mse': np.zeros(num_steps),
  }
  next_batch = 0
  if state_path.exists():
    sums = image_io.load_npz(state_path)
    next_batch = int(sums.pop('next_batch'))
    logging.info('Resuming bits/dim at batch %d from %s.', next_batch, state_path)

  bpd_fn = create_bpd_fn(diffusion, model, mesh)
  num_batches = math.ceil(num_images / batch_size)
  batches = data.eval_batches(
    config, split=info.eval_split, global_batch_size=batch_size, num_examples=num_images
  )
  with batches, progress.bar(num_batches, 'bits/dim batches', initial=next_batch) as bar:
    for k, (local_batch, _) in enumerate(batches):
      if k < next_batch:
        continue
      batch = jax.tree.map(
        lambda a: jax.make_array_from_process_local_data(mesh_lib.batch_sharded(mesh), a),
        local_batch,
      )
      out = bpd_fn(params, batch, jax.random.fold_in(jax.random.key(config.seed), k))
      out = mesh_lib.gather(out)
      real = np.arange(k * batch_size, (k + 1) * batch_size) < num_images
      for name in sums:
        sums[name] = sums[name] + np.sum(np.asarray(out[name], np.float64)[real], axis=0)
      _save_npz(state_path, next_batch=k + 1, **sums)
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
    'bpd_settings': {'num_images': num_images, 'batch_size': batch_size, 'split': info.eval_split},
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
) -> tuple[np.ndarray, np.ndarray | None, dict[str, Any]]:
  """`config.eval.num_samples` samples, uint8 [N, H, W, C], resuming from saved batches.

  Drawn as --mode=sample draws them (`config.sampling`'s sampler, classes, guidance scale,
  batch size and seed: batch b starts from `fold_in(key(seed), b)`); each batch is saved in the
  samples directory of these settings (module docstring) once drawn. Returns the samples, their
  labels (int32 [N], the classes in turn: `Conditioning.labels`; None for an unconditional
  model) and the settings.
  """
  sampler = samplers.from_config(config)
  classes = conditioning.Conditioning.from_config(config)
  num_samples = config.eval.num_samples
  batch_size = min(config.sampling.batch_size, mesh_lib.round_up(num_samples, jax.device_count()))
  settings = {
    **sampler.settings(),
    **({} if classes is None else classes.settings()),
    'seed': config.seed,
    'batch_size': batch_size,
    'num_samples': num_samples,
  }
  key = settings_key({**settings, **network_settings(config)})
  tag = samplers.samples_tag(sampler, classes)
  sample_dir = eval_dir / f'samples_{tag}_seed{config.seed}_{key}'
  _write_json(sample_dir / 'settings.json', {**settings, **network_settings(config)})

  def load(b: int) -> np.ndarray | None:
    path = sample_dir / f'batch_{b:05d}.npz'
    return image_io.load_npz(path)['samples'] if path.exists() else None

  def save(b: int, images: np.ndarray) -> None:
    _save_npz(sample_dir / f'batch_{b:05d}.npz', samples=images)
    multihost_utils.sync_global_devices(f'eval_samples_{b}')

  size = config.data.image_size
  samples = sample_loop.draw_samples(
    sample_loop.create_chunk_fn(diffusion, model, mesh, sampler, config.sampling.guidance_scale),
    sample_loop.create_init_fn(diffusion, mesh),
    params,
    batch_rng=sample_loop.seed_batch_rng(config.seed),
    num_samples=num_samples,
    batch_size=batch_size,
    image_shape=(size, size, config.data.num_channels),
    num_steps=sampler.num_steps(diffusion.num_timesteps),
    load=load,
    save=save,
    classes=classes,
  )
  labels = None if classes is None else classes.labels(0, num_samples)
  return samples, labels, settings


def _concatenate(batches) -> dict[str, np.ndarray]:
  batches = list(batches)
  return {key: np.concatenate([batch[key] for batch in batches]) for key in batches[0]}


def reference_statistics(
  config, variables, split: str, *, weights_sha256: str, mesh, cache_dir: epath.Path
) -> tuple[np.ndarray, np.ndarray]:
  """(mu, sigma) of the Inception pool features of a whole split, cached in `cache_dir`, keyed
  by the images (`data.split_settings`), their number and the Inception weights'
  digest."""
  source = data.create_source(config, split)
  settings = {
    **data.split_settings(config, split),
    'num_images': len(source),
    'inception_weights_sha256': weights_sha256,
  }
  name = f'{config.data.dataset.replace("/", "_")}_{split}_{config.data.image_size}'
  path = cache_dir / f'inception_stats_{name}_{settings_key(settings)}.npz'
  if path.exists():
    cached = image_io.load_npz(path)
    return cached['mu'], cached['sigma']
  moments = metrics.FeatureMoments.zeros(inception.NUM_POOL_FEATURES)
  for features in inception.compute_features(
    variables,
    source,
    batch_size=config.eval.inception_batch_size,
    mesh=mesh,
    desc=f'Inception features of {split}',
  ):
    moments = moments.update(features['pool'])
  mu, sigma = moments.mean_and_covariance()
  _save_npz(path, mu=mu, sigma=sigma, settings=np.asarray(json.dumps(settings)))
  return mu, sigma


def inception_quality(config, samples: np.ndarray, *, mesh, cache_dir) -> dict[str, Any]:
  """FID against the training split (and the eval split) and the Inception Score of the
  samples."""
  weights = config.eval.inception_weights
  variables = inception_weights.load_params(weights)
  weights_sha256 = inception_weights.sha256(weights)
  features = _concatenate(
    inception.compute_features(
      variables, samples, batch_size=config.eval.inception_batch_size, mesh=mesh
    )
  )
  mu, sigma = metrics.feature_statistics(features['pool'])
  results = {}
  info = data.get_dataset_info(config)
  for split in (config.data.split, info.eval_split):
    if split is not None:
      ref = reference_statistics(
        config, variables, split, weights_sha256=weights_sha256, mesh=mesh, cache_dir=cache_dir
      )
      results[f'fid_{split}'] = metrics.frechet_distance(mu, sigma, *ref)
  num_splits = min(INCEPTION_SCORE_SPLITS, len(samples))
  # The usual protocol: the mean and standard deviation over 10 splits; and the score of all
  # samples as one split, as the original TF code computed it.
  results['inception_score'], results['inception_score_std'] = metrics.inception_score(
    features['logits'], num_splits
  )
  results['inception_score_single_split'] = metrics.inception_score(features['logits'], 1)[0]
  results['inception_score_splits'] = num_splits
  results['inception_weights_sha256'] = weights_sha256
  return results


def digits_quality(
  config, samples: np.ndarray, *, seed: int, cache_dir, labels: np.ndarray | None = None
) -> dict[str, Any]:
  """The digits measure (module docstring); the classifier is trained once and cached. labels:
  the digits the samples of a class-conditional model were asked to be (int [N]), or None."""
  train = data.create_source(config, 'train')
  test = data.create_source(config, 'test')
  path = cache_dir / f'digits_classifier_seed{seed}.msgpack'
  if path.exists():
    template = digits_classifier.DigitsClassifier().init(jax.random.key(0), train.images[:1])
    params = flax.serialization.from_bytes(template['params'], path.read_bytes())
  else:
    params = digits_classifier.train_classifier(train.images, train.all_labels, seed=seed)
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
    test_labels=test.all_labels,
    requested=labels,
  )
  per_class = report.pop('confident_share_per_class')
  report.update({f'confident_share_digit_{c}': float(v) for c, v in enumerate(per_class)})
  if labels is not None:
    per_class = report.pop('requested_accuracy_per_class')
    report.update({f'requested_accuracy_digit_{c}': v for c, v in per_class.items()})
  return report


def check_config(
  config: ml_collections.ConfigDict, diffusion: diffusion_lib.GaussianDiffusion
) -> None:
  """Raises ValueError, naming the field, for a `config.eval` that cannot work: the section
  itself, the sampler and batch size of the samples it draws, and the FID Inception weights
  (loaded now, so that a missing or wrong file fails before sampling). Run by
  `checks.check_config` after the data, model and diffusion."""
  if 'eval' not in config:
    raise ValueError(
      'The config has no `eval` section; start from configs/default.py, which defines '
      'eval.num_bpd_images, eval.bpd_batch_size, eval.num_samples and eval.inception_weights.'
    )
  if config.eval.num_samples:
    samplers.check_sampler(config, diffusion)  # The samples are drawn as it says.
    validation.validate_batch_size(config.sampling.batch_size, 'config.sampling.batch_size')
  if config.data.dataset != 'digits' and config.eval.num_samples:
    weights = config.eval.inception_weights
    if not weights:
      raise ValueError(
        'config.eval.inception_weights is not set: FID and IS need the FID Inception weights. '
        + inception_weights.conversion_instructions('inception_fid.npz')
        + '\nthen pass --config.eval.inception_weights=inception_fid.npz (or set '
        'config.eval.num_samples=0 to skip FID and IS).'
      )
    inception_weights.load_params(weights)  # A missing or wrong file fails now, not after sampling.
    validation.validate_batch_size(
      config.eval.inception_batch_size, 'config.eval.inception_batch_size'
    )


def evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Evaluates the EMA params of the latest (or `config.sampling.checkpoint_step`) checkpoint."""
  diffusion = checks.check_config(config, check_config)
  is_digits = config.data.dataset == 'digits'
  model = models.create_model(config)
  mesh = mesh_lib.create_mesh()
  abstract_params = checkpoints.abstract_like(
    models.param_shapes(model, config.data.image_size, config.data.num_channels),
    mesh_lib.replicated(mesh),
  )
  step, params = checkpoints.restore_ema_params(
    workdir, abstract_params, step=config.sampling.checkpoint_step
  )
  cache_dir = epath.Path(workdir) / 'eval'
  eval_dir = cache_dir / f'step_{step}'
  if jax.process_index() == 0:
    eval_dir.mkdir(parents=True, exist_ok=True)
  multihost_utils.sync_global_devices('eval_dir')

  results: dict[str, Any] = {'step': step, 'dtype': model.dtype.name}
  if config.eval.num_bpd_images:
    results.update(evaluate_bpd(config, diffusion, model, params, mesh=mesh, eval_dir=eval_dir))
  if config.eval.num_samples:
    samples, labels, results['sample_settings'] = draw_eval_samples(
      config, diffusion, model, params, mesh=mesh, eval_dir=eval_dir
    )
    if is_digits:
      results.update(
        digits_quality(config, samples, seed=config.seed, cache_dir=cache_dir, labels=labels)
      )
    else:
      results.update(inception_quality(config, samples, mesh=mesh, cache_dir=cache_dir))

  _write_json(eval_dir / 'results.json', results)
  writer = tf_support.create_metric_writer(
    str(epath.Path(workdir) / 'eval'), just_logging=jax.process_index() > 0
  )
  writer.write_scalars(step, {k: v for k, v in results.items() if isinstance(v, float)})
  writer.flush()
  print(format_table(results))
  print(f'Results: {eval_dir / "results.json"}')
  return results


def format_table(results: dict[str, Any]) -> str:
  """A two-column text table of the results; settings (dicts) as one `name.field` row each."""
  rows = []
  for key, value in results.items():
    if isinstance(value, dict):
      rows.extend((f'{key}.{field}', v) for field, v in value.items())
    else:
      rows.append((key, value))
  width = max(len(k) for k, _ in rows)
  lines = [f'{"metric".ljust(width)}  value', f'{"-" * width}  -----']
  for key, value in rows:
    shown = f'{value:.4f}' if isinstance(value, float) else str(value)
    lines.append(f'{key.ljust(width)}  {shown}')
  return '\n'.join(lines)

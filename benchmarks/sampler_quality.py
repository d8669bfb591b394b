"""Sample quality against network evaluations, for every sampler: the table and chart of
BENCHMARKS.md.

  python benchmarks/sampler_quality.py --workdir=/tmp/ddpm_digits \
      --json_out=benchmarks/results/digits_samplers.jsonl \
      --chart=benchmarks/results/digits_samplers.png

trains `--config` (configs/digits.py) in `--workdir` unless it already holds a checkpoint (then
that one is reused), restores the EMA parameters of its latest checkpoint and, for each of
`--samplers`, the paper's ancestral one with its T evaluations and the others at each of `--steps`,
draws `--num_samples` samples as --mode=eval does (seed `config.seed`, batches of
`config.sampling.batch_size`) and reports their quality and the wall time of the draw
(compilation excluded: each sampler is compiled on an empty range of steps first). Quality is
the eval's: for digits, the digits measure (Frechet distance to the test digits in the
classifier's feature space, next to its floor, and the share of confidently classified samples,
overall and for the rarest digit); for other datasets, FID against the training split, which
needs `--config.eval.inception_weights` (README.md, "Evaluate").

On the official CIFAR10 model (README.md, "The official weights", which needs the weights and,
for 50,000 samples per row, an accelerator):

  python benchmarks/sampler_quality.py --config=configs/cifar10.py \
      --workdir=/tmp/ddpm_cifar10_official --num_samples=50000 \
      --config.sampling.batch_size=1000 --config.eval.inception_weights=inception_fid.npz \
      --json_out=cifar10_samplers.jsonl --chart=cifar10_samplers.png
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import matplotlib  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from etils import epath  # noqa: E402
from ml_collections import config_flags  # noqa: E402

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402

from ddpm_jax import checkpoints, evaluation, models, sample_loop, samplers, train  # noqa: E402
from ddpm_jax import diffusion as diffusion_lib  # noqa: E402
from ddpm_jax import mesh as mesh_lib  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
  'config', os.path.join(REPO, 'configs', 'digits.py'), 'The model config.'
)
flags.DEFINE_string('workdir', None, 'A trained (or imported) workdir; trained here if empty.')
flags.DEFINE_list(
  'samplers', ['ancestral', 'ddim', 'respaced', 'dpm_solver++'], 'The samplers to measure.'
)
flags.DEFINE_list('steps', ['10', '20', '50', '100'], 'Their network evaluations per sample.')
flags.DEFINE_integer('num_samples', 256, 'Samples per sampler and number of evaluations.')
flags.DEFINE_string('json_out', None, 'Append one JSON line per row to this file.')
flags.DEFINE_string('chart', None, 'Write the chart of quality against evaluations here (PNG).')
flags.DEFINE_bool('plot_only', False, 'Only draw --chart from the rows in --json_out.')


def measure(config, samples: np.ndarray, mesh, cache_dir: epath.Path) -> dict[str, float]:
  """The eval's quality measure of uint8 samples."""
  if config.data.dataset == 'digits':
    report = evaluation.digits_quality(config, samples, seed=config.seed, cache_dir=cache_dir)
    shares = [report[f'confident_share_digit_{c}'] for c in range(10)]
    return {
      'frechet_distance': report['frechet_distance'],
      'frechet_distance_floor': report['frechet_distance_floor'],
      'confident_share': report['confident_share'],
      'min_confident_share_digit': min(shares),
    }
  return {
    'fid': evaluation.inception_quality(config, samples, mesh=mesh, cache_dir=cache_dir)[
      f'fid_{config.data.split}'
    ]
  }


def draw(config, diffusion, model, params, mesh, sampler: samplers.Sampler):
  """(uint8 samples, seconds): the eval's samples, timed after compiling the loop."""
  size, channels = config.data.image_size, config.data.num_channels
  batch_size = min(config.sampling.batch_size, FLAGS.num_samples)
  init = sample_loop.create_init_fn(diffusion, mesh)
  run_chunk = sample_loop.create_chunk_fn(diffusion, model, mesh, sampler)
  x, loop_rng = init((batch_size, size, size, channels), jax.random.key(0))
  zero = np.int32(0)
  jax.block_until_ready(run_chunk(params, x, jnp.zeros_like(x), loop_rng, zero, zero))
  began = time.perf_counter()
  images = sample_loop.draw_samples(
    run_chunk,
    init,
    params,
    batch_rng=sample_loop.seed_batch_rng(config.seed),
    num_samples=FLAGS.num_samples,
    batch_size=batch_size,
    image_shape=(size, size, channels),
    num_steps=sampler.num_steps(diffusion.num_timesteps),
    desc=sampler.tag,
  )
  return images, time.perf_counter() - began


def title(row: dict) -> str:
  return (
    f'{row["dataset"]}, checkpoint step {row["checkpoint_step"]}, {row["num_samples"]} samples '
    f'per point, {row["device"]}'
  )


def plot(rows: list[dict], path: str, title: str) -> None:
  digits = 'frechet_distance' in rows[0]
  fig, axes = plt.subplots(1, 2 if digits else 1, figsize=(11 if digits else 6, 4), squeeze=False)
  for name in dict.fromkeys(row['sampler'] for row in rows):
    points = sorted((r['evaluations'], r) for r in rows if r['sampler'] == name)
    evals = [e for e, _ in points]
    style = dict(marker='*', markersize=14, linestyle='none') if name == 'ancestral' else {}
    style = {'marker': 'o', 'label': name, **style}
    if digits:
      ratio = [r['frechet_distance'] / r['frechet_distance_floor'] for _, r in points]
      axes[0, 0].plot(evals, ratio, **style)
      axes[0, 1].plot(evals, [100 * r['confident_share'] for _, r in points], **style)
    else:
      axes[0, 0].plot(evals, [r['fid'] for _, r in points], **style)
  for ax in axes[0]:
    ax.set_xscale('log')
    ax.set_xlabel('network evaluations per sample')
    ax.grid(True, which='both', alpha=0.3)
  if digits:
    axes[0, 0].axhline(1.0, color='grey', linestyle=':', label='floor (training digits)')
    axes[0, 0].axhline(1.5, color='grey', linestyle='--', label='1.5x floor')
    axes[0, 0].set_ylabel('Frechet distance / floor (lower is better)')
    axes[0, 1].axhline(90, color='grey', linestyle='--')
    axes[0, 1].set_ylabel('% samples classified with p >= 0.9')
  else:
    axes[0, 0].set_ylabel('FID (train split)')
  axes[0, 0].legend()
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  print(f'Wrote {path}')


def main(argv):
  del argv
  config = FLAGS.config
  if FLAGS.plot_only:
    with open(FLAGS.json_out) as f:
      rows = [json.loads(line) for line in f if line.strip()]
    plot(rows, FLAGS.chart, title(rows[0]))
    return
  workdir = FLAGS.workdir
  if not workdir:
    raise app.UsageError('--workdir is required.')
  if not (epath.Path(workdir) / 'checkpoints').exists():
    logging.info('No checkpoint in %s: training %s first.', workdir, config.data.dataset)
    train.train(config, workdir)
  diffusion = diffusion_lib.GaussianDiffusion.from_config(config.diffusion)
  mesh = mesh_lib.create_mesh()
  model = models.create_model(config)
  size, channels = config.data.image_size, config.data.num_channels
  abstract_params = models.param_shapes(model, size, channels)
  step, params = checkpoints.restore_ema_params(
    workdir,
    checkpoints.abstract_like(abstract_params, mesh_lib.replicated(mesh)),
    step=config.sampling.checkpoint_step,
  )
  variants = [
    samplers.Ancestral() if name == 'ancestral' else samplers.SAMPLERS[name](int(steps))
    for name in FLAGS.samplers
    for steps in (['T'] if name == 'ancestral' else FLAGS.steps)
  ]
  rows = []
  with tempfile.TemporaryDirectory() as cache_dir:
    for sampler in variants:
      samples, seconds = draw(config, diffusion, model, params, mesh, sampler)
      row = {
        'benchmark': 'sampler_quality',
        'device': jax.devices()[0].device_kind,
        'dataset': config.data.dataset,
        'checkpoint_step': step,
        'num_samples': FLAGS.num_samples,
        **sampler.settings(),
        'evaluations': sampler.num_steps(diffusion.num_timesteps),
        'seconds': seconds,
        **measure(config, samples, mesh, epath.Path(cache_dir)),
      }
      rows.append(row)
      print(json.dumps(row))
      if FLAGS.json_out:
        with open(FLAGS.json_out, 'a') as f:
          f.write(json.dumps(row) + '\n')

  digits = 'frechet_distance' in rows[0]
  quality = 'Frechet / floor | confident | rarest digit' if digits else 'FID'
  print(f'\n| sampler | evaluations | {quality} | seconds |')
  print('|---' * (6 if digits else 4) + '|')
  for r in rows:
    if 'fid' in r:
      cells = f'{r["fid"]:.2f}'
    else:
      cells = (
        f'{r["frechet_distance"]:.1f} / {r["frechet_distance_floor"]:.1f} = '
        f'{r["frechet_distance"] / r["frechet_distance_floor"]:.2f}x | '
        f'{100 * r["confident_share"]:.1f}% | {100 * r["min_confident_share_digit"]:.1f}%'
      )
    print(f'| {r["sampler"]} | {r["evaluations"]} | {cells} | {r["seconds"]:.1f} |')
  if FLAGS.chart:
    plot(rows, FLAGS.chart, title(rows[0]))


if __name__ == '__main__':
  app.run(main)

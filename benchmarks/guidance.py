"""Classifier-free guidance: sample quality and class accuracy against the guidance scale, the
table of BENCHMARKS.md ("Conditional digits").

  python benchmarks/guidance.py --workdir=/tmp/ddpm_digits_cond \
      --json_out=benchmarks/results/digits_guidance.jsonl

trains `--config` (configs/digits_cond.py) in `--workdir` unless it already holds a checkpoint
(then that one is reused) and, for each of `--scales`, draws the samples of --mode=eval
(`config.eval.num_samples`, the classes in turn, `config.sampling`'s sampler, seed and batch
size, cached in `<workdir>/eval/` by their settings) from the EMA parameters of the latest
checkpoint, and reports the digits measure: the Frechet distance to the test digits over its
floor, and how often the classifier recognizes the digit asked for, overall and for the digit it
recognizes least often.
"""

from __future__ import annotations

import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

import jax  # noqa: E402
from absl import app, flags  # noqa: E402
from etils import epath  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from ddpm_jax import (  # noqa: E402
  checkpoints,
  checks,
  evaluation,
  models,
  train,
)
from ddpm_jax import mesh as mesh_lib  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
  'config', os.path.join(REPO, 'configs', 'digits_cond.py'), 'A class-conditional digits config.'
)
flags.DEFINE_string('workdir', None, 'A trained workdir; trained here if it has no checkpoint.')
flags.DEFINE_list('scales', ['0', '1', '1.5', '2', '3', '4'], 'The guidance scales to measure.')
flags.DEFINE_string('json_out', None, 'Append one JSON line per scale to this file.')


def main(argv):
  del argv
  config = FLAGS.config
  diffusion = checks.check_config(config, evaluation.check_config)
  if checkpoints.create_manager(FLAGS.workdir).latest_step() is None:
    began = time.perf_counter()
    train.train(config, FLAGS.workdir)
    print(f'Trained in {time.perf_counter() - began:.0f} s')
  model = models.create_model(config)
  mesh = mesh_lib.create_mesh()
  abstract_params = checkpoints.abstract_like(
    models.param_shapes(model, config.data.image_size, config.data.num_channels),
    mesh_lib.replicated(mesh),
  )
  step, params = checkpoints.restore_ema_params(FLAGS.workdir, abstract_params)
  cache_dir = epath.Path(FLAGS.workdir) / 'eval'
  eval_dir = cache_dir / f'step_{step}'
  print('| guidance scale | Frechet / floor | requested digit | least recognized digit |')
  print('|---|---|---|---|')
  for scale in map(float, FLAGS.scales):
    config.sampling.guidance_scale = scale
    samples, labels, settings = evaluation.draw_eval_samples(
      config, diffusion, model, params, mesh=mesh, eval_dir=eval_dir
    )
    report = evaluation.digits_quality(
      config, samples, seed=config.seed, cache_dir=cache_dir, labels=labels
    )
    per_digit = {c: report[f'requested_accuracy_digit_{c}'] for c in range(10)}
    worst = min(per_digit, key=per_digit.get)
    row = {
      'guidance_scale': scale,
      'checkpoint_step': step,
      'frechet_distance': report['frechet_distance'],
      'frechet_distance_floor': report['frechet_distance_floor'],
      'requested_accuracy': report['requested_accuracy'],
      'requested_accuracy_per_digit': per_digit,
      'confident_share': report['confident_share'],
      'sample_settings': settings,
      'device': jax.devices()[0].device_kind,
    }
    ratio = row['frechet_distance'] / row['frechet_distance_floor']
    print(
      f'| {scale:g} | {row["frechet_distance"]:.1f} / {row["frechet_distance_floor"]:.1f} = '
      f'{ratio:.2f}x | {100 * row["requested_accuracy"]:.1f}% | {worst}: '
      f'{100 * per_digit[worst]:.1f}% |',
      flush=True,
    )
    if FLAGS.json_out:
      with open(FLAGS.json_out, 'a') as f:
        f.write(json.dumps(row) + '\n')


if __name__ == '__main__':
  flags.mark_flag_as_required('workdir')
  app.run(main)

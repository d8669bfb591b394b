"""Speed of ddpm-jax's samplers: the compiled chunked loops of `ddpm_jax/sample_loop.py`.

  python benchmarks/sample.py --config=cifar10 --num_images=256 \
      --sampler=ancestral,ddim,dpm_solver++ --steps=50 --dtype=float32,bfloat16

draws, for each sampler and dtype listed (compiled at once, then timed round by round),
`--num_images` images (one global batch, sharded over all devices) with random parameters
(the speed does not depend on their values) through `sample_loop.create_init_fn` and
`sample_loop.create_chunk_fn`, the functions `--mode=sample` runs, all steps in one call, and prints
the compile time, then the wall time, images/s and time per step (medians over --windows
repetitions, with the spread). `--mode=step` times one ancestral step (t = 500) for the batch
instead: the unit of the comparison with PyTorch (compare_torch.py).
"""

from __future__ import annotations

import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from timing import Runner, append_json, build_at_once  # noqa: E402
from train import CONFIGS, load_config  # noqa: E402

from ddpm_jax import diffusion as diffusion_lib  # noqa: E402
from ddpm_jax import mesh as mesh_lib  # noqa: E402
from ddpm_jax import models, sample_loop, samplers  # noqa: E402

SAMPLE_T = 500  # The timestep (0-based) of `--mode=step`, as in torch_reference.py.


def sample_runner(
  config_name: str,
  *,
  num_images: int,
  sampler: str = 'ancestral',
  steps: int = 50,
  dtype: str = 'float32',
  one_step: bool = False,
) -> tuple[Runner, float]:
  """A Runner of a whole sampling loop for `num_images` images (or, with `one_step`, of the
  ancestral step at t = SAMPLE_T), compiled and warmed up, and its compile seconds."""
  config = load_config(config_name, **{'model.dtype': dtype})
  mesh = mesh_lib.create_mesh()
  model = models.create_model(config)
  diffusion = diffusion_lib.GaussianDiffusion.from_config(config.diffusion)
  size, channels = config.data.image_size, config.data.num_channels
  x1, t1 = np.zeros((1, size, size, channels), np.float32), np.zeros(1, np.int32)
  params = jax.jit(
    lambda rng: model.init(rng, x1, t1, train=False)['params'],
    out_shardings=mesh_lib.replicated(mesh),
  )(jax.random.key(0))
  settings = samplers.Ancestral() if sampler == 'ancestral' else samplers.SAMPLERS[sampler](steps)
  run_chunk = sample_loop.create_chunk_fn(diffusion, model, mesh, settings)
  init = sample_loop.create_init_fn(diffusion, mesh)
  x, loop_rng = init((num_images, size, size, channels), jax.random.key(1))
  if one_step:
    start = diffusion.num_timesteps - 1 - SAMPLE_T
    num_steps = 1
  else:
    start, num_steps = 0, settings.num_steps(diffusion.num_timesteps)
  bounds = (np.int32(start), np.int32(start + num_steps))
  began = time.perf_counter()
  pred_xstart = jnp.zeros_like(x)
  compiled = run_chunk.lower(params, x, pred_xstart, loop_rng, *bounds).compile()
  compile_s = time.perf_counter() - began

  def work():
    jax.block_until_ready(compiled(params, x, pred_xstart, loop_rng, *bounds))

  name = 'jax sample step' if one_step else f'jax sample {sampler}'
  runner = Runner(name, images_per_run=num_images, steps_per_run=num_steps, work=work)
  runner.run()  # Warm-up.
  return runner, compile_s


def main(argv):
  del argv
  FLAGS = flags.FLAGS
  one_step = FLAGS.mode == 'step'
  variants = [
    {'sampler': sampler, 'dtype': dtype}
    for sampler in (['ancestral'] if one_step else FLAGS.sampler)
    for dtype in FLAGS.dtype
  ]

  def build(variant):
    return sample_runner(
      FLAGS.config,
      num_images=FLAGS.num_images,
      steps=FLAGS.steps,
      one_step=one_step,
      **variant,
    )

  built = build_at_once(build, variants)  # Then timed round by round.
  seconds = [[] for _ in variants]
  for _ in range(FLAGS.windows):
    for (runner, _), variant_seconds in zip(built, seconds, strict=True):
      variant_seconds.append(runner.run())

  for variant, (runner, compile_s), variant_seconds in zip(variants, built, seconds, strict=True):
    steps = runner.steps_per_run
    what = 'one ancestral step' if one_step else variant['sampler']
    label = (
      f'sample {FLAGS.config} {what} steps={steps} images={FLAGS.num_images} '
      f'dtype={variant["dtype"]}'
    )
    median = float(np.median(variant_seconds))
    print(f'{label}: compile {compile_s:.1f} s')
    print(
      f'{label}: {median:.3f} s (median of {len(variant_seconds)}, spread '
      f'{min(variant_seconds):.3f}-{max(variant_seconds):.3f}), '
      f'{FLAGS.num_images / median:.4g} images/s, {1e3 * median / steps:.2f} ms/step'
    )
    append_json(
      FLAGS.json_out,
      {
        'benchmark': 'sample',
        'device': jax.devices()[0].device_kind,
        'config': FLAGS.config,
        'mode': FLAGS.mode,
        'steps': steps,
        'num_images': FLAGS.num_images,
        **variant,
        'compile_s': compile_s,
        'seconds': variant_seconds,
      },
    )


if __name__ == '__main__':
  flags.DEFINE_enum('config', 'cifar10', list(CONFIGS), 'configs/<name>.py to benchmark.')
  flags.DEFINE_integer('num_images', 256, 'Images per sampling call (one global batch).')
  flags.DEFINE_list('sampler', ['ancestral'], f'Samplers, of {", ".join(samplers.SAMPLERS)}.')
  flags.DEFINE_integer('steps', 50, 'Network evaluations of every sampler but ancestral.')
  flags.DEFINE_list('dtype', ['float32'], 'config.model.dtype values (float32, bfloat16).')
  flags.DEFINE_enum('mode', 'loop', ['loop', 'step'], 'The whole loop, or one ancestral step.')
  flags.DEFINE_integer('windows', 3, 'Timed repetitions; the median is reported.')
  flags.DEFINE_string('json_out', None, 'Append the figures as JSON lines to this file.')
  app.run(main)

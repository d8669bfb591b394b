"""Speed of ddpm-jax's training step: `ddpm_jax.train`'s own jitted step, on synthetic data or the
real input pipeline.

  python benchmarks/train.py --config=cifar10 --batch_size=128 --dtype=float32,bfloat16 \
      --steps_per_call=1,8 --peak_tflops=989

builds, for each dtype and steps_per_call listed, the step exactly as `train.train` does
(`train.jit_train_call`: the steps in a loop, state donated, batch sharded over all devices,
the EMA and Adam's moments split over them: `train.state_sharding`) for the named config
(configs/<name>.py: cifar10, celebahq256, digits) and each set of compiler options listed
(--xla_options), compiles the variants at once, times them round by round (window w of each
before window w + 1 of any), and prints one line per figure:

  compile     seconds to lower and compile the call (with JAX_COMPILATION_CACHE_DIR set, JAX's
              persistent cache, a second launch reads the executable from it);
  speed       steps/s and images/s: the median of --windows timed windows of --calls_per_window
              calls after warm-up, with the spread;
  flops       FLOPs of one step from XLA's cost analysis, hence the achieved TFLOP/s and, given
              --peak_tflops (the device's dense peak in the step's dtype), the share of peak;
  memory      XLA's own count of the call's temporary buffers (any backend) and the device's
              peak bytes in use by the process (where the backend reports it: GPU, TPU), the
              larger of the variants of one run: measure memory one variant per run.

--data=synthetic (default) feeds one batch of random uint8 images that stays on the device, which
isolates the step; --data=pipeline reads every batch through `ddpm_jax.data.train_batches` (the
dataset of the config; digits need no download) and sends it to the device as the training loop
does, to show whether the input is ever the bottleneck.
"""

from __future__ import annotations

import functools
import importlib
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
from timing import Rates, Runner, append_json, build_at_once, parse_overrides, window  # noqa: E402

from ddpm_jax import diffusion as diffusion_lib  # noqa: E402
from ddpm_jax import mesh as mesh_lib  # noqa: E402
from ddpm_jax import models, train  # noqa: E402

CONFIGS = ('cifar10', 'celebahq256', 'digits')


def load_config(name: str, **overrides):
  """configs/<name>.py's config with `section.field` overrides, e.g. {'model.dtype': 'bfloat16'}."""
  config = importlib.import_module(f'configs.{name}').get_config()
  for key, value in overrides.items():
    section, field = key.split('.')
    config[section][field] = value
  return config


def train_runner(
  config_name: str,
  *,
  batch_size: int,
  dtype: str = 'float32',
  steps_per_call: int | None = None,
  remat: bool = False,
  attention_impl: str | None = None,
  data: str = 'synthetic',
  xla_options: dict | None = None,
) -> tuple[Runner, dict]:
  """A Runner of one compiled call (`steps_per_call` train steps, by default the config's), and
  the static figures. `xla_options`: compiler options of the call's compilation.

  Returns the runner, compiled and warmed up, and a dict of `compile_s`, `flops` (of
  one step) and `temp_bytes` (XLA's estimate of the call's temporary buffers).
  """
  overrides = {} if steps_per_call is None else {'training.steps_per_call': steps_per_call}
  config = load_config(
    config_name,
    **overrides,
    **{
      'training.batch_size': batch_size,
      'model.dtype': dtype,
      'model.remat': remat,
      'model.attention_impl': attention_impl,
    },
  )
  steps_per_call = config.training.steps_per_call
  mesh = mesh_lib.create_mesh()
  batches_sharding = mesh_lib.stacked_batches_sharded(mesh)
  model = models.create_model(config)
  diffusion = diffusion_lib.GaussianDiffusion.from_config(config.diffusion)
  tx, schedule = train.create_optimizer(config)
  init_rng = train.root_rngs(config.seed)[0]
  init_fn = functools.partial(train.create_train_state, config, model, tx)
  state_sharding = train.state_sharding(jax.eval_shape(init_fn, init_rng), mesh)
  state = jax.jit(init_fn, out_shardings=state_sharding)(init_rng)

  train_call = train.jit_train_call(
    config, model, diffusion, tx, schedule, mesh, state_sharding, ema_starts_as_copy=True
  )
  size, channels = config.data.image_size, config.data.num_channels
  shape = (steps_per_call, batch_size, size, size, channels)

  if data == 'synthetic':
    images = jax.device_put(
      np.random.default_rng(0).integers(0, 256, shape, np.uint8), batches_sharding
    )
    next_images = lambda: images
  else:
    from ddpm_jax import data as data_lib

    batches = data_lib.train_batches(
      config,
      global_batch_size=batch_size,
      start_step=0,
      seed=0,
      buffer_size=2 * steps_per_call,
    )

    def next_images():
      local = np.stack([next(batches)[1]['image'] for _ in range(steps_per_call)])
      return jax.make_array_from_process_local_data(batches_sharding, local)

  began = time.perf_counter()
  num_steps = np.int32(steps_per_call)
  batches_shape = {'image': jax.ShapeDtypeStruct(shape, jnp.uint8)}
  compiled = train_call.lower(state, batches_shape, num_steps).compile(compiler_options=xla_options)
  compile_s = time.perf_counter() - began
  # FLOPs of one step: XLA counts the loop's body once (checked on CPU: within 1% of the step
  # compiled alone). Some backends (GPU) have no cost analysis before compilation, so it is
  # read from the compiled call.
  flops = (compiled.cost_analysis() or {}).get('flops')
  memory = compiled.memory_analysis()
  holder = {'state': state}

  def work():
    holder['state'], metrics = compiled(holder['state'], {'image': next_images()}, num_steps)
    jax.block_until_ready(metrics)

  runner = Runner(
    f'jax train {config_name}, {steps_per_call} steps per call',
    images_per_run=steps_per_call * batch_size,
    steps_per_run=steps_per_call,
    work=work,
  )
  runner.work()  # Warm-up.
  return runner, {
    'compile_s': compile_s,
    'flops': flops,
    'temp_bytes': getattr(memory, 'temp_size_in_bytes', None),
  }


def peak_device_bytes() -> int | None:
  """The first local device's peak bytes in use so far, where the backend reports it."""
  stats = jax.local_devices()[0].memory_stats() or {}
  return stats.get('peak_bytes_in_use')


def main(argv):
  del argv
  FLAGS = flags.FLAGS
  variants = [
    {'dtype': dtype, 'steps_per_call': int(steps_per_call), 'xla_options': options}
    for dtype in FLAGS.dtype
    for steps_per_call in FLAGS.steps_per_call
    for options in FLAGS.xla_options
  ]

  def build(variant):
    return train_runner(
      FLAGS.config,
      batch_size=FLAGS.batch_size,
      remat=FLAGS.remat,
      attention_impl=FLAGS.attention_impl,
      data=FLAGS.data,
      dtype=variant['dtype'],
      steps_per_call=variant['steps_per_call'],
      xla_options=parse_overrides(
        variant['xla_options'].split(';') if variant['xla_options'] else []
      ),
    )

  # Timed round by round: window w of every variant, then window w + 1, and so on.
  built = build_at_once(build, variants)
  rates = [Rates([], []) for _ in variants]
  for _ in range(FLAGS.windows):
    for (runner, _), variant_rates in zip(built, rates, strict=True):
      steps, images = window(runner, FLAGS.calls_per_window)
      variant_rates.steps_per_sec.append(steps)
      variant_rates.images_per_sec.append(images)

  peak = peak_device_bytes()
  for variant, (_, static), variant_rates in zip(variants, built, rates, strict=True):
    label = (
      f'train {FLAGS.config} batch={FLAGS.batch_size} dtype={variant["dtype"]} '
      f'steps_per_call={variant["steps_per_call"]} remat={FLAGS.remat} data={FLAGS.data}'
      + (f' attention={FLAGS.attention_impl}' if FLAGS.attention_impl else '')
      + (f' xla_options={variant["xla_options"]}' if variant['xla_options'] else '')
    )
    steps_per_sec = variant_rates.median('steps')
    tflops = (static['flops'] or 0) * steps_per_sec / 1e12
    share = (
      f', {100 * tflops / FLAGS.peak_tflops:.1f}% of {FLAGS.peak_tflops:g}'
      if FLAGS.peak_tflops
      else ''
    )
    temp = static['temp_bytes']
    print(f'{label}: compile {static["compile_s"]:.1f} s')
    print(f'{label}: {variant_rates.describe("steps")}, {variant_rates.median():.4g} images/s')
    print(
      f'{label}: {(static["flops"] or 0) / 1e9:.1f} GFLOP/step (XLA cost analysis), '
      f'{tflops:.3g} TFLOP/s achieved{share}'
    )
    print(
      f'{label}: XLA temporary buffers {temp / 2**30:.2f} GiB'
      + (f'; peak device memory of the process {peak / 2**30:.2f} GiB' if peak else '')
    )
    append_json(
      FLAGS.json_out,
      {
        'benchmark': 'train',
        'device': jax.devices()[0].device_kind,
        'config': FLAGS.config,
        'batch_size': FLAGS.batch_size,
        'remat': FLAGS.remat,
        'attention_impl': FLAGS.attention_impl,
        'data': FLAGS.data,
        **variant,
        'compile_s': static['compile_s'],
        'steps_per_sec': variant_rates.steps_per_sec,
        'images_per_sec': variant_rates.images_per_sec,
        'flops_per_step': static['flops'],
        'temp_bytes': temp,
        'peak_bytes': peak,
      },
    )


if __name__ == '__main__':
  flags.DEFINE_enum('config', 'cifar10', list(CONFIGS), 'configs/<name>.py to benchmark.')
  flags.DEFINE_integer('batch_size', 128, 'Global batch size.')
  flags.DEFINE_list('dtype', ['float32'], 'config.model.dtype values (float32, bfloat16).')
  flags.DEFINE_list('steps_per_call', ['1'], 'config.training.steps_per_call values.')
  flags.DEFINE_list(
    'xla_options',
    [''],
    "Compiler options of the call, one variant each: '' (none) or name=value[;name=value], e.g. "
    "',xla_vf_vmem_memory_space_assignment=False' (a v5e or v5p, with and without MSA).",
  )
  flags.DEFINE_bool('remat', False, 'config.model.remat.')
  flags.DEFINE_string('attention_impl', None, "config.model.attention_impl (None or 'cudnn').")
  flags.DEFINE_enum('data', 'synthetic', ['synthetic', 'pipeline'], 'Where batches come from.')
  flags.DEFINE_integer('windows', 5, 'Timed windows per variant; the median is reported.')
  flags.DEFINE_integer('calls_per_window', 3, 'Compiled calls per timed window.')
  flags.DEFINE_float('peak_tflops', None, 'Dense peak TFLOP/s of the device in this dtype.')
  flags.DEFINE_string('json_out', None, 'Append the figures as JSON lines to this file.')
  app.run(main)

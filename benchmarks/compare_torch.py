"""ddpm-jax against the same work in PyTorch, side by side in one run: the ratios ours / theirs.

  python benchmarks/compare_torch.py --batch_size=8 --dtype=float32 --threads=2

Builds, on the CIFAR10 model (35,746,307 parameters on both sides), ddpm-jax's compiled train
step (benchmarks/train.py, synthetic data) and one ancestral sampling step of its compiled sampler
(benchmarks/sample.py, t = 500), and their PyTorch references on diffusers' UNet2DModel
(benchmarks/torch_reference.py), then times them round by round: in each of --rounds rounds every
runner runs one window of --steps steps, in an order reversed every other round, so that the
drift of a shared machine falls on both sides alike. Prints each side's median images/s with its
spread, and the ratio of the medians (above 1: ddpm-jax is faster).

`--sides=jax,jax_ynnpack,torch` adds a third side: ddpm-jax with XLA:CPU's own choice of
convolution library (YNNPACK; `DDPM_JAX_KEEP_XLA_FLAGS=1`) instead of the Eigen convolutions that
`import ddpm_jax` asks for (ddpm_jax/xla_cpu.py), so that the option is judged side by side too.
Every pair of sides gets its ratio, the earlier side over the later.

Each side lives in its own worker process, which waits idle while the other side runs: in one
process the thread pool of either framework slows the other (measured here: PyTorch's train
step 5x slower next to a warm XLA runtime). Threads: PyTorch gets `torch.set_num_threads
(--threads)`; XLA's CPU backend uses one thread per core, so --threads should be the core count
(2 on the development machine) for a fair match.
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
import statistics

from absl import app, flags

# A comparison on this CPU: with libtpu installed (requirements-test.txt) JAX would also look for
# a TPU at start-up, in every worker.
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

FLAGS = flags.FLAGS
flags.DEFINE_integer('batch_size', 8, 'Images per step, both sides.')
flags.DEFINE_enum('dtype', 'float32', ['float32', 'bfloat16'], 'Compute dtype, both sides.')
flags.DEFINE_integer(
  'steps_per_call',
  None,
  "ddpm-jax's training.steps_per_call (train steps per compiled call); default: the config's.",
)
flags.DEFINE_integer('threads', os.cpu_count(), 'PyTorch threads; XLA uses one per core.')
flags.DEFINE_integer('rounds', 6, 'Timed rounds; each runs one window of every runner.')
flags.DEFINE_integer('steps', 3, 'Steps per window.')
flags.DEFINE_list('sides', ['jax', 'torch'], 'Sides to compare, in order: jax, jax_ynnpack, torch.')

WORKS = ('train', 'sample step')
# Each side's environment on top of this process's: the worker reads it before JAX starts.
SIDE_ENV = {'jax': {}, 'jax_ynnpack': {'DDPM_JAX_KEEP_XLA_FLAGS': '1'}, 'torch': {}}


def _worker(
  side: str, batch_size: int, dtype: str, threads: int, steps_per_call: int | None, connection
) -> None:
  """Builds one side's runners, sends their names, then runs the windows it is asked for."""
  os.environ.update(SIDE_ENV[side])
  from timing import window

  if side.startswith('jax'):
    import sample
    import train

    runners = {
      'train': train.train_runner(
        'cifar10', batch_size=batch_size, dtype=dtype, steps_per_call=steps_per_call
      )[0],
      'sample step': sample.sample_runner(
        'cifar10', num_images=batch_size, dtype=dtype, one_step=True
      )[0],
    }
  else:
    import torch_reference

    runners = {
      'train': torch_reference.train_runner(batch_size, dtype=dtype, threads=threads),
      'sample step': torch_reference.sample_runner(batch_size, dtype=dtype, threads=threads),
    }
  connection.send({work: runner.name for work, runner in runners.items()})
  while (request := connection.recv()) is not None:
    work, steps = request
    connection.send(window(runners[work], steps)[1])


def main(argv):
  del argv
  unknown = sorted(set(FLAGS.sides) - set(SIDE_ENV))
  if unknown:
    raise app.UsageError(f'--sides: unknown {unknown}; choose from {", ".join(SIDE_ENV)}')
  context = multiprocessing.get_context('spawn')
  sides = {}
  for side in FLAGS.sides:
    ours, theirs = context.Pipe()
    process = context.Process(
      target=_worker,
      args=(side, FLAGS.batch_size, FLAGS.dtype, FLAGS.threads, FLAGS.steps_per_call, theirs),
    )
    process.start()
    sides[side] = (process, ours)
  names = {side: connection.recv() for side, (_, connection) in sides.items()}

  order = [(work, side) for work in WORKS for side in sides]
  rates = {key: [] for key in order}
  for round_index in range(FLAGS.rounds):
    for work, side in order if round_index % 2 == 0 else order[::-1]:
      connection = sides[side][1]
      connection.send((work, FLAGS.steps))
      rates[work, side].append(connection.recv())
  for process, connection in sides.values():
    connection.send(None)
    process.join()

  print(
    f'CIFAR10 model, batch {FLAGS.batch_size}, {FLAGS.dtype}, {FLAGS.threads} threads, '
    f'{FLAGS.rounds} interleaved rounds of {FLAGS.steps} steps (train: calls on our side):'
  )
  for work in WORKS:
    medians = {}
    for side in sides:
      values = rates[work, side]
      medians[side] = statistics.median(values)
      print(
        f'  {side}, {names[side][work]}: {medians[side]:.3g} images/s '
        f'(spread {min(values):.3g}-{max(values):.3g})'
      )
    for first, second in itertools.combinations(sides, 2):
      print(f'  {work}: {first} / {second} = {medians[first] / medians[second]:.2f}')


if __name__ == '__main__':
  app.run(main)

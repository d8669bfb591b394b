"""The training call and a sampler chunk compile for a TPU slice on this CPU host and fit its HBM.

Deviceless ahead-of-time compilation with libtpu (benchmarks/tpu_aot.py has the figures of the
paper's models): the digits config's programs, exactly as the loops build them, on the project's
mesh over the 8 chips of a v5e-8.
"""

import functools
import math

import jax
import pytest
import tpu_aot
from train import load_config

from ddpm_jax import mesh as mesh_lib
from ddpm_jax import models

pytest.importorskip('libtpu', reason='libtpu (requirements-test.txt) compiles for TPUs')

SLICE = tpu_aot.SLICES['v5e-8']
BATCH = 64


@pytest.fixture(scope='module')
def mesh():
  devices = SLICE.devices()
  assert [d.device_kind for d in devices] == ['TPU v5 lite'] * 8
  return mesh_lib.create_mesh(devices)


def _digits_param_bytes() -> tuple[int, int]:
  """The bytes of the digits model's float32 parameters, (as they are, as a TPU stores them):
  a TPU lays an f32 array out in tiles of 8 x 128 over its two minor dimensions (a vector in
  tiles of 128), so a chip holds each array padded up to whole tiles at most."""
  shapes = models.param_shapes(models.create_model(load_config('digits')), 8, 1)

  def tiled(shape):
    *major, rows, cols = (1, *shape)
    return math.prod(major) * -(-rows // 8) * 8 * -(-cols // 128) * 128

  leaves = jax.tree.leaves(shapes)
  return 4 * sum(p.size for p in leaves), 4 * sum(tiled(p.shape) for p in leaves)


def test_digits_train_call_compiles_for_a_v5e_8_and_fits(mesh):
  lowered = tpu_aot.lower_train('digits', mesh, batch_size=BATCH)
  # The TPU form of the convolutions' gradients: JAX's own, without the CPU form's barriers.
  assert 'optimization_barrier' not in lowered.as_text()
  compiled = lowered.compile()
  figures = tpu_aot.analyze(compiled, compile_s=0.0)
  assert tpu_aot.fits(SLICE, figures), figures
  # Each chip holds the whole state, replicated (a state sharded over the 8 chips would be 1/8 of
  # it): step, params, EMA and Adam's two moments, 4 float32 copies of the 1.0M parameters, and
  # its 1/8 of the call's uint8 batches.
  k = load_config('digits').training.steps_per_call
  param_bytes, tiled_bytes = _digits_param_bytes()
  batch_bytes = k * (BATCH // 8) * 8 * 8 * 1
  assert 4 * param_bytes + batch_bytes <= figures.argument_bytes
  assert figures.argument_bytes <= 4 * tiled_bytes + 2 * batch_bytes + 2**12
  # The gradients are averaged over the 8 chips, and XLA has an estimate of the step's time.
  assert 'all-reduce' in compiled.as_text()
  assert figures.seconds is not None and figures.seconds > 0
  assert figures.flops > 0


def test_digits_sampler_chunk_compiles_for_a_v5e_8_and_fits(mesh):
  sampler = tpu_aot.samplers.DPMSolver(20)
  lower = functools.partial(tpu_aot.lower_sampler, 'digits', mesh, sampler, 64)
  figures = tpu_aot.compile_for(lower)
  assert tpu_aot.fits(SLICE, figures), figures
  # The replicated params (1.0M float32, at most tiled) and each chip's 64 / 8 images of x and
  # the predicted x_0.
  image_bytes = 2 * (64 // 8) * 8 * 8 * 1 * 4
  param_bytes, tiled_bytes = _digits_param_bytes()
  assert param_bytes + image_bytes <= figures.argument_bytes
  assert figures.argument_bytes <= tiled_bytes + 2 * image_bytes + 2**12


def test_xla_estimate_leaves_out_the_ops_it_counts_as_minus_one_second(mesh):
  """libtpu's 'optimal_seconds' counts each ConcatBitcast custom call (a skip connection's
  concatenation along 128-aligned channels) as -1 s, which made every CIFAR10-sized estimate
  negative: the digits sampler at 128 channels has 18 of them (libtpu 0.0.50.1's compile) and
  reports -18 plus a fraction of a millisecond; that fraction is the estimate."""
  sampler = tpu_aot.samplers.DPMSolver(20)
  lower = functools.partial(tpu_aot.lower_sampler, 'digits', mesh, sampler, 64, **{'model.ch': 128})
  figures = tpu_aot.compile_for(lower)
  assert figures.unestimated_ops == 18
  assert -figures.unestimated_ops < figures.seconds < -figures.unestimated_ops + 0.01
  # What is left is an estimate like those libtpu reports whole (the digits network at 32
  # channels): within a factor 2 of the roofline's bound, bytes accessed at the HBM bandwidth
  # (0.63x to 1.52x across the programs of BENCHMARKS.md's TPU tables).
  bound = max(figures.roofline(SLICE))
  assert 0.5 * bound < figures.estimate() < 2 * bound


def _memory_model(base_gib: float, per_image_gib: float, step_at: int | None = None):
  """figures_at(batch) of a program whose per-chip HBM is base + per_image * (its images), plus
  a 4 GiB jump from `step_at` images per chip on (as when XLA changes a buffer's layout), None
  (the compiler's out-of-HBM) beyond twice the chip; base None: 12 GiB at 4 images per chip,
  more than at 8. And the batches it was asked for."""
  asked = []

  def figures_at(batch):
    asked.append(batch)
    per_chip = batch // 8
    if base_gib is None:  # 12 GiB at 4 per chip; from 8 on, 2 + per_image temporaries an image.
      gib = 12.0 if per_chip == 4 else 2 + per_image_gib * per_chip
    else:
      gib = base_gib + per_image_gib * per_chip + (4 if step_at and per_chip >= step_at else 0)
    if gib > 2 * SLICE.hbm_bytes / tpu_aot.GiB:
      return None
    temp = int(per_image_gib * per_chip * tpu_aot.GiB)
    return tpu_aot.Figures(0.0, int(gib * tpu_aot.GiB), 0, 0, temp, None, None, None)

  return figures_at, asked


@pytest.mark.parametrize(
  ('base', 'per_image', 'step_at', 'expected', 'compiles'),
  [
    # Linear: the line through 4 and 8 images per chip predicts (16 - 3) / 0.6 = 21.7, so 21
    # fits and 22 does not, in 4 compiles.
    (3.0, 0.6, None, (21 * 8, 22 * 8), [32, 64, 168, 176]),
    # The jump at 15 per chip (3 + 0.6 * 15 + 4 = 16.0 GiB fits, 16.6 at 16 does not): the
    # prediction 21 does not fit, nor 20, and halving 8..20 finds 15 | 16.
    (3.0, 0.6, 15, (15 * 8, 16 * 8), [32, 64, 168, 160, 112, 136, 120, 128]),
    # 8 per chip already does not fit (4 + 1.6 * 8 = 16.8 GiB): halving 4..8 finds 7 | 8.
    (4.0, 1.6, None, (7 * 8, 8 * 8), [32, 64, 48, 56]),
    # 4 per chip takes more than 8 (as XLA laid the v5e-8's 256x256 call out at batch 32: 11.65
    # GiB against 8.29 at 64): 8's temporaries, 0.75 GiB an image, predict 8 + 8 / 0.75 = 18.7.
    (None, 0.75, None, (18 * 8, 19 * 8), [32, 64, 144, 152]),
    # 4 per chip does not fit: there is no answer, and 8 is not tried.
    (12.0, 1.1, None, None, [32]),
  ],
)
def test_largest_batch_brackets_the_largest_batch_that_fits(
  base, per_image, step_at, expected, compiles
):
  """The search of max_batch_256 on memory models whose answer is known exactly: the largest
  images per chip with base + per_image * images (+ the jump) <= the v5e's 16 GiB."""
  figures_at, asked = _memory_model(base, per_image, step_at)
  assert tpu_aot.largest_batch(SLICE, 8, figures_at, max_compiles=10) == expected
  assert asked == compiles

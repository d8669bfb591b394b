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

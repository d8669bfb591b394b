"""The training call and a sampler chunk compile for a TPU slice on this CPU host and fit its HBM.

Deviceless ahead-of-time compilation with libtpu (benchmarks/tpu_aot.py has the figures of the
paper's models): the digits config's programs, exactly as the loops build them, on the project's
mesh over the 8 chips of a v5e-8.
"""

import functools
import math

import hlo_bytes
import jax
import jax.numpy as jnp
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


def _digits_param_bytes(mesh=None) -> tuple[int, int]:
  """The bytes of the digits model's float32 parameters, (as they are, as a TPU stores them):
  a TPU lays an f32 array out in tiles of 8 x 128 over its two minor dimensions (a vector in
  tiles of 128), so a chip holds each array padded up to whole tiles at most. With `mesh`, of
  one chip's part of them split over it as the train state's EMA and Adam moments are
  (`mesh_lib.split`)."""
  shapes = models.param_shapes(models.create_model(load_config('digits')), 8, 1)
  shapes = [p.shape for p in jax.tree.leaves(shapes)]
  if mesh is not None:
    shapes = [mesh_lib.split(mesh, shape).shard_shape(shape) for shape in shapes]

  def tiled(shape):
    *major, rows, cols = (1, *shape)
    return math.prod(major) * -(-rows // 8) * 8 * -(-cols // 128) * 128

  return 4 * sum(math.prod(shape) for shape in shapes), 4 * sum(map(tiled, shapes))


@pytest.fixture(scope='module')
def digits_train_call(mesh) -> tuple[jax.stages.Lowered, jax.stages.Compiled]:
  lowered = tpu_aot.lower_train('digits', mesh, batch_size=BATCH)
  return lowered, lowered.compile()


def test_digits_train_call_compiles_for_a_v5e_8_and_fits(digits_train_call, mesh):
  lowered, compiled = digits_train_call
  # The TPU form of the convolutions' gradients: JAX's own, without the CPU form's barriers.
  assert 'optimization_barrier' not in lowered.as_text()
  figures = tpu_aot.analyze(compiled, compile_s=0.0)
  assert tpu_aot.fits(SLICE, figures), figures
  # Each chip holds the params whole (1.0M float32), its 1/8 of the EMA and Adam's two moments
  # (split over the chips, `train.state_sharding`), and its 1/8 of the call's uint8 batches:
  # 1 + 3/8 of the params' bytes, and at most their tiles (the digits' narrow kernels split 8
  # ways fill few of their tiles); the whole state replicated would be 4 copies at least.
  k = load_config('digits').training.steps_per_call
  param_bytes, tiled_bytes = _digits_param_bytes()
  part_bytes, tiled_part_bytes = _digits_param_bytes(mesh)
  assert 7.9 * part_bytes <= param_bytes <= 8 * part_bytes  # All but a few small biases split.
  batch_bytes = k * (BATCH // 8) * 8 * 8 * 1
  assert param_bytes + 3 * part_bytes + batch_bytes <= figures.argument_bytes
  assert figures.argument_bytes <= tiled_bytes + 3 * tiled_part_bytes + 2 * batch_bytes + 2**12
  assert figures.argument_bytes < 4 * param_bytes
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
  negative: the digits sampler at 128 channels, in bfloat16 as a TPU computes it by default, has
  19 of them (libtpu 0.0.50.1's compile; 17 in float32, 18 there before the upsampling
  convolution took its direct form on TPU) and reports -19 plus a fraction of a millisecond;
  that fraction is the estimate."""
  sampler = tpu_aot.samplers.DPMSolver(20)
  lower = functools.partial(tpu_aot.lower_sampler, 'digits', mesh, sampler, 64, **{'model.ch': 128})
  figures = tpu_aot.compile_for(lower)
  assert figures.unestimated_ops == 19
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


def test_bytes_breakdown_of_a_tpu_program_sums_to_xla_bytes_accessed(digits_train_call):
  # benchmarks/hlo_bytes.py counts each instruction's operands and output as XLA's cost analysis
  # does, memory-space assignment's copies included: its sum over the compiled TPU train call is
  # XLA's own 'bytes accessed' (within 3%: matched on v5e-8 and v5p-8 CIFAR10 programs to 1%),
  # and the part in HBM is less.
  _, compiled = digits_train_call
  instructions = hlo_bytes.parse(compiled.as_text())
  summed = sum(i['bytes'] for i in instructions)
  xla = compiled.cost_analysis()['bytes accessed']
  assert abs(summed - xla) <= 0.03 * xla, (summed, xla)
  assert 0 < sum(i['hbm_bytes'] for i in instructions) < summed
  categories = {i['category'] for i in instructions}
  assert {'convolutions forward', 'convolutions backward', 'Adam update', 'EMA'} <= categories


@pytest.mark.parametrize('gathered', [True, False], ids=['returned_whole', 'returned_split'])
def test_bytes_of_a_fusion_that_slices_an_operand_are_as_xla_counts_them(mesh, gathered):
  # A float32 [1024, 512] array whole on each chip (g) beside one split over the 8 chips (a, as
  # the train state's EMA and Adam moments are): in a * 0.5 + g each chip reads only its slice
  # of g, which the fusion takes with a dynamic-slice, so XLA counts the fusion's reads as that
  # slice (a 256 KiB part), its part of a and its output: 3 parts, not the 10 of g whole. The sum
  # of the program, returned whole (an all-gather and a copy) or split, is XLA's 'bytes
  # accessed', to the scalars of the partition's bookkeeping.
  shape = (1024, 512)
  split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
  whole = mesh_lib.replicated(mesh)
  args = [jax.ShapeDtypeStruct(shape, jnp.float32, sharding=s) for s in (split, whole)]
  out = whole if gathered else split
  compiled = jax.jit(lambda a, g: a * 0.5 + g, out_shardings=out).lower(*args).compile()
  text = compiled.as_text()
  assert ('all-gather(' in text) == gathered
  instructions = hlo_bytes.parse(text)
  part = 4 * 1024 * 512 // 8
  [fusion] = [i['bytes'] for i in instructions if i['opcode'] == 'fusion']
  assert abs(fusion - 3 * part) <= 2**10
  summed = sum(i['bytes'] for i in instructions)
  assert abs(summed - compiled.cost_analysis()['bytes accessed']) <= 2**11


def test_xla_estimate_adds_msa_staging_to_a_compute_bound_program(mesh):
  # Six bf16 matmuls [2048, 1024] x [1024, 1024] and their gelus: 25.9 GFLOP, 131.7 us at the
  # v5e's 197 TFLOP/s, compute-bound. With memory-space assignment off (the v5e/v5p flag) nothing
  # is staged on chip and XLA's estimate is that compute time exactly; with it on (the default)
  # the staging copies add their bytes to XLA's count and about their time at HBM bandwidth to its
  # estimate, as if the copies did not overlap the matmuls (BENCHMARKS.md, "Memory-space
  # assignment off").
  def chain(x, *ws):
    for w in ws:
      x = jax.nn.gelu(x @ w)
    return x

  one_chip = mesh_lib.replicated(jax.sharding.Mesh(mesh.devices.flat[:1], ('data',)))
  arrays = [(2048, 1024)] + [(1024, 1024)] * 6
  args = [jax.ShapeDtypeStruct(s, jnp.bfloat16, sharding=one_chip) for s in arrays]
  lowered = jax.jit(chain).lower(*args)
  figures = {}
  for msa in (True, False):
    compiled = lowered.compile(compiler_options={'xla_vf_vmem_memory_space_assignment': msa})
    figures[msa] = tpu_aot.analyze(compiled, compile_s=0.0), 'S(1)' in compiled.as_text()
  (on, staged), (off, staged_off) = figures[True], figures[False]
  # The matmuls' 25.8 GFLOP and the gelus' few, all at the chip's peak.
  assert on.flops == off.flops >= 6 * 2 * 2048 * 1024 * 1024
  compute_s, _ = off.roofline(SLICE)
  assert staged and not staged_off
  assert off.estimate() == pytest.approx(compute_s, rel=1e-6)
  # 50 MB more counted (the staged buffers, 4 times each): 62 us at 819 GB/s; the estimate adds 69.
  assert on.bytes_accessed > off.bytes_accessed
  added_s = (on.bytes_accessed - off.bytes_accessed) / (SLICE.hbm_gbps * 1e9)
  assert on.estimate() - compute_s == pytest.approx(added_s, rel=0.2)


def test_bytes_breakdown_of_a_cpu_program_is_xla_bytes_accessed():
  # On the CPU (no tiles, one memory space) the sum is XLA's 'bytes accessed' but for the loop's
  # scalar bookkeeping (24 of its 12,917 bytes here): a loop of convolutions, the loop body
  # counted once as the cost analysis counts it.
  def f(x, w):
    body = lambda i, x: jnp.tanh(jax.lax.conv(x, w, (1, 1), 'SAME'))
    return jax.lax.fori_loop(0, 3, body, x)

  x, w = jnp.ones((2, 4, 8, 8)), jnp.ones((4, 4, 3, 3))
  compiled = jax.jit(f).lower(x, w).compile()
  summed = sum(i['bytes'] for i in hlo_bytes.parse(compiled.as_text()))
  assert 0 <= compiled.cost_analysis()['bytes accessed'] - summed <= 24


def test_shape_bytes_pads_to_the_layouts_tiles():
  # A TPU stores bf16[16,32,32,3] with layout {3,0,2,1} in tiles of 8 x 128 over dimensions 3
  # then 0: C = 3 padded to 128 lanes, B = 16 already whole tiles of 8; 2 bytes an element.
  tiled = 'bf16[16,32,32,3]{3,0,2,1:T(8,128)(2,1)}'
  assert hlo_bytes.shape_bytes(tiled) == 2 * 16 * 32 * 32 * 128
  assert hlo_bytes.shape_bytes('f32[5]{0:T(128)}') == 4 * 128
  assert hlo_bytes.shape_bytes('(f32[2,3]{1,0}, s32[])') == 4 * 6 + 4
  # In S(1), on-chip memory: counted as bytes moved, not as HBM's.
  in_vmem = 'bf16[16,32,32,128]{3,0,2,1:T(8,128)(2,1)S(1)}'
  assert hlo_bytes.shape_bytes(in_vmem, hbm_only=True) == 0
  assert hlo_bytes.shape_bytes(tiled + ' ' + in_vmem, hbm_only=True) == 2 * 16 * 32 * 32 * 128


@pytest.mark.parametrize(
  'opcode, op_name, calls, expected',
  [
    ('fusion', 'jit(train_call)/while/body/jvp(loss)/UNet/down_0/block_0/conv1/conv',
     'convolution add', 'convolutions forward'),
    ('fusion', 'jit(train_call)/while/body/transpose(jvp(loss))/UNet/up_1/block_2/norm2/reduce_sum',
     'reduce multiply', 'GroupNorm backward'),
    ('fusion', 'jit(train_call)/while/body/jvp(loss)/UNet/down_1/attn_0/dot_general', 'convolution',
     'attention forward'),
    ('fusion', 'jit(train_call)/while/body/optimizer/add', 'add', 'Adam update'),
    ('fusion', 'jit(train_call)/while/body/ema/add', 'add', 'EMA'),
    ('all-reduce', 'jit(train_call)/while/body/transpose(jvp(loss))/UNet/conv_in/conv', '',
     'collectives (gradients summed, params gathered)'),
    ('all-gather', 'jit(train_call)/while/body/optimizer/add', '',
     'collectives (gradients summed, params gathered)'),
    ('copy-start', '', '', 'copies and layout changes'),
  ],
)  # fmt: skip
def test_each_instruction_is_put_in_what_moves_its_bytes(opcode, op_name, calls, expected):
  assert hlo_bytes.category(opcode, op_name, calls) == expected

"""ddpm-jax's own programs compiled for TPU topologies on a CPU host, and what XLA says of them.

Deviceless ahead-of-time compilation: libtpu (`pip install libtpu`, what `jax[tpu]` installs;
requirements-test.txt pins the one of our jax) describes the devices of a named TPU slice, a
`jax.sharding.Mesh` over them is the project's mesh (`mesh.create_mesh`), and the very functions
the loops compile (`train.jit_train_call`, `sample_loop.create_chunk_fn`) are lowered for
ShapeDtypeStructs and compiled by the TPU compiler, here, without a TPU:

  python benchmarks/tpu_aot.py --topologies=v4-8,v5e-8,v5p-8,v6e-8,v5e-32 \\
      --json_out=benchmarks/results/tpu_aot.jsonl

Programs (--programs):
  train_cifar10   the train call of configs/cifar10.py at the paper's batch 128, for each
                  --dtype and --steps_per_call;
  train_256       that of configs/celebahq256.py (113.7M parameters) at the paper's batch 64,
                  without and with remat (float32, 1 step per call);
  max_batch_256   the largest global batch of train_256 that fits a chip's HBM, in each remat
                  mode: a line through the memory of two batches predicts it, then compiles of
                  the prediction and one device's worth more confirm it (or step down);
  sample_cifar10  the compiled sampler chunk for 256 CIFAR10 images, ancestral and DPM-Solver++
                  (float32).
train_256, max_batch_256 and sample_cifar10 compute in float32, the paper's dtype, not the TPU's
default bfloat16 (`models.compute_dtype`); --overrides=model.dtype=bfloat16 compiles them in it.

For each program it prints one line: compile seconds; per-chip HBM (arguments + outputs -
donated aliases + temporaries + code, XLA's buffer assignment) against the chip's HBM; FLOPs and
bytes accessed per chip (XLA's cost analysis of the partitioned program: a loop's body counted
once, so one train step of a call of k, or one sampler step); XLA's estimated seconds for that
('optimal_seconds', where libtpu reports it, less the -1 s it counts for each op its cost model
does not know: UNESTIMATED_OPS), hence the estimated steps/s or images/s and the share of the
chip's bfloat16 peak. These are the compiler's estimates, not measurements.

On a 2-core CPU the CIFAR10 train call takes minutes to compile for one topology, and the 256x256
one longer, and nothing keeps them: JAX's persistent compilation cache cannot serve a compile-only
device (libtpu 0.0.50 writes the entry, then refuses to read it back: "PjRtCompiler must be
constructed with a Client to deserialize"), so this script does not use it. Choose the programs,
--remat modes and slices a run needs.
"""

from __future__ import annotations

import os
import sys

# Before JAX starts: compile-only TPU devices need no TPU VM metadata server, and the program
# runs on the CPU backend (libtpu would otherwise try to open a TPU).
os.environ.setdefault('TPU_SKIP_MDS_QUERY', '1')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# libtpu locks /tmp/libtpu_lockfile for one process at a time, which compiling alone does not need.
os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

import dataclasses  # noqa: E402
import functools  # noqa: E402
import importlib.metadata  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from absl import app, flags  # noqa: E402
from jax.experimental import topologies  # noqa: E402
from timing import append_json, parse_overrides  # noqa: E402
from train import load_config  # noqa: E402

from ddpm_jax import checkpoints, models, sample_loop, samplers, train  # noqa: E402
from ddpm_jax import diffusion as diffusion_lib  # noqa: E402
from ddpm_jax import mesh as mesh_lib  # noqa: E402

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Slice:
  """A Cloud TPU slice as libtpu names its topology: `topology` (chips per axis),
  `chip_config` ('megacore': one JAX device per chip of two TensorCores), the chips of one host,
  and each device's HBM, HBM bandwidth and dense bfloat16 peak (Google's published figures;
  a chip's divided by its TensorCores where each core is a device)."""

  topology: str
  chip_config: str
  chips_per_host: tuple[int, int, int]
  hbm_bytes: int
  hbm_gbps: float
  peak_tflops: float

  def devices(self) -> list[jax.Device]:
    return topologies.get_topology_desc(
      topology_name=self.topology,
      platform='tpu',
      chip_config_name=self.chip_config,
      chips_per_host_bounds=list(self.chips_per_host),
      wrap=[False, False, False],
    ).devices


SLICES = {
  # The paper's TPU v3-8: 4 chips of 2 TensorCores, each core a JAX device of 16 GiB.
  'v3-8': Slice('v3:2x2', 'default', (2, 2, 1), 16 * GiB, 450, 61.5),
  'v4-8': Slice('v4:2x2x1', 'megacore', (2, 2, 1), 32 * GiB, 1200, 275),
  'v4-32': Slice('v4:2x2x4', 'megacore', (2, 2, 1), 32 * GiB, 1200, 275),
  'v5e-8': Slice('v5e:2x4', 'default', (2, 4, 1), 16 * GiB, 819, 197),
  'v5e-32': Slice('v5e:4x8', 'default', (2, 2, 1), 16 * GiB, 819, 197),
  'v5p-8': Slice('v5p:2x2x1', 'megacore', (2, 2, 1), 95 * GiB, 2765, 459),
  'v6e-8': Slice('v6e:2x4', 'default', (2, 4, 1), 32 * GiB, 1640, 918),
  # Ironwood: 4 chips of 2 TensorCores, each core a JAX device with half a chip's 192 GiB,
  # 7.37 TB/s and 2,307 bf16 TFLOP/s.
  'tpu7x-8': Slice('tpu7x:2x2x1', 'default', (2, 2, 1), 96 * GiB, 3685, 1153.5),
}


def _libtpu_version() -> str:
  try:
    return importlib.metadata.version('libtpu')
  except importlib.metadata.PackageNotFoundError:
    return 'not installed (pip install -r requirements-test.txt)'


# Recorded with every figure: the estimates are the compiler's of that release.
VERSIONS = {'jax': jax.__version__, 'libtpu': _libtpu_version()}
PROGRAMS = ('train_cifar10', 'train_256', 'max_batch_256', 'sample_cifar10')
REMAT = ('false', 'true')  # --remat: config.model.remat of the 256x256 programs
SAMPLE_IMAGES = 256
DPM_SOLVER_STEPS = 20


@dataclasses.dataclass
class Figures:
  """What XLA reports of one compiled program, per chip."""

  compile_s: float
  hbm_bytes: int  # arguments + outputs - aliased (donated) + temporaries + generated code.
  argument_bytes: int
  output_bytes: int
  temp_bytes: int
  flops: float | None
  bytes_accessed: float | None
  seconds: float | None  # XLA's 'optimal_seconds' of the program (one loop body), as reported.
  unestimated_ops: int = 0  # Its ops that libtpu's cost model does not know (UNESTIMATED_OPS).

  def estimate(self) -> float | None:
    """XLA's estimated seconds of the program, the ops it does not know left out; None where
    even then it is not positive."""
    if self.seconds is None or self.seconds + self.unestimated_ops <= 0:
      return None
    return self.seconds + self.unestimated_ops

  def roofline(self, slice_: Slice) -> tuple[float, float]:
    """(compute, memory) seconds: the FLOPs at the chip's peak, the bytes at its HBM bandwidth.
    The larger is a lower bound on the program's time, its reciprocal an upper bound on speed."""
    return (self.flops or 0) / (slice_.peak_tflops * 1e12), (self.bytes_accessed or 0) / (
      slice_.hbm_gbps * 1e9
    )


# The custom calls of a compiled TPU program that libtpu's cost model counts as -1 second each in
# 'optimal_seconds': ConcatBitcast, a concatenation along 128-aligned channels done by laying the
# operands side by side (the U-Net's skip connections from 128 channels up). The digits network at
# 32, 64 and 128 channels has 0, 2 and 18 of them and its optimal_seconds on a v5e-8 is
# 1.2e-4, -2 + 2.2e-4 and -18 + 5.6e-4 (tests/test_tpu_aot.py holds the identity).
UNESTIMATED_OPS = ('ConcatBitcast',)


def unestimated_ops(compiled_text: str) -> int:
  """How many custom calls of UNESTIMATED_OPS the compiled program's HLO text holds."""
  return sum(compiled_text.count(f'custom_call_target="{name}"') for name in UNESTIMATED_OPS)


def analyze(compiled: jax.stages.Compiled, compile_s: float) -> Figures:
  memory = compiled.memory_analysis()
  cost = compiled.cost_analysis() or {}
  return Figures(
    compile_s=compile_s,
    hbm_bytes=memory.argument_size_in_bytes
    + memory.output_size_in_bytes
    - memory.alias_size_in_bytes
    + memory.temp_size_in_bytes
    + memory.generated_code_size_in_bytes,
    argument_bytes=memory.argument_size_in_bytes,
    output_bytes=memory.output_size_in_bytes,
    temp_bytes=memory.temp_size_in_bytes,
    flops=cost.get('flops'),
    bytes_accessed=cost.get('bytes accessed'),
    seconds=cost.get('optimal_seconds'),
    unestimated_ops=unestimated_ops(compiled.as_text()),
  )


def compile_figures(lowered: jax.stages.Lowered) -> Figures:
  began = time.perf_counter()
  compiled = lowered.compile()
  return analyze(compiled, time.perf_counter() - began)


def train_setup(config_name: str, mesh, *, batch_size: int, **overrides):
  """(config, model, diffusion, tx, schedule, the state's shapes) of the config's training, as
  `train.train` builds them for the devices of `mesh`."""
  config = load_config(config_name, **{'training.batch_size': batch_size}, **overrides)
  model = models.create_model(config, mesh.devices.flat[0])
  diffusion = diffusion_lib.GaussianDiffusion.from_config(config.diffusion)
  tx, schedule = train.create_optimizer(config)
  init_fn = functools.partial(train.create_train_state, config, model, tx)
  abstract_state = jax.eval_shape(init_fn, train.root_rngs(config.seed)[0])
  return config, model, diffusion, tx, schedule, abstract_state


def lower_train(config_name: str, mesh, *, batch_size: int, **overrides) -> jax.stages.Lowered:
  """`train.jit_train_call` of the config, as `train.train` builds it, lowered for
  the abstract state and one call's batches [k, B, H, W, C]."""
  setup = train_setup(config_name, mesh, batch_size=batch_size, **overrides)
  config, model, diffusion, tx, schedule, abstract_state = setup
  state_sharding = train.state_sharding(abstract_state, mesh)
  train_call = train.jit_train_call(
    config, model, diffusion, tx, schedule, mesh, state_sharding, ema_starts_as_copy=True
  )
  size, channels = config.data.image_size, config.data.num_channels
  k = config.training.steps_per_call
  batches = {'image': jax.ShapeDtypeStruct((k, batch_size, size, size, channels), jnp.uint8)}
  return train_call.lower(abstract_state, batches, jax.ShapeDtypeStruct((), jnp.int32))


def lower_sampler(
  config_name: str, mesh, sampler: samplers.Sampler, num_images: int, **overrides
) -> jax.stages.Lowered:
  """`sample_loop.create_chunk_fn` of the config, lowered for `num_images` images: params
  replicated, x and the predicted x_0 sharded over the batch."""
  config = load_config(config_name, **overrides)
  model = models.create_model(config, mesh.devices.flat[0])
  diffusion = diffusion_lib.GaussianDiffusion.from_config(config.diffusion)
  size, channels = config.data.image_size, config.data.num_channels
  params = models.param_shapes(model, size, channels)
  replicated, batch = mesh_lib.replicated(mesh), mesh_lib.batch_sharded(mesh)
  params = checkpoints.abstract_like(params, replicated)
  x = jax.ShapeDtypeStruct((num_images, size, size, channels), jnp.float32, sharding=batch)
  loop_rng = checkpoints.abstract_like(jax.eval_shape(jax.random.key, 0), replicated)
  step = jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated)
  run_chunk = sample_loop.create_chunk_fn(diffusion, model, mesh, sampler)
  return run_chunk.lower(params, x, x, loop_rng, step, step)


def compile_for(lower: Callable[[], jax.stages.Lowered]) -> Figures | None:
  """The figures of the program that `lower()` lowers, or None where the TPU compiler stops
  because it does not fit HBM."""
  try:
    return compile_figures(lower())
  except Exception as e:  # The compiler's out-of-memory error is a JaxRuntimeError.
    if 'RESOURCE_EXHAUSTED' in str(e) or 'Ran out of memory' in str(e):
      return None
    raise


def fits(slice_: Slice, figures: Figures | None) -> bool:
  return figures is not None and figures.hbm_bytes <= slice_.hbm_bytes


def largest_batch(
  slice_: Slice,
  num_devices: int,
  figures_at: Callable[[int], Figures | None],
  max_compiles: int,
) -> tuple[int, int | None] | None:
  """(fits, does_not) global batches, multiples of the device count, that bracket the largest one
  whose program fits HBM: exact where does_not = fits + num_devices, wider where the search
  stopped at `max_compiles` compiles, does_not None where none of them failed to fit.

  The memory of 4 and 8 images per device gives a line (where the smaller batch takes more,
  as XLA may lay it out otherwise, the temporaries of 8 are taken to grow in proportion); its
  prediction is compiled, then one image a device more (or less, where it did not fit); a bracket
  wider than that is halved, and while everything fits the batch grows by a quarter.
  `figures_at(batch)` compiles (or recalls) the program of a global batch: None where the
  compiler ran out of HBM.
  """
  compiled: dict[int, Figures | None] = {}

  def try_batch(per_device: int) -> Figures | None:
    """The figures of per_device * num_devices images where they fit, else None."""
    if per_device not in compiled:
      figures = figures_at(per_device * num_devices)
      compiled[per_device] = figures if fits(slice_, figures) else None
    return compiled[per_device]

  small = try_batch(4)
  if small is None:
    return None
  large = try_batch(8)
  if large is None:
    lo, hi, predicted = 4, 8, None
  else:
    lo, hi = 8, None
    per_image = (large.hbm_bytes - small.hbm_bytes) / 4
    if per_image <= 0:  # XLA laid the smaller batch out worse: the temporaries of 8 scale.
      per_image = large.temp_bytes / 8
    predicted = max(9, int(8 + (slice_.hbm_bytes - large.hbm_bytes) / per_image))
  candidate = predicted or 6
  while len(compiled) < max_compiles and (hi is None or hi - lo > 1):
    if try_batch(candidate) is None:
      hi = candidate
    else:
      lo = candidate
    if hi is None:  # All fit so far: one more image a device, then a quarter more.
      candidate = lo + 1 if lo == predicted else lo + max(1, lo // 4)
    elif hi == predicted and lo < hi - 1:  # The prediction did not fit: one less.
      candidate = hi - 1
    else:
      candidate = (lo + hi) // 2
  return lo * num_devices, None if hi is None else hi * num_devices


def record_key(program: str, settings: dict) -> tuple:
  return program, tuple(sorted((k, str(v)) for k, v in settings.items()))


def recorded_figures(path: str | None, slice_name: str) -> dict[tuple, Figures | None]:
  """{record_key: figures} of the programs that `path` (--json_out) records for the slice with
  this jax and libtpu (JAX's compilation cache cannot load a compile-only program back); None
  for one that ran the compiler out of HBM."""
  if not path or not os.path.exists(path):
    return {}
  fields = [field.name for field in dataclasses.fields(Figures)]
  context = {'slice', 'device_kind', 'num_devices', 'hosts', 'program', 'fits', 'hbm_capacity'}
  context |= {'peak_tflops', 'hbm_gbps', 'work', 'unit', *VERSIONS, *fields}
  figures = {}
  with open(path) as f:
    for record in map(json.loads, f):
      complete = all(k in record for k in fields)
      out_of_hbm = 'fits' in record and not complete  # `report` records no figures then.
      same = record['slice'] == slice_name and (complete or out_of_hbm)
      if same and all(record.get(k) == v for k, v in VERSIONS.items()):
        settings = {k: v for k, v in record.items() if k not in context}
        key = record_key(record['program'], settings)
        figures[key] = Figures(**{k: record[k] for k in fields}) if complete else None
  return figures


def describe(slice_: Slice, figures: Figures | None, rate_unit: str, work: float):
  """One line of figures; `work` is the units (steps, images) that one estimated program does."""
  if figures is None:
    return f'the compiler ran out of HBM ({slice_.hbm_bytes / GiB:.0f} GiB per chip)'
  text = '' if fits(slice_, figures) else 'DOES NOT FIT: '
  text += (
    f'compile {figures.compile_s:.0f} s; HBM per chip {figures.hbm_bytes / GiB:.2f} GiB of '
    f'{slice_.hbm_bytes / GiB:.0f} (arguments {figures.argument_bytes / GiB:.2f}, outputs '
    f'{figures.output_bytes / GiB:.2f}, temporaries {figures.temp_bytes / GiB:.2f})'
  )
  if figures.flops is not None:
    text += f'; {figures.flops / 1e9:.1f} GFLOP and {(figures.bytes_accessed or 0) / 1e9:.2f} GB'
  compute, memory = figures.roofline(slice_)
  bound = max(compute, memory)
  text += (
    f'; roofline {bound * 1e3:.2f} ms ({"memory" if memory > compute else "compute"}-bound: '
    f'FLOPs at peak {compute * 1e3:.2f} ms, bytes at {slice_.hbm_gbps:g} GB/s '
    f'{memory * 1e3:.2f} ms) -> at most {work / bound:,.1f} {rate_unit}/s'
  )
  estimate = figures.estimate()
  if estimate is None:
    text += f"; XLA's estimate: {figures.seconds} (unusable)"
  else:
    if figures.unestimated_ops:
      text += f'; {figures.unestimated_ops} ops XLA does not estimate ({figures.seconds:.6g} s)'

    tflops = (figures.flops or 0) / estimate / 1e12
    text += (
      f"; XLA's estimate {estimate * 1e3:.2f} ms -> {work / estimate:,.1f} {rate_unit}/s, "
      f'{tflops:.0f} TFLOP/s = {100 * tflops / slice_.peak_tflops:.0f}% of '
      f'{slice_.peak_tflops:g}'
    )
  return text


def compile_slice(slice_name: str, FLAGS) -> None:
  """Compiles the programs of --programs for one slice, printing and recording each."""
  slice_ = SLICES[slice_name]
  devices = slice_.devices()
  mesh = mesh_lib.create_mesh(devices)
  num_devices, hosts = len(devices), len({d.process_index for d in devices})
  where = f'{slice_name} ({devices[0].device_kind}, {num_devices} devices, {hosts} hosts)'
  extra = parse_overrides(FLAGS.overrides)

  recorded = recorded_figures(FLAGS.json_out, slice_name) if FLAGS.reuse else {}

  def report(program: str, settings: dict, lower: Callable, unit: str, work: float):
    """Compiles the program that `lower()` lowers (or recalls its recorded figures), prints its
    line and records it; returns its figures."""
    settings = settings | extra
    label = ' '.join(f'{k}={v}' for k, v in settings.items())
    key = record_key(program, settings)
    if key in recorded:
      figures = recorded[key]
      print(f'{where} {program} {label} (recorded): {describe(slice_, figures, unit, work)}')
      return figures
    figures = compile_for(lower)
    print(f'{where} {program} {label}: {describe(slice_, figures, unit, work)}', flush=True)
    record = {'slice': slice_name, 'device_kind': devices[0].device_kind, **VERSIONS}
    record |= {'num_devices': num_devices, 'hosts': hosts, 'program': program, **settings}
    record |= {'fits': fits(slice_, figures), 'hbm_capacity': slice_.hbm_bytes}
    record |= {'peak_tflops': slice_.peak_tflops, 'hbm_gbps': slice_.hbm_gbps}
    record |= {'work': work, 'unit': unit}
    append_json(FLAGS.json_out, record | (dataclasses.asdict(figures) if figures else {}))
    return figures

  if 'train_cifar10' in FLAGS.programs:
    for dtype in FLAGS.dtype:
      for k in map(int, FLAGS.steps_per_call):
        overrides = {'model.dtype': dtype, 'training.steps_per_call': k} | extra
        lower = functools.partial(lower_train, 'cifar10', mesh, batch_size=128, **overrides)
        settings = {'batch_size': 128, 'dtype': dtype, 'steps_per_call': k}
        report('train_cifar10', settings, lower, 'steps', 1)
  float32 = {'model.dtype': 'float32'} | extra
  for remat in (value == 'true' for value in FLAGS.remat):
    overrides = {'model.remat': remat, 'training.steps_per_call': 1} | float32
    lower_256 = functools.partial(lower_train, 'celebahq256', mesh, **overrides)
    if 'train_256' in FLAGS.programs:
      lower = functools.partial(lower_256, batch_size=64)
      report('train_256', {'batch_size': 64, 'remat': remat}, lower, 'steps', 1)
    if 'max_batch_256' in FLAGS.programs:

      def figures_at(batch, lower_256=lower_256, remat=remat):
        lower = functools.partial(lower_256, batch_size=batch)
        return report('train_256', {'batch_size': batch, 'remat': remat}, lower, 'steps', 1)

      found = largest_batch(slice_, num_devices, figures_at, FLAGS.max_batch_compiles)
      print(f'{where} largest batch of train_256 remat={remat} (fits, does not): {found}')
      record = {'slice': slice_name, 'program': 'max_batch_256', 'remat': remat, 'found': found}
      append_json(FLAGS.json_out, record | VERSIONS)
  if 'sample_cifar10' in FLAGS.programs:
    for sampler in (samplers.Ancestral(), samplers.DPMSolver(DPM_SOLVER_STEPS)):
      lower = functools.partial(lower_sampler, 'cifar10', mesh, sampler, SAMPLE_IMAGES, **float32)
      settings = {'sampler': sampler.tag, 'num_images': SAMPLE_IMAGES}
      # One compiled step does 1 / steps of each image.
      work = SAMPLE_IMAGES / sampler.num_steps(1000)
      report('sample_cifar10', settings, lower, 'images', work)


def main(argv):
  del argv
  FLAGS = flags.FLAGS
  for name, choices in (('topologies', SLICES), ('programs', PROGRAMS), ('remat', REMAT)):
    unknown = sorted(set(FLAGS[name].value) - set(choices))
    if unknown:
      raise app.UsageError(f'--{name}: unknown {unknown}; choose from {", ".join(choices)}')
  print('jax', VERSIONS['jax'], 'libtpu', VERSIONS['libtpu'], flush=True)
  for slice_name in FLAGS.topologies:
    compile_slice(slice_name, FLAGS)


if __name__ == '__main__':
  flags.DEFINE_list('topologies', ['v4-8', 'v5e-8', 'v5p-8', 'v6e-8', 'v5e-32'], ', '.join(SLICES))
  flags.DEFINE_list('programs', list(PROGRAMS), ', '.join(PROGRAMS))
  flags.DEFINE_list('dtype', ['float32', 'bfloat16'], 'config.model.dtype of train_cifar10.')
  flags.DEFINE_list(
    'steps_per_call', ['1', '8'], 'config.training.steps_per_call of train_cifar10.'
  )
  flags.DEFINE_integer('max_batch_compiles', 6, 'Compiles of max_batch_256 per remat mode at most.')
  flags.DEFINE_bool(
    'reuse',
    False,
    'Print, not compile again, the programs --json_out already records for the slice with this '
    'jax and libtpu (the same settings and --overrides).',
  )
  flags.DEFINE_list('remat', list(REMAT), 'config.model.remat of train_256, max_batch_256.')
  flags.DEFINE_multi_string(
    'overrides',
    [],
    'A config override of every program, section.field=value, e.g. model.ch_mult=(1,2); '
    'repeatable (to see what in a program decides whether XLA estimates its time).',
  )
  flags.DEFINE_string('json_out', None, 'Append each figure as a JSON line to this file.')
  app.run(main)

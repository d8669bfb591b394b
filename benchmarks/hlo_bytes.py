"""Where a compiled program's bytes go: XLA's bytes accessed of one train step or sampler step,
broken down by what moves them, read from the optimized HLO.

  python benchmarks/hlo_bytes.py --topology=v5e-8 --programs=train_call,sampler --hlo_dir=/tmp/hlo

Each program computes in its platform's dtype (`models.compute_dtype`: bfloat16 on a TPU, float32
on the CPU) unless an override names one, e.g. --overrides=model.dtype=float32.

Programs (--programs), those of benchmarks/tpu_aot.py:
  train_call  the CIFAR10 train call as the training loop compiles it (`train.jit_train_call`,
              batch 128, one step per call): a `fori_loop` whose body is one step;
  train_step  the same step compiled alone as one top-level `jax.jit` (state donated);
  sampler     the ancestral sampler chunk for 256 CIFAR10 images (its loop body: one step).

--topology is a slice of tpu_aot.SLICES or 'cpu' (this host's CPU devices). Each top-level
instruction of the program (a fusion, a convolution, a copy, a collective; those of the entry
computation and of every loop body, once, as XLA's cost analysis counts a loop body) moves its
operands' and its output's bytes, padded to their layout's tiles (`moved_bytes` has the rules of
the asynchronous copies); it is put in a category by its opcode, its fused computation's opcodes
and its JAX name stack (the HLO metadata's op_name: Flax module path, forward `jvp(...)` or
backward `transpose(jvp(...))`). The sum is printed beside XLA's own 'bytes accessed' (within 1%
on the v5e-8 and v5p-8 CIFAR10 programs, 2% on the CPU's), with the part of it in HBM: XLA counts
the traffic of the chip's on-chip memory (S(1)) too. --hlo_dir keeps each compiled program's
text, and --reuse reads it back instead of compiling again (a CIFAR10 train call takes minutes to
compile for a TPU on a 2-core host). --xla_options passes compiler options, e.g.
--xla_options=xla_vf_vmem_memory_space_assignment=False compiles a v5e or v5p program without
memory-space assignment (BENCHMARKS.md, "Memory-space assignment off"). XLA's estimate is printed
less the -1 s it counts for each op it does not estimate (`tpu_aot.UNESTIMATED_OPS`).
"""

from __future__ import annotations

import collections
import json
import math
import os
import re

# First: it sets the environment that JAX reads when it is imported (see there).
import tpu_aot

# isort: split
import jax
import jax.numpy as jnp
from absl import app, flags
from timing import append_json, parse_overrides

from ddpm_jax import mesh as mesh_lib
from ddpm_jax import samplers, train

PROGRAMS = ('train_call', 'train_step', 'sampler')
BATCH_SIZE = 128

DTYPE_BYTES = {
  'pred': 1, 's8': 1, 'u8': 1, 's16': 2, 'u16': 2, 'bf16': 2, 'f16': 2, 's32': 4, 'u32': 4,
  'f32': 4, 's64': 8, 'u64': 8, 'f64': 8, 'c64': 8,
}  # fmt: skip
# A shape in HLO text, with its layout: bf16[16,32,32,128]{3,0,2,1:T(8,128)(2,1)} is stored in
# tiles of 8 x 128 over its two minor-most dimensions (C, then B), padded up to whole tiles.
SHAPE = re.compile(r'\b(pred|[suf]\d+|bf16|c64)\[([\d,]*)\](\{[^}]*\})?')
INSTRUCTION = re.compile(r'^\s*(ROOT )?%(\S+) = (.*?) ([\w-]+)\((.*)$')
COMPUTATION = re.compile(r'^(ENTRY )?%(\S+) ')
COLLECTIVES = ('all-reduce', 'all-gather', 'reduce-scatter', 'collective-permute', 'all-to-all')
LAYOUT = ('copy', 'copy-start', 'copy-done', 'slice-start', 'slice-done', 'transpose',
          'optimization_barrier', 'reshape')  # fmt: skip
# Instructions that move nothing (they name or alias a buffer) or that only steer control.
FREE = {
  'parameter', 'get-tuple-element', 'tuple', 'bitcast', 'constant', 'after-all', 'while',
  'conditional', 'call', 'partition-id', 'replica-id', 'opt-barrier', 'add-dependency',
  'all-reduce-done', 'all-gather-done', 'collective-permute-done', 'send-done',
  'recv-done',
}  # fmt: skip


def shape_bytes(text: str, hbm_only: bool = False) -> int:
  """The bytes of every array shape written in `text` (a tuple's elements summed), each padded
  to whole tiles of its layout (TPU), as it lies in memory; with `hbm_only`, of those in the
  default memory space only (HBM: no S(n) in the layout; S(1) is the chip's on-chip memory)."""
  total = 0
  for dtype, dims, layout in SHAPE.findall(text):
    if hbm_only and 'S(' in layout:
      continue
    dims = [int(d) for d in dims.split(',') if d] or [1]
    tile = re.search(r':T\(([\d,]+)\)', layout)
    if tile:
      minor_to_major = [int(d) for d in layout[1:].split(':')[0].split(',') if d] or [0]
      # A tile has as many sizes as the dimensions it covers, the minor-most last.
      for size, dim in zip(reversed(tile.group(1).split(',')), minor_to_major, strict=False):
        dims[dim] = -(-dims[dim] // int(size)) * int(size)
    total += DTYPE_BYTES[dtype] * math.prod(dims)
  return total


def moved_bytes(opcode: str, shape: str, operand_shapes: str, rest: str) -> tuple[int, int]:
  """(bytes, HBM bytes) that one instruction moves: its operands and its output, as XLA's cost
  analysis counts them, and of those the ones in HBM.

  Memory-space assignment (MSA) moves buffers between HBM and S(1) (on-chip memory) with
  asynchronous copies, which the cost analysis counts like any instruction (matched here to its
  totals within 3% on v5e and v5p programs): copy-start its operand and its output (source,
  destination), copy-done its output; slice-start (a slice of the operand prefetched) the slice
  read and written, slice-done its output; 'ConcatBitcast' (slices laid side by side) nothing.
  HBM sees the read of a prefetch and the write of an eviction once."""
  if 'custom_call_target="ConcatBitcast"' in rest:
    return 0, 0
  if opcode in ('copy-done', 'slice-done'):  # Its operand is the start's output, counted there.
    return shape_bytes(shape), shape_bytes(shape, hbm_only=True)
  if opcode == 'copy-start':
    return shape_bytes(shape) + shape_bytes(operand_shapes), shape_bytes(operand_shapes, True)
  if opcode == 'slice-start':  # ((operand), slice, context)
    piece = shape_bytes([m.group(0) for m in SHAPE.finditer(shape)][1])
    return 2 * piece, piece if shape_bytes(operand_shapes, hbm_only=True) else 0
  both = shape + ' ' + operand_shapes
  return shape_bytes(both), shape_bytes(both, hbm_only=True)


def category(opcode: str, op_name: str, calls: str) -> str:
  """What an instruction does, from its opcode, its fused computation's opcodes (`calls`) and
  JAX's name stack (`op_name`, e.g. 'jit(train_call)/while/body/transpose(jvp(UNet))/down_1/
  block_0/norm2/reduce_sum'). A fusion is named by its root's name stack."""
  if opcode.startswith(COLLECTIVES):
    return 'collectives (gradients summed, params gathered)'
  last = op_name.rsplit('/', 1)[-1]
  if opcode in LAYOUT or last in LAYOUT:
    return 'copies and layout changes'
  if 'UNet' not in op_name:
    scopes = op_name.split('/')
    for scope, name in (('optimizer', 'Adam update'), ('ema', 'EMA'), ('loss', 'loss')):
      if scope in scopes:
        return name
    if re.search(r'random|threefry|_normal|randint|bernoulli', op_name):
      return 'random numbers (t, noise, flips)'
    return 'other'
  direction = ' backward' if 'transpose(' in op_name else ' forward'
  module = op_name.split('UNet', 1)[1]
  if '/attn' in module:
    return 'attention' + direction
  if 'Dropout' in module:
    return 'dropout (random bits, mask)' + direction
  if 'convolution' in calls or opcode == 'convolution':
    return 'convolutions' + direction
  if re.search(r'/norm(\d|_out)?/', module):
    return 'GroupNorm' + direction
  if 'silu' in module:
    return 'swish' + direction
  if last in ('concatenate', 'split'):
    return 'skip connections (concatenate, split)'
  if 'dot' in calls or opcode == 'dot':
    return 'dense layers (temb, 1x1 shortcuts)' + direction
  return 'other U-Net ops' + direction


def parse(text: str) -> list[dict]:
  """The instructions of an optimized HLO module that move bytes: those of the entry computation
  and of every computation it runs by control flow (loop bodies and conditions, branches,
  calls), each with its opcode, bytes (operands + output) and category. Fused computations are
  read only for the opcodes they contain."""
  computations: dict[str, list[tuple]] = {}
  entry = None
  current = None
  for line in text.splitlines():
    if not line.startswith(' ') and line.rstrip().endswith('{'):
      match = COMPUTATION.match(line)
      if match:
        current = match.group(2)
        computations[current] = []
        if match.group(1):
          entry = current
        continue
    match = INSTRUCTION.match(line)
    if match and current is not None:
      computations[current].append(match.groups()[1:])
  shapes = {name: shape for body in computations.values() for name, shape, *_ in body}
  opcodes = {
    name: ' '.join(op for _, _, op, _ in body) for name, body in computations.items()
  }  # A fused computation's opcodes, by name.
  sliced = {name: sliced_parameters(body) for name, body in computations.items()}

  def control_targets(rest: str) -> list[str]:
    keys = 'body|condition|to_apply|true_computation|false_computation'
    found = re.findall(rf'\b(?:{keys})=%([\w.-]+)', rest)
    branches = re.search(r'branch_computations=\{([^}]*)\}', rest)
    if branches:
      found += [b.strip().lstrip('%') for b in branches.group(1).split(',')]
    return found

  instructions, seen, pending = [], set(), [entry]
  while pending:
    name = pending.pop()
    if name in seen or name not in computations:
      continue
    seen.add(name)
    for inst_name, shape, opcode, rest in computations[name]:
      if opcode in ('while', 'conditional', 'call'):
        pending += control_targets(rest)
      if opcode in FREE:
        continue
      operands = operand_names(rest)
      calls = re.search(r'\bcalls=%([\w.-]+)', rest)
      called = opcodes.get(calls.group(1), '') if calls else ''
      op_name = re.search(r'op_name="([^"]*)"', rest)
      op_name = op_name.group(1) if op_name else ''
      operand_shapes = ' '.join(shapes.get(o, '') for o in operands)
      moved, hbm = moved_bytes(opcode, shape, operand_shapes, rest)
      # A fusion reads of an operand that it only slices the slices (as the cost analysis).
      for i, part in sliced.get(calls.group(1), {}).items() if calls else ():
        whole = shapes.get(operands[i], '')
        moved -= shape_bytes(whole) - part
        hbm -= shape_bytes(whole, hbm_only=True) - (part if shape_bytes(whole, True) else 0)
      instructions.append(
        {
          'name': inst_name,
          'opcode': opcode,
          'bytes': moved,
          'hbm_bytes': hbm,
          'category': category(opcode, op_name, called),
          'op_name': op_name,
        }
      )
  return instructions


def operand_names(rest: str) -> list[str]:
  """The operands of an instruction, from the text after its opcode's '('."""
  arguments = rest.split('),')[0] if '),' in rest else rest.rsplit(')', 1)[0]
  return re.findall(r'%([\w.-]+)', arguments)


def sliced_parameters(body: list[tuple]) -> dict[int, int]:
  """{i: bytes} of the parameters of a (fused) computation that it reads only through slices
  (`slice`, `dynamic-slice`), i by its parameter number, bytes those of the slices."""
  users = collections.defaultdict(list)
  for _, shape, opcode, rest in body:
    for position, operand in enumerate(operand_names(rest)):
      users[operand].append((opcode, position, shape))
  sliced = {}
  for name, _, opcode, rest in body:
    uses = users.get(name)
    if opcode == 'parameter' and uses:
      if all(op in ('slice', 'dynamic-slice') and position == 0 for op, position, _ in uses):
        sliced[int(re.match(r'\d+', rest).group(0))] = sum(shape_bytes(s) for *_, s in uses)
  return sliced


def breakdown(instructions: list[dict]) -> dict[str, tuple[int, int, int]]:
  """{category: (bytes, HBM bytes, instructions)}, largest first."""
  totals = collections.defaultdict(lambda: [0, 0, 0])
  for inst in instructions:
    totals[inst['category']][0] += inst['bytes']
    totals[inst['category']][1] += inst['hbm_bytes']
    totals[inst['category']][2] += 1
  return dict(sorted(((k, tuple(v)) for k, v in totals.items()), key=lambda kv: -kv[1][0]))


def lower_train_step(config_name: str, mesh, *, batch_size: int, **overrides):
  """The train step of `train.create_train_step`, alone as one top-level jit: the state sharded
  as the training loop's (`train.state_sharding`) and donated, the batch sharded."""
  setup = tpu_aot.train_setup(config_name, mesh, batch_size=batch_size, **overrides)
  config, model, diffusion, tx, schedule, state = setup
  sharding = train.state_sharding(state, mesh)
  step = train.create_train_step(
    config, model, diffusion, tx, schedule, ema_starts_as_copy=True, sharding=sharding
  )
  jitted = jax.jit(
    step,
    in_shardings=(sharding, mesh_lib.batch_sharded(mesh)),
    out_shardings=(sharding, mesh_lib.replicated(mesh)),
    donate_argnums=0,
  )
  size, channels = config.data.image_size, config.data.num_channels
  batch = {'image': jax.ShapeDtypeStruct((batch_size, size, size, channels), jnp.uint8)}
  return jitted.lower(state, batch)


def lower(program: str, mesh, overrides: dict):
  if program == 'train_call':
    return tpu_aot.lower_train(
      'cifar10', mesh, batch_size=BATCH_SIZE, **{'training.steps_per_call': 1}, **overrides
    )
  if program == 'train_step':
    return lower_train_step('cifar10', mesh, batch_size=BATCH_SIZE, **overrides)
  return tpu_aot.lower_sampler(
    'cifar10', mesh, samplers.Ancestral(), tpu_aot.SAMPLE_IMAGES, **overrides
  )


def main(argv):
  del argv
  FLAGS = flags.FLAGS
  overrides = parse_overrides(FLAGS.overrides)
  xla_options = parse_overrides(FLAGS.xla_options)
  if FLAGS.topology == 'cpu':
    devices, slice_ = jax.devices('cpu'), None
  else:
    slice_ = tpu_aot.SLICES[FLAGS.topology]
    devices = slice_.devices()
  mesh = mesh_lib.create_mesh(devices)
  suffix = '_'.join(f'{k}={v}' for k, v in sorted((overrides | xla_options).items()))
  print('jax', tpu_aot.VERSIONS['jax'], 'libtpu', tpu_aot.VERSIONS['libtpu'], flush=True)
  for program in FLAGS.programs:
    tag = f'{FLAGS.topology}_{program}' + (f'_{suffix}' if suffix else '')
    path = os.path.join(FLAGS.hlo_dir, tag + '.hlo') if FLAGS.hlo_dir else None
    if FLAGS.reuse and path and os.path.exists(path):
      with open(path) as f:
        text = f.read()
      with open(path + '.json') as f:
        cost = json.load(f)
    else:
      compiled = lower(program, mesh, overrides).compile(compiler_options=xla_options)
      text, raw = compiled.as_text(), compiled.cost_analysis() or {}
      cost = {k: raw[k] for k in ('flops', 'bytes accessed', 'optimal_seconds') if k in raw}
      if path:
        os.makedirs(FLAGS.hlo_dir, exist_ok=True)
        with open(path, 'w') as f:
          f.write(text)
        with open(path + '.json', 'w') as f:
          json.dump(cost, f)
    instructions = parse(text)
    total = sum(i['bytes'] for i in instructions)
    hbm = sum(i['hbm_bytes'] for i in instructions)
    xla = cost.get('bytes accessed', float('nan'))
    # XLA's estimate, less the -1 s it counts for each op it does not estimate (tpu_aot).
    estimate = cost.get('optimal_seconds', float('nan')) + tpu_aot.unestimated_ops(text)
    print(
      f'\n{tag}: XLA bytes accessed {xla / 1e9:.3f} GB, GFLOP {cost.get("flops", 0) / 1e9:.1f}, '
      f'estimate {estimate * 1e3:.2f} ms; '
      f'summed here over {len(instructions)} instructions {total / 1e9:.3f} GB, of which in HBM '
      f'{hbm / 1e9:.3f} GB'
    )
    parts = breakdown(instructions)
    print(f'  {"":40s} {"bytes":>8s} {"share":>6s} {"in HBM":>8s}')
    for name, (moved, in_hbm, count) in parts.items():
      print(
        f'  {name:40s} {moved / 1e9:8.3f} {100 * moved / total:5.1f}% {in_hbm / 1e9:8.3f}  '
        f'({count} instructions)'
      )
    if FLAGS.top:
      print('  largest instructions:')
      for inst in sorted(instructions, key=lambda i: -i['bytes'])[: FLAGS.top]:
        print(
          f'    {inst["bytes"] / 1e6:8.1f} MB {inst["opcode"]:12s} {inst["name"]:30s} '
          f'{inst["op_name"][-90:]}'
        )
    record = {'topology': FLAGS.topology, 'program': program, **overrides, **xla_options, **cost}
    record |= {'bytes_summed': total, 'hbm_bytes_summed': hbm}
    record |= {'breakdown': {k: v[:2] for k, v in parts.items()}}
    record |= tpu_aot.VERSIONS
    append_json(FLAGS.json_out, record)


if __name__ == '__main__':
  flags.DEFINE_string('topology', 'v5e-8', f'cpu or one of {", ".join(tpu_aot.SLICES)}')
  flags.DEFINE_list('programs', list(PROGRAMS), ', '.join(PROGRAMS))
  flags.DEFINE_multi_string('overrides', [], 'A config override, section.field=value.')
  flags.DEFINE_multi_string(
    'xla_options',
    [],
    'A compiler option, name=value, e.g. xla_vf_vmem_memory_space_assignment=False.',
  )
  flags.DEFINE_string('hlo_dir', None, 'Keep each compiled program as HLO text here.')
  flags.DEFINE_bool('reuse', False, 'Read the programs --hlo_dir keeps instead of compiling.')
  flags.DEFINE_integer('top', 0, 'Also list the N instructions that move the most bytes.')
  flags.DEFINE_string('json_out', None, 'Append each breakdown as a JSON line to this file.')
  app.run(main)

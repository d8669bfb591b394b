"""BENCHMARKS.md's TPU table from the JSON lines of benchmarks/tpu_aot.py, and what changed between
two libtpu releases' figures of the same programs.

  python benchmarks/tpu_table.py benchmarks/results/tpu_aot.jsonl \\
      --compare=benchmarks/results/tpu_aot_libtpu0.0.42.1.jsonl

XLA's estimate is `optimal_seconds` with the -1 s that libtpu counts for each op its cost model
does not know added back (tpu_aot.UNESTIMATED_OPS). Records written before tpu_aot counted those
ops have no count; there it is read off the reported seconds, the whole seconds below zero
(marked *), which is the count wherever both are known.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys

import tpu_aot
from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string(
  'compare', None, "Another release's JSON lines: the same programs side by side."
)

KEY_FIELDS = ('slice', 'program', 'dtype', 'steps_per_call', 'sampler', 'batch_size', 'remat')


def load(path: str) -> list[dict]:
  """The records of a JSON lines file, the last of each program (`key`) where one was compiled
  again."""
  with open(path) as f:
    records = [json.loads(line) for line in f if line.strip()]
  return list({key(record): record for record in records}.values())


def key(record: dict) -> tuple:
  return tuple(record.get(field) for field in KEY_FIELDS)


def figures(record: dict) -> tuple[tpu_aot.Figures, str]:
  """The record's tpu_aot.Figures, and '*' where the count of unestimated ops is read off the
  seconds (a record written before tpu_aot counted them)."""
  fields = {f.name: record[f.name] for f in dataclasses.fields(tpu_aot.Figures) if f.name in record}
  seconds = record.get('seconds')
  if 'unestimated_ops' in record or seconds is None or seconds >= 0:
    return tpu_aot.Figures(**fields), ''
  return tpu_aot.Figures(**fields | {'unestimated_ops': math.ceil(-seconds)}), '*'


def estimate(record: dict) -> tuple[float | None, str]:
  """(XLA's estimated seconds with the unestimated ops left out, None where it has none; '*' where
  their count is read off the seconds)."""
  record_figures, mark = figures(record)
  return record_figures.estimate(), mark


def order(record: dict) -> tuple:
  """Rows by slice (tpu_aot.SLICES), then program (tpu_aot.PROGRAMS), then their settings."""
  return (
    list(tpu_aot.SLICES).index(record['slice']),
    tpu_aot.PROGRAMS.index(record['program']),
    record.get('dtype') != 'float32',
    bool(record.get('remat')),
    record.get('batch_size') or 0,
    record.get('sampler') or '',
  )


def program_name(record: dict) -> str:
  if record['program'] == 'train_cifar10':
    calls = '' if record['steps_per_call'] == 1 else f', {record["steps_per_call"]} steps per call'
    return f'CIFAR10 train, batch {record["batch_size"]}, {record["dtype"]}{calls}'
  if record['program'] == 'train_256':
    remat = ', remat' if record['remat'] else ''
    return f'256x256 train, batch {record["batch_size"]}, f32{remat}'
  return f'sampler chunk, {record["num_images"]} CIFAR10 images, {record["sampler"]}'


def row(record: dict) -> str:
  where = f'{record["slice"]} ({record["num_devices"]}, {record["hosts"]})'
  if 'hbm_bytes' not in record:
    return f'| {where} | {program_name(record)} | does not fit: out of HBM | | | | | |'
  gib = 2**30
  hbm = f'{record["hbm_bytes"] / gib:.2f} of {record["hbm_capacity"] / gib:.0f} GiB'
  if not record['fits']:
    hbm = f'**does not fit**: {hbm}'
  compute, memory = figures(record)[0].roofline(tpu_aot.SLICES[record['slice']])
  bound = max(compute, memory)
  unit = record['unit']
  seconds, mark = estimate(record)
  if seconds is None:
    xla = f'{record["seconds"]:.4g} (unusable)'
  else:
    share = record['flops'] / seconds / 1e12 / record['peak_tflops']
    xla = (
      f'{seconds * 1e3:.2f} ms{mark}: {record["work"] / seconds:,.1f} {unit}/s, '
      f'{100 * share:.0f}% of peak; {seconds / bound:.2f}x the roofline'
    )
  return (
    f'| {where} | {program_name(record)} | {hbm} | {record["flops"] / 1e9:,.1f}, '
    f'{record["bytes_accessed"] / 1e9:.2f} | {compute * 1e3:.2f} / {memory * 1e3:.2f} ms | '
    f'{record["work"] / bound:,.1f} {unit}/s | {xla} | {record["compile_s"]:.0f} s |'
  )


def table(records: list[dict]) -> list[str]:
  lines = [
    '| slice (devices, hosts) | program | HBM per device | GFLOP, GB per device | roofline: '
    "FLOPs at peak / bytes at HBM bandwidth | hence at most | XLA's estimate | compile |",
    '|---|---|---|---|---|---|---|---|',
  ]
  searches = []
  for record in sorted(records, key=order):
    if record['program'] == 'max_batch_256':
      searches.append(record)
    else:
      lines.append(row(record))
  for record in searches:
    fits, does_not = record['found'] or (None, None)
    remat = 'with' if record['remat'] else 'without'
    lines.append(
      f'\nLargest 256x256 batch {remat} remat on {record["slice"]}: fits {fits}, '
      f'does not fit {does_not if does_not else "(not found in the compiles allowed)"}.'
    )
  return lines


def comparison(new: list[dict], old: list[dict]) -> list[str]:
  old_by_key = {key(r): r for r in old if 'hbm_bytes' in r}
  releases = (old[0].get('libtpu', os.path.basename(FLAGS.compare)), new[0].get('libtpu', 'new'))
  lines = [
    f"| program | GFLOP | GB accessed | HBM per device, GiB | XLA's estimate, ms "
    f'| libtpu {releases[0]} -> {releases[1]} |',
    '|---|---|---|---|---|---|',
  ]
  for record in sorted(new, key=order):
    before = old_by_key.get(key(record))
    if before is None or 'hbm_bytes' not in record:
      continue
    estimates = [estimate(r) for r in (before, record)]
    shown = [f'{s * 1e3:.2f}{mark}' if s else '-' for s, mark in estimates]
    lines.append(
      f'| {record["slice"]} {program_name(record)} | {before["flops"] / 1e9:,.1f} -> '
      f'{record["flops"] / 1e9:,.1f} | {before["bytes_accessed"] / 1e9:.2f} -> '
      f'{record["bytes_accessed"] / 1e9:.2f} | {before["hbm_bytes"] / 2**30:.2f} -> '
      f'{record["hbm_bytes"] / 2**30:.2f} | {shown[0]} -> {shown[1]} | '
      f'raw {before["seconds"]:.4g} -> {record["seconds"]:.4g} |'
    )
  return lines


def main(argv):
  if len(argv) != 2:
    raise app.UsageError('one JSON lines file of benchmarks/tpu_aot.py')
  records = load(argv[1])
  print('\n'.join(table(records)))
  if FLAGS.compare:
    print()
    print('\n'.join(comparison(records, load(FLAGS.compare))))


if __name__ == '__main__':
  sys.exit(app.run(main))

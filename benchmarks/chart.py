"""The chart of BENCHMARKS.md: train steps/s by dtype and steps_per_call, from train.py's JSON.

  python benchmarks/chart.py --results=benchmarks/results/gpu_h100.jsonl \
      --out=benchmarks/results/train_steps_per_sec.png

reads the JSON lines that `benchmarks/train.py --json_out` appends (one per variant) and draws
one bar per (config, batch, dtype, steps_per_call, remat, attention) of the same device: the
median steps/s, with the spread of the timed windows as an error bar.
"""

from __future__ import annotations

import json
import statistics

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402
from absl import app, flags  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string('results', None, 'JSON lines of benchmarks/train.py --json_out.')
flags.DEFINE_string('out', 'train_steps_per_sec.png', 'The PNG to write.')
flags.DEFINE_string('config', 'cifar10', 'Which config to plot.')


def main(argv):
  del argv
  with open(FLAGS.results) as f:
    records = [json.loads(line) for line in f if line.strip()]
  records = [r for r in records if r['benchmark'] == 'train' and r['config'] == FLAGS.config]
  if not records:
    raise SystemExit(f'No train results for {FLAGS.config} in {FLAGS.results}.')
  labels, medians, low, high = [], [], [], []
  for r in records:
    label = f'{r["dtype"]}\nsteps/call {r["steps_per_call"]}'
    if r.get('attention_impl'):
      label += f'\n{r["attention_impl"]} attention'
    if r.get('remat'):
      label += '\nremat'
    median = statistics.median(r['steps_per_sec'])
    labels.append(label)
    medians.append(median)
    low.append(median - min(r['steps_per_sec']))
    high.append(max(r['steps_per_sec']) - median)
  fig, ax = plt.subplots(figsize=(1.6 * len(records) + 2, 4))
  colors = ['tab:blue' if r['dtype'] == 'float32' else 'tab:orange' for r in records]
  ax.bar(range(len(records)), medians, yerr=[low, high], color=colors, capsize=4)
  for i, median in enumerate(medians):
    ax.annotate(
      f'{median:.3g}',
      (i, median),
      ha='center',
      va='bottom',
      xytext=(0, 6),
      textcoords='offset points',
    )
  ax.set_xticks(range(len(records)), labels, fontsize=8)
  ax.set_ylabel('train steps/s (median; bars: spread)')
  first = records[0]
  ax.set_title(
    f'ddpm-jax train step, {FLAGS.config}, batch {first["batch_size"]}, {first["device"]}'
  )
  fig.tight_layout()
  fig.savefig(FLAGS.out, dpi=120)
  print(f'Wrote {FLAGS.out}')


if __name__ == '__main__':
  app.run(main)

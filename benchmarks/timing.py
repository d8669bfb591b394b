"""What every benchmark here shares: a unit of timed work (`Runner`), its timing, its printout.

A `Runner` does its work once per `run()`, synchronously, and returns the wall-clock seconds;
the JAX benchmarks (train.py, sample.py) and the PyTorch reference (torch_reference.py) all
build them, so that compare_torch.py can interleave the two sides round by round in one process.
Figures are medians over several timed windows after warm-up, printed with their spread.
"""

from __future__ import annotations

import ast
import concurrent.futures
import dataclasses
import json
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any


@dataclasses.dataclass
class Runner:
  """One benchmarked unit of work: `run()` does it once and returns its wall-clock seconds."""

  name: str  # e.g. 'jax train' or 'torch sample step'.
  images_per_run: int  # Images processed by one run().
  steps_per_run: int  # Training or sampling steps done by one run().
  work: Callable[[], None]  # Does the work once and returns when it is done (synchronous).

  def run(self) -> float:
    start = time.perf_counter()
    self.work()
    return time.perf_counter() - start


@dataclasses.dataclass
class Rates:
  """Steps and images per second of each timed window of a runner."""

  steps_per_sec: list[float]
  images_per_sec: list[float]

  def median(self, unit: str = 'images') -> float:
    return statistics.median(self.images_per_sec if unit == 'images' else self.steps_per_sec)

  def describe(self, unit: str = 'images') -> str:
    values = self.images_per_sec if unit == 'images' else self.steps_per_sec
    return (
      f'{statistics.median(values):.4g} {unit}/s (median of {len(values)} windows, '
      f'spread {min(values):.4g}-{max(values):.4g})'
    )


def window(runner: Runner, runs: int) -> tuple[float, float]:
  """(steps/s, images/s) of `runs` consecutive runs."""
  seconds = sum(runner.run() for _ in range(runs))
  return runs * runner.steps_per_run / seconds, runs * runner.images_per_run / seconds


def measure(runner: Runner, *, runs_per_window: int, num_windows: int) -> Rates:
  """The rates of `num_windows` windows of `runs_per_window` runs (after the runner's warm-up)."""
  rates = Rates([], [])
  for _ in range(num_windows):
    steps, images = window(runner, runs_per_window)
    rates.steps_per_sec.append(steps)
    rates.images_per_sec.append(images)
  return rates


def append_json(path: str | None, record: dict) -> None:
  """Appends `record` as one JSON line to `path` (for chart.py); nothing when path is None."""
  if path:
    with open(path, 'a') as f:
      f.write(json.dumps(record) + '\n')


def parse_overrides(items: list[str]) -> dict:
  """{'section.field': value} of an --overrides flag's 'section.field=value' items (values
  Python literals, else strings), for `train.load_config`."""
  overrides = {}
  for item in items:
    key, _, text = item.partition('=')
    try:
      overrides[key] = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      overrides[key] = text
  return overrides


def build_at_once[Built](build: Callable[[Any], Built], variants: Sequence[Any]) -> list[Built]:
  """[build(v) for v in variants], all at once on threads: XLA's compiler releases the GIL, so
  the variants compile side by side, ready to be timed round by round."""
  with concurrent.futures.ThreadPoolExecutor(len(variants)) as pool:
    return list(pool.map(build, variants))

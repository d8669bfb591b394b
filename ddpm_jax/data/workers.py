"""Reading and decoding on worker processes, so that a host's cores all feed the chips.

`WorkerPool(source, with_labels, num_workers)` starts `num_workers` processes, each with its own
copy of the `core.Source` (pickled: a TFDS source reopens its ArrayRecord files, a folder keeps
its list of paths). `pool.read(indices)` hands the examples of one batch to a free worker and
returns a future of their `Batch`; the caller takes the futures in the order it made them, so a
batch holds the same bytes whatever the number of workers, as when it is read on a thread.

Processes, not threads: PIL releases the GIL while it decodes and resizes a 256x256 image, but
not for a 32x32 PNG, and a TFDS example's parsing holds it throughout. They are spawned (a fresh
interpreter), never forked from a process that runs JAX's threads.

No worker outlives the run: `close()` stops them (the train loop's `finally`), and a worker whose
parent is gone without closing it (SIGKILL, SIGTERM's default action) exits within
`PARENT_WATCH_SECONDS`. Workers ignore SIGINT and SIGTERM, which a terminal or a job scheduler
sends to every process of the group: the parent decides when reading stops (train.py saves a
checkpoint at SIGTERM, still taking batches).
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import signal
import threading
import time

import numpy as np

from ddpm_jax.data import core

PARENT_WATCH_SECONDS = 0.25

# The worker's state, set by `_start_worker` in each worker process.
_source: core.Source | None = None
_with_labels = False


def default_num_workers(cpu_count: int | None = None) -> int:
  """`config.data.num_workers = None`: all of the host's cores but 2 (the train loop's thread and
  the prefetch thread that gathers the workers' batches), at most 32; 0 (read on the prefetch
  thread) on a host of 2 cores or fewer."""
  cpu_count = cpu_count or os.cpu_count() or 1
  return max(0, min(cpu_count - 2, 32))


def read_examples(source: core.Source, indices: np.ndarray, with_labels: bool) -> dict:
  """The examples `indices` of `source`: {'image'} and, `with_labels`, {'label'} (a `Batch`)."""
  batch = {'image': source[indices]}
  if with_labels:  # After the images: a TFDS source kept their labels as it read them.
    batch['label'] = source.labels(indices).astype(np.int32)
  return batch


def _watch_parent(parent: int) -> None:
  while os.getppid() == parent:
    time.sleep(PARENT_WATCH_SECONDS)
  os._exit(1)  # The parent is gone: nobody will take what this worker reads.


def _start_worker(source: core.Source, with_labels: bool, parent: int) -> None:
  global _source, _with_labels
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  signal.signal(signal.SIGTERM, signal.SIG_IGN)
  threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()
  _source, _with_labels = source, with_labels


def _read(indices: np.ndarray) -> dict:
  return read_examples(_source, indices, _with_labels)


class WorkerPool:
  """`num_workers` processes reading batches of one source (module docstring)."""

  def __init__(self, source: core.Source, *, with_labels: bool, num_workers: int):
    self._executor = concurrent.futures.ProcessPoolExecutor(
      max_workers=num_workers,
      mp_context=multiprocessing.get_context('spawn'),
      initializer=_start_worker,
      initargs=(source, with_labels, os.getpid()),
    )

  def read(self, indices: np.ndarray) -> concurrent.futures.Future:
    """A future of `read_examples(source, indices, with_labels)`, read by a worker; its
    `result()` re-raises a worker's error (an unreadable example names itself)."""
    return self._executor.submit(_read, indices)

  def close(self) -> None:
    """Stops the workers (what they were reading is dropped) and waits for them."""
    self._executor.shutdown(wait=True, cancel_futures=True)

  def __enter__(self) -> WorkerPool:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()

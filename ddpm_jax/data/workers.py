"""Reading and decoding on worker processes, so that a host's cores all feed the chips.

`WorkerPool(source, ...)` starts `num_workers` processes, each with its own copy of the
`core.Source` (pickled: a TFDS source reopens its ArrayRecord files, a folder keeps its list of
paths). `pool.read(indices)` hands the examples of one batch to a free worker, which writes their
images into shared memory, and returns a `PendingBatch`; the caller takes them in the order it
made them, so a batch holds the same bytes whatever the number of workers, as when it is read on
a thread.

Processes, not threads: PIL releases the GIL while it decodes and resizes a 256x256 image, but
not for a 32x32 PNG, and a TFDS example's parsing holds it throughout. They are spawned (a fresh
interpreter), never forked from a process that runs JAX's threads.

No worker outlives the run: `close()` stops them (the train loop's `finally`) and frees the
shared memory, and a worker whose parent is gone without closing it (SIGKILL, SIGTERM's default
action) exits within `PARENT_WATCH_SECONDS` (multiprocessing's resource tracker then frees the
memory). Workers ignore SIGINT and SIGTERM, which a terminal or a job scheduler
sends to every process of the group: the parent decides when reading stops (train.py saves a
checkpoint at SIGTERM, still taking batches).
"""

from __future__ import annotations

import collections
import concurrent.futures
import math
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Iterable, Iterator
from multiprocessing import shared_memory

import numpy as np

from ddpm_jax.data import core

PARENT_WATCH_SECONDS = 0.25

# The worker's state, set by `_start_worker` in each worker process.
_source: core.Source | None = None
_with_labels = False
_memory: shared_memory.SharedMemory | None = None
_images: np.ndarray | None = None  # The pool's slots, in `_memory`.


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


def _start_worker(
  source: core.Source, with_labels: bool, memory: str, shape: tuple[int, ...], parent: int
) -> None:
  global _source, _with_labels, _memory, _images
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  signal.signal(signal.SIGTERM, signal.SIG_IGN)
  threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()
  _source, _with_labels = source, with_labels
  _memory = shared_memory.SharedMemory(memory)
  _images = np.ndarray(shape, np.uint8, buffer=_memory.buf)


def _read(slot: int, indices: np.ndarray) -> np.ndarray | None:
  """Reads the examples into slot `slot`; returns their labels (None without)."""
  batch = read_examples(_source, indices, _with_labels)
  _images[slot, : len(indices)] = batch['image']
  return batch.get('label')


class WorkerPool:
  """`num_workers` processes reading batches of one source (module docstring).

  The images come back through shared memory, `slots` batches of at most `batch_size` images of
  `image_shape` (a pipe would copy a 256x256 batch four times, which cost as much CPU as a third
  of its decoding); so at most `slots` reads are in flight at once.
  """

  def __init__(
    self,
    source: core.Source,
    *,
    with_labels: bool,
    num_workers: int,
    batch_size: int,
    image_shape: tuple[int, int, int],
  ):
    self.slots = 2 * num_workers
    shape = (self.slots, batch_size, *image_shape)
    self._memory = shared_memory.SharedMemory(create=True, size=math.prod(shape))
    self._images = np.ndarray(shape, np.uint8, buffer=self._memory.buf)
    self._free = list(range(self.slots))
    self._executor = concurrent.futures.ProcessPoolExecutor(
      max_workers=num_workers,
      mp_context=multiprocessing.get_context('spawn'),
      initializer=_start_worker,
      initargs=(source, with_labels, self._memory.name, shape, os.getpid()),
    )

  def read(self, indices: np.ndarray) -> PendingBatch:
    """The examples `indices` (at most `batch_size`), read by a worker: `result()` gives
    `read_examples(source, indices, with_labels)` and re-raises a worker's error (an unreadable
    example names itself). Call it from one thread, with at most `slots` reads in flight."""
    slot = self._free.pop()
    return PendingBatch(self, slot, len(indices), self._executor.submit(_read, slot, indices))

  def read_in_order(self, index_batches: Iterable[np.ndarray]) -> Iterator[dict]:
    """The batches of `index_batches` (each as `read` gives it), in their order, with up to
    `slots` of them read ahead."""
    pending = collections.deque()
    for indices in index_batches:
      if len(pending) == self.slots:
        yield pending.popleft().result()
      pending.append(self.read(indices))
    while pending:
      yield pending.popleft().result()

  def close(self) -> None:
    """Stops the workers (what they were reading is dropped) and waits for them."""
    self._executor.shutdown(wait=True, cancel_futures=True)
    del self._images  # The buffer's last export, which `close` needs gone.
    self._memory.close()
    self._memory.unlink()

  def __enter__(self) -> WorkerPool:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()


class PendingBatch:
  """A batch a worker is reading into a slot of its pool's shared memory."""

  def __init__(self, pool: WorkerPool, slot: int, size: int, future: concurrent.futures.Future):
    self._pool, self._slot, self._size, self._future = pool, slot, size, future

  def result(self) -> dict:
    """The batch (copied out of the slot, which is then free), or the worker's error."""
    try:
      labels = self._future.result()
      batch = {'image': self._pool._images[self._slot, : self._size].copy()}
    finally:
      self._pool._free.append(self._slot)
    if labels is not None:
      batch['label'] = labels
    return batch

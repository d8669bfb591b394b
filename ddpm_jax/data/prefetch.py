"""Batches read on a background thread, so that reading and decoding overlap the train step."""

from __future__ import annotations

import dataclasses
import queue
import threading
from collections.abc import Iterator

_END = object()


@dataclasses.dataclass(frozen=True)
class _Failure:
  error: Exception


class PrefetchIterator[T](Iterator[T]):
  """Runs an iterator on a background thread, keeping up to `buffer_size` items ready.

  Reading and decoding thus overlap the training step. An exception raised while reading is
  re-raised by `next()`. Use as a context manager, or call `close()`, to stop the thread.
  """

  def __init__(self, items: Iterator[T], buffer_size: int = 2):
    self._queue = queue.Queue(maxsize=buffer_size)
    self._stop = threading.Event()
    self._final: BaseException | None = None  # What every `next()` raises once set.
    self._thread = threading.Thread(
      target=self._produce, args=(items,), name='data_prefetch', daemon=True
    )
    self._thread.start()

  def _produce(self, items: Iterator[T]) -> None:
    try:
      for item in items:
        self._queue.put(item)
        if self._stop.is_set():
          return
      self._queue.put(_END)
    except Exception as e:  # Handed to the consumer, which re-raises it.
      self._queue.put(_Failure(e))
    finally:
      close = getattr(items, 'close', None)  # A generator's: runs its `finally` (its workers').
      if close is not None:
        close()

  def __next__(self) -> T:
    if self._final is not None:
      raise self._final
    item = self._queue.get()
    if item is _END:
      self._final = StopIteration()
      raise self._final
    if isinstance(item, _Failure):
      self._final = item.error
      raise item.error
    return item

  def close(self) -> None:
    """Stops the reading thread and waits for it; `next()` then raises StopIteration."""
    self._stop.set()
    # Free the queue so that a blocked `put` returns; the producer then sees `_stop` and exits
    # after at most one more `put`, which fits in the emptied queue.
    while self._thread.is_alive():
      try:
        self._queue.get(timeout=0.01)
      except queue.Empty:
        pass
    if self._final is None:
      self._final = StopIteration()

  def __enter__(self) -> PrefetchIterator[T]:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()

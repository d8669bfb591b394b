"""The example order: which examples each process reads at each step, a pure function.

The global example stream is the concatenation of per-epoch permutations of the training split,
permutation `e` drawn from `np.random.default_rng([seed, e])`; global batch `s` is stream
positions [s * B, (s + 1) * B), and process p of P reads only its contiguous share
[p * B / P, (p + 1) * B / P) of it. A run resumed at step s therefore reads exactly the batches an
uninterrupted run would, in O(1) (no skipping through data), and the global batch does not depend
on the number of processes or devices. This holds for every dataset.
"""

from __future__ import annotations

import functools

import numpy as np


def local_batch_size(global_batch_size: int, process_count: int) -> int:
  """The per-process share B / P of a global batch; a ValueError unless P divides B."""
  if global_batch_size < 1 or global_batch_size % process_count:
    raise ValueError(
      f'The global batch size ({global_batch_size}) must be a positive multiple of the number '
      f'of processes ({process_count}): each process reads an equal share of every batch.'
    )
  return global_batch_size // process_count


@functools.lru_cache(maxsize=4)
def _epoch_permutation(seed: int, epoch: int, num_examples: int) -> np.ndarray:
  """Permutation `epoch` of the training split: int64 [num_examples], read-only."""
  permutation = np.random.default_rng([seed, epoch]).permutation(num_examples)
  permutation.flags.writeable = False
  return permutation


def train_indices(
  *,
  step: int,
  num_examples: int,
  global_batch_size: int,
  seed: int,
  process_index: int,
  process_count: int,
) -> np.ndarray:
  """The training examples process `process_index` reads at `step`.

  Global batch `step` is positions [step * B, (step + 1) * B) of the stream of per-epoch
  permutations (see the module docstring); this process reads positions
  [step * B + p * B / P, step * B + (p + 1) * B / P). A pure function of its arguments.

  Args:
    step: the training step, >= 0.
    num_examples: N, the size of the training split.
    global_batch_size: B, summed over all processes; P must divide it.
    seed: the data-order seed, >= 0.
    process_index: p in [0, P).
    process_count: P.

  Returns:
    int64 [B / P], indices into the split in [0, num_examples).
  """
  size = local_batch_size(global_batch_size, process_count)
  start = step * global_batch_size + process_index * size
  epochs, offsets = np.divmod(np.arange(start, start + size, dtype=np.int64), num_examples)
  indices = np.empty(size, np.int64)
  for epoch in np.unique(epochs):  # One epoch, or two where the batch straddles a boundary.
    in_epoch = epochs == epoch
    indices[in_epoch] = _epoch_permutation(seed, int(epoch), num_examples)[offsets[in_epoch]]
  return indices

"""scikit-learn's bundled 8x8 handwritten digits: a dataset that trains in minutes on a CPU.

Embedded in scikit-learn (no download), 1 channel, values 0..16 scaled to 0..255, 10 classes
named '0'..'9' (label k is the digit k, scikit-learn's `target`). A fixed permutation of the
1,797 examples holds the first 300 out as split 'test', the other 1,497 are 'train'; both are
held in memory, images and labels, and read as stored.
"""

from __future__ import annotations

import functools
from typing import Any

import ml_collections
import numpy as np
from sklearn import datasets as sklearn_datasets

from ddpm_jax.data import core

NAME = 'digits'
INFO = core.DatasetInfo(
  NAME, 8, 1, ('train', 'test'), class_names=tuple(str(digit) for digit in range(10))
)

# The digits split: a fixed permutation of the 1,797 examples, the first 300 held out as 'test'.
NUM_TEST = 300
_SPLIT_SEED = 0


@functools.cache
def _load_digits() -> tuple[np.ndarray, np.ndarray]:
  """All 1,797 digits as read-only uint8 images [1797, 8, 8, 1] in 0..255 and int64 labels."""
  digits = sklearn_datasets.load_digits()
  # Values 0..16 -> 0..255, rounded half to even.
  images = np.round(digits.images * (255 / 16)).astype(np.uint8)[..., None]
  labels = digits.target.astype(np.int64)
  images.flags.writeable = labels.flags.writeable = False
  return images, labels


def _split_indices(split: str) -> np.ndarray:
  """Sorted indices into `_load_digits()` of split 'train' (int64 [1497]) or 'test' ([300])."""
  permutation = np.random.default_rng(_SPLIT_SEED).permutation(1797)
  chosen = permutation[:NUM_TEST] if split == 'test' else permutation[NUM_TEST:]
  return np.sort(chosen)


class Digits:
  """The digits as a `core.Dataset`: read as stored, so the config must ask for 8x8x1."""

  def __init__(self, data: ml_collections.ConfigDict):
    self.data = data

  def info(self) -> core.DatasetInfo:
    core.check_stored_shape(INFO, self.data)
    return INFO

  def open(self, info: core.DatasetInfo, split: str) -> core.InMemorySource:
    images, labels = _load_digits()
    indices = _split_indices(split)
    return core.InMemorySource(images[indices], labels[indices])

  def content_key(self, split: str) -> dict[str, Any]:
    return {}

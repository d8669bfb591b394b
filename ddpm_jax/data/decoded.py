"""A training split decoded once: held in host memory, or prepared as an uncompressed copy on disk.

Decoding (a PNG, a JPEG) and fitting (LSUN's center crop and Lanczos resize) cost far more than
reading the uint8 pixels they produce, and they give the same pixels every epoch. So the train
loop (`pipeline.train_batches`) decodes the split once, in parallel on the pipeline's workers, in
one of two places:

- **Host memory**, where the decoded split takes at most `config.data.cache_gib` GiB: CIFAR10's
  50,000 32x32 images are 0.14 GiB. It is decoded at every start of the run (seconds, on the
  workers), and each host decodes the whole split: batches then come from memory at the speed of
  a copy.
- **A prepared copy**, where `config.data.prepared_dir` names a directory: the decoded split as
  one uint8 `.npy` file of [N, H, W, C] (and the labels beside it), read memory-mapped. Made once
  and kept; its name holds the hash of everything that fixes its pixels (`prepared_key`: the
  dataset, split, size, channels, folder and the fitting method), so a change of any of them makes
  a new one. It is uncompressed, image_size^2 * C bytes an image: LSUN church_outdoor at 256x256
  is 24.8 GB, bedroom 600 GB. Use a local disk (each host makes its own) or storage that all hosts
  see as a file system.

Either holds exactly the pixels that reading the examples gives (`workers.read_examples`).
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import numpy as np
from absl import logging

from ddpm_jax.data import core, workers

GiB = 2**30
CHUNK = 256  # Examples per task of the workers while decoding a split.
# Bumped whenever what fixes a prepared copy's pixels changes (`images.fit_image`).
PREPARED_FORMAT = 1


def split_bytes(num_examples: int, image_size: int, num_channels: int) -> int:
  """Bytes of a split's decoded uint8 images."""
  return num_examples * image_size * image_size * num_channels


def decode_split(
  source: core.Source,
  images: np.ndarray,
  *,
  with_labels: bool,
  num_workers: int,
) -> np.ndarray | None:
  """Reads every example of `source` into `images` (uint8 [N, H, W, C], an array or a memmap),
  on `num_workers` processes (0: this thread); returns their labels (int64 [N]) `with_labels`,
  else None."""
  labels = np.zeros(len(source), np.int64) if with_labels else None
  chunks = np.array_split(np.arange(len(source)), range(CHUNK, len(source), CHUNK))

  def store(indices: np.ndarray, batch: dict) -> None:
    images[indices] = batch['image']
    if with_labels:
      labels[indices] = batch['label']

  if num_workers:
    with workers.WorkerPool(
      source,
      with_labels=with_labels,
      num_workers=num_workers,
      batch_size=CHUNK,
      image_shape=images.shape[1:],
    ) as pool:
      for indices, batch in zip(chunks, pool.read_in_order(chunks), strict=True):
        store(indices, batch)
  else:
    for indices in chunks:
      store(indices, workers.read_examples(source, indices, with_labels))
  return labels


def in_memory(
  source: core.Source,
  *,
  image_size: int,
  num_channels: int,
  with_labels: bool,
  num_workers: int,
) -> core.InMemorySource:
  """The split decoded into host memory (module docstring)."""
  images = np.empty((len(source), image_size, image_size, num_channels), np.uint8)
  labels = decode_split(source, images, with_labels=with_labels, num_workers=num_workers)
  return core.InMemorySource(images, labels)


def prepared_key(settings: dict[str, Any]) -> str:
  """A hash of `pipeline.split_settings` (what fixes the split's pixels) and `PREPARED_FORMAT`."""
  text = json.dumps({**settings, 'format': PREPARED_FORMAT}, sort_keys=True)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def prepared(
  source: core.Source,
  settings: dict[str, Any],
  directory: str,
  *,
  with_labels: bool,
  num_workers: int,
) -> core.InMemorySource:
  """The split's prepared copy in `directory` (module docstring), made first if there is none.

  Args:
    source: the split, read where the copy is made.
    settings: `pipeline.split_settings` of the split: the copy's key.
    directory: `config.data.prepared_dir`.
    with_labels: whether the labels are read (and kept beside the images).
    num_workers: the processes that decode the split.
  """
  name = settings['dataset'].replace('/', '_').replace(':', '_')
  key = prepared_key({**settings, 'num_examples': len(source)})
  stem = os.path.join(directory, f'{name}-{settings["split"]}-{key}')
  shape = (len(source), settings['image_size'], settings['image_size'], settings['num_channels'])
  image_path, label_path = f'{stem}.npy', f'{stem}.labels.npy'
  if not os.path.exists(image_path) or (with_labels and not os.path.exists(label_path)):
    os.makedirs(directory, exist_ok=True)
    gib = split_bytes(*shape[:2], shape[-1]) / GiB
    logging.info('Preparing %s: the decoded split, %.2f GiB, once.', image_path, gib)
    # Written under a name of this process's own, then renamed: a copy that exists is whole.
    partial = f'{stem}.{os.uname().nodename}.{os.getpid()}.partial'
    images = np.lib.format.open_memmap(f'{partial}.npy', 'w+', np.uint8, shape)
    labels = decode_split(source, images, with_labels=with_labels, num_workers=num_workers)
    images.flush()
    del images
    if with_labels:
      np.save(f'{partial}.labels.npy', labels)
      os.replace(f'{partial}.labels.npy', label_path)
    os.replace(f'{partial}.npy', image_path)
  images = np.load(image_path, mmap_mode='r')
  if images.shape != shape:
    raise ValueError(f'{image_path} holds images of shape {images.shape}, not {shape}.')
  return core.InMemorySource(images, np.load(label_path) if with_labels else None)

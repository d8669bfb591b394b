"""The entry points: the config check, the dataset's info, its splits, and batches to train on.

`config.data.dataset` picks the source module: 'digits' (`digits`), 'folder' (`folder`), and
any other name a TFDS dataset (`tfds`). Every batch is a dict (`Batch`): 'image', uint8
`[B_local, H, W, C]` in 0..255, and where `config.model.num_classes` = K > 0 (a class-conditional
model) 'label', int32 `[B_local]` in [0, K), the classes of the same examples. Training reads
them in the order of `order.train_indices`, decoded once where `config.data` asks (`decoded`),
else on the processes of `workers`; both are read ahead on a thread (`prefetch`).
"""

from __future__ import annotations

import dataclasses
import difflib
import itertools
from collections.abc import Iterator
from typing import Any

import jax
import ml_collections
import numpy as np

from ddpm_jax import validation
from ddpm_jax.data import core, decoded, digits, folder, order, prefetch, workers
from ddpm_jax.data import tfds as tfds_data

# The paper's datasets (and the digits), named first in the error for an unknown name.
DATASETS = (digits.NAME, *tfds_data.PAPER_DATASETS)

# A batch: {'image': uint8 [B_local, H, W, C] in 0..255, and, for a class-conditional model,
# 'label': int32 [B_local] in [0, config.model.num_classes)}.
Batch = dict[str, np.ndarray]


def _num_classes(config: ml_collections.ConfigDict) -> int:
  """K = `config.model.num_classes`: the classes a conditional model has; 0 (the default):
  unconditional, and no labels are read. (`models.check_config` refuses a value that is not an
  int >= 0; here it reads no labels.)"""
  num_classes = config.model.num_classes
  return num_classes if validation.is_int(num_classes) and num_classes > 0 else 0


def _dataset(config: ml_collections.ConfigDict) -> core.Dataset:
  """The `core.Dataset` that `config.data.dataset` names (built without any I/O)."""
  data = config.data
  with_labels = _num_classes(config) > 0
  if data.dataset == digits.NAME:
    return digits.Digits(data)
  if data.dataset == folder.NAME:
    return folder.Folder(data, with_labels=with_labels)
  return tfds_data.Tfds(data, with_labels=with_labels)


def _checked_dataset(
  config: ml_collections.ConfigDict,
) -> tuple[core.Dataset, core.DatasetInfo]:
  """`config.data` checked against its dataset: the dataset and its info (`get_dataset_info`)."""
  data = config.data
  image_size = data.image_size
  validation.require(
    validation.is_int(image_size) and image_size >= 1,
    f'config.data.image_size must be a positive int, got {image_size!r}.',
  )
  num_workers = data.num_workers
  validation.require(
    num_workers is None or (validation.is_int(num_workers) and num_workers >= 0),
    f'config.data.num_workers must be None (all cores but 2) or an int >= 0, got {num_workers!r}.',
  )
  cache_gib = data.cache_gib
  validation.require(
    isinstance(cache_gib, int | float) and not isinstance(cache_gib, bool) and cache_gib >= 0,
    f'config.data.cache_gib must be a number of GiB >= 0, got {cache_gib!r}.',
  )
  validation.require(
    data.prepared_dir is None or (isinstance(data.prepared_dir, str) and data.prepared_dir),
    f'config.data.prepared_dir must be None or a directory, got {data.prepared_dir!r}.',
  )
  num_classes = _num_classes(config)
  dataset = _dataset(config)
  try:
    info = dataset.info()
  except tfds_data.NotTfdsError as e:
    close = difflib.get_close_matches(
      tfds_data.base_name(data.dataset), [*DATASETS, folder.NAME, *e.tfds_names], n=5
    )
    suggestion = f' Closest names: {", ".join(close)}.' if close else ''
    raise ValueError(
      f'Unknown dataset {data.dataset!r}: not one of {", ".join(DATASETS)}, nor {folder.NAME!r} '
      f'(the images under config.data.image_dir), nor a TFDS dataset.{suggestion}'
    ) from None
  validation.require(
    data.num_channels in (1, 3),
    f'config.data.num_channels must be 1 (greyscale) or 3 (RGB), got {data.num_channels!r}.',
  )
  for field in ('split', 'eval_split'):
    split = data[field]
    validation.require(
      split is None or not info.splits or split in info.splits,
      f'config.data.{field} = {split!r}, but {info.name!r} has the splits: '
      f'{", ".join(info.splits)}.',
    )
  if num_classes:
    validation.require(
      info.class_names is not None,
      f'config.model.num_classes = {num_classes} asks for a class-conditional model, but '
      f'{info.name!r} has no class labels. Labels come from a TFDS dataset with a '
      'tfds.features.ClassLabel feature (config.data.label_key names it), or a folder with one '
      'subdirectory of images per class (ddpm_jax/data/folder.py); or set '
      'config.model.num_classes = 0 to train unconditionally.',
    )
    validation.require(
      num_classes == len(info.class_names),
      f'config.model.num_classes = {num_classes}, but {info.name!r} has '
      f'{len(info.class_names)} classes ({_list(info.class_names)}).',
    )
  eval_split = data.eval_split if data.eval_split is not None else core.held_out_split(info.splits)
  return dataset, dataclasses.replace(info, eval_split=eval_split)


def _list(names: tuple[str, ...], most: int = 10) -> str:
  """'a, b, c' of the first `most` names, then '... (n in all)'."""
  listed = ', '.join(names[:most])
  return listed if len(names) <= most else f'{listed}, ... ({len(names)} in all)'


def get_dataset_info(config: ml_collections.ConfigDict) -> core.DatasetInfo:
  """Validates `config.data` against the dataset it names and returns that dataset's info.

  Call it at startup, before anything is compiled. It reads no examples and downloads nothing:
  for a TFDS dataset not in `tfds.PAPER_DATASETS` it reads the dataset's metadata (TFDS's code,
  or the prepared dataset's), for a folder it looks for one image file (and, where the run reads
  labels, reads the top level and looks for one image per subdirectory: the classes). The eval
  split is `config.data.eval_split`, or where that is None the dataset's 'test', else its
  'validation', else none (`core.held_out_split`). `class_names` are the dataset's classes in
  label order, None when it has none (a folder has classes only when the run reads labels).

  Raises:
    ValueError: for an unknown dataset name (the message lists the known ones and the closest
      TFDS names), a TFDS dataset without a uint8 image feature or with several, a folder without
      images, an `image_size` / `num_channels` that the dataset cannot produce, or a `split` /
      `eval_split` that it does not have; and where `config.model.num_classes` = K > 0, a
      dataset without labels or with another number of classes than K, a TFDS `ClassLabel` that
      cannot be picked (`config.data.label_key` not one, or several and none named 'label'), a
      folder with an image directly in `image_dir`, or an `eval_image_dir` with other classes.
    FileNotFoundError: for a folder that does not exist.
  """
  return _checked_dataset(config)[1]


def check_config(config: ml_collections.ConfigDict) -> None:
  """Runs every check of `config.data` (those of `get_dataset_info`), raising as it does."""
  _checked_dataset(config)


def create_source(config: ml_collections.ConfigDict, split: str) -> core.Source:
  """Random access to `split` of `config.data.dataset`.

  For a TFDS dataset not prepared yet this downloads and prepares it, on process 0, unless
  `config.data.download` is False: call it on all processes at the same point.

  Returns:
    A `core.Source`: `len(source)`, `source[indices]` -> uint8 [n, H, W, C] in 0..255 for int
    indices [n], H = W = config.data.image_size, C = config.data.num_channels, and
    `source.labels(indices)` -> int64 [n], their classes (for the digits always; for a TFDS
    dataset or a folder where `config.model.num_classes` > 0, else it raises). For 'digits' it
    is a `core.InMemorySource`, which also has `images` and `all_labels`; for a
    folder a `folder.FolderSource`, which also has `paths` and `class_names`.

  Raises:
    ValueError: for an invalid `config.data` (see `get_dataset_info`) or a split the dataset does
      not have.
    FileNotFoundError: for a TFDS dataset not prepared in ArrayRecord format (and not downloaded).
  """
  dataset, info = _checked_dataset(config)
  validation.require(
    not info.splits or split in info.splits,
    f'{info.name!r} has no split {split!r}; its splits are: {", ".join(info.splits)}.',
  )
  return dataset.open(info, split)


def split_settings(config: ml_collections.ConfigDict, split: str) -> dict[str, Any]:
  """What fixes the images `create_source(config, split)` yields, JSON-serializable: the key of
  results computed from them (ddpm_jax/evaluation.py). A folder is named by its absolute path
  (and, where the run reads labels, its classes)."""
  data = config.data
  return {
    'dataset': data.dataset,
    'split': split,
    'image_size': data.image_size,
    'num_channels': data.num_channels,
    **_dataset(config).content_key(split),
  }


def _process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  """(p, P), defaulting to this JAX process; tests pass them to simulate several processes."""
  if process_index is None:
    process_index = jax.process_index()
  if process_count is None:
    process_count = jax.process_count()
  return process_index, process_count


def _num_workers(config: ml_collections.ConfigDict) -> int:
  """`config.data.num_workers`, None replaced by `workers.default_num_workers()`."""
  value = config.data.num_workers
  return workers.default_num_workers() if value is None else value


def _training_source(config: ml_collections.ConfigDict, with_labels: bool) -> core.Source:
  """The training split, decoded once where `config.data` asks for it (`decoded`): into a
  prepared copy in `prepared_dir`, else into memory where it fits `cache_gib`; else the dataset,
  read at every step."""
  data = config.data
  source = create_source(config, data.split)
  if isinstance(source, core.InMemorySource):  # The digits.
    return source
  size = decoded.split_bytes(len(source), data.image_size, data.num_channels)
  options = {'with_labels': with_labels, 'num_workers': _num_workers(config)}
  if data.prepared_dir is not None:
    settings = split_settings(config, data.split)
    return decoded.prepared(source, settings, data.prepared_dir, **options)
  if size <= data.cache_gib * decoded.GiB:
    return decoded.in_memory(
      source, image_size=data.image_size, num_channels=data.num_channels, **options
    )
  return source


def train_batches(
  config: ml_collections.ConfigDict,
  *,
  global_batch_size: int,
  start_step: int,
  seed: int,
  process_index: int | None = None,
  process_count: int | None = None,
  buffer_size: int = 2,
) -> prefetch.PrefetchIterator[tuple[int, Batch]]:
  """Endless training batches of split `config.data.split`, from `start_step` on.

  Reads `buffer_size` steps ahead on a background thread; the examples are read and decoded on
  `config.data.num_workers` processes (two batches a worker ahead), unless the split is held in
  memory or a prepared copy (`decoded`: `config.data.cache_gib`, `config.data.prepared_dir`),
  which is decoded here first. Every way gives the same batches.

  Args:
    config: the experiment config; reads `config.data` and `config.model.num_classes`.
    global_batch_size: B, summed over all processes; P must divide it.
    start_step: the first step to yield (0, or the restored step when resuming).
    seed: the data-order seed; the batches are a function of (seed, step) only.
    process_index: p; None means `jax.process_index()`.
    process_count: P; None means `jax.process_count()`.
    buffer_size: how many steps are read ahead.

  Returns:
    A `PrefetchIterator` yielding `(step, batch)` for step = start_step, start_step + 1, ...:
    this process's share of global batch `step` (`order.train_indices`), batch['image'] uint8
    [B / P, H, W, C] in 0..255 and, where `config.model.num_classes` > 0, batch['label'] int32
    [B / P], the class of each image.
  """
  process_index, process_count = _process(process_index, process_count)
  order.local_batch_size(global_batch_size, process_count)  # Raise here, not on the thread.
  with_labels = _num_classes(config) > 0
  source = _training_source(config, with_labels)
  pool_size = 0 if isinstance(source, core.InMemorySource) else _num_workers(config)

  def indices(step: int) -> np.ndarray:
    return order.train_indices(
      step=step,
      num_examples=len(source),
      global_batch_size=global_batch_size,
      seed=seed,
      process_index=process_index,
      process_count=process_count,
    )

  def batches() -> Iterator[tuple[int, Batch]]:
    for step in itertools.count(start_step):
      yield step, workers.read_examples(source, indices(step), with_labels)

  def batches_from_workers() -> Iterator[tuple[int, Batch]]:
    # Two batches a worker in flight, taken in the order of their steps.
    data = config.data
    with workers.WorkerPool(
      source,
      with_labels=with_labels,
      num_workers=pool_size,
      batch_size=order.local_batch_size(global_batch_size, process_count),
      image_shape=(data.image_size, data.image_size, data.num_channels),
    ) as pool:
      steps = itertools.count(start_step)
      read = pool.read_in_order(map(indices, itertools.count(start_step)))
      yield from zip(steps, read, strict=False)  # Both endless.

  return prefetch.PrefetchIterator(batches_from_workers() if pool_size else batches(), buffer_size)


def eval_batches(
  config: ml_collections.ConfigDict,
  *,
  split: str,
  global_batch_size: int,
  num_examples: int | None = None,
  process_index: int | None = None,
  process_count: int | None = None,
  buffer_size: int = 2,
) -> prefetch.PrefetchIterator[tuple[Batch, np.ndarray]]:
  """The first `num_examples` examples of `split`, in order, in padded batches of one shape.

  Global batch k is examples [k * B, (k + 1) * B), of which process p reads its contiguous share
  of B / P rows; rows past `num_examples` (in the last batch) are zeros (image and label) with
  mask False. Every process yields the same number of batches, ceil(num_examples / B).

  Args:
    config: the experiment config; reads `config.data` and `config.model.num_classes`.
    split: e.g. `get_dataset_info(config).eval_split`.
    global_batch_size: B, summed over all processes; P must divide it.
    num_examples: how many examples to evaluate; None means the whole split.
    process_index: p; None means `jax.process_index()`.
    process_count: P; None means `jax.process_count()`.
    buffer_size: how many batches are read ahead.

  Returns:
    A `PrefetchIterator` yielding `(batch, mask)`: batch['image'] uint8 [B / P, H, W, C] in
    0..255 and, where `config.model.num_classes` > 0, batch['label'] int32 [B / P]; mask bool
    [B / P], True for real examples.
  """
  process_index, process_count = _process(process_index, process_count)
  size = order.local_batch_size(global_batch_size, process_count)
  source = create_source(config, split)
  if num_examples is None:
    num_examples = len(source)
  validation.require(
    0 < num_examples <= len(source),
    f'num_examples must be in [1, {len(source)}] for split {split!r}, got {num_examples}.',
  )
  shape = (size, config.data.image_size, config.data.image_size, config.data.num_channels)
  with_labels = _num_classes(config) > 0

  def batches() -> Iterator[tuple[Batch, np.ndarray]]:
    for k in range(-(-num_examples // global_batch_size)):
      start = k * global_batch_size + process_index * size
      positions = np.arange(start, start + size)
      mask = positions < num_examples
      batch = {'image': np.zeros(shape, np.uint8)}
      if with_labels:
        batch['label'] = np.zeros(size, np.int32)
      for key, values in workers.read_examples(source, positions[mask], with_labels).items():
        batch[key][mask] = values
      yield batch, mask

  return prefetch.PrefetchIterator(batches(), buffer_size)

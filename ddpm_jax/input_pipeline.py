"""Input pipeline: uint8 images in an order that is a pure function of (seed, step).

Every batch is uint8 `[B_local, H, W, C]` with values in 0..255; the train step on device scales
it to [-1, 1] (x / 127.5 - 1) and applies the random horizontal flip, so nothing here does.

Order. The global example stream is the concatenation of per-epoch permutations of the training
split, permutation `e` drawn from `np.random.default_rng([seed, e])`; global batch `s` is stream
positions [s * B, (s + 1) * B), and process p of P reads only its contiguous share
[p * B / P, (p + 1) * B / P) of it. A run resumed at step s therefore reads exactly the batches an
uninterrupted run would, in O(1) (no skipping through data), and the global batch does not depend
on the number of processes or devices.

Datasets (`config.data.dataset`):
  'digits'               scikit-learn's bundled 8x8 handwritten digits, 1 channel, embedded (no
                         download): 1,497 train / 300 test examples.
  'cifar10'              32x32x3, splits 'train' (50,000) / 'test' (10,000).
  'celeb_a_hq/256'       256x256x3, split 'train' only (30,000); TFDS needs a manual download.
  'lsun/church_outdoor'  JPEGs of varying size, center-cropped to a square and resized to
  'lsun/bedroom'         `config.data.image_size`; splits 'train' / 'validation'.
  'lsun/cat'             As above, split 'train' only (TFDS has no LSUN validation split for the
                         object categories).

TFDS datasets are read with random access through `tfds.data_source`, which needs the dataset
prepared once in ArrayRecord format under `config.data.data_dir` (None: $TFDS_DATA_DIR, else
~/tensorflow_datasets). The pipeline never downloads (every process of a multi-host job would);
prepare the data beforehand, e.g. for CIFAR10:
  python -c "import tensorflow_datasets as tfds; tfds.data_source('cifar10',
    builder_kwargs={'file_format': 'array_record'})"
(add `data_dir='...'` to both that call and the config to use another directory).
TFDS, and TensorFlow with the accelerators hidden from it (`tf_support`), are imported only when
a TFDS split is opened; the digits need neither.
"""

from __future__ import annotations

import dataclasses
import functools
import queue
import threading
from collections.abc import Iterator
from typing import Generic, TypeVar

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import PIL.Image
from sklearn import datasets as sklearn_datasets

from ddpm_jax import tf_support

T = TypeVar('T')


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What the pipeline knows about a dataset before reading it.

  Attributes:
    name: 'digits' or the TFDS name, as in `config.data.dataset`.
    image_size: side of the stored square images, or None when they vary in size and are
      center-cropped and resized to `config.data.image_size` (LSUN).
    num_channels: 1 (digits) or 3 (RGB).
    splits: the split names the dataset has.
    eval_split: the held-out split for evaluation (bits/dim), or None when there is none.
    manual_download: whether TFDS needs the source files downloaded by hand first.
  """

  name: str
  image_size: int | None
  num_channels: int
  splits: tuple[str, ...]
  eval_split: str | None
  manual_download: bool = False


DATASETS = {
  info.name: info
  for info in (
    DatasetInfo('digits', 8, 1, ('train', 'test'), 'test'),
    DatasetInfo('cifar10', 32, 3, ('train', 'test'), 'test'),
    DatasetInfo('celeb_a_hq/256', 256, 3, ('train',), None, manual_download=True),
    DatasetInfo('lsun/church_outdoor', None, 3, ('train', 'validation'), 'validation'),
    DatasetInfo('lsun/bedroom', None, 3, ('train', 'validation'), 'validation'),
    DatasetInfo('lsun/cat', None, 3, ('train',), None),
  )
}

# The digits split: a fixed permutation of the 1,797 examples, the first 300 held out as 'test'.
DIGITS_NUM_TEST = 300
_DIGITS_SPLIT_SEED = 0


def get_dataset_info(config: ml_collections.ConfigDict) -> DatasetInfo:
  """Validates `config.data` against the dataset it names and returns that dataset's info.

  Call it at startup, before anything is compiled: it needs no data on disk.

  Raises:
    ValueError: for an unknown dataset name (the message lists the known ones), or an
      `image_size` / `num_channels` that the dataset cannot produce.
  """
  name = config.data.dataset
  if name not in DATASETS:
    raise ValueError(f'Unknown dataset {name!r}; known datasets: {", ".join(DATASETS)}.')
  info = DATASETS[name]
  if config.data.num_channels != info.num_channels:
    raise ValueError(
      f'config.data.num_channels = {config.data.num_channels}, but {name!r} images have '
      f'{info.num_channels} channel(s).'
    )
  image_size = config.data.image_size
  if info.image_size is not None and image_size != info.image_size:
    raise ValueError(
      f'config.data.image_size = {image_size}, but {name!r} images are '
      f'{info.image_size}x{info.image_size} (only LSUN images are resized).'
    )
  if not isinstance(image_size, int) or image_size < 1:
    raise ValueError(f'config.data.image_size must be a positive int, got {image_size!r}.')
  return info


def to_model_range(images):
  """uint8 images in 0..255 -> float32 in [-1, 1] (x / 127.5 - 1, as the original); jittable."""
  return images.astype(jnp.float32) / 127.5 - 1.0


# --------------------------------------------------------------------------------------------
# Sources: random access to the examples of one split.
# --------------------------------------------------------------------------------------------


@functools.cache
def _load_digits() -> tuple[np.ndarray, np.ndarray]:
  """All 1,797 digits as read-only uint8 images [1797, 8, 8, 1] in 0..255 and int64 labels."""
  digits = sklearn_datasets.load_digits()
  # Values 0..16 -> 0..255, rounded half to even.
  images = np.round(digits.images * (255 / 16)).astype(np.uint8)[..., None]
  labels = digits.target.astype(np.int64)
  images.flags.writeable = labels.flags.writeable = False
  return images, labels


def _digits_split_indices(split: str) -> np.ndarray:
  """Sorted indices into `load_digits()` of split 'train' (int64 [1497]) or 'test' ([300])."""
  permutation = np.random.default_rng(_DIGITS_SPLIT_SEED).permutation(1797)
  chosen = permutation[:DIGITS_NUM_TEST] if split == 'test' else permutation[DIGITS_NUM_TEST:]
  return np.sort(chosen)


class InMemorySource:
  """A split held in memory (the embedded digits).

  Attributes:
    images: uint8 [N, H, W, C] in 0..255.
    labels: int64 [N] class labels (0..9 for digits).
  """

  def __init__(self, images: np.ndarray, labels: np.ndarray):
    self.images = images
    self.labels = labels

  def __len__(self) -> int:
    return len(self.images)

  def __getitem__(self, indices: np.ndarray) -> np.ndarray:
    """indices: int [n] in [0, N) -> uint8 [n, H, W, C]."""
    return self.images[indices]


def center_crop_and_resize(image: np.ndarray, size: int) -> np.ndarray:
  """Crops the central square of `image` and resizes it to `size` x `size`.

  As ProGAN's `dataset_tool.py create_lsun` prepared LSUN (the format the original DDPM code read
  LSUN from): crop min(h, w) x min(h, w) around the center, then resize with PIL's antialiasing
  Lanczos filter (formerly `PIL.Image.ANTIALIAS`).

  Args:
    image: uint8 [h, w, 3] in 0..255, any h, w.
    size: output side.

  Returns:
    uint8 [size, size, 3] in 0..255.
  """
  height, width = image.shape[:2]
  crop = min(height, width)
  top, left = (height - crop) // 2, (width - crop) // 2
  square = PIL.Image.fromarray(image[top : top + crop, left : left + crop])
  return np.asarray(square.resize((size, size), PIL.Image.Resampling.LANCZOS))


class TfdsSource:
  """Random access to one split of a TFDS dataset prepared in ArrayRecord format.

  Reads and decodes only the requested examples, one by one, and keeps only their images.
  """

  def __init__(self, info: DatasetInfo, split: str, *, data_dir: str | None, image_size: int):
    """Opens the split; raises FileNotFoundError (saying how to prepare it) if it is missing.

    Args:
      info: the dataset, from `DATASETS`.
      split: one of `info.splits`.
      data_dir: the TFDS data_dir holding the prepared dataset; None means TFDS's default
        ($TFDS_DATA_DIR, else ~/tensorflow_datasets).
      image_size: side of the returned images; LSUN images are center-cropped and resized to it.
    """
    self.info = info
    self.image_size = image_size
    tf_support.import_tensorflow()  # Before TFDS, which may import TF to read the data.
    import tensorflow_datasets as tfds  # Only TFDS datasets need it; slow to import.

    try:
      # No `file_format` here: TFDS then opens whichever random-access format the prepared data
      # has, and naming one fails for data prepared in several formats.
      self._source = tfds.data_source(info.name, split=split, data_dir=data_dir, download=False)
    except (KeyError, NotImplementedError) as e:  # Not prepared / prepared as TFRecord only.
      raise FileNotFoundError(_prepare_instructions(info, split, data_dir)) from e

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, indices: np.ndarray) -> np.ndarray:
    """indices: int [n] in [0, len(self)) -> uint8 [n, image_size, image_size, 3]."""
    size = self.image_size
    images = np.empty((len(indices), size, size, self.info.num_channels), np.uint8)
    for row, index in enumerate(indices):
      image = self._source[int(index)]['image']
      if self.info.image_size is None:
        image = center_crop_and_resize(image, size)
      images[row] = image
    return images


def _prepare_instructions(info: DatasetInfo, split: str, data_dir: str | None) -> str:
  where = data_dir or '$TFDS_DATA_DIR or ~/tensorflow_datasets'
  message = (
    f'TFDS dataset {info.name!r} (split {split!r}) is not prepared in ArrayRecord format in '
    f'{where}. Prepare it once, before training, with\n'
    f'  python -c "import tensorflow_datasets as tfds; tfds.data_source({info.name!r}, '
    f"data_dir={data_dir!r}, builder_kwargs={{'file_format': 'array_record'}})\""
  )
  if info.manual_download:
    message += (
      f'\n{info.name!r} needs a manual download first: put the data<size>x<size>.tar files made '
      "with ProGAN's dataset tool in <data_dir>/downloads/manual/ "
      '(https://www.tensorflow.org/datasets/catalog/celeb_a_hq).'
    )
  return message


def create_source(config: ml_collections.ConfigDict, split: str) -> InMemorySource | TfdsSource:
  """Random access to `split` of `config.data.dataset`.

  Returns:
    An object with `len(source)` and `source[indices]` -> uint8 [n, H, W, C] in 0..255 for int
    indices [n], H = W = config.data.image_size, C = config.data.num_channels. For 'digits' it
    is an `InMemorySource`, which also has `labels`.

  Raises:
    ValueError: for an invalid `config.data` (see `get_dataset_info`) or a split the dataset does
      not have.
    FileNotFoundError: for a TFDS dataset not prepared in ArrayRecord format.
  """
  info = get_dataset_info(config)
  if split not in info.splits:
    raise ValueError(
      f'{info.name!r} has no split {split!r}; its splits are: {", ".join(info.splits)}.'
    )
  if info.name == 'digits':
    images, labels = _load_digits()
    indices = _digits_split_indices(split)
    return InMemorySource(images[indices], labels[indices])
  return TfdsSource(info, split, data_dir=config.data.data_dir, image_size=config.data.image_size)


# --------------------------------------------------------------------------------------------
# Order: which examples each process reads at each step.
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Batches, read on a background thread.
# --------------------------------------------------------------------------------------------


_END = object()


@dataclasses.dataclass(frozen=True)
class _Failure:
  error: Exception


class PrefetchIterator(Generic[T], Iterator[T]):
  """Runs an iterator on a background thread, keeping up to `buffer_size` items ready.

  Reading and decoding thus overlap the training step. An exception raised while reading is
  re-raised by `next()`. Use as a context manager, or call `close()`, to stop the thread.
  """

  def __init__(self, items: Iterator[T], buffer_size: int = 2):
    self._queue = queue.Queue(maxsize=buffer_size)
    self._stop = threading.Event()
    self._final: BaseException | None = None  # What every `next()` raises once set.
    self._thread = threading.Thread(
      target=self._produce, args=(items,), name='input_pipeline_prefetch', daemon=True
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


def _process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  """(p, P), defaulting to this JAX process; tests pass them to simulate several processes."""
  if process_index is None:
    process_index = jax.process_index()
  if process_count is None:
    process_count = jax.process_count()
  return process_index, process_count


def train_batches(
  config: ml_collections.ConfigDict,
  *,
  global_batch_size: int,
  start_step: int,
  seed: int,
  process_index: int | None = None,
  process_count: int | None = None,
  buffer_size: int = 2,
) -> PrefetchIterator[tuple[int, np.ndarray]]:
  """Endless training batches from `start_step` on, read `buffer_size` steps ahead.

  Args:
    config: the experiment config; reads `config.data`.
    global_batch_size: B, summed over all processes; P must divide it.
    start_step: the first step to yield (0, or the restored step when resuming).
    seed: the data-order seed; the batches are a function of (seed, step) only.
    process_index: p; None means `jax.process_index()`.
    process_count: P; None means `jax.process_count()`.
    buffer_size: how many steps are read ahead.

  Returns:
    A `PrefetchIterator` yielding `(step, images)` for step = start_step, start_step + 1, ...,
    images uint8 [B / P, H, W, C] in 0..255: this process's share of global batch `step`.
  """
  process_index, process_count = _process(process_index, process_count)
  local_batch_size(global_batch_size, process_count)  # Raise here, not on the reading thread.
  source = create_source(config, 'train')

  def batches() -> Iterator[tuple[int, np.ndarray]]:
    step = start_step
    while True:
      indices = train_indices(
        step=step,
        num_examples=len(source),
        global_batch_size=global_batch_size,
        seed=seed,
        process_index=process_index,
        process_count=process_count,
      )
      yield step, source[indices]
      step += 1

  return PrefetchIterator(batches(), buffer_size)


def eval_batches(
  config: ml_collections.ConfigDict,
  *,
  split: str,
  global_batch_size: int,
  num_examples: int | None = None,
  process_index: int | None = None,
  process_count: int | None = None,
  buffer_size: int = 2,
) -> PrefetchIterator[tuple[np.ndarray, np.ndarray]]:
  """The first `num_examples` examples of `split`, in order, in padded batches of one shape.

  Global batch k is examples [k * B, (k + 1) * B), of which process p reads its contiguous share
  of B / P rows; rows past `num_examples` (in the last batch) are zeros with mask False. Every
  process yields the same number of batches, ceil(num_examples / B).

  Args:
    config: the experiment config; reads `config.data`.
    split: e.g. `get_dataset_info(config).eval_split`.
    global_batch_size: B, summed over all processes; P must divide it.
    num_examples: how many examples to evaluate; None means the whole split.
    process_index: p; None means `jax.process_index()`.
    process_count: P; None means `jax.process_count()`.
    buffer_size: how many batches are read ahead.

  Returns:
    A `PrefetchIterator` yielding `(images, mask)`: images uint8 [B / P, H, W, C] in 0..255,
    mask bool [B / P], True for real examples.
  """
  process_index, process_count = _process(process_index, process_count)
  size = local_batch_size(global_batch_size, process_count)
  source = create_source(config, split)
  if num_examples is None:
    num_examples = len(source)
  if not 0 < num_examples <= len(source):
    raise ValueError(
      f'num_examples must be in [1, {len(source)}] for split {split!r}, got {num_examples}.'
    )
  shape = (size, config.data.image_size, config.data.image_size, config.data.num_channels)

  def batches() -> Iterator[tuple[np.ndarray, np.ndarray]]:
    for batch in range(-(-num_examples // global_batch_size)):
      start = batch * global_batch_size + process_index * size
      positions = np.arange(start, start + size)
      mask = positions < num_examples
      images = np.zeros(shape, np.uint8)
      images[mask] = source[positions[mask]]
      yield images, mask

  return PrefetchIterator(batches(), buffer_size)

"""The host input pipeline on worker processes, decoded once into memory or a prepared copy.

Every way of reading must give the batches of reading on one thread, bit for bit (the expected
values: the source's own examples in the order of `order.train_indices`), resume exactly, name
an example it cannot read, and leave no worker behind its parent.
"""

import os
import signal
import subprocess
import sys
import textwrap
import time
from unittest import mock

import numpy as np
import PIL.Image
import psutil
import pytest
import tensorflow_datasets as tfds
from test_data import make_config, take

from ddpm_jax import data as data_lib
from ddpm_jax.data import decoded, workers
from ddpm_jax.data.order import train_indices

NUM_EXAMPLES = 40  # Of the synthetic cifar10's train split: 5 batches of 8.


@pytest.fixture(scope='module')
def cifar10_dir(tmp_path_factory):
  """A cifar10 of 40 train examples with labels 0..9, written by TFDS's own builder as ArrayRecord
  (PNG-encoded), so that the workers open the files as a real run does."""
  pytest.importorskip('importlib_resources')  # TFDS 4.9.10's download_and_prepare imports it.
  directory = tmp_path_factory.mktemp('tfds')
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (NUM_EXAMPLES, 32, 32, 3), np.uint8)

  def split_generators(self, dl_manager):
    examples = ({'id': f'train_{i}', 'image': x, 'label': i % 10} for i, x in enumerate(images))
    return {'train': enumerate(examples)}

  with mock.patch.object(tfds.builder_cls('cifar10'), '_split_generators', split_generators):
    tfds.data_source(
      'cifar10', data_dir=str(directory), builder_kwargs={'file_format': 'array_record'}
    )
  return str(directory)


def worker_processes(process: psutil.Process | None = None) -> list[psutil.Process]:
  """The spawned workers of `process` (this one by default), not multiprocessing's resource
  tracker, which lives as long as its parent."""
  children = (process or psutil.Process()).children()
  return [child for child in children if 'spawn_main' in ' '.join(child.cmdline())]


def cifar10_config(directory, **data):
  return make_config('cifar10', 32, 3, num_classes=10, data_dir=directory, download=False, **data)


def expected_batch(source, step, **kwargs):
  """The examples of `step` read from `source` directly (in this process, on this thread)."""
  indices = train_indices(step=step, num_examples=NUM_EXAMPLES, global_batch_size=8, **kwargs)
  return {'image': source[indices], 'label': source.labels(indices)}


@pytest.mark.parametrize(
  'reading',
  [
    dict(num_workers=0, cache_gib=0),
    dict(num_workers=1, cache_gib=0),
    dict(num_workers=3, cache_gib=0),
    dict(num_workers=0, cache_gib=1.0),
    dict(num_workers=2, cache_gib=1.0),
    dict(num_workers=2, prepared_dir=True),
  ],
  ids=['thread', '1_worker', '3_workers', 'memory', 'memory_2_workers', 'prepared_2_workers'],
)
def test_every_way_of_reading_gives_the_same_batches_and_resumes(cifar10_dir, tmp_path, reading):
  if reading.get('prepared_dir'):
    reading['prepared_dir'] = str(tmp_path / 'prepared')
  config = cifar10_config(cifar10_dir, **reading)
  source = data_lib.create_source(cifar10_config(cifar10_dir), 'train')
  share = dict(seed=3, process_index=1, process_count=2)
  # 7 steps: past the end of the first epoch (5 batches of 8), as process 1 of 2; then resumed.
  run = take(data_lib.train_batches(config, global_batch_size=8, start_step=0, **share), 7)
  resumed = take(data_lib.train_batches(config, global_batch_size=8, start_step=4, **share), 3)
  for step, batch in run:
    expected = expected_batch(source, step, **share)
    assert batch['image'].shape == (4, 32, 32, 3) and batch['label'].dtype == np.int32
    for key in ('image', 'label'):
      np.testing.assert_array_equal(batch[key], expected[key])
  assert [step for step, _ in resumed] == [4, 5, 6]
  for (_, want), (_, got) in zip(run[4:], resumed, strict=True):
    for key in ('image', 'label'):
      np.testing.assert_array_equal(got[key], want[key])
  assert not worker_processes()  # Every worker has stopped.


def test_a_prepared_copy_is_made_once_and_keyed_by_what_fixes_its_pixels(cifar10_dir, tmp_path):
  prepared_dir = tmp_path / 'prepared'
  config = cifar10_config(cifar10_dir, num_workers=0, prepared_dir=str(prepared_dir))
  take(data_lib.train_batches(config, global_batch_size=8, start_step=0, seed=0), 1)
  [labels_file, images_file] = sorted(prepared_dir.iterdir())
  assert images_file.name.startswith('cifar10-train-') and images_file.suffix == '.npy'
  assert labels_file.name == images_file.name.replace('.npy', '.labels.npy')
  source = data_lib.create_source(config, 'train')
  np.testing.assert_array_equal(np.load(images_file), source[np.arange(NUM_EXAMPLES)])
  # Read again, not made again.
  with mock.patch.object(decoded, 'decode_split', side_effect=AssertionError('decoded again')):
    take(data_lib.train_batches(config, global_batch_size=8, start_step=0, seed=0), 1)
  # Another size is another copy (cifar10 is read as stored, so a folder shows it).
  settings = data_lib.split_settings(config, 'train')
  assert decoded.prepared_key(settings) != decoded.prepared_key(settings | {'image_size': 16})


def test_the_cache_holds_a_split_within_its_budget_only(cifar10_dir):
  split_gib = NUM_EXAMPLES * 32 * 32 * 3 / 2**30
  for cache_gib, cached in [(split_gib, True), (0.99 * split_gib, False), (0, False)]:
    config = cifar10_config(cifar10_dir, num_workers=0, cache_gib=cache_gib)
    with mock.patch.object(decoded, 'in_memory', wraps=decoded.in_memory) as in_memory:
      take(data_lib.train_batches(config, global_batch_size=8, start_step=0, seed=0), 1)
    assert in_memory.called == cached


@pytest.fixture
def folder_with_a_broken_file(tmp_path):
  rng = np.random.default_rng(0)
  for i in range(6):
    PIL.Image.fromarray(rng.integers(0, 256, (8, 8, 3), np.uint8)).save(tmp_path / f'{i}.png')
  (tmp_path / '3.png').write_bytes(b'this is not a PNG')
  return str(tmp_path)


@pytest.mark.parametrize('num_workers', [0, 2])
def test_an_unreadable_file_is_named_wherever_it_is_read(folder_with_a_broken_file, num_workers):
  directory = folder_with_a_broken_file
  message = f'Cannot read image file {directory}/3.png: cannot identify image file'
  config = make_config('folder', 8, 3, image_dir=directory, num_workers=num_workers, cache_gib=0)
  # Batch 0 holds all 6 files; read on a worker and the prefetch thread, the error reaches next().
  batches = data_lib.train_batches(config, global_batch_size=6, start_step=0, seed=0)
  with batches, pytest.raises(ValueError, match=message):
    next(batches)
  # Decoded once into memory at the start: the start raises it.
  config.data.cache_gib = 1.0
  with pytest.raises(ValueError, match=message):
    data_lib.train_batches(config, global_batch_size=6, start_step=0, seed=0)
  assert not worker_processes()


def test_an_unreadable_tfds_example_is_named(cifar10_dir):
  source = data_lib.create_source(cifar10_config(cifar10_dir), 'train')
  damaged = mock.MagicMock()
  damaged.__getitem__.side_effect = OSError('broken data stream when reading image file')
  source._source = damaged
  message = (
    "Cannot read example 7 of split 'train' of TFDS dataset 'cifar10': OSError: broken data stream"
  )
  with pytest.raises(ValueError, match=message):
    source[np.array([7])]


# A run's input pipeline on 2 workers: prints their pids, then waits to be killed.
PARENT = textwrap.dedent(
  """
  import sys, time
  import psutil
  sys.path.insert(0, {repo!r})
  from configs import default
  from ddpm_jax import data

  if __name__ == '__main__':
    config = default.get_config()
    config.data.update(
      dataset='folder', image_size=8, image_dir={directory!r}, num_workers=2, cache_gib=0
    )
    batches = data.train_batches(config, global_batch_size=2, start_step=0, seed=0)
    next(batches)
    workers = [p for p in psutil.Process().children() if 'spawn_main' in ' '.join(p.cmdline())]
    print(' '.join(str(p.pid) for p in workers), flush=True)
    time.sleep(600)
  """
)


def _alive(pid: int) -> bool:
  try:
    return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
  except psutil.NoSuchProcess:
    return False


@pytest.mark.parametrize('kill', [signal.SIGTERM, signal.SIGKILL], ids=['SIGTERM', 'SIGKILL'])
def test_no_worker_outlives_its_parent(tmp_path, kill):
  for i in range(4):
    PIL.Image.fromarray(np.full((8, 8, 3), i, np.uint8)).save(tmp_path / f'{i}.png')
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  script = PARENT.format(repo=repo, directory=str(tmp_path))
  parent = subprocess.Popen(
    [sys.executable, '-c', script], stdout=subprocess.PIPE, text=True, start_new_session=True
  )
  try:
    pids = [int(pid) for pid in parent.stdout.readline().split()]
    assert len(pids) == 2 and all(map(_alive, pids))
    if kill == signal.SIGTERM:  # To the whole group, as a scheduler sends it: workers ignore it.
      os.killpg(parent.pid, kill)
    else:  # The parent alone: its workers must see that it is gone.
      parent.kill()
    parent.wait(timeout=30)
    deadline = time.monotonic() + 10 * workers.PARENT_WATCH_SECONDS + 5
    while any(map(_alive, pids)) and time.monotonic() < deadline:
      time.sleep(0.05)
    assert not any(map(_alive, pids))
  finally:
    if parent.poll() is None:
      os.killpg(parent.pid, signal.SIGKILL)


@pytest.mark.parametrize(
  ('field', 'value'),
  [('num_workers', -1), ('cache_gib', -0.5), ('prepared_dir', '')],
)
def test_bad_pipeline_settings_are_refused_naming_the_field(field, value):
  with pytest.raises(ValueError, match=rf'config\.data\.{field} must be .*, got {value!r}'):
    data_lib.check_config(make_config(**{field: value}))

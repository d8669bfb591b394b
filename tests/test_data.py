"""Tests of ddpm_jax.data on the embedded digits and on TFDS's mocked data sources.

Expected values come from scikit-learn's `load_digits` (1,797 examples, values 0..16), the split
sizes ddpm_jax/data/digits.py documents (1,497 train / 300 test), and the order the lead
specified: global batch s is positions [s * B, (s + 1) * B) of the concatenated per-epoch
permutations, each process reading a contiguous share. TFDS datasets are replaced by
`tfds.testing.mock_data`, which also mocks `tfds.data_source` (deterministic random examples, any
split name accepted), except in one test that writes a tiny real cifar10 in ArrayRecord format
with TFDS's own writer. The crop and resize are checked against `reference_resize`, PIL's
antialiased Lanczos-3 filter re-derived in float64 from its documented algorithm.
tests/test_datasets.py tests the other datasets.
"""

import threading
from unittest import mock

import numpy as np
import pytest
import tensorflow_datasets as tfds
from sklearn.datasets import load_digits

from configs import default
from ddpm_jax import data as data_lib
from ddpm_jax.data import tfds as tfds_data
from ddpm_jax.data.images import center_crop_and_resize
from ddpm_jax.data.order import train_indices
from ddpm_jax.data.prefetch import PrefetchIterator


def make_config(dataset='digits', image_size=8, num_channels=1, *, num_classes=0, **data):
  """The default config reading `dataset`; `data` sets other `config.data` fields, and
  `num_classes` > 0 makes the model class-conditional (the batches then have labels)."""
  config = default.get_config()
  config.data.dataset = dataset
  config.data.image_size = image_size
  config.data.num_channels = num_channels
  for field, value in data.items():
    config.data[field] = value
  if num_classes:  # Only here: the other tests read the default model section as it is.
    config.model.num_classes = num_classes
  return config


def take(iterator, num):
  with iterator:
    return [next(iterator) for _ in range(num)]


def sklearn_label_of():
  """{image bytes: label} of scikit-learn's 1,797 digits, the images scaled to 0..255 as
  ddpm_jax/data/digits.py documents (round(v * 255 / 16)); the 1,797 images are distinct."""
  digits = load_digits()
  images = np.round(digits.images * 255 / 16).astype(np.uint8)[..., None]
  label_of = {
    image.tobytes(): int(label) for image, label in zip(images, digits.target, strict=True)
  }
  assert len(label_of) == 1797
  return label_of


def prefetch_threads():
  return [t for t in threading.enumerate() if t.name == 'data_prefetch']


# ------------------------------------------------------------------------------------------------
# Digits.
# ------------------------------------------------------------------------------------------------


def test_digits_shapes_dtype_and_values():
  train, test = (
    data_lib.create_source(make_config(), 'train'),
    data_lib.create_source(make_config(), 'test'),
  )
  # Split sizes: the module docstring (1,497 + 300 = 1,797, the size of load_digits).
  assert (len(train), len(test)) == (1497, 300)
  assert train.images.shape == (1497, 8, 8, 1) and test.images.shape == (300, 8, 8, 1)
  assert train.images.dtype == np.uint8 and test.images.dtype == np.uint8
  # Values 0..16 map to round(v * 255 / 16): both ends occur in the data, nothing else.
  allowed = np.round(np.arange(17) * 255 / 16).astype(np.uint8)
  values = np.unique(np.concatenate([train.images.ravel(), test.images.ravel()]))
  assert values.min() == 0 and values.max() == 255
  assert np.isin(values, allowed).all()
  assert train.all_labels.shape == (1497,) and test.all_labels.shape == (300,)
  assert set(np.unique(train.all_labels)) == set(range(10))
  # Indexing with an index array returns those rows.
  np.testing.assert_array_equal(train[np.array([5, 0])], train.images[[5, 0]])


def test_digits_splits_are_disjoint_cover_all_and_fixed():
  train, test = (
    data_lib.create_source(make_config(), 'train'),
    data_lib.create_source(make_config(), 'test'),
  )
  # Rows (image bytes + label) of train + test, as a multiset, equal scikit-learn's 1,797 rows.
  digits = load_digits()
  expected = np.round(digits.images * 255 / 16).astype(np.uint8).reshape(1797, 64)

  def rows(images, labels):
    return sorted(
      bytes(i.reshape(64)) + bytes([int(label)]) for i, label in zip(images, labels, strict=True)
    )

  ours = rows(
    np.concatenate([train.images, test.images]), np.concatenate([train.all_labels, test.all_labels])
  )
  assert ours == rows(expected, digits.target)
  # The split is fixed: a second call gives the same test set.
  np.testing.assert_array_equal(data_lib.create_source(make_config(), 'test').images, test.images)


def test_digits_labels_are_sklearns_targets():
  config = make_config(num_classes=10)
  info = data_lib.get_dataset_info(config)
  assert info.class_names == ('0', '1', '2', '3', '4', '5', '6', '7', '8', '9')
  label_of = sklearn_label_of()
  for split, size in (('train', 1497), ('test', 300)):
    source = data_lib.create_source(config, split)
    indices = np.array([size - 1, 0, 17, 17, 5])
    labels = source.labels(indices)
    assert labels.dtype == np.int64 and labels.shape == (5,)
    # Each example's label is scikit-learn's target of the example with its image.
    expected = [label_of[image.tobytes()] for image in source[indices]]
    np.testing.assert_array_equal(labels, expected)
    # The `all_labels` attribute (as ddpm_jax/evaluation.py reads it) agrees.
    np.testing.assert_array_equal(source.all_labels[indices], labels)
    assert source.all_labels.shape == (size,)


# ------------------------------------------------------------------------------------------------
# Order.
# ------------------------------------------------------------------------------------------------


def test_resumed_run_sees_the_same_batches():
  # B = 200 over 1,497 examples: step 7 (positions 1400..1599) straddles the first epoch boundary.
  kwargs = dict(global_batch_size=200, seed=3, process_index=0, process_count=1)
  uninterrupted = take(data_lib.train_batches(make_config(), start_step=0, **kwargs), 10)
  resumed = take(data_lib.train_batches(make_config(), start_step=7, **kwargs), 3)
  assert [step for step, _ in uninterrupted] == list(range(10))
  assert [step for step, _ in resumed] == [7, 8, 9]
  # An unconditional model (config.model.num_classes = 0, the default) gets images only.
  assert all(batch.keys() == {'image'} for _, batch in uninterrupted + resumed)
  for (_, expected), (_, actual) in zip(uninterrupted[7:], resumed, strict=True):
    assert actual['image'].shape == (200, 8, 8, 1) and actual['image'].dtype == np.uint8
    np.testing.assert_array_equal(actual['image'], expected['image'])
  # A different seed gives a different order.
  other = take(data_lib.train_batches(make_config(), start_step=7, **{**kwargs, 'seed': 4}), 1)
  assert not np.array_equal(other[0][1]['image'], resumed[0][1]['image'])


def test_conditional_batches_follow_the_resumable_order():
  # As test_resumed_run_sees_the_same_batches, with labels: B = 200 over 1,497 examples, step 7
  # straddles the first epoch boundary.
  config = make_config(num_classes=10)
  kwargs = dict(global_batch_size=200, seed=3, process_index=0, process_count=1)
  source = data_lib.create_source(config, 'train')
  label_of = sklearn_label_of()
  uninterrupted = take(data_lib.train_batches(config, start_step=0, **kwargs), 10)
  resumed = take(data_lib.train_batches(config, start_step=7, **kwargs), 3)
  unconditional = take(data_lib.train_batches(make_config(), start_step=0, **kwargs), 10)
  for (step, batch), (_, images_only) in zip(uninterrupted, unconditional, strict=True):
    assert batch.keys() == {'image', 'label'}
    assert batch['label'].shape == (200,) and batch['label'].dtype == np.int32
    # The examples of order.train_indices, images and labels.
    indices = train_indices(step=step, num_examples=1497, **kwargs)
    np.testing.assert_array_equal(batch['image'], source[indices])
    np.testing.assert_array_equal(batch['label'], source.labels(indices))
    # Row i's label is scikit-learn's target of the digit in row i.
    np.testing.assert_array_equal(
      batch['label'], [label_of[image.tobytes()] for image in batch['image']]
    )
    # The images are those an unconditional run reads, bit for bit.
    np.testing.assert_array_equal(batch['image'], images_only['image'])
  assert [step for step, _ in resumed] == [7, 8, 9]
  for (_, expected), (_, actual) in zip(uninterrupted[7:], resumed, strict=True):
    np.testing.assert_array_equal(actual['image'], expected['image'])
    np.testing.assert_array_equal(actual['label'], expected['label'])


@pytest.mark.parametrize('num_classes', [0, 10], ids=['unconditional', 'conditional'])
def test_global_batch_does_not_depend_on_process_count(num_classes):
  # Expected: the 4 shares of each step, images (and labels) concatenated, are the batch of one
  # process.
  config = make_config(num_classes=num_classes)
  kwargs = dict(global_batch_size=200, start_step=5, seed=0)
  single = take(data_lib.train_batches(config, process_index=0, process_count=1, **kwargs), 4)
  shares = [
    take(data_lib.train_batches(config, process_index=p, process_count=4, **kwargs), 4)
    for p in range(4)
  ]
  shapes = {'image': (50, 8, 8, 1), **({'label': (50,)} if num_classes else {})}
  for step in range(4):
    assert all(sorted(share[step][1]) == sorted(shapes) for share in shares)
    for key, shape in shapes.items():
      assert all(share[step][1][key].shape == shape for share in shares)
      joined = np.concatenate([share[step][1][key] for share in shares])
      np.testing.assert_array_equal(joined, single[step][1][key])


@pytest.mark.parametrize(
  'num_examples, global_batch_size, process_count',
  [(1497, 499, 1), (10, 4, 2), (7, 16, 4)],
)
def test_every_example_once_per_epoch(num_examples, global_batch_size, process_count):
  num_epochs = 3
  num_steps = -(-num_epochs * num_examples // global_batch_size)
  stream = np.concatenate(
    [
      train_indices(
        step=step,
        num_examples=num_examples,
        global_batch_size=global_batch_size,
        seed=11,
        process_index=p,
        process_count=process_count,
      )
      for step in range(num_steps)
      for p in range(process_count)
    ]
  )
  epochs = stream[: num_epochs * num_examples].reshape(num_epochs, num_examples)
  for epoch in epochs:
    np.testing.assert_array_equal(np.sort(epoch), np.arange(num_examples))
  # Each epoch has its own permutation (equal ones would have probability 1 / N!).
  assert not np.array_equal(epochs[0], epochs[1])


def test_batch_not_divisible_by_process_count_raises():
  with pytest.raises(ValueError, match=r'global batch size \(130\).*processes \(4\)'):
    data_lib.train_batches(
      make_config(), global_batch_size=130, start_step=0, seed=0, process_index=0, process_count=4
    )
  with pytest.raises(ValueError, match='multiple of the number of processes'):
    data_lib.eval_batches(
      make_config(), split='test', global_batch_size=6, process_index=0, process_count=4
    )


# ------------------------------------------------------------------------------------------------
# Config validation.
# ------------------------------------------------------------------------------------------------


def test_unknown_dataset_lists_the_known_ones():
  # 'mnistt' is neither in DATASETS, nor 'folder', nor a TFDS name; difflib ranks TFDS's 'mnist'
  # closest to it.
  with pytest.raises(ValueError, match="Unknown dataset 'mnistt'") as error:
    data_lib.get_dataset_info(make_config(dataset='mnistt'))
  for name in ('digits', 'cifar10', 'celeb_a_hq/256', 'lsun/church_outdoor', 'lsun/cat', 'folder'):
    assert name in str(error.value)
  assert 'Closest names: mnist,' in str(error.value)


@pytest.mark.parametrize(
  'dataset, image_size, num_channels, message',
  [
    ('cifar10', 64, 3, r"image_size = 64, but 'cifar10' images are 32x32"),
    ('digits', 8, 3, r"num_channels = 3, but 'digits' images have 1 channel"),
    ('lsun/bedroom', 0, 3, 'positive int'),
  ],
)
def test_inconsistent_image_shape_raises(dataset, image_size, num_channels, message):
  with pytest.raises(ValueError, match=message):
    data_lib.get_dataset_info(make_config(dataset, image_size, num_channels))


def test_num_classes_must_be_the_datasets_class_count():
  with pytest.raises(
    ValueError,
    match=r"config.model.num_classes = 9, but 'digits' has 10 classes \(0, 1, 2, .*, 9\)",
  ):
    data_lib.check_config(make_config(num_classes=9))
  # The paper's LSUN and CelebA-HQ have no tfds.features.ClassLabel (TFDS's features: image, id
  # or image/filename), so a class-conditional model has nothing to condition on.
  with pytest.raises(ValueError, match=r"num_classes = 2 .* 'lsun/bedroom' has no class labels"):
    data_lib.get_dataset_info(make_config('lsun/bedroom', 64, 3, num_classes=2))
  assert data_lib.get_dataset_info(make_config('lsun/bedroom', 64, 3)).class_names is None


def test_paper_datasets_labels_are_their_tfds_class_labels():
  # Each PAPER_DATASETS entry names TFDS's own ClassLabel (the builder's features, read from
  # TFDS's code without a download): cifar10's 'label' with 10 classes, none for the others.
  for name, info in tfds_data.PAPER_DATASETS.items():
    features = tfds.builder(name).info.features
    class_labels = {
      key: feature.num_classes
      for key, feature in features.items()
      if isinstance(feature, tfds.features.ClassLabel)
    }
    expected = {info.label_key: len(info.class_names)} if info.class_names else {}
    assert class_labels == expected, name
  assert tfds_data.PAPER_DATASETS['cifar10'].class_names[:3] == ('airplane', 'automobile', 'bird')


def test_dataset_info_and_missing_split():
  info = data_lib.get_dataset_info(make_config('lsun/church_outdoor', 256, 3))
  assert (info.image_size, info.eval_split) == (None, 'validation')
  with pytest.raises(
    ValueError, match="'celeb_a_hq/256' has no split 'test'; its splits are: train"
  ):
    data_lib.create_source(make_config('celeb_a_hq/256', 256, 3), 'test')


def test_unprepared_tfds_dataset_says_how_to_prepare(tmp_path):
  # With config.data.download = False the pipeline does not prepare the data but names the
  # command that does (the one test_cifar10_from_real_array_record_files runs).
  config = make_config('cifar10', 32, 3, data_dir=str(tmp_path), download=False)
  with pytest.raises(FileNotFoundError, match="'file_format': 'array_record'") as error:
    data_lib.create_source(config, 'test')
  assert 'config.data.download = False' in str(error.value)
  assert f"tfds.data_source('cifar10', data_dir='{tmp_path}'" in str(error.value)
  assert not any(tmp_path.iterdir())  # Nothing downloaded.


# ------------------------------------------------------------------------------------------------
# TFDS datasets (mocked).
# ------------------------------------------------------------------------------------------------


def test_cifar10_through_mocked_data_source():
  config = make_config('cifar10', 32, 3)
  with tfds.testing.mock_data(num_examples=12):
    source = data_lib.create_source(config, 'train')
    reference = tfds.data_source('cifar10', split='train')
    assert len(source) == 12
    images = source[np.array([5, 2])]
    assert images.shape == (2, 32, 32, 3) and images.dtype == np.uint8
    np.testing.assert_array_equal(images, np.stack([reference[5]['image'], reference[2]['image']]))
    # Process 1 of 2 reads rows 4..7 of global batch 3 (B = 8).
    [(step, batch)] = take(
      data_lib.train_batches(
        config, global_batch_size=8, start_step=3, seed=0, process_index=1, process_count=2
      ),
      1,
    )
    expected = train_indices(
      step=3, num_examples=12, global_batch_size=8, seed=0, process_index=1, process_count=2
    )
    assert step == 3 and batch['image'].shape == (4, 32, 32, 3)
    np.testing.assert_array_equal(batch['image'], source[expected])


def test_cifar10_labels_through_mocked_data_source():
  config = make_config('cifar10', 32, 3, num_classes=10)
  with tfds.testing.mock_data(num_examples=12):
    info = data_lib.get_dataset_info(config)
    source = data_lib.create_source(config, 'train')
    reference = tfds.data_source('cifar10', split='train')
    # The label feature read through TFDS directly (the mocked examples are deterministic).
    expected_labels = np.array([reference[i]['label'] for i in range(12)])
    assert len(set(expected_labels)) > 1
    assert (info.label_key, len(info.class_names)) == ('label', 10)
    # Labels asked before the images, and after them (then kept from reading the images).
    np.testing.assert_array_equal(source.labels(np.array([5, 2])), expected_labels[[5, 2]])
    source[np.arange(12)]
    np.testing.assert_array_equal(source.labels(np.arange(12)), expected_labels)
    [(_, batch)] = take(
      data_lib.train_batches(
        config, global_batch_size=8, start_step=3, seed=0, process_index=1, process_count=2
      ),
      1,
    )
  expected = train_indices(
    step=3, num_examples=12, global_batch_size=8, seed=0, process_index=1, process_count=2
  )
  np.testing.assert_array_equal(batch['label'], expected_labels[expected])
  np.testing.assert_array_equal(
    batch['image'], np.stack([reference[int(i)]['image'] for i in expected])
  )


def test_cifar10_from_real_array_record_files(tmp_path):
  # Not mocked: TFDS's own writer prepares a 6 + 3 example cifar10 (PNG-encoded, ArrayRecord)
  # with the command `_prepare_instructions` prints, and the source decodes it back.
  pytest.importorskip('importlib_resources')  # TFDS 4.9.10's download_and_prepare imports it.
  rng = np.random.default_rng(0)
  images = {
    'train': rng.integers(0, 256, (6, 32, 32, 3), np.uint8),
    'test': rng.integers(0, 256, (3, 32, 32, 3), np.uint8),
  }

  def split_generators(self, dl_manager):
    return {
      split: ((i, {'id': f'{split}_{i}', 'image': image, 'label': 0}) for i, image in enumerate(x))
      for split, x in images.items()
    }

  with mock.patch.object(tfds.builder_cls('cifar10'), '_split_generators', split_generators):
    tfds.data_source(
      'cifar10', data_dir=str(tmp_path), builder_kwargs={'file_format': 'array_record'}
    )
  source = data_lib.create_source(make_config('cifar10', 32, 3, data_dir=str(tmp_path)), 'test')
  read = source[np.arange(3)]
  assert len(source) == 3 and read.dtype == np.uint8
  # TFDS shuffles examples when it writes them: compare as sets of images.
  assert sorted(x.tobytes() for x in read) == sorted(x.tobytes() for x in images['test'])


# An independent reference for `center_crop_and_resize`: PIL's antialiased Lanczos-3 resize
# re-derived in float64 from its documented algorithm (Pillow's src/libImaging/Resample.c). Each
# output pixel i along an axis of n -> m samples is centered at (i + 0.5) * n / m in input
# coordinates; the filter lanczos3(x) = sinc(x) sinc(x / 3) on [-3, 3) is stretched by
# s = max(n / m, 1) (antialiasing when downscaling), its weights over the inputs j with
# |j + 0.5 - center| < 3 s are normalized to sum 1, and the horizontal pass is rounded to uint8
# before the vertical one, as PIL stores it. PIL's 22-bit fixed-point weights can move a value by
# 1 level.


def _lanczos3(x):
  return np.where((x >= -3) & (x < 3), np.sinc(x) * np.sinc(x / 3), 0.0)


def _resample_matrix(in_size, out_size):
  """float64 [out_size, in_size]: row i holds the normalized weights of output sample i."""
  scale = in_size / out_size
  filter_scale = max(scale, 1.0)
  support = 3.0 * filter_scale
  matrix = np.zeros((out_size, in_size))
  for i in range(out_size):
    center = (i + 0.5) * scale
    lo, hi = max(int(center - support + 0.5), 0), min(int(center + support + 0.5), in_size)
    weights = _lanczos3((np.arange(lo, hi) - center + 0.5) / filter_scale)
    matrix[i, lo:hi] = weights / weights.sum()
  return matrix


def reference_resize(image, size):
  """uint8 [h, w, C] -> uint8 [size, size, C], PIL's Lanczos resize re-derived (above)."""
  height, width, _ = image.shape

  def round_to_uint8(x):
    return np.clip(np.floor(x + 0.5), 0, 255)

  rows = np.einsum('oj,ijc->ioc', _resample_matrix(width, size), image.astype(np.float64))
  columns = np.einsum('oi,ijc->ojc', _resample_matrix(height, size), round_to_uint8(rows))
  return round_to_uint8(columns).astype(np.uint8)


def reference_center_crop(image):
  """The central min(h, w) square, offsets rounded down as in ProGAN's create_lsun."""
  height, width, _ = image.shape
  crop = min(height, width)
  top, left = (height - crop) // 2, (width - crop) // 2
  return image[top : top + crop, left : left + crop]


def assert_close_to_reference(actual, expected):
  """At most 1 level apart (PIL's fixed-point weights), and equal in >= 99% of the values."""
  difference = np.abs(actual.astype(np.int64) - expected.astype(np.int64))
  assert difference.max() <= 1, difference.max()
  assert (difference == 0).mean() >= 0.99


def test_lsun_images_are_center_cropped_and_resized():
  config = make_config('lsun/church_outdoor', 16, 3)
  with tfds.testing.mock_data(num_examples=4):
    source = data_lib.create_source(config, 'validation')
    raw = [
      tfds.data_source('lsun/church_outdoor', split='validation')[i]['image'] for i in range(4)
    ]
    images = source[np.arange(4)]
  # The mocked JPEGs have random sizes 5..49 per side, so this exercises the crop and resize.
  assert any(r.shape[0] != r.shape[1] for r in raw)
  assert images.shape == (4, 16, 16, 3) and images.dtype == np.uint8
  for image, r in zip(images, raw, strict=True):
    assert_close_to_reference(image, reference_resize(reference_center_crop(r), 16))


@pytest.mark.parametrize(
  'shape, size',
  [((40, 61, 3), 16), ((61, 40, 3), 16), ((28, 28, 1), 32), ((33, 50, 1), 7)],
)
def test_center_crop_and_resize_matches_an_independent_lanczos(shape, size):
  # A random image (not constant, so that a misplaced crop, a swapped axis or another filter
  # shows): the central square, offset (61 - 40) // 2 = 10 along the longer side, downscaled
  # 40 -> 16 and 33 -> 7 (antialiased) and upscaled 28 -> 32, against the float64 reference.
  image = np.random.default_rng(sum(shape)).integers(0, 256, shape, np.uint8)
  actual = center_crop_and_resize(image, size)
  assert actual.shape == (size, size, shape[2]) and actual.dtype == np.uint8
  assert_close_to_reference(actual, reference_resize(reference_center_crop(image), size))


# ------------------------------------------------------------------------------------------------
# Evaluation batches and prefetching.
# ------------------------------------------------------------------------------------------------


def test_eval_batches_pad_the_last_batch_and_mask_it():
  config = make_config()
  test = data_lib.create_source(config, 'test')
  # 150 examples in batches of 64: 64 + 64 + 22 real rows, the last batch padded by 42 zero rows.
  batches = list(
    data_lib.eval_batches(
      config, split='test', global_batch_size=64, num_examples=150, process_index=0, process_count=1
    )
  )
  assert [int(mask.sum()) for _, mask in batches] == [64, 64, 22]
  assert all(batch.keys() == {'image'} for batch, _ in batches)
  assert all(b['image'].shape == (64, 8, 8, 1) and b['image'].dtype == np.uint8 for b, _ in batches)
  images = np.concatenate([batch['image'] for batch, _ in batches])
  masks = np.concatenate([mask for _, mask in batches])
  np.testing.assert_array_equal(masks, np.arange(192) < 150)
  np.testing.assert_array_equal(images[:150], test.images[:150])
  assert not images[150:].any()
  # Four processes: the same number of batches each, and their shares make up the same batches.
  shares = [
    list(
      data_lib.eval_batches(
        config,
        split='test',
        global_batch_size=64,
        num_examples=150,
        process_index=p,
        process_count=4,
      )
    )
    for p in range(4)
  ]
  assert [len(share) for share in shares] == [3, 3, 3, 3]
  for k, (expected_batch, expected_mask) in enumerate(batches):
    joined = np.concatenate([s[k][0]['image'] for s in shares])
    np.testing.assert_array_equal(joined, expected_batch['image'])
    np.testing.assert_array_equal(np.concatenate([s[k][1] for s in shares]), expected_mask)


def test_conditional_eval_batches_pad_labels_with_zeros():
  config = make_config(num_classes=10)
  test = data_lib.create_source(config, 'test')
  kwargs = dict(split='test', global_batch_size=64, num_examples=150)
  batches = list(data_lib.eval_batches(config, process_index=0, process_count=1, **kwargs))
  assert all(
    batch['label'].shape == (64,) and batch['label'].dtype == np.int32 for batch, _ in batches
  )
  labels = np.concatenate([batch['label'] for batch, _ in batches])
  images = np.concatenate([batch['image'] for batch, _ in batches])
  masks = np.concatenate([mask for _, mask in batches])
  # The first 150 test examples, each with scikit-learn's target of its image, then 42 padded
  # rows: label 0, mask False.
  label_of = sklearn_label_of()
  np.testing.assert_array_equal(images[:150], test.images[:150])
  np.testing.assert_array_equal(labels[:150], [label_of[image.tobytes()] for image in images[:150]])
  np.testing.assert_array_equal(masks, np.arange(192) < 150)
  assert not labels[150:].any() and not images[150:].any()
  # Four processes' shares make up the same batches, labels included.
  shares = [
    list(data_lib.eval_batches(config, process_index=p, process_count=4, **kwargs))
    for p in range(4)
  ]
  for k, (expected, _) in enumerate(batches):
    for key in ('image', 'label'):
      joined = np.concatenate([share[k][0][key] for share in shares])
      np.testing.assert_array_equal(joined, expected[key])


def test_eval_num_examples_out_of_range_raises():
  with pytest.raises(ValueError, match=r'num_examples must be in \[1, 300\]'):
    data_lib.eval_batches(make_config(), split='test', global_batch_size=8, num_examples=301)


def test_prefetch_reraises_errors_and_shuts_down():
  def failing():
    yield 1
    yield 2
    raise RuntimeError('bad record')

  with PrefetchIterator(failing()) as iterator:
    assert [next(iterator), next(iterator)] == [1, 2]
    with pytest.raises(RuntimeError, match='bad record'):
      next(iterator)
  # An endless iterator, closed while its thread is blocked on a full buffer.
  before = set(prefetch_threads())
  iterator = data_lib.train_batches(make_config(), global_batch_size=8, start_step=0, seed=0)
  next(iterator)
  assert len(set(prefetch_threads()) - before) == 1
  iterator.close()
  assert set(prefetch_threads()) <= before
  with pytest.raises(StopIteration):
    next(iterator)

"""Tests of the datasets beyond the paper's: any TFDS image dataset, and a folder of images.

Expected values come from the examples themselves, put through independent references:
`tfds.testing.mock_data` gives deterministic random examples of a dataset's features (sides 5..49
where a side is variable; any split name is accepted), and the folder tests write their own PNG
and JPEG files. Resizing is checked against `reference_resize` (tests/test_data.py:
PIL's antialiased Lanczos-3 filter re-derived in float64), greyscale against the ITU-R 601-2 luma
in float64 and PIL's `convert('L')`, the order against the one ddpm_jax/data/order.py
specifies (a folder: sorted relative paths; batches: `train_indices`). Two tests prepare a tiny
mnist for real with TFDS's own writer (its download replaced by examples made here).
"""

import os
import pathlib
from unittest import mock

import jax
import numpy as np
import PIL.Image
import pytest
import tensorflow_datasets as tfds
from absl import flags
from helpers import REPO
from jax.experimental import multihost_utils
from ml_collections import config_flags
from test_data import (
  assert_close_to_reference,
  make_config,
  reference_center_crop,
  reference_resize,
  take,
)

from ddpm_jax import checks
from ddpm_jax import data as data_lib
from ddpm_jax.data.images import convert_channels, to_luma
from ddpm_jax.data.order import train_indices


def mocked_images(name, num):
  return [tfds.data_source(name, split='train')[i]['image'] for i in range(num)]


# ------------------------------------------------------------------------------------------------
# Any TFDS image dataset (mocked).
# ------------------------------------------------------------------------------------------------


def test_mnist_greyscale_28_is_resized_to_32_and_made_rgb():
  config = make_config('mnist', 32, 3)
  with tfds.testing.mock_data(num_examples=6):
    info = data_lib.get_dataset_info(config)
    source = data_lib.create_source(config, 'train')
    images = source[np.arange(6)]
    raw = mocked_images('mnist', 6)
  # mnist's TFDS feature is 'image': Image(shape=(28, 28, 1), dtype=uint8).
  assert (info.image_key, info.image_size, info.num_channels) == ('image', 28, 1)
  assert len(source) == 6 and images.shape == (6, 32, 32, 3) and images.dtype == np.uint8
  for image, r in zip(images, raw, strict=True):
    assert r.shape == (28, 28, 1)
    # Grey -> RGB repeats the channel; 28 -> 32 is PIL's Lanczos upscale of the whole image.
    np.testing.assert_array_equal(image, np.repeat(image[..., :1], 3, axis=-1))
    assert_close_to_reference(image[..., :1], reference_resize(r, 32))


def test_flowers_of_varying_size_are_cropped_resized_and_made_grey():
  config = make_config('oxford_flowers102', 16, 1)
  with tfds.testing.mock_data(num_examples=5):
    info = data_lib.get_dataset_info(config)
    images = data_lib.create_source(config, 'train')[np.arange(5)]
    raw = mocked_images('oxford_flowers102', 5)
  # Image(shape=(None, None, 3)): no fixed size; the mocked sides vary, so each is cropped.
  assert (info.image_key, info.image_size, info.num_channels) == ('image', None, 3)
  assert any(r.shape[0] != r.shape[1] for r in raw)
  assert images.shape == (5, 16, 16, 1) and images.dtype == np.uint8
  for image, r in zip(images, raw, strict=True):
    # The luma first (PIL's own RGB -> L conversion), then the crop and resize.
    luma = np.asarray(PIL.Image.fromarray(r).convert('L'))[..., None]
    assert_close_to_reference(image, reference_resize(reference_center_crop(luma), 16))


def test_luma_is_itu_r_601_2_as_pil_computes_it():
  rng = np.random.default_rng(0)
  rgb = np.concatenate(
    [rng.integers(0, 256, (4000, 3)), [[0, 0, 0], [255, 255, 255], [255, 0, 0], [0, 0, 255]]]
  ).astype(np.uint8)[None]
  luma = to_luma(rgb)
  assert luma.shape == (1, 4004, 1) and luma.dtype == np.uint8
  # ITU-R 601-2: L = 0.299 R + 0.587 G + 0.114 B, rounded; PIL's 16-bit fixed-point weights are
  # within 6e-6 of these, which moves the value by less than 0.004 before rounding.
  exact = rgb.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
  assert np.abs(luma[..., 0] - exact).max() <= 0.504
  np.testing.assert_array_equal(luma[0, -4:, 0], [0, 255, 76, 29])  # round(255 * weight).
  # Bit-identical to PIL's conversion, which the folder images of a greyscale run go through.
  np.testing.assert_array_equal(luma[..., 0], np.asarray(PIL.Image.fromarray(rgb).convert('L')))
  # Alpha is dropped; grey -> RGB repeats.
  rgba = np.concatenate([rgb, np.full_like(rgb[..., :1], 7)], axis=-1)
  np.testing.assert_array_equal(convert_channels(rgba, 3), rgb)
  np.testing.assert_array_equal(convert_channels(rgba, 1), luma)
  np.testing.assert_array_equal(convert_channels(luma, 3), np.repeat(luma, 3, axis=-1))


def test_tfds_order_is_deterministic_and_resumable():
  config = make_config('tf_flowers', 8, 3)
  kwargs = dict(global_batch_size=4, seed=5, process_index=0, process_count=1)
  with tfds.testing.mock_data(num_examples=7):
    source = data_lib.create_source(config, 'train')
    uninterrupted = take(data_lib.train_batches(config, start_step=0, **kwargs), 5)
    resumed = take(data_lib.train_batches(config, start_step=3, **kwargs), 2)
    for step, batch in uninterrupted:
      # Batch s is examples train_indices(s) of the split (positions 4 s .. 4 s + 3 of the
      # stream of per-epoch permutations of 7 examples; steps 1 and 3 straddle epochs).
      indices = train_indices(step=step, num_examples=7, **kwargs)
      np.testing.assert_array_equal(batch['image'], source[indices])
  for (_, expected), (_, actual) in zip(uninterrupted[3:], resumed, strict=True):
    np.testing.assert_array_equal(actual['image'], expected['image'])


def test_mnist_labels_are_its_label_feature():
  config = make_config('mnist', 32, 3, num_classes=10)
  kwargs = dict(global_batch_size=4, seed=1, process_index=0, process_count=1)

  def labels(split):
    """The ground truth: the label feature of each example, read through TFDS directly."""
    return np.array([tfds.data_source('mnist', split=split)[i]['label'] for i in range(7)])

  with tfds.testing.mock_data(num_examples=7):
    info = data_lib.get_dataset_info(config)
    expected, expected_test = labels('train'), labels('test')
    images = data_lib.create_source(config, 'train')[np.arange(7)]
    uninterrupted = take(data_lib.train_batches(config, start_step=0, **kwargs), 4)
    resumed = take(data_lib.train_batches(config, start_step=2, **kwargs), 2)
    shares = [
      take(
        data_lib.train_batches(
          config, start_step=0, **{**kwargs, 'process_index': p, 'process_count': 2}
        ),
        4,
      )
      for p in range(2)
    ]
    evaluated = list(
      data_lib.eval_batches(config, split='test', global_batch_size=4, process_count=1)
    )
  # mnist's TFDS feature 'label': ClassLabel(num_classes=10), names '0'..'9'.
  assert info.label_key == 'label' and info.class_names == tuple(str(d) for d in range(10))
  # The mocked images are distinct: each identifies its example.
  example_of = {image.tobytes(): i for i, image in enumerate(images)}
  assert len(example_of) == 7 and len(set(expected)) > 1
  for step, batch in uninterrupted:
    indices = train_indices(step=step, num_examples=7, **kwargs)
    np.testing.assert_array_equal(batch['label'], expected[indices])
    rows = [example_of[image.tobytes()] for image in batch['image']]
    np.testing.assert_array_equal(batch['label'], expected[rows])
    joined = {key: np.concatenate([s[step][1][key] for s in shares]) for key in batch}
    np.testing.assert_array_equal(joined['image'], batch['image'])
    np.testing.assert_array_equal(joined['label'], batch['label'])
  for (_, want), (_, got) in zip(uninterrupted[2:], resumed, strict=True):
    np.testing.assert_array_equal(got['label'], want['label'])
    np.testing.assert_array_equal(got['image'], want['image'])
  # 7 test examples in batches of 4: the 8th row is padding, label 0 and mask False.
  eval_labels = np.concatenate([batch['label'] for batch, _ in evaluated])
  np.testing.assert_array_equal(eval_labels, [*expected_test, 0])
  np.testing.assert_array_equal(np.concatenate([m for _, m in evaluated]), np.arange(8) < 7)


def test_label_key_picks_the_class_label_feature(monkeypatch):
  # oxford_iiit_pet's ClassLabel features (TFDS's builder): 'label' (37 breeds, the default) and
  # 'species' (Cat, Dog).
  info = data_lib.get_dataset_info(make_config('oxford_iiit_pet', 32, 3, num_classes=37))
  assert info.label_key == 'label' and info.class_names[:2] == ('Abyssinian', 'american_bulldog')
  config = make_config('oxford_iiit_pet', 32, 3, num_classes=2, label_key='species')
  info = data_lib.get_dataset_info(config)
  assert (info.label_key, info.class_names) == ('species', ('Cat', 'Dog'))

  # A dataset whose only ClassLabel is not named 'label' (mnist's features renamed): that one.
  def features_info(self):
    features = tfds.features.FeaturesDict(
      {
        'image': tfds.features.Image(shape=(28, 28, 1)),
        'digit': tfds.features.ClassLabel(names=['zero', 'one', 'two']),
      }
    )
    return tfds.core.DatasetInfo(builder=self, features=features)

  monkeypatch.setattr(tfds.builder_cls('mnist'), '_info', features_info)
  config = make_config('mnist', 28, 1, num_classes=3)
  with tfds.testing.mock_data(num_examples=5):
    info = data_lib.get_dataset_info(config)
    labels = data_lib.create_source(config, 'train').labels(np.arange(5))
    expected = [tfds.data_source('mnist', split='train')[i]['digit'] for i in range(5)]
  assert (info.label_key, info.class_names) == ('digit', ('zero', 'one', 'two'))
  np.testing.assert_array_equal(labels, expected)


@pytest.mark.parametrize(
  'name, label_key, message',
  [
    # dsprites' ClassLabels (TFDS's builder) are its five latent factors.
    (
      'dsprites',
      None,
      r'several tfds.features.ClassLabel features \(label_shape, label_scale, '
      r"label_orientation, label_x_position, label_y_position\) and none named 'label': set "
      'config.data.label_key',
    ),
    (
      'mnist',
      'image',
      r"config.data.label_key = 'image' is not a tfds.features.ClassLabel feature of TFDS "
      r"dataset 'mnist'; its ClassLabel features: label\.",
    ),
    # lfw's 'label' is the person's name as Text, not a ClassLabel.
    ('lfw', 'label', 'not a tfds.features.ClassLabel .* its ClassLabel features: none'),
    ('lfw', None, r"config.model.num_classes = 3 .* 'lfw' has no class labels"),
    ('mnist', None, r"config.model.num_classes = 3, but 'mnist' has 10 classes \(0, 1, .*, 9\)"),
  ],
)
def test_tfds_labels_that_cannot_be_read_are_rejected(name, label_key, message):
  config = make_config(name, 32, 3, num_classes=3, label_key=label_key)
  with pytest.raises(ValueError, match=message):
    data_lib.get_dataset_info(config)
  # Unconditional, the same config is valid: the labels are not read.
  config.model.num_classes = 0
  data_lib.get_dataset_info(config)


@pytest.mark.parametrize('process_index', [0, 1])
def test_first_use_prepares_on_process_0_while_the_others_wait(monkeypatch, process_index):
  # As the Flax examples: process 0 downloads and prepares in ArrayRecord format, every process
  # then meets the others at one barrier and opens the data.
  prepared, barriers = [], []

  def download_and_prepare(builder, **kwargs):
    prepared.append((builder.name, builder.info.file_format.value))

  monkeypatch.setattr(jax, 'process_index', lambda: process_index)
  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  monkeypatch.setattr(multihost_utils, 'sync_global_devices', barriers.append)
  # Patched inside mock_data, which restores its own patch of download_and_prepare on exit.
  with (
    tfds.testing.mock_data(num_examples=3),
    mock.patch.object(tfds.core.DatasetBuilder, 'download_and_prepare', download_and_prepare),
  ):
    assert len(data_lib.create_source(make_config('mnist', 28, 1), 'train')) == 3
  assert prepared == ([('mnist', 'array_record')] if process_index == 0 else [])
  assert barriers == ['ddpm_jax: TFDS dataset mnist prepared']


def test_download_false_neither_prepares_nor_waits(monkeypatch):
  def fail(*args, **kwargs):
    raise AssertionError('Prepared or waited with config.data.download = False.')

  monkeypatch.setattr(multihost_utils, 'sync_global_devices', fail)
  with (
    tfds.testing.mock_data(num_examples=3),
    mock.patch.object(tfds.core.DatasetBuilder, 'download_and_prepare', fail),
  ):
    assert len(data_lib.create_source(make_config('mnist', 28, 1, download=False), 'train')) == 3


def test_download_false_and_unprepared_names_the_prepare_command(tmp_path):
  config = make_config('mnist', 28, 1, data_dir=str(tmp_path), download=False)
  with pytest.raises(FileNotFoundError, match='config.data.download = False') as error:
    data_lib.create_source(config, 'train')
  assert (
    f"tfds.data_source('mnist', data_dir='{tmp_path}', "
    "builder_kwargs={'file_format': 'array_record'})"
  ) in str(error.value)
  assert not any(tmp_path.iterdir())


def test_other_process_finding_no_data_says_data_dir_must_be_shared(tmp_path, monkeypatch):
  # Process 1 of 2 does not prepare; after the barrier it finds nothing in its data_dir (as a
  # host whose local disk process 0 did not write to would).
  monkeypatch.setattr(jax, 'process_index', lambda: 1)
  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  monkeypatch.setattr(multihost_utils, 'sync_global_devices', lambda name: None)
  with pytest.raises(FileNotFoundError, match='storage that all of them see'):
    data_lib.create_source(make_config('mnist', 28, 1, data_dir=str(tmp_path)), 'train')


def test_missing_manual_download_says_where_it_goes(tmp_path):
  # celeb_a_hq cannot be downloaded by TFDS: preparing it on first use fails (TFDS raises an
  # AssertionError about the empty manual directory), and the error says what to put where.
  config = make_config('celeb_a_hq/256', 256, 3, data_dir=str(tmp_path))
  with pytest.raises(FileNotFoundError, match='without its manual download') as error:
    data_lib.create_source(config, 'train')
  assert "the data<size>x<size>.tar files made with ProGAN's dataset tool" in str(error.value)
  assert "'file_format': 'array_record'" in str(error.value)


def prepare_mnist_for_real(monkeypatch, splits, labels=(0, 1, 2, 3)):
  """Makes TFDS's mnist builder generate `splits` from 4 random images each, not a download;
  image i has label `labels[i]`."""
  images = {
    split: np.random.default_rng(i).integers(0, 256, (4, 28, 28, 1), np.uint8)
    for i, split in enumerate(splits)
  }

  def split_generators(self, dl_manager):
    return {
      split: (
        (f'{split}_{i}', {'image': image, 'label': label})
        for i, (image, label) in enumerate(zip(x, labels, strict=True))
      )
      for split, x in images.items()
    }

  monkeypatch.setattr(tfds.builder_cls('mnist'), '_split_generators', split_generators)
  return images


@pytest.mark.parametrize(
  'splits, eval_split',
  [
    (('train', 'test'), 'test'),
    (('train', 'validation'), 'validation'),
    (('train', 'validation', 'test'), 'test'),
    (('train',), None),
  ],
)
def test_first_use_prepares_for_real_and_then_knows_the_eval_split(
  tmp_path, monkeypatch, splits, eval_split
):
  pytest.importorskip('importlib_resources')  # TFDS 4.9.10's download_and_prepare imports it.
  images = prepare_mnist_for_real(monkeypatch, splits)
  config = make_config('mnist', 28, 1, data_dir=str(tmp_path))
  # Unprepared, TFDS does not know the split names yet.
  assert data_lib.get_dataset_info(config).splits == ()
  source = data_lib.create_source(config, 'train')  # Prepares the dataset (download = True).
  assert any(tmp_path.glob('mnist/*/*.array_record*'))
  read = source[np.arange(4)]
  # TFDS shuffles examples when it writes them: compare as sets of images.
  assert sorted(x.tobytes() for x in read) == sorted(x.tobytes() for x in images['train'])
  # Prepared, the eval split is 'test', else 'validation', else none (the module docstring).
  info = data_lib.get_dataset_info(config)
  assert sorted(info.splits) == sorted(splits) and info.eval_split == eval_split


def test_labels_from_real_array_record_files(tmp_path, monkeypatch):
  # Not mocked: TFDS's own writer prepares mnist with the labels 3, 0, 2 and -1 (TFDS's "no
  # class") on the four images, and shuffles them as it writes; each image read keeps its label.
  pytest.importorskip('importlib_resources')  # TFDS 4.9.10's download_and_prepare imports it.
  written_labels = (3, 0, 2, -1)
  images = prepare_mnist_for_real(monkeypatch, ('train',), written_labels)
  written = {x.tobytes(): label for x, label in zip(images['train'], written_labels, strict=True)}
  config = make_config('mnist', 28, 1, data_dir=str(tmp_path), num_classes=10)
  source = data_lib.create_source(config, 'train')
  read = [written[x.tobytes()] for x in source[np.arange(4)]]
  labelled = np.array([i for i in range(4) if read[i] >= 0])
  np.testing.assert_array_equal(source.labels(labelled), [read[i] for i in labelled])
  unlabelled = read.index(-1)
  with pytest.raises(
    ValueError, match=f"Example {unlabelled} of split 'train' of TFDS dataset 'mnist' has label -1"
  ):
    source.labels(np.arange(4))


# ------------------------------------------------------------------------------------------------
# Config errors, all raised by get_dataset_info / checks.check_config: before anything compiles.
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
  'name, closest',
  [('mnistt', 'mnist'), ('cifar-10', 'cifar10'), ('oxford_flower102', 'oxford_flowers102')],
)
def test_unknown_tfds_name_suggests_the_closest(name, closest):
  # difflib.get_close_matches over tfds.list_builders() ranks `closest` first.
  with pytest.raises(ValueError, match=f"Unknown dataset '{name}'.* Closest names: {closest}\\b"):
    data_lib.get_dataset_info(make_config(name, 32, 3))


@pytest.mark.parametrize(
  'name, message',
  [
    ('ag_news_subset', 'has no image feature'),  # Text only.
    ('div2k', r'has several image features \(lr, hr\)'),  # Low- and high-resolution images.
    ('lsun/kitchenn', "TFDS cannot open dataset 'lsun/kitchenn'"),  # No such config.
  ],
)
def test_tfds_dataset_without_one_image_feature_is_rejected(name, message):
  with pytest.raises(ValueError, match=message):
    data_lib.get_dataset_info(make_config(name, 32, 3))


def test_of_several_image_features_the_one_named_image_is_read():
  # oxford_iiit_pet has Image features 'image' and 'segmentation_mask'.
  assert data_lib.get_dataset_info(make_config('oxford_iiit_pet', 32, 3)).image_key == 'image'


def test_image_size_the_unet_cannot_halve_is_rejected_before_compiling():
  # 28 is not divisible by 2^(len((1, 2, 2, 2)) - 1) = 8, the default U-Net's downsampling.
  with pytest.raises(ValueError, match=r'image_size = 28 is not divisible by .* = 8'):
    checks.check_config(make_config('mnist', 28, 1))


@pytest.mark.parametrize(
  'dataset, data, message',
  [
    ('mnist', {'num_channels': 2}, r'num_channels must be 1 \(greyscale\) or 3 \(RGB\), got 2'),
    ('cifar10', {'split': 'val'}, "split = 'val', but 'cifar10' has the splits: train, test"),
    ('cifar10', {'eval_split': 'val'}, "eval_split = 'val', but 'cifar10' has the splits: train, "),
  ],
)
def test_bad_channels_and_splits_are_rejected(dataset, data, message):
  config = make_config(dataset, 32, 3)
  config.data.update(data)
  with pytest.raises(ValueError, match=message):
    data_lib.get_dataset_info(config)


def test_eval_split_override():
  config = make_config('cifar10', 32, 3, eval_split='train')
  assert data_lib.get_dataset_info(config).eval_split == 'train'
  assert data_lib.get_dataset_info(make_config('cifar10', 32, 3)).eval_split == 'test'


def test_data_fields_can_be_set_on_the_command_line():
  # As main.py parses them; `data_dir = None` (not a placeholder) could not be overridden.
  argv = [
    'main.py',
    f'--config={os.path.join(REPO, "configs", "default.py")}',
    '--config.data.dataset=folder',
    '--config.data.image_dir=/images/train',
    '--config.data.eval_image_dir=/images/test',
    '--config.data.eval_split=test',
    '--config.data.data_dir=gs://bucket/tensorflow_datasets',
    '--config.data.download=False',
    '--config.data.label_key=species',
  ]
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', flag_values=flag_values, sys_argv=argv)
  flag_values(argv)
  data = flag_values.config.data
  assert (data.image_dir, data.eval_image_dir) == ('/images/train', '/images/test')
  assert (data.eval_split, data.data_dir) == ('test', 'gs://bucket/tensorflow_datasets')
  assert (data.split, data.download, data.label_key) == ('train', False, 'species')


# ------------------------------------------------------------------------------------------------
# A folder of images.
# ------------------------------------------------------------------------------------------------


def save(path, array, **kwargs):
  path.parent.mkdir(parents=True, exist_ok=True)
  PIL.Image.fromarray(array).save(path, **kwargs)


@pytest.fixture
def image_folder(tmp_path):
  """Four images in nested directories, and files the pipeline must skip.

  Returns (directory, {relative path: the image as PIL decodes it, uint8 [h, w, c]}).
  """
  rng = np.random.default_rng(0)
  root = tmp_path / 'images'
  arrays = {
    'b/z.PNG': rng.integers(0, 256, (30, 20, 3), np.uint8),  # Taller than wide: rows 5..24.
    'a.jpg': rng.integers(0, 256, (16, 16), np.uint8),  # Greyscale JPEG, already 16x16.
    'a/c/y.JPEG': rng.integers(0, 256, (40, 40, 3), np.uint8),  # Downscaled 40 -> 16.
    'b/x.png': rng.integers(0, 256, (16, 16, 4), np.uint8),  # RGBA: alpha dropped.
  }
  for relative, array in arrays.items():
    jpeg = relative.lower().endswith(('.jpg', '.jpeg'))
    save(root / relative, array, **({'quality': 90} if jpeg else {}))
  # Not images, or hidden (a broken file, so reading it would fail).
  (root / 'notes.txt').write_text('not an image')
  (root / 'b' / 'x.png.bak').write_bytes(b'not an image')
  (root / '.hidden.png').write_bytes(b'broken')
  (root / '.cache').mkdir()
  (root / '.cache' / 'thumbnail.png').write_bytes(b'broken')
  decoded = {}
  for relative in arrays:
    decoded[relative] = np.asarray(PIL.Image.open(root / relative))
    if decoded[relative].ndim == 2:
      decoded[relative] = decoded[relative][..., None]
  return str(root), decoded


# The files sorted by relative path as strings ('.' < '/', so 'a.jpg' < 'a/c/y.JPEG').
FOLDER_ORDER = ['a.jpg', 'a/c/y.JPEG', 'b/x.png', 'b/z.PNG']


def test_folder_images_are_found_sorted_cropped_resized_and_converted(image_folder):
  directory, decoded = image_folder
  source = data_lib.create_source(make_config('folder', 16, 3, image_dir=directory), 'train')
  assert source.paths == FOLDER_ORDER and len(source) == 4
  images = source[np.arange(4)]
  assert images.shape == (4, 16, 16, 3) and images.dtype == np.uint8
  grey, rgb, rgba, tall = (decoded[path] for path in FOLDER_ORDER)
  np.testing.assert_array_equal(images[0], np.repeat(grey, 3, axis=-1))  # Already 16x16.
  assert_close_to_reference(images[1], reference_resize(rgb, 16))
  np.testing.assert_array_equal(images[2], rgba[..., :3])
  assert_close_to_reference(images[3], reference_resize(tall[5:25], 16))
  # Greyscale: the luma of the RGB files (PIL's conversion), then the crop and resize.
  grey_source = data_lib.create_source(make_config('folder', 16, 1, image_dir=directory), 'train')
  images = grey_source[np.array([3, 0])]
  assert images.shape == (2, 16, 16, 1)
  luma = np.asarray(PIL.Image.fromarray(tall).convert('L'))[..., None]
  assert_close_to_reference(images[0], reference_resize(luma[5:25], 16))
  np.testing.assert_array_equal(images[1], grey)


def folder_batches(config, **kwargs):
  """(single, resumed, shares): 4 steps of one process, steps 2-3 of a run resumed at step 2,
  and the 4 steps of each of 2 processes; each a list of (step, batch)."""
  single = take(
    data_lib.train_batches(config, start_step=0, process_index=0, process_count=1, **kwargs), 4
  )
  resumed = take(
    data_lib.train_batches(config, start_step=2, process_index=0, process_count=1, **kwargs), 2
  )
  shares = [
    take(
      data_lib.train_batches(config, start_step=0, process_index=p, process_count=2, **kwargs), 4
    )
    for p in range(2)
  ]
  return single, resumed, shares


def test_folder_order_is_deterministic_resumable_and_shared_by_processes(image_folder):
  directory, _ = image_folder
  config = make_config('folder', 8, 3, image_dir=directory)
  source = data_lib.create_source(config, 'train')
  kwargs = dict(global_batch_size=4, seed=2)
  single, resumed, shares = folder_batches(config, **kwargs)
  for step, batch in single:
    indices = train_indices(step=step, num_examples=4, process_index=0, process_count=1, **kwargs)
    np.testing.assert_array_equal(batch['image'], source[indices])
    joined = np.concatenate([s[step][1]['image'] for s in shares])
    np.testing.assert_array_equal(joined, batch['image'])
  for (_, expected), (_, actual) in zip(single[2:], resumed, strict=True):
    np.testing.assert_array_equal(actual['image'], expected['image'])


def test_folder_splits(image_folder, tmp_path):
  directory, _ = image_folder
  config = make_config('folder', 16, 3, image_dir=directory)
  info = data_lib.get_dataset_info(config)
  assert (info.splits, info.eval_split) == (('train',), None)
  with pytest.raises(ValueError, match="'folder' has no split 'test'"):
    data_lib.create_source(config, 'test')
  # eval_image_dir is split 'test', and then the eval split.
  test_dir = tmp_path / 'test_images'
  test_images = np.random.default_rng(1).integers(0, 256, (2, 16, 16, 3), np.uint8)
  for i, image in enumerate(test_images):
    save(test_dir / f'{i}.png', image)
  config.data.eval_image_dir = str(test_dir)
  info = data_lib.get_dataset_info(config)
  assert (info.splits, info.eval_split) == (('train', 'test'), 'test')
  np.testing.assert_array_equal(data_lib.create_source(config, 'test')[np.arange(2)], test_images)
  # Results computed from a split (ddpm_jax/evaluation.py) are keyed by its folder, and only by
  # it for an unconditional model (the keys of results computed so far are unchanged).
  assert data_lib.split_settings(config, 'train')['directory'] == directory
  assert data_lib.split_settings(config, 'test') == {
    'dataset': 'folder',
    'split': 'test',
    'image_size': 16,
    'num_channels': 3,
    'directory': str(test_dir),
  }
  # config.data.split names the split training reads.
  config.data.split = 'test'
  [(_, batch)] = take(
    data_lib.train_batches(config, global_batch_size=2, start_step=0, seed=0, process_count=1), 1
  )
  np.testing.assert_array_equal(np.sort(batch['image'], axis=0), np.sort(test_images, axis=0))


def test_unreadable_image_error_names_the_file(image_folder):
  directory, _ = image_folder
  root = pathlib.Path(directory)
  (root / 'bad.png').write_bytes(b'this is not a PNG')
  (root / 'c').mkdir()
  (root / 'c' / 'truncated.jpg').write_bytes((root / 'a' / 'c' / 'y.JPEG').read_bytes()[:300])
  save(root / 'deep.png', np.zeros((4, 4), np.uint16))  # 16-bit greyscale.
  config = make_config('folder', 16, 3, image_dir=directory)
  source = data_lib.create_source(config, 'train')
  for relative, reason in [
    ('bad.png', 'cannot identify image file'),
    ('c/truncated.jpg', '[Tt]runcated'),
    ('deep.png', 'only 8-bit images'),
  ]:
    index = source.paths.index(relative)
    with pytest.raises(ValueError, match=f'Cannot read image file {root / relative}: .*{reason}'):
      source[np.array([index])]
  # Read on the prefetch thread, the error reaches the training loop: batch 0 holds all 7 files.
  config.data.cache_gib = 0  # (Decoded at the start, the start raises it: test_input_workers.)
  batches = data_lib.train_batches(
    config, global_batch_size=7, start_step=0, seed=0, process_count=1
  )
  with batches, pytest.raises(ValueError, match=f'Cannot read image file {directory}/'):
    next(batches)


def test_folder_config_errors(tmp_path):
  empty = tmp_path / 'empty'
  (empty / '.hidden').mkdir(parents=True)
  (empty / '.hidden' / 'a.png').write_bytes(b'hidden')
  (empty / 'notes.txt').write_text('no images here')
  missing = str(tmp_path / 'missing')
  images = tmp_path / 'images'
  save(images / 'a.png', np.zeros((4, 4, 3), np.uint8))
  for data, error, message in [
    ({}, ValueError, 'config.data.image_dir, which is not set'),
    ({'image_dir': missing}, FileNotFoundError, f"image_dir = '{missing}' is not a directory"),
    ({'image_dir': str(empty)}, ValueError, r'holds no image files \(\*.png, \*.jpg, \*.jpeg'),
    (
      {'image_dir': str(images), 'eval_image_dir': missing},
      FileNotFoundError,
      f"eval_image_dir = '{missing}' is not a directory",
    ),
  ]:
    with pytest.raises(error, match=message):
      data_lib.get_dataset_info(make_config('folder', 16, 3, **data))


# ------------------------------------------------------------------------------------------------
# A folder of images, one subdirectory per class.
# ------------------------------------------------------------------------------------------------

# The files the class folders hold, and the class each is written into (its top-level
# subdirectory): the ground truth of their labels. Sorted by path, as the folder lists them.
CLASS_FILES = {
  'cat/a.png': 'cat',
  'cat/x/b.png': 'cat',
  'dog/c.PNG': 'dog',
  'dog/d.png': 'dog',
  'emu/e.png': 'emu',
}
CLASSES = ('cat', 'dog', 'emu')  # Sorted subdirectory names.


def write_class_folder(root, files):
  """Writes each of the relative paths `files` as an 8x8 RGB image of its own grey level
  20 * (i + 1), so that an image names its file. Returns {image bytes: relative path}."""
  file_of = {}
  for i, relative in enumerate(files):
    image = np.full((8, 8, 3), 20 * (i + 1), np.uint8)
    save(root / relative, image)
    file_of[image.tobytes()] = relative
  return file_of


def test_folder_labels_are_the_subdirectories(tmp_path):
  root = tmp_path / 'classes'
  file_of = write_class_folder(root, CLASS_FILES)
  # Skipped: hidden files and directories, and subdirectories without images (not classes).
  save(root / '.hidden' / 'f.png', np.zeros((8, 8, 3), np.uint8))
  save(root / 'dog' / '.g.png', np.zeros((8, 8, 3), np.uint8))
  (root / 'notes').mkdir()
  (root / 'notes' / 'readme.txt').write_text('not an image')
  (root / 'empty').mkdir()
  config = make_config('folder', 8, 3, image_dir=str(root), num_classes=3)
  info = data_lib.get_dataset_info(config)
  assert info.class_names == CLASSES
  source = data_lib.create_source(config, 'train')
  assert source.paths == list(CLASS_FILES)
  expected = np.array([CLASSES.index(c) for c in CLASS_FILES.values()])
  np.testing.assert_array_equal(source.labels(np.arange(5)), expected)
  np.testing.assert_array_equal(source.labels(np.array([4, 0])), [2, 0])

  def label_of_image(image):
    return CLASSES.index(CLASS_FILES[file_of[image.tobytes()]])

  kwargs = dict(global_batch_size=4, seed=2)
  single, resumed, shares = folder_batches(config, **kwargs)
  unconditional = make_config('folder', 8, 3, image_dir=str(root))
  images_only = take(
    data_lib.train_batches(unconditional, start_step=0, process_count=1, **kwargs), 4
  )
  for (step, batch), (_, unlabelled) in zip(single, images_only, strict=True):
    indices = train_indices(step=step, num_examples=5, process_index=0, process_count=1, **kwargs)
    np.testing.assert_array_equal(batch['label'], expected[indices])
    np.testing.assert_array_equal(batch['label'], [label_of_image(x) for x in batch['image']])
    for key in ('image', 'label'):
      joined = np.concatenate([s[step][1][key] for s in shares])
      np.testing.assert_array_equal(joined, batch[key])
    # Unconditional: the same images, bit for bit, and no labels.
    assert unlabelled.keys() == {'image'}
    np.testing.assert_array_equal(unlabelled['image'], batch['image'])
  for (_, want), (_, got) in zip(single[2:], resumed, strict=True):
    np.testing.assert_array_equal(got['label'], want['label'])
    np.testing.assert_array_equal(got['image'], want['image'])
  # The classes are part of the key of results computed from the folder; only when conditional.
  assert data_lib.split_settings(config, 'train')['class_names'] == list(CLASSES)
  assert 'class_names' not in data_lib.split_settings(unconditional, 'train')
  with pytest.raises(ValueError, match='opened without classes'):
    data_lib.create_source(unconditional, 'train').labels(np.arange(2))


def test_folder_eval_labels_are_its_subdirectories(tmp_path):
  write_class_folder(tmp_path / 'train', CLASS_FILES)
  eval_files = {'cat/p.png': 'cat', 'dog/q.png': 'dog', 'emu/r.png': 'emu', 'emu/s.png': 'emu'}
  file_of = write_class_folder(tmp_path / 'test', eval_files)
  config = make_config(
    'folder',
    8,
    3,
    image_dir=str(tmp_path / 'train'),
    eval_image_dir=str(tmp_path / 'test'),
    num_classes=3,
  )
  assert data_lib.get_dataset_info(config).eval_split == 'test'
  [(batch, mask)] = list(
    data_lib.eval_batches(config, split='test', global_batch_size=6, process_count=1)
  )
  assert mask.tolist() == [True] * 4 + [False] * 2
  expected = [CLASSES.index(eval_files[file_of[x.tobytes()]]) for x in batch['image'][:4]]
  np.testing.assert_array_equal(batch['label'], [*expected, 0, 0])
  np.testing.assert_array_equal(batch['label'][:4], [0, 1, 2, 2])  # In order of their paths.


def test_folder_class_errors(tmp_path):
  # An image directly in image_dir has no class.
  root = tmp_path / 'classes'
  write_class_folder(root, [*CLASS_FILES, 'stray.png'])
  config = make_config('folder', 8, 3, image_dir=str(root), num_classes=3)
  with pytest.raises(
    ValueError, match=f'{root / "stray.png"} is directly in config.data.image_dir'
  ):
    data_lib.get_dataset_info(config)
  config.model.num_classes = 0  # Unconditional, the folder is valid: it reads all six images.
  assert len(data_lib.create_source(config, 'train')) == 6
  # The eval folder must have the same classes.
  write_class_folder(tmp_path / 'train', ['cat/a.png', 'dog/b.png'])
  write_class_folder(tmp_path / 'test', ['cat/c.png', 'emu/d.png'])
  config = make_config(
    'folder',
    8,
    3,
    image_dir=str(tmp_path / 'train'),
    eval_image_dir=str(tmp_path / 'test'),
    num_classes=2,
  )
  with pytest.raises(
    ValueError, match='only image_dir has: dog; only eval_image_dir has: emu'
  ) as error:
    data_lib.get_dataset_info(config)
  assert f"config.data.eval_image_dir = '{tmp_path / 'test'}'" in str(error.value)
  # And config.model.num_classes must be the number of classes.
  config.data.eval_image_dir = None
  config.model.num_classes = 3
  with pytest.raises(
    ValueError, match=r"config.model.num_classes = 3, but 'folder' has 2 classes \(cat, dog\)"
  ):
    data_lib.get_dataset_info(config)

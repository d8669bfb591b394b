"""The data: uint8 images and class labels of the configured dataset, in an order that is a
function of (seed, step).

Every batch is a dict: 'image', uint8 `[B_local, H, W, C]` with values in 0..255 (the train step
on device scales it to [-1, 1], x / 127.5 - 1, and applies the random horizontal flip, so nothing
here does), and where `config.model.num_classes` = K > 0, 'label', int32 `[B_local]` in [0, K):
the class of each image. Unconditional batches (K = 0, the default) have no 'label'. The labels
are the digit (the digits), a TFDS `ClassLabel` feature (`config.data.label_key`), or the
subdirectory of a folder; `DatasetInfo.class_names` names the classes, and the config check
requires K = len(class_names).

Datasets (`config.data.dataset`): 'digits' (`digits`: scikit-learn's 8x8 digits, embedded), the
paper's TFDS datasets and any other TFDS image dataset (`tfds`), and 'folder', the image files
under `config.data.image_dir` (`folder`). Each is a `core.Dataset`: its splits and classes,
random access to the images (and labels) of a split, and the settings that fix them. Images
other than the digits are made the configured size and depth (`images`). Training reads
`config.data.split` ('train') in the order of `order` on a background thread (`prefetch`),
decoding on worker processes (`workers`) or once, into memory or a prepared copy (`decoded`); the
held-out split for bits/dim (and the test images of the interpolation figure) is
`get_dataset_info(config).eval_split`. TFDS and TensorFlow are imported only for TFDS datasets:
the digits and folders need neither.

The entry points, from `pipeline`: `check_config`, `get_dataset_info`, `create_source`,
`split_settings`, `train_batches`, `eval_batches`.
"""

from ddpm_jax.data.pipeline import (
  check_config,
  create_source,
  eval_batches,
  get_dataset_info,
  split_settings,
  train_batches,
)

__all__ = [
  'check_config',
  'create_source',
  'eval_batches',
  'get_dataset_info',
  'split_settings',
  'train_batches',
]

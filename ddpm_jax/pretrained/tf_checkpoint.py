"""The original TensorFlow checkpoints of the official weights (`model.ckpt-790000` for CIFAR10;
REFERENCE.md, "Original TF variable names") as our params: the EMA copies by default."""

import os
import re
from collections.abc import Mapping

import ml_collections

from ddpm_jax import tf_support
from ddpm_jax.pretrained import architecture

_EMA_SUFFIX = '/ExponentialMovingAverage'
_TF_LEAVES = {
  'norm': {'scale': 'gamma', 'bias': 'beta'},
  'conv': {'kernel': 'W', 'bias': 'b'},
  'dense': {'kernel': 'W', 'bias': 'b'},
}
_TF_WEIGHT = re.compile(r'model/.*/(W|b|gamma|beta)')


def load_tf_checkpoint(path: str):
  """(prefix, tf.train.CheckpointReader) for a checkpoint prefix or a directory with checkpoints."""
  tf = tf_support.import_tensorflow()  # Only TF checkpoints need TensorFlow, slow to import.
  if tf is None:
    raise ImportError('Reading an original TensorFlow checkpoint needs TensorFlow installed.')

  prefix = path
  if os.path.isdir(path):
    prefix = tf.train.latest_checkpoint(path)
    if prefix is None:
      raise ValueError(f'No TF checkpoint in {path}; pass the prefix, e.g. {path}/model.ckpt-N')
  return prefix, tf.train.load_checkpoint(prefix)


def _tf_model_tensors(reader, use_ema: bool) -> dict[str, tuple[int, ...]]:
  """Shapes of the network weights in a TF checkpoint, by name without the EMA suffix.

  Optimizer slots (.../Adam, .../Adam_1), global_step and the other copy (EMA or raw) are not
  network weights and are left out.
  """
  shapes = {}
  for name, shape in reader.get_variable_to_shape_map().items():
    is_ema = name.endswith(_EMA_SUFFIX)
    base = name.removesuffix(_EMA_SUFFIX)
    if is_ema == use_ema and _TF_WEIGHT.fullmatch(base):
      shapes[base] = tuple(shape)
  return shapes


def _count_consecutive(names: Mapping[str, object], pattern: str) -> int:
  """How many of pattern.format(0), pattern.format(1), ... are in names, without a gap."""
  count = 0
  while pattern.format(count) in names:
    count += 1
  return count


def model_config_from_tf_checkpoint(
  path: str, *, image_size: int, use_ema: bool = True
) -> ml_collections.ConfigDict:
  """The U-Net of an original TF checkpoint, read from its tensor names and shapes, as the model,
  data and diffusion fields of a project config (`architecture.unet_config`).

  The checkpoint stores no config and a conv net's weights do not fix the image size, so the
  caller gives `image_size`; attention resolutions follow from the levels that have `attn_0`.
  Dropout is not recorded (0.0 here; it does not matter for sampling).
  """
  _, reader = load_tf_checkpoint(path)
  shapes = _tf_model_tensors(reader, use_ema)
  if 'model/conv_in/W' not in shapes or 'model/conv_out/W' not in shapes:
    raise ValueError(f'{path} has no model/conv_in/W or model/conv_out/W (use_ema={use_ema})')
  _, _, num_channels, ch = shapes['model/conv_in/W']
  num_levels = _count_consecutive(shapes, 'model/down_{}/block_0/conv1/W')
  num_res_blocks = _count_consecutive(shapes, 'model/down_0/block_{}/conv1/W')
  widths = [shapes[f'model/down_{i}/block_0/conv1/W'][-1] for i in range(num_levels)]
  if any(width % ch for width in widths):
    raise ValueError(f'{path}: level widths {widths} are not multiples of ch={ch}')
  return architecture.unet_config(
    ch=ch,
    out_ch=shapes['model/conv_out/W'][-1],
    ch_mult=[width // ch for width in widths],
    num_res_blocks=num_res_blocks,
    attn_resolutions=[
      image_size // 2**i for i in range(num_levels) if f'model/down_{i}/attn_0/q/W' in shapes
    ],
    image_size=image_size,
    num_channels=num_channels,
    resamp_with_conv=num_levels == 1 or 'model/down_0/downsample/conv/W' in shapes,
  )


def params_from_tf_checkpoint(
  path: str, model_config: ml_collections.ConfigDict, *, use_ema: bool = True
) -> dict:
  """Our params from an original TF checkpoint (prefix such as .../model.ckpt-790000, or its dir).

  Args:
    path: checkpoint prefix or directory.
    model_config: the U-Net's config (`model_config_from_tf_checkpoint`).
    use_ema: take the `/ExponentialMovingAverage` copies (the weights the paper samples from);
      False takes the raw training weights.

  Returns:
    The params tree, float32 NumPy arrays. TF layouts equal ours: conv W [kh, kw, in, out],
    dense / nin W [in, out].

  Raises:
    ValueError: for a class-conditional `model_config`, or naming each missing, unexpected or
      misshapen tensor.
  """
  if model_config.model.num_classes:
    raise ValueError(
      'The original TF checkpoints are of unconditional U-Nets: they have no class embedding '
      f'for model.num_classes = {model_config.model.num_classes}.'
    )
  prefix, reader = load_tf_checkpoint(path)
  shapes = architecture.flat_param_shapes(model_config)
  kinds = architecture.module_kinds(shapes)
  suffix = _EMA_SUFFIX if use_ema else ''
  sources = {}
  for (*module, leaf), shape in shapes.items():
    name = 'model/' + '/'.join(module) + '/' + _TF_LEAVES[kinds[tuple(module)]][leaf]
    sources[(*module, leaf)] = ((name,), shape.shape, lambda w: w)
  available = _tf_model_tensors(reader, use_ema)
  read = lambda name: reader.get_tensor(name + suffix)
  copy = 'EMA' if use_ema else 'raw'
  return architecture.assemble(
    sources, available, read, f'{copy} weights of TF checkpoint {prefix}'
  )

"""The U-Net of a set of imported weights: its description, the shapes of its parameters, their
strict assembly from named source tensors, and the check against a project config."""

from collections.abc import Callable, Mapping, Sequence

import jax
import ml_collections
import numpy as np
from flax import traverse_util

from ddpm_jax import models, tensors

# A parameter's path in our tree, e.g. ('down_0', 'block_1', 'conv1', 'kernel').
ParamPath = tuple[str, ...]

# The attributes of the UNet that `models.create_model` builds which the weights fix, in the order
# errors list them.
ARCH_FIELDS = (
  'ch',
  'out_ch',
  'ch_mult',
  'num_res_blocks',
  'attn_resolutions',
  'resamp_with_conv',
  'num_classes',
)


def unet_config(
  *,
  ch: int,
  out_ch: int,
  ch_mult: Sequence[int],
  num_res_blocks: int,
  attn_resolutions: Sequence[int],
  image_size: int,
  num_channels: int,
  dropout: float = 0.0,
  resamp_with_conv: bool = True,
  num_classes: int = 0,
) -> ml_collections.ConfigDict:
  """The U-Net of a set of weights, described as a project config describes one: the `model`
  section of configs/default.py with the `data` image shape and the `diffusion.model_var_type`,
  the fields that `models.create_model` reads.

  The output channels tell only whether the variance is learned (2 * num_channels) or not
  (num_channels); which fixed or learned variance is a sampling setting, here 'fixedlarge' or
  'learned', and the U-Net is the same for either. `num_classes` > 0: a class-conditional U-Net
  (labels 0..num_classes, the last the null label; its `label_emb` [num_classes + 1, 4 ch]).

  Raises:
    ValueError: when out_ch is neither num_channels nor 2 * num_channels.
  """
  if out_ch not in (num_channels, 2 * num_channels):
    raise ValueError(
      f'The weights output {out_ch} channels for {num_channels}-channel images; the U-Net outputs '
      f'{num_channels} (a fixed variance) or {2 * num_channels} (a learned variance).'
    )
  return ml_collections.ConfigDict(
    dict(
      data=dict(image_size=image_size, num_channels=num_channels),
      model=dict(
        ch=ch,
        ch_mult=tuple(ch_mult),
        num_res_blocks=num_res_blocks,
        attn_resolutions=tuple(attn_resolutions),
        dropout=dropout,
        resamp_with_conv=resamp_with_conv,
        dtype='float32',
        remat=False,
        attention_impl=None,
        num_classes=num_classes,
      ),
      diffusion=dict(model_var_type='fixedlarge' if out_ch == num_channels else 'learned'),
    )
  )


def flat_param_shapes(
  config: ml_collections.ConfigDict,
) -> dict[ParamPath, jax.ShapeDtypeStruct]:
  """Flat {path: ShapeDtypeStruct} of the parameters of `models.create_model(config)` for
  `config.data` images (`models.param_shapes`, flattened)."""
  model = models.create_model(config)
  shapes = models.param_shapes(model, config.data.image_size, config.data.num_channels)
  return traverse_util.flatten_dict(shapes)


def module_kinds(shapes: Mapping[ParamPath, jax.ShapeDtypeStruct]) -> dict[ParamPath, str]:
  """Each module of our tree as 'norm', 'conv' (3x3) or 'dense' (over the channel axis)."""
  kinds = {}
  for path, shape in shapes.items():
    module, leaf = path[:-1], path[-1]
    if leaf == 'scale':
      kinds[module] = 'norm'
    elif leaf == 'kernel':
      kinds[module] = 'conv' if len(shape.shape) == 4 else 'dense'
  return kinds


# One way to fill a parameter: candidate source names (first present wins), the source shape
# expected, and the map from the source layout to ours.
Source = tuple[tuple[str, ...], tuple[int, ...], Callable[[np.ndarray], np.ndarray]]


def assemble(
  sources: Mapping[ParamPath, Source],
  available: Mapping[str, tuple[int, ...]],
  read: Callable[[str], np.ndarray],
  what: str,
) -> dict:
  """Fills our parameter tree from named source tensors, strictly.

  Args:
    sources: for each of our parameters, where it comes from.
    available: shape of every model tensor in the source.
    read: loads a source tensor by name.
    what: the source, for error messages.

  Returns:
    The nested params dict of float32 NumPy arrays.

  Raises:
    ValueError: naming every missing, unexpected or misshapen tensor (`tensors.check_tensors`).
  """
  chosen, expected = {}, {}
  for path, (names, source_shape, _) in sources.items():
    # The first candidate present; all of them, as one name, when none is.
    chosen[path] = next((n for n in names if n in available), ' or '.join(names))
    expected[chosen[path]] = source_shape
  tensors.check_tensors(expected, available, what=f'The {what}')
  params = {
    path: convert(np.asarray(read(chosen[path]), np.float32))
    for path, (_, _, convert) in sources.items()
  }
  return traverse_util.unflatten_dict(params)


def check_weights_match_config(
  model_config: ml_collections.ConfigDict, config: ml_collections.ConfigDict
) -> None:
  """Raises a ValueError listing each field where the weights differ from the project config.

  `model_config` is the weights' U-Net (`model_config_from_diffusers`, ...). Compares image size
  and channels of the two `data` sections and the U-Nets that `models.create_model` builds from
  both (ch, out_ch, ch_mult, num_res_blocks, attn_resolutions, resamp_with_conv, num_classes).
  Dropout is not compared: it does not change the function used for sampling.
  """
  weights, model = models.create_model(model_config), models.create_model(config)
  fields = [
    ('data.image_size', model_config.data.image_size, config.data.image_size),
    ('data.num_channels', model_config.data.num_channels, config.data.num_channels),
  ]
  for field in ARCH_FIELDS:
    name = 'out_ch (from data.num_channels, diffusion.model_var_type)'
    name = name if field == 'out_ch' else f'model.{field}'
    fields.append((name, getattr(weights, field), getattr(model, field)))
  mismatches = [
    f'{name}: weights have {found!r}, config has {wanted!r}'
    for name, found, wanted in fields
    if found != wanted
  ]
  if mismatches:
    raise ValueError('Official weights do not match the config:\n  ' + '\n  '.join(mismatches))

"""The diffusers ports of the official weights (UNet2DModel: `config.json` and
`diffusion_pytorch_model.safetensors`; REFERENCE.md, "Official weights", "Keys") as our params,
and back: our U-Net and params as such a folder (`diffusers_config`, `state_dict_from_params`,
`save_diffusers_model`, for `python -m ddpm_jax.export`), through the same tables of names and
layouts.

A class-conditional UNet2DModel (`num_class_embeds` = N with `class_embed_type` null: a learned
`class_embedding`, nn.Embedding(N, 4 ch), added to the timestep embedding after its MLP, as ours
adds `label_emb`) is our U-Net with `model.num_classes` = N - 1: its rows 0..N-2 are the classes
and its last row, N - 1, is read as the null label of classifier-free guidance, our label K. The
layout is the same ([N, 4 ch], row = label). diffusers itself gives no row a meaning; this is the
convention an export of our params must write back (num_class_embeds = num_classes + 1).
"""

import json
import os
from collections.abc import Mapping

import jax
import ml_collections
import numpy as np
from flax import traverse_util
from safetensors import numpy as safetensors_numpy

from ddpm_jax import models, tensors
from ddpm_jax.pretrained import architecture

# Our layer name -> diffusers layer names, newest first (older files name attention layers
# query/key/value/proj_attn).
_DIFFUSERS_LAYERS = {
  'norm1': ('norm1',),
  'conv1': ('conv1',),
  'temb_proj': ('time_emb_proj',),
  'norm2': ('norm2',),
  'conv2': ('conv2',),
  'nin_shortcut': ('conv_shortcut',),
  'norm': ('group_norm',),
  'q': ('to_q', 'query'),
  'k': ('to_k', 'key'),
  'v': ('to_v', 'value'),
  'proj_out': ('to_out.0', 'proj_attn'),
}
_DIFFUSERS_TOP = {
  ('temb', 'dense0'): 'time_embedding.linear_1',
  ('temb', 'dense1'): 'time_embedding.linear_2',
  ('conv_in',): 'conv_in',
  ('norm_out',): 'conv_norm_out',
  ('conv_out',): 'conv_out',
  ('label_emb',): 'class_embedding',
}
_DIFFUSERS_MID = {'block_1': 'resnets.0', 'attn_1': 'attentions.0', 'block_2': 'resnets.1'}


def _diffusers_modules(module: architecture.ParamPath, num_levels: int) -> tuple[str, ...]:
  """Candidate diffusers names of one of our modules; up level i is up_blocks.{L - 1 - i}."""
  if module in _DIFFUSERS_TOP:
    return (_DIFFUSERS_TOP[module],)
  scope, part, layer = module
  if scope == 'mid':
    prefix = f'mid_block.{_DIFFUSERS_MID[part]}'
  else:
    direction, level = scope.split('_')
    level = int(level) if direction == 'down' else num_levels - 1 - int(level)
    blocks = f'{direction}_blocks.{level}'
    if part in ('downsample', 'upsample'):
      return (f'{blocks}.{part}rs.0.conv',)
    kind, index = part.split('_')
    prefix = f'{blocks}.{"resnets" if kind == "block" else "attentions"}.{index}'
  return tuple(f'{prefix}.{name}' for name in _DIFFUSERS_LAYERS[layer])


# The layouts of our parameters in torch: (torch -> ours, ours -> torch) by kind.
_TORCH_LAYOUTS = {
  # Biases, GroupNorm scales, the class embedding [N, 4 ch]: the same array.
  'same': (lambda w: w, lambda w: w),
  # A 3x3 conv: torch [out, in, kh, kw] <-> [kh, kw, in, out].
  'conv': (lambda w: w.transpose(2, 3, 1, 0), lambda w: w.transpose(3, 2, 0, 1)),
  # A 1x1 conv over channels (nin_shortcut): torch [out, in, 1, 1] <-> [in, out].
  'nin': (lambda w: w[:, :, 0, 0].T, lambda w: w.T[:, :, None, None]),
  # A linear layer: torch [out, in] <-> [in, out].
  'dense': (lambda w: w.T, lambda w: w.T),
}


def _diffusers_tensors(
  shapes: Mapping[architecture.ParamPath, jax.ShapeDtypeStruct], num_levels: int
) -> dict[architecture.ParamPath, tuple[tuple[str, ...], tuple[int, ...], str]]:
  """Where each of our parameters lives in a UNet2DModel state dict: its candidate names (the
  newest first), its torch shape and its layout (a key of `_TORCH_LAYOUTS`)."""
  kinds = architecture.module_kinds(shapes)
  tensors = {}
  for path, shape in shapes.items():
    module, leaf = path[:-1], path[-1]
    names = _diffusers_modules(module, num_levels)
    names = tuple(f'{name}.{"bias" if leaf == "bias" else "weight"}' for name in names)
    if leaf != 'kernel':
      tensors[path] = (names, shape.shape, 'same')
    elif kinds[module] == 'conv':
      kh, kw, c_in, c_out = shape.shape
      tensors[path] = (names, (c_out, c_in, kh, kw), 'conv')
    elif module[-1] == 'nin_shortcut':
      c_in, c_out = shape.shape
      tensors[path] = (names, (c_out, c_in, 1, 1), 'nin')
    else:
      c_in, c_out = shape.shape
      tensors[path] = (names, (c_out, c_in), 'dense')
  return tensors


def _diffusers_sources(
  shapes: Mapping[architecture.ParamPath, jax.ShapeDtypeStruct], num_levels: int
) -> dict[architecture.ParamPath, architecture.Source]:
  """Where each of our parameters lives in a UNet2DModel state dict, and its torch layout."""
  return {
    path: (names, torch_shape, _TORCH_LAYOUTS[layout][0])
    for path, (names, torch_shape, layout) in _diffusers_tensors(shapes, num_levels).items()
  }


# UNet2DModel.__init__ defaults, which apply to keys a config.json omits.
_DIFFUSERS_DEFAULTS = {
  'in_channels': 3,
  'out_channels': 3,
  'layers_per_block': 2,
  'dropout': 0.0,
  'attention_head_dim': 8,
}
# Settings that the original network fixes: (key, UNet2DModel default, required value).
_DIFFUSERS_REQUIRED = (
  ('time_embedding_type', 'positional', 'positional'),
  ('flip_sin_to_cos', True, False),
  ('freq_shift', 0, 1),
  ('center_input_sample', False, False),
  ('downsample_padding', 1, 0),
  ('downsample_type', 'conv', 'conv'),
  ('upsample_type', 'conv', 'conv'),
  ('mid_block_type', 'UNetMidBlock2D', 'UNetMidBlock2D'),
  ('mid_block_scale_factor', 1, 1),
  ('add_attention', True, True),
  ('norm_num_groups', 32, 32),
  ('attn_norm_num_groups', None, None),
  ('norm_eps', 1e-5, 1e-6),
  ('resnet_time_scale_shift', 'default', 'default'),
  # A class embedding, if any, is a learned table (num_class_embeds rows), as our label_emb: not
  # the 'timestep' (sinusoidal + MLP of the label) or 'identity' kinds, nor a projection.
  ('class_embed_type', None, None),
)


def model_config_from_diffusers(config: Mapping) -> ml_collections.ConfigDict:
  """The U-Net of a UNet2DModel `config.json`, as the model, data and diffusion fields of a
  project config (`architecture.unet_config`).

  `num_class_embeds` = N (a learned class embedding) gives `model.num_classes` = N - 1, the last
  row being the null label (this module's docstring); null or absent gives 0, unconditional.

  Raises:
    ValueError: listing every setting our UNet cannot represent (multi-head attention, cos-first
      timestep embedding, symmetric downsample padding, a class embedding other than a learned
      table of at least 2 rows, ...).
  """
  get = lambda key: config.get(key, _DIFFUSERS_DEFAULTS.get(key))
  problems = []
  if config.get('_class_name', 'UNet2DModel') != 'UNet2DModel':
    problems.append(f'_class_name is {config["_class_name"]!r}, expected UNet2DModel')
  for key in ('block_out_channels', 'down_block_types', 'up_block_types', 'sample_size'):
    if key not in config:
      raise ValueError(f'diffusers config has no {key!r}')
  for key, default, required in _DIFFUSERS_REQUIRED:
    if config.get(key, default) != required:
      problems.append(f'{key} is {config.get(key, default)!r}, expected {required!r}')
  if config.get('act_fn', 'silu') not in ('silu', 'swish'):
    problems.append(f'act_fn is {config["act_fn"]!r}, expected silu')
  # N rows: N - 1 classes and the null label; one row would be a null label without classes.
  num_class_embeds = config.get('num_class_embeds')
  if num_class_embeds is not None and (
    not isinstance(num_class_embeds, int)
    or isinstance(num_class_embeds, bool)
    or num_class_embeds < 2
  ):
    problems.append(
      f'num_class_embeds is {num_class_embeds!r}, expected null or an int >= 2 (the classes and '
      'the null label, the last row)'
    )

  widths = list(config['block_out_channels'])
  ch = widths[0]
  if config.get('time_embedding_dim') not in (None, 4 * ch):
    problems.append(f'time_embedding_dim is {config["time_embedding_dim"]}, expected {4 * ch}')
  if any(width % ch for width in widths):
    problems.append(f'block_out_channels {widths} are not multiples of {ch}')
  sample_size = config['sample_size']
  if not isinstance(sample_size, int):
    height, width = sample_size
    if height != width:
      problems.append(f'sample_size {sample_size} is not square')
    sample_size = height

  down_types, up_types = list(config['down_block_types']), list(config['up_block_types'])
  if not len(widths) == len(down_types) == len(up_types):
    problems.append(
      f'{len(widths)} block_out_channels for {len(down_types)} down and {len(up_types)} up blocks'
    )
  down_attn = {'DownBlock2D': False, 'AttnDownBlock2D': True}
  up_attn = {'UpBlock2D': False, 'AttnUpBlock2D': True}
  if not set(down_types) <= set(down_attn) or not set(up_types) <= set(up_attn):
    problems.append(
      f'block types {down_types} / {up_types} are not DownBlock2D/AttnDownBlock2D and '
      'UpBlock2D/AttnUpBlock2D'
    )
  elif [up_attn[u] for u in reversed(up_types)] != [down_attn[d] for d in down_types]:
    problems.append(f'attention in up_block_types {up_types} does not mirror {down_types}')
  attn_levels = [i for i, d in enumerate(down_types) if down_attn.get(d)]

  # One head: attention_head_dim null (head dim = channels) or equal to every attention width.
  head_dim = get('attention_head_dim')
  attn_widths = {widths[i] for i in attn_levels} | {widths[-1]}
  if head_dim is not None and attn_widths != {head_dim}:
    problems.append(f'attention_head_dim {head_dim} means several heads at widths {attn_widths}')
  if problems:
    raise ValueError('Unsupported diffusers UNet2DModel config: ' + '; '.join(problems))

  return architecture.unet_config(
    ch=ch,
    out_ch=get('out_channels'),
    ch_mult=[width // ch for width in widths],
    num_res_blocks=get('layers_per_block'),
    attn_resolutions=[sample_size // 2**i for i in attn_levels],
    image_size=sample_size,
    num_channels=get('in_channels'),
    dropout=get('dropout'),
    num_classes=num_class_embeds - 1 if num_class_embeds else 0,
  )


def params_from_diffusers(
  state_dict: Mapping[str, np.ndarray], model_config: ml_collections.ConfigDict
) -> dict:
  """Our params from a UNet2DModel state dict of NumPy arrays (to_q... or query... naming).

  Args:
    state_dict: tensor name -> array in torch layout (any float dtype).
    model_config: the U-Net's config (`model_config_from_diffusers`).

  Returns:
    The params tree for `model.apply({'params': params}, ...)`, float32 NumPy arrays.
  """
  shapes = architecture.flat_param_shapes(model_config)
  sources = _diffusers_sources(shapes, len(model_config.model.ch_mult))
  available = {name: tuple(np.shape(value)) for name, value in state_dict.items()}
  return architecture.assemble(sources, available, state_dict.__getitem__, 'diffusers weights')


def load_diffusers_model(folder: str) -> tuple[ml_collections.ConfigDict, dict]:
  """Reads a local diffusers UNet2DModel folder (config.json, diffusion_pytorch_model.safetensors).

  `folder` may also be a pipeline folder whose U-Net is in `unet/`. Only safetensors are read:
  no torch, no pickle.

  Returns:
    (the U-Net's config as in `model_config_from_diffusers`, params).
  """
  if not os.path.exists(os.path.join(folder, 'config.json')):
    folder = os.path.join(folder, 'unet')
  weights = os.path.join(folder, 'diffusion_pytorch_model.safetensors')
  if not os.path.exists(weights):
    raise FileNotFoundError(f'{weights} not found (only safetensors weights are read)')
  with open(os.path.join(folder, 'config.json')) as f:
    model_config = model_config_from_diffusers(json.load(f))
  state_dict = safetensors_numpy.load_file(weights)
  return model_config, params_from_diffusers(state_dict, model_config)


# ---------------------------------------------------------------------------------------------
# And back: our U-Net and params as a UNet2DModel folder (`python -m ddpm_jax.export`).
# ---------------------------------------------------------------------------------------------


def diffusers_config(config: ml_collections.ConfigDict) -> dict:
  """The UNet2DModel `config.json` of the U-Net of a project config (its `model`, `data` image
  shape and `diffusion.model_var_type`): what `model_config_from_diffusers` reads back as the
  same U-Net. A class-conditional U-Net (`model.num_classes` = K) gets `num_class_embeds` K + 1,
  the last row the null label (this module's docstring).

  Raises:
    ValueError: for a U-Net that UNet2DModel cannot represent (resampling without convolutions).
  """
  unet = models.create_model(config)
  if not unet.resamp_with_conv:
    raise ValueError(
      'model.resamp_with_conv is False: the U-Net resamples without convolutions, which '
      "diffusers' UNet2DModel cannot represent (its DownBlock2D / UpBlock2D resample with one)."
    )
  size = config.data.image_size
  attention = [size // 2**level in unet.attn_resolutions for level in range(len(unet.ch_mult))]
  unet_config = {
    '_class_name': 'UNet2DModel',
    'sample_size': size,
    'in_channels': config.data.num_channels,
    'out_channels': unet.out_ch,
    'block_out_channels': [unet.ch * mult for mult in unet.ch_mult],
    'layers_per_block': unet.num_res_blocks,
    'down_block_types': ['AttnDownBlock2D' if a else 'DownBlock2D' for a in attention],
    # up_blocks.{k} is up level L - 1 - k.
    'up_block_types': ['AttnUpBlock2D' if a else 'UpBlock2D' for a in reversed(attention)],
    'dropout': float(unet.dropout),
    'attention_head_dim': None,  # One head.
    'act_fn': 'silu',
    'num_class_embeds': unet.num_classes + 1 if unet.num_classes else None,
    **{key: required for key, _, required in _DIFFUSERS_REQUIRED},
  }
  # The reader is the one definition of what a config.json means: it must read back this U-Net.
  architecture.check_weights_match_config(model_config_from_diffusers(unet_config), config)
  return unet_config


def state_dict_from_params(params: Mapping, config: ml_collections.ConfigDict) -> dict:
  """The UNet2DModel state dict of our params: the inverse of `params_from_diffusers`.

  Args:
    params: the params tree of `models.create_model(config)` (arrays of any float dtype).
    config: the U-Net's config (a project config, or `model_config_from_diffusers`).

  Returns:
    {tensor name: float32 NumPy array in torch layout}, named as current diffusers names them
    (to_q, to_k, to_v, to_out.0).

  Raises:
    ValueError: naming every parameter missing from, unexpected in or misshapen in `params`.
  """
  shapes = architecture.flat_param_shapes(config)
  found = traverse_util.flatten_dict(dict(params))
  tensors.check_tensors(
    {'/'.join(path): shape.shape for path, shape in shapes.items()},
    {'/'.join(path): np.shape(value) for path, value in found.items()},
    what='The params',
    hint="They are not those of the config's U-Net: use the config they were trained with.",
  )
  state_dict = {}
  for path, (names, _, layout) in _diffusers_tensors(shapes, len(config.model.ch_mult)).items():
    value = _TORCH_LAYOUTS[layout][1](np.asarray(found[path], np.float32))
    state_dict[names[0]] = np.ascontiguousarray(value)
  return state_dict


def save_diffusers_model(folder: str, config: ml_collections.ConfigDict, params: Mapping) -> None:
  """Writes our U-Net and params as a UNet2DModel folder, `config.json` and
  `diffusion_pytorch_model.safetensors` (safetensors' NumPy writer: no torch), which
  `load_diffusers_model` and diffusers' `UNet2DModel.from_pretrained` read. Everything is
  computed before the first file is written, so an error leaves no file."""
  unet_config = diffusers_config(config)
  state_dict = state_dict_from_params(params, config)
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, 'config.json'), 'w') as f:
    json.dump(unet_config, f, indent=2)
    f.write('\n')
  safetensors_numpy.save_file(
    state_dict,
    os.path.join(folder, 'diffusion_pytorch_model.safetensors'),
    metadata={'format': 'pt'},  # As torch's writer marks the file, which loaders read.
  )

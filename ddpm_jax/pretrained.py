r"""The official DDPM weights as parameters of our U-Net, and a command-line converter.

Two published forms of the same weights (REFERENCE.md, "Official weights") are read:
- the diffusers ports on the Hugging Face Hub (`google/ddpm-cifar10-32`, `google/ddpm-church-256`,
  ...): a folder with `config.json` and `diffusion_pytorch_model.safetensors`, or the Hub repo
  itself, downloaded into the Hugging Face cache (`fetch_from_hub`);
- the original TensorFlow checkpoints (`model.ckpt-790000` for CIFAR10), whose variable names our
  parameter tree mirrors; the EMA copies are taken by default.

From the Hub (the config comes from the model's config.json: the shipped config that fits it is
named, or one is written to <workdir>/config.py), e.g.:

  python -m ddpm_jax.pretrained --source=google/ddpm-cifar10-32 \
    --workdir=/tmp/ddpm_cifar10_official

or, with the original checkpoint files (`model.ckpt-790000.{index,data-*}`, linked from the
README of github.com/hojonathanho/diffusion) in /tmp/ddpm_tf:

  python -m ddpm_jax.pretrained --config=configs/cifar10.py --format=tf \
    --source=/tmp/ddpm_tf/model.ckpt-790000 --workdir=/tmp/ddpm_cifar10_official

The converter checks the weights' architecture against the config and writes them as both the
parameters and the EMA parameters of a checkpoint in `workdir/checkpoints`, at the step parsed from
`model.ckpt-N` (else 0, or --step). From TF checkpoints it takes the EMA weights, which the paper
samples from; --nouse_ema takes the raw training weights instead.

Imports are strict: every parameter of our tree must come from exactly one tensor of the expected
shape, and every model tensor in the source must be used; anything else raises a ValueError that
names the tensors.
"""

import glob
import importlib.util
import json
import os
import re
from collections.abc import Callable, Mapping, Sequence

import jax
import ml_collections
import numpy as np
from absl import app, flags
from flax import traverse_util
from ml_collections import config_flags
from safetensors import numpy as safetensors_numpy

from ddpm_jax import checkpoints, models, tensors, tf_support

# A parameter's path in our tree, e.g. ('down_0', 'block_1', 'conv1', 'kernel').
ParamPath = tuple[str, ...]

# The attributes of the UNet that `models.create_model` builds which the weights fix, in the order
# errors list them.
_ARCH_FIELDS = ('ch', 'out_ch', 'ch_mult', 'num_res_blocks', 'attn_resolutions', 'resamp_with_conv')


def _unet_config(
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
) -> ml_collections.ConfigDict:
  """The U-Net of a set of weights, described as a project config describes one: the `model`
  section of configs/default.py with the `data` image shape and the `diffusion.model_var_type`,
  the fields that `models.create_model` reads.

  The output channels tell only whether the variance is learned (2 * num_channels) or not
  (num_channels); which fixed or learned variance is a sampling setting, here 'fixedlarge' or
  'learned', and the U-Net is the same for either.

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


def _module_kinds(shapes: Mapping[ParamPath, jax.ShapeDtypeStruct]) -> dict[ParamPath, str]:
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
_Source = tuple[tuple[str, ...], tuple[int, ...], Callable[[np.ndarray], np.ndarray]]


def _assemble(
  sources: Mapping[ParamPath, _Source],
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


# ---------------------------------------------------------------------------------------------
# diffusers (UNet2DModel)
# ---------------------------------------------------------------------------------------------

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
}
_DIFFUSERS_MID = {'block_1': 'resnets.0', 'attn_1': 'attentions.0', 'block_2': 'resnets.1'}


def _diffusers_modules(module: ParamPath, num_levels: int) -> tuple[str, ...]:
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


def _diffusers_sources(
  shapes: Mapping[ParamPath, jax.ShapeDtypeStruct], num_levels: int
) -> dict[ParamPath, _Source]:
  """Where each of our parameters lives in a UNet2DModel state dict, and its torch layout."""
  kinds = _module_kinds(shapes)
  sources = {}
  for path, shape in shapes.items():
    module, leaf = path[:-1], path[-1]
    names = _diffusers_modules(module, num_levels)
    names = tuple(f'{name}.{"bias" if leaf == "bias" else "weight"}' for name in names)
    if leaf != 'kernel':
      sources[path] = (names, shape.shape, lambda w: w)
    elif kinds[module] == 'conv':  # torch [out, in, kh, kw] -> [kh, kw, in, out]
      kh, kw, c_in, c_out = shape.shape
      sources[path] = (names, (c_out, c_in, kh, kw), lambda w: w.transpose(2, 3, 1, 0))
    elif module[-1] == 'nin_shortcut':  # torch 1x1 conv [out, in, 1, 1] -> [in, out]
      c_in, c_out = shape.shape
      sources[path] = (names, (c_out, c_in, 1, 1), lambda w: w[:, :, 0, 0].T)
    else:  # torch linear [out, in] -> [in, out]
      c_in, c_out = shape.shape
      sources[path] = (names, (c_out, c_in), lambda w: w.T)
  return sources


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
  ('class_embed_type', None, None),
  ('num_class_embeds', None, None),
)


def model_config_from_diffusers(config: Mapping) -> ml_collections.ConfigDict:
  """The U-Net of a UNet2DModel `config.json`, as the model, data and diffusion fields of a
  project config (`_unet_config`).

  Raises:
    ValueError: listing every setting our UNet cannot represent (multi-head attention, cos-first
      timestep embedding, symmetric downsample padding, ...).
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

  return _unet_config(
    ch=ch,
    out_ch=get('out_channels'),
    ch_mult=[width // ch for width in widths],
    num_res_blocks=get('layers_per_block'),
    attn_resolutions=[sample_size // 2**i for i in attn_levels],
    image_size=sample_size,
    num_channels=get('in_channels'),
    dropout=get('dropout'),
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
  shapes = flat_param_shapes(model_config)
  sources = _diffusers_sources(shapes, len(model_config.model.ch_mult))
  available = {name: tuple(np.shape(value)) for name, value in state_dict.items()}
  return _assemble(sources, available, state_dict.__getitem__, 'diffusers weights')


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
# Original TensorFlow checkpoints
# ---------------------------------------------------------------------------------------------

_EMA_SUFFIX = '/ExponentialMovingAverage'
_TF_LEAVES = {
  'norm': {'scale': 'gamma', 'bias': 'beta'},
  'conv': {'kernel': 'W', 'bias': 'b'},
  'dense': {'kernel': 'W', 'bias': 'b'},
}
_TF_WEIGHT = re.compile(r'model/.*/(W|b|gamma|beta)')


def _load_tf_checkpoint(path: str):
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
  data and diffusion fields of a project config (`_unet_config`).

  The checkpoint stores no config and a conv net's weights do not fix the image size, so the
  caller gives `image_size`; attention resolutions follow from the levels that have `attn_0`.
  Dropout is not recorded (0.0 here; it does not matter for sampling).
  """
  _, reader = _load_tf_checkpoint(path)
  shapes = _tf_model_tensors(reader, use_ema)
  if 'model/conv_in/W' not in shapes or 'model/conv_out/W' not in shapes:
    raise ValueError(f'{path} has no model/conv_in/W or model/conv_out/W (use_ema={use_ema})')
  _, _, num_channels, ch = shapes['model/conv_in/W']
  num_levels = _count_consecutive(shapes, 'model/down_{}/block_0/conv1/W')
  num_res_blocks = _count_consecutive(shapes, 'model/down_0/block_{}/conv1/W')
  widths = [shapes[f'model/down_{i}/block_0/conv1/W'][-1] for i in range(num_levels)]
  if any(width % ch for width in widths):
    raise ValueError(f'{path}: level widths {widths} are not multiples of ch={ch}')
  return _unet_config(
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
  """
  prefix, reader = _load_tf_checkpoint(path)
  shapes = flat_param_shapes(model_config)
  kinds = _module_kinds(shapes)
  suffix = _EMA_SUFFIX if use_ema else ''
  sources = {}
  for (*module, leaf), shape in shapes.items():
    name = 'model/' + '/'.join(module) + '/' + _TF_LEAVES[kinds[tuple(module)]][leaf]
    sources[(*module, leaf)] = ((name,), shape.shape, lambda w: w)
  available = _tf_model_tensors(reader, use_ema)
  read = lambda name: reader.get_tensor(name + suffix)
  copy = 'EMA' if use_ema else 'raw'
  return _assemble(sources, available, read, f'{copy} weights of TF checkpoint {prefix}')


# ---------------------------------------------------------------------------------------------
# Converter
# ---------------------------------------------------------------------------------------------


def check_weights_match_config(
  model_config: ml_collections.ConfigDict, config: ml_collections.ConfigDict
) -> None:
  """Raises a ValueError listing each field where the weights differ from the project config.

  `model_config` is the weights' U-Net (`model_config_from_diffusers`, ...). Compares image size
  and channels of the two `data` sections and the U-Nets that `models.create_model` builds from
  both (ch, out_ch, ch_mult, num_res_blocks, attn_resolutions, resamp_with_conv). Dropout is not
  compared: it does not change the function used for sampling.
  """
  weights, model = models.create_model(model_config), models.create_model(config)
  fields = [
    ('data.image_size', model_config.data.image_size, config.data.image_size),
    ('data.num_channels', model_config.data.num_channels, config.data.num_channels),
  ]
  for field in _ARCH_FIELDS:
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


# ---------------------------------------------------------------------------------------------
# The Hugging Face Hub, and the project config of imported weights
# ---------------------------------------------------------------------------------------------

# The files of a UNet2DModel, at the top of a repo or in the `unet/` folder of a pipeline.
_HUB_PATTERNS = [
  f'{folder}{name}'
  for folder in ('', 'unet/')
  for name in ('config.json', 'diffusion_pytorch_model.safetensors')
]
# The folder of the shipped configs, relative to the working directory: the repository root,
# where main.py runs with the path that `convert` returns.
SHIPPED_CONFIGS_DIR = 'configs'
# How the Hub repo ids of the published weights name their data (google/ddpm-celebahq-256,
# google/ddpm-church-256, ...), by the `data.dataset` of the shipped configs they fit; other
# datasets by their own name (google/ddpm-cifar10-32).
_HUB_DATA_NAMES = {
  'celeb_a_hq/256': 'celebahq',
  'lsun/church_outdoor': 'church',
  'lsun/bedroom': 'bedroom',
  'lsun/cat': 'cat',
}


def is_hub_id(source: str) -> bool:
  """Whether `source` names a Hub repo ('org/name') rather than an existing local path."""
  return not os.path.exists(source) and re.fullmatch(r'[\w.-]+/[\w.-]+', source) is not None


def fetch_from_hub(repo_id: str, revision: str | None = None) -> str:
  """The local folder of a Hub model repo's UNet2DModel files, downloaded into the Hugging Face
  cache (`HF_HUB_CACHE`) unless already there.

  huggingface_hub resumes interrupted downloads, reads `HF_TOKEN` for private or gated repos and,
  with `HF_HUB_OFFLINE=1`, only the cache. Raises FileNotFoundError with what to do when the repo,
  the revision or the cached copy does not exist.
  """
  import huggingface_hub  # noqa: PLC0415 - only the Hub path needs it.
  from huggingface_hub import errors  # noqa: PLC0415

  where = f'{repo_id} (revision {revision or "main"})'
  try:
    return huggingface_hub.snapshot_download(
      repo_id, revision=revision, allow_patterns=_HUB_PATTERNS
    )
  except errors.RevisionNotFoundError:
    raise FileNotFoundError(f'The Hub repo {repo_id} has no revision {revision!r}.') from None
  except (errors.RepositoryNotFoundError, errors.GatedRepoError):
    raise FileNotFoundError(
      f'No Hub model repo {repo_id} that you can read: check the id (e.g. '
      'google/ddpm-cifar10-32), or set HF_TOKEN for a private or gated repo.'
    ) from None
  except errors.LocalEntryNotFoundError:
    raise FileNotFoundError(
      f'{where} is not in the Hugging Face cache ({huggingface_hub.constants.HF_HUB_CACHE}) and '
      'the Hub cannot be reached (no network, or HF_HUB_OFFLINE=1): download it once with '
      'network access, e.g. with this same command.'
    ) from None


def load_shipped_configs() -> dict[str, ml_collections.ConfigDict]:
  """{name: config} of the dataset configs in configs/ (configs/cifar10.py -> 'cifar10'), by
  name; the bases that they build on (default.py, default256.py) are left out.

  Each file is read by its path, as main.py's --config reads one; the files import their bases
  from configs/ (`from configs import default`), so the repository root is on sys.path, as it is
  for main.py and `python -m ddpm_jax.pretrained` run there.
  """
  paths = sorted(
    path
    for path in glob.glob(os.path.join(SHIPPED_CONFIGS_DIR, '*.py'))
    if not os.path.basename(path).startswith(('_', 'default'))
  )
  if not paths:
    raise FileNotFoundError(
      f'No config files in {SHIPPED_CONFIGS_DIR}/ of the working directory: run in the '
      'repository root, or pass --config, the config these weights were trained with.'
    )
  configs = {}
  for path in paths:
    name = os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(f'shipped_config_{name}', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    configs[name] = module.get_config()
  return configs


def shipped_config(
  model_config: ml_collections.ConfigDict,
  source: str,
  shipped: Mapping[str, ml_collections.ConfigDict],
) -> str | None:
  """The name of the shipped config (`load_shipped_configs`) whose U-Net and images are those of
  `model_config`; of several, the first whose data the source's name names. None when none
  fits."""
  fits = []
  for name, config in shipped.items():
    try:
      check_weights_match_config(model_config, config)
    except ValueError:
      continue
    fits.append(name)
  basename = os.path.basename(source.rstrip('/'))
  datasets = {name: shipped[name].data.dataset for name in fits}
  named = [name for name in fits if _HUB_DATA_NAMES.get(datasets[name], datasets[name]) in basename]
  return (named or fits or [None])[0]


def derived_config(
  model_config: ml_collections.ConfigDict,
  source: str,
  shipped: Mapping[str, ml_collections.ConfigDict],
) -> str:
  """The text of a config file for weights that no shipped config fits: the first shipped config
  (`load_shipped_configs`) of the same image size and channels with the U-Net of `model_config`.
  Raises ValueError when no shipped config has those images, or the model has a learned
  variance."""
  image_size, num_channels = model_config.data.image_size, model_config.data.num_channels
  bases = [
    name
    for name, config in shipped.items()
    if (config.data.image_size, config.data.num_channels) == (image_size, num_channels)
  ]
  out_ch = models.create_model(model_config).out_ch
  if not bases or out_ch != num_channels:
    raise ValueError(
      f'No config in configs/ is for {image_size}x{image_size}x{num_channels} images and '
      f'{out_ch} output channels: pass --config, the config these weights were trained with.'
    )
  values = {name: model_config.model[name] for name in _ARCH_FIELDS if name != 'out_ch'}
  values = {k: tuple(v) if isinstance(v, list | tuple) else v for k, v in values.items()}
  lines = [f'  config.model.{name} = {value!r}' for name, value in values.items()]
  return (
    f'"""The config of the weights converted from {source} by ddpm_jax.pretrained:\n'
    f'configs/{bases[0]}.py with the U-Net of their config.json."""\n\n'
    f'from configs import {bases[0]}\n\n\n'
    'def get_config():\n'
    f'  config = {bases[0]}.get_config()\n' + '\n'.join(lines) + '\n  return config\n'
  )


def default_step(source: str, source_format: str) -> int:
  """The training step of the weights: N from a TF `model.ckpt-N` prefix, else 0."""
  if source_format == 'tf':
    prefix, _ = _load_tf_checkpoint(source)
    match = re.search(r'model\.ckpt-(\d+)$', prefix)
    if match:
      return int(match.group(1))
  return 0


def convert(
  config: ml_collections.ConfigDict | None,
  *,
  source: str,
  source_format: str = 'diffusers',
  workdir: str,
  step: int | None = None,
  use_ema: bool = True,
  revision: str | None = None,
) -> str | None:
  """Imports official weights, checks them against `config`, and saves a checkpoint in workdir.

  Args:
    config: the project config the weights will be used with; None (diffusers weights only):
      the shipped config in configs/ that fits their config.json (`shipped_config`), else a
      config written to `<workdir>/config.py` (`derived_config`).
    source: a diffusers folder, a Hub model repo id ('google/ddpm-cifar10-32', fetched with
      `fetch_from_hub`), or a TF checkpoint prefix/directory.
    source_format: 'diffusers' or 'tf'.
    workdir: where `checkpoints.save_imported` writes (workdir/checkpoints).
    step: checkpoint step; None means `default_step(source, source_format)`.
    use_ema: TF only: take the EMA copies (default) or the raw weights.
    revision: Hub only: a branch, tag or commit hash to pin (default: main).

  Returns:
    Without `config`, the path of the config to sample with; else None. Nothing is written
    when an error is raised.
  """
  config_path, config_text = None, None
  if source_format == 'diffusers':
    folder = fetch_from_hub(source, revision) if is_hub_id(source) else source
    model_config, params = load_diffusers_model(folder)
    if config is None:
      shipped = load_shipped_configs()
      name = shipped_config(model_config, source, shipped)
      if name is None:
        config_text = derived_config(model_config, source, shipped)
        config_path = os.path.join(workdir, 'config.py')
      else:
        config, config_path = shipped[name], os.path.join(SHIPPED_CONFIGS_DIR, f'{name}.py')
    if config is not None:
      check_weights_match_config(model_config, config)
  elif config is None:
    raise ValueError('TF checkpoints carry no model config: pass --config.')
  elif source_format == 'tf':
    model_config = model_config_from_tf_checkpoint(
      source, image_size=config.data.image_size, use_ema=use_ema
    )
    check_weights_match_config(
      model_config, config
    )  # Before the import, whose errors are less direct.
    params = params_from_tf_checkpoint(source, model_config, use_ema=use_ema)
  else:
    raise ValueError(f'Unknown format {source_format!r}; expected diffusers or tf')
  if step is None:
    step = default_step(source, source_format)
  checkpoints.save_imported(workdir, params=params, step=step)
  if config_text is not None:
    with open(config_path, 'w') as f:
      f.write(config_text)
  return config_path


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  config_path = convert(
    flags.FLAGS.config,
    source=flags.FLAGS.source,
    source_format=flags.FLAGS.format,
    workdir=flags.FLAGS.workdir,
    step=flags.FLAGS.step,
    use_ema=flags.FLAGS.use_ema,
    revision=flags.FLAGS.revision,
  )
  config_path = config_path or config_flags.get_config_filename(flags.FLAGS['config'])
  print(f'Converted {flags.FLAGS.source} into {flags.FLAGS.workdir}. Sample with:')
  print(f'  python main.py --config={config_path} --mode=sample --workdir={flags.FLAGS.workdir}')


if __name__ == '__main__':
  # Defined only when run as a program, so that importing this library next to main.py, which
  # also defines --config and --workdir, cannot clash.
  config_flags.DEFINE_config_file(
    'config', None, 'Project config file; optional for diffusers weights (see `convert`).'
  )
  flags.DEFINE_string(
    'source', None, 'Hub model repo id, diffusers folder, or TF checkpoint prefix or directory.'
  )
  flags.DEFINE_enum('format', 'diffusers', ['diffusers', 'tf'], 'Format of --source.')
  flags.DEFINE_string('revision', None, 'Hub only: branch, tag or commit hash (default: main).')
  flags.DEFINE_string('workdir', None, 'Output directory; the checkpoint goes to checkpoints/.')
  flags.DEFINE_integer('step', None, 'Checkpoint step; default N of model.ckpt-N, else 0.')
  flags.DEFINE_bool('use_ema', True, 'TF only: EMA weights, or the raw ones with --nouse_ema.')
  flags.mark_flags_as_required(['source', 'workdir'])
  app.run(main)

"""Networks. `create_model(config)` builds the U-Net that a project config describes,
`check_config(config)` checks that description, and `param_shapes` gives the shapes of its
parameters.

With `config.model.num_classes` = K > 0 the U-Net is class-conditional: it is called as
`model.apply(variables, x, t, y, train=...)` with y [B] int32 labels in [0, K], K being the null
label of classifier-free guidance, and its params have `label_emb/embedding` [K + 1, 4 ch]
(`unet.UNet`). With K = 0 (the default) it is the original unconditional network, called without
y."""

import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from ddpm_jax import diffusion
from ddpm_jax.models.unet import UNet


def compute_dtype(dtype: str | None, device: jax.Device | None = None) -> jnp.dtype:
  """`config.model.dtype`, or where it is None the default of the platform of `device` (by
  default JAX's first device): bfloat16 on TPUs and on NVIDIA GPUs of compute capability 8.0 and
  up (Ampere, Hopper, Blackwell), whose matrix units multiply bfloat16 at full rate and accumulate
  in float32 (an H100 sampled 1.7x faster in bfloat16, BENCHMARKS.md "GPU"); float32, the
  paper's, elsewhere: a CPU computes bfloat16 slower than float32 (the digits train step 15%
  slower here), and older GPUs have no bfloat16 tensor cores."""
  if dtype is not None:
    return jnp.dtype(dtype)
  device = device or jax.devices()[0]
  fast = device.platform == 'tpu'
  if device.platform == 'gpu':
    major = str(getattr(device, 'compute_capability', '')).split('.')[0]
    fast = major.isdigit() and int(major) >= 8
  return jnp.dtype(jnp.bfloat16 if fast else jnp.float32)


def create_model(config: ml_collections.ConfigDict, device: jax.Device | None = None) -> UNet:
  """The U-Net for `config.model`, sized for `config.data` and `config.diffusion.model_var_type`,
  computing in `compute_dtype(config.model.dtype, device)`: `device` one of those it will run on
  (by default JAX's first; one of a TPU topology for a program compiled for it elsewhere)."""
  num_channels = config.data.num_channels
  learned_var = config.diffusion.model_var_type in diffusion.LEARNED_VAR_TYPES
  return UNet(
    ch=config.model.ch,
    out_ch=2 * num_channels if learned_var else num_channels,
    ch_mult=tuple(config.model.ch_mult),
    num_res_blocks=config.model.num_res_blocks,
    attn_resolutions=tuple(config.model.attn_resolutions),
    dropout=config.model.dropout,
    resamp_with_conv=config.model.resamp_with_conv,
    dtype=compute_dtype(config.model.dtype, device),
    remat=config.model.remat,
    attention_impl=config.model.attention_impl,
    num_classes=config.model.num_classes,
  )


def check_config(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError when the U-Net of `config.model` cannot process `config.data` images."""
  image_size = config.data.image_size
  ch_mult = tuple(config.model.ch_mult)
  if not ch_mult:
    raise ValueError('config.model.ch_mult must name at least one level.')
  factor = 2 ** (len(ch_mult) - 1)
  if image_size % factor:
    raise ValueError(
      f'config.data.image_size = {image_size} is not divisible by 2^(len(ch_mult) - 1) = '
      f'{factor}: the U-Net halves the resolution {len(ch_mult) - 1} times '
      f'(ch_mult = {ch_mult}).'
    )
  resolutions = [image_size // 2**level for level in range(len(ch_mult))]
  unreached = [r for r in config.model.attn_resolutions if r not in resolutions]
  if unreached:
    raise ValueError(
      f'config.model.attn_resolutions {tuple(config.model.attn_resolutions)} include '
      f'{unreached}, which the network never reaches; its resolutions are {resolutions}.'
    )
  if config.model.dtype not in (None, 'float32', 'bfloat16'):
    raise ValueError(
      "config.model.dtype must be 'float32', 'bfloat16' or None (the platform's), got "
      f'{config.model.dtype!r}.'
    )
  if config.model.attention_impl not in (None, 'xla', 'cudnn'):
    raise ValueError(
      "config.model.attention_impl must be None, 'xla' or 'cudnn' (the implementation of "
      'jax.nn.dot_product_attention), '
      f'got {config.model.attention_impl!r}.'
    )
  num_classes = config.model.num_classes
  # bool is an int in Python: True would silently mean one class.
  if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 0:
    raise ValueError(
      'config.model.num_classes must be an int >= 0 (0: unconditional; K > 0: labels 0..K-1 '
      f'and the null label K), got {num_classes!r}.'
    )


def param_shapes(model: UNet, image_size: int, num_channels: int) -> Any:
  """The parameters of `model` for images [B, image_size, image_size, num_channels], as a tree of
  jax.ShapeDtypeStruct: traced with jax.eval_shape, no arrays, no compute. A class-conditional
  model is traced with labels y [1] (its `label_emb`)."""
  t = jax.ShapeDtypeStruct((1,), jnp.int32)
  y = (jax.ShapeDtypeStruct((1,), jnp.int32),) if model.num_classes else ()
  return jax.eval_shape(
    functools.partial(model.init, train=False),
    jax.random.key(0),
    jax.ShapeDtypeStruct((1, image_size, image_size, num_channels), jnp.float32),
    t,
    *y,
  )['params']


__all__ = ['UNet', 'check_config', 'compute_dtype', 'create_model', 'param_shapes']

"""Networks. `create_model(config)` builds the U-Net that a project config describes;
`param_shapes` gives the shapes of its parameters."""

import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from ddpm_jax import diffusion
from ddpm_jax.models.unet import UNet


def create_model(config: ml_collections.ConfigDict) -> UNet:
  """The U-Net for `config.model`, sized for `config.data` and `config.diffusion.model_var_type`."""
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
    dtype=jnp.dtype(config.model.dtype),
    remat=config.model.remat,
    attention_impl=config.model.attention_impl,
  )


def param_shapes(model: UNet, image_size: int, num_channels: int) -> Any:
  """The parameters of `model` for images [B, image_size, image_size, num_channels], as a tree of
  jax.ShapeDtypeStruct: traced with jax.eval_shape, no arrays, no compute."""
  return jax.eval_shape(
    functools.partial(model.init, train=False),
    jax.random.key(0),
    jax.ShapeDtypeStruct((1, image_size, image_size, num_channels), jnp.float32),
    jax.ShapeDtypeStruct((1,), jnp.int32),
  )['params']


__all__ = ['UNet', 'create_model', 'param_shapes']

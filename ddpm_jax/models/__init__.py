"""Networks. `create_model(config)` builds the U-Net that a project config describes."""

import jax.numpy as jnp
import ml_collections

from ddpm_jax.models.unet import UNet

# Variance types for which the network also outputs a (log-)variance: 2C channels instead of C.
_LEARNED_VAR_TYPES = ('learned', 'learned_range')


def create_model(config: ml_collections.ConfigDict) -> UNet:
  """The U-Net for `config.model`, sized for `config.data` and `config.diffusion.model_var_type`."""
  num_channels = config.data.num_channels
  learned_var = config.diffusion.model_var_type in _LEARNED_VAR_TYPES
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


__all__ = ['UNet', 'create_model']

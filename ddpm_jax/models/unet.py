"""The DDPM U-Net (Ho et al. 2020, Appendix B), numerically the official TensorFlow network.

A PixelCNN++-style U-Net: ResNet blocks conditioned on a sinusoidal timestep embedding, single-head
self-attention at chosen resolutions, GroupNorm, swish. The parameter tree mirrors the original
variable scopes so that official weights map over by name (`ddpm_jax/pretrained/`):

  temb/dense{0,1}, [label_emb], conv_in,
  down_{i}/block_{j}/{norm1, conv1, temb_proj, norm2, conv2, nin_shortcut},
  down_{i}/attn_{j}/{norm, q, k, v, proj_out}, down_{i}/downsample/conv,
  mid/{block_1, attn_1, block_2},
  up_{i}/block_{j}, up_{i}/attn_{j}, up_{i}/upsample/conv,
  norm_out, conv_out.

Level i runs at resolution image_size / 2**i on both paths; up_{i} has num_res_blocks + 1 blocks.

A class-conditional network (`num_classes` = K > 0; the original is unconditional) also has
`label_emb/embedding` [K + 1, 4 ch], one learned vector per label y in [0, K], added to the
timestep embedding after its MLP: temb = dense1(swish(dense0(sinusoidal(t)))) + label_emb[y], as
improved-diffusion (`label_emb`) and diffusers' UNet2DModel (`class_embedding`, class_embed_type
None) condition theirs. Label K is the null ("no class") label of classifier-free guidance (Ho &
Salimans 2022): the network trained with labels dropped to K is the unconditional model. With
K = 0 there is no such parameter, and the network is the original's, parameters and outputs
alike.
Convolutions and dense layers compute in `dtype`; parameters, GroupNorm and the attention softmax
stay float32. With `remat`, each ResNet and attention block is a `jax.checkpoint`: its activations
are recomputed in the backward pass instead of kept, which cuts the peak memory of training at the
256x256 resolution for about a third more compute; the function and the parameters are unchanged.
"""

import functools
import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

# The original's init scale "0": conv2 of every ResNet block, proj_out and conv_out start near zero
# so that each residual branch, and the network output, starts close to the identity / zero.
ZERO_ISH = 1e-10
# The class embedding's init: N(0, 1) per entry, torch nn.Embedding's default, with which
# improved-diffusion / guided-diffusion (`label_emb`) and diffusers (`class_embedding`) start
# theirs; not Flax's nn.Embed default (std 1 / sqrt(4 ch)). The original has no class embedding.
LABEL_EMB_INIT = nn.initializers.normal(stddev=1.0)


def default_init(scale: float = 1.0) -> nn.initializers.Initializer:
  """The original's initializer: variance scaling, fan_avg, uniform (limit sqrt(3 scale / fan))."""
  return nn.initializers.variance_scaling(scale, 'fan_avg', 'uniform')


def get_timestep_embedding(t: jax.Array, dim: int) -> jax.Array:
  """Sinusoidal embedding of integer timesteps, as in the original (and Transformers).

  Args:
    t: [B] timesteps (int or float), 0-based.
    dim: embedding size, even.

  Returns:
    [B, dim] float32: [sin(t f), cos(t f)], sin first, with f_i = 10000^(-i / (dim/2 - 1)).
  """
  half = dim // 2
  freqs = jnp.exp(jnp.arange(half, dtype=jnp.float32) * -(math.log(10000) / (half - 1)))
  args = t.astype(jnp.float32)[:, None] * freqs[None, :]
  return jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=1)


_NHWC = ('NHWC', 'HWIO', 'NHWC')


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv_with_plain_gradients(x, w, strides, pads):
  """`lax.conv_general_dilated(x, w, strides, pads)` (NHWC, HWIO) whose two gradients are written
  as forward convolutions of the standard layout.

  The values are those of JAX's own gradients, bit for bit (tests/test_unet.py); only their form
  differs. JAX's transpose rules express them as convolutions with batch and feature axes
  swapped, which XLA's CPU backend maps onto its library kernels (through transposes) at the top
  level of a program but, inside a loop body, emits as naive loops: 10x (input gradient) to 100x
  (kernel gradient) slower, which made the train step inside `lax.fori_loop`
  (`train.create_train_call`) 15x slower than outside it. Here the transposes are explicit, and
  fenced so that XLA cannot fold them back into the convolutions, so the gradients run as fast
  inside a loop as outside.
  """
  return lax.conv_general_dilated(x, w, strides, pads, dimension_numbers=_NHWC)


def _conv_fwd(x, w, strides, pads):
  return _conv_with_plain_gradients(x, w, strides, pads), (x, w)


def _conv_bwd(strides, pads, residuals, g):
  """g: [B, M1, M2, O], the output's cotangent -> (dx [B, N1, N2, I], dw [K1, K2, I, O])."""
  x, w = residuals
  sizes, kernel, out_sizes = x.shape[1:3], w.shape[:2], g.shape[1:3]
  # dx = the convolution of g, dilated by the strides, with the kernel mirrored and I <-> O.
  dx_pads = [
    (k - 1 - lo, k - 1 - hi + (n + lo + hi - k) % s)
    for n, k, s, (lo, hi) in zip(sizes, kernel, strides, pads, strict=True)
  ]
  w_mirrored = _materialized(jnp.flip(w, (0, 1)).transpose(0, 1, 3, 2))
  dx = lax.conv_general_dilated(
    g, w_mirrored, (1, 1), dx_pads, lhs_dilation=strides, dimension_numbers=_NHWC
  )
  # dw[a, b, i, o] = sum_{n, h, v} x_padded[n, s h + a, s v + b, i] g[n, h, v, o]: a convolution
  # of x with I as its batch and B as its features, by g, dilated by the strides, as the window.
  dw_pads = [
    (lo, k - n - lo + (m - 1) * s)
    for n, k, m, s, (lo, _) in zip(sizes, kernel, out_sizes, strides, pads, strict=True)
  ]
  dw = lax.conv_general_dilated(
    _materialized(x.transpose(3, 1, 2, 0)),  # [I, N1, N2, B]
    _materialized(g.transpose(1, 2, 0, 3)),  # [M1, M2, B, O]
    (1, 1),
    dw_pads,
    rhs_dilation=strides,
    dimension_numbers=_NHWC,
  )  # [I, K1, K2, O]
  return dx, _materialized(dw).transpose(1, 2, 0, 3)


def _materialized(x: jax.Array) -> jax.Array:
  """x, computed as written: XLA may not fold a transpose into the convolution that uses it."""
  return lax.optimization_barrier(x)


_conv_with_plain_gradients.defvjp(_conv_fwd, _conv_bwd)


def conv_general_dilated(
  lhs,
  rhs,
  window_strides,
  padding,
  *,
  lhs_dilation,
  rhs_dilation,
  dimension_numbers,
  feature_group_count=1,
  precision=None,
):
  """The U-Net's convolution: `lax.conv_general_dilated` as `nn.Conv` calls it, NHWC x HWIO.

  In a program lowered for the CPU its gradients take the form of `_conv_with_plain_gradients`
  (same values); in one lowered for any other platform (GPU, TPU) it is `lax.conv_general_dilated`
  itself, whose gradients those backends handle natively. The choice is made by the platform the
  program is compiled for (`lax.platform_dependent`), not by the host's default backend, so a TPU
  program compiled ahead of time on a CPU host (benchmarks/tpu_aot.py) gets the TPU form.
  """
  native = functools.partial(
    lax.conv_general_dilated,
    window_strides=window_strides,
    padding=padding,
    lhs_dilation=lhs_dilation,
    rhs_dilation=rhs_dilation,
    dimension_numbers=dimension_numbers,
    feature_group_count=feature_group_count,
    precision=precision,
  )
  plain_form_applies = (
    feature_group_count == 1
    and precision is None
    and set(lhs_dilation or (1,)) == set(rhs_dilation or (1,)) == {1}
    and dimension_numbers == lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)
  )
  if not plain_form_applies:
    return native(lhs, rhs)
  if isinstance(padding, str):
    padding = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], window_strides, padding)
  strides, pads = tuple(window_strides), tuple(tuple(p) for p in padding)
  plain = lambda x, w: _conv_with_plain_gradients(x, w, strides, pads)
  return lax.platform_dependent(lhs, rhs, cpu=plain, default=native)


def _conv(features: int, name: str, dtype: Any, *, strides: int = 1, init_scale: float = 1.0):
  # Flax 'SAME' padding equals TF 'SAME': (1, 1) at stride 1 and (0, 1) at stride 2 on even sizes.
  return nn.Conv(
    features,
    (3, 3),
    strides=(strides, strides),
    padding='SAME',
    dtype=dtype,
    kernel_init=default_init(init_scale),
    conv_general_dilated=conv_general_dilated,
    name=name,
  )


def _dense(features: int, name: str, dtype: Any, *, init_scale: float = 1.0):
  """A dense layer over the last axis; on [B, H, W, C] it is the original's 1x1 `nin`."""
  return nn.Dense(features, dtype=dtype, kernel_init=default_init(init_scale), name=name)


class GroupNorm(nn.Module):
  """GroupNorm (32 groups, eps 1e-6) over [B, H, W, C], computed and returned in float32.

  The parameters are those of `nn.GroupNorm` (`scale`, `bias`: [C]). The variance is taken as
  E[(x - mean)^2], as the original does, not E[x^2] - mean^2. Each statistic is summed over the
  pixels first and then over the channels of a group: on CPU this order makes the U-Net's
  forward pass about 6% faster than `nn.GroupNorm`'s single reduction over both (BENCHMARKS.md);
  the values differ by float rounding only (tests/test_unet.py).
  """

  num_groups: int = 32
  epsilon: float = 1e-6

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, height, width, c = x.shape
    scale = self.param('scale', nn.initializers.ones_init(), (c,), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros_init(), (c,), jnp.float32)
    per_group = c // self.num_groups
    count = height * width * per_group
    x = x.astype(jnp.float32).reshape(b, height * width, c)

    def group_mean(sums: jax.Array) -> jax.Array:
      """[B, C] sums over the pixels -> [B, 1, C]: the mean of each channel's group."""
      means = sums.reshape(b, self.num_groups, per_group).sum(-1) / count
      return jnp.repeat(means, per_group, axis=1)[:, None, :]

    centered = x - group_mean(x.sum(1))
    variance = group_mean(jnp.square(centered).sum(1))
    y = centered * (lax.rsqrt(variance + self.epsilon) * scale) + bias
    return y.reshape(b, height, width, c)


class ResnetBlock(nn.Module):
  """norm1 -> swish -> conv1 -> + temb_proj(swish(temb)) -> norm2 -> swish -> dropout -> conv2.

  The shortcut is a 1x1 linear map (`nin_shortcut`) when the channel count changes. Output x + h.
  """

  out_ch: int
  dropout: float
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, temb: jax.Array, train: bool) -> jax.Array:
    """x: [B, H, W, C_in], temb: [B, 4 ch]; returns [B, H, W, out_ch].

    `train` (dropout on) is positional: it is the static argument of the remat'd block.
    """
    h = nn.swish(GroupNorm(name='norm1')(x))
    h = _conv(self.out_ch, 'conv1', self.dtype)(h)
    h += _dense(self.out_ch, 'temb_proj', self.dtype)(nn.swish(temb))[:, None, None, :]
    h = nn.swish(GroupNorm(name='norm2')(h))
    h = nn.Dropout(self.dropout, deterministic=not train)(h)
    h = _conv(self.out_ch, 'conv2', self.dtype, init_scale=ZERO_ISH)(h)
    if x.shape[-1] != self.out_ch:
      x = _dense(self.out_ch, 'nin_shortcut', self.dtype)(x)
    return x + h


class AttnBlock(nn.Module):
  """Single-head self-attention over all H * W positions, with a residual connection.

  softmax(q k^T / sqrt(C)) v through `jax.nn.dot_product_attention`: its XLA implementation
  takes the logits and the softmax in float32 whatever `dtype` is; `attention_impl='cudnn'`
  selects cuDNN's fused kernel instead (NVIDIA GPUs, bfloat16, head sizes cuDNN supports).
  """

  dtype: Any = jnp.float32
  attention_impl: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [B, H, W, C]; returns [B, H, W, C]."""
    b, height, width, c = x.shape
    h = GroupNorm(name='norm')(x)
    # [B, H * W, 1 head, C] each.
    q, k, v = (_dense(c, name, self.dtype)(h).reshape(b, height * width, 1, c) for name in 'qkv')
    h = jax.nn.dot_product_attention(q, k, v, implementation=self.attention_impl)
    h = h.reshape(b, height, width, c)
    return x + _dense(c, 'proj_out', self.dtype, init_scale=ZERO_ISH)(h)


def _block_types(remat: bool) -> tuple[type[ResnetBlock], type[AttnBlock]]:
  """The ResNet and attention block classes, each a `jax.checkpoint` (nn.remat) when `remat`.

  The parameters keep their names: remat changes what is stored for the backward pass, not the
  function. Argument 3 of ResnetBlock (`train`, counting self as 0) is static.
  """
  if not remat:
    return ResnetBlock, AttnBlock
  return nn.remat(ResnetBlock, static_argnums=(3,)), nn.remat(AttnBlock)


class Downsample(nn.Module):
  """Halves H and W: 3x3 stride-2 conv (TF 'SAME' padding) or 2x2 average pooling."""

  with_conv: bool
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if self.with_conv:
      return _conv(x.shape[-1], 'conv', self.dtype, strides=2)(x)
    return nn.avg_pool(x, (2, 2), strides=(2, 2), padding='SAME')


class Upsample(nn.Module):
  """Doubles H and W by nearest-neighbour repetition, then an optional 3x3 conv."""

  with_conv: bool
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if self.with_conv:
      return _UpsampleConv(x.shape[-1], self.dtype, name='conv')(x)
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


# An output pixel of phase p (its index mod 2) along an axis sees, after nearest upsampling, input
# pixels i-1, i, i (p = 0: output 2i) or i, i, i+1 (p = 1: output 2i + 1): the 3 taps of the
# kernel fold onto 2 input pixels, which start at i-1 or i: the padding of a 2-tap convolution of
# the low-resolution input.
_PHASE_PADS = ((1, 0), (0, 1))


def _fold_taps(kernel: jax.Array, axis: int, phase: int) -> jax.Array:
  """The 2 taps along `axis` of an output pixel of `phase`: (k0, k1 + k2) or (k0 + k1, k2)."""
  k0, k1, k2 = (lax.index_in_dim(kernel, i, axis) for i in range(3))
  return jnp.concatenate((k0, k1 + k2) if phase == 0 else (k0 + k1, k2), axis)


class _UpsampleConv(nn.Module):
  """conv3x3(nearest_upsample(x)) computed as four 2x2 convolutions of x, one per output phase.

  The function and the parameters (`kernel` [3, 3, C, O], `bias` [O], those of an nn.Conv named
  `conv`, with the same initializers) are those of the original's upsample + conv, but 16
  multiply-adds per pair of channels per low-resolution pixel instead of 36: the original's
  3x3 kernel slides over repeated pixels, whose taps are summed here before the convolution.
  The results differ from the direct form by float rounding only (tests/test_unet.py).

  In a program compiled for a TPU it is the direct form (`_direct`): there the four phases' stack
  and interleave cost more copies than the 2.25x multiply-adds cost (XLA's accounting, v5p-8
  sampler, bfloat16: 6.00 against 7.02 GB a step, 3.82 against 4.11 ms; BENCHMARKS.md). Chosen
  by the platform compiled for, like `conv_general_dilated`.
  """

  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param('kernel', default_init(), (3, 3, x.shape[-1], self.features), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros_init(), (self.features,), jnp.float32)
    x, bias = nn.dtypes.promote_dtype(x, bias, dtype=self.dtype)
    return lax.platform_dependent(x, kernel, tpu=self._direct, default=self._four_phases) + bias

  def _direct(self, x: jax.Array, kernel: jax.Array) -> jax.Array:
    (kernel,) = nn.dtypes.promote_dtype(kernel, dtype=self.dtype)
    up = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return lax.conv_general_dilated(
      up,
      kernel,
      (1, 1),
      ((1, 1), (1, 1)),
      dimension_numbers=lax.conv_dimension_numbers(up.shape, kernel.shape, _NHWC),
    )

  def _four_phases(self, x: jax.Array, kernel: jax.Array) -> jax.Array:
    # The 2x2 kernel of each output phase (p, q), folded in float32, then cast like nn.Conv's.
    kernels = nn.dtypes.promote_dtype(
      *(_fold_taps(_fold_taps(kernel, 0, p), 1, q) for p in (0, 1) for q in (0, 1)),
      dtype=self.dtype,
    )
    rows = []
    for p in (0, 1):
      phases = []
      for q in (0, 1):
        phase_kernel = kernels[2 * p + q]  # [2, 2, C, O]
        phases.append(
          conv_general_dilated(
            x,
            phase_kernel,
            (1, 1),
            (_PHASE_PADS[p], _PHASE_PADS[q]),
            lhs_dilation=(1, 1),
            rhs_dilation=(1, 1),
            dimension_numbers=lax.conv_dimension_numbers(x.shape, phase_kernel.shape, _NHWC),
          )
        )
      rows.append(jnp.stack(phases, axis=3))  # [B, H, W, q, O]
    b, h, w, _ = x.shape
    # [B, H, p, W, q, O] -> [B, 2H, 2W, O]: output pixel (2i + p, 2j + q).
    return jnp.stack(rows, axis=2).reshape(b, 2 * h, 2 * w, self.features)


class TimestepEmbedding(nn.Module):
  """t -> sinusoidal embedding (ch) -> dense0 (4 ch) -> swish -> dense1 (4 ch)."""

  ch: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, t: jax.Array) -> jax.Array:
    """t: [B]; returns [B, 4 ch]."""
    temb = get_timestep_embedding(t, self.ch)
    temb = _dense(4 * self.ch, 'dense0', self.dtype)(temb)
    return _dense(4 * self.ch, 'dense1', self.dtype)(nn.swish(temb))


class DownLevel(nn.Module):
  """One level of the contracting path: ResNet blocks (+ attention), then a downsample.

  Returns the outputs that the U-Net pushes on its skip stack: one per block, plus the downsampled
  feature map when `downsample` is set.
  """

  out_ch: int
  num_res_blocks: int
  attn_resolutions: tuple[int, ...]
  dropout: float
  downsample: bool
  resamp_with_conv: bool
  dtype: Any = jnp.float32
  remat: bool = False
  attention_impl: str | None = None

  @nn.compact
  def __call__(self, h: jax.Array, temb: jax.Array, *, train: bool) -> list[jax.Array]:
    resnet_block, attn_block = _block_types(self.remat)
    outputs = []
    for i_block in range(self.num_res_blocks):
      h = resnet_block(self.out_ch, self.dropout, self.dtype, name=f'block_{i_block}')(
        h, temb, train
      )
      if h.shape[1] in self.attn_resolutions:
        h = attn_block(self.dtype, self.attention_impl, name=f'attn_{i_block}')(h)
      outputs.append(h)
    if self.downsample:
      outputs.append(Downsample(self.resamp_with_conv, self.dtype, name='downsample')(h))
    return outputs


class MidBlock(nn.Module):
  """block_1 -> attn_1 -> block_2 at the lowest resolution."""

  dropout: float
  dtype: Any = jnp.float32
  remat: bool = False
  attention_impl: str | None = None

  @nn.compact
  def __call__(self, h: jax.Array, temb: jax.Array, *, train: bool) -> jax.Array:
    resnet_block, attn_block = _block_types(self.remat)
    ch = h.shape[-1]
    h = resnet_block(ch, self.dropout, self.dtype, name='block_1')(h, temb, train)
    h = attn_block(self.dtype, self.attention_impl, name='attn_1')(h)
    return resnet_block(ch, self.dropout, self.dtype, name='block_2')(h, temb, train)


class UpLevel(nn.Module):
  """One level of the expanding path: num_res_blocks + 1 ResNet blocks on concat(h, skip).

  `skips` are this level's entries of the skip stack in push order; they are consumed last first.
  Attention follows each block where the resolution is in `attn_resolutions`; an upsample ends
  every level but level 0.
  """

  out_ch: int
  num_res_blocks: int
  attn_resolutions: tuple[int, ...]
  dropout: float
  upsample: bool
  resamp_with_conv: bool
  dtype: Any = jnp.float32
  remat: bool = False
  attention_impl: str | None = None

  @nn.compact
  def __call__(
    self, h: jax.Array, skips: Sequence[jax.Array], temb: jax.Array, *, train: bool
  ) -> jax.Array:
    resnet_block, attn_block = _block_types(self.remat)
    for i_block, skip in enumerate(reversed(skips)):
      h = resnet_block(self.out_ch, self.dropout, self.dtype, name=f'block_{i_block}')(
        jnp.concatenate([h, skip], axis=-1), temb, train
      )
      if h.shape[1] in self.attn_resolutions:
        h = attn_block(self.dtype, self.attention_impl, name=f'attn_{i_block}')(h)
    if self.upsample:
      h = Upsample(self.resamp_with_conv, self.dtype, name='upsample')(h)
    return h


class UNet(nn.Module):
  """The DDPM noise-prediction network.

  Attributes:
    ch: base channel count (128 in the paper); level i has ch * ch_mult[i] channels.
    out_ch: output channels (C, or 2C when the network also predicts the variance).
    ch_mult: channel multiplier per resolution level.
    num_res_blocks: ResNet blocks per level on the down path (one more on the up path).
    attn_resolutions: feature-map sizes (H) at which self-attention follows each block.
    dropout: dropout rate inside the ResNet blocks, active only when train=True.
    resamp_with_conv: whether down/upsampling use a 3x3 conv (the paper: True).
    dtype: compute dtype of convolutions and dense layers; parameters stay float32.
    remat: recompute each ResNet / attention block's activations in the backward pass
      (jax.checkpoint) instead of storing them: less memory, the same function.
    attention_impl: `jax.nn.dot_product_attention`'s implementation: None (XLA) or 'cudnn'.
    num_classes: K > 0: conditioned on a label y in [0, K] (K: the null label of classifier-free
      guidance) through `label_emb` [K + 1, 4 ch]; 0: unconditional, the original network.
  """

  ch: int
  out_ch: int
  ch_mult: tuple[int, ...]
  num_res_blocks: int
  attn_resolutions: tuple[int, ...]
  dropout: float
  resamp_with_conv: bool = True
  dtype: Any = jnp.float32
  remat: bool = False
  attention_impl: str | None = None
  num_classes: int = 0

  @nn.compact
  def __call__(
    self, x: jax.Array, t: jax.Array, y: jax.Array | None = None, *, train: bool
  ) -> jax.Array:
    """Predicts the model output (eps, x0, the posterior mean or v, and maybe a variance).

    Args:
      x: [B, H, W, C] noisy images, in [-1, 1] at t = 0.
      t: [B] int32 timesteps in [0, T).
      y: [B] int32 class labels in [0, num_classes], num_classes being the null label; required
        when num_classes > 0, refused when it is 0. The values are not checked (they may be
        traced): a label above num_classes gives NaN outputs (jnp.take's fill), a negative one
        counts from the end (-1 is the null label), as NumPy indexing does.
      train: enables dropout; needs rngs={'dropout': key} when dropout > 0.

    Returns:
      [B, H, W, out_ch] float32.

    Raises:
      ValueError: y missing for a class-conditional network, given to an unconditional one, or
        not of shape [B].
    """
    num_levels = len(self.ch_mult)
    temb = TimestepEmbedding(self.ch, self.dtype, name='temb')(t)  # [B, 4 ch]
    if self.num_classes:
      if y is None:
        raise ValueError(
          f'This U-Net is class-conditional (num_classes = {self.num_classes}): pass y, [B] int '
          f'labels in [0, {self.num_classes}], {self.num_classes} being the null label.'
        )
      if y.shape != x.shape[:1]:
        raise ValueError(f'y must have shape [B] = {x.shape[:1]}, got {y.shape}.')
      label_emb = nn.Embed(
        self.num_classes + 1,
        4 * self.ch,
        dtype=self.dtype,
        embedding_init=LABEL_EMB_INIT,
        name='label_emb',
      )
      temb += label_emb(y)  # [B, 4 ch]
    elif y is not None:
      raise ValueError('This U-Net is unconditional (num_classes = 0): it takes no labels y.')

    hs = [_conv(self.ch, 'conv_in', self.dtype)(x)]
    for i_level, mult in enumerate(self.ch_mult):
      hs += DownLevel(
        out_ch=self.ch * mult,
        num_res_blocks=self.num_res_blocks,
        attn_resolutions=self.attn_resolutions,
        dropout=self.dropout,
        downsample=i_level != num_levels - 1,
        resamp_with_conv=self.resamp_with_conv,
        dtype=self.dtype,
        remat=self.remat,
        attention_impl=self.attention_impl,
        name=f'down_{i_level}',
      )(hs[-1], temb, train=train)

    h = MidBlock(self.dropout, self.dtype, self.remat, self.attention_impl, name='mid')(
      hs[-1], temb, train=train
    )

    level_size = self.num_res_blocks + 1
    for i_level in reversed(range(num_levels)):
      h = UpLevel(
        out_ch=self.ch * self.ch_mult[i_level],
        num_res_blocks=self.num_res_blocks,
        attn_resolutions=self.attn_resolutions,
        dropout=self.dropout,
        upsample=i_level != 0,
        resamp_with_conv=self.resamp_with_conv,
        dtype=self.dtype,
        remat=self.remat,
        attention_impl=self.attention_impl,
        name=f'up_{i_level}',
      )(h, hs[-level_size:], temb, train=train)
      hs = hs[:-level_size]

    h = nn.swish(GroupNorm(name='norm_out')(h))
    h = _conv(self.out_ch, 'conv_out', self.dtype, init_scale=ZERO_ISH)(h)
    return h.astype(jnp.float32)

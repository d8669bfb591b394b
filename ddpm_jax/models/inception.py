r"""The FID Inception v3 network in Flax: pytorch-fid's port of the 2015-12-05 TensorFlow graph.

FID and Inception Score are defined by one particular network: the Inception v3 graph
`inception-2015-12-05` that the original TF FID code (TTUR), TF-GAN and the improved-GAN Inception
Score use, with 1008 output classes. pytorch-fid ported it to PyTorch (`FIDInceptionA/C/E`
blocks on torchvision's Inception3) and published the weights; this module is a Flax port of that
network, numerically the same function (tests/test_inception.py compares it to pytorch-fid's own
network). Where it differs from torchvision's ImageNet Inception3:
- the average pools inside Mixed_5b..5d (A blocks), Mixed_6b..6e (C blocks) and Mixed_7b (the
  first E block) leave padded zeros out of the average (TF's 'SAME' average pool:
  count_include_pad=False);
- the pool branch of Mixed_7c (the second E block) is a 3x3 max pool, not an average pool;
- the classifier has 1008 outputs (1000 ImageNet classes plus 8 unused ones of the TF graph).
Every conv is conv (no bias) -> batch norm (eps 1e-3, running statistics) -> ReLU.

Outputs: `pool`, the 2048-d global average pool after Mixed_7c (the FID features, TF's
`pool_3`), and `logits`, the 1008-way fc output on them (dropout is inactive at inference).

Preprocessing (`preprocess`), exactly as pytorch-fid's `fid_score.py` feeds its network: images
in 0..255 (uint8 or float) are divided by 255 in float32, resized to 299x299 with bilinear
interpolation as `torch.nn.functional.interpolate(mode='bilinear', align_corners=False)` computes
it (half-pixel centers, source coordinates clamped at the borders, no antialiasing, also when
downsampling), then mapped to [-1, 1] by 2x - 1. A 299x299 input passes the resize unchanged.
(The TF graph's own preprocessing differs slightly: TF1's resize_bilinear without half-pixel
centers and (x - 128) / 128. pytorch-fid's README reports FIDs within 0.08 (0.09% relative) of
TF's on LSUN; this port follows pytorch-fid.)

Weights: `ddpm_jax/inception_weights.py` converts pytorch-fid's weights file and reads it back
(`load_params`), to pass to `InceptionV3().apply` or `compute_features`.

Parameter tree: module names mirror pytorch-fid's state dict (`Conv2d_1a_3x3`,
`Mixed_5b/branch1x1`, ..., `fc`), each conv block holding `conv/kernel`, `bn/{scale, bias}`
(params) and `bn/{mean, var}` (batch_stats).
"""

import functools
from collections.abc import Iterator, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from ddpm_jax import mesh as mesh_lib
from ddpm_jax import progress

INPUT_SIZE = 299
NUM_POOL_FEATURES = 2048
NUM_CLASSES = 1008
BN_EPSILON = 1e-3

# An int (same on both sides) or a (height, width) pair, as torch's kernel_size/padding arguments.
IntPair = int | tuple[int, int]


# --------------------------------------------------------------------------------------------
# Preprocessing.
# --------------------------------------------------------------------------------------------


@functools.cache
def bilinear_resize_matrix(in_size: int, out_size: int) -> np.ndarray:
  """The 1-D interpolation of torch's bilinear resize with align_corners=False, as a matrix.

  Follows PyTorch's CPU kernel, with its float32 roundings, so that the weights are bit-identical
  to torch's: scale = in / out; output index d reads the source coordinate
  s = scale (d + 0.5) - 0.5, rounded once (torch's build evaluates it as a fused multiply-add)
  and clamped below at 0; i0 = floor(s) (at most in - 1), i1 = min(i0 + 1, in - 1), weights
  1 - (s - i0) on i0 and s - i0 on i1.

  Returns:
    float32 [out_size, in_size], rows summing to 1; read-only.
  """
  scale = np.float32(in_size) / np.float32(out_size)
  # The float64 product of two float32 numbers is exact: one rounding, as a fused multiply-add.
  source = (np.float64(scale) * (np.arange(out_size) + 0.5) - 0.5).astype(np.float32)
  source = np.maximum(source, np.float32(0))
  i0 = np.minimum(source.astype(np.int64), in_size - 1)
  i1 = np.minimum(i0 + 1, in_size - 1)
  lambda1 = np.clip(source - i0.astype(np.float32), 0, 1)
  matrix = np.zeros((out_size, in_size), np.float32)
  rows = np.arange(out_size)
  np.add.at(matrix, (rows, i0), 1 - lambda1)
  np.add.at(matrix, (rows, i1), lambda1)
  matrix.flags.writeable = False
  return matrix


def preprocess(images: jax.Array) -> jax.Array:
  """The protocol's preprocessing, as pytorch-fid's: /255, bilinear resize to 299, then 2x - 1.

  Args:
    images: [B, H, W, 3] uint8 or float, values in 0..255, any H and W.

  Returns:
    float32 [B, 299, 299, 3] in [-1, 1].
  """
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f'The Inception network needs RGB images [B, H, W, 3], got {images.shape}.')
  x = images.astype(jnp.float32) / 255
  rows = bilinear_resize_matrix(images.shape[1], INPUT_SIZE)
  cols = bilinear_resize_matrix(images.shape[2], INPUT_SIZE)
  highest = jax.lax.Precision.HIGHEST
  x = jnp.einsum('oh,bhwc->bowc', rows, x, precision=highest)
  x = jnp.einsum('pw,bowc->bopc', cols, x, precision=highest)
  return 2 * x - 1


# --------------------------------------------------------------------------------------------
# The network.
# --------------------------------------------------------------------------------------------


def _pair(value: IntPair) -> tuple[int, int]:
  return (value, value) if isinstance(value, int) else value


class BasicConv2d(nn.Module):
  """conv (no bias) -> batch norm (eps 1e-3, running statistics) -> ReLU.

  `kernel_size`, `stride` and `padding` follow torch's Conv2d: symmetric zero padding of
  `padding` rows / columns on each side.
  """

  features: int
  kernel_size: IntPair
  stride: int = 1
  padding: IntPair = 0
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [B, H, W, C_in] -> [B, H', W', features]."""
    pad_h, pad_w = _pair(self.padding)
    x = nn.Conv(
      self.features,
      _pair(self.kernel_size),
      strides=self.stride,
      padding=((pad_h, pad_h), (pad_w, pad_w)),
      use_bias=False,
      precision=self.precision,
      name='conv',
    )(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=BN_EPSILON, name='bn')(x)
    return nn.relu(x)


def _avg_pool_3x3(x: jax.Array) -> jax.Array:
  """3x3 average pool, stride 1, padding 1, padded zeros left out of the average (TF 'SAME')."""
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3(x: jax.Array, stride: int) -> jax.Array:
  """3x3 max pool; stride 2 without padding (reductions), or stride 1 with padding 1."""
  padding = ((0, 0), (0, 0)) if stride == 2 else ((1, 1), (1, 1))
  return nn.max_pool(x, (3, 3), strides=(stride, stride), padding=padding)


class InceptionA(nn.Module):
  """Mixed_5b..5d (FIDInceptionA): 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avg pool-1x1.

  Output channels: 64 + 64 + 96 + pool_features.
  """

  pool_features: int
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = functools.partial(BasicConv2d, precision=self.precision)
    branch1x1 = conv(64, 1, name='branch1x1')(x)
    branch5x5 = conv(48, 1, name='branch5x5_1')(x)
    branch5x5 = conv(64, 5, padding=2, name='branch5x5_2')(branch5x5)
    branch3x3dbl = conv(64, 1, name='branch3x3dbl_1')(x)
    branch3x3dbl = conv(96, 3, padding=1, name='branch3x3dbl_2')(branch3x3dbl)
    branch3x3dbl = conv(96, 3, padding=1, name='branch3x3dbl_3')(branch3x3dbl)
    branch_pool = conv(self.pool_features, 1, name='branch_pool')(_avg_pool_3x3(x))
    return jnp.concatenate([branch1x1, branch5x5, branch3x3dbl, branch_pool], axis=-1)


class InceptionB(nn.Module):
  """Mixed_6a, a grid reduction 35 -> 17: 3x3/2 | 1x1-3x3-3x3/2 | max pool/2; 480 + C_in."""

  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = functools.partial(BasicConv2d, precision=self.precision)
    branch3x3 = conv(384, 3, stride=2, name='branch3x3')(x)
    branch3x3dbl = conv(64, 1, name='branch3x3dbl_1')(x)
    branch3x3dbl = conv(96, 3, padding=1, name='branch3x3dbl_2')(branch3x3dbl)
    branch3x3dbl = conv(96, 3, stride=2, name='branch3x3dbl_3')(branch3x3dbl)
    return jnp.concatenate([branch3x3, branch3x3dbl, _max_pool_3x3(x, 2)], axis=-1)


class InceptionC(nn.Module):
  """Mixed_6b..6e (FIDInceptionC), factorized 7x7 convolutions; 768 channels out."""

  channels_7x7: int
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = functools.partial(BasicConv2d, precision=self.precision)
    c7 = self.channels_7x7
    branch1x1 = conv(192, 1, name='branch1x1')(x)
    branch7x7 = conv(c7, 1, name='branch7x7_1')(x)
    branch7x7 = conv(c7, (1, 7), padding=(0, 3), name='branch7x7_2')(branch7x7)
    branch7x7 = conv(192, (7, 1), padding=(3, 0), name='branch7x7_3')(branch7x7)
    branch7x7dbl = conv(c7, 1, name='branch7x7dbl_1')(x)
    branch7x7dbl = conv(c7, (7, 1), padding=(3, 0), name='branch7x7dbl_2')(branch7x7dbl)
    branch7x7dbl = conv(c7, (1, 7), padding=(0, 3), name='branch7x7dbl_3')(branch7x7dbl)
    branch7x7dbl = conv(c7, (7, 1), padding=(3, 0), name='branch7x7dbl_4')(branch7x7dbl)
    branch7x7dbl = conv(192, (1, 7), padding=(0, 3), name='branch7x7dbl_5')(branch7x7dbl)
    branch_pool = conv(192, 1, name='branch_pool')(_avg_pool_3x3(x))
    return jnp.concatenate([branch1x1, branch7x7, branch7x7dbl, branch_pool], axis=-1)


class InceptionD(nn.Module):
  """Mixed_7a, a grid reduction 17 -> 8: 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | max pool/2; 512 + C_in."""

  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = functools.partial(BasicConv2d, precision=self.precision)
    branch3x3 = conv(192, 1, name='branch3x3_1')(x)
    branch3x3 = conv(320, 3, stride=2, name='branch3x3_2')(branch3x3)
    branch7x7x3 = conv(192, 1, name='branch7x7x3_1')(x)
    branch7x7x3 = conv(192, (1, 7), padding=(0, 3), name='branch7x7x3_2')(branch7x7x3)
    branch7x7x3 = conv(192, (7, 1), padding=(3, 0), name='branch7x7x3_3')(branch7x7x3)
    branch7x7x3 = conv(192, 3, stride=2, name='branch7x7x3_4')(branch7x7x3)
    return jnp.concatenate([branch3x3, branch7x7x3, _max_pool_3x3(x, 2)], axis=-1)


class InceptionE(nn.Module):
  """Mixed_7b / 7c (FIDInceptionE_1 / _2), expanded filter banks; 2048 channels out.

  Attributes:
    pool: 'avg' (Mixed_7b, padded zeros excluded) or 'max' (Mixed_7c, as in the TF graph).
  """

  pool: str
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = functools.partial(BasicConv2d, precision=self.precision)
    branch1x1 = conv(320, 1, name='branch1x1')(x)
    branch3x3 = conv(384, 1, name='branch3x3_1')(x)
    branch3x3 = jnp.concatenate(
      [
        conv(384, (1, 3), padding=(0, 1), name='branch3x3_2a')(branch3x3),
        conv(384, (3, 1), padding=(1, 0), name='branch3x3_2b')(branch3x3),
      ],
      axis=-1,
    )
    branch3x3dbl = conv(448, 1, name='branch3x3dbl_1')(x)
    branch3x3dbl = conv(384, 3, padding=1, name='branch3x3dbl_2')(branch3x3dbl)
    branch3x3dbl = jnp.concatenate(
      [
        conv(384, (1, 3), padding=(0, 1), name='branch3x3dbl_3a')(branch3x3dbl),
        conv(384, (3, 1), padding=(1, 0), name='branch3x3dbl_3b')(branch3x3dbl),
      ],
      axis=-1,
    )
    pooled = _avg_pool_3x3(x) if self.pool == 'avg' else _max_pool_3x3(x, 1)
    branch_pool = conv(192, 1, name='branch_pool')(pooled)
    return jnp.concatenate([branch1x1, branch3x3, branch3x3dbl, branch_pool], axis=-1)


class InceptionV3(nn.Module):
  """The FID Inception v3 (pytorch-fid's `fid_inception_v3()`), inference only.

  Attributes:
    precision: precision of every convolution and the fc layer. HIGHEST (true float32) by
      default: on TPUs, and on GPUs with TF32, DEFAULT would compute in reduced precision and
      shift FID.
  """

  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, images: jax.Array) -> dict[str, jax.Array]:
    """Features and logits of images, preprocessed as in the module docstring.

    Args:
      images: [B, H, W, 3] uint8 or float in 0..255, any H and W (resized to 299x299).

    Returns:
      {'pool': float32 [B, 2048], the average-pooled features (>= 0),
       'logits': float32 [B, 1008]}.
    """
    conv = functools.partial(BasicConv2d, precision=self.precision)
    x = preprocess(images)  # [B, 299, 299, 3]
    x = conv(32, 3, stride=2, name='Conv2d_1a_3x3')(x)  # 149
    x = conv(32, 3, name='Conv2d_2a_3x3')(x)  # 147
    x = conv(64, 3, padding=1, name='Conv2d_2b_3x3')(x)
    x = _max_pool_3x3(x, 2)  # 73
    x = conv(80, 1, name='Conv2d_3b_1x1')(x)
    x = conv(192, 3, name='Conv2d_4a_3x3')(x)  # 71
    x = _max_pool_3x3(x, 2)  # 35
    x = InceptionA(32, self.precision, name='Mixed_5b')(x)  # 256 channels
    x = InceptionA(64, self.precision, name='Mixed_5c')(x)  # 288
    x = InceptionA(64, self.precision, name='Mixed_5d')(x)  # 288
    x = InceptionB(self.precision, name='Mixed_6a')(x)  # 17x17x768
    for name, channels_7x7 in (('Mixed_6b', 128), ('Mixed_6c', 160), ('Mixed_6d', 160)):
      x = InceptionC(channels_7x7, self.precision, name=name)(x)
    x = InceptionC(192, self.precision, name='Mixed_6e')(x)
    x = InceptionD(self.precision, name='Mixed_7a')(x)  # 8x8x1280
    x = InceptionE('avg', self.precision, name='Mixed_7b')(x)  # 2048
    x = InceptionE('max', self.precision, name='Mixed_7c')(x)
    pool = jnp.mean(x, axis=(1, 2))
    logits = nn.Dense(NUM_CLASSES, precision=self.precision, name='fc')(pool)
    return {'pool': pool, 'logits': logits}


# --------------------------------------------------------------------------------------------
# Running it over many images.
# --------------------------------------------------------------------------------------------


@jax.jit
def apply(variables: Mapping[str, Any], images: jax.Array) -> dict[str, jax.Array]:
  """`InceptionV3().apply`, compiled: images [B, H, W, 3] in 0..255 -> {'pool', 'logits'}."""
  return InceptionV3().apply(variables, images)


def compute_features(
  variables: Mapping[str, Any],
  images,
  *,
  batch_size: int,
  mesh: jax.sharding.Mesh | None = None,
  desc: str = 'Inception features',
) -> Iterator[dict[str, np.ndarray]]:
  """Runs the network over `images` in batches of one shape (one compilation); yields each
  batch's `{'pool': float32 [n, 2048], 'logits': float32 [n, 1008]}` as NumPy arrays.

  Args:
    variables: from `ddpm_jax.inception_weights.load_params`.
    images: [N, H, W, 3] uint8 or float in 0..255: an array, or a dataset split (anything with
      `len` and `images[int indices]`), read one batch at a time; every process holds them all.
      Greyscale images, [N, H, W, 1], are repeated into RGB (as PIL's `convert('RGB')`).
    batch_size: images per call, a multiple of the device count (the last batch is padded);
      memory grows linearly with it.
    mesh: the batches are sharded over its devices, the variables replicated (default: all
      devices, `ddpm_jax.mesh.create_mesh`).
    desc: the label of the progress bar over the batches.
  """
  mesh = mesh or mesh_lib.create_mesh()
  batch_sharding = mesh_lib.batch_sharded(mesh)
  run = jax.jit(
    InceptionV3().apply,
    in_shardings=(mesh_lib.replicated(mesh), batch_sharding),
    out_shardings=batch_sharding,
  )
  num = len(images)
  with progress.bar(-(-num // batch_size), desc, unit='batch') as bar:
    for start in range(0, num, batch_size):
      batch = np.asarray(images[np.arange(start, min(start + batch_size, num))])
      if batch.shape[-1] == 1:
        batch = np.repeat(batch, 3, axis=-1)
      padded = np.zeros((batch_size, *batch.shape[1:]), batch.dtype)
      padded[: len(batch)] = batch
      global_batch = jax.make_array_from_callback(
        padded.shape, batch_sharding, lambda index, padded=padded: padded[index]
      )
      result = mesh_lib.gather(run(variables, global_batch))
      bar.update(1)
      yield {key: value[: len(batch)] for key, value in result.items()}


@functools.cache
def expected_shapes() -> dict[str, tuple[int, ...]]:
  """Flat name ('params/fc/kernel', 'batch_stats/.../bn/mean', ...) -> shape of every variable."""
  abstract = jax.eval_shape(
    InceptionV3().init,
    jax.random.key(0),
    jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.uint8),
  )
  flat = traverse_util.flatten_dict(abstract, sep='/')
  return {name: tuple(value.shape) for name, value in flat.items()}

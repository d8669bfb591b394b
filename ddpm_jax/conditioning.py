"""Class-conditional DDPMs with classifier-free guidance (Ho & Salimans 2021): the labels, their
dropout in training, the guided network of sampling, and the checks of their settings.

A model with `config.model.num_classes` = K > 0 takes a label y in [0, K] beside (x, t): the
classes 0..K-1 and the "no class" label K (`null_label`), with which it models p(x) as well as
p(x | y). Training replaces each label by K with probability `config.training.label_dropout`
(`drop_labels`), so that one network learns both. Sampling asks for the classes of
`config.sampling.class_labels` (all K in turn when None): sample i gets the
(i mod len(classes))-th, whatever the batch size. With the guidance scale s
(`config.sampling.guidance_scale`), the network's output is

  out = out_u + s (out_c - out_u)        (`guide`; out_c = out(x, t, y), out_u = out(x, t, K))

from one call on the batch and its copy with the null label (`guided_model_fn`). s = 1 is the
conditional model without guidance and s = 0 the unconditional one; Ho & Salimans write
eps = (1 + w) eps_c - w eps_u, so s = 1 + w. The combination is of the mean output, whatever it
predicts: eps, x_0, v and the posterior mean are each an affine function of eps at a given
(x_t, t), and the weights (1 - s) and s sum to 1, so combining any of them equals combining eps
and converting. A learned variance output is the conditional one (as GLIDE does). Sampling
without labels (the interpolation figure of --mode=sample, whose pairs may differ in class) is
of the unconditional model alone: out_u, one call with the null label (`unconditional_model_fn`).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath

from ddpm_jax import validation

# `apply(x, t, y) -> out`: the network on a batch of images, timesteps and labels (or None).
ApplyFn = Callable[[jax.Array, jax.Array, jax.Array | None], jax.Array]


def null_label(num_classes: int) -> int:
  """The "no class" label of a model of `num_classes` classes: the one after the last class."""
  return num_classes


def drop_labels(labels: jax.Array, rng: jax.Array, rate: float, num_classes: int) -> jax.Array:
  """labels int [B] with each replaced by `null_label` with probability `rate`, independently:
  where bernoulli(rng, rate, [B]) is True."""
  dropped = jax.random.bernoulli(rng, rate, labels.shape)
  return jnp.where(dropped, null_label(num_classes), labels)


def guide(cond: jax.Array, uncond: jax.Array, scale: float, num_channels: int) -> jax.Array:
  """The guided output: out_u + s (out_c - out_u) on the first `num_channels` channels (the mean
  output), the conditional output's on the rest (a learned variance).

  cond, uncond: [B, H, W, C'], C' = num_channels (or 2 num_channels with a learned variance).
  """
  mean = uncond[..., :num_channels] + scale * (
    cond[..., :num_channels] - uncond[..., :num_channels]
  )
  return jnp.concatenate([mean, cond[..., num_channels:]], axis=-1)


def guided_model_fn(
  apply: ApplyFn, labels: jax.Array, scale: float, num_classes: int
) -> Callable[[jax.Array, jax.Array], jax.Array]:
  """`model_fn(x, t)` of the diffusion functions for a class-conditional network.

  labels: int [B], the classes asked for, of x [B, H, W, C]. scale == 1: apply(x, t, labels).
  Otherwise one call on the doubled batch [x; x], [t; t], [labels; K] and `guide` of its halves.
  """
  if scale == 1.0:
    return lambda x, t: apply(x, t, labels)

  def model_fn(x, t):
    null = jnp.full_like(labels, null_label(num_classes))
    out = apply(jnp.concatenate([x, x]), jnp.concatenate([t, t]), jnp.concatenate([labels, null]))
    cond, uncond = jnp.split(out, 2)
    return guide(cond, uncond, scale, x.shape[-1])

  return model_fn


def unconditional_model_fn(
  apply: ApplyFn, num_classes: int
) -> Callable[[jax.Array, jax.Array], jax.Array]:
  """`model_fn(x, t)` of the unconditional model that a class-conditional network learned:
  apply(x, t, K) with the null label K on every row of x [B, H, W, C], one call, no guidance."""
  return lambda x, t: apply(x, t, jnp.full(x.shape[:1], null_label(num_classes), jnp.int32))


@dataclasses.dataclass(frozen=True)
class Conditioning:
  """What sampling asks a class-conditional model for (`from_config`).

  Attributes:
    classes: the classes sampled in turn: sample i is of classes[i mod len(classes)].
    guidance_scale: s of `guide`; 1: no guidance.
    every_class: whether `classes` are all the model's, asked for as None (file names then omit
      them).
  """

  classes: tuple[int, ...]
  guidance_scale: float
  every_class: bool = False

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> Conditioning | None:
    """`config.sampling`'s conditioning for a class-conditional `config.model`, else None."""
    num_classes = config.model.num_classes
    if not num_classes:
      return None
    labels, scale = config.sampling.class_labels, float(config.sampling.guidance_scale)
    if labels is None:
      return cls(tuple(range(num_classes)), scale, every_class=True)
    return cls(tuple(int(c) for c in labels), scale)

  def labels(self, start: int, num: int) -> np.ndarray:
    """The labels of samples start, ..., start + num - 1: int32 [num]."""
    return np.asarray(self.classes, np.int32)[(start + np.arange(num)) % len(self.classes)]

  def settings(self) -> dict[str, Any]:
    """The settings that determine the samples, for results and cache keys."""
    return {'class_labels': list(self.classes), 'guidance_scale': self.guidance_scale}

  @property
  def tag(self) -> str:
    """For file names: 'guidance3' (all classes), 'class7_guidance3' (one), 'classes2-7_...'."""
    scale = f'guidance{self.guidance_scale:g}'
    if len(self.classes) == 1:
      return f'class{self.classes[0]}_{scale}'
    if self.every_class:
      return scale
    return f'classes{"-".join(map(str, self.classes))}_{scale}'


def check_sampling(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError, naming the field, for `config.sampling.class_labels` or
  `guidance_scale` values that the model of `config.model` cannot sample."""
  sampling, num_classes = config.sampling, config.model.num_classes
  labels, scale = sampling.class_labels, sampling.guidance_scale
  validation.require(
    isinstance(scale, int | float) and not isinstance(scale, bool) and scale >= 0,
    f'config.sampling.guidance_scale must be a number >= 0 (1: no guidance), got {scale!r}.',
  )
  if not num_classes:
    validation.require(
      labels is None and scale == 1.0,
      'config.sampling.class_labels and guidance_scale are for a class-conditional model '
      f'(config.model.num_classes > 0); this one is unconditional (class_labels = {labels!r}, '
      f'guidance_scale = {scale!r}).',
    )
    return
  if labels is not None:
    validation.require(
      bool(labels) and all(validation.is_int(c) and 0 <= c < num_classes for c in labels),
      f'config.sampling.class_labels = {labels!r} must name classes in [0, {num_classes}) '
      '(config.model.num_classes), or be None for all of them in turn.',
    )


def check_training(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError for a `config.training.label_dropout` outside [0, 1)."""
  rate = config.training.label_dropout
  validation.require(
    isinstance(rate, int | float) and not isinstance(rate, bool) and 0 <= rate < 1,
    'config.training.label_dropout must be in [0, 1) (the share of labels replaced by the null '
    f'class, for classifier-free guidance), got {rate!r}.',
  )


# Beside the checkpoints of a class-conditional run: its class names, in label order.
CLASSES_FILE = 'classes.json'


def write_class_names(workdir: epath.PathLike, class_names: tuple[str, ...]) -> None:
  """Writes `<workdir>/classes.json`, {"class_names": [...]}, on process 0."""
  if jax.process_index() == 0:
    path = epath.Path(workdir) / CLASSES_FILE
    path.write_text(json.dumps({'class_names': list(class_names)}, indent=2))


def read_class_names(workdir: epath.PathLike) -> tuple[str, ...] | None:
  """The class names `write_class_names` wrote in `workdir`, or None where there are none (an
  unconditional run, or imported weights)."""
  path = epath.Path(workdir) / CLASSES_FILE
  if not path.exists():
    return None
  return tuple(json.loads(path.read_text())['class_names'])

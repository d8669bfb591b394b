"""Checks of a config and a workdir that fail fast, with a clear message, before compiling."""

from __future__ import annotations

import uuid

import jax
import ml_collections
from etils import epath

from ddpm_jax import diffusion, input_pipeline


def require(condition: bool, message: str) -> None:
  """Raises ValueError(message) unless `condition`."""
  if not condition:
    raise ValueError(message)


def is_int(value) -> bool:
  """Whether `value` is an int (and not a bool): what an integer config field must be."""
  return isinstance(value, int) and not isinstance(value, bool)


def validate_model_config(config: ml_collections.ConfigDict) -> None:
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
  if config.model.dtype not in ('float32', 'bfloat16'):
    raise ValueError(
      f"config.model.dtype must be 'float32' or 'bfloat16', got {config.model.dtype!r}."
    )
  if config.model.attention_impl not in (None, 'xla', 'cudnn'):
    raise ValueError(
      "config.model.attention_impl must be None, 'xla' or 'cudnn' (the implementation of "
      'jax.nn.dot_product_attention), '
      f'got {config.model.attention_impl!r}.'
    )


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError for data, model or diffusion settings that cannot work together."""
  input_pipeline.get_dataset_info(config)
  validate_model_config(config)
  diffusion.GaussianDiffusion.from_config(config.diffusion)


def validate_batch_size(global_batch_size: int, what: str) -> None:
  """Raises ValueError unless the global batch splits evenly over all devices."""
  num_devices = jax.device_count()
  if global_batch_size < 1 or global_batch_size % num_devices:
    raise ValueError(
      f'{what} = {global_batch_size} must be a positive multiple of the number of devices '
      f'({num_devices}, over {jax.process_count()} process(es)): the batch is split evenly.'
    )


def ensure_writable(workdir: str) -> epath.Path:
  """Creates `workdir` if needed and checks that files can be written in it."""
  path = epath.Path(workdir)
  probe = path / f'.write_test_{uuid.uuid4().hex}'
  try:
    path.mkdir(parents=True, exist_ok=True)
    probe.write_text('ok')
    probe.unlink()
  except OSError as e:
    raise PermissionError(f'Cannot write to workdir {workdir!r}: {e}') from e
  return path

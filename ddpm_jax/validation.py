"""The primitives of the config checks (`ddpm_jax/checks.py` runs them) and the workdir check:
fail fast, with a clear message, before compiling."""

from __future__ import annotations

import uuid

import jax
from etils import epath


def require(condition: bool, message: str) -> None:
  """Raises ValueError(message) unless `condition`."""
  if not condition:
    raise ValueError(message)


def is_int(value) -> bool:
  """Whether `value` is an int (and not a bool): what an integer config field must be."""
  return isinstance(value, int) and not isinstance(value, bool)


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

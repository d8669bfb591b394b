"""Devices and processes: the mesh, its shardings, and the host side of a multi-process job.

All devices of all processes form one 'data' axis: parameters are replicated over it and batches
are sharded along it (data parallelism); what only the optimizer reads and writes (Adam's
moments, the EMA params) is split over it (`split`). `gather` brings sharded results to every
host.
"""

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec


def create_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """The one 'data' axis over `devices`: by default all devices of all processes; for
  ahead-of-time compilation, those of a TPU topology (benchmarks/tpu_aot.py)."""
  return Mesh(np.array(jax.devices() if devices is None else devices), ('data',))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over all devices."""
  return NamedSharding(mesh, PartitionSpec('data'))


def split(mesh: Mesh, shape: Sequence[int]) -> NamedSharding:
  """An array of `shape` split over all devices along its first axis that their count divides,
  the last axis only where no other one is (a TPU lays the last axis out in tiles of 128 lanes,
  which a split of it would leave part empty: a conv kernel [3, 3, C, O] is split along C);
  replicated where no axis is (scalars, small biases)."""
  n = mesh.size
  axes = [a for a, size in enumerate(shape) if size % n == 0]
  if n == 1 or not axes:
    return replicated(mesh)
  axis = next((a for a in axes if a < len(shape) - 1), axes[-1])
  return NamedSharding(mesh, PartitionSpec(*[None] * axis, 'data'))


def reshard(tree: Any, sharding: Any) -> Any:
  """The arrays of `tree` laid out as `sharding` (one, or a tree like `tree`'s), by a compiled
  copy: on several processes too, each sending its devices' parts where they are needed."""
  return jax.jit(lambda x: x, out_shardings=sharding)(tree)


def stacked_batches_sharded(mesh: Mesh) -> NamedSharding:
  """A stack of batches [k, B, ...] (the batches of one train call): B split over all devices."""
  return NamedSharding(mesh, PartitionSpec(None, 'data'))


def round_up(n: int, multiple: int) -> int:
  """The smallest multiple of `multiple` that is >= n (a batch padded to the device count)."""
  return -(-n // multiple) * multiple


def gather(tree: Any) -> Any:
  """Arrays sharded over all processes' devices (a pytree of them), whole on every process as
  NumPy."""
  return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))

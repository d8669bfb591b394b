"""The device mesh: all devices of all processes on one 'data' axis.

Parameters are replicated over it and batches are sharded along it (data parallelism).
"""

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec


def create_mesh() -> Mesh:
  return Mesh(np.array(jax.devices()), ('data',))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over all devices."""
  return NamedSharding(mesh, PartitionSpec('data'))


def batches_sharded(mesh: Mesh) -> NamedSharding:
  """A stack of batches [k, B, ...] (the batches of one train call): B split over all devices."""
  return NamedSharding(mesh, PartitionSpec(None, 'data'))

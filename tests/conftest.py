"""Test setup shared by all test modules."""

import os
import sys

# First, so that this process runs with the XLA options that `ddpm_jax` sets (ddpm_jax/xla_cpu.py)
# as main.py does: they are read when JAX starts its backend.
import ddpm_jax  # noqa: F401

# The torchvision workaround (for pytorch-fid and diffusers) lives with the benchmarks, which
# need it outside pytest too.
_BENCHMARKS = os.path.join(
  os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'benchmarks'
)
sys.path.insert(0, _BENCHMARKS)

import torch_compat  # noqa: E402

torch_compat.import_torchvision_without_its_cpp_ops()

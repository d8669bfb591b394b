"""Test setup shared by all test modules."""

import atexit
import os
import shutil
import sys
import tempfile

# The tests run on the CPU backend. libtpu (requirements-test.txt, for the TPU compilation tests)
# would otherwise make JAX look for a TPU first; compiling for a TPU topology needs no TPU backend.
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TPU_SKIP_MDS_QUERY', '1')
os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')

# triton (which the CUDA build of torch brings, and diffusers imports) segfaults when it is first
# imported after tensorflow; imported before it, both work. Test modules import tensorflow, torch
# and diffusers in whatever order collection reaches them, so triton comes first, here.
try:
  import triton  # noqa: E402, F401
except ImportError:  # A CPU build of torch has none.
  pass

import jax  # noqa: E402

# One persistent compilation cache for the whole test session, in this process, in the pytest-xdist
# workers and in the `main.py` subprocesses (whose --compilation_cache_dir defaults to
# $JAX_COMPILATION_CACHE_DIR): the many runs of the same shrunken configs compile each program
# once, as a user's relaunches do. A fresh directory, made by the process that loads this file
# first (the workers inherit its environment) and removed when that one exits: no test reuses a
# program another session compiled, and nothing is written to the user's ~/.cache.
_COMPILATION_CACHE = os.environ.get('DDPM_JAX_TESTS_COMPILATION_CACHE')
if _COMPILATION_CACHE is None:
  _COMPILATION_CACHE = tempfile.mkdtemp(prefix='ddpm_jax_tests_xla_cache_')
  atexit.register(shutil.rmtree, _COMPILATION_CACHE, ignore_errors=True)
  os.environ['DDPM_JAX_TESTS_COMPILATION_CACHE'] = _COMPILATION_CACHE
os.environ['JAX_COMPILATION_CACHE_DIR'] = _COMPILATION_CACHE
jax.config.update('jax_compilation_cache_dir', _COMPILATION_CACHE)
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
# XLA's flags are part of a cache key: this process names its one CPU device as the 1-device
# subprocesses do (helpers.subprocess_env), so that each finds what the other compiled.
os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=1')

# Then, before any computation, the XLA options that `ddpm_jax` sets (ddpm_jax/xla_cpu.py) as
# main.py does: they are read when JAX starts its backend.
import ddpm_jax  # noqa: E402, F401

# The benchmarks' modules (tpu_aot, train, torch_reference) are imported by tests as well.
sys.path.insert(
  0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'benchmarks')
)

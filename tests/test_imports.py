"""The package imports, and reads the digits, without TensorFlow, TFDS or clu.

TensorFlow alone takes seconds to import, and a machine that only runs the model (a GPU
benchmark, sampling from the digits) need not have it: only reading a TFDS dataset and writing
TensorBoard summaries need TF, TFDS or clu, and they import them when they do. Each check runs
in a fresh interpreter, since this one may have imported TensorFlow already.
"""

import subprocess
import sys
import textwrap

from helpers import REPO, subprocess_env

# The modules that must import without TF. `main` is main.py, the command line.
MODULES = (
  'main',
  'ddpm_jax.train',
  'ddpm_jax.samplers',
  'ddpm_jax.sample_loop',
  'ddpm_jax.generate',
  'ddpm_jax.evaluation',
  'ddpm_jax.models',
  'ddpm_jax.diffusion',
)

# Makes `tensorflow`, `tensorflow_datasets` and `clu` (and their submodules) fail to import, as
# on a machine where they are not installed.
BLOCK_TF = """
import importlib.abc
import sys

class BlockTensorFlow(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path=None, target=None):
    if name.split('.')[0] in ('tensorflow', 'tensorflow_datasets', 'clu'):
      raise ModuleNotFoundError(f'{name} is blocked by tests/test_imports.py', name=name)
    return None

sys.meta_path.insert(0, BlockTensorFlow())
"""


def run_python(code: str) -> subprocess.CompletedProcess:
  return subprocess.run(
    [sys.executable, '-c', code],
    cwd=REPO,
    env=subprocess_env(1),
    capture_output=True,
    text=True,
    timeout=300,
  )


def test_imports_and_reads_digits_without_tensorflow():
  code = BLOCK_TF + textwrap.dedent(f"""
    import importlib
    import numpy as np
    for module in {MODULES!r}:
      importlib.import_module(module)

    from configs import digits
    from ddpm_jax import data
    with data.train_batches(
      digits.get_config(), global_batch_size=8, start_step=0, seed=0
    ) as batches:
      step, batch = next(batches)
    assert step == 0, step
    assert batch.keys() == {{'image'}}, batch.keys()
    images = batch['image']
    assert images.shape == (8, 8, 8, 1) and images.dtype == np.uint8, (images.shape, images.dtype)
    print('read', images.shape)
  """)
  result = run_python(code)
  assert result.returncode == 0, result.stderr[-5000:]
  assert 'read (8, 8, 8, 1)' in result.stdout


def test_importing_the_trainer_leaves_tensorflow_unimported():
  # TF is installed here: nothing may import it (or TFDS, or clu, which imports TF) on the way.
  code = textwrap.dedent(f"""
    import importlib
    import sys
    for module in {MODULES!r}:
      importlib.import_module(module)
    print(sorted(m for m in ('tensorflow', 'tensorflow_datasets', 'clu') if m in sys.modules))
  """)
  result = run_python(code)
  assert result.returncode == 0, result.stderr[-5000:]
  assert result.stdout.strip().splitlines()[-1] == '[]'

r"""The FID Inception weights: pytorch-fid's `.pth` converted once into a `.npz`, and read back.

Nothing downloads at run time. With internet access, fetch pytorch-fid's weights file
  https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth
and convert it once into a NumPy `.npz` (needs torch, only here):
  python -m ddpm_jax.inception_weights --source=pt_inception-2015-12-05-6726825d.pth \
    --out=inception_fid.npz
`load_params('inception_fid.npz')` then returns the variables of
`ddpm_jax.models.inception.InceptionV3`. The `.npz` stores them flat, as
'params/Mixed_5b/branch1x1/conv/kernel'; module names mirror pytorch-fid's state dict.
The official DDPM weights have their importer beside this one, `ddpm_jax.pretrained`.
"""

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from etils import epath
from flax import traverse_util

from ddpm_jax import tensors
from ddpm_jax.models.inception import expected_shapes

FID_WEIGHTS_URL = (
  'https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/'
  'pt_inception-2015-12-05-6726825d.pth'
)


def conversion_instructions(out: str) -> str:
  """How to produce the weights file `out`: where to download from, and the converter command."""
  return (
    f"Download the FID Inception weights (pytorch-fid's {FID_WEIGHTS_URL.rsplit('/', 1)[-1]}) "
    f'from\n  {FID_WEIGHTS_URL}\nand convert them once (needs torch) with\n'
    f'  python -m ddpm_jax.inception_weights --source=pt_inception-2015-12-05-6726825d.pth '
    f'--out={out}'
  )


def sha256(npz_path: str) -> str:
  """The SHA-256 of a weights file, hex: what keys the reference statistics made with it."""
  digest = hashlib.sha256()
  with epath.Path(npz_path).open('rb') as f:
    for block in iter(lambda: f.read(1 << 20), b''):
      digest.update(block)
  return digest.hexdigest()


def load_params(npz_path: str) -> dict[str, Any]:
  """Reads the converted weights: the variables for `InceptionV3().apply`.

  Args:
    npz_path: a `.npz` written by this module's converter.

  Returns:
    {'params': ..., 'batch_stats': ...}, float32 jax arrays.

  Raises:
    FileNotFoundError: when the file does not exist; the message says how to produce it.
    ValueError: when its variables are not exactly those of the network (names and shapes).
  """
  try:
    with np.load(npz_path) as npz:
      flat = {name: npz[name] for name in npz.files}
  except FileNotFoundError as e:
    raise FileNotFoundError(
      f'Inception weights file {npz_path!r} not found. {conversion_instructions(npz_path)}'
    ) from e
  _check_shapes(flat, npz_path)
  variables = traverse_util.unflatten_dict(flat, sep='/')
  return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), variables)


def _check_shapes(flat: Mapping[str, np.ndarray], source: str) -> None:
  tensors.check_tensors(
    expected_shapes(),
    {name: tuple(np.shape(value)) for name, value in flat.items()},
    what=f'{source} (for the FID Inception v3 weights)',
  )


# pytorch-fid parameter name (the last one or two parts of a state-dict key) -> our collection,
# name, and the axis permutation from torch's layout to Flax's.
# Conv kernels go from [O, I, kh, kw] to [kh, kw, I, O], the fc kernel from [1008, 2048] to
# [2048, 1008].
_TORCH_TO_FLAX = {
  ('conv', 'weight'): ('params', ('conv', 'kernel'), (2, 3, 1, 0)),
  ('bn', 'weight'): ('params', ('bn', 'scale'), None),
  ('bn', 'bias'): ('params', ('bn', 'bias'), None),
  ('bn', 'running_mean'): ('batch_stats', ('bn', 'mean'), None),
  ('bn', 'running_var'): ('batch_stats', ('bn', 'var'), None),
  ('fc', 'weight'): ('params', ('fc', 'kernel'), (1, 0)),
  ('fc', 'bias'): ('params', ('fc', 'bias'), None),
}


def convert_state_dict(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """pytorch-fid's FID Inception state dict (as NumPy arrays) -> our flat variables.

  Args:
    state_dict: e.g. 'Mixed_5b.branch1x1.conv.weight' -> float32 array in torch layout.
      BatchNorm's `num_batches_tracked` counters are ignored.

  Returns:
    'params/Mixed_5b/branch1x1/conv/kernel' -> float32 array in Flax layout, and so on: exactly
    the variables of `InceptionV3`.

  Raises:
    ValueError: for tensors that are not the FID Inception's (e.g. torchvision's AuxLogits),
      missing ones, or wrong shapes; the message names them.
  """
  flat = {}
  for key, value in state_dict.items():
    parts = tuple(key.split('.'))
    if parts[-1] == 'num_batches_tracked':
      continue
    rule = _TORCH_TO_FLAX.get(parts[-2:])
    if rule is None:  # Not the FID Inception's: named as unexpected by the check below.
      flat[key] = value
      continue
    collection, leaf, permutation = rule
    array = np.asarray(value, np.float32)
    if permutation is not None and array.ndim == len(permutation):
      array = array.transpose(permutation)
    flat['/'.join((collection, *parts[:-2], *leaf))] = array
  _check_shapes(flat, 'the state dict')
  return flat


def convert(source: str, out: str) -> None:
  """Converts pytorch-fid's `.pth` weights file at `source` into the `.npz` at `out`."""
  import torch  # Only the converter needs torch.

  state_dict = torch.load(source, map_location='cpu', weights_only=True)
  flat = convert_state_dict({key: value.numpy() for key, value in state_dict.items()})
  with open(out, 'wb') as f:  # A file object: np.savez would append '.npz' to other names.
    np.savez(f, **flat)


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  convert(flags.FLAGS.source, flags.FLAGS.out)


if __name__ == '__main__':
  # Defined only when run as a program, so that importing this library cannot clash with the
  # flags of main.py.
  flags.DEFINE_string('source', None, "pytorch-fid's pt_inception-2015-12-05-6726825d.pth.")
  flags.DEFINE_string('out', None, 'The .npz to write, for config.eval.inception_weights.')
  flags.mark_flags_as_required(['source', 'out'])
  app.run(main)

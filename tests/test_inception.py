"""The Flax FID Inception against pytorch-fid's own network, with the same random weights.

The reference is pytorch-fid's `InceptionV3` (the 2048-d pool features, with its own bilinear
resize to 299 and scaling to [-1, 1]) and the fc layer of its `fid_inception_v3()` (the 1008
logits), built without network access: its weight download is patched to return a random state
dict, in which the batch-norm statistics are perturbed so that they matter. The state dict goes
through our converter's command line as a saved `.pth`. Our outputs must match within 1e-4
relative to the largest reference value (float32 through 48 convolutions).
"""

import pathlib
import subprocess
import sys
from unittest import mock

import numpy as np
import PIL.Image
import pytest
import torch

from ddpm_jax import inception_weights
from ddpm_jax.models import inception

TOLERANCE = 1e-4
BATCH = 2


def _import_pytorch_fid():
  """Imports pytorch_fid.inception (torchvision itself is made importable by conftest.py)."""
  from pytorch_fid import inception as pytorch_fid_inception

  return pytorch_fid_inception


def _random_state_dict(torchvision_models, seed=0):
  """Random weights for the FID Inception v3: the state dict of pytorch-fid's network.

  Its keys and shapes are torchvision's Inception3 with 1008 classes and no auxiliary head
  (pytorch-fid's FID blocks replace blocks of the same shapes). Conv weights are He-normal,
  batch-norm scale in [0.5, 1.5], bias and running mean N(0, 0.2^2), running variance in
  [0.5, 2], so that every batch-norm term changes the output.
  """
  template = torchvision_models.inception_v3(
    weights=None, aux_logits=False, num_classes=1008, init_weights=False
  ).state_dict()
  generator = torch.Generator().manual_seed(seed)
  state = {}
  for key, value in template.items():
    shape = value.shape
    if key.endswith('num_batches_tracked'):
      state[key] = value
    elif key.endswith('conv.weight'):
      fan_in = shape[1] * shape[2] * shape[3]
      state[key] = torch.randn(shape, generator=generator) * (2 / fan_in) ** 0.5
    elif key.endswith('bn.weight'):
      state[key] = 0.5 + torch.rand(shape, generator=generator)
    elif key.endswith(('bn.bias', 'bn.running_mean')):
      state[key] = 0.2 * torch.randn(shape, generator=generator)
    elif key.endswith('bn.running_var'):
      state[key] = 0.5 + 1.5 * torch.rand(shape, generator=generator)
    elif key == 'fc.weight':
      state[key] = torch.randn(shape, generator=generator) / shape[1] ** 0.5
    elif key == 'fc.bias':
      state[key] = 0.1 * torch.randn(shape, generator=generator)
    else:
      raise AssertionError(f'Unexpected tensor {key}')
  return state


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
  """(pytorch-fid's pool network, its fc layer, our variables converted by the CLI)."""
  fid = _import_pytorch_fid()
  state = _random_state_dict(fid.torchvision.models)
  with mock.patch.object(fid, 'load_state_dict_from_url', return_value=state):
    pool_network = fid.InceptionV3([fid.InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()
    fc = fid.fid_inception_v3().fc.eval()

  tmp = tmp_path_factory.mktemp('inception')
  torch.save(state, tmp / 'pt_inception.pth')
  subprocess.run(
    [
      sys.executable,
      '-m',
      'ddpm_jax.inception_weights',
      f'--source={tmp / "pt_inception.pth"}',
      f'--out={tmp / "inception.npz"}',
    ],
    check=True,
    cwd=pathlib.Path(__file__).parents[1],
  )
  return pool_network, fc, inception_weights.load_params(str(tmp / 'inception.npz'))


def _reference_outputs(pool_network, fc, images):
  """pytorch-fid's features of uint8 [B, H, W, 3] images, fed as fid_score.py feeds them."""
  x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255  # As ToTensor(): [0, 1].
  with torch.no_grad():
    pool = pool_network(x)[0].flatten(1)
    return {'pool': pool.numpy(), 'logits': fc(pool).numpy()}


def _max_relative_error(ours, theirs):
  return float(np.max(np.abs(ours - theirs)) / np.max(np.abs(theirs)))


@pytest.mark.parametrize('size', [299, 32])
def test_matches_pytorch_fid(reference, size):
  """Pool features and logits on random uint8 images; 32x32 goes through the protocol's resize."""
  pool_network, fc, variables = reference
  images = np.random.default_rng(size).integers(0, 256, (BATCH, size, size, 3), dtype=np.uint8)
  theirs = _reference_outputs(pool_network, fc, images)
  ours = inception.apply(variables, images)
  assert ours['pool'].shape == (BATCH, 2048) and ours['logits'].shape == (BATCH, 1008)
  for key in ('pool', 'logits'):
    error = _max_relative_error(np.asarray(ours[key]), theirs[key])
    print(f'{size}x{size} {key}: max relative error {error:.2e}')
    assert error <= TOLERANCE, (key, error)


@pytest.mark.parametrize('in_size', [1, 8, 32, 299, 300, 512])
def test_resize_matches_torch_interpolate(in_size):
  """The resize against torch's F.interpolate(bilinear, align_corners=False), up and down."""
  images = np.random.default_rng(in_size).uniform(0, 255, (2, in_size, in_size + 3, 3))
  images = images.astype(np.float32)
  x = torch.from_numpy(images).permute(0, 3, 1, 2) / 255
  theirs = torch.nn.functional.interpolate(x, size=(299, 299), mode='bilinear', align_corners=False)
  theirs = (2 * theirs - 1).permute(0, 2, 3, 1).numpy()
  np.testing.assert_allclose(np.asarray(inception.preprocess(images)), theirs, rtol=0, atol=1e-6)


def test_compute_features_batches_like_one_call(reference):
  """Padding the last batch changes nothing: 3 images in batches of 2 equal one call of 3."""
  _, _, variables = reference
  images = np.random.default_rng(1).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
  batches = list(inception.compute_features(variables, images, batch_size=2))
  batched = {key: np.concatenate([b[key] for b in batches]) for key in ('pool', 'logits')}
  whole = inception.apply(variables, images)
  for key in ('pool', 'logits'):
    np.testing.assert_allclose(batched[key], np.asarray(whole[key]), rtol=1e-5, atol=1e-6)


def test_greyscale_images_are_featured_as_pil_makes_them_rgb(reference):
  """A [N, H, W, 1] batch gives the features of its RGB form as PIL's convert('RGB') makes it."""
  _, _, variables = reference
  grey = np.random.default_rng(2).integers(0, 256, (2, 32, 32, 1), dtype=np.uint8)
  rgb = np.stack([np.asarray(PIL.Image.fromarray(g[..., 0]).convert('RGB')) for g in grey])
  (found,) = inception.compute_features(variables, grey, batch_size=2)
  expected = inception.apply(variables, rgb)
  for key in ('pool', 'logits'):
    np.testing.assert_allclose(found[key], np.asarray(expected[key]), rtol=1e-5, atol=1e-6)


def test_parameter_count():
  """23,850,960 parameters: torchvision documents 27,161,264 for Inception v3, of which the
  auxiliary classifier (absent here) has 3,326,696 (1x1 conv 768->128 with batch norm, 5x5 conv
  128->768 with batch norm, fc 768->1000); the 8 extra classes add 8 x 2049."""
  shapes = inception.expected_shapes()
  count = sum(int(np.prod(shape)) for name, shape in shapes.items() if name.startswith('params/'))
  assert count == 27_161_264 - 3_326_696 + 8 * 2049


def test_missing_weights_file_says_how_to_make_it(tmp_path):
  with pytest.raises(FileNotFoundError, match='python -m ddpm_jax.inception_weights'):
    inception_weights.load_params(str(tmp_path / 'inception_fid.npz'))


def test_converter_rejects_other_networks():
  """torchvision's ImageNet Inception3 (1000 classes, auxiliary head) is not the FID network."""
  state = {'AuxLogits.fc.weight': np.zeros((1000, 768), np.float32)}
  with pytest.raises(ValueError, match='AuxLogits'):
    inception_weights.convert_state_dict(state)
  state = {'fc.weight': np.zeros((1000, 2048), np.float32)}
  with pytest.raises(ValueError, match='missing'):
    inception_weights.convert_state_dict(state)

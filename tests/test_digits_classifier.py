"""Tests of the digits classifier and of the sample-quality measure built on it.

Expected values:
- training is a pure function of its arguments: two runs give bit-identical parameters;
- test accuracy >= 0.95: simple classifiers reach about 97% on scikit-learn's digits (its
  "Recognizing hand-written digits" example, an SVM on half the data); this CNN measures 0.99;
- the measure separates real digits from Gaussian noise and from blurred digits. Real digits are
  the training split, held out from the test split that the measure compares against (their
  distance is the floor, measured 10.1), and the test split itself for the confident share
  (measured 0.99). Measured for comparison: noise with the data's pixel mean and std has
  distance 574 and confident share 0.48; digits blurred with a Gaussian of sigma 1 pixel,
  distance about 430 and confident share 0.69 to 0.72.
"""

import jax
import numpy as np
import pytest
import scipy.ndimage

from configs import digits
from ddpm_jax import data, digits_classifier


@pytest.fixture(scope='module')
def splits():
  config = digits.get_config()
  return data.create_source(config, 'train'), data.create_source(config, 'test')


@pytest.fixture(scope='module')
def params(splits):
  train, _ = splits
  return digits_classifier.train_classifier(train.images, train.all_labels)


def _quality(samples, params, splits):
  train, test = splits
  return digits_classifier.digits_quality(
    samples,
    params=params,
    train_images=train.images,
    test_images=test.images,
    test_labels=test.all_labels,
  )


def _blur(images, sigma=1.0):
  """uint8 [N, 8, 8, 1] blurred by a Gaussian of `sigma` pixels over height and width."""
  blurred = scipy.ndimage.gaussian_filter(images.astype(np.float64), sigma=(0, sigma, sigma, 0))
  return np.clip(np.round(blurred), 0, 255).astype(np.uint8)


def test_training_is_deterministic(params, splits):
  train, _ = splits
  again = digits_classifier.train_classifier(train.images, train.all_labels)
  for ours, theirs in zip(jax.tree.leaves(params), jax.tree.leaves(again), strict=True):
    np.testing.assert_array_equal(ours, theirs)


def test_test_accuracy(params, splits):
  _, test = splits
  assert digits_classifier.accuracy(params, test.images, test.all_labels) >= 0.95


def test_ranks_real_digits_far_above_noise_and_blur(params, splits):
  train, test = splits
  rng = np.random.default_rng(0)
  pixels = train.images.astype(np.float64)
  noise = rng.normal(pixels.mean(), pixels.std(), (1000, 8, 8, 1))
  noise = np.clip(np.round(noise), 0, 255).astype(np.uint8)

  real = _quality(train.images, params, splits)
  assert real['classifier_test_accuracy'] >= 0.95
  assert real['frechet_distance'] == pytest.approx(real['frechet_distance_floor'])
  assert real['confident_share'] >= 0.95 and real['test_confident_share'] >= 0.95
  floor = real['frechet_distance_floor']
  for name, samples in (
    ('noise', noise),
    ('blurred training digits', _blur(train.images)),
    ('blurred test digits', _blur(test.images)),
  ):
    fake = _quality(samples, params, splits)
    assert fake['frechet_distance'] > 10 * floor, name
    assert fake['confident_share'] < real['test_confident_share'] - 0.2, name


def test_report_fields(params, splits):
  _, test = splits
  report = _quality(test.images[:100], params, splits)
  per_class = report['confident_share_per_class']
  assert per_class.shape == (10,)
  assert per_class.sum() == pytest.approx(report['confident_share'])
  assert 0 <= report['confident_share'] <= 1


def test_confident_shares_by_hand():
  """4 rows: two confident 3s, one confident 7, one unsure row -> 3: 0.5, 7: 0.25."""
  probs = np.full((4, 10), 0.01)
  probs[0, 3] = probs[1, 3] = probs[2, 7] = 0.91
  probs[3, 5] = 0.89
  shares = digits_classifier.confident_shares(probs, threshold=0.9)
  expected = np.zeros(10)
  expected[3], expected[7] = 0.5, 0.25
  np.testing.assert_array_equal(shares, expected)

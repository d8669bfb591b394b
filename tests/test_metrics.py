"""Tests of the Frechet distance, the feature statistics and the Inception Score.

References: a float64 SciPy computation of the Frechet distance through symmetric
eigendecompositions (tr (sigma1 sigma2)^(1/2) = sum sqrt(eig(sigma1^(1/2) sigma2 sigma1^(1/2))),
a different route from the non-symmetric `sqrtm` under test), the closed form for diagonal
covariances, NumPy's mean and covariance, and the Inception Score's definition computed by hand.
"""

import numpy as np
import pytest
import scipy.linalg
import scipy.special
import scipy.stats

from ddpm_jax import metrics

DIM = 64


def reference_frechet_distance(mu1, sigma1, mu2, sigma2):
  """Float64, by eigh: |mu1 - mu2|^2 + tr s1 + tr s2 - 2 sum sqrt(eig(s1^1/2 s2 s1^1/2))."""
  eigenvalues, eigenvectors = scipy.linalg.eigh(sigma1)
  root1 = (eigenvectors * np.sqrt(np.clip(eigenvalues, 0, None))) @ eigenvectors.T
  middle = root1 @ sigma2 @ root1
  middle_eigenvalues = scipy.linalg.eigvalsh((middle + middle.T) / 2)
  trace_covmean = np.sum(np.sqrt(np.clip(middle_eigenvalues, 0, None)))
  return np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_covmean


def _covariance(rng, rank):
  """A random covariance [DIM, DIM] of the given rank: B B^T / rank, B ~ N(0, 1) [DIM, rank]."""
  factor = rng.normal(size=(DIM, rank))
  return factor @ factor.T / rank


def _nearly_singular_covariance(rng):
  """Eigenvalues 1 down to 1e-12 (condition number 1e12) in a random orthonormal basis."""
  basis, _ = np.linalg.qr(rng.normal(size=(DIM, DIM)))
  return (basis * np.logspace(0, -12, DIM)) @ basis.T


@pytest.mark.parametrize(
  'kind1, kind2',
  [('full', 'full'), ('nearly_singular', 'full'), ('rank_8', 'full'), ('rank_8', 'rank_8')],
)
def test_frechet_distance_matches_float64_reference(kind1, kind2):
  """Known means and covariances, full rank, nearly singular and singular: relative 1e-7.

  The measured agreement is 1e-15 for full rank and 1e-9 or better for the singular products,
  whose square root SciPy returns with imaginary parts of rounding size.
  """
  rng = np.random.default_rng(0)
  make = {
    'full': lambda: _covariance(rng, DIM),
    'nearly_singular': lambda: _nearly_singular_covariance(rng),
    'rank_8': lambda: _covariance(rng, 8),
  }
  mu1, mu2 = rng.normal(size=DIM), rng.normal(size=DIM)
  sigma1, sigma2 = make[kind1](), make[kind2]()
  expected = reference_frechet_distance(mu1, sigma1, mu2, sigma2)
  assert metrics.frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(expected, rel=1e-7)


def test_frechet_distance_of_sampled_gaussian_features():
  """Features drawn from two known Gaussians: the statistics' distance matches the reference on
  the same statistics (1e-9), and the population distance within sampling error (5%)."""
  rng = np.random.default_rng(1)
  dim = 8
  mu1, mu2 = rng.normal(size=dim), rng.normal(size=dim)
  factor1, factor2 = rng.normal(size=(dim, dim)), rng.normal(size=(dim, dim))
  features1 = mu1 + rng.normal(size=(50_000, dim)) @ factor1.T  # ~ N(mu1, F1 F1^T)
  features2 = mu2 + rng.normal(size=(50_000, dim)) @ factor2.T
  stats1, stats2 = metrics.feature_statistics(features1), metrics.feature_statistics(features2)
  distance = metrics.frechet_distance(*stats1, *stats2)
  assert distance == pytest.approx(reference_frechet_distance(*stats1, *stats2), rel=1e-9)
  population = reference_frechet_distance(mu1, factor1 @ factor1.T, mu2, factor2 @ factor2.T)
  assert distance == pytest.approx(population, rel=0.05)


def test_frechet_distance_diagonal_closed_form():
  """Diagonal covariances: d^2 = |mu1 - mu2|^2 + sum_i (sqrt(s1_i) - sqrt(s2_i))^2."""
  rng = np.random.default_rng(2)
  mu1, mu2 = rng.normal(size=DIM), rng.normal(size=DIM)
  var1, var2 = rng.uniform(0.1, 3, DIM), rng.uniform(0.1, 3, DIM)
  expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(var1) - np.sqrt(var2)) ** 2)
  distance = metrics.frechet_distance(mu1, np.diag(var1), mu2, np.diag(var2))
  assert distance == pytest.approx(expected, rel=1e-12)
  assert metrics.frechet_distance(mu1, np.diag(var1), mu1, np.diag(var1)) == pytest.approx(
    0, abs=1e-12
  )


def test_frechet_distance_offsets_singular_products(monkeypatch):
  """When sqrtm is not finite, SQRTM_EPS is added to both diagonals and the root retaken.

  With a rank-8 sigma1, the offset moves tr (sigma1 sigma2)^(1/2) by about
  sqrt(1e-6) per missing dimension, so the result is within 1e-3 relative of the exact one.
  """
  rng = np.random.default_rng(3)
  mu1, mu2 = rng.normal(size=DIM), rng.normal(size=DIM)
  sigma1, sigma2 = _covariance(rng, 8), _covariance(rng, DIM)
  sqrtm = scipy.linalg.sqrtm
  arguments = []

  def failing_once(matrix):
    arguments.append(matrix)
    return np.full_like(matrix, np.nan) if len(arguments) == 1 else sqrtm(matrix)

  monkeypatch.setattr(scipy.linalg, 'sqrtm', failing_once)
  distance = metrics.frechet_distance(mu1, sigma1, mu2, sigma2)
  offset = metrics.SQRTM_EPS * np.eye(DIM)
  np.testing.assert_allclose(arguments[1], (sigma1 + offset) @ (sigma2 + offset), rtol=1e-15)
  expected = reference_frechet_distance(mu1, sigma1, mu2, sigma2)
  assert distance == pytest.approx(expected, rel=1e-3)


def test_frechet_distance_rejects_large_imaginary_parts():
  """sigma1 = -I is no covariance: sqrt(-I) = i I has imaginary parts 1 > MAX_IMAGINARY."""
  eye = np.eye(3)
  with pytest.raises(ValueError, match='imaginary'):
    metrics.frechet_distance(np.zeros(3), -eye, np.zeros(3), eye)


def test_streaming_statistics_equal_one_shot():
  """Moments over uneven batches (one empty), saved and restored midway, equal np.mean/np.cov."""
  rng = np.random.default_rng(4)
  features = (3 + rng.normal(size=(1000, 16)) @ rng.normal(size=(16, 16))).astype(np.float32)
  moments = metrics.FeatureMoments.zeros(16)
  for batch in np.split(features, [0, 0, 128, 500, 777]):
    moments = metrics.FeatureMoments.from_state(dict(moments.state())).update(batch)
  assert moments.count == 1000
  mu, sigma = moments.mean_and_covariance()
  expected_mu, expected_sigma = metrics.feature_statistics(features)
  np.testing.assert_allclose(expected_mu, features.astype(np.float64).mean(0), rtol=1e-12)
  np.testing.assert_allclose(expected_sigma, np.cov(features.astype(np.float64).T), rtol=1e-12)
  np.testing.assert_allclose(mu, expected_mu, rtol=1e-12)
  np.testing.assert_allclose(sigma, expected_sigma, rtol=1e-10, atol=1e-12)


def test_streaming_statistics_survive_npz(tmp_path):
  rng = np.random.default_rng(5)
  moments = metrics.FeatureMoments.zeros(4).update(rng.normal(size=(10, 4)))
  np.savez(tmp_path / 'moments.npz', **moments.state())
  with np.load(tmp_path / 'moments.npz') as state:
    restored = metrics.FeatureMoments.from_state(state)
  assert restored.count == 10
  np.testing.assert_array_equal(restored.sum, moments.sum)
  np.testing.assert_array_equal(restored.outer_sum, moments.outer_sum)


def _hand_inception_score(logits):
  """One split, straight from the definition, with probabilities (not log-softmax)."""
  p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
  marginal = p.mean(axis=0)
  kl = [
    sum(p[i, y] * np.log(p[i, y] / marginal[y]) for y in range(p.shape[1])) for i in range(len(p))
  ]
  return np.exp(np.mean(kl))


def test_inception_score_matches_hand_computation():
  """Random logits, 12 rows in 3 splits of 4: per-split scores by hand, their mean and std."""
  logits = np.random.default_rng(6).normal(scale=2, size=(12, 5))
  scores = [_hand_inception_score(logits[i : i + 4]) for i in (0, 4, 8)]
  mean, std = metrics.inception_score(logits, num_splits=3)
  assert mean == pytest.approx(np.mean(scores), rel=1e-12)
  assert std == pytest.approx(np.std(scores), rel=1e-9)
  assert metrics.inception_score(logits, num_splits=1)[0] == pytest.approx(
    _hand_inception_score(logits), rel=1e-12
  )


def test_inception_score_extremes():
  """Golden values of the definition: identical predictions give 1; confident predictions
  spread evenly over K classes give K."""
  same = np.tile(np.random.default_rng(7).normal(size=(1, 10)), (100, 1))
  assert metrics.inception_score(same, num_splits=10) == pytest.approx((1.0, 0.0), abs=1e-12)
  confident = 200.0 * np.eye(10)[np.arange(100) % 10]
  assert metrics.inception_score(confident, num_splits=10) == pytest.approx((10.0, 0.0), abs=1e-9)
  # From probabilities, through their logarithm.
  probs = np.full((20, 4), 0.25)
  assert metrics.inception_score(np.log(probs), num_splits=2)[0] == pytest.approx(1.0)


def _scipy_inception_score(logits):
  """One part, from Salimans et al. 2016: exp(mean_x KL(p(y|x) || p(y))), p(y) = mean_x p(y|x),
  the KL by scipy.stats.entropy."""
  p = scipy.special.softmax(logits, axis=1)
  marginal = p.mean(axis=0)
  return np.exp(np.mean([scipy.stats.entropy(row, marginal) for row in p]))


def test_inception_score_splits_are_consecutive_with_their_own_marginal():
  """N = 1000 rows, K = 24 classes, in 10 consecutive parts of 100 rows that differ: part i
  predicts, confidently, one of the first 2 + 2i classes, so its score rises with i (1.95 for
  part 0 to 16.4 for part 9). Expected: the mean and the std (ddof 0, as the improved-GAN code)
  of the 10 parts' scores, each by scipy.stats.entropy in float64 (9.475 +- 4.518), and the
  score of all rows as one part (12.47)."""
  rng = np.random.default_rng(8)
  num_classes = 24
  parts = []
  for i in range(10):
    labels = rng.integers(0, 2 + 2 * i, 100)
    parts.append(8.0 * np.eye(num_classes)[labels] + rng.normal(size=(100, num_classes)))
  logits = np.concatenate(parts)
  scores = [_scipy_inception_score(part) for part in parts]
  expected_mean, expected_std = np.mean(scores), np.std(scores)
  expected_single = _scipy_inception_score(logits)

  mean, std = metrics.inception_score(logits, num_splits=10)
  assert mean == pytest.approx(expected_mean, rel=1e-10)
  assert std == pytest.approx(expected_std, rel=1e-10)
  assert metrics.inception_score(logits, num_splits=1) == pytest.approx(
    (expected_single, 0.0), rel=1e-10, abs=1e-12
  )

  # The data tell the splits apart: interleaved parts (rows i, i + 10, ...; mean 11.66), one p(y)
  # of all rows in every part (13.51), or std with ddof 1 (4.763) would each miss the expected
  # values by far more than the tolerance.
  interleaved = [_scipy_inception_score(logits[i::10]) for i in range(10)]
  p = scipy.special.softmax(logits, axis=1)
  marginal = p.mean(axis=0)
  global_marginal = [
    np.exp(np.mean([scipy.stats.entropy(row, marginal) for row in p[100 * i : 100 * (i + 1)]]))
    for i in range(10)
  ]
  assert abs(np.mean(interleaved) - expected_mean) > 0.1 * expected_mean
  assert abs(np.mean(global_marginal) - expected_mean) > 0.1 * expected_mean
  assert abs(np.std(scores, ddof=1) - expected_std) > 0.01 * expected_std
  assert abs(expected_single - expected_mean) > 0.1 * expected_mean

"""Sample-quality metrics on features: Frechet distance and Inception Score, in float64 NumPy.

- `frechet_distance(mu1, sigma1, mu2, sigma2)`: the Frechet distance between two Gaussians,
  |mu1 - mu2|^2 + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)) (Heusel et al. 2017); FID when
  the statistics are of Inception pool features.
- `feature_statistics(features)`: the mean and covariance (ddof 1, as np.cov) of features;
  `FeatureMoments` accumulates the same over batches, as float64 sums that can be saved and
  restored, so an interrupted evaluation resumes where it stopped.
- `inception_score(logits, num_splits)`: exp(E_x KL(p(y|x) || p(y))) (Salimans et al. 2016).

Everything runs on the host in float64: these are small computations on [N, D] features, and
the matrix square root of a product of covariances needs the precision.
"""

import dataclasses
import warnings
from typing import Any

import numpy as np
import scipy.linalg
import scipy.special

# The offset added to both covariances' diagonals when their product is too singular for a
# finite matrix square root (the standard fallback of the TTUR FID code and pytorch-fid).
SQRTM_EPS = 1e-6
# Largest imaginary part tolerated on the diagonal of the square root (numerical noise), as in
# the TTUR FID code and pytorch-fid.
MAX_IMAGINARY = 1e-3


def frechet_distance(
  mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray
) -> float:
  """The Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64.

  d^2 = |mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^(1/2)), the square root
  by SciPy's `sqrtm`. When the product is singular enough that the root is not finite, both
  covariances get SQRTM_EPS added to their diagonal and the root is taken again. A complex root
  is accepted (its real part taken) only when the imaginary parts of its diagonal are below
  MAX_IMAGINARY.

  Args:
    mu1, mu2: float [D] means.
    sigma1, sigma2: float [D, D] covariances, symmetric positive semi-definite.

  Returns:
    The distance (the square, as FID reports it), >= 0 up to rounding.

  Raises:
    ValueError: for mismatched shapes, or a root with large imaginary parts.
  """
  mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
  sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
  sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
  dim = mu1.shape[0]
  if mu2.shape != (dim,) or sigma1.shape != (dim, dim) or sigma2.shape != (dim, dim):
    raise ValueError(
      f'Mismatched statistics: mu1 {mu1.shape}, sigma1 {sigma1.shape}, mu2 {mu2.shape}, '
      f'sigma2 {sigma2.shape}.'
    )
  # Singular products are expected (features fewer than dimensions, dead units): SciPy's
  # warning about them is silenced, and the result checked here instead.
  with warnings.catch_warnings():
    warnings.simplefilter('ignore', scipy.linalg.LinAlgWarning)
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
      offset = SQRTM_EPS * np.eye(dim)
      covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
  if np.iscomplexobj(covmean):
    imaginary = np.max(np.abs(np.diagonal(covmean).imag))
    if imaginary > MAX_IMAGINARY:
      raise ValueError(f'The matrix square root has imaginary parts up to {imaginary:.3g}.')
    covmean = covmean.real
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Mean and covariance of features, as FID takes them.

  Args:
    features: [N, D], N >= 2.

  Returns:
    (mu float64 [D], sigma float64 [D, D]): the mean and the unbiased covariance (ddof 1, as
    np.cov(features, rowvar=False)).
  """
  features = np.asarray(features, np.float64)
  return features.mean(axis=0), np.cov(features, rowvar=False)


@dataclasses.dataclass(frozen=True)
class FeatureMoments:
  """Running sums of features, for `feature_statistics` over batches.

  Float64 sums of the features and of their outer products; `mean_and_covariance()` gives the
  same statistics as `feature_statistics` on all the rows at once (up to float64 rounding).
  Save with `np.savez(path, **moments.state())` and resume with
  `FeatureMoments.from_state(np.load(path))`.

  Attributes:
    count: number of rows added.
    sum: float64 [D], the sum of the rows.
    outer_sum: float64 [D, D], the sum of the rows' outer products x x^T.
  """

  count: int
  sum: np.ndarray
  outer_sum: np.ndarray

  @classmethod
  def zeros(cls, dim: int) -> 'FeatureMoments':
    """No rows yet, for D = dim features."""
    return cls(0, np.zeros(dim), np.zeros((dim, dim)))

  def update(self, features: np.ndarray) -> 'FeatureMoments':
    """These moments plus the rows of features [n, D] (n >= 0)."""
    features = np.asarray(features, np.float64)
    return FeatureMoments(
      self.count + features.shape[0],
      self.sum + features.sum(axis=0),
      self.outer_sum + features.T @ features,
    )

  def mean_and_covariance(self) -> tuple[np.ndarray, np.ndarray]:
    """(mu float64 [D], sigma float64 [D, D]) of all rows added, sigma with ddof 1."""
    if self.count < 2:
      raise ValueError(f'A covariance needs at least 2 rows, got {self.count}.')
    mu = self.sum / self.count
    sigma = (self.outer_sum - self.count * np.outer(mu, mu)) / (self.count - 1)
    return mu, sigma

  def state(self) -> dict[str, np.ndarray]:
    """The sums as arrays, for np.savez."""
    return {'count': np.asarray(self.count), 'sum': self.sum, 'outer_sum': self.outer_sum}

  @classmethod
  def from_state(cls, state: Any) -> 'FeatureMoments':
    """Inverse of `state()`; `state` is a mapping such as the result of np.load."""
    return cls(int(state['count']), np.asarray(state['sum']), np.asarray(state['outer_sum']))


def inception_score(logits: np.ndarray, num_splits: int = 10) -> tuple[float, float]:
  """The Inception Score: exp(E_x KL(p(y|x) || p(y))) per split; mean and std over splits.

  The rows are cut into `num_splits` consecutive parts (part i is rows
  [i N // num_splits, (i + 1) N // num_splits), as the improved-GAN code does); in each part,
  p(y|x) = softmax(logits) per row and p(y) is their mean over the part. Computed in float64
  from log-softmax, as TF-GAN's `classifier_score_from_logits` (which is num_splits = 1).

  For the FID Inception network, pass all 1008 logits: the improved-GAN Inception Score, TF-GAN
  and the DDPM paper's evaluation code take the softmax over all 1008 outputs of the 2015-12-05
  graph, not over the 1000 ImageNet classes. For class probabilities p instead of logits, pass
  log(p): the softmax of log-probabilities returns p.

  Args:
    logits: [N, K] unnormalized log-probabilities, N >= num_splits.
    num_splits: number of parts (10 in the standard protocol on 50,000 samples).

  Returns:
    (mean, std) of the per-split scores, std with ddof 0 as in the improved-GAN code; each score
    is in [1, K].
  """
  logits = np.asarray(logits, np.float64)
  num = logits.shape[0]
  if not 1 <= num_splits <= num:
    raise ValueError(f'num_splits must be in [1, {num}] for {num} rows, got {num_splits}.')
  scores = []
  for i in range(num_splits):
    log_p = scipy.special.log_softmax(
      logits[i * num // num_splits : (i + 1) * num // num_splits], 1
    )
    log_marginal = scipy.special.logsumexp(log_p, axis=0) - np.log(log_p.shape[0])
    kl = np.sum(np.exp(log_p) * (log_p - log_marginal), axis=1)
    scores.append(np.exp(np.mean(kl)))
  return float(np.mean(scores)), float(np.std(scores))

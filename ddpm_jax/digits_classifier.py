"""A sample-quality measure for the embedded 8x8 digits, where no Inception network applies.

A small CNN is trained on the digits training split, deterministically (fixed seed, fixed batch
order) in a few seconds on a CPU. Its penultimate layer
(64 ReLU features) plays the role of Inception's pool features and its softmax the role of the
class probabilities:

- Frechet distance between the features of the samples and of the test split (the analogue of
  FID), next to the same distance between the training split and the test split: the floor that
  a generator reproducing the training distribution would reach (at a similar sample count:
  the estimate is biased upwards for small sets, and the training split has 1,497 images);
- the share of samples that the classifier assigns to a class with probability >= 0.9
  (`CONFIDENCE_THRESHOLD`), overall and per class: digit-like samples are classified
  confidently, and a generator covering all digits spreads them over the 10 classes about as the
  data does (each class is about 10% of the digits). The same share on the test split is the
  reference.

`train_classifier` returns the parameters, a pure function of its arguments, so that the caller
can cache them (e.g. in the workdir); `digits_quality` computes the whole report.
"""

import functools
from typing import Any

import flax.linen as nn
import jax
import numpy as np
import optax

from ddpm_jax import image_io, metrics

NUM_CLASSES = 10
CONFIDENCE_THRESHOLD = 0.9


class DigitsClassifier(nn.Module):
  """conv3x3(32) -> ReLU -> conv3x3(64) -> ReLU -> 2x2 avg pool -> dense(64) -> ReLU -> dense(10).

  Attributes:
    num_features: width of the penultimate layer, the features of the Frechet distance.
  """

  num_features: int = 64

  @nn.compact
  def __call__(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Features and logits of digits.

    Args:
      images: uint8 [B, 8, 8, 1] in 0..255 (the dataset's and the samples' format).

    Returns:
      (features float32 [B, num_features] >= 0, logits float32 [B, 10]).
    """
    x = image_io.to_model_range(images)
    x = nn.relu(nn.Conv(32, (3, 3), name='conv1')(x))
    x = nn.relu(nn.Conv(64, (3, 3), name='conv2')(x))
    x = nn.avg_pool(x, (2, 2), strides=(2, 2))  # [B, 4, 4, 64]
    features = nn.relu(nn.Dense(self.num_features, name='dense1')(x.reshape(x.shape[0], -1)))
    return features, nn.Dense(NUM_CLASSES, name='dense2')(features)


def _batch_indices(num_examples: int, *, batch_size: int, num_steps: int, seed: int) -> np.ndarray:
  """int64 [num_steps, batch_size]: epochs of permutations from default_rng(seed), each cut into
  whole batches (the remainder of each permutation is skipped)."""
  rng = np.random.default_rng(seed)
  per_epoch = num_examples // batch_size
  num_epochs = -(-num_steps // per_epoch)
  epochs = [rng.permutation(num_examples)[: per_epoch * batch_size] for _ in range(num_epochs)]
  return np.concatenate(epochs).reshape(-1, batch_size)[:num_steps]


@functools.partial(jax.jit, static_argnames='learning_rate')
def _train_step(
  params: Any, opt_state: Any, images: jax.Array, labels: jax.Array, learning_rate: float
) -> tuple[Any, Any]:
  """One Adam step on the softmax cross-entropy of a batch (uint8 images, int labels)."""

  def loss_fn(params):
    _, logits = DigitsClassifier().apply({'params': params}, images)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  updates, opt_state = optax.adam(learning_rate).update(jax.grad(loss_fn)(params), opt_state)
  return optax.apply_updates(params, updates), opt_state


def train_classifier(
  images: np.ndarray,
  labels: np.ndarray,
  *,
  seed: int = 0,
  num_steps: int = 1000,
  batch_size: int = 64,
  learning_rate: float = 1e-3,
) -> Any:
  """Trains the classifier; the result is a deterministic function of the arguments.

  Args:
    images: uint8 [N, 8, 8, 1] in 0..255, the digits training split.
    labels: int [N] in 0..9.
    seed: initializes the parameters and orders the batches.
    num_steps: Adam steps (1000 of batch 64: about 43 epochs of the 1,497 training digits).
    batch_size: examples per step.
    learning_rate: Adam's step size.

  Returns:
    The parameters of `DigitsClassifier()`, a pytree of float32 arrays.
  """
  labels = np.asarray(labels, np.int32)
  params = DigitsClassifier().init(jax.random.key(seed), images[:1])['params']
  opt_state = optax.adam(learning_rate).init(params)
  # A Python loop over a compiled step: XLA:CPU runs these convolutions ~40x slower inside a
  # compiled lax.scan.
  for indices in _batch_indices(len(images), batch_size=batch_size, num_steps=num_steps, seed=seed):
    params, opt_state = _train_step(
      params, opt_state, images[indices], labels[indices], learning_rate
    )
  return params


@jax.jit
def classify(params: Any, images: jax.Array) -> tuple[jax.Array, jax.Array]:
  """images uint8 [N, 8, 8, 1] -> (features float32 [N, 64], class probabilities [N, 10])."""
  features, logits = DigitsClassifier().apply({'params': params}, images)
  return features, jax.nn.softmax(logits)


def accuracy(params: Any, images: np.ndarray, labels: np.ndarray) -> float:
  """Share of images [N, 8, 8, 1] whose most probable class is their label [N]."""
  _, probs = classify(params, images)
  return float(np.mean(np.argmax(probs, axis=1) == np.asarray(labels)))


def confident_shares(probs: np.ndarray, threshold: float = CONFIDENCE_THRESHOLD) -> np.ndarray:
  """Per class c, the share of all rows predicted c with probability >= threshold.

  Args:
    probs: [N, 10] class probabilities.
    threshold: the confidence needed.

  Returns:
    float64 [10]; its sum is the share of rows classified confidently at all.
  """
  probs = np.asarray(probs)
  confident = probs.max(axis=1) >= threshold
  counts = np.bincount(probs.argmax(axis=1)[confident], minlength=NUM_CLASSES)
  return counts / len(probs)


def digits_quality(
  samples: np.ndarray,
  *,
  params: Any,
  train_images: np.ndarray,
  test_images: np.ndarray,
  test_labels: np.ndarray,
  threshold: float = CONFIDENCE_THRESHOLD,
  requested: np.ndarray | None = None,
) -> dict[str, Any]:
  """The digits sample-quality report (module docstring).

  Args:
    samples: uint8 [N, 8, 8, 1] in 0..255, N >= 2: generated digits.
    params: from `train_classifier` on the training split.
    train_images: uint8 [1497, 8, 8, 1], the training split (for the floor).
    test_images, test_labels: the test split, uint8 [300, 8, 8, 1] and int [300].
    threshold: the confidence for the confident shares.
    requested: int [N], the digit each sample was asked to be (a class-conditional model), or
      None.

  Returns:
    {'classifier_test_accuracy': float, the classifier's accuracy on the test split;
     'frechet_distance': float, samples vs test split, in the classifier's feature space;
     'frechet_distance_floor': float, training split vs test split;
     'confident_share': float, share of samples classified with probability >= threshold;
     'confident_share_per_class': float64 [10], share of samples confidently classified as each
       digit (summing to confident_share);
     'test_confident_share': float, confident_share of the test split, the reference;
     with `requested`, also 'requested_accuracy': float, the share of samples whose most
       probable class is the digit asked for, and 'requested_accuracy_per_class': {c: float},
       that share among the samples asked to be c, for each c asked for}.
  """
  sample_features, sample_probs = map(np.asarray, classify(params, samples))
  train_features, _ = classify(params, train_images)
  test_features, test_probs = map(np.asarray, classify(params, test_images))
  test_stats = metrics.feature_statistics(test_features)
  per_class = confident_shares(sample_probs, threshold)
  report = {
    'classifier_test_accuracy': accuracy(params, test_images, test_labels),
    'frechet_distance': metrics.frechet_distance(
      *metrics.feature_statistics(sample_features), *test_stats
    ),
    'frechet_distance_floor': metrics.frechet_distance(
      *metrics.feature_statistics(np.asarray(train_features)), *test_stats
    ),
    'confident_share': float(per_class.sum()),
    'confident_share_per_class': per_class,
    'test_confident_share': float(confident_shares(test_probs, threshold).sum()),
  }
  if requested is not None:
    requested = np.asarray(requested)
    hits = sample_probs.argmax(axis=1) == requested
    report['requested_accuracy'] = float(np.mean(hits))
    report['requested_accuracy_per_class'] = {
      int(c): float(np.mean(hits[requested == c])) for c in np.unique(requested)
    }
  return report

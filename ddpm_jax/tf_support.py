"""TensorFlow on the host only: imported where it is needed, and kept off the accelerators.

Only reading a TFDS dataset and writing TensorBoard summaries (clu's writer) use TensorFlow, so
nothing imports it, TFDS or clu at module level: TF takes seconds to import, and a machine that
only runs the model need not have it. Where TF is imported, `import_tensorflow` hides the GPUs
and TPUs from it first: TF would otherwise reserve all GPU memory (or claim the TPU) at its first
op, leaving none for JAX.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

if TYPE_CHECKING:
  from clu import metric_writers


@functools.cache
def import_tensorflow():
  """TensorFlow with no GPU or TPU visible to it, or None where it is not installed.

  Call it before anything else imports TF (TFDS may, to read a dataset): the visible devices can
  only be set before TF initializes them.
  """
  try:
    import tensorflow as tf
  except ImportError:  # TFDS reads ArrayRecord data without TF.
    return None
  tf.config.set_visible_devices([], 'GPU')
  tf.config.set_visible_devices([], 'TPU')
  return tf


def create_metric_writer(logdir: str, *, just_logging: bool) -> metric_writers.MetricWriter:
  """clu's default writer: TensorBoard summaries in `logdir` and the log, or only the log."""
  import_tensorflow()
  from clu import metric_writers  # Imports TensorFlow.

  return metric_writers.create_default_writer(logdir, just_logging=just_logging)

"""Command-line entry point of ddpm-jax: train, sample or evaluate a DDPM.

The logic lives in the `ddpm_jax` package; this file parses flags, starts the multi-process
runtime when there are several processes, and dispatches on --mode:

  python main.py --config=configs/digits.py --mode=train --workdir=/tmp/ddpm_digits
  python main.py --config=configs/cifar10.py --mode=train --workdir=gs://bucket/ddpm_cifar10 \
      --config.training.batch_size=256
  python main.py --config=configs/digits.py --mode=sample --workdir=/tmp/ddpm_digits
  python main.py --config=configs/digits.py --mode=eval --workdir=/tmp/ddpm_digits
"""

import logging as pylogging
import os

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from ddpm_jax import evaluation, sampling, train

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory (local or gs://) for all outputs.')
_MODE = flags.DEFINE_enum('mode', 'train', ['train', 'sample', 'eval'], 'What to run.')
_COORDINATOR = flags.DEFINE_string(
  'coordinator_address',
  os.environ.get('JAX_COORDINATOR_ADDRESS'),
  'host:port of process 0, for jax.distributed (default: $JAX_COORDINATOR_ADDRESS). Not needed '
  'on Cloud TPU pods, SLURM or Open MPI, where it is detected.',
)
_NUM_PROCESSES = flags.DEFINE_integer(
  'num_processes', int(os.environ.get('JAX_NUM_PROCESSES', 0)) or None, 'Number of processes.'
)
_PROCESS_ID = flags.DEFINE_integer(
  'process_id',
  int(os.environ['JAX_PROCESS_ID']) if 'JAX_PROCESS_ID' in os.environ else None,
  'Index of this process.',
)
flags.mark_flags_as_required(['config', 'workdir'])


def _launched_as_several_processes() -> bool:
  """Whether this process is one of several: explicit flags, or a detected multi-host cluster."""
  if _COORDINATOR.value or (_NUM_PROCESSES.value or 1) > 1:
    return True
  tpu_hosts = os.environ.get('TPU_WORKER_HOSTNAMES') or os.environ.get('TPU_PROCESS_ADDRESSES')
  if tpu_hosts and ',' in tpu_hosts:
    return True
  return (
    int(os.environ.get('SLURM_NTASKS', 1)) > 1 or int(os.environ.get('OMPI_COMM_WORLD_SIZE', 1)) > 1
  )


class _QuietOrbax(pylogging.Filter):
  """Drops orbax's INFO records (a dozen lines for every checkpoint save), keeps warnings."""

  def filter(self, record: pylogging.LogRecord) -> bool:
    return record.levelno >= pylogging.WARNING or '/orbax/' not in record.pathname


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  logging.get_absl_handler().addFilter(_QuietOrbax())
  if _launched_as_several_processes():
    jax.distributed.initialize(
      coordinator_address=_COORDINATOR.value,
      num_processes=_NUM_PROCESSES.value,
      process_id=_PROCESS_ID.value,
    )
  logging.info(
    'Process %d of %d; %d local / %d global devices (%s).',
    jax.process_index(),
    jax.process_count(),
    jax.local_device_count(),
    jax.device_count(),
    jax.devices()[0].platform,
  )
  config = _CONFIG.value
  if _MODE.value == 'train':
    train.train_and_evaluate(config, _WORKDIR.value)
  elif _MODE.value == 'sample':
    sampling.sample(config, _WORKDIR.value)
  else:
    evaluation.evaluate(config, _WORKDIR.value)


if __name__ == '__main__':
  app.run(main)

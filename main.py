"""Command-line entry point of ddpm-jax: train, sample or evaluate a DDPM.

The logic lives in the `ddpm_jax` package; this file parses flags, turns on the persistent
compilation cache, starts the multi-process runtime when there are several processes, and
dispatches on --mode:

  python main.py --config=configs/digits.py --mode=train --workdir=/tmp/ddpm_digits
  python main.py --config=configs/cifar10.py --mode=train --workdir=gs://bucket/ddpm_cifar10 \
      --config.training.batch_size=256
  python main.py --config=configs/digits.py --mode=sample --workdir=/tmp/ddpm_digits
  python main.py --config=configs/digits.py --mode=eval --workdir=/tmp/ddpm_digits
"""

import logging as pylogging
import os
import threading

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from ddpm_jax import evaluation, generate, train

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
# On by default: compiling the train step, the sampler and the evaluation takes from seconds
# (digits, CPU) to minutes (256x256), and every relaunch (resuming after preemption, sampling,
# evaluating) would compile the same programs again. A directory of the user's own, because JAX
# runs what it finds there (its docs: never share the cache with users you do not trust).
_COMPILATION_CACHE_DIR = flags.DEFINE_string(
  'compilation_cache_dir',
  os.environ.get(
    'JAX_COMPILATION_CACHE_DIR',
    os.path.join(
      os.environ.get('XDG_CACHE_HOME') or os.path.expanduser('~/.cache'), 'ddpm_jax', 'xla'
    ),
  ),
  'Persistent XLA compilation cache: a launch loads the programs that an earlier launch with the '
  'same config, code and devices compiled, instead of compiling them again. Empty: no cache. '
  'Default: $JAX_COMPILATION_CACHE_DIR, else $XDG_CACHE_HOME/ddpm_jax/xla (~/.cache/...).',
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


def _use_compilation_cache(path: str) -> None:
  """Keeps every compiled program in `path` (JAX's persistent cache), or none where it is ''."""
  if not path:
    jax.config.update('jax_enable_compilation_cache', False)
    return
  jax.config.update('jax_compilation_cache_dir', path)
  # JAX's default (1 s) skips the small programs (initialization, checks, sampler setup), whose
  # compilations still add up at every launch; loading one from a local disk is faster.
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  logging.info('Persistent compilation cache: %s', path)


def _log_slow_compilations(min_secs: float = 1.0) -> None:
  """Logs each program that takes `min_secs` or more to compile, or that was loaded from the
  persistent compilation cache instead of taking that long."""
  saved = threading.local()  # The compile time the cache saved for the program being loaded.

  def on_duration(event: str, secs: float, **kwargs) -> None:
    name = kwargs.get('fun_name', 'a program')
    if event == '/jax/compilation_cache/compile_time_saved_sec':
      saved.secs = secs
    elif event == '/jax/core/compile/backend_compile_duration':
      saved_secs, saved.secs = getattr(saved, 'secs', None), None
      if saved_secs is not None and saved_secs + secs >= min_secs:
        logging.info(
          'Loaded %s from the compilation cache in %.2f s (%.1f s saved).',
          name,
          secs,
          saved_secs,
        )
      elif saved_secs is None and secs >= min_secs:
        logging.info('Compiled %s in %.1f s.', name, secs)

  jax.monitoring.register_event_duration_secs_listener(on_duration)


class _QuietOrbax(pylogging.Filter):
  """Drops orbax's INFO records (a dozen lines for every checkpoint save), keeps warnings."""

  def filter(self, record: pylogging.LogRecord) -> bool:
    return record.levelno >= pylogging.WARNING or '/orbax/' not in record.pathname


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  logging.get_absl_handler().addFilter(_QuietOrbax())
  _use_compilation_cache(_COMPILATION_CACHE_DIR.value)
  _log_slow_compilations()
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
    train.train(config, _WORKDIR.value)
  elif _MODE.value == 'sample':
    generate.sample(config, _WORKDIR.value)
  else:
    evaluation.evaluate(config, _WORKDIR.value)


if __name__ == '__main__':
  app.run(main)

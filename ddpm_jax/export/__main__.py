"""The command line of the export to diffusers: `python -m ddpm_jax.export` (the package
docstring shows its uses)."""

import shlex
import sys
from collections.abc import Sequence

from absl import app, flags
from ml_collections import config_flags

from ddpm_jax import export


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  # The flags named after the arguments of `export.export` are those arguments.
  arguments = ('config', 'checkpoint_step', 'params', 'push_to_hub', 'private')
  out = export.export(
    flags.FLAGS.workdir,
    flags.FLAGS.out,
    command=shlex.join(['python', '-m', 'ddpm_jax.export', *sys.argv[1:]]),
    **{name: flags.FLAGS[name].value for name in arguments},
  )
  print(f'Exported {flags.FLAGS.workdir} into {out}; load it with')
  print(f"  diffusers.DDPMPipeline.from_pretrained('{flags.FLAGS.push_to_hub or out}')")


if __name__ == '__main__':
  # Defined only when run as a program, as in `python -m ddpm_jax.pretrained`.
  config_flags.DEFINE_config_file(
    'config', None, "The run's config file; default: <workdir>/config.json, which runs write."
  )
  flags.DEFINE_string('workdir', None, 'The workdir of a trained run or of converted weights.')
  flags.DEFINE_string('out', None, 'The folder to write (must not exist, or be empty).')
  flags.DEFINE_integer('checkpoint_step', None, 'The checkpoint to export; default: the latest.')
  flags.DEFINE_enum('params', 'ema', export.PARAMS, 'The EMA parameters, or the raw ones.')
  flags.DEFINE_string('push_to_hub', None, 'ORG/NAME: upload the folder to this Hub model repo.')
  flags.DEFINE_bool('private', False, 'With --push_to_hub: create the repo private.')
  flags.mark_flags_as_required(['workdir', 'out'])
  app.run(main)

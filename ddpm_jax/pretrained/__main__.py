"""The command line of the converter: `python -m ddpm_jax.pretrained` (the package docstring
shows its uses)."""

from collections.abc import Sequence

from absl import app, flags
from ml_collections import config_flags

from ddpm_jax import pretrained


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  config_path = pretrained.convert(
    flags.FLAGS.config,
    source=flags.FLAGS.source,
    source_format=flags.FLAGS.format,
    workdir=flags.FLAGS.workdir,
    step=flags.FLAGS.step,
    use_ema=flags.FLAGS.use_ema,
    revision=flags.FLAGS.revision,
  )
  config_path = config_path or config_flags.get_config_filename(flags.FLAGS['config'])
  print(f'Converted {flags.FLAGS.source} into {flags.FLAGS.workdir}. Sample with:')
  print(f'  python main.py --config={config_path} --mode=sample --workdir={flags.FLAGS.workdir}')


if __name__ == '__main__':
  # Defined only when run as a program, so that importing this library next to main.py, which
  # also defines --config and --workdir, cannot clash.
  config_flags.DEFINE_config_file(
    'config', None, 'Project config file; optional for diffusers weights (see `convert`).'
  )
  flags.DEFINE_string(
    'source', None, 'Hub model repo id, diffusers folder, or TF checkpoint prefix or directory.'
  )
  flags.DEFINE_enum('format', 'diffusers', ['diffusers', 'tf'], 'Format of --source.')
  flags.DEFINE_string('revision', None, 'Hub only: branch, tag or commit hash (default: main).')
  flags.DEFINE_string('workdir', None, 'Output directory; the checkpoint goes to checkpoints/.')
  flags.DEFINE_integer('step', None, 'Checkpoint step; default N of model.ckpt-N, else 0.')
  flags.DEFINE_bool('use_ema', True, 'TF only: EMA weights, or the raw ones with --nouse_ema.')
  flags.mark_flags_as_required(['source', 'workdir'])
  app.run(main)

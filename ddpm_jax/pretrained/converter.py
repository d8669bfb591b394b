"""`convert`: official weights into a checkpoint, checked against the project config they will be
used with; without one, the shipped config in configs/ that fits them, or a config written for
them."""

import copy
import glob
import importlib.util
import os
import re
from collections.abc import Mapping
from typing import Any

import ml_collections
from absl import logging

from ddpm_jax import checkpoints, models
from ddpm_jax import diffusion as diffusion_lib
from ddpm_jax.pretrained import architecture, diffusers, hub, scheduler, tf_checkpoint

# The folder of the shipped configs, relative to the working directory: the repository root,
# where main.py runs with the path that `convert` returns.
SHIPPED_CONFIGS_DIR = 'configs'
# How the Hub repo ids of the published weights name their data (google/ddpm-celebahq-256,
# google/ddpm-church-256, ...), by the `data.dataset` of the shipped configs they fit; other
# datasets by their own name (google/ddpm-cifar10-32).
_HUB_DATA_NAMES = {
  'celeb_a_hq/256': 'celebahq',
  'lsun/church_outdoor': 'church',
  'lsun/bedroom': 'bedroom',
  'lsun/cat': 'cat',
}


def load_shipped_configs() -> dict[str, ml_collections.ConfigDict]:
  """{name: config} of the dataset configs in configs/ (configs/cifar10.py -> 'cifar10'), by
  name; the bases that they build on (default.py, default256.py) are left out.

  Each file is read by its path, as main.py's --config reads one; the files import their bases
  from configs/ (`from configs import default`), so the repository root is on sys.path, as it is
  for main.py and `python -m ddpm_jax.pretrained` run there.
  """
  paths = sorted(
    path
    for path in glob.glob(os.path.join(SHIPPED_CONFIGS_DIR, '*.py'))
    if not os.path.basename(path).startswith(('_', 'default'))
  )
  if not paths:
    raise FileNotFoundError(
      f'No config files in {SHIPPED_CONFIGS_DIR}/ of the working directory: run in the '
      'repository root, or pass --config, the config these weights were trained with.'
    )
  return {os.path.splitext(os.path.basename(path))[0]: _load_config_file(path) for path in paths}


def _load_config_file(path: str) -> ml_collections.ConfigDict:
  """`get_config()` of a config file, read by its path as main.py's --config reads one."""
  name = os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(f'config_file_{name}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def shipped_config(
  model_config: ml_collections.ConfigDict,
  source: str,
  shipped: Mapping[str, ml_collections.ConfigDict],
  diffusion: Mapping[str, Any] | None = None,
) -> str | None:
  """The name of the shipped config (`load_shipped_configs`) whose U-Net and images are those of
  `model_config` and whose diffusion has the fields of `diffusion` (the scheduler's,
  `scheduler.diffusion_from_scheduler`; None: any); of several, the first whose data the source's
  name names. None when none fits."""
  fits = []
  for name, config in shipped.items():
    try:
      architecture.check_weights_match_config(model_config, config)
    except ValueError:
      continue
    if not scheduler.diffusion_mismatches(diffusion or {}, config):
      fits.append(name)
  basename = os.path.basename(source.rstrip('/'))
  datasets = {name: shipped[name].data.dataset for name in fits}
  named = [name for name in fits if _HUB_DATA_NAMES.get(datasets[name], datasets[name]) in basename]
  return (named or fits or [None])[0]


def derived_config(
  model_config: ml_collections.ConfigDict,
  source: str,
  shipped: Mapping[str, ml_collections.ConfigDict],
  diffusion: Mapping[str, Any] | None = None,
) -> str:
  """The text of a config file for weights that no shipped config fits: a shipped config
  (`load_shipped_configs`) with the U-Net of `model_config` and the diffusion fields of
  `diffusion` (the scheduler's; None: the base's), and improved DDPM's hybrid loss for a learned
  variance where the base's is mse. The base is the first shipped config with that U-Net
  (`shipped_config` without the diffusion), else the first of the same image size and channels.

  Raises:
    ValueError: when no shipped config has those images, or the variance is learned and no
      scheduler says how (`model_var_type`).
  """
  image_size, num_channels = model_config.data.image_size, model_config.data.num_channels
  diffusion = dict(diffusion or {})
  # The shipped configs with this diffusion: their U-Nets with its variance (output channels).
  rediffused = {name: copy.deepcopy(config) for name, config in shipped.items()}
  for config in rediffused.values():
    config.diffusion.update(diffusion)
  bases = [shipped_config(model_config, source, rediffused)] + [
    name
    for name, config in shipped.items()
    if (config.data.image_size, config.data.num_channels) == (image_size, num_channels)
  ]
  bases = [name for name in bases if name is not None]
  out_ch = models.create_model(model_config).out_ch
  if not bases or (out_ch != num_channels and 'model_var_type' not in diffusion):
    raise ValueError(
      f'No config in configs/ is for {image_size}x{image_size}x{num_channels} images and '
      f'{out_ch} output channels: pass --config, the config these weights were trained with.'
    )
  values = {name: model_config.model[name] for name in architecture.ARCH_FIELDS if name != 'out_ch'}
  values = {k: tuple(v) if isinstance(v, list | tuple) else v for k, v in values.items()}
  lines = [f'  config.model.{name} = {value!r}' for name, value in values.items()]
  lines += [f'  config.diffusion.{name} = {value!r}' for name, value in diffusion.items()]
  learned = diffusion.get('model_var_type') in diffusion_lib.LEARNED_VAR_TYPES
  if learned and shipped[bases[0]].diffusion.loss_type == 'mse':
    # The mse loss cannot train a variance; a scheduler names no loss.
    lines.append("  config.diffusion.loss_type = 'hybrid'  # Improved DDPM's, for the variance.")
  scheduler_part = ' and the diffusion of its scheduler config' if diffusion else ''
  return (
    f'"""The config of the weights converted from {source} by ddpm_jax.pretrained:\n'
    f'configs/{bases[0]}.py with the U-Net of their config.json{scheduler_part}."""\n\n'
    f'from configs import {bases[0]}\n\n\n'
    'def get_config():\n'
    f'  config = {bases[0]}.get_config()\n' + '\n'.join(lines) + '\n  return config\n'
  )


def _check_variance_fits_unet(
  diffusion: Mapping[str, Any], model_config: ml_collections.ConfigDict
) -> None:
  """Raises a ValueError when the scheduler's variance type is learned and the U-Net outputs no
  variance, or the other way round."""
  if 'model_var_type' not in diffusion:
    return
  learned = diffusion['model_var_type'] in diffusion_lib.LEARNED_VAR_TYPES
  if learned != (model_config.diffusion.model_var_type in diffusion_lib.LEARNED_VAR_TYPES):
    out_ch = models.create_model(model_config).out_ch
    raise ValueError(
      f"The scheduler's variance (diffusion.model_var_type = {diffusion['model_var_type']!r}) "
      f'does not fit the U-Net, which outputs {out_ch} channels for '
      f'{model_config.data.num_channels}-channel images.'
    )


def default_step(source: str, source_format: str) -> int:
  """The training step of the weights: N from a TF `model.ckpt-N` prefix, else 0."""
  if source_format == 'tf':
    prefix, _ = tf_checkpoint.load_tf_checkpoint(source)
    match = re.search(r'model\.ckpt-(\d+)$', prefix)
    if match:
      return int(match.group(1))
  return 0


def convert(
  config: ml_collections.ConfigDict | None,
  *,
  source: str,
  source_format: str = 'diffusers',
  workdir: str,
  step: int | None = None,
  use_ema: bool = True,
  revision: str | None = None,
) -> str | None:
  """Imports official weights, checks them against `config`, and saves a checkpoint in workdir.

  Args:
    config: the project config the weights will be used with; None (diffusers weights only):
      the shipped config in configs/ that fits their config.json and their scheduler config
      (`shipped_config`), else a config written to `<workdir>/config.py` (`derived_config`).
      Diffusers weights with a scheduler config (`scheduler.load_scheduler`) set the diffusion:
      a `config` whose diffusion differs is refused (`check_diffusion_matches_config`), as is a
      scheduler that ddpm-jax cannot sample as diffusers would.
    source: a diffusers folder, a Hub model repo id ('google/ddpm-cifar10-32', fetched with
      `fetch_from_hub`), or a TF checkpoint prefix/directory.
    source_format: 'diffusers' or 'tf'.
    workdir: where `checkpoints.save_imported` writes (workdir/checkpoints).
    step: checkpoint step; None means `default_step(source, source_format)`.
    use_ema: TF only: take the EMA copies (default) or the raw weights.
    revision: Hub only: a branch, tag or commit hash to pin (default: main).

  Returns:
    Without `config`, the path of the config to sample with; else None. That config is also
    written as `<workdir>/config.json` (`checkpoints.write_config`). Nothing is written when an
    error is raised.
  """
  config_path, config_text = None, None
  if source_format == 'diffusers':
    folder = hub.fetch_from_hub(source, revision) if hub.is_hub_id(source) else source
    model_config, params = diffusers.load_diffusers_model(folder)
    diffusion = scheduler.load_scheduler(folder)
    if diffusion is None:
      logging.warning(
        'No scheduler config in %s (%s): the diffusion is that of the project config.',
        source,
        ' or '.join(scheduler.SCHEDULER_FILES),
      )
    else:
      _check_variance_fits_unet(diffusion, model_config)
    if config is None:
      shipped = load_shipped_configs()
      name = shipped_config(model_config, source, shipped, diffusion)
      if name is None:
        config_text = derived_config(model_config, source, shipped, diffusion)
        config_path = os.path.join(workdir, 'config.py')
      else:
        config, config_path = shipped[name], os.path.join(SHIPPED_CONFIGS_DIR, f'{name}.py')
    if config is not None:
      architecture.check_weights_match_config(model_config, config)
      scheduler.check_diffusion_matches_config(diffusion or {}, config)
  elif config is None:
    raise ValueError('TF checkpoints carry no model config: pass --config.')
  elif source_format == 'tf':
    model_config = tf_checkpoint.model_config_from_tf_checkpoint(
      source, image_size=config.data.image_size, use_ema=use_ema
    )
    # Before the import, whose errors are less direct.
    architecture.check_weights_match_config(model_config, config)
    params = tf_checkpoint.params_from_tf_checkpoint(source, model_config, use_ema=use_ema)
  else:
    raise ValueError(f'Unknown format {source_format!r}; expected diffusers or tf')
  if step is None:
    step = default_step(source, source_format)
  checkpoints.save_imported(workdir, params=params, step=step)
  if config_text is not None:
    with open(config_path, 'w') as f:
      f.write(config_text)
    config = _load_config_file(config_path)
  # The config to sample with, also as the record that the export to diffusers reads.
  checkpoints.write_config(workdir, config)
  return config_path

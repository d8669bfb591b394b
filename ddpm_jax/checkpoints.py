"""Orbax checkpoints in `<workdir>/checkpoints`: one step directory per save; and the run's config
beside them, `<workdir>/config.json` (`write_config`, `read_config`).

Each checkpoint holds the items `params`, `ema_params`, `opt_state` (training runs only; an
imported official model has none) and `meta` (JSON: the step, the seed and the number of
training examples consumed, which fix the random draws and the data position on resume).
Saving is asynchronous; restoring falls back to an older step, with a warning, when the latest
cannot be read.
"""

from __future__ import annotations

import json
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from ddpm_jax import tensors

ITEMS = ('params', 'ema_params', 'opt_state', 'meta')
# The config of the run whose checkpoints a workdir holds: written by training and by the
# converter of official weights, read by the export to diffusers.
CONFIG_FILE = 'config.json'


def checkpoint_dir(workdir: str) -> epath.Path:
  return epath.Path(workdir) / 'checkpoints'


def create_manager(
  workdir: str, *, max_to_keep: int | None = None, async_save: bool = True
) -> ocp.CheckpointManager:
  """A CheckpointManager for `<workdir>/checkpoints` keeping the last `max_to_keep` steps."""
  return _manager(checkpoint_dir(workdir), max_to_keep=max_to_keep, async_save=async_save)


def _manager(directory: epath.Path, *, max_to_keep=None, async_save=True) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
    max_to_keep=max_to_keep,
    enable_async_checkpointing=async_save,
    create=True,
  )
  return ocp.CheckpointManager(directory, options=options, item_names=ITEMS)


def save(
  manager: ocp.CheckpointManager,
  step: int,
  *,
  params: Any,
  ema_params: Any,
  opt_state: Any | None,
  meta: dict[str, Any],
) -> None:
  """Starts saving a checkpoint at `step` (asynchronously; see `manager.wait_until_finished`).

  A checkpoint already at `step` can only be one that `restore` skipped as unreadable (a run
  never saves a step twice otherwise); it is replaced.
  """
  if step in manager.all_steps():
    logging.warning('Replacing the unreadable checkpoint at step %d.', step)
    manager.wait_until_finished()
    manager.delete(step)
  items = dict(
    params=ocp.args.StandardSave(params),
    ema_params=ocp.args.StandardSave(ema_params),
    meta=ocp.args.JsonSave(dict(meta, step=int(step))),
  )
  if opt_state is not None:
    items['opt_state'] = ocp.args.StandardSave(opt_state)
  manager.save(step, args=ocp.args.Composite(**items), force=True)


def save_imported(workdir: str, *, params: Any, step: int) -> str:
  """Writes imported weights as the params and EMA params of a checkpoint at `step`.

  Sampling and evaluation then read the workdir as if it had been trained here. Returns the
  checkpoint's directory.
  """
  manager = create_manager(workdir, async_save=False)
  if step in manager.all_steps():
    raise FileExistsError(f'{checkpoint_dir(workdir)} already has a checkpoint at step {step}.')
  save(manager, step, params=params, ema_params=params, opt_state=None, meta={'imported': True})
  manager.wait_until_finished()
  manager.close()
  return str(checkpoint_dir(workdir) / str(step))


def restore(
  manager: ocp.CheckpointManager,
  abstract_items: dict[str, Any],
  *,
  step: int | None = None,
) -> tuple[int, dict[str, Any]] | None:
  """Restores `abstract_items` (item name -> abstract pytree, e.g. of jax.ShapeDtypeStruct
  with shardings) from `step`, or from the newest readable step when `step` is None.

  Returns (step, items with `meta`), or None when there is no checkpoint at all. A step that
  cannot be read is skipped with a warning in favour of the one before it; if none can be read,
  raises RuntimeError: a run never starts afresh over checkpoints it could not load.
  """
  steps = manager.all_steps()
  if step is not None:
    if step not in steps:
      raise FileNotFoundError(
        f'No checkpoint at step {step} in {manager.directory}; available: {sorted(steps)}.'
      )
    candidates = [step]
  else:
    candidates = sorted(steps, reverse=True)
  if not candidates:
    return None
  args = {name: ocp.args.StandardRestore(tree) for name, tree in abstract_items.items()}
  args['meta'] = ocp.args.JsonRestore()
  errors = []
  for candidate in candidates:
    try:
      items = manager.restore(candidate, args=ocp.args.Composite(**args))
    except Exception as e:  # noqa: BLE001 - any unreadable checkpoint falls back to an older one.
      logging.warning('Could not read the checkpoint at step %d: %s', candidate, e)
      errors.append(f'step {candidate}: {type(e).__name__}: {e}')
      continue
    return candidate, dict(items)
  raise RuntimeError(
    f'None of the checkpoints in {manager.directory} could be read:\n' + '\n'.join(errors)
  )


def check_architecture(step_dir: epath.Path, abstract_params: Any) -> None:
  """Raises ValueError when the EMA params stored in `step_dir` do not fit `abstract_params`.

  Lists the parameters missing, unexpected or shaped differently, e.g. for a workdir trained or
  converted with another config. Does nothing when the metadata cannot be read: restoring then
  falls back to an older checkpoint, or says why none can be read.
  """
  try:
    stored = ocp.StandardCheckpointHandler().metadata(step_dir / 'ema_params')
  except (OSError, ValueError):
    return
  tensors.check_tensors(
    tensors.flat_shapes(abstract_params),
    tensors.flat_shapes(stored),
    what=f'The checkpoint {step_dir}',
    hint='It does not fit the U-Net of this config: use the config it was trained or converted '
    'with.',
  )


def restore_ema_params(
  workdir: str, abstract_params: Any, *, step: int | None = None
) -> tuple[int, Any]:
  """The EMA params of the checkpoint at `step` (default: latest) of a trained or imported
  workdir, shaped and sharded like `abstract_params`.

  Raises FileNotFoundError, writing nothing, when the workdir has no checkpoint (or none at
  `step`); ValueError when the checkpoint does not fit `abstract_params` (`check_architecture`).
  """
  directory = checkpoint_dir(workdir)
  steps = (
    [int(p.name) for p in directory.iterdir() if p.name.isdigit()] if directory.is_dir() else []
  )
  if not steps:
    raise FileNotFoundError(
      f'No checkpoint in {directory}: train first (--mode=train) or convert official weights '
      'with `python -m ddpm_jax.pretrained` (README.md, "Sample").'
    )
  check_architecture(directory / str(max(steps) if step is None else step), abstract_params)
  manager = create_manager(workdir, async_save=False)
  restored = restore(manager, {'ema_params': abstract_params}, step=step)
  manager.close()
  step, items = restored
  return step, items['ema_params']


def step_directory(path: str) -> epath.Path:
  """The checkpoint that `path` names: a workdir or its `checkpoints` directory (their latest
  step), or one step's directory. Raises FileNotFoundError when there is none."""
  base = epath.Path(path)
  for directory in (base / 'checkpoints', base):
    if directory.is_dir():
      steps = [int(p.name) for p in directory.iterdir() if p.name.isdigit()]
      if steps:
        return directory / str(max(steps))
  if (base / 'ema_params').is_dir() and base.name.isdigit():
    return base
  raise FileNotFoundError(
    f'No checkpoint at {path}: expected a workdir, its checkpoints directory or a checkpoint '
    'step directory (<workdir>/checkpoints/<step>).'
  )


def restore_weights(
  path: str, abstract_params: Any, abstract_ema_params: Any = None
) -> tuple[epath.Path, Any, Any]:
  """(step directory, params, EMA params) of the checkpoint `path` names (`step_directory`),
  shaped and sharded like `abstract_params` (the EMA params like `abstract_ema_params` where
  given: a train state splits them): where `training.init_from` starts a run, and what
  `python -m ddpm_jax.export` writes out. Raises ValueError when the checkpoint does not fit
  `abstract_params`."""
  step_dir = step_directory(path)
  check_architecture(step_dir, abstract_params)
  manager = _manager(step_dir.parent, async_save=False)
  ema = abstract_params if abstract_ema_params is None else abstract_ema_params
  abstract_items = {'params': abstract_params, 'ema_params': ema}
  _, items = restore(manager, abstract_items, step=int(step_dir.name))
  manager.close()
  return step_dir, items['params'], items['ema_params']


def is_imported(step_dir: epath.Path) -> bool:
  """Whether a checkpoint holds imported weights (no optimizer state to resume from)."""
  return not (step_dir / 'opt_state').exists()


def abstract_like(tree: Any, sharding: Any = None) -> Any:
  """jax.ShapeDtypeStruct twins of the arrays of `tree`, optionally with `sharding`: one for all,
  or a tree like `tree`'s (a train state's, `train.state_sharding`)."""
  if sharding is None or isinstance(sharding, jax.sharding.Sharding):
    sharding = jax.tree.map(lambda _: sharding, tree)
  twin = lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
  return jax.tree.map(twin, tree, sharding)


def write_config(workdir: epath.PathLike, config: ml_collections.ConfigDict) -> None:
  """Writes `<workdir>/config.json`, the config as JSON (`to_json_best_effort`), on process 0; a
  config written earlier, e.g. by the run that this one resumes, is replaced."""
  if jax.process_index() == 0:
    path = epath.Path(workdir) / CONFIG_FILE
    path.write_text(config.to_json_best_effort(indent=2) + '\n')


def read_config(workdir: epath.PathLike) -> ml_collections.ConfigDict | None:
  """The config that `write_config` wrote in `workdir`, its lists as the tuples that the config
  files write (`ch_mult`, `attn_resolutions`, ...); None where there is none (a workdir written
  before runs recorded their config)."""
  path = epath.Path(workdir) / CONFIG_FILE
  if not path.exists():
    return None
  return ml_collections.ConfigDict(_as_tuples(json.loads(path.read_text())))


def _as_tuples(value: Any) -> Any:
  """JSON values with every list made a tuple, in nested dicts too."""
  if isinstance(value, dict):
    return {key: _as_tuples(item) for key, item in value.items()}
  if isinstance(value, list):
    return tuple(_as_tuples(item) for item in value)
  return value

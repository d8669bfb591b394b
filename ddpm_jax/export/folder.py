"""`export`: the checkpoint of a workdir as a diffusers `DDPMPipeline` folder, with its model
card, and optionally pushed to the Hugging Face Hub."""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from typing import Any

import jax
import ml_collections
from etils import epath

from ddpm_jax import checkpoints, conditioning, models
from ddpm_jax.export import hub, model_card
from ddpm_jax.pretrained import diffusers
from ddpm_jax.pretrained import scheduler as scheduler_lib

PARAMS = ('ema', 'raw')
# The folder's files beside unet/ and scheduler/, read by DDPMPipeline.from_pretrained.
MODEL_INDEX = {
  '_class_name': 'DDPMPipeline',
  'scheduler': ['diffusers', 'DDPMScheduler'],
  'unet': ['diffusers', 'UNet2DModel'],
}
SAMPLES_FILE = 'samples.png'


def run_config(
  workdir: str, config: ml_collections.ConfigDict | None = None
) -> ml_collections.ConfigDict:
  """`config` if given, else the one the run recorded, `<workdir>/config.json`
  (`checkpoints.read_config`); raises FileNotFoundError saying to pass --config when there is
  none."""
  if config is not None:
    return config
  config = checkpoints.read_config(workdir)
  if config is None:
    raise FileNotFoundError(
      f'{epath.Path(workdir) / checkpoints.CONFIG_FILE} not found: pass '
      '--config=path/to/config.py, the config the run was trained (or its weights converted) '
      'with. Runs record it there since ddpm-jax writes it; older workdirs do not have it.'
    )
  return config


def export(
  workdir: str,
  out: str,
  *,
  config: ml_collections.ConfigDict | None = None,
  checkpoint_step: int | None = None,
  params: str = 'ema',
  push_to_hub: str | None = None,
  private: bool = False,
  command: str | None = None,
  api: Any = None,
) -> str:
  """Writes the checkpoint of a trained or imported workdir as a `DDPMPipeline` folder.

  The folder `out` holds `model_index.json`, `unet/` (`config.json`,
  `diffusion_pytorch_model.safetensors`: `diffusers.save_diffusers_model`), `scheduler/`
  (`scheduler_config.json`: `scheduler.scheduler_config`), `README.md` (the model card) and,
  when the run wrote one, `samples.png` (the latest training grid up to that step).

  Args:
    workdir: the run's workdir (or a workdir of converted official weights).
    out: the folder to write; it must not exist or be empty.
    config: the run's config; None: `<workdir>/config.json` (`run_config`).
    checkpoint_step: the checkpoint to export; None: the latest.
    params: 'ema' (the EMA parameters, which the samples and evaluations use) or 'raw'.
    push_to_hub: 'ORG/NAME': then upload the folder to that model repo (`hub.push_to_hub`).
    private: with push_to_hub, create the repo private.
    command: the command line, for the model card.
    api: with push_to_hub, a `huggingface_hub.HfApi` (default: one with the token).

  Returns:
    `out`.

  Raises:
    ValueError: before anything is written, for a model that diffusers cannot represent (an
      xprev network, a learned log-variance, resampling without convolutions) or bad arguments;
    FileNotFoundError: no config, no checkpoint (at that step); PermissionError: no Hub token
      (checked first); and the Hub's refusals (`hub.push_to_hub`), after the folder is written.
  """
  if params not in PARAMS:
    raise ValueError(f'--params must be one of {PARAMS}, got {params!r}.')
  token = None
  if push_to_hub:  # First: a missing token should not wait for the export.
    hub.check_repo_id(push_to_hub)
    token = hub.hub_token()
  if os.path.isdir(out) and os.listdir(out):
    raise FileExistsError(f'{out} exists and is not empty: remove it, or choose another --out.')
  config = run_config(workdir, config)
  # Everything diffusers cannot represent is refused here, before the checkpoint is read.
  scheduler_config = scheduler_lib.scheduler_config(config.diffusion)
  diffusers.diffusers_config(config)

  step_dir = _step_dir(workdir, checkpoint_step)
  model = models.create_model(config)
  abstract = checkpoints.abstract_like(
    models.param_shapes(model, config.data.image_size, config.data.num_channels)
  )
  _, raw, ema = checkpoints.restore_weights(str(step_dir), abstract)
  weights = jax.device_get(ema if params == 'ema' else raw)
  step = int(step_dir.name)
  samples = _latest_samples(workdir, step)
  facts = model_card.CardFacts(
    step=step,
    params=params,
    imported=checkpoints.is_imported(step_dir),
    repo=push_to_hub or os.path.abspath(out),
    command=command or f'python -m ddpm_jax.export --workdir={workdir} --out={out}',
    results=_eval_results(workdir, step),
    samples=None if samples is None else (SAMPLES_FILE, samples[1]),
    class_names=conditioning.read_class_names(workdir),
  )
  card = model_card.model_card(config, facts)

  # Written next to `out` and renamed into place: an error leaves no partial folder.
  parent = os.path.dirname(os.path.abspath(out))
  os.makedirs(parent, exist_ok=True)
  staging = tempfile.mkdtemp(prefix=f'.{os.path.basename(os.path.abspath(out))}.', dir=parent)
  try:
    diffusers.save_diffusers_model(os.path.join(staging, 'unet'), config, weights)
    _write_json(os.path.join(staging, 'scheduler', 'scheduler_config.json'), scheduler_config)
    _write_json(os.path.join(staging, 'model_index.json'), MODEL_INDEX)
    with open(os.path.join(staging, 'README.md'), 'w') as f:
      f.write(card)
    if samples is not None:
      with open(os.path.join(staging, SAMPLES_FILE), 'wb') as f:
        f.write(samples[0].read_bytes())
    if os.path.isdir(out):
      os.rmdir(out)  # Empty.
    os.replace(staging, out)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise
  if push_to_hub:
    hub.push_to_hub(out, push_to_hub, private=private, token=token, api=api)
  return out


def _step_dir(workdir: str, step: int | None) -> epath.Path:
  """The checkpoint directory of `step` (None: the latest) in the workdir; FileNotFoundError,
  listing the steps there are, when there is none."""
  directory = checkpoints.checkpoint_dir(workdir)
  steps = (
    sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())
    if directory.is_dir()
    else []
  )
  if not steps:
    raise FileNotFoundError(
      f'No checkpoint in {directory}: train first (--mode=train) or convert official weights '
      'with `python -m ddpm_jax.pretrained`.'
    )
  if step is not None and step not in steps:
    raise FileNotFoundError(f'No checkpoint at step {step} in {directory}; there are {steps}.')
  return directory / str(steps[-1] if step is None else step)


def _eval_results(workdir: str, step: int) -> dict[str, Any] | None:
  """`<workdir>/eval/step_<step>/results.json` of `--mode=eval`, or None."""
  path = epath.Path(workdir) / 'eval' / f'step_{step}' / 'results.json'
  return json.loads(path.read_text()) if path.exists() else None


def _latest_samples(workdir: str, step: int) -> tuple[epath.Path, int] | None:
  """(path, its step) of the latest training grid `<workdir>/samples/step_<N>.png` with N <=
  `step`, or None."""
  directory = epath.Path(workdir) / 'samples'
  if not directory.is_dir():
    return None
  grids = {}
  for path in directory.iterdir():
    match = re.fullmatch(r'step_(\d+)\.png', path.name)
    if match and int(match.group(1)) <= step:
      grids[int(match.group(1))] = path
  return (grids[max(grids)], max(grids)) if grids else None


def _write_json(path: str, value: dict[str, Any]) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'w') as f:
    json.dump(value, f, indent=2)
    f.write('\n')

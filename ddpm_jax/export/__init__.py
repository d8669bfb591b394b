r"""A model trained (or imported) with ddpm-jax as a diffusers `DDPMPipeline` folder, and on the
Hugging Face Hub: the way back of `ddpm_jax.pretrained`.

From a workdir, e.g. the digits run of the README:

  python -m ddpm_jax.export --workdir=/tmp/ddpm_digits --out=/tmp/ddpm_digits_diffusers
  python -m ddpm_jax.export --workdir=/tmp/ddpm_digits --out=/tmp/ddpm_digits_diffusers \
    --push_to_hub=ORG/NAME --private

writes the EMA parameters of the latest checkpoint (`--checkpoint_step=N` for another,
`--params=raw` for the raw training parameters) as a folder that
`diffusers.DDPMPipeline.from_pretrained` loads: `model_index.json`; `unet/` with `config.json`
and `diffusion_pytorch_model.safetensors` (a `UNet2DModel`, torch layouts and names, written
through the importer's own tables, `pretrained.diffusers`); `scheduler/scheduler_config.json`
(a `DDPMScheduler` of the run's diffusion, `pretrained.scheduler`); `README.md`, a model card
(`model_card`); and the latest training sample grid, `samples.png`. `--push_to_hub` then uploads
it to that model repo (`hub`).

The run's config is `<workdir>/config.json`, which training and the converter of official
weights write; `--config=path/to/config.py` overrides it, or stands in for it in workdirs made
before it was written. What diffusers cannot sample as ddpm-jax does is refused before anything
is written: an xprev network, a learned log-variance (`learned`; `learned_range` is exported), a
U-Net that resamples without convolutions. A class-conditional U-Net is exported with its class
embedding (`num_class_embeds` = K + 1, the last row the null label); `DDPMPipeline` loads it but
passes no labels, so the model card shows a sampling loop that does.
"""

from ddpm_jax.export.folder import MODEL_INDEX, PARAMS, export, run_config
from ddpm_jax.export.hub import check_repo_id, hub_token, push_to_hub
from ddpm_jax.export.model_card import CardFacts, model_card
from ddpm_jax.pretrained.scheduler import (
  BETA_SCHEDULES,
  PREDICTION_TYPES,
  VARIANCE_TYPES,
  scheduler_config,
)

__all__ = [
  'BETA_SCHEDULES',
  'MODEL_INDEX',
  'PARAMS',
  'PREDICTION_TYPES',
  'VARIANCE_TYPES',
  'CardFacts',
  'check_repo_id',
  'export',
  'hub_token',
  'model_card',
  'push_to_hub',
  'run_config',
  'scheduler_config',
]

r"""The official DDPM weights as parameters of our U-Net, and a command-line converter.

Two published forms of the same weights (REFERENCE.md, "Official weights") are read:
- the diffusers ports on the Hugging Face Hub (`google/ddpm-cifar10-32`, `google/ddpm-church-256`,
  ...): a folder with `config.json` and `diffusion_pytorch_model.safetensors`, or the Hub repo
  itself, downloaded into the Hugging Face cache (`fetch_from_hub`);
- the original TensorFlow checkpoints (`model.ckpt-790000` for CIFAR10), whose variable names our
  parameter tree mirrors; the EMA copies are taken by default.

From the Hub (the config comes from the model's config.json and its scheduler config: the
shipped config that fits both is named, or one is written to <workdir>/config.py), e.g.:

  python -m ddpm_jax.pretrained --source=google/ddpm-cifar10-32 \
    --workdir=/tmp/ddpm_cifar10_official

or, with the original checkpoint files (`model.ckpt-790000.{index,data-*}`, linked from the
README of github.com/hojonathanho/diffusion) in /tmp/ddpm_tf:

  python -m ddpm_jax.pretrained --config=configs/cifar10.py --format=tf \
    --source=/tmp/ddpm_tf/model.ckpt-790000 --workdir=/tmp/ddpm_cifar10_official

The converter checks the weights' architecture against the config and writes them as both the
parameters and the EMA parameters of a checkpoint in `workdir/checkpoints`, at the step parsed from
`model.ckpt-N` (else 0, or --step), and the config as `workdir/config.json`, which
`python -m ddpm_jax.export` (the way back, to a diffusers folder) reads. From TF checkpoints it
takes the EMA weights, which the paper samples from; --nouse_ema takes the raw training weights
instead.

A class-conditional diffusers UNet2DModel (`num_class_embeds` = N, `class_embed_type` null) is
imported as a U-Net with `model.num_classes` = N - 1, its last embedding row read as the null label
(`diffusers`); the original TF checkpoints are all unconditional.

Imports are strict: every parameter of our tree must come from exactly one tensor of the expected
shape, and every model tensor in the source must be used; anything else raises a ValueError that
names the tensors.

A diffusers folder's scheduler config (`scheduler/scheduler_config.json`, or
`scheduler_config.json` beside the U-Net's config.json) sets the diffusion: the beta schedule
and number of timesteps, the prediction type and the variance (`scheduler`, which also writes it
for the export); what ddpm-jax cannot sample as diffusers would is refused, naming the key. A
folder without one takes the diffusion of the config, as the log says.

Each importer describes the weights' U-Net as a project config does (the `model` section, the
`data` image shape and `diffusion.model_var_type`), which `models.create_model` builds:
`architecture` (that description, the parameter shapes, the strict assembly, the check against a
config), `diffusers`, `scheduler`, `tf_checkpoint`, `hub` (the Hugging Face Hub), `converter`
(`convert`) and `__main__` (the command line).
"""

from ddpm_jax.pretrained.architecture import check_weights_match_config, flat_param_shapes
from ddpm_jax.pretrained.converter import (
  SHIPPED_CONFIGS_DIR,
  convert,
  default_step,
  derived_config,
  load_shipped_configs,
  shipped_config,
)
from ddpm_jax.pretrained.diffusers import (
  diffusers_config,
  load_diffusers_model,
  model_config_from_diffusers,
  params_from_diffusers,
  save_diffusers_model,
  state_dict_from_params,
)
from ddpm_jax.pretrained.hub import fetch_from_hub, is_hub_id
from ddpm_jax.pretrained.scheduler import (
  check_diffusion_matches_config,
  diffusion_from_scheduler,
  load_scheduler,
  scheduler_config,
)
from ddpm_jax.pretrained.tf_checkpoint import (
  model_config_from_tf_checkpoint,
  params_from_tf_checkpoint,
)

__all__ = [
  'SHIPPED_CONFIGS_DIR',
  'check_diffusion_matches_config',
  'check_weights_match_config',
  'convert',
  'default_step',
  'derived_config',
  'diffusers_config',
  'diffusion_from_scheduler',
  'fetch_from_hub',
  'flat_param_shapes',
  'is_hub_id',
  'load_diffusers_model',
  'load_scheduler',
  'load_shipped_configs',
  'model_config_from_diffusers',
  'model_config_from_tf_checkpoint',
  'params_from_diffusers',
  'params_from_tf_checkpoint',
  'save_diffusers_model',
  'scheduler_config',
  'shipped_config',
  'state_dict_from_params',
]

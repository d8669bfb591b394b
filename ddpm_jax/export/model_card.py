"""The model card of an exported folder, its README.md in the Hugging Face Hub's convention: YAML
front matter (library, tags, a license left for the user), then what the model is, how to use it
with diffusers, its data, its training config and steps, the results of `--mode=eval`, a sample
grid and the command that exported it."""

from __future__ import annotations

import dataclasses
from typing import Any

import ml_collections

from ddpm_jax import evaluation


@dataclasses.dataclass(frozen=True)
class CardFacts:
  """What the card tells beside the config.

  Attributes:
    step: the checkpoint step exported.
    params: 'ema' or 'raw', the parameters exported.
    imported: whether the checkpoint holds imported weights (converted, not trained here).
    repo: what `from_pretrained` is given in the usage snippet: the Hub repo id, else the folder.
    command: the command line that exported the folder.
    results: `<workdir>/eval/step_<step>/results.json`, or None.
    samples: (file name in the folder, step of the grid) of the sample grid, or None.
    class_names: the classes of a class-conditional model in label order, or None.
  """

  step: int
  params: str
  imported: bool
  repo: str
  command: str
  results: dict[str, Any] | None = None
  samples: tuple[str, int] | None = None
  class_names: tuple[str, ...] | None = None


def model_card(config: ml_collections.ConfigDict, facts: CardFacts) -> str:
  """The README.md of the exported folder of the run of `config`."""
  num_classes = config.model.num_classes
  tags = ['pytorch', 'diffusers', 'ddpm', 'ddpm-jax']
  tags.insert(2, 'class-conditional' if num_classes else 'unconditional-image-generation')
  front_matter = [
    '---',
    'library_name: diffusers',
    # The Hub's task for unconditional models; it has none for class-conditional ones.
    *([] if num_classes else ['pipeline_tag: unconditional-image-generation']),
    'tags:',
    *(f'- {tag}' for tag in tags),
    '# license: the license of these weights (and of the data they were trained on), e.g.',
    '# apache-2.0 or other; see https://huggingface.co/docs/hub/repositories-licenses',
    '---',
  ]
  parts = [
    '\n'.join(front_matter),
    _summary(config, facts),
    _usage(config, facts),
    _data(config, facts),
    _training(config, facts),
  ]
  if facts.results is not None:
    parts.append(
      f'## Evaluation\n\n`--mode=eval` of ddpm-jax at step {facts.step} (the EMA parameters; '
      '`results.json`):\n\n```\n' + evaluation.format_table(facts.results) + '\n```'
    )
  if facts.samples is not None:
    name, step = facts.samples
    parts.append(
      f'## Samples\n\n![Samples of the EMA model at step {step}]({name})\n\nSamples of the EMA '
      f'parameters at step {step}, drawn during training with ddpm-jax '
      f"(sampler '{config.sampling.sampler}')."
    )
  parts.append(
    '## How this folder was made\n\nWith ddpm-jax, from the workdir of the run:\n\n'
    f'```bash\n{facts.command}\n```'
  )
  return '\n\n'.join(parts) + '\n'


def _summary(config: ml_collections.ConfigDict, facts: CardFacts) -> str:
  size, channels = config.data.image_size, config.data.num_channels
  weights = (
    f'the EMA parameters (decay {config.training.ema_decay})'
    if facts.params == 'ema'
    else 'the raw training parameters (not the EMA)'
  )
  origin = (
    f'imported weights (converted into ddpm-jax, not trained there), checkpoint step {facts.step}'
    if facts.imported
    else f'trained with ddpm-jax (JAX/Flax) for {facts.step:,} steps'
  )
  num_classes = config.model.num_classes
  kind = f'class-conditional on {num_classes} classes' if num_classes else 'unconditional'
  diffusion = config.diffusion
  return (
    f'# {facts.repo.rstrip("/").rsplit("/", 1)[-1]}\n\n'
    f'A denoising diffusion probabilistic model (DDPM, Ho et al. 2020), {kind}, of '
    f'{size}x{size} images with {_channels(channels)} '
    f'({config.data.dataset}): {origin}; {weights}, as a diffusers `UNet2DModel` and '
    f'`DDPMScheduler`. The network predicts {_MEAN_OUTPUTS[diffusion.model_mean_type]}, with '
    f"variance '{diffusion.model_var_type}', on {diffusion.num_diffusion_timesteps} timesteps "
    f"of the '{diffusion.beta_schedule}' beta schedule."
  )


_MEAN_OUTPUTS = {
  'eps': 'the noise eps',
  'xstart': 'x_0',
  'v': 'v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0',
}


# The usage snippets; they run as written (tests/test_export.py runs them on 2 steps).
_USAGE = """\
from diffusers import DDPMPipeline

pipeline = DDPMPipeline.from_pretrained('{repo}')
# The paper's ancestral sampler: one network call for each of the T steps.
images = pipeline(batch_size=16, num_inference_steps={num_timesteps}).images
"""
_CONDITIONAL_USAGE = """\
import torch
from diffusers import DDPMScheduler, UNet2DModel

unet = UNet2DModel.from_pretrained('{repo}', subfolder='unet').eval()
scheduler = DDPMScheduler.from_pretrained('{repo}', subfolder='scheduler')
scheduler.set_timesteps({num_timesteps})  # The paper's ancestral sampler: all T steps.
labels = torch.arange(16) % {num_classes}  # Every class in turn.
null = torch.full_like(labels, {num_classes})  # The null label: no class.
s = {guidance_scale}  # Guidance: out_u + s (out_c - out_u); 1: none.
c = {channels}  # Image channels; a learned variance is c more outputs, the conditional ones.
x = torch.randn(len(labels), c, {image_size}, {image_size})
with torch.no_grad():
    for t in scheduler.timesteps:
        out = unet(torch.cat([x, x]), t, class_labels=torch.cat([labels, null])).sample
        cond, uncond = out.chunk(2)
        mean = uncond[:, :c] + s * (cond[:, :c] - uncond[:, :c])
        x = scheduler.step(torch.cat([mean, cond[:, c:]], 1), t, x).prev_sample
images = (x / 2 + 0.5).clamp(0, 1)  # [B, C, H, W] in [0, 1].
"""


def _usage(config: ml_collections.ConfigDict, facts: CardFacts) -> str:
  fields = dict(
    repo=facts.repo,
    num_timesteps=config.diffusion.num_diffusion_timesteps,
    num_classes=config.model.num_classes,
    guidance_scale=float(config.sampling.guidance_scale),
    channels=config.data.num_channels,
    image_size=config.data.image_size,
  )
  if not config.model.num_classes:
    return f'## Usage\n\n```python\n{_USAGE.format(**fields)}```'
  num_classes = config.model.num_classes
  return (
    '## Usage\n\n'
    '`DDPMPipeline` loads this folder but passes no class labels to the U-Net, which needs them: '
    f'sample with the U-Net and the scheduler, labels 0..{num_classes - 1} being the classes '
    f'and {num_classes} the null label ("no class") of classifier-free guidance (Ho & Salimans '
    f'2021), here at the scale the run sampled with:\n\n'
    f'```python\n{_CONDITIONAL_USAGE.format(**fields)}```'
  )


def _channels(num_channels: int) -> str:
  return f'{num_channels} channel' + ('s' if num_channels > 1 else '')


def _data(config: ml_collections.ConfigDict, facts: CardFacts) -> str:
  data = config.data
  lines = [
    f'- dataset: {data.dataset}'
    + (f' (the images under {data.image_dir})' if data.image_dir else ''),
    f'- images: {data.image_size}x{data.image_size}, {_channels(data.num_channels)}, scaled to '
    '[-1, 1]' + (', random horizontal flips in training' if data.random_flip else ''),
  ]
  if config.model.num_classes:
    names = facts.class_names
    named = f': {", ".join(f"{k} {name}" for k, name in enumerate(names))}' if names else ''
    lines.append(
      f'- classes: {config.model.num_classes}{named}; label {config.model.num_classes} is the '
      'null label'
    )
  return '## Data\n\n' + '\n'.join(lines)


def _training(config: ml_collections.ConfigDict, facts: CardFacts) -> str:
  training = config.training
  steps = (
    f'The weights were imported at checkpoint step {facts.step}; the config is the one they '
    'were converted with.'
    if facts.imported
    else f'{facts.step:,} training steps (of {training.num_train_steps:,} configured) of batch '
    f'{training.batch_size}.'
  )
  return (
    f'## Training\n\n{steps} The config of the run (ddpm-jax `configs/`, section by section):'
    '\n\n```\n' + _config_lines(config) + '\n```'
  )


def _config_lines(config: ml_collections.ConfigDict) -> str:
  """One line per section of the config, `section: field=value, ...`; top-level values first."""
  values = config.to_dict()
  lines = [f'{key}: {value!r}' for key, value in values.items() if not isinstance(value, dict)]
  for key, value in values.items():
    if isinstance(value, dict):
      lines.append(f'{key}: ' + ', '.join(f'{field}={v!r}' for field, v in value.items()))
  return '\n'.join(lines)

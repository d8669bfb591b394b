"""The diffusers ports of the official weights on the Hugging Face Hub (`google/ddpm-cifar10-32`,
...), downloaded into the Hugging Face cache."""

import os
import re

from ddpm_jax.pretrained import scheduler

# The files of a UNet2DModel, at the top of a repo or in the `unet/` folder of a pipeline, and
# of its scheduler (`scheduler.SCHEDULER_FILES`).
_HUB_PATTERNS = [
  f'{folder}{name}'
  for folder in ('', 'unet/')
  for name in ('config.json', 'diffusion_pytorch_model.safetensors')
] + list(scheduler.SCHEDULER_FILES)


def is_hub_id(source: str) -> bool:
  """Whether `source` names a Hub repo ('org/name') rather than an existing local path."""
  return not os.path.exists(source) and re.fullmatch(r'[\w.-]+/[\w.-]+', source) is not None


def fetch_from_hub(repo_id: str, revision: str | None = None) -> str:
  """The local folder of a Hub model repo's UNet2DModel and scheduler files, downloaded into the
  Hugging Face cache (`HF_HUB_CACHE`) unless already there.

  huggingface_hub resumes interrupted downloads, reads `HF_TOKEN` for private or gated repos and,
  with `HF_HUB_OFFLINE=1`, only the cache. Raises FileNotFoundError with what to do when the repo,
  the revision or the cached copy does not exist.
  """
  import huggingface_hub  # noqa: PLC0415 - only the Hub path needs it.
  from huggingface_hub import errors  # noqa: PLC0415

  where = f'{repo_id} (revision {revision or "main"})'
  try:
    return huggingface_hub.snapshot_download(
      repo_id, revision=revision, allow_patterns=_HUB_PATTERNS
    )
  except errors.RevisionNotFoundError:
    raise FileNotFoundError(f'The Hub repo {repo_id} has no revision {revision!r}.') from None
  except (errors.RepositoryNotFoundError, errors.GatedRepoError):
    raise FileNotFoundError(
      f'No Hub model repo {repo_id} that you can read: check the id (e.g. '
      'google/ddpm-cifar10-32), or set HF_TOKEN for a private or gated repo.'
    ) from None
  except errors.LocalEntryNotFoundError:
    raise FileNotFoundError(
      f'{where} is not in the Hugging Face cache ({huggingface_hub.constants.HF_HUB_CACHE}) and '
      'the Hub cannot be reached (no network, or HF_HUB_OFFLINE=1): download it once with '
      'network access, e.g. with this same command.'
    ) from None

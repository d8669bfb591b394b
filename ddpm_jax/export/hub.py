"""An exported folder onto the Hugging Face Hub: the token, the repo, the upload, and errors that
say what to do."""

from __future__ import annotations

from typing import Any

# What the Hub's refusals mean for a push, by HTTP status.
_REFUSALS = {
  401: 'the Hub did not accept the token (invalid or expired): make a new one with write '
  'access at https://huggingface.co/settings/tokens and set HF_TOKEN to it, or log in again '
  'with `hf auth login`',
  403: 'the token may not write there: use a token with write access (a fine-grained token '
  'needs write permission on that namespace), and a namespace that is yours or an '
  "organization's that you may write to",
  404: 'the namespace does not exist or the token cannot see it: check the ORG/NAME spelling',
  409: 'the Hub reported a conflict (a repo of that name that is not a model repo, or a commit '
  'made meanwhile): choose another name, or push again',
}


def check_repo_id(repo_id: str) -> None:
  """Raises ValueError unless `repo_id` is a Hub repo id, 'ORG/NAME'."""
  from huggingface_hub import errors, utils  # noqa: PLC0415 - only a push needs it.

  try:
    utils.validate_repo_id(repo_id)
  except errors.HFValidationError as error:
    raise ValueError(f'--push_to_hub={repo_id!r} is not a Hub repo id: {error}') from None
  if repo_id.count('/') != 1:
    raise ValueError(f'--push_to_hub={repo_id!r} must be ORG/NAME (or USER/NAME).')


def hub_token() -> str:
  """The token that huggingface_hub resolves by default (`HF_TOKEN`, else the login of
  `hf auth login`); raises PermissionError, saying how to get one, when there is none."""
  import huggingface_hub  # noqa: PLC0415

  token = huggingface_hub.get_token()
  if not token:
    raise PermissionError(
      'Pushing to the Hugging Face Hub needs a token with write access, and none is set: set '
      'HF_TOKEN to one (https://huggingface.co/settings/tokens) or log in with `hf auth login`.'
    )
  return token


def push_to_hub(folder: str, repo_id: str, *, private: bool, token: str, api: Any = None) -> str:
  """Creates the model repo `repo_id` unless it exists and uploads `folder` to it, in one commit.

  Args:
    folder: the exported folder.
    repo_id: 'ORG/NAME'.
    private: make a new repo private; else the namespace's default visibility (public unless the
      organization defaults to private). An existing repo keeps its visibility.
    token: `hub_token()`.
    api: a `huggingface_hub.HfApi` (default: one with `token`).

  Returns:
    The repo's URL.

  Raises:
    PermissionError (HTTP 401, 403) or RuntimeError (other refusals) naming the repo and what to
    do, from huggingface_hub's HfHubHTTPError.
  """
  import huggingface_hub  # noqa: PLC0415
  from huggingface_hub import errors  # noqa: PLC0415

  api = api or huggingface_hub.HfApi(token=token)
  try:
    url = api.create_repo(repo_id, private=True if private else None, exist_ok=True)
    api.upload_folder(
      repo_id=repo_id,
      folder_path=folder,
      commit_message='Upload a DDPM exported by ddpm-jax',
    )
  except errors.HfHubHTTPError as error:
    status = getattr(error.response, 'status_code', None)
    what = _REFUSALS.get(status, 'see what the Hub said, below')
    kind = PermissionError if status in (401, 403) else RuntimeError
    raise kind(
      f'The Hub refused to create or write the model repo {repo_id} (HTTP {status}): {what}. '
      f'The exported folder {folder} is complete: once that is fixed, upload it with '
      f'`hf upload {repo_id} {folder}`. The Hub said: {error}'
    ) from error
  return str(url)

"""Which tensors a set of weights holds: flat names and shapes, and the one strict check of them.

Every place that reads weights made elsewhere (a checkpoint, the official DDPM weights, the FID
Inception weights) compares the tensors it expects with those it found through `check_tensors`,
so that a mismatch is reported the same way: every missing, unexpected and misshapen tensor,
by name.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax

MAX_LISTED = 20  # Names listed per kind of problem.

Shapes = Mapping[str, tuple[int, ...]]


def flat_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  """{'down_0/block_0/conv1/kernel': shape} of the arrays (or array metadata) of a pytree."""
  return {
    '/'.join(str(getattr(key, 'key', key)) for key in path): tuple(leaf.shape)
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
  }


def _listed(names: list[str]) -> str:
  more = len(names) - MAX_LISTED
  return ', '.join(names[:MAX_LISTED]) + (f' and {more} more' if more > 0 else '')


def check_tensors(expected: Shapes, found: Shapes, *, what: str, hint: str = '') -> None:
  """Raises ValueError unless `found` has exactly the names and shapes of `expected`.

  Args:
    expected: name -> shape that the reader needs.
    found: name -> shape of what the source holds.
    what: the source, the subject of the message (e.g. 'The checkpoint /w/checkpoints/1000').
    hint: a sentence appended to the message: what to do about it.

  Raises:
    ValueError: listing the missing, unexpected and misshapen tensors (at most `MAX_LISTED` of
      each kind, with a count).
  """
  missing = sorted(set(expected) - set(found))
  unexpected = sorted(set(found) - set(expected))
  misshapen = sorted(
    f'{name} {tuple(found[name])} (expected {tuple(expected[name])})'
    for name in set(expected) & set(found)
    if tuple(found[name]) != tuple(expected[name])
  )
  problems = [
    f'{label} ({len(names)}): {_listed(names)}'
    for label, names in (
      ('missing tensors', missing),
      ('unexpected tensors', unexpected),
      ('misshapen tensors', misshapen),
    )
    if names
  ]
  if problems:
    message = f'{what} does not match: ' + '; '.join(problems) + '.'
    raise ValueError(message + (f' {hint}' if hint else ''))

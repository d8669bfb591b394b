"""Console progress bars of a multi-process job: shown on process 0, silent on the others."""

import jax
import tqdm


def bar(total: int, desc: str, *, initial: int = 0, unit: str = 'it') -> tqdm.tqdm:
  """A console progress bar (a context manager) on process 0; a silent one elsewhere."""
  return tqdm.tqdm(
    total=total,
    desc=desc,
    initial=initial,
    unit=unit,
    dynamic_ncols=True,
    disable=jax.process_index() > 0,
  )

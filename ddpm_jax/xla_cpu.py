"""XLA options for the CPU backend, set when `ddpm_jax` is imported, before JAX starts a backend.

XLA:CPU hands each convolution to one of two libraries: YNNPACK (the default since jaxlib 0.10) or
Eigen. On the U-Net's shapes Eigen is the faster one, most of all for the kernel gradient (a
convolution whose window is the whole image): on jaxlib 0.10 the CIFAR10 train step at batch 8
ran 1.2x faster and one sampling step 1.14x faster, the digits sampler 1.3x (BENCHMARKS.md,
"XLA's convolution library"); on jaxlib 0.12, side by side in one run, 1.06x and 1.03x
(BENCHMARKS.md, "ddpm-jax against PyTorch"). Dots, reductions and elementwise fusions stay with
YNNPACK, which is faster for them.

XLA reads `XLA_FLAGS` once, when JAX starts its first backend, so the option takes effect when
`ddpm_jax` is imported before JAX computes anything (main.py and the benchmarks do). A
user's own setting of the option in `XLA_FLAGS` wins; set `DDPM_JAX_KEEP_XLA_FLAGS=1` to leave
`XLA_FLAGS` untouched altogether.
"""

import importlib.metadata
import os

# The oldest jaxlib known to have the option (the floor of requirements.txt); an XLA that does not
# know a flag in XLA_FLAGS stops the process, so older ones are left alone.
_FIRST_JAXLIB = (0, 10)

# Removes convolutions from the operations XLA:CPU gives YNNPACK, which leaves them to Eigen.
_OPTION = '--xla_cpu_experimental_ynn_fusion_type'
CONVOLUTIONS_ON_EIGEN = f'{_OPTION}=-individual_convolution'


def with_convolutions_on_eigen(xla_flags: str) -> str:
  """`xla_flags` (the value of XLA_FLAGS) with CONVOLUTIONS_ON_EIGEN appended, unless the flags
  already set the YNNPACK option, in which case they are returned as they are."""
  if any(flag.split('=')[0] == _OPTION for flag in xla_flags.split()):
    return xla_flags
  return f'{xla_flags} {CONVOLUTIONS_ON_EIGEN}'.strip()


def _jaxlib_version() -> tuple[int, ...]:
  try:
    release = importlib.metadata.version('jaxlib').split('.')[:2]
    return tuple(int(part) for part in release)
  except (importlib.metadata.PackageNotFoundError, ValueError):
    return ()


def configure() -> None:
  """Sets XLA_FLAGS for this process as the module docstring says."""
  if os.environ.get('DDPM_JAX_KEEP_XLA_FLAGS', '') not in ('', '0'):
    return
  if _jaxlib_version() < _FIRST_JAXLIB:
    return
  os.environ['XLA_FLAGS'] = with_convolutions_on_eigen(os.environ.get('XLA_FLAGS', ''))

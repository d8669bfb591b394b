"""A PyTorch reference for the speed of ddpm-jax: the same work, on diffusers' `UNet2DModel`.

The network is diffusers' `UNet2DModel` in the configuration of google/ddpm-cifar10-32
(`cifar10_diffusers_config()` of tests/helpers.py; 35,746,307 parameters, the architecture of
`configs/cifar10.py`) with dropout 0.1 as in the paper. Two units of work, each built by a
factory that returns a `Runner`:

- `train_runner`: one training step of `ddpm_jax.train.create_train_step`, eagerly in PyTorch:
  uint8 images -> [-1, 1] and a random left-right flip, t ~ U{0, ..., 999}, eps ~ N(0, I),
  x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps (`DDPMScheduler.add_noise`; linear betas
  1e-4..0.02, T = 1000), the network in train mode (dropout on), the loss L_simple =
  mean (eps - eps_theta)^2, backward, global-norm clipping at 1.0, Adam (lr 2e-4, b1 0.9,
  b2 0.999, eps 1e-8; PyTorch's fused CPU kernel, its fastest), and the EMA update (decay 0.9999)
  of a copy of the parameters.
  The images are one fixed synthetic uint8 batch, as the JAX side uses synthetic data too.
- `sample_runner`: one ancestral step x_t -> x_{t-1} (Algorithm 2) at t = 500 (`SAMPLE_T`) for a
  fixed x_t: the network in eval mode under `torch.inference_mode`, then `DDPMScheduler.step`
  (eps prediction, x_0 clipped to [-1, 1], variance beta_t: the paper's 'fixedlarge' for CIFAR10).

`dtype='bfloat16'` runs the network under `torch.autocast('cpu', dtype=torch.bfloat16)`:
parameters, gradients, Adam and EMA stay float32, the loss and the sampler's arithmetic are
float32, as in ddpm-jax's `model.dtype='bfloat16'`. (Autocast computes convolutions, linear
layers and attention in bfloat16 and leaves GroupNorm in its input's dtype; ddpm-jax keeps
GroupNorm and the attention softmax in float32.)

The comparison with the JAX side gives each side the same number of CPU threads, 2 by default
(`threads`): `torch.set_num_threads` for intra-op parallelism and, where PyTorch still allows
it, `torch.set_num_interop_threads`.

The factories return a `timing.Runner`, the protocol of the JAX side too, so that
compare_torch.py interleaves the two round by round in one process; they run one warm-up step,
so `run()` measures the steady state.

Import it from a script in benchmarks/ (`import torch_reference`), or run it alone:
  python benchmarks/torch_reference.py --batch_size=128 --dtype=float32 --threads=2 --steps=5
"""

from __future__ import annotations

import math
import os
import sys

from absl import app, flags
from timing import Runner, measure

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _path in (REPO, os.path.join(REPO, 'tests')):
  if _path not in sys.path:
    sys.path.append(_path)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from diffusers import DDPMScheduler, UNet2DModel  # noqa: E402
from helpers import cifar10_diffusers_config  # noqa: E402

NUM_PARAMS = 35_746_307  # The CIFAR10 U-Net, as ddpm-jax's configs/cifar10.py and the paper.
IMAGE_SHAPE = (3, 32, 32)  # [C, H, W]: PyTorch's layout.
SAMPLE_T = 500  # The timestep (0-based) of the benchmarked ancestral step.
DROPOUT = 0.1
LEARNING_RATE = 2e-4
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8
GRAD_CLIP = 1.0
EMA_DECAY = 0.9999
DTYPES = ('float32', 'bfloat16')


def set_threads(threads: int) -> None:
  """Intra-op threads, and inter-op threads unless PyTorch has already started its pool (it
  allows setting those once per process, before any inter-op work)."""
  torch.set_num_threads(threads)
  try:
    torch.set_num_interop_threads(threads)
  except RuntimeError:
    pass


def create_model() -> UNet2DModel:
  """diffusers' CIFAR10 DDPM U-Net with dropout 0.1 and PyTorch's default initialization."""
  model = UNet2DModel.from_config({**cifar10_diffusers_config(), 'dropout': DROPOUT})
  num_params = sum(p.numel() for p in model.parameters())
  assert num_params == NUM_PARAMS, f'{num_params:,} parameters, expected {NUM_PARAMS:,}'
  return model


def create_scheduler() -> DDPMScheduler:
  """The paper's diffusion: linear betas 1e-4..0.02, T = 1000, eps prediction, x_0 clipped to
  [-1, 1] when sampling, and the 'fixedlarge' variance beta_t of its CIFAR10 model."""
  return DDPMScheduler(
    num_train_timesteps=1000,
    beta_start=1e-4,
    beta_end=0.02,
    beta_schedule='linear',
    variance_type='fixed_large',
    clip_sample=True,
    clip_sample_range=1.0,
    prediction_type='epsilon',
  )


def _autocast(dtype: str) -> torch.autocast:
  """The network's compute dtype: float32 (autocast off) or bfloat16 mixed precision; raises
  ValueError on any other `dtype`."""
  if dtype not in DTYPES:
    raise ValueError(f'dtype must be one of {DTYPES}, got {dtype!r}')
  return torch.autocast('cpu', dtype=torch.bfloat16, enabled=dtype == 'bfloat16')


def train_runner(
  batch_size: int, dtype: str = 'float32', threads: int = 2, seed: int = 0
) -> Runner:
  """One training step per run() on a fixed synthetic batch of `batch_size` uint8 images."""
  autocast = _autocast(dtype)
  set_threads(threads)
  torch.manual_seed(seed)  # Initialization and dropout draw from the global generator.
  generator = torch.Generator().manual_seed(seed)  # Flips, t and eps.
  model = create_model().train()
  scheduler = create_scheduler()
  params = [p for p in model.parameters() if p.requires_grad]
  ema_params = [p.detach().clone() for p in params]
  optimizer = torch.optim.Adam(params, lr=LEARNING_RATE, betas=ADAM_BETAS, eps=ADAM_EPS, fused=True)
  images = torch.randint(0, 256, (batch_size, *IMAGE_SHAPE), dtype=torch.uint8, generator=generator)
  num_timesteps = scheduler.config.num_train_timesteps

  def step():
    # ddpm_jax.train.preprocess: x / 127.5 - 1, mirrored left-right with probability 1/2.
    x_start = images.float() / 127.5 - 1.0
    flip = torch.rand((batch_size, 1, 1, 1), generator=generator) < 0.5
    x_start = torch.where(flip, x_start.flip(-1), x_start)
    t = torch.randint(0, num_timesteps, (batch_size,), generator=generator)
    noise = torch.randn(x_start.shape, generator=generator)
    x_t = scheduler.add_noise(x_start, noise, t)  # Eq. (4).
    with autocast:
      eps = model(x_t, t).sample
    loss = F.mse_loss(eps.float(), noise)  # L_simple, eq. (14), averaged over the batch.
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP)
    optimizer.step()
    with torch.no_grad():
      torch._foreach_lerp_(ema_params, params, 1.0 - EMA_DECAY)  # ema = d ema + (1 - d) params.
    loss = loss.item()  # Also what the JAX step returns as a metric.
    if not math.isfinite(loss):
      raise FloatingPointError(f'Non-finite training loss {loss}.')

  runner = Runner('torch train', images_per_run=batch_size, steps_per_run=1, work=step)
  runner.run()  # Warm-up.
  return runner


def sample_runner(
  batch_size: int, dtype: str = 'float32', threads: int = 2, seed: int = 0
) -> Runner:
  """One ancestral sampling step at t = SAMPLE_T per run(), on a fixed x_t of `batch_size`."""
  autocast = _autocast(dtype)
  set_threads(threads)
  torch.manual_seed(seed)
  generator = torch.Generator().manual_seed(seed)  # x_t and the step's noise.
  model = create_model().eval()
  scheduler = create_scheduler()
  x_t = torch.randn((batch_size, *IMAGE_SHAPE), generator=generator)
  t = torch.full((batch_size,), SAMPLE_T, dtype=torch.long)

  def step():
    with torch.inference_mode():
      with autocast:
        eps = model(x_t, t).sample
      # Algorithm 2: x_{t-1} = mu_theta(x_t, t) + sqrt(beta_t) z, through the clipped x_0.
      scheduler.step(eps.float(), SAMPLE_T, x_t, generator=generator)

  runner = Runner('torch sample step', images_per_run=batch_size, steps_per_run=1, work=step)
  runner.run()  # Warm-up.
  return runner


def _define_flags() -> None:
  """The flags of `python benchmarks/torch_reference.py`; defined only when run as a script, so
  that importing this module does not clash with the flags of the comparison script."""
  flags.DEFINE_integer('batch_size', 128, 'Images per training or sampling step.')
  flags.DEFINE_enum('dtype', 'float32', list(DTYPES), 'The network compute dtype.')
  flags.DEFINE_integer('threads', 2, 'PyTorch CPU threads (the comparison uses 2 per side).')
  flags.DEFINE_integer('steps', 5, 'Runs (steps) per timed window.')
  flags.DEFINE_integer('windows', 3, 'Timed windows per figure; the median is reported.')
  flags.DEFINE_integer('seed', 0, 'Seed of the parameters, the data and every random draw.')


def main(argv):
  del argv
  FLAGS = flags.FLAGS
  for factory in (train_runner, sample_runner):
    runner = factory(FLAGS.batch_size, dtype=FLAGS.dtype, threads=FLAGS.threads, seed=FLAGS.seed)
    rates = measure(runner, runs_per_window=FLAGS.steps, num_windows=FLAGS.windows)
    print(
      f'{runner.name}: {rates.describe()}; batch {FLAGS.batch_size}, {FLAGS.dtype}, '
      f'{FLAGS.threads} threads',
      flush=True,
    )


if __name__ == '__main__':
  _define_flags()
  app.run(main)

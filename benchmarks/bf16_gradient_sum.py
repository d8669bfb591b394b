"""What summing the gradients over devices in bfloat16 does to them, as a TPU sums them.

  python benchmarks/bf16_gradient_sum.py

In a bfloat16 network (`model.dtype`, the TPU's default) each device's convolutions and dense
layers compute their kernels' gradients in bfloat16, with float32 accumulation, and XLA's SPMD
partitioner all-reduces those partial sums over the batch's devices in bfloat16, before the cast
to the float32 params (measured on the v5e-8 digits train call: 127 of its 189 gradient arrays).
The CPU's program sums them in float32, so this script emulates the TPU's: the gradient of each
device's share of a CIFAR10-shaped batch of 128, computed by the bfloat16 network on this CPU,
summed one device after another in bfloat16 (a ring all-reduce adds one device's part per hop and
rounds each time: the worst order) and in float32. Each is compared with the float32 network's
gradient at the highest matmul precision: the relative error ||g - g_f32|| / ||g_f32|| over all
parameters. A smaller U-Net than the paper's (64 channels, two levels) keeps it to a minute here.
"""

import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from configs import cifar10  # noqa: E402
from ddpm_jax import checks, models, train  # noqa: E402

BATCH = 128
DEVICES = (1, 8, 32, 64)


def gradient_fn(dtype: str):
  config = cifar10.get_config()
  config.model.update(ch=64, ch_mult=(1, 2), num_res_blocks=1, dropout=0.0, dtype=dtype)
  diffusion = checks.check_config(config, train.check_config)
  model = models.create_model(config)

  def loss(params, x_start, t, noise):
    model_fn = lambda x, t: model.apply({'params': params}, x, t, train=False)
    return jnp.mean(diffusion.training_losses(model_fn, x_start, t, noise))

  params = model.init(
    jax.random.key(0), jnp.zeros((1, 32, 32, 3)), jnp.zeros(1, jnp.int32), train=False
  )
  return params['params'], jax.jit(jax.grad(loss))


def relative_error(grads, reference) -> float:
  squares = lambda tree: sum(float(jnp.sum(jnp.square(x))) for x in jax.tree.leaves(tree))
  return (squares(jax.tree.map(jnp.subtract, grads, reference)) / squares(reference)) ** 0.5


def main():
  rng = np.random.default_rng(0)
  x_start = jnp.asarray(rng.uniform(-1, 1, (BATCH, 32, 32, 3)), jnp.float32)
  noise = jnp.asarray(rng.normal(size=(BATCH, 32, 32, 3)), jnp.float32)
  t = jnp.asarray(rng.integers(0, 1000, BATCH), jnp.int32)
  params, grad_f32 = gradient_fn('float32')
  with jax.default_matmul_precision('highest'):
    reference = grad_f32(params, x_start, t, noise)
  params, grad_bf16 = gradient_fn('bfloat16')
  round_bf16 = lambda x: x.astype(jnp.bfloat16).astype(jnp.float32)
  print(f"jax {jax.__version__}; relative error of the bfloat16 network's gradient, batch {BATCH}")
  print('| devices | images each | summed in float32 | summed in bfloat16 |')
  print('|---|---|---|---|')
  for n in DEVICES:
    size = BATCH // n
    shares = [
      grad_bf16(params, x_start[i : i + size], t[i : i + size], noise[i : i + size])
      for i in range(0, BATCH, size)
    ]
    # Each device's mean loss is 1/n of the batch's: its gradient counts 1/n.
    parts = [jax.tree.map(lambda g, n=n: g / n, share) for share in shares]
    in_f32 = jax.tree.map(lambda *g: sum(g), *parts)
    in_bf16 = parts[0]
    for part in parts[1:]:
      in_bf16 = jax.tree.map(lambda a, b: round_bf16(round_bf16(a) + round_bf16(b)), in_bf16, part)
    errors = relative_error(in_f32, reference), relative_error(in_bf16, reference)
    print(f'| {n} | {size} | {errors[0]:.2e} | {errors[1]:.2e} |', flush=True)


if __name__ == '__main__':
  main()

"""Tests of the compiled sample loop (`ddpm_jax/sample_loop.py`): the chunked compiled loops of
every sampler against the diffusion loops, bit for bit, and against a float64 DDIM recursion; a
class-conditional network without labels as the null label's network, unguided."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from helpers import LinearEps, tiny_digits_config, tiny_model_and_params

from ddpm_jax import diffusion as diffusion_lib
from ddpm_jax import mesh as mesh_lib
from ddpm_jax import sample_loop, samplers

CHUNKED_SAMPLERS = [
  samplers.DDIM(20, 0.5),
  samplers.Respaced(17),
  samplers.DPMSolver(13),
  samplers.DPMSolver(13, thresholding='dynamic'),
]


def test_chunked_loops_equal_the_diffusion_loops():
  # Expected: GaussianDiffusion.p_sample_loop / _progressive / sample_loop with the same rng and
  # params, bit for bit, however the steps are split into compiled calls. (A one-level U-Net,
  # which compiles faster; the loops do not depend on the network.)
  config = tiny_digits_config(1, **{'model.ch_mult': (1,), 'model.attn_resolutions': ()})
  diffusion = diffusion_lib.GaussianDiffusion.from_config(config.diffusion)
  model, params = tiny_model_and_params(config)
  mesh = mesh_lib.create_mesh()
  init = sample_loop.create_init_fn(diffusion, mesh)
  shape, rng = (4, 8, 8, 1), jax.random.key(7)

  @jax.jit
  def reference_loops(params, rng):
    model_fn = sample_loop.make_model_fn(model, params)
    return (
      diffusion.p_sample_loop_progressive(model_fn, shape, rng, every=25),
      [
        diffusion.sample_loop(sampler.step_fn(diffusion, model_fn), sampler.steps, shape, rng)
        for sampler in CHUNKED_SAMPLERS
      ],
    )

  (samples, snapshots), fast_samples = reference_loops(params, rng)
  np.testing.assert_array_equal(snapshots['t'], [99, 74, 49, 24])

  def run_in_chunks(run_chunk, bounds):
    x, loop_rng = init(shape, rng)
    pred_xstart = jnp.zeros_like(x)
    for start, stop in zip(bounds[:-1], bounds[1:], strict=True):
      x, pred_xstart = run_chunk(params, x, pred_xstart, loop_rng, np.int32(start), np.int32(stop))
    return x

  run_chunk = sample_loop.create_chunk_fn(diffusion, model, mesh, samplers.Ancestral())
  np.testing.assert_array_equal(run_in_chunks(run_chunk, [0, 1, 8, 8, 57, 100]), samples)

  # The driver, keeping the predicted x_0 of steps 0, 25, 50, 75 (the progressive figure).
  loop = sample_loop.ChunkedLoop(run_chunk, params, tqdm.tqdm(disable=True))
  boundaries = [1, 26, 51, 76]
  x, kept = loop.run(*init(shape, rng), 0, 100, keep=boundaries)
  np.testing.assert_array_equal(x, samples)
  for k, boundary in enumerate(boundaries):
    np.testing.assert_array_equal(kept[boundary][1], snapshots['pred_xstart'][k])

  # Every fast sampler, in ranges that split its multistep pairs (DPM-Solver++ reads the
  # predicted x_0 of the step before, carried over from the range before).
  for sampler, expected in zip(CHUNKED_SAMPLERS, fast_samples, strict=True):
    run_chunk = sample_loop.create_chunk_fn(diffusion, model, mesh, sampler)
    k = sampler.steps
    actual = run_in_chunks(run_chunk, [0, 1, 2, 2, 3, k // 2, k - 1, k])
    np.testing.assert_array_equal(actual, expected, err_msg=sampler.tag)
    # The driver: its first range is one step, so the state crosses at least one boundary.
    loop = sample_loop.ChunkedLoop(run_chunk, params, tqdm.tqdm(disable=True))
    x, _ = loop.run(*init(shape, rng), 0, k)
    np.testing.assert_array_equal(x, expected, err_msg=sampler.tag)
    assert not np.array_equal(expected, samples)


def test_a_conditional_network_without_labels_is_the_null_label_unguided():
  # The unconditional model of classifier-free guidance: make_model_fn of a class-conditional
  # U-Net (K = 10) given no labels is expected to equal model.apply with y = K (the null label)
  # on every row, one call and no guidance, bit for bit, whatever the guidance scale; and the
  # compiled chunk of a guided sampler run without labels, that of the unguided sampler given
  # labels K.
  config = tiny_digits_config(
    1, **{'model.num_classes': 10, 'model.ch_mult': (1,), 'model.attn_resolutions': ()}
  )
  model, params = tiny_model_and_params(config)
  x = jax.random.normal(jax.random.key(2), (4, 8, 8, 1))
  t = jnp.array([0, 5, 50, 99], jnp.int32)
  null = jnp.full((4,), 10, jnp.int32)

  @jax.jit
  def network(params, x, t, y):
    return model.apply({'params': params}, x, t, y, train=False)

  expected = network(params, x, t, null)
  assert not np.array_equal(expected, network(params, x, t, jnp.zeros_like(null)))

  @functools.partial(jax.jit, static_argnums=3)
  def without_labels(params, x, t, scale):
    return sample_loop.make_model_fn(model, params, guidance_scale=scale)(x, t)

  for scale in (1.0, 3.0):
    np.testing.assert_array_equal(without_labels(params, x, t, scale), expected, err_msg=scale)

  diffusion = diffusion_lib.GaussianDiffusion.from_config(config.diffusion)
  mesh = mesh_lib.create_mesh()
  x_T, loop_rng = sample_loop.create_init_fn(diffusion, mesh)((4, 8, 8, 1), jax.random.key(3))
  args = (params, x_T, jnp.zeros_like(x_T), loop_rng, np.int32(0), np.int32(5))
  guided = sample_loop.create_chunk_fn(diffusion, model, mesh, samplers.DDIM(5), 3.0)
  unguided = sample_loop.create_chunk_fn(diffusion, model, mesh, samplers.DDIM(5))
  np.testing.assert_array_equal(
    guided(*args)[0], unguided(*args, sample_loop.sharded_like(x_T, np.full(4, 10, np.int32)))[0]
  )


def test_ddim_eta0_all_steps_matches_float64_recursion():
  # Expected: DDIM eq. (12) with eta = 0 over all T = 1000 timesteps of the paper's schedule,
  # computed here in float64 with the sampler's clipping of the predicted x_0 (and eps
  # recomputed from it); float32 through the sampling driver agrees to 1e-5 relative.
  config = tiny_digits_config(1, **{'diffusion.num_diffusion_timesteps': 1000})
  diffusion = diffusion_lib.GaussianDiffusion.from_config(config.diffusion)
  num_timesteps = diffusion.num_timesteps
  model = LinearEps(num_timesteps)
  shape = (2, 8, 8, 1)
  params = model.init(jax.random.key(0), jnp.zeros(shape), jnp.zeros((2,), jnp.int32), train=False)
  params = params['params']
  mesh = mesh_lib.create_mesh()
  init = sample_loop.create_init_fn(diffusion, mesh)
  run_chunk = sample_loop.create_chunk_fn(diffusion, model, mesh, samplers.DDIM(num_timesteps))
  loop = sample_loop.ChunkedLoop(run_chunk, params, tqdm.tqdm(disable=True))
  rng = jax.random.key(3)
  samples, _ = loop.run(*init(shape, rng), 0, num_timesteps)

  w = np.asarray(params['Dense_0']['kernel'], np.float64)
  b = np.asarray(params['Dense_0']['bias'], np.float64)
  betas = diffusion_lib.get_beta_schedule(
    'linear', beta_start=1e-4, beta_end=0.02, num_diffusion_timesteps=num_timesteps
  )
  alphas_cumprod = np.cumprod(1.0 - betas)
  x = np.asarray(jax.random.normal(jax.random.split(rng)[0], shape), np.float64)
  clipped = 0
  for t in range(num_timesteps - 1, -1, -1):
    eps = 0.1 * np.tanh(x @ w + b + t / num_timesteps)
    abar, abar_prev = alphas_cumprod[t], alphas_cumprod[t - 1] if t > 0 else 1.0
    x0 = (x - np.sqrt(1 - abar) * eps) / np.sqrt(abar)
    clipped += np.any(np.abs(x0) > 1)
    x0 = np.clip(x0, -1, 1)
    eps = (x / np.sqrt(abar) - x0) / np.sqrt(1 / abar - 1)
    x = np.sqrt(abar_prev) * x0 + np.sqrt(1 - abar_prev) * eps
  assert clipped > 0  # The clipping is exercised.
  samples = np.asarray(samples, np.float64)
  assert np.linalg.norm(samples - x) / np.linalg.norm(x) < 1e-5

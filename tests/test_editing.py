"""Tests of image editing (`ddpm_jax/editing.py`): RePaint's walk against diffusers'
`RePaintScheduler`; each move of inpainting against a float64 recursion of the equations; the
identities with the original (a mask of all ones) and with sampling (all zeros, no jumps; SDEdit
at strength 1), bit for bit, through the compiled chunked loops; and the checks of the
`config.sampling` fields of the editing kinds, before anything compiles."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image
import pytest
import tqdm
from diffusers import RePaintScheduler
from helpers import LinearEps, tiny_digits_config, tiny_model_and_params

from ddpm_jax import diffusion as diffusion_lib
from ddpm_jax import editing, generate, image_io, sample_loop, samplers
from ddpm_jax import mesh as mesh_lib


@pytest.mark.parametrize(
  'num_steps, jump_length, jump_n_sample',
  [(250, 10, 10), (20, 3, 3), (12, 5, 4), (10, 10, 10), (7, 2, 1)],
)
def test_walk_is_diffusers_repaint_schedule(num_steps, jump_length, jump_n_sample):
  # Expected: diffusers' RePaintScheduler (the paper's code's schedule), an independent
  # implementation: its timesteps, divided by T / K, are the levels after each move; and the
  # count of the docstring, K + 2 (r - 1) n ceil((K - n) / n) moves.
  scheduler = RePaintScheduler(num_train_timesteps=1000)
  scheduler.set_timesteps(num_steps, jump_length, jump_n_sample)
  levels = editing.RePaint(jump_length, jump_n_sample).levels(num_steps)
  assert levels[0] == num_steps and levels[-1] == 0
  np.testing.assert_array_equal(levels[1:], scheduler.timesteps.numpy() // (1000 // num_steps))
  num_jump_levels = max(0, -(-(num_steps - jump_length) // jump_length))
  expected = num_steps + 2 * (jump_n_sample - 1) * jump_length * num_jump_levels
  assert editing.RePaint(jump_length, jump_n_sample).num_moves(num_steps) == expected


def one_level_config(**extra):
  return tiny_digits_config(1, **{'model.ch_mult': (1,), 'model.attn_resolutions': (), **extra})


def chunked(run_chunk, params, x, loop_rng, bounds, labels=None, known=None):
  """x after the steps [bounds[0], bounds[-1]) run in the compiled calls between the bounds."""
  pred_xstart = jnp.zeros_like(x)
  for start, stop in zip(bounds[:-1], bounds[1:], strict=True):
    x, pred_xstart = run_chunk(
      params, x, pred_xstart, loop_rng, np.int32(start), np.int32(stop), labels, known
    )
  return x


def test_every_move_matches_a_float64_recursion():
  # RePaint with DDIM (eta 0) on K = 20 of T = 100 timesteps, n = 3, r = 3 (92 moves), on the
  # smooth LinearEps model, run one compiled move at a time. Expected: a float64 recursion of
  # the equations from the same noise: a step down is DDIM's eq. 12 (x_0 clipped, eps
  # recomputed from it) in the unknown region and q_sample(x_0, ts[k-1], noise_i) (eq. 4; x_0 at
  # level 0) in the known one; a jump is sqrt(1 - beta') x + sqrt(beta') noise_i with
  # beta' = 1 - abar_{ts[k]} / abar_{ts[k-1]}. Each move's state agrees to 1e-5 relative, the
  # known region of every state after a step down is the original diffused to its level to
  # 1e-6, and the known region of the result is the original, bit for bit.
  config = tiny_digits_config(1)
  diffusion = diffusion_lib.GaussianDiffusion.from_config(config.diffusion)
  num_timesteps = diffusion.num_timesteps
  sampler, repaint = samplers.DDIM(20), editing.RePaint(3, 3)
  model = LinearEps(num_timesteps)
  shape = (2, 8, 8, 1)
  params = model.init(jax.random.key(0), jnp.zeros(shape), jnp.zeros((2,), jnp.int32), train=False)
  params = params['params']
  mesh = mesh_lib.create_mesh()
  run_chunk = sample_loop.create_chunk_fn(diffusion, model, mesh, sampler, inpainting=repaint)
  x_start = jax.random.uniform(jax.random.key(1), shape, minval=-1.0, maxval=1.0)
  mask = jnp.asarray(np.broadcast_to(editing.named_mask('bottom_half', 8, None), (2, 8, 8, 1)))
  timesteps = sampler.timesteps(num_timesteps)
  x_T, loop_rng = sample_loop.create_init_fn(diffusion, mesh)(shape, jax.random.key(2))
  x = editing.inpaint_start(diffusion, x_T, x_start, mask, timestep=int(timesteps[-1]))

  betas = diffusion_lib.get_beta_schedule(
    'linear', beta_start=1e-4, beta_end=0.02, num_diffusion_timesteps=num_timesteps
  )
  abar = np.cumprod(1.0 - betas)
  level_abar = np.concatenate([[1.0], abar[timesteps]])  # Level k: diffused to ts[k-1].
  w = np.asarray(params['Dense_0']['kernel'], np.float64)
  b = np.asarray(params['Dense_0']['bias'], np.float64)
  x0, keep = np.asarray(x_start, np.float64), np.asarray(mask)
  ref = np.where(
    keep,
    np.sqrt(level_abar[-1]) * x0 + np.sqrt(1 - level_abar[-1]) * np.asarray(x_T, np.float64),
    np.asarray(x_T, np.float64),
  )
  np.testing.assert_allclose(x, ref, rtol=1e-6, atol=1e-6)

  levels = repaint.levels(len(timesteps))
  pred_xstart = jnp.zeros_like(x)
  for i, (level, target) in enumerate(zip(levels[:-1], levels[1:], strict=True)):
    x, pred_xstart = run_chunk(
      params, x, pred_xstart, loop_rng, np.int32(i), np.int32(i + 1), None, (x_start, mask)
    )
    noise = np.asarray(
      jax.random.normal(jax.random.fold_in(loop_rng, num_timesteps + i), shape), np.float64
    )
    if target < level:
      t = timesteps[level - 1]
      eps = 0.1 * np.tanh(ref @ w + b + t / num_timesteps)
      x0_hat = np.clip((ref - np.sqrt(1 - abar[t]) * eps) / np.sqrt(abar[t]), -1, 1)
      eps = (ref / np.sqrt(abar[t]) - x0_hat) / np.sqrt(1 / abar[t] - 1)
      a_prev = level_abar[target]
      unknown = np.sqrt(a_prev) * x0_hat + np.sqrt(1 - a_prev) * eps
      known = np.sqrt(a_prev) * x0 + np.sqrt(1 - a_prev) * noise
      ref = np.where(keep, known, unknown)
      np.testing.assert_allclose(
        np.asarray(x)[keep], known[keep], rtol=1e-6, atol=1e-6, err_msg=f'move {i}'
      )
    else:
      beta = 1 - level_abar[target] / level_abar[level]
      ref = np.sqrt(1 - beta) * ref + np.sqrt(beta) * noise
    assert np.linalg.norm(np.asarray(x) - ref) / np.linalg.norm(ref) < 1e-5, f'move {i}'
  np.testing.assert_array_equal(np.asarray(x)[keep], np.asarray(x_start)[keep])


@pytest.mark.parametrize(
  'sampler, num_classes, guidance_scale',
  [
    (samplers.Ancestral(), 0, 1.0),
    (samplers.Respaced(17), 0, 1.0),
    (samplers.DDIM(20, 0.5), 10, 3.0),  # A class-conditional model, guided.
  ],
)
def test_inpainting_identities(sampler, num_classes, guidance_scale):
  # Expected, bit for bit, through the compiled chunked loop: with a mask of all ones the result
  # is the original; with all zeros and no resampling (jump_n_sample = 1) it is the sampler's
  # sample from the same key (the same x_T and step noise), and with resampling its state on
  # reaching the first level of jumps is sampling's after as many steps. On the tiny U-Net,
  # ancestral on T = 100, and a class-conditional one guided with labels.
  config = one_level_config(**{'model.num_classes': num_classes})
  diffusion = diffusion_lib.GaussianDiffusion.from_config(config.diffusion)
  model, params = tiny_model_and_params(config)
  mesh = mesh_lib.create_mesh()
  shape = (4, 8, 8, 1)
  init = sample_loop.create_init_fn(diffusion, mesh)
  x_T, loop_rng = init(shape, jax.random.key(5))
  labels = None
  if num_classes:
    labels = sample_loop.sharded_like(x_T, np.array([3, 1, 4, 1], np.int32))
  x_start = jax.random.uniform(jax.random.key(6), shape, minval=-1.0, maxval=1.0)
  num_steps = sampler.num_steps(diffusion.num_timesteps)
  top = int(sampler.timesteps(diffusion.num_timesteps)[-1])
  plain = sample_loop.create_chunk_fn(diffusion, model, mesh, sampler, guidance_scale)
  expected = chunked(plain, params, x_T, loop_rng, [0, 1, num_steps // 2, num_steps], labels)

  for jump_n_sample in (1, 3):
    repaint = editing.RePaint(5, jump_n_sample)
    run_chunk = sample_loop.create_chunk_fn(
      diffusion, model, mesh, sampler, guidance_scale, inpainting=repaint
    )
    moves = repaint.num_moves(num_steps)
    for keep in (False, True):
      mask = jnp.full((*shape[:3], 1), keep)
      x = editing.inpaint_start(diffusion, x_T, x_start, mask, timestep=top)
      known = (x_start, mask)
      if jump_n_sample == 1:
        actual = chunked(run_chunk, params, x, loop_rng, [0, 3, moves // 2, moves], labels, known)
        np.testing.assert_array_equal(actual, x_start if keep else expected)
      elif keep:
        actual = chunked(run_chunk, params, x, loop_rng, [0, moves], labels, known)
        np.testing.assert_array_equal(actual, x_start)
      else:
        # The first jump is from level n * floor((K - n - 1) / n), reached after K - that steps.
        first_jump = (num_steps - repaint.jump_length - 1) // repaint.jump_length
        steps = num_steps - repaint.jump_length * first_jump
        actual = chunked(run_chunk, params, x, loop_rng, [0, steps], labels, known)
        np.testing.assert_array_equal(
          actual, chunked(plain, params, x_T, loop_rng, [0, steps], labels)
        )


@pytest.mark.parametrize(
  'sampler',
  [samplers.Ancestral(), samplers.DDIM(10, 0.5), samplers.Respaced(9), samplers.DPMSolver(7)],
)
def test_sdedit_at_strength_1_is_sampling(sampler):
  # Expected: `generate.edit` with SDEdit's start at strength 1 gives the samples of the chunked
  # loop from the same key, bit for bit, for every sampler (SDEdit starts from x_T itself).
  config = one_level_config()
  diffusion = diffusion_lib.GaussianDiffusion.from_config(config.diffusion)
  model, params = tiny_model_and_params(config)
  mesh = mesh_lib.create_mesh()
  init = sample_loop.create_init_fn(diffusion, mesh)
  num_steps = sampler.num_steps(diffusion.num_timesteps)
  level = editing.sdedit_level(1.0, num_steps)
  assert level == num_steps
  run_chunk = sample_loop.create_chunk_fn(diffusion, model, mesh, sampler)
  images = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 1), np.uint8)
  start = functools.partial(
    editing.sdedit_start, diffusion, timestep=int(sampler.timesteps(100)[-1]), from_noise=True
  )
  rng = jax.random.key(9)
  _, results = generate.edit(
    sample_loop.ChunkedLoop(run_chunk, params, tqdm.tqdm(disable=True)),
    init,
    lambda x_T, x_start, mask: start(x_T, x_start),
    images,
    None,
    rng,
    steps=(num_steps - level, num_steps),
    batch_size=4,
  )
  x_T, loop_rng = init((4, 8, 8, 1), jax.random.fold_in(rng, 0))
  expected = chunked(run_chunk, params, x_T, loop_rng, [0, 1, num_steps])
  np.testing.assert_array_equal(results, np.asarray(expected)[:3])


def test_sdedit_from_t0_matches_a_float64_recursion():
  # SDEdit at strength 0.3 with DDIM (eta 0) on K = 20 of T = 100 timesteps: level
  # k0 = ceil(0.3 * 20) = 6, t0 = ts[5] = 25. Expected: x_t0 = sqrt(abar_t0) x_0 +
  # sqrt(1 - abar_t0) x_T (eq. 4), then DDIM's eq. 12 down from t0, in float64, to 1e-5.
  config = tiny_digits_config(1)
  diffusion = diffusion_lib.GaussianDiffusion.from_config(config.diffusion)
  sampler = samplers.DDIM(20)
  model = LinearEps(100)
  shape = (2, 8, 8, 1)
  params = model.init(jax.random.key(0), jnp.zeros(shape), jnp.zeros((2,), jnp.int32), train=False)
  params = params['params']
  timesteps = sampler.timesteps(100)
  level = editing.sdedit_level(0.3, 20)
  assert (level, timesteps[level - 1]) == (6, 25)
  x_start = jax.random.uniform(jax.random.key(1), shape, minval=-1.0, maxval=1.0)
  x_T = jax.random.normal(jax.random.key(2), shape)
  x = editing.sdedit_start(diffusion, x_T, x_start, timestep=25, from_noise=False)
  run_chunk = sample_loop.create_chunk_fn(
    diffusion, model, mesh_lib.create_mesh(), sampler, first_step=20 - level
  )
  x = chunked(run_chunk, params, x, jax.random.key(3), [20 - level, 20])

  abar = np.cumprod(
    1.0
    - diffusion_lib.get_beta_schedule(
      'linear', beta_start=1e-4, beta_end=0.02, num_diffusion_timesteps=100
    )
  )
  w = np.asarray(params['Dense_0']['kernel'], np.float64)
  b = np.asarray(params['Dense_0']['bias'], np.float64)
  ref = np.sqrt(abar[25]) * np.asarray(x_start, np.float64) + np.sqrt(1 - abar[25]) * np.asarray(
    x_T, np.float64
  )
  for k in range(level - 1, -1, -1):
    t = timesteps[k]
    eps = 0.1 * np.tanh(ref @ w + b + t / 100)
    x0_hat = np.clip((ref - np.sqrt(1 - abar[t]) * eps) / np.sqrt(abar[t]), -1, 1)
    eps = (ref / np.sqrt(abar[t]) - x0_hat) / np.sqrt(1 / abar[t] - 1)
    a_prev = abar[timesteps[k - 1]] if k > 0 else 1.0
    ref = np.sqrt(a_prev) * x0_hat + np.sqrt(1 - a_prev) * eps
  assert np.linalg.norm(np.asarray(x) - ref) / np.linalg.norm(ref) < 1e-5


def test_dpm_solver_starts_first_order_part_way():
  # Expected: the coefficients of a start at step 4 are those of a start at 0 (dpm_solver_step's
  # equations) but for c_4 = 0, the first-order step; steps 0..3 are not run.
  diffusion = diffusion_lib.GaussianDiffusion.from_config(tiny_digits_config(1).diffusion)
  tables = (diffusion.sqrt_alphas_cumprod, diffusion.sqrt_one_minus_alphas_cumprod, 10)
  whole = diffusion_lib.dpm_solver_coefficients(*tables)
  part = diffusion_lib.dpm_solver_coefficients(*tables, first_step=4)
  assert whole[4, 2] > 0 and part[4, 2] == 0
  np.testing.assert_array_equal(np.delete(part, 4, axis=0)[4:], np.delete(whole, 4, axis=0)[4:])
  np.testing.assert_array_equal(part[4, :2], whole[4, :2])


def test_named_masks():
  # Expected (1 = keep): the named region is the one inpainted, on an 8x8 image.
  rows = lambda name: np.asarray(editing.named_mask(name, 8, None)[..., 0], int)  # noqa: E731
  assert rows('bottom_half')[:4].all() and not rows('bottom_half')[4:].any()
  assert rows('left_half')[:, 4:].all() and not rows('left_half')[:, :4].any()
  assert rows('center').sum() == 64 - 16 and not rows('center')[2:6, 2:6].any()
  boxes = editing.named_mask('random_boxes', 8, np.random.default_rng(0))
  assert 0 < boxes.sum() < 64


def test_images_and_mask_image_are_read_as_given(tmp_path):
  # Expected: the first edit_num_images of an npz's `images` and of a folder's files in path
  # order, unchanged (RGB files become greyscale by luma for a 1-channel model); a mask image's
  # white (>= 128) kept and black inpainted, the same for every image.
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (5, 8, 8, 1), np.uint8)
  image_io.save_npz(tmp_path / 'in.npz', images=images)
  (tmp_path / 'folder').mkdir()
  for i, image in enumerate(images):
    PIL.Image.fromarray(image[..., 0]).save(tmp_path / 'folder' / f'{i}.png')
  PIL.Image.fromarray(np.repeat(images[0], 3, axis=-1)).save(tmp_path / 'folder' / '9_rgb.png')
  mask = np.zeros((8, 8), np.uint8)
  mask[:, 5:] = 255
  PIL.Image.fromarray(mask).save(tmp_path / 'mask.png')
  for source, num, expected in [
    ('in.npz', 3, images[:3]),
    ('folder', 6, np.concatenate([images, images[:1]])),
  ]:
    config = tiny_digits_config(
      1, **{'sampling.edit_images': str(tmp_path / source), 'sampling.edit_num_images': num}
    )
    np.testing.assert_array_equal(editing.load_images(config), expected, err_msg=source)
  config.sampling.inpaint_mask = str(tmp_path / 'mask.png')
  masks = editing.make_masks(config, 2)
  assert masks.shape == (2, 8, 8, 1) and masks[:, :, 5:].all() and not masks[:, :, :5].any()
  assert editing.mask_tag(config.sampling.inpaint_mask) == 'mask_mask'


# ----------------------------------------------------------------------------------------------
# Bad input: refused before anything compiles, naming the field.
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope='module')
def bad_inputs(tmp_path_factory):
  """Files of the wrong size: an npz of 16x16 images, a folder with one, a 16x16 mask image."""
  root = tmp_path_factory.mktemp('bad_inputs')
  image_io.save_npz(root / 'big.npz', images=np.zeros((4, 16, 16, 1), np.uint8))
  image_io.save_npz(root / 'two.npz', images=np.zeros((2, 8, 8, 1), np.uint8))
  (root / 'folder').mkdir()
  PIL.Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / 'folder' / 'a.png')
  PIL.Image.fromarray(np.zeros((16, 16), np.uint8)).save(root / 'folder' / 'b.png')
  PIL.Image.fromarray(np.zeros((16, 16), np.uint8)).save(root / 'mask16.png')
  return root


@pytest.mark.parametrize(
  'overrides, message',
  [
    (
      {'sampling.kinds': 'sdedit', 'sampling.sdedit_strength': 0.0},
      r'sdedit_strength must be in \(0, 1\]',
    ),
    (
      {'sampling.kinds': 'sdedit', 'sampling.sdedit_strength': 1.5},
      r'sdedit_strength must be in \(0, 1\] .*got 1.5',
    ),
    (
      {'sampling.sampler': 'dpm_solver++'},
      r"config.sampling.sampler = 'dpm_solver\+\+' cannot inpaint",
    ),
    ({'sampling.jump_length': 0}, 'config.sampling.jump_length must be a positive integer, got 0'),
    ({'sampling.jump_n_sample': -1}, 'config.sampling.jump_n_sample must be a positive integer'),
    ({'sampling.inpaint_mask': 'top_half'}, "config.sampling.inpaint_mask = 'top_half' is neither"),
    (
      {'sampling.inpaint_mask': '{root}/mask16.png'},
      r'inpaint_mask = .*mask16.png. is a 16x16 image; the model inpaints 8x8',
    ),
    (
      {'sampling.edit_images': '{root}/big.npz'},
      r'edit_images = .*big.npz. holds uint8 \[4, 16, 16, 1\]: expected uint8 \[N, 8, 8, 1\]',
    ),
    (
      {'sampling.edit_images': '{root}/two.npz'},
      r'edit_images = .*two.npz. has 2 images; config.sampling.edit_num_images asks for 4',
    ),
    (
      {'sampling.edit_images': '{root}/folder'},
      r'edit_images = .*folder.: b.png is 16x16; the model edits 8x8',
    ),
    (
      {'sampling.edit_images': '{root}/missing.npz'},
      r'edit_images = .*missing.npz. is neither an .npz file nor a folder',
    ),
    (
      {'sampling.edit_num_images': 301},
      r"The 'test' split of 'digits' .* has 300 images; .*edit_num_images asks for 301",
    ),
  ],
)
def test_bad_edit_settings_are_refused_before_compiling(bad_inputs, tmp_path, overrides, message):
  # A workdir without checkpoints: the settings are refused (ValueError naming the field) before
  # the checkpoint is looked for, so before anything is compiled or written.
  base = {
    'sampling.kinds': 'inpaint,sdedit',
    'sampling.sampler': 'respaced',
    'sampling.edit_num_images': 4,
  }
  overrides = {
    k: v.format(root=bad_inputs) if isinstance(v, str) else v for k, v in overrides.items()
  }
  config = tiny_digits_config(1, **{**base, **overrides})
  with pytest.raises(ValueError, match=message):
    generate.sample(config, str(tmp_path))
  assert list(tmp_path.iterdir()) == []

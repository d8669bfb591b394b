"""Image editing on the digits: RePaint against diffusers' `RePaintPipeline`, and SDEdit against
t0, the tables of BENCHMARKS.md ("Editing").

  python benchmarks/inpainting.py --workdir=/tmp/ddpm_digits \
      --json_out=benchmarks/results/digits_editing.jsonl

From the EMA parameters of the latest checkpoint of `--workdir` (a run of `--config`,
configs/digits.py), the first `--num_images` test digits with their bottom half masked are
inpainted by RePaint (K = `--steps` of the T = 1,000 timesteps, `--jump_length`,
`--jump_n_sample`) four ways, one after the other in this process:
  ours, ddim (eta 0)   `--mode=sample --config.sampling.kinds=inpaint` with the DDIM sampler,
                       the algorithm of diffusers' RePaintScheduler at its default eta 0;
  ours, respaced       the same with the respaced ancestral sampler (the paper's RePaint);
  diffusers, eta       `RePaintPipeline` with `RePaintScheduler` on the diffusers folder that
                       `python -m ddpm_jax.export` writes of the same checkpoint (PyTorch, CPU),
                       with each eta of `--diffusers_etas` (0, its default; 1, ancestral).
Each row: how often the digits classifier (ddpm_jax/digits_classifier.py) recognizes the
original digit in the result, how far the kept top half moved (the largest change of a pixel,
in 0..255 levels: it must not move), and the wall time of the whole call (ours: `generate.sample`,
restoring, compiling and writing included; diffusers: the pipeline call). For reference, the
classifier on the originals and on the masked images (bottom half black, the background).

SDEdit: for each of `--strengths`, the same digits diffused to t0 = the strength's level and
denoised with the respaced sampler (`--steps`): how often the classifier still recognizes the
input digit, and the mean change of a pixel.
"""

from __future__ import annotations

import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from etils import epath  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from ddpm_jax import data, digits_classifier, export, generate, image_io  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
  'config', os.path.join(REPO, 'configs', 'digits.py'), 'The digits config of the workdir.'
)
flags.DEFINE_string('workdir', None, 'A trained digits workdir.')
flags.DEFINE_integer('num_images', 300, 'Test digits to edit (the test split has 300).')
flags.DEFINE_integer('steps', 250, 'K: the timesteps RePaint and SDEdit walk.')
flags.DEFINE_integer('jump_length', 10, "RePaint's jump length n.")
flags.DEFINE_integer('jump_n_sample', 10, "RePaint's resamplings r.")
flags.DEFINE_list('strengths', ['0.1', '0.2', '0.3', '0.4', '0.5', '0.7', '1'], 'SDEdit strengths.')
flags.DEFINE_list('diffusers_etas', ['0', '1'], 'The eta of each diffusers run.')
flags.DEFINE_string('json_out', None, 'Append one JSON line per row to this file.')

HALF = 4  # The digits are 8x8: rows 0..3 are kept, 4..7 inpainted.


def ours(config, workdir: str, kind: str, **sampling) -> tuple[dict, float]:
  """The npz arrays that `generate.sample` writes for `kind` with these config.sampling fields,
  and its wall time."""
  config = config.copy_and_resolve_references()
  config.sampling.update(kinds=kind, **sampling)
  began = time.perf_counter()
  paths = generate.sample(config, workdir)
  wall = time.perf_counter() - began
  return image_io.load_npz(next(p for p in paths if p.endswith('.npz'))), wall


def diffusers_repaint(
  folder: str, originals: np.ndarray, masks: np.ndarray, *, eta: float, seed: int
) -> tuple[np.ndarray, float]:
  """diffusers' RePaintPipeline on the exported folder: uint8 results and the call's wall time."""
  import torch  # Only here: the peer.
  from diffusers import RePaintPipeline, RePaintScheduler, UNet2DModel

  pipeline = RePaintPipeline(
    unet=UNet2DModel.from_pretrained(os.path.join(folder, 'unet')),
    scheduler=RePaintScheduler.from_pretrained(os.path.join(folder, 'scheduler')),
  )
  pipeline.set_progress_bar_config(disable=True)
  image = torch.from_numpy(np.asarray(image_io.to_model_range(originals)).transpose(0, 3, 1, 2))
  mask = torch.from_numpy(masks.astype(np.float32).transpose(0, 3, 1, 2))
  began = time.perf_counter()
  with torch.no_grad():
    out = pipeline(
      image,
      mask,
      num_inference_steps=FLAGS.steps,
      eta=eta,
      jump_length=FLAGS.jump_length,
      jump_n_sample=FLAGS.jump_n_sample,
      generator=torch.Generator().manual_seed(seed),
      output_type='np',
    ).images
  wall = time.perf_counter() - began
  return np.round(np.asarray(out) * 255.0).astype(np.uint8).reshape(originals.shape), wall


def main(argv):
  del argv
  config, workdir = FLAGS.config, FLAGS.workdir
  test = data.create_source(config, 'test')
  train = data.create_source(config, 'train')
  originals, labels = test.images[: FLAGS.num_images], test.all_labels[: FLAGS.num_images]
  classifier = digits_classifier.train_classifier(train.images, train.all_labels, seed=config.seed)

  def recognized(images: np.ndarray) -> float:
    return digits_classifier.accuracy(classifier, images, labels)

  def emit(row: dict) -> None:
    row.update(device=jax.devices()[0].device_kind, num_images=len(originals))
    if FLAGS.json_out:
      with open(FLAGS.json_out, 'a') as f:
        f.write(json.dumps(row) + '\n')

  # Inpainting.
  repaint = dict(
    edit_num_images=len(originals),
    batch_size=len(originals),
    inpaint_mask='bottom_half',
    steps=FLAGS.steps,
    jump_length=FLAGS.jump_length,
    jump_n_sample=FLAGS.jump_n_sample,
  )
  masked = originals.copy()
  masked[:, HALF:] = 0
  print(
    f'The classifier recognizes {100 * recognized(originals):.1f}% of the originals and '
    f'{100 * recognized(masked):.1f}% of them with the bottom half black.'
  )
  folder = str(epath.Path(workdir) / 'diffusers_export')
  if not os.path.exists(folder):
    export.export(workdir, folder, config=config)
  runs = []
  for name, sampler, eta in (
    ('ours, ddim (eta 0)', 'ddim', 0.0),
    ('ours, respaced', 'respaced', 0.0),
  ):
    arrays, wall = ours(config, workdir, 'inpaint', sampler=sampler, ddim_eta=eta, **repaint)
    runs.append((name, arrays['results'], wall))
    masks = arrays['masks']
  for eta in map(float, FLAGS.diffusers_etas):
    results, wall = diffusers_repaint(folder, originals, masks, eta=eta, seed=config.seed)
    runs.append((f'diffusers RePaintPipeline, eta {eta:g}', results, wall))
  print(f'\nRePaint, K = {FLAGS.steps}, n = {FLAGS.jump_length}, r = {FLAGS.jump_n_sample}:')
  print(
    '| implementation | original digit recognized | kept half moved (max, 0..255) | wall time |'
  )
  print('|---|---|---|---|')
  for name, results, wall in runs:
    moved = int(np.abs(results[:, :HALF].astype(int) - originals[:, :HALF]).max())
    accuracy = recognized(results)
    print(f'| {name} | {100 * accuracy:.1f}% | {moved} | {wall:.1f} s |', flush=True)
    emit(
      dict(
        kind='inpaint',
        implementation=name,
        recognized=accuracy,
        kept_half_moved=moved,
        wall_s=wall,
        **repaint,
      )
    )

  # SDEdit against t0.
  print(f'\nSDEdit, respaced sampler on K = {FLAGS.steps}:')
  print('| strength | t0 | input digit recognized | mean pixel change (0..255) | wall time |')
  print('|---|---|---|---|---|')
  for strength in map(float, FLAGS.strengths):
    arrays, wall = ours(
      config,
      workdir,
      'sdedit',
      sampler='respaced',
      steps=FLAGS.steps,
      sdedit_strength=strength,
      edit_num_images=len(originals),
      batch_size=len(originals),
    )
    accuracy = recognized(arrays['results'])
    change = float(np.abs(arrays['results'].astype(int) - originals).mean())
    t0 = int(arrays['timestep'])
    print(
      f'| {strength:g} | {t0} | {100 * accuracy:.1f}% | {change:.1f} | {wall:.1f} s |', flush=True
    )
    emit(
      dict(
        kind='sdedit',
        strength=strength,
        t0=t0,
        recognized=accuracy,
        mean_change=change,
        wall_s=wall,
        steps=FLAGS.steps,
      )
    )


if __name__ == '__main__':
  flags.mark_flag_as_required('workdir')
  app.run(main)

"""Images/s of the host input pipeline, `ddpm_jax.data.train_batches` as `train.py` builds it, for
each paper dataset's stored format, beside the steps/s that TPU slices consume by XLA's estimate.

  python benchmarks/input_pipeline.py --json_out=benchmarks/results/input_pipeline.jsonl

Nothing is downloaded: the script makes its own synthetic data in a temporary directory, in the
formats the real data is stored in. Each synthetic image has some structure (a smooth field of
colour, a wave, noise: `synthetic_image`), so that its encoded size and its decoding cost are
like a photo's, which random pixels' are not. The TFDS datasets are written by TFDS's own
builders (their features, encoders and ArrayRecord writer), only where their examples come from
patched, as tests/test_data.py does:

  cifar10, cifar10_labels  TFDS 'cifar10': 32x32 PNG and a label (configs/cifar10.py, and
                           configs/cifar10_cond.py, which reads the labels too);
  celeb_a_hq               TFDS 'celeb_a_hq/256': 256x256 PNG (configs/celebahq256.py);
  lsun_church              TFDS 'lsun/church_outdoor': JPEGs of short side 256-400 that the
                           pipeline center-crops and resizes to 256 (configs/lsun_church256.py);
  folder32, folder256      `dataset='folder'` directories of 32x32 PNG and 256x256 JPEG files
                           (ddpm_jax/data/folder.py), with the configs of cifar10 and celebahq256.

Each is read by `data.train_batches(config, global_batch_size=config.training.batch_size,
start_step=0, seed=config.seed, buffer_size=2 * config.training.steps_per_call)`, as the train
loop calls it, from the config of configs/ with `config.data` pointed at the synthetic data (and
`data.download = False`), in each of --variants (`VARIANTS`): on one thread as before workers
existed ('thread'), on 1 and 2 worker processes, decoded once into memory, and decoded once into
a prepared copy. The variants of a dataset are timed side by side: all open at once, their
--windows windows of at least --window_seconds interleaved, each window begun by taking the
batches that were ready (read while another variant was timed), and only once the others are
idle (each reads ahead until its buffers are full). Per window: the images/s the
main thread takes (wall) and the CPU seconds per image of the process and its workers (every
thread), hence images/s per core; reported are medians over the windows, and the seconds from
the call to the first batch (workers starting, a split decoded once). By the per-core rate: the
cores a host needs to feed each TPU slice at XLA's estimated steps/s (`XLA_STEPS_PER_SEC`), and
what a v5p-8 host giving the pipeline `HOST_CORES` cores would deliver, against twice what its
chips consume.

Then, with --breakdown_examples > 0, where the CPU time of one example goes (`stage_costs`):
that many examples, drawn at random, each taken through all stages before the next (as the
pipeline does) on the main thread, each stage timed. For TFDS: reading the record (ArrayRecord),
parsing it (the tf.Example proto, its other features decoded), decoding the image (TFDS's
`Image.decode_example_np`: OpenCV where it is installed, else PIL) and `images.fit_image` (for
LSUN the center crop and Lanczos resize); for a folder: reading the file, decoding it
(`folder.read_image`) and `fit_image`. 'rest' is the pipeline's CPU per image less these stages
(the order, the prefetch thread, the batch's copy); timed apart from the stages (each of which
includes a microsecond or two of timing itself), it is within their noise where it is near 0, or
below.

--overrides sets any config field of every dataset, e.g. --overrides=training.batch_size=256;
a sweep over another setting is a loop over `measure_variants` with one override each.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import io
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from unittest import mock

# Before JAX starts: the pipeline asks JAX only for the process index, so it leaves a TPU or GPU
# alone (to a training run beside it).
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
import PIL.Image  # noqa: E402
import psutil  # noqa: E402
from absl import app, flags  # noqa: E402
from timing import append_json, parse_overrides  # noqa: E402
from train import load_config  # noqa: E402

from ddpm_jax import data  # noqa: E402
from ddpm_jax.data import folder, images  # noqa: E402
from ddpm_jax.data import tfds as tfds_data  # noqa: E402

# XLA's estimated train steps/s of the paper's models on TPU slices, at the paper's batch (image
# size: (batch, {slice: steps/s})): the compiler's estimates from BENCHMARKS.md ("TPU", libtpu
# 0.0.50.1; CIFAR10 in bfloat16, the faster, 256x256 in float32), not measurements.
XLA_STEPS_PER_SEC = {
  32: (128, {'v3-8': 59.8, 'v5p-8': 121.1, 'tpu7x-8': 295.5}),
  256: (64, {'v3-8': 3.2, 'v5e-8': 6.4, 'v5p-8': 9.1, 'v6e-8': 14.5, 'tpu7x-8': 31.9}),
}
HOST_CORES = 16  # Of a v5p-8 host's, given to the input pipeline (issue 30's bound).

NOISE_STD = 10.0  # Of `synthetic_image`, in levels of 0..255.
LSUN_JPEG_QUALITY = 75  # Our choice for the synthetic LSUN JPEGs.
FOLDER_JPEG_QUALITY = 90  # And for a folder of JPEG files.


def synthetic_image(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
  """uint8 [height, width, 3]: a smooth field of colour (4x4 random colours resized bicubically),
  a plane wave of random direction and frequency, and Gaussian noise of std `NOISE_STD`."""
  colours = PIL.Image.fromarray(rng.integers(0, 256, (4, 4, 3), np.uint8))
  image = np.asarray(colours.resize((width, height), PIL.Image.Resampling.BICUBIC), np.float32)
  y, x = np.mgrid[0:height, 0:width] / max(height, width)
  frequency = rng.uniform(1, 6, 2)
  image = image + 40 * np.sin(2 * np.pi * (frequency[0] * x + frequency[1] * y))[..., None]
  image += rng.normal(0, NOISE_STD, image.shape)
  return np.clip(image, 0, 255).round().astype(np.uint8)


def encode(image: np.ndarray, format: str, **options) -> bytes:
  """The image encoded by PIL in `format` ('PNG', 'JPEG')."""
  buffer = io.BytesIO()
  PIL.Image.fromarray(image).save(buffer, format=format, **options)
  return buffer.getvalue()


def _import_tfds():
  tfds = tfds_data.import_tfds()  # As the pipeline imports it.
  tfds.disable_progress_bar()
  return tfds


def prepare_tfds(name: str, data_dir: str, examples: Iterator[dict]) -> None:
  """Writes `examples` as the 'train' split of TFDS dataset `name` under `data_dir`, in
  ArrayRecord format, with TFDS's own builder: only its `_split_generators` is patched."""
  tfds = _import_tfds()

  def split_generators(self, dl_manager):
    return {'train': enumerate(examples)}

  builder_cls = tfds.builder_cls(tfds_data.base_name(name))
  with mock.patch.object(builder_cls, '_split_generators', split_generators):
    tfds.data_source(name, data_dir=data_dir, builder_kwargs={'file_format': 'array_record'})


# Each maker writes `num_examples` synthetic examples under a directory and returns the config
# overrides that read them.


def make_cifar10(directory: str, num_examples: int) -> dict:
  """TFDS 'cifar10': the builder PNG-encodes 32x32 images (with TF, as from the real download's
  arrays) and stores their labels."""
  rng = np.random.default_rng(0)
  examples = (
    {'id': f'train_{i:05d}', 'image': synthetic_image(rng, 32, 32), 'label': i % 10}
    for i in range(num_examples)
  )
  prepare_tfds('cifar10', directory, examples)
  return {'data.data_dir': directory}


def make_celeb_a_hq(directory: str, num_examples: int) -> dict:
  """TFDS 'celeb_a_hq/256', 256x256 images that the builder PNG-encodes. Its manual download
  (ProGAN's tar files) is needed only by the patched-out `_split_generators`."""
  rng = np.random.default_rng(1)
  examples = (
    {'image': synthetic_image(rng, 256, 256), 'image/filename': f'imgHQ{i:05d}.png'}
    for i in range(num_examples)
  )
  prepare_tfds('celeb_a_hq/256', directory, examples)
  return {'data.data_dir': directory}


def lsun_shape(rng: np.random.Generator) -> tuple[int, int]:
  """(height, width): a short side of 256-400, a long side 1-1.5 times it, either way round."""
  short = int(rng.integers(256, 401))
  long = int(short * rng.uniform(1.0, 1.5))
  return (short, long) if rng.random() < 0.5 else (long, short)


def make_lsun_church(directory: str, num_examples: int) -> dict:
  """TFDS 'lsun/church_outdoor': the builder stores the JPEG bytes of LSUN's LMDB unchanged, so
  they are encoded here (PIL, quality `LSUN_JPEG_QUALITY`)."""
  rng = np.random.default_rng(2)
  examples = (
    {
      'id': f'{i:040x}',
      'image': encode(synthetic_image(rng, *lsun_shape(rng)), 'JPEG', quality=LSUN_JPEG_QUALITY),
    }
    for i in range(num_examples)
  )
  prepare_tfds('lsun/church_outdoor', directory, examples)
  return {'data.data_dir': directory}


def write_folder(directory: str, num_examples: int, size: int, extension: str, **options) -> dict:
  """`num_examples` size x size image files in `directory`, encoded by PIL."""
  rng = np.random.default_rng(size)
  os.makedirs(directory)
  format = {'png': 'PNG', 'jpg': 'JPEG'}[extension]
  for i in range(num_examples):
    with open(os.path.join(directory, f'{i:06d}.{extension}'), 'wb') as f:
      f.write(encode(synthetic_image(rng, size, size), format, **options))
  return {'data.dataset': folder.NAME, 'data.image_dir': directory}


def make_folder32(directory: str, num_examples: int) -> dict:
  """32x32 PNG files (PIL's default compression)."""
  return write_folder(directory, num_examples, 32, 'png')


def make_folder256(directory: str, num_examples: int) -> dict:
  """256x256 JPEG files (quality `FOLDER_JPEG_QUALITY`)."""
  return write_folder(directory, num_examples, 256, 'jpg', quality=FOLDER_JPEG_QUALITY)


@dataclasses.dataclass(frozen=True)
class Case:
  """One measured dataset: the config (configs/<config>.py), the synthetic data's maker and how
  it is stored."""

  config: str
  make: Callable[[str, int], dict]
  stored: str


CASES = {
  'cifar10': Case('cifar10', make_cifar10, 'TFDS ArrayRecord, 32x32 PNG'),
  'cifar10_labels': Case('cifar10_cond', make_cifar10, 'TFDS ArrayRecord, 32x32 PNG + label'),
  'celeb_a_hq': Case('celebahq256', make_celeb_a_hq, 'TFDS ArrayRecord, 256x256 PNG'),
  'lsun_church': Case(
    'lsun_church256', make_lsun_church, 'TFDS ArrayRecord, JPEG short side 256-400'
  ),
  'folder32': Case('cifar10', make_folder32, 'folder, 32x32 PNG files'),
  'folder256': Case('celebahq256', make_folder256, 'folder, 256x256 JPEG files'),
}


# How the pipeline reads, each a set of config.data overrides: today's one thread, worker
# processes, the split decoded once into memory, or into a prepared copy (ddpm_jax/data/decoded.py).
VARIANTS = {
  'thread': {'data.num_workers': 0, 'data.cache_gib': 0},
  'workers_1': {'data.num_workers': 1, 'data.cache_gib': 0},
  'workers_2': {'data.num_workers': 2, 'data.cache_gib': 0},
  'memory': {'data.num_workers': 2, 'data.cache_gib': 64},
  'prepared': {'data.num_workers': 2, 'data.cache_gib': 0, 'data.prepared_dir': 'PREPARED'},
}


@dataclasses.dataclass
class Throughput:
  """The timed windows of one pipeline: images/s (wall) and CPU seconds per image of each, and
  the seconds from the call to its first batch (decoding the split once, starting workers)."""

  batch_size: int
  start_seconds: float
  images_per_sec: list[float]
  cpu_per_image: list[float]

  @property
  def rate(self) -> float:
    return statistics.median(self.images_per_sec)

  @property
  def per_core(self) -> float:
    """Images per CPU-second: the images/s of one fully busy core."""
    return 1 / statistics.median(self.cpu_per_image)


def cpu_seconds() -> float:
  """CPU seconds of this process (every thread) and of its live children (the workers)."""
  this = psutil.Process()
  return time.process_time() + sum(
    sum(child.cpu_times()[:2]) for child in this.children(recursive=True)
  )


def open_pipeline(config: ml_collections.ConfigDict, warmup_batches: int):
  """`data.train_batches` as the train loop builds it, after `warmup_batches`; and the seconds
  to its first batch."""
  began = time.perf_counter()
  batches = data.train_batches(
    config,
    global_batch_size=config.training.batch_size,
    start_step=0,
    seed=config.seed,
    buffer_size=2 * config.training.steps_per_call,
  )
  next(batches)
  start_seconds = time.perf_counter() - began
  for _ in range(warmup_batches - 1):
    next(batches)
  return batches, start_seconds


def settle(idle_share: float = 0.02, interval: float = 0.2) -> None:
  """Waits until this process and its workers use less than `idle_share` of a core: the
  pipelines not being timed have filled their buffers and wait."""
  while True:
    began = cpu_seconds()
    time.sleep(interval)
    if cpu_seconds() - began < idle_share * interval:
      return


def ready_batches(config: ml_collections.ConfigDict) -> int:
  """The most batches a pipeline has ready when it is taken up again: its prefetch buffer, and
  two a worker in flight."""
  return 2 * config.training.steps_per_call + 2 * config.data.num_workers


def time_window(
  batches, config: ml_collections.ConfigDict, window_seconds: float
) -> tuple[float, float]:
  """(images/s, CPU seconds per image) of the batches taken in one window: once the pipelines
  timed before it have filled their buffers (`settle`), after the batches that were ready."""
  settle()
  for _ in range(ready_batches(config) + 1):
    next(batches)
  num_batches, began, cpu_began = 0, time.perf_counter(), cpu_seconds()
  while (seconds := time.perf_counter() - began) < window_seconds:
    next(batches)
    num_batches += 1
  num_images = num_batches * config.training.batch_size
  return num_images / seconds, (cpu_seconds() - cpu_began) / num_images


def measure_variants(
  configs: dict[str, ml_collections.ConfigDict],
  *,
  warmup_batches: int,
  windows: int,
  window_seconds: float,
) -> dict[str, Throughput]:
  """Times the pipelines of `configs` side by side: all open at once (a pipeline not being timed
  has filled its buffers and waits), their windows interleaved, so that a change in the
  machine's load falls on all of them alike."""
  results, pipelines = {}, {}
  try:
    for name, config in configs.items():
      pipelines[name], start_seconds = open_pipeline(config, warmup_batches)
      results[name] = Throughput(config.training.batch_size, start_seconds, [], [])
    for _ in range(windows):
      for name, batches in pipelines.items():
        rate, cpu = time_window(batches, configs[name], window_seconds)
        results[name].images_per_sec.append(rate)
        results[name].cpu_per_image.append(cpu)
  finally:
    for batches in pipelines.values():
      batches.close()
  return results


def tfds_stages(config: ml_collections.ConfigDict) -> tuple[dict[str, Callable], int]:
  """The stages of reading a TFDS example (module docstring), each a function of the last one's
  result (the first of the example's index), and the number of examples."""
  tfds = _import_tfds()
  data_config = config.data
  image_key = data.get_dataset_info(config).image_key
  source = tfds.data_source(
    data_config.dataset, split=data_config.split, data_dir=data_config.data_dir
  )
  features = source.dataset_info.features
  skip_image = {image_key: tfds.decode.SkipDecoding()}
  stages = {
    'read': lambda index: source.data_source[index],
    'parse': lambda record: features.deserialize_example_np(record, decoders=skip_image),
    'decode': lambda example: features[image_key].decode_example_np(example[image_key]),
  }
  return stages, len(source)


def folder_stages(config: ml_collections.ConfigDict) -> tuple[dict[str, Callable], int]:
  """The stages of reading an image file, as `tfds_stages`."""
  source = data.create_source(config, config.data.split)

  def read(index):
    with open(os.path.join(source.directory, source.paths[index]), 'rb') as f:
      return f.read()

  stages = {'read': read, 'decode': lambda file: folder.read_image(io.BytesIO(file))}
  return stages, len(source)


def stage_costs(config: ml_collections.ConfigDict, num_examples: int) -> tuple[dict, float]:
  """CPU seconds per example of each stage of reading `num_examples` examples drawn at random,
  and the mean stored bytes of one. As in the pipeline, each example goes through all stages
  before the next one starts: each stage is timed on its own."""
  make_stages = folder_stages if config.data.dataset == folder.NAME else tfds_stages
  stages, num_stored = make_stages(config)
  data_config = config.data
  stages['fit'] = lambda image: images.fit_image(
    image, size=data_config.image_size, num_channels=data_config.num_channels
  )
  indices = np.random.default_rng(0).permutation(num_stored)[:num_examples]
  seconds, stored_bytes = dict.fromkeys(stages, 0.0), []
  for index in indices:
    value = int(index)
    for name, stage in stages.items():
      began = time.process_time()
      value = stage(value)
      seconds[name] += time.process_time() - began
      if name == 'read':
        stored_bytes.append(len(value))
  costs = {name: total / len(indices) for name, total in seconds.items()}
  return costs, float(np.mean(stored_bytes))


def _us(seconds: float) -> str:
  return f'{seconds * 1e6:,.0f}'


def cores_needed(throughput: Throughput, image_size: int) -> dict[str, float]:
  """{slice: cores}: the cores, at this per-core rate, that feed each TPU slice at XLA's
  estimated steps/s of the model of this image size."""
  batch, steps_per_sec = XLA_STEPS_PER_SEC[image_size]
  return {name: rate * batch / throughput.per_core for name, rate in steps_per_sec.items()}


def tables(results: list[dict]) -> str:
  """The markdown tables of the results: throughput, the v5p-8 check, where the time goes."""
  lines = [
    '| data | stored as | read by | first batch after | images/s (wall) | CPU us/image | '
    'images/s per core | XLA estimate: steps/s, cores to feed it |',
    '|---|---|---|---|---|---|---|---|',
  ]
  for result in results:
    throughput = result['throughput']
    estimate = XLA_STEPS_PER_SEC[result['image_size']][1]
    feeds = '; '.join(
      f'{name} {estimate[name]:g}: {cores:.2g}' for name, cores in result['cores_needed'].items()
    )
    lines.append(
      f'| {result["dataset"]} | {result["stored"]} | {result["variant"]} | '
      f'{result["start_seconds"]:.1f} s | {throughput.rate:,.0f} | '
      f'{_us(1 / throughput.per_core)} | {throughput.per_core:,.0f} | {feeds} |'
    )
  lines += [
    '',
    f'| data | 2 workers / 1 | per core: stored (best of threads, workers) / decoded once | '
    f'a v5p-8 host, {HOST_CORES} cores: images/s stored / decoded once, against twice '
    'the estimate |',
    '|---|---|---|---|',
  ]
  by_dataset = {}
  for result in results:
    by_dataset.setdefault(result['dataset'], {})[result['variant']] = result
  for name, variants in by_dataset.items():
    rate = {variant: r['throughput'].rate for variant, r in variants.items()}
    per_core = {variant: r['throughput'].per_core for variant, r in variants.items()}
    ratio = (
      rate['workers_2'] / rate['workers_1'] if {'workers_1', 'workers_2'} <= set(rate) else None
    )
    stored = max(
      (per_core[v] for v in ('thread', 'workers_1', 'workers_2') if v in per_core), default=0
    )
    once = max((per_core[v] for v in ('memory', 'prepared') if v in per_core), default=0)
    batch, steps_per_sec = XLA_STEPS_PER_SEC[next(iter(variants.values()))['image_size']]
    need = 2 * steps_per_sec['v5p-8'] * batch
    lines.append(
      f'| {name} | {f"{ratio:.2f}x" if ratio else "-"} | {stored:,.0f} / {once:,.0f} | '
      f'{HOST_CORES * stored:,.0f} / {HOST_CORES * once:,.0f} against {need:,.0f} |'
    )
  broken_down = [result for result in results if result['stages']]
  if broken_down:
    lines += [
      '',
      '| data | stored bytes per example | CPU us per image: read | parse | image decode | '
      'fit (crop, resize) | rest |',
      '|---|---|---|---|---|---|---|',
    ]
    for result in broken_down:
      stages = result['stages']
      rest = 1 / result['throughput'].per_core - sum(stages.values())
      parse = _us(stages['parse']) if 'parse' in stages else '-'
      lines.append(
        f'| {result["dataset"]} | {result["stored_bytes"]:,.0f} | {_us(stages["read"])} | '
        f'{parse} | {_us(stages["decode"])} | {_us(stages["fit"])} | {_us(rest)} |'
      )
  return '\n'.join(lines)


def _versions() -> dict[str, str]:
  versions = {
    package: importlib.metadata.version(package)
    for package in ('numpy', 'pillow', 'tensorflow_datasets', 'array_record')
  }
  # TFDS's `Image.decode_example_np` decodes with OpenCV where it is installed, else with PIL.
  versions['tfds_image_decoder'] = 'opencv' if importlib.util.find_spec('cv2') else 'pil'
  return versions


def main(argv):
  del argv
  FLAGS = flags.FLAGS
  for name, choices in (('datasets', CASES), ('variants', VARIANTS)):
    unknown = sorted(set(FLAGS[name].value) - set(choices))
    if unknown:
      raise app.UsageError(f'--{name}: unknown {unknown}; choose from {", ".join(choices)}')
  overrides = parse_overrides(FLAGS.overrides)
  machine = {
    'cpu_cores': len(os.sched_getaffinity(0)),
    'load_average': os.getloadavg()[0],
    **_versions(),
  }
  print(' '.join(f'{key}={value}' for key, value in machine.items()), flush=True)
  results = []
  with tempfile.TemporaryDirectory(prefix='ddpm_input_pipeline_') as root:
    made = {}  # maker -> the config overrides that read its data.
    for name in FLAGS.datasets:
      case = CASES[name]
      if case.make not in made:
        began = time.perf_counter()
        made[case.make] = case.make(os.path.join(root, case.make.__name__), FLAGS.num_examples)
        print(f'{name}: made {FLAGS.num_examples} examples in {time.perf_counter() - began:.1f} s')
      configs = {}
      for variant in FLAGS.variants:
        settings = dict(VARIANTS[variant])
        if 'data.prepared_dir' in settings:
          settings['data.prepared_dir'] = os.path.join(root, f'prepared_{name}')
        configs[variant] = load_config(
          case.config, **{'data.download': False}, **made[case.make], **settings, **overrides
        )
      measured = measure_variants(
        configs,
        warmup_batches=FLAGS.warmup_batches,
        windows=FLAGS.windows,
        window_seconds=FLAGS.window_seconds,
      )
      stages, stored_bytes = {}, None
      if FLAGS.breakdown_examples:
        stages, stored_bytes = stage_costs(configs[FLAGS.variants[0]], FLAGS.breakdown_examples)
      for variant, throughput in measured.items():
        image_size = configs[variant].data.image_size
        result = {
          'dataset': name,
          'variant': variant,
          'stored': case.stored,
          'batch_size': throughput.batch_size,
          'image_size': image_size,
          'start_seconds': throughput.start_seconds,
          'throughput': throughput,
          'cores_needed': cores_needed(throughput, image_size),
          'stages': stages if variant == FLAGS.variants[0] else {},
          'stored_bytes': stored_bytes,
        }
        results.append(result)
        print(
          f'{name} {variant}: {throughput.rate:,.0f} images/s (windows '
          f'{", ".join(f"{rate:,.0f}" for rate in throughput.images_per_sec)}), '
          f'{throughput.per_core:,.0f} images/s per core, first batch after '
          f'{throughput.start_seconds:.1f} s',
          flush=True,
        )
        append_json(
          FLAGS.json_out,
          {
            'benchmark': 'input_pipeline',
            'config': case.config,
            'overrides': overrides | VARIANTS[variant],
            'num_examples': FLAGS.num_examples,
            **machine,
            **{key: value for key, value in result.items() if key != 'throughput'},
            'images_per_sec': throughput.images_per_sec,
            'cpu_seconds_per_image': throughput.cpu_per_image,
          },
        )
  print(tables(results))


if __name__ == '__main__':
  flags.DEFINE_list('datasets', list(CASES), ', '.join(CASES))
  flags.DEFINE_list('variants', list(VARIANTS), ', '.join(VARIANTS))
  flags.DEFINE_integer(
    'num_examples', 512, "Examples in each synthetic dataset's training split (its only split)."
  )
  flags.DEFINE_integer('warmup_batches', 2, 'Batches read before the timed windows.')
  flags.DEFINE_integer('windows', 3, 'Timed windows per dataset; the median is reported.')
  flags.DEFINE_float('window_seconds', 2.0, 'Each window times batches for at least this long.')
  flags.DEFINE_integer(
    'breakdown_examples', 128, 'Examples whose stages are timed one by one; 0: none.'
  )
  flags.DEFINE_multi_string(
    'overrides',
    [],
    'A config override of every dataset, section.field=value, e.g. training.batch_size=256; '
    'repeatable.',
  )
  flags.DEFINE_string('json_out', None, 'Append each figure as a JSON line to this file.')
  app.run(main)

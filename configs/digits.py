"""The embedded example: a small DDPM on scikit-learn's 8x8 handwritten digits, on a CPU.

Needs no download. On a 2-core CPU it trains in under 5 minutes, compilation and the final
64-sample grid included, to samples that the digits measure rates close to real digits
(BENCHMARKS.md has the measurements):
  python main.py --config=configs/digits.py --mode=train --workdir=/tmp/ddpm_digits
Then 64 samples and the progressive figure of paper Fig. 6, and the evaluation (bits/dim and the
digits measure):
  python main.py --config=configs/digits.py --mode=sample --workdir=/tmp/ddpm_digits
  python main.py --config=configs/digits.py --mode=eval --workdir=/tmp/ddpm_digits
Inpainting (RePaint: the bottom half of 16 test digits) and SDEdit (README, "Edit images"):
  python main.py --config=configs/digits.py --mode=sample --workdir=/tmp/ddpm_digits \
      --config.sampling.kinds=inpaint,sdedit --config.sampling.sampler=respaced \
      --config.sampling.steps=250 --config.sampling.sdedit_strength=0.3
The diffusion is the paper's (linear betas 1e-4..0.02, T = 1000, eps prediction, fixedlarge);
the network (1.0M parameters) and the optimizer are sized for 1,497 tiny grey images and a CPU: a
larger learning rate with a short warmup and a cosine decay, and a fast EMA. Samples are drawn
with DPM-Solver++ in 20 network evaluations instead of the paper's 1,000 ancestral steps, which
buys the training steps; `--config.sampling.sampler=ancestral` draws them the paper's way.
"""

from configs import default


def get_config():
  config = default.get_config()

  config.data.dataset = 'digits'
  config.data.image_size = 8
  config.data.num_channels = 1
  config.data.random_flip = False  # Mirrored digits are not digits.

  config.model.ch = 32
  config.model.ch_mult = (1, 2)
  config.model.num_res_blocks = 2
  config.model.attn_resolutions = (4,)
  config.model.dropout = 0.0

  training = config.training
  training.batch_size = 64
  training.num_train_steps = 4000
  training.learning_rate = 2e-3
  training.warmup_steps = 100
  training.lr_decay = 'cosine'
  training.ema_decay = 0.995
  training.log_every_steps = 100
  training.checkpoint_every_steps = 1000
  training.sample_every_steps = 4000
  training.num_sample_images = 64

  # The grids of training, --mode=sample's 'samples' and --mode=eval's samples: DPM-Solver++(2M)
  # with 20 network evaluations (BENCHMARKS.md compares the samplers on this model).
  config.sampling.sampler = 'dpm_solver++'
  config.sampling.steps = 20
  # 64 samples and the progressive figure (paper Fig. 6) of 8 digits, in one command.
  config.sampling.kinds = 'samples,progressive'

  # --mode=eval: bits/dim on the whole test split, and the digits measure on 256 samples.
  config.eval.num_bpd_images = 300
  config.eval.bpd_batch_size = 100
  config.eval.num_samples = 256
  config.sampling.batch_size = 128
  return config

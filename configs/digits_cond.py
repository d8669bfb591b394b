"""The embedded example, class-conditional: draw the digit you ask for.

The digits model of configs/digits.py (the same network, diffusion, optimizer, steps and CPU
time) with a class embedding for the 10 digits (`model.num_classes`), trained with 10% of its
labels replaced by the null class (`training.label_dropout`) so that it also learns the
unconditional model, and sampled with classifier-free guidance (Ho & Salimans 2021) at the scale
chosen in BENCHMARKS.md ("Conditional digits"). Train, then draw any digit, e.g. 100 sevens:
  python main.py --config=configs/digits_cond.py --mode=train --workdir=/tmp/ddpm_digits_cond
  python main.py --config=configs/digits_cond.py --mode=sample --workdir=/tmp/ddpm_digits_cond \
    --config.sampling.class_labels=7
--mode=eval adds to the digits measure how often the classifier recognizes the digit asked for,
overall and per digit.
"""

from configs import digits


def get_config():
  config = digits.get_config()
  config.model.num_classes = 10
  config.training.label_dropout = 0.1
  # The guidance scale s of out_u + s (out_c - out_u): chosen on the sweep of BENCHMARKS.md.
  config.sampling.guidance_scale = 1.25
  # The grids: 10 samples of each digit, one row per digit (all classes in turn).
  config.training.num_sample_images = 100
  config.sampling.num_samples = 100
  config.eval.num_samples = 260  # 26 of each digit.
  return config

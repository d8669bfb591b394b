"""CIFAR10 exactly as in the paper (Ho et al. 2020, Sec. 4 and Appendix B): FID 3.17.

35.7M-parameter U-Net, batch 128, Adam 2e-4 with 5,000 warmup steps, EMA 0.9999, 800k steps,
dropout 0.1, random flips, eps prediction with fixedlarge variance and L_simple. Run with
  python main.py --config=configs/cifar10.py --mode=train --workdir=/tmp/ddpm_cifar10
The first run downloads and prepares the data (see ddpm_jax/data/tfds.py).
"""

from configs import default


def get_config():
  return default.get_config()

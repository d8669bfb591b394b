"""LSUN Church 256x256 as in the paper (Appendix B): FID 7.89 after 1.2M steps.

The 256x256 setup of configs/default256.py, random flips. Run with
  python main.py --config=configs/lsun_church256.py --mode=train --workdir=/tmp/ddpm_lsun_church256
The first run downloads and prepares the data (see ddpm_jax/data/tfds.py).
"""

from configs import default256


def get_config():
  config = default256.get_config()
  config.data.dataset = 'lsun/church_outdoor'
  config.data.random_flip = True
  config.training.num_train_steps = 1_200_000
  return config

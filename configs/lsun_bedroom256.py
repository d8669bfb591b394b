"""LSUN Bedroom 256x256 as in the paper (Appendix B): FID 4.90 after 2.4M steps.

The 256x256 setup of configs/default256.py, random flips. Run with
  python main.py --config=configs/lsun_bedroom256.py --mode=train --workdir=/tmp/ddpm_bedroom
The first run downloads and prepares the data (see ddpm_jax/data/tfds.py).
"""

from configs import default256


def get_config():
  config = default256.get_config()
  config.data.dataset = 'lsun/bedroom'
  config.data.random_flip = True
  config.training.num_train_steps = 2_400_000
  return config

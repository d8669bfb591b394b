"""CelebA-HQ 256x256 as in the paper (Appendix B): 0.5M steps.

The 256x256 setup of configs/default256.py, random flips. TFDS needs the
CelebA-HQ files downloaded by hand first. Run with
  python main.py --config=configs/celebahq256.py --mode=train --workdir=/tmp/ddpm_celebahq256
The first run then prepares the data (see ddpm_jax/data/tfds.py).
"""

from configs import default256


def get_config():
  config = default256.get_config()
  config.data.dataset = 'celeb_a_hq/256'
  config.data.random_flip = True
  config.training.num_train_steps = 500_000
  return config

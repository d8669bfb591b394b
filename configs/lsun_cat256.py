"""LSUN Cat 256x256 as in the paper (Appendix B): 1.8M steps.

The 256x256 setup of configs/default256.py, no random flips (as the original). Run
with
  python main.py --config=configs/lsun_cat256.py --mode=train --workdir=/tmp/ddpm_lsun_cat256
The first run downloads and prepares the data (see ddpm_jax/data/tfds.py).
"""

from configs import default256


def get_config():
  config = default256.get_config()
  config.data.dataset = 'lsun/cat'
  config.data.random_flip = False
  config.training.num_train_steps = 1_800_000
  return config

"""LSUN Bedroom 256x256 as in the paper (Appendix B): FID 4.90 after 2.4M steps.

Batch 64, Adam 2e-5, dropout 0, fixedsmall variance, random flips. Run with
  python main.py --config=configs/lsun_bedroom256.py --mode=train --workdir=/tmp/ddpm_bedroom
The data must be prepared once (see ddpm_jax/input_pipeline.py).
"""

from configs import default


def get_config():
  config = default.get_config()
  config.data.dataset = 'lsun/bedroom'
  config.data.image_size = 256
  config.data.random_flip = True

  # The 256x256 network: 113,673,219 parameters.
  config.model.ch_mult = (1, 1, 2, 2, 4, 4)
  config.model.attn_resolutions = (16,)
  config.model.dropout = 0.0

  config.diffusion.model_var_type = 'fixedsmall'

  config.training.batch_size = 64
  config.training.learning_rate = 2e-5
  config.training.num_train_steps = 2_400_000
  config.training.sample_every_steps = 100_000
  config.training.num_sample_images = 16
  return config

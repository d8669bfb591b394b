"""The paper's 256x256 setup (Appendix B), shared by CelebA-HQ and the LSUN configs.

113,673,219-parameter U-Net (ch_mult (1, 1, 2, 2, 4, 4), attention at 16x16), batch 64,
Adam 2e-5, dropout 0, fixedsmall variance. The dataset configs set the data and the length.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.data.image_size = 256

  config.model.ch_mult = (1, 1, 2, 2, 4, 4)
  config.model.attn_resolutions = (16,)
  config.model.dropout = 0.0

  config.diffusion.model_var_type = 'fixedsmall'

  config.training.batch_size = 64
  config.training.learning_rate = 2e-5
  config.training.sample_every_steps = 100_000
  config.training.num_sample_images = 16
  return config

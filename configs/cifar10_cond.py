"""CIFAR10, class-conditional with classifier-free guidance (Ho & Salimans 2021).

The paper's CIFAR10 setup (configs/cifar10.py: the 35.7M-parameter U-Net, batch 128, 800k steps)
with a learned embedding of the 10 CIFAR10 classes (TFDS 'label': airplane, automobile, bird,
cat, deer, dog, frog, horse, ship, truck) added to the timestep embedding, labels dropped to the
null class 10% of the time in training, and a guidance scale s = 1.3 (w = 0.3 in Ho & Salimans'
eps = (1 + w) eps_c - w eps_u, in the range where their FID is lowest). Train, draw, and compute
the FID of 50,000 samples (5,000 of each class, classes in turn):
  python main.py --config=configs/cifar10_cond.py --mode=train --workdir=/tmp/ddpm_cifar10_cond
  python main.py --config=configs/cifar10_cond.py --mode=sample --workdir=/tmp/ddpm_cifar10_cond \
    --config.sampling.class_labels=3
  python main.py --config=configs/cifar10_cond.py --mode=eval --workdir=/tmp/ddpm_cifar10_cond \
    --config.eval.inception_weights=inception_fid.npz
(README.md, "Evaluate", says how to make inception_fid.npz.) Each guided sampling step evaluates
the network on twice the batch; `--config.sampling.guidance_scale=1` samples without guidance.
"""

from configs import cifar10


def get_config():
  config = cifar10.get_config()
  config.model.num_classes = 10
  config.training.label_dropout = 0.1
  config.sampling.guidance_scale = 1.3
  config.training.num_sample_images = 100  # 10 of each class, a row per class.
  return config

"""Default hyperparameters: the paper's CIFAR10 setup (Ho et al. 2020, Appendix B).

Every other config imports `get_config()` from here and overrides what differs. Run with
  python main.py --config=configs/cifar10.py --mode=train --workdir=/tmp/ddpm_cifar10
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0

  # Data (ddpm_jax/data/ says how each dataset is read). `dataset` is 'digits'
  # (embedded, no download), 'folder' (the PNG / JPEG files under `image_dir`) or a TFDS name:
  # the paper's ('cifar10', 'celeb_a_hq/256', 'lsun/church_outdoor', ...) or any other TFDS image
  # dataset ('mnist', 'oxford_flowers102', ...).
  config.data = data = ml_collections.ConfigDict()
  data.dataset = 'cifar10'
  # Images are center-cropped and resized to image_size x image_size (unless already so) and
  # made greyscale (num_channels = 1) or RGB (3); the paper's datasets must already have this
  # size (except LSUN) and these channels.
  data.image_size = 32
  data.num_channels = 3
  data.random_flip = True
  data.split = 'train'  # The split training reads.
  # The held-out split for bits/dim; None: the dataset's own ('test', else 'validation', if any).
  data.eval_split = ml_collections.config_dict.placeholder(str)
  data.data_dir = ml_collections.config_dict.placeholder(str)  # TFDS data_dir; None: its default.
  # A TFDS dataset not prepared in data_dir is downloaded and prepared there on first use (by
  # process 0; the others wait). False: stop instead, printing the command that prepares it.
  data.download = True
  # For dataset = 'folder': split 'train' is the images under image_dir (searched recursively),
  # split 'test', the eval split, those under eval_image_dir (None: no eval split).
  data.image_dir = ml_collections.config_dict.placeholder(str)
  data.eval_image_dir = ml_collections.config_dict.placeholder(str)
  # Class labels, read only for a class-conditional model (config.model.num_classes = K > 0, the
  # dataset's number of classes): the digits' '0'..'9'; a TFDS dataset's tfds.features.ClassLabel
  # feature label_key (None: the one named 'label', else the only one); a folder's classes, one
  # subdirectory of image_dir (and of eval_image_dir) per class.
  data.label_key = ml_collections.config_dict.placeholder(str)
  # The host's input pipeline (ddpm_jax/data/workers.py, decoded.py). Worker processes that read
  # and decode examples; None: all the host's cores but 2, at most 32 (0 on 2 cores or fewer);
  # 0: one thread.
  data.num_workers = ml_collections.config_dict.placeholder(int)
  # The training split is decoded once into host memory where that takes at most cache_gib GiB
  # (CIFAR10: 0.14); 0: never.
  data.cache_gib = 1.0
  # A directory: the training split is decoded once into an uncompressed copy there and read
  # from it (LSUN's crop and resize done once; 24.8 GB for church_outdoor at 256x256). None: no
  # copy.
  data.prepared_dir = ml_collections.config_dict.placeholder(str)

  # The U-Net (REFERENCE.md, "The U-Net").
  config.model = model = ml_collections.ConfigDict()
  model.ch = 128
  model.ch_mult = (1, 2, 2, 2)
  model.num_res_blocks = 2
  model.attn_resolutions = (16,)
  model.dropout = 0.1
  model.resamp_with_conv = True
  # Compute dtype of convolutions and dense layers: 'float32' (the paper's), 'bfloat16', or None
  # (the default): the platform's, bfloat16 on TPUs and NVIDIA GPUs from Ampere on, float32 on
  # CPUs and older GPUs (`models.compute_dtype`; what it changes: README, "Precision").
  # Parameters, Adam state and EMA stay float32, and GroupNorm and the attention softmax compute
  # in float32.
  model.dtype = ml_collections.config_dict.placeholder(str)
  # Recompute each ResNet / attention block's activations in the backward pass (jax.checkpoint)
  # instead of storing them: a smaller peak memory for ~1/3 more compute; the same function.
  model.remat = False
  # jax.nn.dot_product_attention's implementation: None (XLA, any device) or 'cudnn' (cuDNN's
  # fused attention: NVIDIA GPUs, bfloat16, head size = channels at the attention resolution).
  model.attention_impl = ml_collections.config_dict.placeholder(str)
  # Class conditioning: 0 (the paper's) is unconditional; K > 0 conditions the U-Net on a label
  # y in [0, K] through a learned embedding added to the timestep embedding (label_emb, [K + 1,
  # 4 ch]), label K being the null ("no class") label of classifier-free guidance.
  model.num_classes = 0

  # The diffusion process and its parameterization.
  config.diffusion = diffusion = ml_collections.ConfigDict()
  diffusion.beta_schedule = 'linear'
  diffusion.beta_start = 1e-4
  diffusion.beta_end = 0.02
  diffusion.num_diffusion_timesteps = 1000
  # What the network predicts: 'eps' (the noise, the paper's), 'xstart' (x_0), 'xprev' (the
  # posterior mean of x_{t-1}) or 'v' (sqrt(abar_t) eps - sqrt(1 - abar_t) x_0, Salimans & Ho 2022).
  diffusion.model_mean_type = 'eps'
  diffusion.model_var_type = 'fixedlarge'
  diffusion.loss_type = 'mse'
  # The weighting of the mse loss (and of hybrid's L_simple term) over timesteps: 'none' (the
  # paper's unweighted L_simple) or 'min_snr' (Hang et al. 2023: min(SNR_t, gamma) on the x_0
  # loss, expressed in the target space of model_mean_type; not with loss_type 'kl').
  diffusion.loss_weighting = 'none'
  diffusion.min_snr_gamma = 5.0  # Min-SNR's gamma (> 0), the paper's default; read by 'min_snr'.

  # Optimization: Adam, linear warmup then constant, global-norm clipping, EMA.
  config.training = training = ml_collections.ConfigDict()
  training.batch_size = 128  # Global batch, over all devices of all processes.
  training.num_train_steps = 800_000
  # Train steps per compiled call (a loop over that many batches): the host dispatches once per
  # call. The updates are the same for any value (bitwise on CPU); a call ends early at each step
  # where something is logged, saved or sampled. 4 rather than 1: on CPU the CIFAR10 step runs
  # 5-20% faster (BENCHMARKS.md); a SIGTERM is answered at the end of the running call.
  training.steps_per_call = 4
  training.learning_rate = 2e-4
  training.warmup_steps = 5000
  # After the warmup: 'none' (constant, the paper's) or 'cosine' (to 0 at num_train_steps, so
  # that raising num_train_steps to extend a run changes the rates of the steps still to come).
  training.lr_decay = 'none'
  training.grad_clip = 1.0
  training.adam_b1 = 0.9
  training.adam_b2 = 0.999
  training.adam_eps = 1e-8
  training.ema_decay = 0.9999
  # A class-conditional model (config.model.num_classes > 0): the share of training labels
  # replaced by the null class, so that one network also learns the unconditional model that
  # classifier-free guidance needs (Ho & Salimans 2021 use 0.1 or 0.2); 0: no guidance.
  training.label_dropout = 0.1
  # Fine-tuning: a run whose workdir has no checkpoint yet starts its params and EMA params from
  # this checkpoint (a trained or imported workdir, or one of its step directories), at step 0
  # with a fresh optimizer; once it has checkpoints of its own, it resumes from those.
  training.init_from = ml_collections.config_dict.placeholder(str)
  training.log_every_steps = 100
  training.checkpoint_every_steps = 10_000
  training.keep_checkpoints = 3
  training.sample_every_steps = 50_000
  training.num_sample_images = 64

  # --mode=sample (ddpm_jax/generate.py): files in <workdir>/samples/, their paths printed.
  # --mode=eval draws its samples with the same sampler, its settings, batch_size and
  # checkpoint_step (ddpm_jax/sample_loop.py); every field is checked by ddpm_jax/samplers.py.
  config.sampling = sampling = ml_collections.ConfigDict()
  # Comma-separated, any of: 'samples' (num_samples images as .npz and a .png grid),
  # 'progressive' (paper Fig. 6), 'denoising_chain' (Fig. 7), 'interpolation' (Fig. 8).
  sampling.kinds = 'samples'
  # The sampler of 'samples' (and of the training grids and --mode=eval; ddpm_jax/samplers.py):
  # 'ancestral' (the paper's Algorithm 2, all T steps), 'ddim' (Song et al. 2021), 'respaced'
  # (the ancestral sampler on `steps` of the T timesteps, Nichol & Dhariwal 2021) or
  # 'dpm_solver++' (DPM-Solver++(2M), Lu et al. 2022).
  sampling.sampler = 'ancestral'
  sampling.steps = 50  # Network evaluations per sample, for every sampler but 'ancestral'.
  sampling.ddim_eta = 0.0  # 0: deterministic DDIM; 1: the variance of the ancestral sampler.
  # dpm_solver++'s treatment of the predicted x_0: 'static' (clipped to [-1, 1], as the other
  # samplers do), 'dynamic' (Imagen's percentile thresholding) or 'none'.
  sampling.thresholding = 'static'
  # A class-conditional model: the classes to draw (sample i of classes[i mod len], e.g.
  # --config.sampling.class_labels=7 or "(3,5)"); None: all classes in turn. And the
  # classifier-free guidance scale s, out_u + s (out_c - out_u): 1 is the conditional model
  # without guidance, 0 the unconditional one, larger is more class-typical and less diverse.
  sampling.class_labels = ml_collections.config_dict.placeholder(tuple)
  sampling.guidance_scale = 1.0
  sampling.num_samples = 64
  sampling.batch_size = 64  # Global images per batch, a multiple of the device count.
  sampling.checkpoint_step = ml_collections.config_dict.placeholder(int)  # None: the latest.
  # The figures, with the ancestral sampler. t is 0-based: t = 999 is the paper's x_1000.
  sampling.progressive_every = 100  # Fig. 6: the predicted x_0 every this many steps,
  sampling.progressive_images = 8  # for this many samples (one row each).
  sampling.chain_t = (999, 749, 499, 249)  # Fig. 7: a row per shared x_t,
  sampling.chain_samples = 7  # with this many samples of p(x_0 | x_t).
  sampling.interpolation_t = 499  # Fig. 8: x_t of 500 diffusion steps,
  sampling.interpolation_steps = 11  # lambda = 0, 0.1, ..., 1,
  # between consecutive pairs of these images of the eval split (train if there is none).
  sampling.interpolation_images = (0, 1, 2, 3)
  # The editing kinds (ddpm_jax/editing.py), with `sampler`: 'inpaint' (RePaint) and 'sdedit'.
  # Their images: None (the dataset's eval split, train if there is none), an .npz (array
  # 'images', uint8 [N, H, W, C]) or a folder of PNG / JPEG files, of the model's size; the
  # first edit_num_images of them.
  sampling.edit_images = ml_collections.config_dict.placeholder(str)
  sampling.edit_num_images = 16
  # What 'inpaint' fills in: 'center', 'left_half', 'bottom_half', 'random_boxes' (3 an image,
  # drawn from the seed), or a mask image of the model's size (white kept, black inpainted).
  sampling.inpaint_mask = 'bottom_half'
  # RePaint's resampling (Lugmayr et al. 2022): after every jump_length levels down, jump back
  # up that many, jump_n_sample - 1 times (1: no resampling). The paper's and diffusers' 10, 10.
  # 'inpaint' takes the samplers 'ancestral', 'respaced' (the paper's: 250 steps) and 'ddim'.
  sampling.jump_length = 10
  sampling.jump_n_sample = 10
  # 'sdedit' (Meng et al. 2022): the images are diffused to t0 = strength T (in (0, 1]; 1 is
  # sampling from noise) and denoised by the sampler's last strength * steps steps.
  sampling.sdedit_strength = 0.5

  # --mode=eval (ddpm_jax/evaluation.py): the paper's protocol.
  config.eval = evaluation = ml_collections.ConfigDict()
  evaluation.num_bpd_images = 10_000  # The whole CIFAR10 test split.
  evaluation.bpd_batch_size = 64
  evaluation.num_samples = 50_000
  # The FID Inception weights (.npz; README.md, "Evaluate" says how to make them).
  evaluation.inception_weights = ml_collections.config_dict.placeholder(str)
  evaluation.inception_batch_size = 100  # Global images per Inception call.

  return config

"""ddpm-jax: Denoising Diffusion Probabilistic Models (Ho, Jain, Abbeel 2020) in JAX/Flax."""

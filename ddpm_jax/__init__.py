"""ddpm-jax: Denoising Diffusion Probabilistic Models (Ho, Jain, Abbeel 2020) in JAX/Flax."""

from ddpm_jax import xla_cpu

xla_cpu.configure()

"""Gaussian diffusion as pure functions over a model function (no Linen, no I/O).

schedule   SchedulerConfig (diffusers' scheduler_config.json), betas, respaced timesteps
gaussian   Diffusion: q_sample, eps/x0/v conversions, MSE / min-SNR / hybrid (learned variance) loss
samplers   DDPM, DDIM, DPM-Solver++(2M), UnCLIP as one compiled loop each; thresholding;
           inpainting by replacement (known_x0 / known_mask)
guidance   classifier-free guidance in one batched pass; condition dropout
cascade    super-resolution conditioning: noise-conditioning augmentation, blur augmentation
degradation  BSR-style degradation of an upsampler's input (blurs, resize, noise, JPEG)
interpolation  slerp of embeddings and x_T (unCLIP's interpolations)

Shapes (all modules): B batch, H height, W width, C image channels, T train timesteps, K steps.
"""
from dalle_jax.diffusion.cascade import NoiseAugmentation, gaussian_blur, random_blur
from dalle_jax.diffusion.gaussian import Diffusion
from dalle_jax.diffusion.guidance import classifier_free_guidance, drop_condition
from dalle_jax.diffusion.interpolation import slerp
from dalle_jax.diffusion.samplers import dynamic_threshold, sample, static_clip
from dalle_jax.diffusion.schedule import SchedulerConfig, betas, alphas_cumprod, timesteps

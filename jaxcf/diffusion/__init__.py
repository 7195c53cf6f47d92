"""The shared diffusion core: noise schedules and DDIM inversion / sampling / guidance."""

from jaxcf.diffusion.ddim import (
    chain_guided_denoise,
    ddim_invert,
    ddim_sample,
    ddim_step,
    denoise_to_x0,
    edit_mask,
    eps_from_v,
    grow_mask,
    guidance_gradient,
    guided_denoise,
    guided_eps,
    normalized_gradient,
    predict_x0,
)
from jaxcf.diffusion.losses import PREDICTIONS, as_eps_fn, denoising_loss, q_sample
from jaxcf.diffusion.schedules import SCHEDULES, NoiseSchedule, ddim_timesteps, grid_alphas, make_schedule

__all__ = [
    "PREDICTIONS", "SCHEDULES", "NoiseSchedule", "as_eps_fn", "chain_guided_denoise", "denoising_loss", "ddim_invert",
    "ddim_sample", "ddim_step", "ddim_timesteps", "denoise_to_x0", "edit_mask", "eps_from_v",
    "grid_alphas", "grow_mask", "guidance_gradient", "guided_denoise", "guided_eps", "make_schedule", "normalized_gradient",
    "predict_x0", "q_sample",
]

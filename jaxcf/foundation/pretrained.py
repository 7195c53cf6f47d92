"""A pretrained foundation: CLIP (HF layout) + Stable Diffusion (diffusers layout)."""

from __future__ import annotations

import jax.numpy as jnp

from jaxcf.diffusion import eps_from_v, make_schedule
from jaxcf.foundation.core import Foundation
from jaxcf.train.precision import compute_dtype


def pretrained_foundation(config) -> Foundation:
    """CLIP + Stable Diffusion by hub id or local folder (``config.foundation.*_checkpoint``).

    The diffusion model is used unconditionally (the empty prompt); inversion and guidance run on
    VAE latents and the guidance gradient flows through the VAE decoder.
    """
    from jaxcf.models.clip import load_clip, load_tokenizer
    from jaxcf.models.stable_diffusion import load_stable_diffusion
    from jaxcf.models.vae import image_to_latent, latent_to_image

    fc = config.foundation
    dtype = compute_dtype(config.dtype)  # params are loaded (cast) in it
    clip, clip_params = load_clip(fc.clip_checkpoint, dtype=dtype)
    tokenizer = load_tokenizer(fc.clip_checkpoint)
    sd = load_stable_diffusion(fc.diffusion_checkpoint, dtype=dtype)
    sc = sd.scheduler
    schedule = make_schedule(sc["schedule"], sc["num_train_timesteps"], sc["beta_start"], sc["beta_end"])
    if sc["prediction_type"] not in ("epsilon", "v_prediction"):
        raise ValueError(f"{fc.diffusion_checkpoint}: prediction_type {sc['prediction_type']!r} is not supported; "
                         "allowed: epsilon, v_prediction")
    params = {"unet": sd.unet_params, "vae": sd.vae_params, "empty": sd.encode_prompts([""])}

    def unet_eps(p, x, t):
        ctx = jnp.broadcast_to(p["empty"], (x.shape[0],) + p["empty"].shape[1:])
        return sd.unet.apply({"params": p["unet"]}, x, t, ctx)

    def eps_apply(p, x, t):
        if sc["prediction_type"] == "v_prediction":
            return eps_from_v(lambda xx, tt, c: unet_eps(p, xx, tt), schedule)(x, t, None)
        return unet_eps(p, x, t)

    return Foundation(clip=clip, clip_params=clip_params, tokenizer=tokenizer, diffusion_params=params,
                      eps_apply=eps_apply, schedule=schedule, clip_image_size=clip.config.vision.image_size,
                      # float32 latents keep the DDIM carry float32 under a bfloat16 VAE and UNet
                      encode=lambda p, x: image_to_latent(sd.vae, p["vae"], x).astype(jnp.float32),
                      decode=lambda p, z: latent_to_image(sd.vae, p["vae"], z).astype(jnp.float32))

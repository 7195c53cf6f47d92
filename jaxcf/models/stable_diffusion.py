"""Stable Diffusion 1.x / 2.x from a diffusers pipeline folder (or hub id) as jaxcf models.

    sd = load_stable_diffusion("stabilityai/stable-diffusion-2-1-base", dtype=jnp.bfloat16)
    text = sd.encode_prompts(["a photo of a cat."])           # [B, 77, D]
    eps = sd.eps_fn(z_t, t, text)                              # z_t: [B, h, w, 4]

Layout read: ``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``
(``safety_checker/`` and ``feature_extractor/`` are ignored).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp

from jaxcf.models.loading import CheckpointError, read_json, resolve_checkpoint_dir
from jaxcf.models.unet2d_condition import UNet2DConditionModel, load_unet2d_condition
from jaxcf.models.vae import AutoencoderKL, load_vae

Dtype = Any

# diffusers' beta_schedule -> jaxcf's schedule name.
BETA_SCHEDULES = {"linear": "linear", "scaled_linear": "scaled_linear", "squaredcos_cap_v2": "cosine"}
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def scheduler_config(config: dict) -> dict:
    """A diffusers ``scheduler_config.json`` dict -> jaxcf's plain scheduler dict::

        {"schedule": "linear" | "scaled_linear" | "cosine", "num_train_timesteps",
         "beta_start", "beta_end", "prediction_type"}
    """
    beta_schedule = config.get("beta_schedule", "linear")
    if beta_schedule not in BETA_SCHEDULES:
        raise ValueError(f"scheduler: beta_schedule={beta_schedule!r} is not supported; "
                         f"allowed: {list(BETA_SCHEDULES)}")
    if config.get("trained_betas") is not None:
        raise ValueError("scheduler: trained_betas is not supported; allowed: [None]")
    prediction_type = config.get("prediction_type", "epsilon")
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"scheduler: prediction_type={prediction_type!r}; allowed: {list(PREDICTION_TYPES)}")
    return {
        "schedule": BETA_SCHEDULES[beta_schedule],
        "num_train_timesteps": int(config.get("num_train_timesteps", 1000)),
        "beta_start": float(config.get("beta_start", 0.0001)),
        "beta_end": float(config.get("beta_end", 0.02)),
        "prediction_type": prediction_type,
    }


@dataclasses.dataclass(frozen=True)
class StableDiffusion:
    """The pieces of a Stable Diffusion checkpoint; every model's params are held next to it."""

    unet: UNet2DConditionModel
    unet_params: Any
    vae: AutoencoderKL
    vae_params: Any
    text_encoder: Any  # jaxcf.models.clip.CLIP (text tower)
    text_params: Any
    tokenizer: Any  # jaxcf.models.tokenizers.Tokenizer
    scheduler: dict

    def encode_prompts(self, prompts: str | list[str]) -> jax.Array:
        """Prompts -> the UNet's conditioning, CLIP's last hidden states [B, 77, D]."""
        ids = self.tokenizer(prompts, max_length=self.text_encoder.config.text.max_position_embeddings)
        return self.text_encoder.text_hidden_states(self.text_params, ids)

    def eps_fn(self, z_t: jax.Array, t: jax.Array, text_states: jax.Array) -> jax.Array:
        """The UNet's output for latents z_t: [B, h, w, 4], t: scalar or [B], text_states: [B, S, D]."""
        return self.unet.apply({"params": self.unet_params}, z_t, t, text_states)


def load_stable_diffusion(name_or_path: str | os.PathLike, dtype: Dtype = jnp.float32,
                          param_dtype: Dtype | None = None) -> StableDiffusion:
    """Loads UNet, VAE, CLIP text encoder, tokenizer and scheduler config of a diffusers SD folder."""
    unet, unet_params = load_unet2d_condition(name_or_path, "unet", dtype=dtype, param_dtype=param_dtype)
    vae, vae_params = load_vae(name_or_path, "vae", dtype=dtype, param_dtype=param_dtype)

    from jaxcf.models.clip import load_clip_text, load_tokenizer  # written alongside; imported lazily

    text_encoder, text_params = load_clip_text(name_or_path, dtype=dtype, param_dtype=param_dtype,
                                               subfolder="text_encoder")
    tokenizer = load_tokenizer(name_or_path, subfolder="tokenizer")
    width = text_encoder.config.text.hidden_size
    if width != unet.config.cross_attention_dim:
        raise CheckpointError(f"text encoder width {width} != unet cross_attention_dim "
                              f"{unet.config.cross_attention_dim} in {str(name_or_path)!r}")
    folder = resolve_checkpoint_dir(name_or_path, "scheduler")
    return StableDiffusion(unet, unet_params, vae, vae_params, text_encoder, text_params, tokenizer,
                           scheduler_config(read_json(folder, "scheduler_config.json")))

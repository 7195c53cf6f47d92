"""KL autoencoder of latent diffusion (diffusers ``AutoencoderKL``), NHWC, loading diffusers checkpoints.

    vae, params = load_vae("stabilityai/sd-vae-ft-mse")
    z = image_to_latent(vae, params, x)             # x: [B, H, W, 3] in [-1, 1] -> [B, H/8, W/8, 4], scaled
    x = latent_to_image(vae, params, z)             # differentiable: guidance takes jax.grad through it

``vae_encode`` / ``vae_decode`` work on unscaled latents, as diffusers' encode/decode do.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import flax.linen as nn

from jaxcf.models import blocks
from jaxcf.models.loading import read_json, read_state_dict, resolve_checkpoint_dir

Dtype = Any

_UNSUPPORTED = {
    "act_fn": blocks.SUPPORTED_ACTIVATIONS,
    "norm_type": ("group",),
}


@dataclasses.dataclass(frozen=True)
class AutoencoderKLConfig:
    """The subset of diffusers' AutoencoderKL config that jaxcf implements (same field names)."""

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",)
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",)
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int | tuple[int, int] = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    def __post_init__(self):
        blocks.freeze_lists(self)
        name = type(self).__name__
        blocks.check_block_types(name, "down_block_types", self.down_block_types, ("DownEncoderBlock2D",))
        blocks.check_block_types(name, "up_block_types", self.up_block_types, ("UpDecoderBlock2D",))
        n = len(self.block_out_channels)
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ValueError(f"{name}: down_block_types, up_block_types and block_out_channels need the same "
                             f"length; got {len(self.down_block_types)}, {len(self.up_block_types)}, {n}")

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_diffusers(cls, config: dict) -> "AutoencoderKLConfig":
        """From a diffusers ``config.json`` dict; unsupported settings raise a ValueError naming them."""
        return blocks.config_from_diffusers(cls, config, _UNSUPPORTED)

    @classmethod
    def tiny(cls, levels: int = 2, **overrides) -> "AutoencoderKLConfig":
        base = dict(block_out_channels=(8, 16, 16, 16)[:levels], down_block_types=("DownEncoderBlock2D",) * levels,
                    up_block_types=("UpDecoderBlock2D",) * levels, layers_per_block=1, latent_channels=4,
                    norm_num_groups=4, sample_size=8)
        base.update(overrides)
        return cls(**base)


def _mid_block(cfg: AutoencoderKLConfig, dtype, param_dtype) -> blocks.MidBlock2D:
    return blocks.MidBlock2D(attention="self" if cfg.mid_block_add_attention else None, groups=cfg.norm_num_groups,
                             attn_groups=cfg.norm_num_groups, eps=1e-6, attention_head_dim=cfg.block_out_channels[-1],
                             dtype=dtype, param_dtype=param_dtype, name="mid_block")


class Encoder(nn.Module):
    """x: [B, H, W, in_channels] -> moments [B, H/f, W/f, 2 * latent_channels] (before quant_conv)."""

    config: AutoencoderKLConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        n = len(cfg.block_out_channels)
        x = blocks.conv(cfg.block_out_channels[0], 3, "conv_in", **kw)(x.astype(self.dtype))
        for i, ch in enumerate(cfg.block_out_channels):
            x, _ = blocks.DownBlock2D(ch, cfg.layers_per_block, add_downsample=i < n - 1, downsample_padding=0,
                                      groups=cfg.norm_num_groups, eps=1e-6, **kw, name=f"down_blocks_{i}")(x)
        x = _mid_block(cfg, **kw)(x)
        x = nn.silu(blocks.group_norm(x, cfg.norm_num_groups, 1e-6, "conv_norm_out", self.param_dtype))
        return blocks.conv(2 * cfg.latent_channels, 3, "conv_out", **kw)(x)


class Decoder(nn.Module):
    """z: [B, h, w, latent_channels] (after post_quant_conv) -> [B, h*f, w*f, out_channels]."""

    config: AutoencoderKLConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        n = len(cfg.block_out_channels)
        x = blocks.conv(cfg.block_out_channels[-1], 3, "conv_in", **kw)(z.astype(self.dtype))
        x = _mid_block(cfg, **kw)(x)
        for i, ch in enumerate(reversed(cfg.block_out_channels)):
            x = blocks.UpBlock2D(ch, cfg.layers_per_block + 1, add_upsample=i < n - 1, groups=cfg.norm_num_groups,
                                 eps=1e-6, **kw, name=f"up_blocks_{i}")(x)
        x = nn.silu(blocks.group_norm(x, cfg.norm_num_groups, 1e-6, "conv_norm_out", self.param_dtype))
        return blocks.conv(cfg.out_channels, 3, "conv_out", **kw)(x)


class AutoencoderKL(nn.Module):
    """Linen methods: ``encode(x) -> (mean, logvar)``, ``decode(z) -> x``; ``__call__`` reconstructs."""

    config: AutoencoderKLConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.encoder = Encoder(cfg, **kw)
        self.decoder = Decoder(cfg, **kw)
        if cfg.use_quant_conv:
            self.quant_conv = blocks.conv(2 * cfg.latent_channels, 1, None, **kw)
        if cfg.use_post_quant_conv:
            self.post_quant_conv = blocks.conv(cfg.latent_channels, 1, None, **kw)

    def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """x: [B, H, W, C] -> mean, logvar: [B, H/f, W/f, latent_channels] (logvar clipped to [-30, 20])."""
        if x.ndim != 4 or x.shape[1] % self.config.downsample_factor or x.shape[2] % self.config.downsample_factor:
            raise ValueError(f"AutoencoderKL.encode: x must be [B, H, W, C] with H, W multiples of "
                             f"{self.config.downsample_factor}; got shape {x.shape}")
        moments = self.encoder(x)
        if self.config.use_quant_conv:
            moments = self.quant_conv(moments)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def decode(self, z: jax.Array) -> jax.Array:
        """z: [B, h, w, latent_channels] (unscaled) -> [B, h*f, w*f, out_channels]."""
        z = z.astype(self.dtype)
        if self.config.use_post_quant_conv:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def __call__(self, x: jax.Array, key: jax.Array | None = None) -> jax.Array:
        mean, logvar = self.encode(x)
        return self.decode(mean if key is None else sample_latent(key, mean, logvar))


def sample_latent(key: jax.Array, mean: jax.Array, logvar: jax.Array) -> jax.Array:
    """z ~ N(mean, exp(logvar)), reparameterised (differentiable in mean and logvar)."""
    eps = jax.random.normal(key, mean.shape, jnp.float32).astype(mean.dtype)
    return mean + jnp.exp(0.5 * logvar) * eps


def vae_encode(model: AutoencoderKL, params, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x: [B, H, W, C] -> (mean, logvar), unscaled."""
    return model.apply({"params": params}, x, method=AutoencoderKL.encode)


def vae_decode(model: AutoencoderKL, params, z: jax.Array) -> jax.Array:
    """Unscaled z: [B, h, w, latent_channels] -> x: [B, H, W, C]."""
    return model.apply({"params": params}, z, method=AutoencoderKL.decode)


def image_to_latent(model: AutoencoderKL, params, x: jax.Array, key: jax.Array | None = None) -> jax.Array:
    """The diffusion model's latent: (z - shift_factor) * scaling_factor, z the posterior mean
    (or a sample when ``key`` is given). x: [B, H, W, C] in [-1, 1]."""
    mean, logvar = vae_encode(model, params, x)
    z = mean if key is None else sample_latent(key, mean, logvar)
    return (z - (model.config.shift_factor or 0.0)) * model.config.scaling_factor


def latent_to_image(model: AutoencoderKL, params, latent: jax.Array) -> jax.Array:
    """Inverse of :func:`image_to_latent`: decode(latent / scaling_factor + shift_factor)."""
    z = latent / model.config.scaling_factor + (model.config.shift_factor or 0.0)
    return vae_decode(model, params, z)


def load_vae(name_or_path: str | os.PathLike, subfolder: str | None = None, dtype: Dtype = jnp.float32,
             param_dtype: Dtype | None = None) -> tuple[AutoencoderKL, dict]:
    """Loads a diffusers AutoencoderKL checkpoint (hub id or folder) -> (model, params)."""
    folder = resolve_checkpoint_dir(name_or_path, subfolder)
    config = AutoencoderKLConfig.from_diffusers(read_json(folder))
    param_dtype = param_dtype or dtype
    model = AutoencoderKL(config, dtype=dtype, param_dtype=param_dtype)
    f = config.downsample_factor
    expected = blocks.expected_params(model, jnp.zeros((1, f, f, config.in_channels)))
    params = blocks.params_from_state_dict(expected, read_state_dict(folder), dtype=param_dtype)
    return model, params

"""Pixel-space DDPM UNet (diffusers ``UNet2DModel``), NHWC, loading diffusers checkpoints.

    model, params = load_unet2d("google/ddpm-cifar10-32")
    eps = model.apply({"params": params}, x_t, t)            # x_t: [B, H, W, C], t: scalar or [B]
    eps_fn = lambda x_t, t, cond=None: model.apply({"params": params}, x_t, t, cond)
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

DOWN_BLOCK_TYPES = ("DownBlock2D", "AttnDownBlock2D")
UP_BLOCK_TYPES = ("UpBlock2D", "AttnUpBlock2D")
MID_BLOCK_TYPES = ("UNetMidBlock2D", None)
TIME_SCALE_SHIFTS = ("default", "scale_shift")
CLASS_EMBED_TYPES = (None, "timestep")

# diffusers config fields this implementation accepts only at these values.
_UNSUPPORTED = {
    "time_embedding_type": ("positional",),
    "act_fn": blocks.SUPPORTED_ACTIVATIONS,
    "downsample_type": ("conv",),
    "upsample_type": ("conv",),
    "class_embed_type": CLASS_EMBED_TYPES,
    "mid_block_type": MID_BLOCK_TYPES,
}


@dataclasses.dataclass(frozen=True)
class UNet2DConfig:
    """The subset of diffusers' UNet2DModel config that jaxcf implements (same field names)."""

    sample_size: int | tuple[int, int] | None = None
    in_channels: int = 3
    out_channels: int = 3
    center_input_sample: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: float = 0
    down_block_types: tuple[str, ...] = ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D")
    up_block_types: tuple[str, ...] = ("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D")
    mid_block_type: str | None = "UNetMidBlock2D"
    block_out_channels: tuple[int, ...] = (224, 448, 672, 896)
    layers_per_block: int = 2
    mid_block_scale_factor: float = 1.0
    downsample_padding: int = 1
    attention_head_dim: int | None = 8  # channels per head; None: one head
    norm_num_groups: int = 32
    attn_norm_num_groups: int | None = None
    norm_eps: float = 1e-5
    resnet_time_scale_shift: str = "default"
    add_attention: bool = True
    time_embedding_dim: int | None = None
    class_embed_type: str | None = None
    num_class_embeds: int | None = None

    def __post_init__(self):
        blocks.freeze_lists(self)
        name = type(self).__name__
        blocks.check_block_types(name, "down_block_types", self.down_block_types, DOWN_BLOCK_TYPES)
        blocks.check_block_types(name, "up_block_types", self.up_block_types, UP_BLOCK_TYPES)
        blocks.check_supported(name, dataclasses.asdict(self), {
            "mid_block_type": MID_BLOCK_TYPES, "resnet_time_scale_shift": TIME_SCALE_SHIFTS,
            "class_embed_type": CLASS_EMBED_TYPES})
        n = len(self.block_out_channels)
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ValueError(f"{name}: down_block_types, up_block_types and block_out_channels need the same "
                             f"length; got {len(self.down_block_types)}, {len(self.up_block_types)}, {n}")

    @property
    def time_embed_dim(self) -> int:
        return self.time_embedding_dim or 4 * self.block_out_channels[0]

    @classmethod
    def from_diffusers(cls, config: dict) -> "UNet2DConfig":
        """From a diffusers ``config.json`` dict; unsupported settings raise a ValueError naming them."""
        return blocks.config_from_diffusers(cls, config, _UNSUPPORTED)

    @classmethod
    def tiny(cls, **overrides) -> "UNet2DConfig":
        """A few-thousand-parameter UNet for tests: 2 levels, attention at the low resolution."""
        base = dict(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
                    down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                    up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=8, norm_num_groups=4)
        base.update(overrides)
        return cls(**base)


class UNet2DModel(nn.Module):
    """eps_theta(x_t, t[, class]) for pixel-space diffusion.

    sample: [B, H, W, in_channels] with H, W divisible by 2**(levels - 1); timesteps: scalar or [B]
    (int or float); class_labels: [B] ints (only with a class embedding) -> [B, H, W, out_channels].
    """

    config: UNet2DConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, sample: jax.Array, timesteps: jax.Array | float | int,
                 class_labels: jax.Array | None = None) -> jax.Array:
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        check_spatial_size(sample.shape, len(cfg.block_out_channels), "UNet2DModel")
        sample = sample.astype(self.dtype)
        if cfg.center_input_sample:
            sample = 2 * sample - 1.0

        t = blocks.broadcast_timesteps(timesteps, sample.shape[0])
        t_emb = blocks.timestep_embedding(t, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift)
        emb = blocks.TimestepEmbedding(cfg.time_embed_dim, **kw, name="time_embedding")(t_emb)
        emb = emb + self._class_embedding(class_labels, emb.shape[-1], sample.shape[0])

        x = blocks.conv(cfg.block_out_channels[0], 3, "conv_in", **kw)(sample)
        skips = [x]
        n = len(cfg.block_out_channels)
        common = dict(groups=cfg.norm_num_groups, eps=cfg.norm_eps, time_embedding_norm=cfg.resnet_time_scale_shift,
                      **kw)
        for i, btype in enumerate(cfg.down_block_types):
            out_ch = cfg.block_out_channels[i]
            x, res = blocks.DownBlock2D(
                out_ch, cfg.layers_per_block, attention="self" if btype == "AttnDownBlock2D" else None,
                add_downsample=i < n - 1, downsample_padding=cfg.downsample_padding,
                attention_head_dim=cfg.attention_head_dim or out_ch, **common, name=f"down_blocks_{i}")(x, emb)
            skips.extend(res)

        if cfg.mid_block_type is not None:
            attn_groups = cfg.attn_norm_num_groups
            if attn_groups is None:
                attn_groups = cfg.norm_num_groups if cfg.resnet_time_scale_shift == "default" else None
            x = blocks.MidBlock2D(
                attention="self" if cfg.add_attention else None, attn_groups=attn_groups,
                output_scale_factor=cfg.mid_block_scale_factor,
                attention_head_dim=cfg.attention_head_dim or cfg.block_out_channels[-1], **common,
                name="mid_block")(x, emb)

        for i, btype in enumerate(cfg.up_block_types):
            out_ch = cfg.block_out_channels[n - 1 - i]
            layers = cfg.layers_per_block + 1
            res, skips = skips[-layers:], skips[:-layers]
            x = blocks.UpBlock2D(
                out_ch, layers, attention="self" if btype == "AttnUpBlock2D" else None, add_upsample=i < n - 1,
                attention_head_dim=cfg.attention_head_dim or out_ch, **common,
                name=f"up_blocks_{i}")(x, tuple(res), emb)

        x = nn.silu(blocks.group_norm(x, cfg.norm_num_groups, cfg.norm_eps, "conv_norm_out", self.param_dtype))
        return blocks.conv(cfg.out_channels, 3, "conv_out", **kw)(x)

    def _class_embedding(self, class_labels, dim, batch):
        cfg = self.config
        has = cfg.class_embed_type is not None or cfg.num_class_embeds is not None
        if not has:
            if class_labels is not None:
                raise ValueError("UNet2DModel: class_labels given but the config has no class embedding")
            return 0.0
        if class_labels is None:
            raise ValueError("UNet2DModel: this model is class-conditional; pass class_labels")
        labels = blocks.broadcast_timesteps(class_labels, batch)
        if cfg.class_embed_type == "timestep":
            proj = blocks.timestep_embedding(labels, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift)
            return blocks.TimestepEmbedding(dim, self.dtype, self.param_dtype, name="class_embedding")(proj)
        return nn.Embed(cfg.num_class_embeds, dim, dtype=self.dtype, param_dtype=self.param_dtype,
                        name="class_embedding")(labels.astype(jnp.int32))


def check_spatial_size(shape: tuple[int, ...], levels: int, owner: str) -> None:
    """H and W must survive ``levels - 1`` halvings exactly (skip connections must line up)."""
    if len(shape) != 4:
        raise ValueError(f"{owner}: sample must be [B, H, W, C] (NHWC); got shape {tuple(shape)}")
    f = 2 ** (levels - 1)
    if shape[1] % f or shape[2] % f:
        raise ValueError(f"{owner}: height and width must be multiples of {f}; got {shape[1]}x{shape[2]}")


def _example_inputs(config: UNet2DConfig):
    s = 2 ** (len(config.block_out_channels) - 1)
    labels = jnp.zeros((1,), jnp.int32) if (config.class_embed_type or config.num_class_embeds) else None
    return jnp.zeros((1, s, s, config.in_channels)), jnp.zeros((1,)), labels


def load_unet2d(name_or_path: str | os.PathLike, subfolder: str | None = None, dtype: Dtype = jnp.float32,
                param_dtype: Dtype | None = None) -> tuple[UNet2DModel, dict]:
    """Loads a diffusers UNet2DModel checkpoint (hub id or folder) -> (model, params)."""
    folder = resolve_checkpoint_dir(name_or_path, subfolder)
    config = UNet2DConfig.from_diffusers(read_json(folder))
    param_dtype = param_dtype or dtype
    model = UNet2DModel(config, dtype=dtype, param_dtype=param_dtype)
    expected = blocks.expected_params(model, *_example_inputs(config))
    params = blocks.params_from_state_dict(expected, read_state_dict(folder), dtype=param_dtype)
    return model, params

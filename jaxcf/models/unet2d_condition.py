"""Text-conditioned latent UNet of Stable Diffusion 1.x / 2.x (diffusers ``UNet2DConditionModel``), NHWC.

    unet, params = load_unet2d_condition("stabilityai/stable-diffusion-2-1-base", subfolder="unet")
    eps = unet.apply({"params": params}, z_t, t, text_states)   # z_t: [B, h, w, 4], text_states: [B, S, D]
    eps_fn = lambda z_t, t, cond: unet.apply({"params": params}, z_t, t, cond)
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
from jaxcf.models.unet2d import check_spatial_size

Dtype = Any

DOWN_BLOCK_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCK_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")
MID_BLOCK_TYPES = ("UNetMidBlock2DCrossAttn", None)

# diffusers config fields this implementation accepts only at these values (SD 1.x / 2.x use them).
_UNSUPPORTED = {
    "time_embedding_type": ("positional",),
    "act_fn": blocks.SUPPORTED_ACTIVATIONS,
    "mid_block_type": MID_BLOCK_TYPES,
    "dual_cross_attention": (False,),
    "class_embed_type": (None,),
    "num_class_embeds": (None,),
    "addition_embed_type": (None,),
    "addition_time_embed_dim": (None,),
    "projection_class_embeddings_input_dim": (None,),
    "class_embeddings_concat": (False,),
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "time_embedding_act_fn": (None,),
    "timestep_post_act": (None,),
    "time_cond_proj_dim": (None,),
    "resnet_skip_time_act": (False,),
    "resnet_out_scale_factor": (1.0,),
    "attention_type": ("default",),
    "cross_attention_norm": (None,),
    "mid_block_only_cross_attention": (None, False),
    "num_attention_heads": (None,),
    "reverse_transformer_layers_per_block": (None,),
}


@dataclasses.dataclass(frozen=True)
class UNet2DConditionConfig:
    """The subset of diffusers' UNet2DConditionModel config that jaxcf implements (same field names).

    As in diffusers, ``attention_head_dim`` is the number of attention heads per block (an int for
    all blocks, e.g. SD1's 8, or one per block, e.g. SD2's (5, 10, 20, 20)); per-block fields are
    normalised to tuples.
    """

    sample_size: int | tuple[int, int] | None = None
    in_channels: int = 4
    out_channels: int = 4
    center_input_sample: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: float = 0
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    mid_block_type: str | None = "UNetMidBlock2DCrossAttn"
    up_block_types: tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int | tuple[int, ...] = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int | tuple[int, ...] = 1280
    transformer_layers_per_block: int | tuple[int, ...] = 1
    attention_head_dim: int | tuple[int, ...] = 8
    use_linear_projection: bool = False  # same map as a 1x1 conv on NHWC; kept for the record
    upcast_attention: bool = False  # attention softmax is always float32 here
    only_cross_attention: bool | tuple[bool, ...] = False
    resnet_time_scale_shift: str = "default"
    time_embedding_dim: int | None = None
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3

    def __post_init__(self):
        blocks.freeze_lists(self)
        name = type(self).__name__
        n = len(self.block_out_channels)
        blocks.check_block_types(name, "down_block_types", self.down_block_types, DOWN_BLOCK_TYPES)
        blocks.check_block_types(name, "up_block_types", self.up_block_types, UP_BLOCK_TYPES)
        blocks.check_supported(name, dataclasses.asdict(self), {
            "mid_block_type": MID_BLOCK_TYPES, "resnet_time_scale_shift": ("default", "scale_shift")})
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ValueError(f"{name}: down_block_types, up_block_types and block_out_channels need the same "
                             f"length; got {len(self.down_block_types)}, {len(self.up_block_types)}, {n}")
        if self.norm_num_groups is None:
            raise ValueError(f"{name}: norm_num_groups=None is not supported; give an int")
        if any(blocks.per_block(self.only_cross_attention, n, "only_cross_attention", name)):
            raise ValueError(f"{name}: config field 'only_cross_attention' must be False (allowed: [False])")
        cross = set(blocks.per_block(self.cross_attention_dim, n, "cross_attention_dim", name))
        if len(cross) != 1:
            raise ValueError(f"{name}: cross_attention_dim must be the same for every block; "
                             f"got {self.cross_attention_dim}")
        tl = blocks.per_block(self.transformer_layers_per_block, n, "transformer_layers_per_block", name)
        if not all(isinstance(v, int) for v in tl):
            raise ValueError(f"{name}: transformer_layers_per_block must be an int or one int per block; got {tl}")
        heads = blocks.per_block(self.attention_head_dim, n, "attention_head_dim", name)
        set_ = lambda k, v: object.__setattr__(self, k, v)
        set_("layers_per_block", blocks.per_block(self.layers_per_block, n, "layers_per_block", name))
        set_("transformer_layers_per_block", tl)
        set_("attention_head_dim", heads)
        set_("cross_attention_dim", cross.pop())
        set_("only_cross_attention", False)
        for ch, h in zip(self.block_out_channels, heads):
            if ch % h:
                raise ValueError(f"{name}: block_out_channels {ch} is not divisible by attention_head_dim (heads) {h}")

    @property
    def time_embed_dim(self) -> int:
        return self.time_embedding_dim or 4 * self.block_out_channels[0]

    @classmethod
    def from_diffusers(cls, config: dict) -> "UNet2DConditionConfig":
        """From a diffusers ``config.json`` dict; unsupported settings raise a ValueError naming them."""
        return blocks.config_from_diffusers(cls, config, _UNSUPPORTED)

    @classmethod
    def tiny(cls, **overrides) -> "UNet2DConditionConfig":
        """SD1-shaped and a few thousand parameters: 2 levels, cross-attention at the top one."""
        base = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
                    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=2, norm_num_groups=4,
                    cross_attention_dim=12)
        base.update(overrides)
        return cls(**base)


class UNet2DConditionModel(nn.Module):
    """eps_theta(z_t, t, c) with cross-attention to the text states c.

    sample: [B, h, w, in_channels] with h, w divisible by 2**(levels - 1); timesteps: scalar or [B]
    (int or float); encoder_hidden_states: [B, S, cross_attention_dim] -> [B, h, w, out_channels].
    """

    config: UNet2DConditionConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, sample: jax.Array, timesteps: jax.Array | float | int,
                 encoder_hidden_states: jax.Array) -> jax.Array:
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        n = len(cfg.block_out_channels)
        check_spatial_size(sample.shape, n, "UNet2DConditionModel")
        if encoder_hidden_states is None or encoder_hidden_states.ndim != 3:
            raise ValueError("UNet2DConditionModel: encoder_hidden_states must be [B, S, cross_attention_dim]; got "
                             f"{None if encoder_hidden_states is None else encoder_hidden_states.shape}")
        context = encoder_hidden_states.astype(self.dtype)
        sample = sample.astype(self.dtype)
        if cfg.center_input_sample:
            sample = 2 * sample - 1.0

        t = blocks.broadcast_timesteps(timesteps, sample.shape[0])
        t_emb = blocks.timestep_embedding(t, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift)
        emb = blocks.TimestepEmbedding(cfg.time_embed_dim, **kw, name="time_embedding")(t_emb)

        x = blocks.conv(cfg.block_out_channels[0], cfg.conv_in_kernel, "conv_in", **kw)(sample)
        skips = [x]
        common = dict(groups=cfg.norm_num_groups, eps=cfg.norm_eps, time_embedding_norm=cfg.resnet_time_scale_shift,
                      **kw)
        for i, btype in enumerate(cfg.down_block_types):
            x, res = blocks.DownBlock2D(
                cfg.block_out_channels[i], cfg.layers_per_block[i],
                attention="cross" if btype == "CrossAttnDownBlock2D" else None, add_downsample=i < n - 1,
                downsample_padding=cfg.downsample_padding, num_heads=cfg.attention_head_dim[i],
                transformer_layers=cfg.transformer_layers_per_block[i], **common,
                name=f"down_blocks_{i}")(x, emb, context)
            skips.extend(res)

        if cfg.mid_block_type is not None:
            x = blocks.MidBlock2D(
                attention="cross", output_scale_factor=cfg.mid_block_scale_factor,
                num_heads=cfg.attention_head_dim[-1], transformer_layers=cfg.transformer_layers_per_block[-1],
                **common, name="mid_block")(x, emb, context)

        for i, btype in enumerate(cfg.up_block_types):
            j = n - 1 - i  # the matching down level
            layers = cfg.layers_per_block[j] + 1
            res, skips = skips[-layers:], skips[:-layers]
            x = blocks.UpBlock2D(
                cfg.block_out_channels[j], layers, attention="cross" if btype == "CrossAttnUpBlock2D" else None,
                add_upsample=i < n - 1, num_heads=cfg.attention_head_dim[j],
                transformer_layers=cfg.transformer_layers_per_block[j], **common,
                name=f"up_blocks_{i}")(x, tuple(res), emb, context)

        x = nn.silu(blocks.group_norm(x, cfg.norm_num_groups, cfg.norm_eps, "conv_norm_out", self.param_dtype))
        return blocks.conv(cfg.out_channels, cfg.conv_out_kernel, "conv_out", **kw)(x)


def load_unet2d_condition(name_or_path: str | os.PathLike, subfolder: str | None = None,
                          dtype: Dtype = jnp.float32,
                          param_dtype: Dtype | None = None) -> tuple[UNet2DConditionModel, dict]:
    """Loads a diffusers UNet2DConditionModel checkpoint (hub id or folder) -> (model, params)."""
    folder = resolve_checkpoint_dir(name_or_path, subfolder)
    config = UNet2DConditionConfig.from_diffusers(read_json(folder))
    param_dtype = param_dtype or dtype
    model = UNet2DConditionModel(config, dtype=dtype, param_dtype=param_dtype)
    s = 2 ** (len(config.block_out_channels) - 1)
    example = (jnp.zeros((1, s, s, config.in_channels)), jnp.zeros((1,)), jnp.zeros((1, 1, config.cross_attention_dim)))
    expected = blocks.expected_params(model, *example)
    params = blocks.params_from_state_dict(expected, read_state_dict(folder), dtype=param_dtype)
    return model, params

"""DiffAE decoder: a UNet eps_theta(x_t, t, z) conditioned on a semantic code z (METHODS §2.2).

Every residual block applies the time modulation and then the semantic one,
``h = GN(h) * (1 + s_t) + b_t`` followed by ``h = h * (1 + Linear(SiLU(z)))`` (the
``cond_emb_proj`` of :class:`jaxcf.models.blocks.ResnetBlock2D`). The layout is guided-diffusion's
(as in DiffAE's BeatGANs UNet): ``num_res_blocks`` blocks per level on the way down, one more per
level on the way up, self-attention at the levels whose resolution is in
``attention_resolutions`` and in the middle. Unlike DiffAE's ``resblock_updown``, levels change
size with diffusers' stride-2 conv / nearest-upsample-conv: 65.6M parameters at the Square
config (METHODS §4 quotes about 70M for the paper's).

    model = DiffAEUNet(DiffAEConfig.preset("square_tiny", semantic_dim=64))
    params = init_params(model, jax.random.key(0))
    eps = model.apply({"params": params}, x_t, t, z)  # [B, R, R, C], scalar or [B], [B, D_z]
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import flax.linen as nn

from jaxcf.models import blocks
from jaxcf.models.init import fast_init

Dtype = Any


@dataclasses.dataclass(frozen=True)
class DiffAEConfig:
    """DiffAE UNet hyper-parameters; defaults are the official Square decoder (64 px)."""

    resolution: int = 64
    in_channels: int = 3
    out_channels: int = 3
    model_channels: int = 64  # width of level 0
    channel_mult: tuple[int, ...] = (1, 2, 4, 8)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (16,)  # feature-map sizes (px) with self-attention
    mid_attention: bool = True
    semantic_dim: int = 512  # size of z
    num_heads: int = 1
    head_dim: int | None = None  # channels per head; overrides num_heads when set
    norm_groups: int = 32
    norm_eps: float = 1e-5
    time_embed_dim: int | None = 512  # DiffAE's embed_channels; None: 4 * model_channels
    # Append two pixel-coordinate channels (x, y in [-1, 1]) to x_t before conv_in (CoordConv).
    # Off in DiffAE; on, a decoder can place an object where the code says on images whose
    # objects move (Square), instead of leaving the layout to x_T.
    coord_channels: bool = False

    def __post_init__(self):
        blocks.freeze_lists(self)
        name = type(self).__name__

        def positive(field):
            v = getattr(self, field)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: field {field!r} = {v!r} must be a positive int")

        for field in ("resolution", "in_channels", "out_channels", "model_channels", "num_res_blocks",
                      "semantic_dim", "num_heads", "norm_groups"):
            positive(field)
        for field in ("head_dim", "time_embed_dim"):
            if getattr(self, field) is not None:
                positive(field)
        if not self.channel_mult or not all(isinstance(m, int) and m >= 1 for m in self.channel_mult):
            raise ValueError(f"{name}: field 'channel_mult' = {self.channel_mult!r} must be a non-empty tuple of "
                             "positive ints, e.g. (1, 2, 4, 8)")
        f = 2 ** (self.levels - 1)
        if self.resolution % f:
            raise ValueError(f"{name}: field 'resolution' = {self.resolution} must be a multiple of {f} "
                             f"({self.levels} levels in channel_mult)")
        for r in self.attention_resolutions:
            if r not in self.level_resolutions:
                raise ValueError(f"{name}: field 'attention_resolutions' contains {r!r}; allowed: the level "
                                 f"resolutions {list(self.level_resolutions)}")
        for ch in sorted(set(self.level_channels)):
            if ch % self.norm_groups:
                raise ValueError(f"{name}: field 'norm_groups' = {self.norm_groups} must divide every level width "
                                 f"{list(self.level_channels)}")
        attended = [c for c, r in zip(self.level_channels, self.level_resolutions) if r in self.attention_resolutions]
        if self.mid_attention:
            attended.append(self.level_channels[-1])
        for ch in attended:
            if ch % (self.head_dim or self.num_heads):
                field = "head_dim" if self.head_dim else "num_heads"
                raise ValueError(f"{name}: field {field!r} = {getattr(self, field)} must divide the width {ch} of "
                                 "every attention level")

    @property
    def levels(self) -> int:
        return len(self.channel_mult)

    @property
    def level_channels(self) -> tuple[int, ...]:
        return tuple(self.model_channels * m for m in self.channel_mult)

    @property
    def level_resolutions(self) -> tuple[int, ...]:
        return tuple(self.resolution // 2 ** i for i in range(self.levels))

    @property
    def temb_dim(self) -> int:
        return self.time_embed_dim or 4 * self.model_channels

    def attention_head_dim(self, channels: int) -> int:
        return self.head_dim or channels // self.num_heads

    @classmethod
    def tiny(cls, **overrides) -> "DiffAEConfig":
        """A few-ten-thousand-parameter UNet for tests: 8 px, 2 levels, attention at 4 px."""
        base = dict(resolution=8, model_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                    attention_resolutions=(4,), semantic_dim=6, head_dim=8, norm_groups=4, time_embed_dim=None)
        return cls(**{**base, **overrides})

    @classmethod
    def square_tiny(cls, **overrides) -> "DiffAEConfig":
        """Square decoder that trains on a CPU in minutes: 32 px, widths 32/64/64, 1 block, attention at 8 px."""
        base = dict(resolution=32, model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1,
                    attention_resolutions=(8,), semantic_dim=64, norm_groups=8, time_embed_dim=None)
        return cls(**{**base, **overrides})

    @classmethod
    def preset(cls, name: str = "square", **overrides) -> "DiffAEConfig":
        """``"square"`` (the paper's), ``"square_tiny"`` or ``"tiny"``, with field overrides."""
        if name not in PRESETS:
            raise ValueError(f"DiffAEConfig: preset {name!r} is unknown; allowed: {list(PRESETS)}")
        return getattr(cls, name)(**overrides)

    @classmethod
    def square(cls, **overrides) -> "DiffAEConfig":
        """The official Square decoder: 64 px, widths 64..512, 2 blocks, attention at 16 px."""
        return cls(**overrides)


PRESETS = ("square", "square_tiny", "tiny")


class DiffAEUNet(nn.Module):
    """eps_theta(x_t, t, z).

    x_t: [B, R, R, in_channels] (R = config.resolution); t: scalar or [B] (int or float);
    z: [B, semantic_dim] -> eps [B, R, R, out_channels] in ``dtype``.
    """

    config: DiffAEConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_t: jax.Array, t: jax.Array | float | int, z: jax.Array) -> jax.Array:
        cfg = self.config
        check_inputs(cfg, x_t.shape, z.shape)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = x_t.astype(self.dtype)
        z = z.astype(self.dtype)

        t = blocks.broadcast_timesteps(t, x.shape[0])
        temb = blocks.timestep_embedding(t, cfg.model_channels, flip_sin_to_cos=True, freq_shift=0)
        temb = blocks.TimestepEmbedding(cfg.temb_dim, **kw, name="time_embedding")(temb)  # [B, D_t]

        common = dict(groups=cfg.norm_groups, eps=cfg.norm_eps, time_embedding_norm="scale_shift",
                      cond_channels=cfg.semantic_dim, **kw)
        attn = lambda level: "self" if cfg.level_resolutions[level] in cfg.attention_resolutions else None

        if cfg.coord_channels:
            x = jnp.concatenate([x, coordinate_channels(x)], axis=-1)  # [B, R, R, C + 2]
        h = blocks.conv(cfg.model_channels, 3, "conv_in", **kw)(x)
        skips = [h]
        n = cfg.levels
        for i, ch in enumerate(cfg.level_channels):
            h, res = blocks.DownBlock2D(ch, cfg.num_res_blocks, attention=attn(i), add_downsample=i < n - 1,
                                        attention_head_dim=cfg.attention_head_dim(ch), **common,
                                        name=f"down_blocks_{i}")(h, temb, cond=z)
            skips.extend(res)

        ch = cfg.level_channels[-1]
        h = blocks.MidBlock2D(attention="self" if cfg.mid_attention else None, attn_groups=cfg.norm_groups,
                              attention_head_dim=cfg.attention_head_dim(ch), **common,
                              name="mid_block")(h, temb, cond=z)

        for i in range(n):
            level = n - 1 - i
            ch = cfg.level_channels[level]
            layers = cfg.num_res_blocks + 1
            res, skips = skips[-layers:], skips[:-layers]
            h = blocks.UpBlock2D(ch, layers, attention=attn(level), add_upsample=level > 0,
                                 attention_head_dim=cfg.attention_head_dim(ch), **common,
                                 name=f"up_blocks_{i}")(h, tuple(res), temb, cond=z)

        h = nn.silu(blocks.group_norm(h, cfg.norm_groups, cfg.norm_eps, "conv_norm_out", self.param_dtype))
        return blocks.conv(cfg.out_channels, 3, "conv_out", **kw)(h)


def coordinate_channels(x: jax.Array) -> jax.Array:
    """[B, H, W, C] -> [B, H, W, 2]: each pixel's column and row, scaled to [-1, 1]."""
    b, h, w = x.shape[:3]
    cols = jnp.broadcast_to(jnp.linspace(-1.0, 1.0, w, dtype=x.dtype)[None, :], (h, w))
    rows = jnp.broadcast_to(jnp.linspace(-1.0, 1.0, h, dtype=x.dtype)[:, None], (h, w))
    return jnp.broadcast_to(jnp.stack([cols, rows], -1)[None], (b, h, w, 2))


def check_inputs(cfg: DiffAEConfig, x_shape: tuple[int, ...], z_shape: tuple[int, ...]) -> None:
    """x_t must be [B, R, R, in_channels] and z [B, semantic_dim] (before any compilation)."""
    want = (cfg.resolution, cfg.resolution, cfg.in_channels)
    if len(x_shape) != 4 or tuple(x_shape[1:]) != want:
        raise ValueError(f"DiffAEUNet: x_t must be [B, {want[0]}, {want[1]}, {want[2]}] (config.resolution, "
                         f"config.in_channels); got {tuple(x_shape)}")
    if len(z_shape) != 2 or z_shape != (x_shape[0], cfg.semantic_dim):
        raise ValueError(f"DiffAEUNet: z must be [{x_shape[0]}, {cfg.semantic_dim}] (batch, config.semantic_dim); "
                         f"got {tuple(z_shape)}")


def example_inputs(cfg: DiffAEConfig, batch: int = 1) -> tuple[jax.ShapeDtypeStruct, ...]:
    """Shape-only (x_t, t, z) for ``jax.eval_shape`` and :func:`init_params`."""
    r = cfg.resolution
    return (jax.ShapeDtypeStruct((batch, r, r, cfg.in_channels), jnp.float32),
            jax.ShapeDtypeStruct((batch,), jnp.int32),
            jax.ShapeDtypeStruct((batch, cfg.semantic_dim), jnp.float32))


def init_params(model: DiffAEUNet, rng: jax.Array, zero_out: bool = False, zero_cond: bool = False) -> dict:
    """Random parameters with flax's default distributions (:func:`jaxcf.models.init.fast_init`),
    in about a second where ``model.init`` takes minutes on a CPU.

    zero_out: DiffAE's ``zero_module`` init: ``conv2`` of every residual block and ``conv_out``
    start at zero (each block starts as the identity, eps_theta as 0).
    zero_cond: every semantic projection ``cond_emb_proj`` starts at zero, so h * (1 + Lin(SiLU(z)))
    starts as the identity and the code's influence grows from nothing during training.
    """
    zeroed = (("conv2", "conv_out") if zero_out else ()) + (("cond_emb_proj",) if zero_cond else ())
    zero = lambda path, shape: 0.0 if path[-2] in zeroed else None
    return fast_init(model, *example_inputs(model.config), rng=rng, std_fn=zero if zeroed else None)["params"]

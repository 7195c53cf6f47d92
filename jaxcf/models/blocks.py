"""Building blocks shared by jaxcf's diffusion UNets and VAE, NHWC, named after diffusers' modules.

Every parameterised submodule carries the name of its diffusers counterpart, with ModuleList
indices spelled ``resnets_0`` (diffusers: ``resnets.0``). A parameter tree therefore maps onto a
diffusers state dict by name alone: :func:`params_from_state_dict` walks the model's own tree
and takes each tensor from the checkpoint, so the models need no hand-written key tables.

Dropout is not implemented: these blocks are for inference, guidance and fine-tuning with
dropout 0 (the diffusers default).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

import jax
import jax.numpy as jnp
import flax.linen as nn

from jaxcf.models.loading import CheckpointError, StateDict, finalize
from jaxcf.models import winograd

Dtype = Any

SUPPORTED_ACTIVATIONS = ("silu", "swish")


# ---------------------------------------------------------------------------------------------
# Config helpers
# ---------------------------------------------------------------------------------------------


def config_from_diffusers(cls, config: Mapping[str, Any], unsupported: Mapping[str, Sequence[Any]]):
    """Builds the config dataclass ``cls`` from a diffusers ``config.json`` dict: unsupported
    settings raise a ValueError naming them; keys ``cls`` does not have are ignored; lists -> tuples."""
    check_supported(cls.__name__, config, unsupported)
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: as_tuple(v) for k, v in config.items() if k in names})


def as_tuple(value: Any) -> Any:
    """JSON lists -> tuples (recursively), so configs stay hashable."""
    if isinstance(value, (list, tuple)):
        return tuple(as_tuple(v) for v in value)
    return value


def freeze_lists(config: Any) -> None:
    """Turns list fields of a frozen config dataclass into tuples (hashable, as linen needs)."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if isinstance(value, list):
            object.__setattr__(config, f.name, as_tuple(value))


def per_block(value: Any, n: int, field: str, owner: str) -> tuple:
    """An int (or None) for every block, or a sequence of length ``n``."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{owner}: config field {field!r} has {len(value)} entries; expected {n} (one per block)")
        return tuple(value)
    return (value,) * n


def check_supported(owner: str, config: Mapping[str, Any], allowed: Mapping[str, Sequence[Any]]) -> None:
    """Raises a ValueError naming the field and its allowed values for any unsupported setting."""
    for field, values in allowed.items():
        if field in config and as_tuple(config[field]) not in tuple(values):
            raise ValueError(
                f"{owner}: config field {field!r} = {config[field]!r} is not supported; allowed: {list(values)}"
            )


def check_block_types(owner: str, field: str, types: Sequence[str], allowed: Sequence[str]) -> None:
    for t in types:
        if t not in allowed:
            raise ValueError(f"{owner}: {field} contains {t!r}, which is not supported; allowed: {list(allowed)}")


# ---------------------------------------------------------------------------------------------
# Time embedding
# ---------------------------------------------------------------------------------------------


def timestep_embedding(timesteps: jax.Array, dim: int, flip_sin_to_cos: bool = False, freq_shift: float = 1.0,
                       scale: float = 1.0, max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal embedding of (possibly fractional) timesteps (DDPM / diffusers ``Timesteps``).

    timesteps: [B] -> [B, dim] float32; frequencies exp(-log(max_period) * i / (dim/2 - freq_shift)).
    """
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift))
    args = scale * timesteps.astype(jnp.float32)[:, None] * freqs[None, :]
    sin, cos = jnp.sin(args), jnp.cos(args)
    emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


def broadcast_timesteps(timesteps: jax.Array | float | int, batch: int) -> jax.Array:
    """A scalar or [B] (int or float) timestep -> [B]."""
    t = jnp.asarray(timesteps)
    if t.ndim > 1 or (t.ndim == 1 and t.shape[0] not in (1, batch)):
        raise ValueError(f"timesteps must be a scalar or have shape [{batch}]; got shape {t.shape}")
    return jnp.broadcast_to(t.reshape(-1), (batch,))


class TimestepEmbedding(nn.Module):
    """linear_1 -> SiLU -> linear_2: [B, C_in] -> [B, time_embed_dim]."""

    time_embed_dim: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dense = lambda name: nn.Dense(self.time_embed_dim, dtype=self.dtype, param_dtype=self.param_dtype, name=name)
        return dense("linear_2")(nn.silu(dense("linear_1")(x.astype(self.dtype))))


# ---------------------------------------------------------------------------------------------
# Convolutions and normalisation
# ---------------------------------------------------------------------------------------------


class GroupNorm(nn.Module):
    """GroupNorm with flax's parameter names (``scale``, ``bias``: [C]) and float32 statistics.

    Sums over the spatial axes per channel first ([B, C]), then combines channels per group, and
    applies normalisation and the affine map as one per-channel scale and shift. Two passes
    (mean, then the centred second moment) keep the variance exact in float32. On XLA:CPU this is
    about 7x faster than ``flax.linen.GroupNorm``, which reduces over a [B, ..., G, C/G] reshape.

    x: [B, ..., C] -> x's shape and dtype.
    """

    num_groups: int
    epsilon: float = 1e-5
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        if c % self.num_groups:
            raise ValueError(f"GroupNorm: {c} channels are not divisible by num_groups={self.num_groups}")
        gamma = self.param("scale", nn.initializers.ones, (c,), self.param_dtype).astype(jnp.float32)
        beta = self.param("bias", nn.initializers.zeros, (c,), self.param_dtype).astype(jnp.float32)
        if jax.default_backend() == "cpu":  # the written-out gradient measured faster on XLA:CPU
            return _group_norm(x, gamma, beta, self.num_groups, self.epsilon)
        return _group_norm_fwd(x, gamma, beta, self.num_groups, self.epsilon)[0]  # autodiff, forward mode too


def _group_helpers(shape, groups: int):
    """For x of ``shape`` [B, ..., C]: a function [B, C] channel sums -> [B, C] with each channel
    holding its group's mean, and the shape that broadcasts a [B, C] array over x."""
    b, c = shape[0], shape[-1]
    per = c // groups
    count = per * math.prod(shape[1:-1])

    def per_group_mean(channel_sums):
        return jnp.repeat(channel_sums.reshape(b, groups, per).sum(-1) / count, per, axis=-1)

    return per_group_mean, (b,) + (1,) * (len(shape) - 2) + (c,)


def _group_stats(xf, groups: int, eps: float):
    """Per-channel [B, C] group mean and 1 / std of a float32 [B, ..., C] (two passes: the mean, then
    the centred second moment, so the variance is exact in float32)."""
    per_group_mean, bshape = _group_helpers(xf.shape, groups)
    spatial = tuple(range(1, xf.ndim - 1))
    mean = per_group_mean(jnp.sum(xf, axis=spatial))
    centred = xf - mean.reshape(bshape)
    var = per_group_mean(jnp.sum(centred * centred, axis=spatial))
    return mean, jax.lax.rsqrt(var + eps), bshape


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _group_norm(x, gamma, beta, groups: int, eps: float):
    """GroupNorm of x [B, ..., C] with float32 gamma, beta [C]; returns x's dtype. Its gradient is
    written out (:func:`_group_norm_bwd`)."""
    return _group_norm_fwd(x, gamma, beta, groups, eps)[0]


def _group_norm_fwd(x, gamma, beta, groups, eps):
    xf = x.astype(jnp.float32)
    mean, inv, bshape = _group_stats(xf, groups, eps)
    scale = gamma * inv  # [B, C]: normalisation and affine map as one per-channel scale and shift
    y = (xf * scale.reshape(bshape) + (beta - mean * scale).reshape(bshape)).astype(x.dtype)
    return y, (x, gamma, mean, inv)


def _group_norm_bwd(groups, eps, res, dy):
    """With xh = (x - mean) * inv and g = dy * gamma: dbeta = sum dy, dgamma = sum dy * xh, and
    dx = inv * (g - mean_group(g) - xh * mean_group(g * xh)). One pass reads x and dy for the
    per-channel sums, one more writes dx (autodiff of the forward made several)."""
    x, gamma, mean, inv = res
    xf, dyf = x.astype(jnp.float32), dy.astype(jnp.float32)
    per_group_mean, bshape = _group_helpers(xf.shape, groups)
    spatial = tuple(range(1, x.ndim - 1))
    xh = (xf - mean.reshape(bshape)) * inv.reshape(bshape)
    s_dy = jnp.sum(dyf, axis=spatial)  # [B, C]
    s_dyxh = jnp.sum(dyf * xh, axis=spatial)
    a = per_group_mean(s_dy * gamma)  # [B, C]: the group mean of g
    c = per_group_mean(s_dyxh * gamma)  # the group mean of g * xh
    scale = gamma * inv
    dx = dyf * scale.reshape(bshape) - (inv * a).reshape(bshape) - xh * (inv * c).reshape(bshape)
    return dx.astype(x.dtype), jnp.sum(s_dyxh, axis=0), jnp.sum(s_dy, axis=0)


_group_norm.defvjp(_group_norm_fwd, _group_norm_bwd)


def group_norm(x: jax.Array, groups: int, eps: float, name: str, param_dtype: Dtype = jnp.float32) -> jax.Array:
    """GroupNorm over (H, W, C/groups) computed in float32 (:class:`GroupNorm`); returns x's dtype. x: [B, ..., C]."""
    return GroupNorm(num_groups=groups, epsilon=eps, param_dtype=param_dtype, name=name)(x)


def layer_norm(x: jax.Array, eps: float, name: str, param_dtype: Dtype = jnp.float32) -> jax.Array:
    y = nn.LayerNorm(epsilon=eps, dtype=jnp.float32, param_dtype=param_dtype, use_fast_variance=False,
                     name=name)(x.astype(jnp.float32))
    return y.astype(x.dtype)


def conv(features: int, kernel: int, name: str | None, dtype: Dtype, param_dtype: Dtype, stride: int = 1,
         padding: Any = None, use_bias: bool = True) -> nn.Conv:
    """A 2-D convolution on NHWC with PyTorch's symmetric padding, (kernel - 1) // 2 by default.

    ``name=None`` inside ``setup`` (the attribute name is used)."""
    pad = (kernel - 1) // 2 if padding is None else padding
    if isinstance(pad, int):
        pad = ((pad, pad), (pad, pad))
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=pad, use_bias=use_bias,
                   dtype=dtype, param_dtype=param_dtype, name=name, conv_general_dilated=winograd.conv_general_dilated)


class Downsample2D(nn.Module):
    """3x3 stride-2 conv; ``padding=0`` pads only bottom/right first (the VAE encoder's layout)."""

    out_channels: int
    padding: int = 1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:  # [B, H, W, C] -> [B, H/2, W/2, C_out]
        pad = self.padding if self.padding else ((0, 1), (0, 1))
        return conv(self.out_channels, 3, "conv", self.dtype, self.param_dtype, stride=2, padding=pad)(x)


def upsample_nearest_2x(x: jax.Array) -> jax.Array:
    """[B, H, W, C] -> [B, 2H, 2W, C] nearest-neighbour."""
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


class Upsample2D(nn.Module):
    """Nearest 2x upsampling then a 3x3 conv."""

    out_channels: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:  # [B, H, W, C] -> [B, 2H, 2W, C_out]
        return conv(self.out_channels, 3, "conv", self.dtype, self.param_dtype)(upsample_nearest_2x(x))


class ResnetBlock2D(nn.Module):
    """GroupNorm-SiLU-conv residual block, optionally conditioned on a time embedding.

    ``time_embedding_norm="default"`` adds Linear(SiLU(temb)) before norm2; ``"scale_shift"``
    applies norm2(h) * (1 + scale) + shift. Set ``cond_channels`` to add a second, multiplicative
    conditioning (DiffAE): after the time modulation h <- h * (1 + Linear(SiLU(cond))), with the
    projection ``cond_emb_proj`` owned by this block. With ``cond_channels=None`` the block is
    exactly diffusers' ResnetBlock2D.

    x: [B, H, W, C_in], temb: [B, D_t] or None, cond: [B, D_z] or None -> [B, H, W, out_channels].
    """

    out_channels: int
    groups: int = 32
    groups_out: int | None = None
    eps: float = 1e-6
    time_embedding_norm: str = "default"
    output_scale_factor: float = 1.0
    use_in_shortcut: bool | None = None
    cond_channels: int | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array | None = None, cond: jax.Array | None = None) -> jax.Array:
        if self.time_embedding_norm not in ("default", "scale_shift"):
            raise ValueError(f"ResnetBlock2D: time_embedding_norm={self.time_embedding_norm!r}; "
                             "allowed: ['default', 'scale_shift']")
        pd = self.param_dtype
        h = nn.silu(group_norm(x, self.groups, self.eps, "norm1", pd))
        h = conv(self.out_channels, 3, "conv1", self.dtype, pd)(h)

        if temb is not None:
            n = 2 * self.out_channels if self.time_embedding_norm == "scale_shift" else self.out_channels
            temb = nn.Dense(n, dtype=self.dtype, param_dtype=pd, name="time_emb_proj")(nn.silu(temb))
            temb = temb[:, None, None, :]
        if self.time_embedding_norm == "scale_shift":
            if temb is None:
                raise ValueError("ResnetBlock2D: time_embedding_norm='scale_shift' needs a time embedding")
            scale, shift = jnp.split(temb, 2, axis=-1)
            h = group_norm(h, self.groups_out or self.groups, self.eps, "norm2", pd) * (1 + scale) + shift
        else:
            if temb is not None:
                h = h + temb
            h = group_norm(h, self.groups_out or self.groups, self.eps, "norm2", pd)

        if self.cond_channels is not None:
            if cond is None or cond.shape[-1] != self.cond_channels:
                raise ValueError(f"ResnetBlock2D: built with cond_channels={self.cond_channels}; cond must be "
                                 f"[B, {self.cond_channels}], got {None if cond is None else cond.shape}")
            c = nn.Dense(self.out_channels, dtype=self.dtype, param_dtype=pd, name="cond_emb_proj")(nn.silu(cond))
            h = h * (1 + c[:, None, None, :])

        h = conv(self.out_channels, 3, "conv2", self.dtype, pd)(nn.silu(h))

        shortcut = self.use_in_shortcut
        if shortcut is None:
            shortcut = x.shape[-1] != self.out_channels
        if shortcut:
            x = conv(self.out_channels, 1, "conv_shortcut", self.dtype, pd)(x)
        out = x + h
        return out / self.output_scale_factor if self.output_scale_factor != 1.0 else out


# ---------------------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------------------


def multi_head_attention(q: jax.Array, k: jax.Array, v: jax.Array, num_heads: int) -> jax.Array:
    """Scaled dot-product attention, logits and softmax in float32.

    q: [B, T, N*H], k, v: [B, S, N*H] -> [B, T, N*H].
    """
    b, t, d = q.shape
    if d % num_heads:
        raise ValueError(f"attention width {d} is not divisible by {num_heads} heads")
    split = lambda a: a.reshape(a.shape[0], a.shape[1], num_heads, d // num_heads)  # [B, L, N, H]
    if jax.default_backend() == "cpu":
        out = heads_major_attention(split(q), split(k), split(v))
    else:
        out = jax.nn.dot_product_attention(split(q), split(k), split(v))
    return out.reshape(b, t, d)


@jax.custom_vjp
def heads_major_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Scaled dot-product attention, [B, T, N, H] x [B, S, N, H] -> [B, T, N, H], for XLA:CPU.

    The same function as ``jax.nn.dot_product_attention`` (computed in float32), laid out for the
    CPU: the [B, N, T, S] logits are heads-major and the softmax's division is applied after the
    value product, on [B, N, T, H] instead of [B, N, T, S]; XLA:CPU then runs the whole forward as
    one fused kernel that never writes the logits out. The gradient is flash-style
    (:func:`_attention_bwd`). On this project's 2-core CPU the `small` UNet's attention (B 8, 256
    pixels, 16 heads of 8) runs 8x faster than ``jax.nn.dot_product_attention`` forward, and its
    forward + backward 2.2x faster than autodiff of this forward on two CPU devices, 1.4x on one
    (README, Speed).
    """
    return _attention(*_heads_major(q, k, v)).swapaxes(1, 2).astype(q.dtype)


def _heads_major(q, k, v):
    """[B, L, N, H] -> [B, N, L, H] float32, q already scaled by H^-1/2."""
    q, k, v = (jnp.swapaxes(a, 1, 2).astype(jnp.float32) for a in (q, k, v))
    return q * q.shape[-1] ** -0.5, k, v


def _logits(a, b):
    return jnp.einsum("bnqh,bnkh->bnqk", a, b)


def _attention(qs, k, v):
    """Heads-major attention output [B, N, T, H] (never differentiated: the custom gradient)."""
    logits = _logits(qs, k)
    e = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))
    return jnp.einsum("bnqk,bnkh->bnqh", e, v) / jnp.sum(e, axis=-1, keepdims=True)


def _attention_fwd(q, k, v):
    qs, k_, v_ = _heads_major(q, k, v)
    o = _attention(qs, k_, v_)
    # each row's log-sum-exp, from logits computed again: the barrier keeps XLA from sharing them
    # with the output's fused kernel, which would make it write the [B, N, T, S] logits out
    logits = _logits(*jax.lax.optimization_barrier((qs, k_)))
    m = jnp.max(logits, axis=-1)
    lse = m + jnp.log(jnp.sum(jnp.exp(logits - m[..., None]), axis=-1))
    dtypes = tuple(jnp.zeros((0,), a.dtype) for a in (q, k, v))  # the inputs' dtypes, for the gradients
    return o.swapaxes(1, 2).astype(q.dtype), (qs, k_, v_, o, lse, dtypes)


def _with_column(a, col):
    """[..., L, H] -> [..., L, H + 1], the last column ``col`` (a scalar or one value per row)."""
    col = jnp.broadcast_to(jnp.asarray(col, a.dtype), a.shape[:-1])
    return jnp.concatenate([a, col[..., None]], axis=-1)


def _exp(x):
    """exp(x). The zero-weighted row max is there for XLA:CPU: its default YNNPACK fusion takes a
    chain of products and elementwise ops whole (tiled, [B, N, T, S] never written out) only when
    the chain holds a reduction; without it each [B, N, T, S] step is written out and read back
    (measured 2x slower for the attention's backward)."""
    return jnp.exp(x - 0.0 * jnp.max(x, axis=-1, keepdims=True))


def _attention_bwd_group(res, do):
    """Flash-style gradient: the probabilities P are recomputed from q, k and the row log-sum-exps,
    never stored. With D = rowsum(dO * O) and dS = P * (dO V^T - D):
    dq = dS K / sqrt(H), dk = dS^T Q / sqrt(H), dv = P^T dO. dk and dv need the transposed
    [S, T] products, which are computed as such (K Q^T) rather than transposed. The row terms (lse,
    D) enter the products as an extra column ([q, lse] . [k, -1] = q.k - lse), so each of the three
    gradients is one chain of products and elementwise ops that XLA:CPU fuses whole (:func:`_exp`);
    the barriers keep XLA from merging the three chains' shared logits into one written-out array."""
    qs, k, v, o, lse = res
    d = jnp.sum(do * o, axis=-1)  # [B, N, T]
    qa, doa = _with_column(qs, lse), _with_column(do, d)  # [B, N, T, H + 1]
    ka, va = _with_column(k, -1.0), _with_column(v, -1.0)  # [B, N, S, H + 1]
    barrier = jax.lax.optimization_barrier
    a, b, c, e, k1 = barrier((qa, ka, doa, va, k))
    dq = jnp.einsum("bnqk,bnkh->bnqh", _exp(_logits(a, b)) * _logits(c, e), k1) * qs.shape[-1] ** -0.5
    a, b, do1 = barrier((ka, qa, do))
    dv = jnp.einsum("bnkq,bnqh->bnkh", _exp(_logits(a, b)), do1)
    a, b, c, e, q1 = barrier((ka, qa, va, doa, qs))
    dk = jnp.einsum("bnkq,bnqh->bnkh", _exp(_logits(a, b)) * _logits(c, e), q1)  # qs carries the scale
    return dq, dk, dv


# the backward splits the heads into this many groups (fewer if the heads don't divide), each an
# independent set of fused kernels that XLA:CPU can run side by side (one fused chain alone did not
# use the second core: no faster on one 2-thread device than on each of two 1-thread devices).
# Measured on the `small` UNet's attention (B 8, 16 heads): 1 group 48 ms, 2 37, 4 34, 8 30 on one
# 2-thread device; on two devices 19.7 / 18.4 / 16.4 / 64.5 ms (README, Speed)
ATTENTION_BWD_GROUPS = 4


def _attention_bwd(res, do):
    qs, k, v, o, lse, dtypes = res
    do = jnp.swapaxes(do, 1, 2).astype(jnp.float32)
    n = qs.shape[1]
    groups = max(g for g in range(1, min(ATTENTION_BWD_GROUPS, n) + 1) if n % g == 0)
    parts = [_attention_bwd_group(tuple(a[:, i * n // groups:(i + 1) * n // groups] for a in (qs, k, v, o, lse)),
                                  do[:, i * n // groups:(i + 1) * n // groups]) for i in range(groups)]
    grads = (jnp.concatenate(g, axis=1) for g in zip(*parts))
    return tuple(jnp.swapaxes(g, 1, 2).astype(t.dtype) for g, t in zip(grads, dtypes))


heads_major_attention.defvjp(_attention_fwd, _attention_bwd)


class SpatialSelfAttention(nn.Module):
    """Self-attention over the pixels of a feature map (diffusers ``Attention`` in UNet2D/VAE blocks).

    GroupNorm (``norm_groups``; None: no norm), q/k/v/out projections with bias, residual, then
    division by ``rescale_output_factor``. ``head_dim=None`` uses one head.
    x: [B, H, W, C] -> [B, H, W, C].
    """

    head_dim: int | None = None
    norm_groups: int | None = 32
    eps: float = 1e-6
    rescale_output_factor: float = 1.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, hgt, wid, c = x.shape
        head_dim = self.head_dim or c
        if c % head_dim:
            raise ValueError(f"SpatialSelfAttention: channels {c} not divisible by attention_head_dim {head_dim}")
        h = group_norm(x, self.norm_groups, self.eps, "group_norm", self.param_dtype) if self.norm_groups else x
        h = h.reshape(b, hgt * wid, c)  # [B, HW, C]
        dense = lambda name: nn.Dense(c, dtype=self.dtype, param_dtype=self.param_dtype, name=name)
        h = multi_head_attention(dense("to_q")(h), dense("to_k")(h), dense("to_v")(h), c // head_dim)
        h = dense("to_out_0")(h).reshape(b, hgt, wid, c)
        out = h + x
        return out / self.rescale_output_factor if self.rescale_output_factor != 1.0 else out


class Attention(nn.Module):
    """Multi-head (cross-)attention on sequences: q/k/v projections without bias, output with bias.

    x: [B, T, C], context: [B, S, D] or None (self-attention) -> [B, T, C].
    """

    num_heads: int
    head_dim: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
        context = x if context is None else context.astype(self.dtype)
        inner = self.num_heads * self.head_dim
        proj = lambda name: nn.Dense(inner, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype, name=name)
        h = multi_head_attention(proj("to_q")(x), proj("to_k")(context), proj("to_v")(context), self.num_heads)
        return nn.Dense(x.shape[-1], dtype=self.dtype, param_dtype=self.param_dtype, name="to_out_0")(h)


class GEGLU(nn.Module):
    """proj -> (a, gate) -> a * GELU(gate) (exact GELU)."""

    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = nn.Dense(2 * self.features, dtype=self.dtype, param_dtype=self.param_dtype, name="proj")(x)
        a, gate = jnp.split(h, 2, axis=-1)
        return a * jax.nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
    """GEGLU feed-forward with a 4x inner width: [B, T, C] -> [B, T, C]."""

    mult: int = 4
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = GEGLU(self.mult * x.shape[-1], self.dtype, self.param_dtype, name="net_0")(x)
        return nn.Dense(x.shape[-1], dtype=self.dtype, param_dtype=self.param_dtype, name="net_2")(h)


class BasicTransformerBlock(nn.Module):
    """Pre-LayerNorm self-attention, cross-attention to ``context`` and GEGLU feed-forward, each residual.

    x: [B, T, C], context: [B, S, D] -> [B, T, C].
    """

    num_heads: int
    head_dim: int
    norm_eps: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        ln = lambda h, name: layer_norm(h, self.norm_eps, name, self.param_dtype)
        x = Attention(self.num_heads, self.head_dim, **kw, name="attn1")(ln(x, "norm1")) + x
        x = Attention(self.num_heads, self.head_dim, **kw, name="attn2")(ln(x, "norm2"), context) + x
        return FeedForward(**kw, name="ff")(ln(x, "norm3")) + x


class Transformer2DModel(nn.Module):
    """GroupNorm -> proj_in -> BasicTransformerBlocks -> proj_out, plus the input (Stable Diffusion).

    diffusers' conv (SD1) and linear (SD2, ``use_linear_projection``) projections are the same map
    on NHWC features; both are Dense layers here and the loader accepts either weight layout.
    x: [B, H, W, C], context: [B, S, D] -> [B, H, W, C].
    """

    num_heads: int
    head_dim: int
    num_layers: int = 1
    norm_groups: int = 32
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        b, hgt, wid, c = x.shape
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = group_norm(x, self.norm_groups, 1e-6, "norm", self.param_dtype).reshape(b, hgt * wid, c)
        h = nn.Dense(self.num_heads * self.head_dim, **kw, name="proj_in")(h)  # [B, HW, N*H]
        for i in range(self.num_layers):
            h = BasicTransformerBlock(self.num_heads, self.head_dim, **kw, name=f"transformer_blocks_{i}")(h, context)
        h = nn.Dense(c, **kw, name="proj_out")(h)
        return h.reshape(b, hgt, wid, c) + x


# ---------------------------------------------------------------------------------------------
# UNet stages: one module per stage kind, the attention flavour chosen by a field
# ---------------------------------------------------------------------------------------------


def _attend(stage: nn.Module, i: int, x: jax.Array, context: jax.Array | None, groups: int | None,
            rescale: float = 1.0) -> jax.Array:
    """``attentions_i`` of a UNet stage: spatial self-attention or a Transformer2DModel."""
    kw = dict(dtype=stage.dtype, param_dtype=stage.param_dtype, name=f"attentions_{i}")
    if stage.attention == "self":
        return SpatialSelfAttention(stage.attention_head_dim, groups, stage.eps, rescale, **kw)(x)
    if stage.attention == "cross":
        if context is None:
            raise ValueError("a cross-attention block needs encoder_hidden_states (context)")
        c = x.shape[-1]
        if c % stage.num_heads:
            raise ValueError(f"cross-attention: {c} channels not divisible by {stage.num_heads} heads")
        return Transformer2DModel(stage.num_heads, c // stage.num_heads, stage.transformer_layers, groups,
                                  **kw)(x, context)
    raise ValueError(f"attention={stage.attention!r}; allowed: [None, 'self', 'cross']")


def _resnet(stage: nn.Module, i: int, x: jax.Array, temb: jax.Array | None, cond: jax.Array | None,
            out_channels: int, output_scale_factor: float = 1.0) -> jax.Array:
    """``resnets_i`` of a UNet stage."""
    return ResnetBlock2D(out_channels, stage.groups, eps=stage.eps, time_embedding_norm=stage.time_embedding_norm,
                         output_scale_factor=output_scale_factor, cond_channels=stage.cond_channels,
                         dtype=stage.dtype, param_dtype=stage.param_dtype, name=f"resnets_{i}")(x, temb, cond)


class DownBlock2D(nn.Module):
    """diffusers' DownBlock2D, AttnDownBlock2D (``attention="self"``), CrossAttnDownBlock2D
    (``"cross"``) and DownEncoderBlock2D (called without temb): (resnet[, attention]) x num_layers,
    then an optional stride-2 downsampler.

    x: [B, H, W, C] -> (x_out, skips), skips the outputs after each layer and the downsampler.
    """

    out_channels: int
    num_layers: int
    attention: str | None = None  # None | "self" | "cross"
    add_downsample: bool = True
    downsample_padding: int = 1
    groups: int = 32
    eps: float = 1e-6
    time_embedding_norm: str = "default"
    attention_head_dim: int | None = None  # "self": channels per head (None: one head)
    num_heads: int = 1  # "cross"
    transformer_layers: int = 1  # "cross"
    cond_channels: int | None = None  # DiffAE: see ResnetBlock2D
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, temb=None, context=None, cond=None):
        skips = []
        for i in range(self.num_layers):
            x = _resnet(self, i, x, temb, cond, self.out_channels)
            if self.attention is not None:
                x = _attend(self, i, x, context, self.groups)
            skips.append(x)
        if self.add_downsample:
            x = Downsample2D(self.out_channels, self.downsample_padding, self.dtype, self.param_dtype,
                             name="downsamplers_0")(x)
            skips.append(x)
        return x, tuple(skips)


class UpBlock2D(nn.Module):
    """diffusers' UpBlock2D, AttnUpBlock2D (``attention="self"``), CrossAttnUpBlock2D (``"cross"``),
    and UpDecoderBlock2D (``skips=None``, no temb): (concat skip, resnet[, attention]) x num_layers,
    then an optional 2x upsampler.

    x: [B, H, W, C], skips: tuple of [B, H, W, C_i] (consumed from the end) -> [B, 2H, 2W, C_out].
    """

    out_channels: int
    num_layers: int
    attention: str | None = None
    add_upsample: bool = True
    groups: int = 32
    eps: float = 1e-6
    time_embedding_norm: str = "default"
    attention_head_dim: int | None = None
    num_heads: int = 1
    transformer_layers: int = 1
    cond_channels: int | None = None  # DiffAE: see ResnetBlock2D
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, skips=None, temb=None, context=None, cond=None):
        if skips is not None and len(skips) != self.num_layers:
            raise ValueError(f"UpBlock2D got {len(skips)} skip connections for {self.num_layers} layers")
        for i in range(self.num_layers):
            if skips is not None:
                x = jnp.concatenate([x, skips[-1 - i].astype(x.dtype)], axis=-1)
            x = _resnet(self, i, x, temb, cond, self.out_channels)
            if self.attention is not None:
                x = _attend(self, i, x, context, self.groups)
        if self.add_upsample:
            x = Upsample2D(self.out_channels, self.dtype, self.param_dtype, name="upsamplers_0")(x)
        return x


class MidBlock2D(nn.Module):
    """diffusers' UNetMidBlock2D (``attention="self"`` or None) and UNetMidBlock2DCrossAttn (``"cross"``):
    resnet, then (attention, resnet) ``num_layers`` times. ``attn_groups=None``: no norm in self-attention.

    x: [B, H, W, C] -> [B, H, W, C].
    """

    num_layers: int = 1
    attention: str | None = "self"
    groups: int = 32
    attn_groups: int | None = 32  # "self" only; a Transformer2DModel uses ``groups``
    eps: float = 1e-6
    time_embedding_norm: str = "default"
    output_scale_factor: float = 1.0
    attention_head_dim: int | None = None
    num_heads: int = 1
    transformer_layers: int = 1
    cond_channels: int | None = None  # DiffAE: see ResnetBlock2D
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, temb=None, context=None, cond=None):
        c = x.shape[-1]
        x = _resnet(self, 0, x, temb, cond, c, self.output_scale_factor)
        for i in range(self.num_layers):
            if self.attention is not None:
                groups = self.attn_groups if self.attention == "self" else self.groups
                x = _attend(self, i, x, context, groups, rescale=self.output_scale_factor)
            x = _resnet(self, i + 1, x, temb, cond, c, self.output_scale_factor)
        return x


# ---------------------------------------------------------------------------------------------
# Checkpoint conversion by name
# ---------------------------------------------------------------------------------------------

_LIST_INDEX = re.compile(
    r"^(down_blocks|up_blocks|resnets|attentions|downsamplers|upsamplers|transformer_blocks|to_out|net)_(\d+)$")

# Older diffusers checkpoints and the former Flax models name the attention projections differently.
_ATTENTION_ALIASES = {"to_q": ("query",), "to_k": ("key",), "to_v": ("value",), "to_out.0": ("proj_attn",)}


def torch_module_name(path: Sequence[str]) -> str:
    """('down_blocks_0', 'resnets_1', 'conv1') -> 'down_blocks.0.resnets.1.conv1'."""
    return ".".join(_LIST_INDEX.sub(r"\1.\2", p) for p in path)


def _find_module(sd: StateDict, name: str, leaf: str) -> str | None:
    """The checkpoint's name for module ``name``: itself, or its older attention alias."""
    if f"{name}.{leaf}" in sd:
        return name
    head, _, last = name.rpartition(".")
    if last == "0" and head.endswith("to_out"):
        head, _, last = head.rpartition(".")
        last = "to_out.0"
    for alias in _ATTENTION_ALIASES.get(last, ()):
        cand = f"{head}.{alias}" if head else alias
        if f"{cand}.{leaf}" in sd:
            return cand
    return None


def _convert_leaf(sd: StateDict, name: str, leaf: str, shape: tuple[int, ...]) -> np.ndarray:
    if leaf == "kernel":
        w = sd.take(f"{name}.weight")
        if len(shape) == 2:  # Dense: [out, in] or a 1x1 conv [out, in, 1, 1] -> [in, out]
            return w.reshape(w.shape[0], -1).T
        if w.ndim == 2:  # a 1x1 conv stored as a linear
            w = w[:, :, None, None]
        return w.transpose(2, 3, 1, 0)  # OIHW -> HWIO
    if leaf in ("scale", "embedding"):
        return sd.take(f"{name}.weight")
    return sd.take(f"{name}.{leaf}")


def params_from_state_dict(expected: Mapping, sd: StateDict, dtype: Dtype = None,
                           ignore_unused: Iterable[str] = ()) -> dict:
    """Fills a model's parameter tree (``expected``: shapes, from ``jax.eval_shape``) from a
    diffusers-layout state dict, module by module, by name; then checks it with ``finalize``.

    Raises CheckpointError listing every missing tensor (by its PyTorch name), shape mismatch and
    unused tensor.
    """
    missing: list[str] = []

    def walk(node: Mapping, path: tuple[str, ...]) -> dict:
        out = {}
        leaves = {k: v for k, v in node.items() if not isinstance(v, Mapping)}
        if leaves:
            name = torch_module_name(path)
            has_weight = any(k in leaves for k in ("kernel", "scale", "embedding"))
            probe = "weight" if has_weight else next(iter(leaves))
            module = _find_module(sd, name, probe) or name
            for k, v in leaves.items():
                try:
                    out[k] = _convert_leaf(sd, module, k, tuple(v.shape))
                except CheckpointError:
                    missing.append(f"{module}.{'weight' if k in ('kernel', 'scale', 'embedding') else k}")
        for k, v in node.items():
            if isinstance(v, Mapping):
                out[k] = walk(v, path + (k,))
        return out

    converted = walk(expected, ())
    if missing:
        raise CheckpointError(
            f"checkpoint {sd.source} lacks {len(missing)} tensor(s) the model needs:\n  " + "\n  ".join(missing[:40])
            + (f"\n  ... and {len(missing) - 40} more" if len(missing) > 40 else ""))
    return finalize(converted, expected, sd, ignore_unused=ignore_unused, dtype=dtype)


def expected_params(module: nn.Module, *example_args, **example_kwargs) -> dict:
    """Parameter shapes of ``module`` without allocating them (``jax.eval_shape`` of ``init``)."""
    shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), *example_args, **example_kwargs))
    return shapes["params"]

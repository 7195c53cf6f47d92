"""A compact CNN encoder Phi for Square: z = Phi(x) and linear attribute logits on z.

The official DiDAE code trains a ResNet-18 on the 8 binary Square attributes and freezes its
penultimate features as Phi; this is the CPU-sized stand-in (about 0.1M parameters at 32 px).

    enc = SquareEncoder(embed_dim=64, num_attributes=8, resolution=32)
    params = init_params(enc, jax.random.key(0))
    z, logits = enc.apply({"params": params}, x)  # x: [B, 32, 32, 3] in [-1, 1]
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import flax.linen as nn

from jaxcf.models import blocks
from jaxcf.models.init import fast_init

Dtype = Any


class SquareEncoder(nn.Module):
    """conv3x3 -> ``num_stages`` x (stride-2 conv3x3, channels doubling) with SiLU -> flatten -> Dense.

    No normalisation layers: Square's factors are absolute intensities (the background grey, the
    red of the inner square) that per-sample GroupNorm would normalise away, and the feature map
    is flattened rather than pooled so that the square's position survives.
    x: [B, R, R, C] -> (z [B, embed_dim], attribute logits [B, num_attributes] = Linear(z)).
    """

    embed_dim: int = 64
    num_attributes: int = 8
    width: int = 16
    num_stages: int = 3
    resolution: int = 32
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def __post_init__(self):
        for field in ("embed_dim", "num_attributes", "width", "num_stages", "resolution"):
            v = getattr(self, field)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"SquareEncoder: field {field!r} = {v!r} must be a positive int")
        if self.resolution % 2 ** self.num_stages:
            raise ValueError(f"SquareEncoder: field 'resolution' = {self.resolution} must be a multiple of "
                             f"2 ** num_stages = {2 ** self.num_stages}")
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        if x.ndim != 4 or x.shape[1:3] != (self.resolution, self.resolution):
            raise ValueError(f"SquareEncoder: x must be [B, {self.resolution}, {self.resolution}, C] "
                             f"(field 'resolution'); got {tuple(x.shape)}")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = nn.silu(blocks.conv(self.width, 3, "conv_in", **kw)(x.astype(self.dtype)))
        for i in range(self.num_stages):
            h = nn.silu(blocks.conv(self.width * 2 ** i, 3, f"down_{i}", stride=2, **kw)(h))
        h = h.reshape(h.shape[0], -1)  # [B, (R / 2**S)^2 * C_last]
        z = nn.Dense(self.embed_dim, **kw, name="embed")(h)
        logits = nn.Dense(self.num_attributes, **kw, name="head")(z)
        return z, logits


def init_params(encoder: SquareEncoder, rng: jax.Array, in_channels: int = 3) -> dict:
    """Random parameters with flax's default distributions (:func:`jaxcf.models.init.fast_init`)."""
    x = jax.ShapeDtypeStruct((1, encoder.resolution, encoder.resolution, in_channels), jnp.float32)
    return fast_init(encoder, x, rng=rng)["params"]

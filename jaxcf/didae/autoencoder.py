"""The diffusion autoencoder of DiDAE (METHODS.md §2.1-2.3): frozen encoder Phi + DiffAE decoder.

    z   = Phi(x)                                   semantic code, [B, D]
    x_T = ddim_invert(eps_theta(., ., z), x)       stochastic code, 20 uniform steps
    x'  = ddim_sample(eps_theta(., ., z'), x_T)    decode an (edited) code z'

Everything takes its parameters as arguments (``enc_params`` of the frozen encoder, ``dec_params``
of the decoder), so one jitted program can encode, invert, edit and decode a sharded batch.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from jaxcf.diffusion import NoiseSchedule, as_eps_fn, ddim_invert, ddim_sample

# encode(enc_params, x [B, H, W, 3] in [-1, 1]) -> z [B, D] (float32)
EncodeFn = Callable[[Any, jax.Array], jax.Array]


def square_encode_fn(encoder) -> EncodeFn:
    """Phi of a :class:`jaxcf.models.encoders.SquareEncoder`: its embedding (not the attribute logits)."""
    return lambda p, x: encoder.apply({"params": p}, x)[0].astype(jnp.float32)


def clip_encode_fn(clip) -> EncodeFn:
    """Phi of jaxcf's CLIP image tower: images resized / normalised for CLIP, projected features."""
    from jaxcf.models.clip import to_clip_input

    size = clip.config.vision.image_size
    return lambda p, x: clip.encode_image(p, to_clip_input(x, size)).astype(jnp.float32)


def semantic_cond(encode: EncodeFn):
    """``cond_fn`` for :func:`jaxcf.diffusion.denoising_loss`: (z,) with z = Phi(x0), Phi frozen."""
    return lambda batch, enc_params: (encode(enc_params, batch["image"]),)


def standardized(encode: EncodeFn, mean, std) -> EncodeFn:
    """Phi followed by per-dimension standardisation, (Phi(x) - mean) / std (DiffAE's code normalisation).

    The decoder is conditioned on, and the dictionaries and edits work in, this space: every
    dimension of the code has unit spread, so ``SiLU`` and the conditioning projections see
    inputs of order one whatever the encoder's scale. mean, std: [D] (the fit pool's statistics).
    """
    mean = jnp.asarray(mean, jnp.float32)
    inv = 1.0 / jnp.maximum(jnp.asarray(std, jnp.float32), 1e-6)
    return lambda p, x: (encode(p, x) - mean) * inv


def code_statistics(codes) -> dict:
    """Per-dimension mean and std of codes [N, D] (numpy, float32), the standardisation of :func:`standardized`."""
    import numpy as np

    codes = np.asarray(codes, np.float64)
    return {"mean": codes.mean(0).astype(np.float32), "std": codes.std(0).astype(np.float32)}


@dataclasses.dataclass(frozen=True)
class DiffusionAutoencoder:
    """Encode / invert / decode with a semantic-conditioned eps-model ``decoder.apply(x_t, t, z)``."""

    decoder: Any  # a DiffAEUNet
    encode: EncodeFn  # the code the decoder is conditioned on (see :func:`standardized`)
    schedule: NoiseSchedule
    num_steps: int = 20  # DDIM steps for inversion and for decoding
    prediction: str = "eps"  # what the decoder outputs: "eps", "v" or "x0"
    clip_x0: bool = False  # clamp the predicted clean image to [-1, 1] at every DDIM step

    def eps_fn(self, dec_params):
        net = lambda x, t, z: self.decoder.apply({"params": dec_params}, x, t, z)
        return as_eps_fn(net, self.schedule, self.prediction, self.clip_x0)

    def invert(self, dec_params, x0: jax.Array, z: jax.Array) -> jax.Array:
        """x_T = DDIM-invert(x0 | z): [B, R, R, C], [B, D] -> [B, R, R, C]."""
        return ddim_invert(self.eps_fn(dec_params), x0, z, self.schedule, self.num_steps)

    def decode(self, dec_params, x_T: jax.Array, z: jax.Array) -> jax.Array:
        """x0 = DDIM-sample(x_T | z)."""
        return ddim_sample(self.eps_fn(dec_params), x_T, z, self.schedule, self.num_steps)

    def decode_edits(self, dec_params, x_T: jax.Array, z_edits: jax.Array) -> jax.Array:
        """All K edited codes of a batch from the same x_T: x_T [B, ...], z_edits [K, B, D] -> [K, B, ...].

        One program: the K axis is vmapped, so XLA runs the K decodes as one batch of K*B.
        """
        return jax.vmap(self.decode, in_axes=(None, None, 0))(dec_params, x_T, z_edits)

    def counterfactuals(self, enc_params, dec_params, x0: jax.Array, edit: Callable[[jax.Array], jax.Array],
                        residual: bool = False):
        """Encode, invert, edit and decode: ``edit(z [B, D]) -> z' [K, B, D]``; returns (x' [K, B, ...], z, z').

        ``residual`` (a jaxcf addition): x' = clip(x0 + D(x_T, z') - D(x_T, z), -1, 1), the decoded
        change added to the input, which keeps what the decoder does not reproduce (pixel noise,
        its reconstruction bias) as in the input; one more decode per batch.
        """
        z = self.encode(enc_params, x0)
        x_T = self.invert(dec_params, x0, z)
        z_edits = edit(z)
        x_cf = self.decode_edits(dec_params, x_T, z_edits)
        if residual:
            rec = self.decode_edits(dec_params, x_T, z[None])[0]
            x_cf = jnp.clip(x0[None] + x_cf - rec[None], -1.0, 1.0)
        return x_cf, z, z_edits

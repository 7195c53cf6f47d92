"""A noise-aware anti-causal predictor p_phi(y | x_t, t) for guidance on noisy images (Diff-SCM).

Diff-SCM guides the reverse diffusion with the gradient of a classifier trained on *noised*
images, ``grad_{x_t} log p_phi(y | x_t, t)``: at large t a clean-image classifier (CLIP) sees
inputs it was never trained on, and its gradients there point nowhere in particular. This module
holds a small time-conditioned convolutional classifier, its training objective (cross-entropy on
``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps`` with t uniform over the noise levels used for
counterfactuals) and the ``log_prob(x_t, t, y)`` used by ``guide_on="xt"``.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from jaxcf.diffusion.losses import q_sample
from jaxcf.models.blocks import GroupNorm, timestep_embedding


class NoiseAwareClassifier(nn.Module):
    """[B, H, W, 3] noisy images + timesteps [B] -> logits [B, num_classes].

    A stride-2 convolution stack; the sinusoidal timestep embedding scales and shifts every
    stage (FiLM), so the same filters can read a shape at every noise level.
    """

    num_classes: int
    channels: Sequence[int] = (32, 64, 128)
    groups: int = 8

    @nn.compact
    def __call__(self, x, t):
        temb = timestep_embedding(jnp.asarray(t, jnp.float32).reshape(-1), self.channels[0])
        temb = nn.Dense(4 * self.channels[0], name="time_proj")(temb)
        temb = nn.silu(temb)
        h = nn.Conv(self.channels[0], (3, 3), name="stem")(x)
        for i, ch in enumerate(self.channels):
            h = nn.Conv(ch, (3, 3), strides=(2, 2) if i else (1, 1), name=f"down_{i}")(h)
            h = GroupNorm(num_groups=min(self.groups, ch), name=f"norm_{i}")(h)
            film = nn.Dense(2 * ch, name=f"film_{i}")(temb)
            scale, shift = jnp.split(film[:, None, None, :], 2, axis=-1)
            h = nn.silu(h * (1 + scale) + shift)
            h = nn.Conv(ch, (3, 3), name=f"conv_{i}")(h)
            h = nn.silu(GroupNorm(num_groups=min(self.groups, ch), name=f"norm2_{i}")(h))
        return nn.Dense(self.num_classes, name="head")(jnp.mean(h, axis=(1, 2)))


def noisy_images(schedule, x0, rng, max_t: int):
    """(x_t, t): x0 noised to uniform t in [0, max_t) with the forward process q(x_t | x_0)."""
    k_t, k_e = jax.random.split(rng)
    t = jax.random.randint(k_t, (x0.shape[0],), 0, max_t)
    return q_sample(schedule, x0, t, jax.random.normal(k_e, x0.shape, x0.dtype)), t


def noisy_classification_loss(model: NoiseAwareClassifier, schedule, max_t: int):
    """loss_fn(params, batch{"image", "label"}, rng) -> (cross-entropy on x_t, {"accuracy"})."""

    def loss_fn(params, batch, rng):
        x_t, t = noisy_images(schedule, batch["image"], rng, max_t)
        logits = model.apply({"params": params}, x_t, t)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
        return ce, {"accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["label"])}

    return loss_fn


def noise_aware_log_prob(model: NoiseAwareClassifier, params, classes=None):
    """``log_prob(x_t, t, y)`` for guidance: log_softmax over ``classes`` (indices into the model's
    outputs, e.g. the task's base classes among all pretraining classes; None = all), y indexing
    ``classes``."""

    def log_prob(x, t, y):
        t = jnp.broadcast_to(jnp.asarray(t, jnp.int32), (x.shape[0],))
        logits = model.apply({"params": params}, x, t)
        if classes is not None:
            logits = logits[:, jnp.asarray(classes)]
        return jnp.take_along_axis(jax.nn.log_softmax(logits, -1), y[:, None], 1)[:, 0]

    return log_prob

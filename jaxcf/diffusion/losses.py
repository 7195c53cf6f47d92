"""Training objectives of the diffusion models, and the map from each parameterisation to eps.

A network may predict the noise eps (DDPM), the velocity v = sqrt(abar) eps - sqrt(1 - abar) x0
(Salimans & Ho 2022; Stable Diffusion 2) or the clean image x0. Every sampler in
:mod:`jaxcf.diffusion.ddim` consumes eps, so :func:`as_eps_fn` turns any of them into an eps-model
(and can clamp the implied x0 to the data range, as guided-diffusion and DiffAE do when sampling).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from jaxcf.diffusion.ddim import _bcast, predict_x0

PREDICTIONS = ("eps", "v", "x0")


def target(prediction: str, x0, eps, abar):
    """What the network is trained to output at x_t = sqrt(abar) x0 + sqrt(1 - abar) eps; abar [B]."""
    if prediction == "eps":
        return eps
    if prediction == "x0":
        return x0
    if prediction == "v":
        a = _bcast(abar, x0)
        return jnp.sqrt(a) * eps - jnp.sqrt(1.0 - a) * x0
    raise ValueError(f"prediction={prediction!r}; allowed: {list(PREDICTIONS)}")


def eps_and_x0(prediction: str, out, x_t, abar):
    """(eps, x0) implied by the network output ``out`` at x_t; abar [B] or scalar."""
    a = _bcast(abar, x_t)
    out = out.astype(jnp.float32)
    x_t = x_t.astype(jnp.float32)
    if prediction == "eps":
        return out, predict_x0(x_t, out, abar)
    if prediction == "v":
        return jnp.sqrt(a) * out + jnp.sqrt(1.0 - a) * x_t, jnp.sqrt(a) * x_t - jnp.sqrt(1.0 - a) * out
    if prediction == "x0":
        return (x_t - jnp.sqrt(a) * out) / jnp.sqrt(1.0 - a), out
    raise ValueError(f"prediction={prediction!r}; allowed: {list(PREDICTIONS)}")


def as_eps_fn(model_fn: Callable, schedule, prediction: str = "eps", clip_x0: bool = False) -> Callable:
    """``model_fn(x_t, t, cond)`` predicting ``prediction`` -> an eps-model for the DDIM samplers.

    clip_x0: clamp the implied x0 to [-1, 1] and return the eps consistent with the clamped x0
    (x0 clamping of guided-diffusion's DDIM). t is an int array [B]; timesteps index ``schedule``.
    """
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction={prediction!r}; allowed: {list(PREDICTIONS)}")
    if prediction == "eps" and not clip_x0:
        return model_fn

    def eps_fn(x_t, t, cond):
        abar = schedule.alphas_cumprod[t]
        eps, x0 = eps_and_x0(prediction, model_fn(x_t, t, cond), x_t, abar)
        if clip_x0:
            a = _bcast(abar, x_t)
            x0 = jnp.clip(x0, -1.0, 1.0)
            eps = (x_t.astype(jnp.float32) - jnp.sqrt(a) * x0) / jnp.sqrt(1.0 - a)
        return eps.astype(x_t.dtype)

    return eps_fn


def q_sample(schedule, x0, t, eps):
    """The forward process: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, for timesteps t [B]."""
    a = _bcast(schedule.alphas_cumprod[t], x0)
    return jnp.sqrt(a) * x0 + jnp.sqrt(1 - a) * eps


def denoising_loss(model, schedule, cond_fn: Callable | None = None, prediction: str = "eps",
                   max_t: int | None = None):
    """The DDPM objective || target - net(sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, t, *cond) ||^2, t ~ U{0..T-1},
    with target = eps, v or x0 (``prediction``); eps gives the usual eps-MSE.

    ``max_t``: draw t from U{0..max_t-1} only (None: every level). A model used only below a level
    (DiCap's action starts at ``depth`` T) spends its training there.

    ``cond_fn(batch, *frozen) -> tuple`` gives the extra model inputs (DiDAE: the semantic code
    z = Phi(x0) of a frozen encoder whose params come in as ``frozen``); default none.
    Returns ``loss_fn(params, batch, rng, *frozen) -> (loss, {})``.
    """
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction={prediction!r}; allowed: {list(PREDICTIONS)}")
    num_t = schedule.num_train_timesteps if max_t is None else int(max_t)
    if not 0 < num_t <= schedule.num_train_timesteps:
        raise ValueError(f"max_t={max_t!r}; allowed: 1..{schedule.num_train_timesteps} or None (every level)")

    def loss_fn(params, batch, rng, *frozen: Any):
        x0 = batch["image"]
        cond = tuple(cond_fn(batch, *frozen)) if cond_fn is not None else ()
        cond = jax.lax.stop_gradient(cond)
        k_t, k_e = jax.random.split(rng)
        t = jax.random.randint(k_t, (x0.shape[0],), 0, num_t)
        eps = jax.random.normal(k_e, x0.shape)
        out = model.apply({"params": params}, q_sample(schedule, x0, t, eps), t, *cond)
        abar = schedule.alphas_cumprod[t]
        return jnp.mean((out.astype(jnp.float32) - target(prediction, x0, eps, abar)) ** 2), {}

    return loss_fn


def eps_mse_loss(model, schedule, cond_fn=None):
    """The eps-MSE objective: :func:`denoising_loss` with prediction="eps"."""
    return denoising_loss(model, schedule, cond_fn, "eps")

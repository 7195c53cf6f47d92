"""Noise schedules and the spaced timestep grid of DDIM.

Symbols follow the papers: ``betas`` = beta_t, ``alphas_cumprod`` = abar_t = prod_{s<=t} (1 - beta_s),
for t = 0 .. T-1 (T = ``num_train_timesteps``, eps-prediction).
"""

from __future__ import annotations

import math

import numpy as np

import flax.struct
import jax.numpy as jnp

SCHEDULES = ("linear", "scaled_linear", "cosine")


@flax.struct.dataclass
class NoiseSchedule:
    """A discrete noise schedule; a pytree, so it can be closed over or passed into `jit`."""

    betas: jnp.ndarray  # [T]
    alphas_cumprod: jnp.ndarray  # [T] abar_t

    @property
    def num_train_timesteps(self) -> int:
        return self.betas.shape[0]


def make_schedule(
    name: str = "linear",
    num_train_timesteps: int = 1000,
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
) -> NoiseSchedule:
    """linear (DDPM, 1e-4..0.02), scaled_linear (Stable Diffusion: linear in sqrt(beta)), cosine."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown noise schedule {name!r}; allowed: {', '.join(SCHEDULES)}")
    if num_train_timesteps < 2:
        raise ValueError(f"num_train_timesteps must be >= 2, got {num_train_timesteps}")
    T = num_train_timesteps
    if name == "linear":
        betas = np.linspace(beta_start, beta_end, T, dtype=np.float64)
    elif name == "scaled_linear":
        betas = np.linspace(beta_start**0.5, beta_end**0.5, T, dtype=np.float64) ** 2
    else:  # cosine (Nichol & Dhariwal 2021), betas capped at 0.999
        s = 0.008
        f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
        betas = np.array([min(1 - f(i + 1) / f(i), 0.999) for i in range(T)], dtype=np.float64)
    abar = np.cumprod(1.0 - betas)
    return NoiseSchedule(betas=jnp.asarray(betas, jnp.float32), alphas_cumprod=jnp.asarray(abar, jnp.float32))


def ddim_timesteps(num_steps: int, num_train_timesteps: int = 1000, depth: float = 1.0) -> np.ndarray:
    """The DDIM grid: ``num_steps + 1`` increasing integer timesteps from 0 to ``depth * T - 1``.

    ``ts[0] = 0`` stands for the clean image (its noise level is taken as abar = 1, see
    :func:`grid_alphas`); ``ts[-1]`` is the deepest point reached by inversion. ``depth`` is the
    abduction depth as a fraction of T (e.g. 0.6 stops inversion at 0.6 T).
    """
    if not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
    if not 0.0 < depth <= 1.0:
        raise ValueError(f"depth must be in (0, 1], got {depth!r}")
    last = int(round(depth * num_train_timesteps)) - 1
    if last < num_steps:
        raise ValueError(
            f"depth={depth} of T={num_train_timesteps} leaves {last + 1} timesteps, fewer than num_steps={num_steps}"
        )
    return np.round(np.linspace(0, last, num_steps + 1)).astype(np.int32)


def grid_alphas(schedule: NoiseSchedule, ts: np.ndarray) -> jnp.ndarray:
    """abar at each grid point, with the clean end (``ts[0]``) set to exactly 1."""
    a = schedule.alphas_cumprod[jnp.asarray(ts)]
    return a.at[0].set(1.0)

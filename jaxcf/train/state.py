"""The explicit train state and the jitted, sharded update step."""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from jaxcf.models import winograd
from jaxcf.train.mesh import data_sharding, param_shardings, replicated


@flax.struct.dataclass
class TrainState:
    """Everything a run needs to continue: a pytree, saved whole by Orbax."""

    step: jnp.ndarray  # int32 []
    params: Any
    opt_state: Any
    rng: jnp.ndarray  # uint32 [2] raw key; per-step keys are fold_in(rng, step)
    ema_params: Any = None  # optional exponential moving average of params


# loss_fn(params, batch, rng[, frozen]) -> (loss, metrics dict)
LossFn = Callable[..., tuple[jnp.ndarray, dict]]


def create_train_state(init_params: Callable[[jax.Array], Any] | Any, tx: optax.GradientTransformation, seed: int,
                       mesh: Mesh, param_sharding: str = "replicated", ema: bool = False):
    """Initialises a TrainState directly into its shardings; returns (state, state_shardings).

    ``init_params``: a traceable ``rng -> params`` (flax ``model.init``), or ready-made params (a
    pytree of arrays, e.g. from :func:`jaxcf.models.init.fast_init`, which is fast but not
    traceable). Shapes come from ``jax.eval_shape``, shardings are derived from them, and init is
    jitted with those ``out_shardings`` so no device ever holds an unsharded copy of the state.
    """
    rng = jax.random.PRNGKey(seed)
    given = None if callable(init_params) else init_params

    def init(rng, given):
        init_rng, state_rng = jax.random.split(rng)
        params = init_params(init_rng) if given is None else given
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                          rng=state_rng, ema_params=params if ema else None)

    shapes = jax.eval_shape(init, rng, given)
    shardings = param_shardings(shapes, mesh, param_sharding)
    return jax.jit(init, out_shardings=shardings)(rng, given), shardings


def warmup_cosine(peak: float, warmup_steps: int, total_steps: int, end_fraction: float = 0.0):
    """Linear warmup to ``peak`` then cosine decay to ``end_fraction * peak``; any step counts work
    (the warmup is capped so at least one decay step remains)."""
    warmup = max(0, min(warmup_steps, total_steps - 1))
    return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, total_steps, end_value=peak * end_fraction)


def make_update_fn(loss_fn: LossFn, tx: optax.GradientTransformation, ema_decay: float | None = None):
    """Pure ``update(state, batch[, frozen]) -> (state, metrics)`` for a loss over trainable params.

    ``frozen`` (optional) is a pytree of parameters that are used but not trained (a frozen CLIP
    or UNet): passed as an argument, not closed over, so it is sharded like any input and never
    baked into the compiled program as a constant.
    """

    def update(state: TrainState, batch, *frozen):
        rng = jax.random.fold_in(state.rng, state.step)
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch, rng, *frozen)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema_params = state.ema_params
        if ema_decay is not None and ema_params is not None:
            # warm-up: decay_t = min(decay, (1 + t) / (10 + t)), so the average forgets the random
            # init within a few hundred steps instead of keeping decay^steps of it
            t = state.step.astype(jnp.float32)
            decay = jnp.minimum(ema_decay, (1.0 + t) / (10.0 + t))
            ema_params = optax.incremental_update(params, ema_params, step_size=1.0 - decay)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), **metrics}
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema_params), metrics

    return update


def jit_update(update: Callable, state_shardings: Any, mesh: Mesh, data_axis: str = "data",
               frozen_shardings: Any = None):
    """Jits ``update(state, batch[, frozen])`` once: state donated, batch split over the data axis,
    frozen params placed by ``frozen_shardings`` (when given), metrics replicated."""
    extra = () if frozen_shardings is None else (frozen_shardings,)
    devices = mesh.shape[data_axis]

    @functools.wraps(update)
    def traced(*args):
        with winograd.batch_split(devices):  # CPU convolutions chunk each device's share of the batch
            return update(*args)

    return jax.jit(
        traced,
        in_shardings=(state_shardings, data_sharding(mesh, data_axis)) + extra,
        out_shardings=(state_shardings, replicated(mesh)),
        donate_argnums=(0,),
    )

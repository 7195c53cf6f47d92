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


def make_update_fn(loss_fn: LossFn, tx: optax.GradientTransformation, ema_decay: float | None = None, *,
                   shard_mesh: Mesh | None = None, data_axis: str = "data"):
    """Pure ``update(state, batch[, frozen]) -> (state, metrics)`` for a loss over trainable params.

    ``frozen`` (optional) is a pytree of parameters that are used but not trained (a frozen CLIP
    or UNet): passed as an argument, not closed over, so it is sharded like any input and never
    baked into the compiled program as a constant.

    The gradient, two ways. Default (``shard_mesh=None``): one global program that XLA partitions
    over the mesh; any loss works, including those that couple examples (InfoNCE over the batch).
    ``shard_mesh``: :func:`per_shard_value_and_grad`, for a loss that is a mean over examples:
    each device along ``data_axis`` evaluates it on its shard and the gradients are summed in one
    all-reduce of one flat buffer (XLA:CPU synchronises its devices once per array of an
    all-reduce). Same estimator, other random draws (see there).
    """
    if shard_mesh is not None and shard_mesh.shape.get(data_axis, 1) > 1:
        value_and_grad = per_shard_value_and_grad(loss_fn, shard_mesh, data_axis)
    else:
        value_and_grad = jax.value_and_grad(loss_fn, has_aux=True)

    def update(state: TrainState, batch, *frozen):
        rng = jax.random.fold_in(state.rng, state.step)
        (loss, metrics), grads = value_and_grad(state.params, batch, rng, *frozen)
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


def per_shard_value_and_grad(loss_fn: LossFn, mesh: Mesh, data_axis: str = "data"):
    """``(params, batch, rng, *frozen) -> ((loss, metrics), grads)`` computed shard by shard.

    For a loss that is a mean over the examples of the batch (the denoising objective, a
    classifier's cross-entropy; not a contrastive loss over the batch). ``jax.shard_map`` over
    ``data_axis``: each device takes the loss and its gradient on its own shard of ``batch``
    (params, rng and frozen replicated), then the gradients, raveled into one vector, are averaged
    in a single all-reduce; loss and metrics are averaged too (so metrics must be means). With
    equal shards the average of the shard means is the batch mean, so the estimator is the
    global one; the random draws are not: device i draws from ``fold_in(rng, i)``, so runs with
    different numbers of data-parallel devices draw different noise.

    Why: XLA's partitioner all-reduces each parameter's gradient where it is produced, and
    XLA:CPU runs an all-reduce of many arrays with one rendezvous of its devices per array (the
    `small` UNet's step: 273 arrays); one flat buffer is one (README, Speed).
    """
    from jax.flatten_util import ravel_pytree
    from jax.sharding import PartitionSpec as P

    def local(params, batch, rng, *frozen):
        rng = jax.random.fold_in(rng, jax.lax.axis_index(data_axis))
        # differentiate a device-varying copy: the gradient of the replicated params themselves
        # would come back already summed over devices, one all-reduce per array
        params = _to_varying(params, data_axis)
        with winograd.batch_split(1):  # this trace sees one device's shard, not the global batch
            (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch, rng, *frozen)
        flat, unravel = ravel_pytree(grads)
        grads = unravel(jax.lax.pmean(flat, data_axis))
        loss, metrics = jax.lax.pmean((loss, metrics), data_axis)
        return (loss, metrics), grads

    def value_and_grad(params, batch, rng, *frozen):
        specs = (P(), P(data_axis), P()) + (P(),) * len(frozen)
        return jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=P())(params, batch, rng, *frozen)

    return value_and_grad


def _to_varying(tree, axis: str):
    """The tree as device-varying along ``axis`` inside ``jax.shard_map`` (``jax.lax.pcast``; its
    predecessor ``jax.lax.pvary`` on older JAX)."""
    if hasattr(jax.lax, "pcast"):
        return jax.lax.pcast(tree, axis, to="varying")
    return jax.lax.pvary(tree, axis)


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

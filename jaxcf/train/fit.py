"""One training run, the same for every model jaxcf trains (foundation CLIP and UNets, DiDAE
encoder, decoder and classifiers, CFKD fine-tunes, DiCap prompts).

:func:`fit` builds the state, places the frozen parameters by ``config.param_sharding``, jits the
update once, runs :func:`jaxcf.train.loop.train_loop` (resume, checkpoints, SIGTERM, non-finite
losses) and closes the checkpointer and the metric writer.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import optax

from jaxcf.train.checkpoint import Checkpointer
from jaxcf.train.loop import train_loop
from jaxcf.train.mesh import check_batch_divisible, param_shardings
from jaxcf.train.metrics import MetricWriter
from jaxcf.train.state import TrainState, create_train_state, jit_update, make_update_fn, warmup_cosine

# compiled update steps, keyed by (loss_fn, tx, ema_decay, per_shard, shardings): runs that train the same
# loss with the same optimizer (the CFKD fine-tunes) share one compiled program
_UPDATES: dict = {}


def adam_warmup_cosine(learning_rate: float, warmup_steps: int, steps: int, end_fraction: float,
                       clip_norm: float = 1.0) -> optax.GradientTransformation:
    """Adam after global-norm clipping, on :func:`jaxcf.train.state.warmup_cosine`."""
    lr = warmup_cosine(learning_rate, warmup_steps, steps, end_fraction=end_fraction)
    return optax.chain(optax.clip_by_global_norm(clip_norm), optax.adam(lr))


def fit(init_params: Any, tx: optax.GradientTransformation, loss_fn: Callable, batch_fn: Callable[[int], Any], *,
        steps: int, batch_size: int, workdir: str, mesh, config, seed: int, desc: str, frozen: Any = None,
        ema_decay: Optional[float] = None, key: Optional[dict] = None, batch_field: str = "batch_size",
        per_shard: bool = False) -> TrainState:
    """Trains ``loss_fn(params, batch, rng[, frozen]) -> (loss, metrics)`` for ``steps`` steps.

    init_params: ready-made params or a traceable ``rng -> params``. batch_fn(step): this
    process's numpy batch (``batch_size`` is the global size, checked against the mesh).
    frozen: parameters used but not trained, placed once by ``config.param_sharding``.
    ema_decay: keep an exponential moving average (``state.ema_params``). key: the settings
    a resumed run must share (see :func:`jaxcf.train.loop.run_key`). ``config`` supplies
    ``checkpoint_every``, ``keep_checkpoints``, ``log_every``, ``tensorboard`` and
    ``param_sharding``. per_shard: the loss is a mean over examples, so its gradient is taken
    shard by shard and summed in one flat all-reduce (:func:`jaxcf.train.per_shard_value_and_grad`;
    faster on a CPU split into devices; each device draws its own randomness; only with
    ``param_sharding="replicated"``, else the global program). Resumes from
    ``workdir/checkpoints``; returns the final state.
    """
    check_batch_divisible(batch_size, mesh, f"config.{batch_field}")
    state, shardings = create_train_state(init_params, tx, seed, mesh, ema=ema_decay is not None)
    strategy = config.get("param_sharding", "replicated")
    frozen_shardings = None
    if frozen is not None:
        frozen_shardings = param_shardings(jax.eval_shape(lambda: frozen), mesh, strategy)
        frozen = jax.device_put(frozen, frozen_shardings)  # once, not on every step
    # per shard only with replicated params: inside shard_map every device holds the frozen params
    # whole, which would undo param_sharding="fsdp"
    per_shard = per_shard and strategy == "replicated"
    cache_key = (loss_fn, tx, ema_decay, per_shard, _flat(shardings), _flat(frozen_shardings))
    if cache_key not in _UPDATES:
        update = make_update_fn(loss_fn, tx, ema_decay=ema_decay, shard_mesh=mesh if per_shard else None)
        _UPDATES[cache_key] = jit_update(update, shardings, mesh, frozen_shardings=frozen_shardings)
    ckpt = Checkpointer(workdir, every=config.checkpoint_every, keep=config.keep_checkpoints)
    writer = MetricWriter(workdir, tensorboard=bool(config.get("tensorboard", False)))
    try:
        return train_loop(state, _UPDATES[cache_key], batch_fn, steps, mesh, ckpt, writer,
                          log_every=config.log_every, desc=desc, frozen=frozen, key=key)
    finally:
        ckpt.close()
        writer.close()


def _flat(tree):
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    return tuple(leaves), treedef

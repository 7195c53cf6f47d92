"""The training loop shared by every pipeline: resume, sharded steps, metrics, checkpoints, SIGTERM."""

from __future__ import annotations

import signal
import threading
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from tqdm.auto import tqdm

from jaxcf.train.checkpoint import Checkpointer
from jaxcf.train.mesh import shard_batch
from jaxcf.train.metrics import MetricWriter


class Preempted(Exception):
    """Raised after a SIGTERM once the state is checkpointed; rerunning the command resumes."""


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or inf; nothing after the last good checkpoint was saved."""


def tree_digest(tree: Any) -> str:
    """sha1 of a pytree's structure, shapes, dtypes and (where this process holds them whole) values.

    Values of arrays split over several processes are left out (only their shape counts), so the
    digest does not depend on the mesh or the number of processes.
    """
    import hashlib

    h = hashlib.sha1(str(jax.tree_util.tree_structure(tree)).encode())
    for x in jax.tree_util.tree_leaves(tree):
        if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        h.update(f"{np.shape(x)}{x.dtype if hasattr(x, 'dtype') else np.result_type(x)}".encode())
        if not isinstance(x, jax.Array) or x.is_fully_addressable:
            h.update(np.ascontiguousarray(np.asarray(jax.device_get(x))).tobytes())
        elif x.is_fully_replicated:  # multi-process, every process holds it whole
            h.update(np.ascontiguousarray(np.asarray(x.addressable_data(0))).tobytes())
    return h.hexdigest()


def run_key(state: Any, batch_fn: Callable[[int], Any], frozen: Any = None, key: Optional[dict] = None) -> dict:
    """What makes a training run: the caller's settings (``key``: whatever the state depends on that
    is not in the arrays, e.g. learning rate, loss weights, and the step count when the schedule
    depends on it), and digests of the initial state (architecture, init, optimizer state), the
    frozen parameters and the first example of the first batch (the data, its order and the seed).
    The step count alone is not in it: a run with a constant schedule may be extended."""
    first = jax.tree_util.tree_map(lambda a: np.asarray(a)[:1], batch_fn(0))  # global row 0: process 0's
    return {"settings": key or {}, "initial_state": tree_digest(state),
            "frozen": tree_digest(frozen) if frozen is not None else None, "first_example": tree_digest(first)}


class SigtermGuard:
    """Turns SIGTERM into a flag the loop checks between steps (main thread only)."""

    def __init__(self):
        self.stopped = False
        self._previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        self.stopped = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
        return False


def stream_indices(num_examples: int, global_batch: int, step: int, seed: int,
                   process_index: Optional[int] = None, process_count: Optional[int] = None) -> np.ndarray:
    """Example indices of this process's share of global batch ``step``; a pure function of its args.

    The stream is the concatenation of per-epoch permutations (epoch e uses seed (seed, e)), so any
    step can be rebuilt after a restart without replaying the ones before it.
    """
    if global_batch > num_examples:
        raise ValueError(f"batch size {global_batch} is larger than the {num_examples} examples")
    pi = jax.process_index() if process_index is None else process_index
    pc = jax.process_count() if process_count is None else process_count
    start = step * global_batch
    out = []
    pos = start
    while pos < start + global_batch:
        epoch, offset = divmod(pos, num_examples)
        perm = np.random.default_rng((seed, epoch)).permutation(num_examples)
        take = min(num_examples - offset, start + global_batch - pos)
        out.append(perm[offset:offset + take])
        pos += take
    idx = np.concatenate(out)
    local = global_batch // pc
    return idx[pi * local:(pi + 1) * local]


def train_loop(
    state: Any,
    update: Callable[[Any, Any], tuple[Any, dict]],
    batch_fn: Callable[[int], Any],
    num_steps: int,
    mesh: Mesh,
    checkpointer: Checkpointer,
    writer: MetricWriter,
    *,
    log_every: int = 10,
    desc: str = "train",
    frozen: Any = None,
    key: Optional[dict] = None,
) -> Any:
    """Runs ``update`` from the latest checkpoint (or ``state``) up to ``num_steps``.

    ``batch_fn(step)`` returns this process's numpy batch for that step. Metrics go to ``writer``
    every ``log_every`` steps; the state is checkpointed every ``checkpointer.every`` steps and at
    the end. On SIGTERM the state is saved and :class:`Preempted` is raised. ``frozen`` (if not
    None) is passed to every ``update`` call as its third argument.

    Resuming: checkpoints are used only if they were made by the same run (:func:`run_key`: the
    settings in ``key``, the initial state, ``frozen`` and the first batch);
    otherwise they are moved aside and training starts again. A checkpoint that cannot be read
    falls back to the previous one. A NaN or inf loss raises :class:`NonFiniteLoss` naming the
    step; the state from that step on is never saved (the loss is checked before every save).
    """
    extra = () if frozen is None else (frozen,)
    checkpointer.check_key(run_key(state, batch_fn, frozen, key), desc)
    state = checkpointer.restore_or(state)
    start = int(jax.device_get(state.step))
    if start >= num_steps:
        return state
    bar = tqdm(total=num_steps, initial=start, desc=desc, disable=jax.process_index() != 0,
               dynamic_ncols=True, mininterval=2.0)
    first_bad = (jnp.asarray(-1, jnp.int32), jnp.asarray(0.0, jnp.float32))  # (step, loss) of the first
    # non-finite loss, tracked on the device so that checking it costs no sync per step
    with SigtermGuard() as guard:
        for step in range(start, num_steps):
            state, metrics = update(state, shard_batch(batch_fn(step), mesh), *extra)
            done = step + 1
            first_bad = _track_nonfinite(first_bad, metrics["loss"], done)
            if done % log_every == 0 or done == num_steps:
                metrics = jax.device_get(metrics)
                writer.write(done, metrics)
                bar.set_postfix(loss=f"{float(metrics['loss']):.4f}")
            bar.update(1)
            save = done % checkpointer.every == 0 or done == num_steps or guard.stopped
            if save or done % log_every == 0:
                _check_finite(first_bad, desc, checkpointer, bar)
            checkpointer.maybe_save(done, state, force=done == num_steps or guard.stopped)
            if guard.stopped:
                checkpointer.wait()
                bar.close()
                raise Preempted(f"{desc}: SIGTERM at step {done}; checkpoint saved in {checkpointer.directory}")
    bar.close()
    checkpointer.wait()
    return state


@jax.jit
def _track_nonfinite(first_bad, loss, step):
    bad_step, bad_loss = first_bad
    loss = jnp.sum(loss.astype(jnp.float32))
    new = (bad_step < 0) & ~jnp.isfinite(loss)
    return jnp.where(new, jnp.asarray(step, jnp.int32), bad_step), jnp.where(new, loss, bad_loss)


def _check_finite(first_bad, desc: str, checkpointer: Checkpointer, bar) -> None:
    bad, loss = (v.item() for v in jax.device_get(first_bad))
    if bad < 0:
        return
    checkpointer.wait()
    bar.close()
    last = checkpointer.latest_step()
    kept = f"the last good checkpoint is step {last} in {checkpointer.directory}" if last is not None else \
        "no checkpoint was saved"
    raise NonFiniteLoss(f"{desc}: non-finite loss {loss} at step {bad}; stopped without saving that state ({kept}); "
                        "lower the learning rate or check the data, then rerun")

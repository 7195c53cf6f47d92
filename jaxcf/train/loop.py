"""The training loop shared by every pipeline: resume, sharded steps, metrics, checkpoints, SIGTERM."""

from __future__ import annotations

import signal
import threading
from typing import Any, Callable, Optional

import jax
import numpy as np
from jax.sharding import Mesh
from tqdm.auto import tqdm

from jaxcf.train.checkpoint import Checkpointer
from jaxcf.train.mesh import shard_batch
from jaxcf.train.metrics import MetricWriter


class Preempted(Exception):
    """Raised after a SIGTERM once the state is checkpointed; rerunning the command resumes."""


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
) -> Any:
    """Runs ``update`` from the latest checkpoint (or ``state``) up to ``num_steps``.

    ``batch_fn(step)`` returns this process's numpy batch for that step. Metrics go to ``writer``
    every ``log_every`` steps; the state is checkpointed every ``checkpointer.every`` steps and at
    the end. On SIGTERM the state is saved and :class:`Preempted` is raised. ``frozen`` (if not
    None) is passed to every ``update`` call as its third argument.
    """
    extra = () if frozen is None else (frozen,)
    state = checkpointer.restore_or(state)
    start = int(jax.device_get(state.step))
    if start >= num_steps:
        return state
    bar = tqdm(total=num_steps, initial=start, desc=desc, disable=jax.process_index() != 0,
               dynamic_ncols=True, mininterval=2.0)
    with SigtermGuard() as guard:
        for step in range(start, num_steps):
            state, metrics = update(state, shard_batch(batch_fn(step), mesh), *extra)
            done = step + 1
            if done % log_every == 0 or done == num_steps:
                metrics = jax.device_get(metrics)
                writer.write(done, metrics)
                bar.set_postfix(loss=f"{float(metrics['loss']):.4f}")
            bar.update(1)
            checkpointer.maybe_save(done, state, force=done == num_steps or guard.stopped)
            if guard.stopped:
                checkpointer.wait()
                bar.close()
                raise Preempted(f"{desc}: SIGTERM at step {done}; checkpoint saved in {checkpointer.directory}")
    bar.close()
    checkpointer.wait()
    return state

"""The one way jaxcf applies a jitted function to a host array of any length: fixed-size padded
batches (one compilation), split over the mesh's data axis, gathered back to numpy."""

from __future__ import annotations

from typing import Callable

import jax
import numpy as np
from tqdm.auto import tqdm

from jaxcf.data.common import padded_batches
from jaxcf.train.mesh import data_sharding, param_shardings, to_host


def batched(fn: Callable, mesh, batch_size: int, *, param_sharding: str = "replicated", desc: str | None = None):
    """``fn(params, x, *rest)`` jitted and applied to a numpy x of any length in padded batches.

    The batch size is rounded down to a multiple of the data axis (at least one row per device);
    the last batch is padded by repeating its final row, and padding rows are dropped from the
    outputs. x may be a tuple of arrays sharing the first axis (batched together). Every process
    holds all of x; ``device_put`` hands each device its rows, and the outputs come back whole
    (numpy), concatenated on ``axis`` (1 for outputs shaped [K, B, ...]). ``param_sharding``
    "fsdp" places ``params`` over the mesh's model axis (:func:`jaxcf.train.mesh.param_shardings`);
    ``desc`` shows a progress bar (process 0).
    """
    d = mesh.shape["data"]
    bs = max(d, batch_size - batch_size % d)
    jitted = jax.jit(fn)

    def chunks(x):
        if not isinstance(x, tuple):
            return list(padded_batches(x, bs))
        parts = [list(padded_batches(a, bs)) for a in x]
        return [(tuple(p[0] for p in group), group[0][1]) for group in zip(*parts)]

    def run(params, x, *rest, axis: int = 0):
        if param_sharding != "replicated":
            params = jax.device_put(params, param_shardings(jax.eval_shape(lambda: params), mesh, param_sharding))
        outs = []
        for chunk, n in tqdm(chunks(x), desc=desc, disable=desc is None or jax.process_index() != 0):
            out = jitted(params, jax.device_put(chunk, data_sharding(mesh)), *rest)
            outs.append(jax.tree_util.tree_map(lambda o: np.take(to_host(o), np.arange(n), axis=axis), out))
        return jax.tree_util.tree_map(lambda *o: np.concatenate(o, axis=axis), *outs)

    return run

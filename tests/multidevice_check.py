"""Run with 8 forced CPU devices (see test_train.py): 1-device vs 8-device (data, fsdp) steps."""

import json
import os
import sys

import jax
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from jaxcf.train import create_train_state, jit_update, make_mesh, make_update_fn, shard_batch  # noqa: E402
from tests.test_train import mlp_problem  # noqa: E402


def train(mesh, steps=3, strategy="replicated"):
    init, loss_fn, batch_fn = mlp_problem(width=1024)
    tx = optax.adamw(1e-2)
    state, sh = create_train_state(init, tx, seed=0, mesh=mesh, param_sharding=strategy)
    update = jit_update(make_update_fn(loss_fn, tx), sh, mesh)
    for s in range(steps):
        state, _ = update(state, shard_batch(batch_fn(s), mesh))
    return state


def max_diff(a, b):
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in
               zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


if __name__ == "__main__":
    one = train(make_mesh([("data", 1)], devices=jax.devices()[:1]))
    dp = train(make_mesh([("data", -1)]))
    fsdp = train(make_mesh([("data", 4), ("model", 2)]), strategy="fsdp")
    print(json.dumps({
        "devices": len(jax.devices()),
        "dp_max_diff": max_diff(one.params, dp.params),
        "fsdp_max_diff": max_diff(one.params, fsdp.params),
        "fsdp_is_sharded": not fsdp.params["w1"].sharding.is_fully_replicated,
    }))

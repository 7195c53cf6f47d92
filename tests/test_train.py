"""Mesh, sharded update step, deterministic data stream and Orbax checkpoints."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxcf.train import (
    Checkpointer,
    MetricWriter,
    create_train_state,
    jit_update,
    make_mesh,
    make_update_fn,
    read_metrics,
    stream_indices,
    train_loop,
)

HERE = os.path.dirname(os.path.abspath(__file__))


def mlp_problem(width=64):
    """A small regression problem: 2-layer MLP, MSE; its data is a pure function of the step."""
    rng = np.random.default_rng(0)
    X = rng.normal(size=(512, 16)).astype(np.float32)
    Y = np.sin(X @ rng.normal(size=(16, 4))).astype(np.float32)

    def init(key):
        k1, k2 = jax.random.split(key)
        return {"w1": jax.random.normal(k1, (16, width)) * 0.3, "b1": jnp.zeros(width),
                "w2": jax.random.normal(k2, (width, 4)) * 0.3}

    def loss_fn(params, batch, rng):
        h = jnp.tanh(batch["x"] @ params["w1"] + params["b1"])
        # dropout-like noise from the per-step key: proves the key is the same on every device count
        h = h * (1 + 0.1 * jax.random.normal(rng, h.shape[-1:]))
        return jnp.mean((h @ params["w2"] - batch["y"]) ** 2), {}

    def batch_fn(step, batch_size=32):
        idx = stream_indices(len(X), batch_size, step, seed=0)
        return {"x": X[idx], "y": Y[idx]}

    return init, loss_fn, batch_fn


def test_make_mesh_and_errors():
    mesh = make_mesh([("data", -1)])
    assert mesh.shape == {"data": len(jax.devices())}
    with pytest.raises(ValueError, match="at most one axis may have size -1"):
        make_mesh([("data", -1), ("model", -1)])
    with pytest.raises(ValueError, match="needs 3 devices"):
        make_mesh([("data", 3)])
    with pytest.raises(ValueError, match="repeated axis names"):
        make_mesh([("data", 1), ("data", 1)])


def test_stream_indices_is_deterministic_and_covers_epochs():
    a = np.concatenate([stream_indices(10, 4, s, seed=3, process_index=0, process_count=1) for s in range(5)])
    b = np.concatenate([stream_indices(10, 4, s, seed=3, process_index=0, process_count=1) for s in range(5)])
    np.testing.assert_array_equal(a, b)
    assert sorted(a[:10]) == list(range(10)) and sorted(a[10:20]) == list(range(10))  # epoch = permutation
    # two processes read disjoint halves of the same global batch
    p0 = stream_indices(10, 4, 7, seed=3, process_index=0, process_count=2)
    p1 = stream_indices(10, 4, 7, seed=3, process_index=1, process_count=2)
    np.testing.assert_array_equal(np.concatenate([p0, p1]), stream_indices(10, 4, 7, seed=3, process_index=0, process_count=1))
    with pytest.raises(ValueError, match="larger than the 3 examples"):
        stream_indices(3, 4, 0, seed=0)


def test_train_loop_checkpoints_resumes_and_logs(tmp_path):
    init, loss_fn, batch_fn = mlp_problem()
    tx = optax.adam(1e-2)
    mesh = make_mesh([("data", -1)])

    def run(workdir, steps):
        state, sh = create_train_state(init, tx, seed=0, mesh=mesh)
        update = jit_update(make_update_fn(loss_fn, tx), sh, mesh)
        ckpt = Checkpointer(str(workdir), every=5, keep=2)
        out = train_loop(state, update, batch_fn, steps, mesh, ckpt, MetricWriter(str(workdir)), log_every=5)
        ckpt.close()
        return out

    full = run(tmp_path / "a", 20)
    run(tmp_path / "b", 10)  # stops at 10 ...
    resumed = run(tmp_path / "b", 20)  # ... and continues from its checkpoint
    assert int(resumed.step) == 20
    jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7), full.params, resumed.params)
    assert sorted(s for s in os.listdir(tmp_path / "b" / "checkpoints") if s.isdigit()) == ["15", "20"]  # keep = 2
    rows = read_metrics(str(tmp_path / "a" / "metrics.jsonl"))
    assert [r["step"] for r in rows] == [5, 10, 15, 20] and rows[-1]["loss"] < rows[0]["loss"]


def test_checkpointer_rejects_bad_settings(tmp_path):
    with pytest.raises(ValueError, match="checkpoint_every must be >= 1"):
        Checkpointer(str(tmp_path), every=0)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        Checkpointer(str(tmp_path)).restore({"a": jnp.zeros(2)})


def test_eight_devices_match_one_device():
    """One data-parallel step on 8 forced CPU devices gives the parameters of the 1-device step."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, os.path.join(HERE, "multidevice_check.py")], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["devices"] == 8
    assert result["dp_max_diff"] < 1e-5, result
    assert result["fsdp_max_diff"] < 1e-5, result
    assert result["fsdp_is_sharded"], result


def test_class_conditional_denoiser_trains_from_scratch_with_label_dropout(tmp_path):
    """train_eps_model(label_dropout=(p, null)): a class-conditional UNet initialised here (its class
    embedding has a row per class and the null class), labels from the dataset, resumable."""
    import ml_collections

    from jaxcf.configs import base_config
    from jaxcf.data.common import ArrayDataset
    from jaxcf.diffusion import make_schedule
    from jaxcf.diffusion.train import train_eps_model
    from jaxcf.models.registry import build_model

    rng = np.random.default_rng(0)
    data = ArrayDataset({"image": rng.integers(0, 256, (16, 8, 8, 3), dtype=np.uint8),
                         "label": rng.integers(0, 3, 16).astype(np.int32)})
    unet = build_model("unet2d", dict(block_out_channels=(8,), layers_per_block=1, down_block_types=("DownBlock2D",),
                                      up_block_types=("UpBlock2D",), norm_num_groups=4, num_class_embeds=4,
                                      resnet_time_scale_shift="scale_shift"))
    schedule = make_schedule("linear", 100, 1e-4, 0.02)
    cfg = ml_collections.ConfigDict(dict(steps=2, batch_size=4, learning_rate=1e-3, warmup_steps=1, ema_decay=0.9))
    run_cfg = base_config("test")
    run_cfg.checkpoint_every = 1

    def train():
        return train_eps_model(unet, schedule, data, cfg, str(tmp_path / "run"), make_mesh([("data", -1)]), run_cfg,
                               seed=0, label_dropout=(0.5, 3))

    params = train()
    assert params["class_embedding"]["embedding"].shape == (4, unet.config.time_embed_dim)
    x, t = jnp.zeros((2, 8, 8, 3)), jnp.array([5, 50])
    out = [unet.apply({"params": params}, x, t, jnp.array([k, k])) for k in (0, 3)]
    assert out[0].shape == (2, 8, 8, 3) and not np.allclose(out[0], out[1])  # the label reaches the output
    again = train()  # finished: resumes from the last checkpoint instead of training again
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(again)):
        np.testing.assert_array_equal(a, b)


_PER_SHARD = """
import os, json
os.environ["JAX_NUM_CPU_DEVICES"] = "2"
import re
import numpy as np, jax, jax.numpy as jnp, optax
from jaxcf.models import winograd
from jaxcf.train import create_train_state, jit_update, make_mesh, make_update_fn, per_shard_value_and_grad, shard_batch
winograd.CHUNK_ELEMENTS = 2 * 8 * 8 * 64  # the 32 -> 64 conv loops over chunks inside each shard
mesh = make_mesh([("data", -1)])
r = np.random.default_rng(0)
params = {"k": jnp.asarray(r.normal(size=(3, 3, 32, 64)) * 0.1, jnp.float32), "w": jnp.asarray(r.normal(size=(64, 3)), jnp.float32),
          "b": jnp.zeros(3)}
batch = shard_batch({"x": r.normal(size=(8, 8, 8, 32)).astype(np.float32), "y": r.normal(size=(8, 3)).astype(np.float32)}, mesh)

def loss(p, b, rng):  # a mean over examples, no randomness
    h = jnp.tanh(winograd.conv_general_dilated(b["x"], p["k"], (1, 1), ((1, 1), (1, 1)),
                                               dimension_numbers=("NHWC", "HWIO", "NHWC")))
    out = h.mean((1, 2)) @ p["w"] + p["b"]
    return jnp.mean((out - b["y"]) ** 2), {"out_mean": jnp.mean(out)}

ref = jax.jit(jax.value_and_grad(loss, has_aux=True))(params, batch, jax.random.key(0))
f = jax.jit(per_shard_value_and_grad(loss, mesh))
got = f(params, batch, jax.random.key(0))
err = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref)))
def all_reduced_arrays(jitted):  # operands of each all-reduce of the compiled program
    hlo = jitted.lower(params, batch, jax.random.key(0)).compile().as_text()
    return [ops.count("%") for ops in re.findall(r" all-reduce\\(([^)]*)\\)", hlo)]

arrays = all_reduced_arrays(f)
arrays_global = all_reduced_arrays(jax.jit(jax.value_and_grad(loss, has_aux=True)))

def noisy(p, b, rng):  # each device draws from its own key; d/db_j = mean(z) / 3
    return jnp.mean(jax.random.normal(rng, (b["y"].shape[0],))[:, None] * p["b"]), {}

draws = jax.jit(per_shard_value_and_grad(noisy, mesh))(params, batch, jax.random.key(1))[1]["b"]
draws_again = jax.jit(per_shard_value_and_grad(noisy, mesh))(params, batch, jax.random.key(1))[1]["b"]
halves = [jax.random.normal(jax.random.fold_in(jax.random.key(1), i), (4,)).mean() / 3 for i in range(2)]
tx = optax.adamw(1e-2)
state, sh = create_train_state(params, tx, 0, mesh)
s1, m1 = jit_update(make_update_fn(loss, tx), sh, mesh)(state, batch)
state, sh = create_train_state(params, tx, 0, mesh)
s2, m2 = jit_update(make_update_fn(loss, tx, shard_mesh=mesh), sh, mesh)(state, batch)
step_err = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s2.params)))
print(json.dumps({"err": err, "arrays": arrays, "arrays_global": arrays_global, "draws": float(draws[0]), "again": float(draws_again[0]),
                  "expected": float(np.mean(halves)), "step_err": step_err, "loss": [float(m1["loss"]), float(m2["loss"])]}))
"""


def test_per_shard_gradient_equals_the_global_one_with_one_all_reduce():
    """per_shard_value_and_grad on two CPU devices: for a mean over examples, the loss, metrics and
    gradients equal the global program's (and one update step of make_update_fn(shard_mesh=...)
    equals the default one) while the compiled program all-reduces one flat gradient buffer
    instead of one array per parameter; device i draws from fold_in(rng, i), deterministically.
    The loss holds a chunked Winograd convolution (its loop runs inside the shard)."""
    from tests.test_cpu_devices import run_fresh_cpu_process

    out = json.loads(run_fresh_cpu_process(_PER_SHARD).strip().splitlines()[-1])
    assert out["err"] < 1e-5, out
    assert out["step_err"] < 1e-6 and abs(out["loss"][0] - out["loss"][1]) < 1e-6, out
    assert sum(out["arrays"]) <= 3, out  # the flat gradient, the loss and the metric (combined or not)
    assert sum(out["arrays_global"]) >= 5, out  # the global program: each of the 3 gradients on its own
    assert out["draws"] == out["again"], out
    np.testing.assert_allclose(out["draws"], out["expected"], rtol=1e-5)  # the mean of the devices' own draws


def test_per_shard_on_one_device_is_the_plain_gradient():
    """make_update_fn(shard_mesh=...) on a mesh whose data axis has one device takes the ordinary
    path (nothing to all-reduce): bit-identical to the default, randomness included."""
    from jaxcf.train import make_update_fn

    mesh = make_mesh([("data", 1)], devices=jax.devices()[:1])

    def loss(p, b, rng):
        return jnp.mean((b["x"] * p["w"] + jax.random.normal(rng, b["x"].shape)) ** 2), {}

    tx = optax.sgd(0.1)
    params, batch = {"w": jnp.arange(3.0)}, {"x": jnp.ones((4, 3))}
    results = []
    for shard_mesh in (None, mesh):
        state, sh = create_train_state(params, tx, 0, mesh)
        results.append(jit_update(make_update_fn(loss, tx, shard_mesh=shard_mesh), sh, mesh)(state, batch))
    for a, b in zip(jax.tree.leaves(results[0]), jax.tree.leaves(results[1])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

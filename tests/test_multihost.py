"""Two CPU processes on localhost train exactly what one process with the same devices trains.

Each process of the pair has 2 forced CPU devices and joins the other through jaxcf's own
``initialize`` (JAXCF_* variables, gloo collectives); the reference is one process with 4. Both
run tests/multihost_worker.py: a few DiCap prompt-learning steps and a few DiDAE decoder steps on
the global ``data`` mesh of 4 devices, each process feeding only its share of every batch. A
second, fast test starts ``python -m jaxcf.main`` twice the same way.
"""

import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "multihost_worker.py")
STEPS = 4  # multihost_worker.STEPS


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(workdir, devices: int, **env_vars):
    os.makedirs(workdir, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAXCF_", "SLURM_", "TPU_", "XLA_"))}
    # optimization level 0: the same program in every run, compiled in half the time
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=ROOT,
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=0",
               **{k: str(v) for k, v in env_vars.items()})
    log = open(os.path.join(workdir, f"log_{env_vars.get('JAXCF_PROCESS_ID', 0)}.txt"), "w")
    return subprocess.Popen([sys.executable, WORKER, str(workdir)], env=env, cwd=ROOT, stdout=log,
                            stderr=subprocess.STDOUT), log


def wait_all(procs, timeout=400):
    """Waits for every process; on a failure or the timeout, kills the rest and shows the logs."""
    deadline = time.time() + timeout
    try:
        while any(p.poll() is None for p, _ in procs):
            failed = [p for p, _ in procs if p.poll() not in (None, 0)]
            if failed or time.time() > deadline:
                break
            time.sleep(0.2)
    finally:
        for p, log in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
            log.close()
    bad = [(p, log.name) for p, log in procs if p.returncode != 0]
    if bad:
        tails = "\n".join(f"--- {name} (exit {p.returncode})\n{open(name).read()[-3000:]}" for p, name in bad)
        pytest.fail(f"worker processes failed:\n{tails}")


def load(workdir, pi):
    with open(os.path.join(workdir, f"result_{pi}.json")) as f:
        info = json.load(f)
    return info, dict(np.load(os.path.join(workdir, f"result_{pi}.npz")))


def restore_latest(directory):
    """The last checkpoint under ``directory`` read back on this (one-device) process."""
    import jax
    import orbax.checkpoint as ocp

    step = max(int(s) for s in os.listdir(directory) if s.isdigit())
    path = os.path.join(directory, str(step), "default")
    ckpt = ocp.StandardCheckpointer()
    meta = ckpt.metadata(path)
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree_util.tree_map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one),
                                    getattr(meta, "item_metadata", meta))
    return step, ckpt.restore(path, target)


@pytest.mark.slow
def test_two_processes_train_what_one_process_trains(tmp_path):
    multi, single = tmp_path / "multi", tmp_path / "single"
    address = f"127.0.0.1:{free_port()}"
    t0 = time.time()
    procs = [start(single, 4)]  # the reference runs alongside the pair
    procs += [start(multi, 2, JAXCF_COORDINATOR_ADDRESS=address, JAXCF_NUM_PROCESSES=2, JAXCF_PROCESS_ID=i)
              for i in range(2)]
    wait_all(procs)
    elapsed = time.time() - t0

    (info0, p0), (info1, p1) = load(multi, 0), load(multi, 1)
    ref_info, ref = load(single, 0)
    assert ref_info["process_count"] == 1 and ref_info["devices"] == 4
    for pi, info in enumerate((info0, info1)):
        assert (info["process_index"], info["process_count"], info["devices"], info["local_devices"]) == (pi, 2, 4, 2)
        assert info["mesh"] == {"data": 4}
        # each run was repeated: it resumed from the collective checkpoint and trained nothing more
        assert info["resumed_equal"] == {"dicap": True, "didae": True}
    assert (info0["writes_metrics"], info1["writes_metrics"]) == (True, False)

    # both processes hold the same replicated parameters
    assert p0.keys() == p1.keys() == ref.keys()
    for k in p0:
        np.testing.assert_array_equal(p0[k], p1[k], err_msg=k)
    # ... and they are what one process with the same 4 devices computes. Attention key biases
    # get a gradient that is exactly 0 in exact arithmetic (softmax ignores a per-query constant),
    # so theirs is rounding noise that Adam scales up to ~lr: it depends on the summation order
    # of the all-reduce (gloo across processes vs in-process) and is left out.
    noise = [k for k in ref if k.endswith("to_k/bias")]
    assert noise and all(k.startswith("didae/") for k in noise)
    diffs = {k: float(np.max(np.abs(p0[k] - ref[k]))) for k in ref if k not in noise}
    worst = max(diffs, key=diffs.get)
    assert diffs[worst] < 1e-5, (worst, diffs[worst])
    assert any(k.startswith("dicap/") for k in diffs) and any(k.startswith("didae/") for k in diffs)

    from jaxcf.train import read_metrics

    for name in ("dicap", "didae"):
        # process 0 alone wrote the metrics: one row per step, none twice
        rows = read_metrics(os.path.join(multi, name, "metrics.jsonl"))
        assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
        ref_rows = read_metrics(os.path.join(single, name, "metrics.jsonl"))
        np.testing.assert_allclose([r["loss"] for r in rows], [r["loss"] for r in ref_rows], rtol=1e-5)
        # the checkpoint was written by both processes together (keep=2 of every 2 steps) ...
        ckpts = os.path.join(multi, name, "checkpoints")
        assert sorted(s for s in os.listdir(ckpts) if s.isdigit()) == ["2", "4"]
        parts = os.listdir(os.path.join(ckpts, "4", "default"))
        if any(p.startswith("ocdbt.process_") for p in parts):  # Orbax's OCDBT layout: one part per process
            assert {"ocdbt.process_0", "ocdbt.process_1"} <= set(parts), parts
        # ... and reads back here, on one device, as the final state
        step, state = restore_latest(ckpts)
        assert step == STEPS and int(state["step"]) == STEPS
        from flax import traverse_util

        saved = state["ema_params"] if name == "didae" else state["params"]
        for path, v in traverse_util.flatten_dict(saved).items():
            np.testing.assert_array_equal(np.asarray(v), p0[f"{name}/{'/'.join(path)}"])
    noise_diff = max(float(np.max(np.abs(p0[k] - ref[k]))) for k in noise)
    print(f"3 worker processes: {elapsed:.1f} s; max abs diff {diffs[worst]:.2e} ({worst}), "
          f"attention key biases {noise_diff:.2e}")


def test_main_joins_the_other_process_first(tmp_path):
    """``jaxcf.main`` initialises jax.distributed from the JAXCF_* variables before it touches a
    device, then runs the pipeline (here: stops at validation, in both processes alike)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAXCF_", "SLURM_", "TPU_", "XLA_"))}
    env.update(JAX_PLATFORMS="cpu", JAXCF_COORDINATOR_ADDRESS=f"127.0.0.1:{free_port()}", JAXCF_NUM_PROCESSES="2")
    cmd = [sys.executable, "-m", "jaxcf.main", f"--config={ROOT}/configs/diffusion.py:test", "--config.train.steps=-1",
           f"--workdir={tmp_path}/w"]
    procs = [subprocess.Popen(cmd, env=dict(env, JAXCF_PROCESS_ID=str(i)), cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outs = []
    try:
        outs = [p.communicate(timeout=120)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for i, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 2, out
        assert f"jaxcf: process {i} of 2, 1 local of 2 cpu devices" in out
        assert "jaxcf: error: config.train.steps=-1 must be an integer >= 1" in out

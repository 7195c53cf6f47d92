"""What a long run relies on: one run per workdir, a NaN stops the run without saving it, a corrupt
latest checkpoint falls back to the previous one, and no stage resumes from other settings."""

import json
import os
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxcf.train import (Checkpointer, MetricWriter, NonFiniteLoss, create_train_state, jit_update, make_mesh,
                         make_update_fn, train_loop)
from jaxcf.utils.lock import LockError, WorkdirLock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------- a tiny regression run

X = np.random.default_rng(0).normal(size=(64, 3)).astype(np.float32)
Y = X @ np.array([1.0, -2.0, 0.5], np.float32)


def _run(workdir, steps=6, every=2, keep=10, key=None, nan_at=None, data_seed=0, lr=0.1):
    """Linear regression by Adam; ``nan_at``: the (1-based) step whose batch is NaN."""
    mesh = make_mesh([("data", -1)])
    tx = optax.adam(lr)

    def loss_fn(params, batch, rng):
        return jnp.mean((batch["x"] @ params["w"] - batch["y"]) ** 2), {}

    state, shardings = create_train_state({"w": jnp.zeros(3)}, tx, 0, mesh)
    update = jit_update(make_update_fn(loss_fn, tx), shardings, mesh)

    def batch_fn(step):
        idx = np.random.default_rng((data_seed, step)).permutation(64)[:8]
        x = X[idx].copy()
        if nan_at is not None and step + 1 == nan_at:
            x[0, 0] = np.nan
        return {"x": x, "y": Y[idx]}

    ckpt = Checkpointer(str(workdir), every=every, keep=keep)
    try:
        state = train_loop(state, update, batch_fn, steps, mesh, ckpt, MetricWriter(str(workdir)), log_every=100,
                           desc="toy", key=key)
    finally:
        ckpt.close()
    return jax.device_get(state.params["w"])


def _steps(workdir):
    d = workdir / "checkpoints"
    return sorted(int(s) for s in os.listdir(d) if s.isdigit())


def test_nonfinite_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    with pytest.raises(NonFiniteLoss, match=r"toy: non-finite loss nan at step 5; stopped without saving that state "
                                            r"\(the last good checkpoint is step 4 in .*checkpoints\)"):
        _run(tmp_path, steps=8, nan_at=5)
    assert _steps(tmp_path) == [2, 4]  # nothing from step 5 on was saved


def test_main_exits_3_on_a_nonfinite_loss(tmp_path):
    """The command line turns NonFiniteLoss into one line and exit code 3."""
    code = ("import runpy, sys, jaxcf.pipelines as p\n"
            "from jaxcf.train.loop import NonFiniteLoss\n"
            "def run(*a, **k): raise NonFiniteLoss('toy: non-finite loss nan at step 5; stopped')\n"
            "p.run = run\n"
            f"sys.argv = ['jaxcf.main', '--config={ROOT}/configs/diffusion.py:test', '--workdir={tmp_path}']\n"
            "runpy.run_module('jaxcf.main', run_name='__main__', alter_sys=True)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120,
                         env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert out.returncode == 3, out.stderr
    assert out.stderr.splitlines() == ["jaxcf: error: toy: non-finite loss nan at step 5; stopped"]


def test_corrupt_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, capfd):
    ref = _run(tmp_path / "ref")
    _run(tmp_path / "w")
    assert _steps(tmp_path / "w") == [2, 4, 6]
    # truncate every data file of the latest checkpoint (a crash of the disk, a partial copy)
    for root, _, files in os.walk(tmp_path / "w" / "checkpoints" / "6"):
        for f in files:
            open(os.path.join(root, f), "r+b").truncate(3)
    got = _run(tmp_path / "w")  # restores step 4 with a warning, trains steps 5-6 again
    err = capfd.readouterr().err
    assert "checkpoint 6 in" in err and "cannot be read" in err and "trying the previous one" in err
    assert (tmp_path / "w" / "checkpoints" / "6.corrupt").is_dir()
    assert _steps(tmp_path / "w") == [2, 4, 6]
    np.testing.assert_array_equal(got, ref)
    # every checkpoint unreadable: a clear error naming the folder
    for s in (2, 4, 6):
        for root, _, files in os.walk(tmp_path / "w" / "checkpoints" / str(s)):
            for f in files:
                open(os.path.join(root, f), "r+b").truncate(3)
    with pytest.raises(Exception, match=r"no checkpoint in .*checkpoints can be read .*remove the folder"):
        _run(tmp_path / "w")


def test_checkpoints_of_other_settings_are_not_resumed(tmp_path, capfd):
    a = _run(tmp_path, key={"lr": 0.1})
    assert _steps(tmp_path) == [2, 4, 6]
    capfd.readouterr()
    np.testing.assert_array_equal(_run(tmp_path, key={"lr": 0.1}), a)  # same settings: resumed (nothing to do)
    assert "warning" not in capfd.readouterr().err
    b = _run(tmp_path, key={"lr": 0.2}, lr=0.2)  # other settings: moved aside, trained from step 0
    err = capfd.readouterr().err
    assert "were made with other settings (changed: settings)" in err and "checkpoints.stale-1" in err
    assert (tmp_path / "checkpoints.stale-1").is_dir()
    np.testing.assert_array_equal(b, _run(tmp_path / "fresh", key={"lr": 0.2}, lr=0.2))
    # other data (the first batch differs) or another initial state: not resumed either
    _run(tmp_path, key={"lr": 0.2}, lr=0.2, data_seed=1)
    assert "changed: first_example" in capfd.readouterr().err
    assert (tmp_path / "checkpoints.stale-2").is_dir()
    # more steps with a constant learning rate is the same run, extended: resumed from step 6
    _run(tmp_path, key={"lr": 0.2}, lr=0.2, data_seed=1, steps=8)
    assert "warning" not in capfd.readouterr().err and _steps(tmp_path) == [2, 4, 6, 8]


def test_dicap_counterfactual_cache_key_covers_what_shapes_the_counterfactuals():
    from jaxcf.dicap.runs import counterfactual_key
    from tests.test_main import load_config

    config = load_config(os.path.join(ROOT, "configs", "dicap.py"), "test")
    x, feats = np.zeros((4, 8, 8, 3), np.float32), np.ones((3, 5), np.float32)
    base = counterfactual_key(config, 0, x, feats, "found")
    changed = {
        "logit scale": lambda c: c.counterfactual.update(logit_scale=50.0),
        "template": lambda c: c.counterfactual.update(template="an image of a {}."),
        "scale": lambda c: c.counterfactual.update(scale=2.0),
        "dtype": lambda c: c.update(dtype="bfloat16"),
    }
    for what, change in changed.items():
        c = load_config(os.path.join(ROOT, "configs", "dicap.py"), "test")
        change(c)
        assert counterfactual_key(c, 0, x, feats, "found") != base, what
    assert counterfactual_key(config, 0, x, feats, "other foundation") != base
    assert counterfactual_key(config, 0, x, feats * 2, "found") != base  # other class texts / CLIP
    assert counterfactual_key(config, 1, x, feats, "found") != base
    config.counterfactual.batch_size = 1  # how they are batched does not change them
    assert counterfactual_key(config, 0, x, feats, "found") == base


# ----------------------------------------------------------------------------- the workdir lock


def test_a_second_run_on_a_locked_workdir_is_refused(tmp_path):
    with WorkdirLock(str(tmp_path)) as held:
        owner = json.loads((tmp_path / "jaxcf.lock").read_text())
        assert owner["pid"] == os.getpid() and owner["host"]
        with pytest.raises(LockError, match=rf"is in use by another run: pid {os.getpid()} on host .* \(lock file "
                                            rf".*jaxcf.lock\); .* or pass --break_lock if that run is gone"):
            WorkdirLock(str(tmp_path)).acquire()
        assert held.took_over is None
    assert not (tmp_path / "jaxcf.lock").exists()  # released
    with WorkdirLock(str(tmp_path)):
        pass


def test_the_lock_of_a_killed_run_is_taken_over_with_a_warning(tmp_path, capfd):
    code = ("import sys, time; from jaxcf.utils.lock import WorkdirLock\n"
            f"WorkdirLock({str(tmp_path)!r}).acquire(); print('locked', flush=True); time.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(LockError, match=f"pid {proc.pid} "):
            WorkdirLock(str(tmp_path)).acquire()
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        proc.kill()
    capfd.readouterr()
    with WorkdirLock(str(tmp_path)) as lock:
        assert lock.took_over["pid"] == proc.pid
    assert f"took over the lock of a run that is gone: pid {proc.pid}" in capfd.readouterr().err


def test_break_lock_removes_a_held_lock(tmp_path, capfd):
    """--break_lock is for a lock whose run is known to be gone (say a host that died holding an NFS lock)."""
    with WorkdirLock(str(tmp_path)):
        with WorkdirLock(str(tmp_path), break_lock=True) as second:
            assert json.loads((tmp_path / "jaxcf.lock").read_text())["pid"] == os.getpid()
            assert second.took_over is None
    assert "--break_lock: removing the lock of pid" in capfd.readouterr().err


def test_a_stale_lock_on_a_bucket_like_path_is_judged_by_its_pid(tmp_path, monkeypatch, capfd):
    """Without flock (gs://): a lock of a dead pid on this host is broken; a live one refuses."""
    from jaxcf.utils import lock as lock_mod

    monkeypatch.setattr(lock_mod.io, "is_remote", lambda p: True)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    import socket

    (tmp_path / "jaxcf.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": dead_pid}))
    with WorkdirLock(str(tmp_path)) as lk:
        assert lk.took_over["pid"] == dead_pid
        with pytest.raises(LockError):
            WorkdirLock(str(tmp_path)).acquire()  # this (live) process holds it now
    assert not (tmp_path / "jaxcf.lock").exists()
    (tmp_path / "jaxcf.lock").write_text(json.dumps({"host": "another-host", "pid": dead_pid}))
    with pytest.raises(LockError, match="another-host"):
        WorkdirLock(str(tmp_path)).acquire()  # cannot tell whether a run on another host is alive

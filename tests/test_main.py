"""The command line: bad input fails fast with a clear message; a preempted or killed run resumes exactly."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from jaxcf.configs import ConfigError
from jaxcf.pipelines import run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIFFUSION = os.path.join(ROOT, "configs", "diffusion.py")


def load_config(path, arg=None):
    import importlib.util

    spec = importlib.util.spec_from_file_location("cfg", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config(arg)


def shipped_toy_foundation(config, mesh):
    """The DiCap toy foundation of ``config`` from the shipped weights only: training any of its
    models (the config no longer matches jaxcf/assets) fails the test instead."""
    from jaxcf.foundation import toy as foundation

    def no_training(*args, **kwargs):
        raise AssertionError("the shipped toy foundation no longer matches configs/dicap.py:toy")

    with pytest.MonkeyPatch.context() as mp:  # nothing is trained or written
        for name in ("train_clip", "train_eps_model", "train_noise_classifier"):
            mp.setattr(foundation, name, no_training)
        return foundation.toy_foundation(config, "/nonexistent-workdir", mesh)


def main_cmd(*args):
    return [sys.executable, "-m", "jaxcf.main", *args]


def run_main(*args, timeout=120):
    return subprocess.run(main_cmd(*args), capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))


@pytest.mark.parametrize("override,message", [
    (("pipeline", "gan"), "config.pipeline='gan' is unknown; allowed: diffusion"),
    (("train.steps", -1), "config.train.steps=-1 must be an integer >= 1"),
    (("eval.depth", 1.5), "config.eval.depth=1.5 must be in (0.0, 1.0]"),
    (("schedule.name", "sigmoid"), "config.schedule.name='sigmoid' is not allowed; allowed: 'linear'"),
    (("dtype", "float16"), "config.dtype='float16' is not allowed; allowed: 'float32', 'bfloat16'"),
    (("param_sharding", "zero3"), "config.param_sharding='zero3' is not allowed"),
    (("mesh", [("model", -1)]), "needs a 'data' axis"),
    (("mesh", [("data", 3)]), "needs 3 devices"),
])
def test_bad_config_values_fail_before_any_work(tmp_path, override, message):
    config = load_config(DIFFUSION, "test")
    field, value = override
    node = config
    for part in field.split(".")[:-1]:
        node = node[part]
    node[field.split(".")[-1]] = value
    t0 = time.time()
    with pytest.raises(ConfigError, match=__import__("re").escape(message)):
        run(config, str(tmp_path / "w"))
    assert time.time() - t0 < 5  # nothing was built or compiled
    assert not (tmp_path / "w").exists()


def test_bad_model_field_and_workdir(tmp_path):
    config = load_config(DIFFUSION, "test")
    config.model.config.down_block_types = ("NoSuchBlock", "DownBlock2D")
    with pytest.raises(ConfigError, match="NoSuchBlock"):
        run(config, str(tmp_path / "w"))
    config = load_config(DIFFUSION, "test")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        run(config, str(tmp_path / "file"))
    with pytest.raises(ConfigError, match="--workdir is required"):
        run(config, None)


def test_command_line_errors_are_one_clear_line(tmp_path):
    out = run_main(f"--config={DIFFUSION}:nope", f"--workdir={tmp_path}")
    assert out.returncode != 0 and "unknown variant 'nope' for pipeline 'diffusion'; allowed: square_tiny, square, test" in out.stderr
    out = run_main(f"--config={DIFFUSION}:test", "--config.train.no_such_field=3", f"--workdir={tmp_path}")
    assert out.returncode != 0 and "no_such_field" in out.stderr
    out = run_main(f"--config={DIFFUSION}:test", "--config.train.steps=0", f"--workdir={tmp_path}")
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1] == "jaxcf: error: config.train.steps=0 must be an integer >= 1"


def _final_params(workdir):
    import jax
    import orbax.checkpoint as ocp

    ckpt = os.path.join(workdir, "checkpoints")
    last = max(int(s) for s in os.listdir(ckpt) if s.isdigit())
    path = os.path.join(ckpt, str(last), "default")
    ckptr = ocp.StandardCheckpointer()
    # onto this process's first device: the runs saved it from however many devices they had (cpu_devices)
    meta = ckptr.metadata(path)
    meta = getattr(meta, "item_metadata", None) or meta
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=one),
                                    getattr(meta, "tree", meta))
    return last, ckptr.restore(path, target)


def _steps(workdir):
    """Committed checkpoint steps in ``workdir/checkpoints``."""
    ckpt = workdir / "checkpoints"
    return sorted(int(s) for s in os.listdir(ckpt) if s.isdigit() and (ckpt / s / "commit_success.txt").exists()) \
        if ckpt.exists() else []


def _wait_for_checkpoint_after(proc, workdir, step, timeout=300):
    deadline = time.time() + timeout
    while not [s for s in _steps(workdir) if s > step]:
        assert proc.poll() is None, "run ended before it could be interrupted"
        assert time.time() < deadline, f"no checkpoint after step {step} in {timeout} s"
        time.sleep(0.2)


def _first_logged_step(workdir, after_line):
    from jaxcf.train import read_metrics

    return read_metrics(str(workdir / "metrics.jsonl"))[after_line]["step"]


def _num_logged(workdir):
    path = workdir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


@pytest.mark.slow
def test_preempted_and_killed_runs_resume_to_the_same_parameters(tmp_path):
    """One workdir, interrupted twice with real signals, against an uninterrupted reference run:
    SIGTERM (preemption: checkpoint, message, exit code 0), then SIGKILL (no warning) of the resumed
    run, then a rerun that finishes. Each rerun continues from the last checkpoint, not step 0, and
    the final parameters equal the reference's. The reference runs alongside (one test, one reference)."""
    # a one-level UNet: each of the four launches compiles in about half the time of the :test model's
    one_level = ["--config.model.config.block_out_channels=(8,)",
                 "--config.model.config.down_block_types=('DownBlock2D',)",
                 "--config.model.config.up_block_types=('UpBlock2D',)"]
    args = [f"--config={DIFFUSION}:test", "--config.train.steps=10", "--config.checkpoint_every=2",
            "--config.keep_checkpoints=10", *one_level]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    with open(tmp_path / "ref.log", "w") as ref_log:
        ref = subprocess.Popen(main_cmd(*args, f"--workdir={tmp_path / 'ref'}"), cwd=ROOT, env=env,
                               stdout=subprocess.DEVNULL, stderr=ref_log)
    try:
        _interrupt_twice_and_finish(tmp_path / "interrupted", args, env)
        assert ref.wait(timeout=400) == 0, (tmp_path / "ref.log").read_text()[-2000:]
    finally:
        if ref.poll() is None:
            ref.kill()
    work = tmp_path / "interrupted"
    step_a, a = _final_params(tmp_path / "ref")
    step_b, b = _final_params(work)
    assert step_a == step_b == 10
    import jax

    for x, y in zip(jax.tree_util.tree_leaves(a["params"]), jax.tree_util.tree_leaves(b["params"])):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-6)
    assert (work / "results.json").exists() and (work / "samples.png").exists()
    # every launch split the CPU as --cpu_devices=auto says (2 devices on a 2-core machine), and resumed exactly
    import json

    from jaxcf.train import cpu_devices
    from jaxcf.utils import cpu_malloc

    n = cpu_devices.plan("auto", environ=env) or 1
    # and ran with glibc's huge-page tunable where --cpu_malloc=auto says (the command restarted itself once)
    malloc = cpu_malloc.TUNABLE if cpu_malloc.plan("auto", environ=env) else "default"
    for run_dir in (tmp_path / "ref", work):
        timing = json.loads((run_dir / "results.json").read_text())["timing"]
        assert (timing["devices"], timing["cpu_malloc"]) == (f"{n} cpu", malloc)


def _interrupt_twice_and_finish(work, args, env):
    log_path = work.parent / "term.log"

    # 1. SIGTERM after the first checkpoint: the loop saves the step it is at and exits cleanly
    with open(log_path, "w") as log:
        proc = subprocess.Popen(main_cmd(*args, f"--workdir={work}"), cwd=ROOT, env=env, stdout=log, stderr=log)
        _wait_for_checkpoint_after(proc, work, 0)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0, log_path.read_text()[-2000:]
    term_step = max(_steps(work))
    out = log_path.read_text()
    assert f"SIGTERM at step {term_step}; checkpoint saved in" in out, out[-2000:]
    assert 2 <= term_step < 10 and not (work / "results.json").exists()  # stopped mid-way, nothing evaluated

    # 2. rerun: resumes from the SIGTERM checkpoint; killed without warning after its next checkpoint
    logged = _num_logged(work)
    proc = subprocess.Popen(main_cmd(*args, f"--workdir={work}"), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    _wait_for_checkpoint_after(proc, work, term_step)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    kill_step = max(_steps(work))
    assert term_step < kill_step < 10, (term_step, kill_step)  # really killed mid-way
    assert _first_logged_step(work, logged) > term_step  # continued, did not start again at step 0

    # 3. rerun: resumes from the last checkpoint before the kill and finishes
    logged = _num_logged(work)
    resumed = run_main(*args, f"--workdir={work}", timeout=400)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert _first_logged_step(work, logged) > kill_step


def test_a_run_resumes_on_another_number_of_cpu_devices(tmp_path):
    """Stopped (SIGTERM) while split into ``--cpu_devices=2``, rerun with one device: the checkpoint
    is restored onto the new layout and the run continues from it (nothing renamed .corrupt)."""
    import json

    args = [f"--config={DIFFUSION}:test", "--config.train.steps=12", "--config.checkpoint_every=2",
            "--config.model.config.block_out_channels=(8,)", "--config.model.config.down_block_types=('DownBlock2D',)",
            "--config.model.config.up_block_types=('UpBlock2D',)", f"--workdir={tmp_path / 'w'}"]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    work = tmp_path / "w"
    with open(tmp_path / "a.log", "w") as log:
        proc = subprocess.Popen(main_cmd(*args, "--cpu_devices=2"), cwd=ROOT, env=env, stdout=log, stderr=log)
        _wait_for_checkpoint_after(proc, work, 0)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0, (tmp_path / "a.log").read_text()[-2000:]
    term_step = max(_steps(work))
    assert term_step < 12
    logged = _num_logged(work)
    resumed = run_main(*args, "--cpu_devices=1", timeout=400)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert _first_logged_step(work, logged) > term_step  # continued, did not start again
    assert not [p for p in os.listdir(work / "checkpoints") if p.endswith(".corrupt")]
    assert json.loads((work / "results.json").read_text())["timing"]["devices"] == "1 cpu"

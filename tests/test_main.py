"""The command line: bad input fails fast with a clear message; a killed run resumes exactly."""

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
    import orbax.checkpoint as ocp

    ckpt = os.path.join(workdir, "checkpoints")
    last = max(int(s) for s in os.listdir(ckpt) if s.isdigit())
    return last, ocp.StandardCheckpointer().restore(os.path.join(ckpt, str(last), "default"))


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_parameters(tmp_path):
    args = [f"--config={DIFFUSION}:test", "--config.train.steps=10", "--config.checkpoint_every=2",
            "--config.keep_checkpoints=10"]
    ref = run_main(*args, f"--workdir={tmp_path / 'ref'}", timeout=400)
    assert ref.returncode == 0, ref.stderr[-2000:]

    work = tmp_path / "killed"
    proc = subprocess.Popen(main_cmd(*args, f"--workdir={work}"), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    deadline = time.time() + 300
    while not (work / "checkpoints" / "4" / "commit_success.txt").exists():
        assert proc.poll() is None, "run ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    steps_before = sorted(int(s) for s in os.listdir(work / "checkpoints") if s.isdigit())
    assert steps_before and max(steps_before) < 10, steps_before  # really killed mid-way

    resumed = run_main(*args, f"--workdir={work}", timeout=400)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    step_a, a = _final_params(tmp_path / "ref")
    step_b, b = _final_params(work)
    assert step_a == step_b == 10
    import jax

    for x, y in zip(jax.tree_util.tree_leaves(a["params"]), jax.tree_util.tree_leaves(b["params"])):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-6)
    assert (work / "results.json").exists() and (work / "samples.png").exists()

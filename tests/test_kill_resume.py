"""SIGKILL at several moments of a real ``python -m jaxcf.main`` run, rerun the same command each
time, and the final results.json equals that of an uninterrupted run.

Each pipeline's ``test`` variant is killed in different stages (the moment is when a file of that
stage appears in the workdir) and rerun until it finishes; an uninterrupted reference run of the
same command runs first. The comparison leaves out the wall-clock measurements, which differ
between any two runs: ``seconds``, ``compile_seconds``, ``cf_per_second`` (CF/s) and ``timing``
(compile and run seconds, compilation-cache hits).
"""

import glob
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.test_didae_pipeline import check_every_stage

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMING = ("seconds", "compile_seconds", "cf_per_second", "timing")


def without_timing(obj):
    if isinstance(obj, dict):
        return {k: without_timing(v) for k, v in obj.items() if k not in TIMING}
    if isinstance(obj, list):
        return [without_timing(v) for v in obj]
    return obj


def _cmd(config, work):
    """``config``: "file.py:variant" and any overrides after it, separated by spaces."""
    name, *overrides = config.split()
    return [sys.executable, "-m", "jaxcf.main", f"--config={os.path.join(ROOT, 'configs', name)}", *overrides,
            f"--workdir={work}"]


def _committed(pattern):
    """A file, or an Orbax step folder that has finished saving, matches ``pattern``."""
    for p in glob.glob(pattern):
        if not os.path.isdir(p) or os.path.exists(os.path.join(p, "commit_success.txt")) or \
                os.path.exists(os.path.join(p, "_CHECKPOINT_METADATA")):
            return True
    return False


def kill_at_moments_then_finish(config, work, moments, env, log, timeout=600):
    """Starts the run; when ``moments[i]`` (a glob under the workdir) appears, SIGKILLs it and starts
    it again; the last start runs to the end. Returns the stages that were really interrupted."""
    for pattern in moments:
        proc = subprocess.Popen(_cmd(config, work), cwd=ROOT, env=env, stdout=log, stderr=log)
        deadline = time.time() + timeout
        try:
            while not _committed(os.path.join(work, pattern)):
                assert proc.poll() is None, f"{config}: the run ended before {pattern} appeared"
                assert time.time() < deadline, f"{config}: {pattern} did not appear in {timeout} s"
                time.sleep(0.05)
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        finally:
            if proc.poll() is None:
                proc.kill()
        assert not os.path.exists(os.path.join(work, "results.json")), f"killed at {pattern} after the end"
    final = subprocess.run(_cmd(config, work), cwd=ROOT, env=env, stdout=log, stderr=log, timeout=timeout)
    assert final.returncode == 0, f"{config}: the last rerun failed"


def _check_killed_run_matches_reference(tmp_path, config, moments):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    ref_dir, work = tmp_path / "ref", tmp_path / "killed"
    with open(tmp_path / "ref.log", "w") as ref_log, open(tmp_path / "killed.log", "w") as log:
        # The reference first: the killed run and its reruns then load its programs from the
        # test run's compilation cache (tests/conftest.py) instead of compiling them again.
        ref = subprocess.run(_cmd(config, ref_dir), cwd=ROOT, env=env, stdout=ref_log, stderr=ref_log, timeout=600)
        assert ref.returncode == 0, (tmp_path / "ref.log").read_text()[-3000:]
        try:
            kill_at_moments_then_finish(config, str(work), moments, env, log)
        except BaseException:
            print((tmp_path / "killed.log").read_text()[-5000:])
            raise
    text = (tmp_path / "killed.log").read_text()
    assert text.count("took over the lock of a run that is gone") == len(moments)  # each rerun said so
    assert "Traceback" not in text
    got = json.loads((work / "results.json").read_text())
    want = json.loads((ref_dir / "results.json").read_text())
    assert without_timing(got) == without_timing(want)
    return work, want


@pytest.mark.slow
def test_dicap_killed_in_every_stage_ends_with_the_same_results(tmp_path):
    """Killed while training the foundation CLIP, right after the foundation is exported (the
    counterfactuals are being generated), and while fine-tuning CoOp prompts."""
    work, _ = _check_killed_run_matches_reference(tmp_path, "dicap.py:test", [
        "foundation/clip_run/checkpoints/3",
        "foundation/unet.json",
        "prompts/seed0_coop_*/checkpoints/3",
    ])
    assert len(glob.glob(str(work / "counterfactuals" / "*.npz"))) == 1


@pytest.mark.slow
def test_didae_killed_in_every_stage_ends_with_the_same_results(tmp_path):
    """Killed while training the decoder, in the first CFKD fine-tune, and while evaluating the
    second dictionary (the classifiers resume like the decoder: one train loop). Every valid
    counterfactual goes to CFKD (not only those that flip the tiny student), so that each CFKD
    fine-tune runs whatever the tiny models do. The uninterrupted reference run also gets the
    variant's end-to-end checks (tests/test_didae_pipeline.py::check_every_stage)."""
    _, reference = _check_killed_run_matches_reference(tmp_path, "didae.py:test --config.cfkd.only_flipped=False "
                                                                 "--config.cfkd.add_true=True", [
        "foundation/decoder_run/checkpoints/2",
        "cfkd_procrustes_*/checkpoints/2",
        "disentanglement_svd.json",
    ])
    check_every_stage(reference, tmp_path / "ref")  # the end-to-end checks of the variant, on the reference run

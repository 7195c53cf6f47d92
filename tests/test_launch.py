"""Launch scripts (dry runs, a fake gcloud, fake SLURM) and the multi-process plan read from the environment."""

import os
import shlex
import subprocess
import sys
import time

import pytest

from jaxcf.train import distributed
from jaxcf.train.distributed import DistributedError, Plan, plan

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TPU_VM = os.path.join(ROOT, "launch", "tpu_vm.sh")
GPU = os.path.join(ROOT, "launch", "gpu.sh")

TPU_ARGS = ["--name=jaxcf-pod", "--zone=us-central2-b", "--accelerator-type=v5litepod-16",
            "--version=v2-alpha-tpuv5-lite", "--project=my-proj", "--config=configs/dicap.py:toy",
            "--workdir=gs://bucket/dicap_toy"]
MAIN = "python -m jaxcf.main --config=configs/dicap.py:toy --workdir=gs://bucket/dicap_toy --distributed=on"


def clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAXCF_", "SLURM_", "TPU_"))}
    env.update({k: str(v) for k, v in extra.items()})
    return env


def sh(script, *args, env=None, path_dir=None):
    env = clean_env() if env is None else env
    if path_dir is not None:
        env = dict(env, PATH=f"{path_dir}{os.pathsep}{env['PATH']}")
    return subprocess.run(["bash", script, *args], capture_output=True, text=True, env=env, timeout=60, cwd=ROOT)


def commands(out):
    """The dry-run lines ("+ cmd"), each split into words as a shell would."""
    lines = out.stdout.splitlines()
    assert all(line.startswith(("+ ", "# ")) for line in lines), lines
    return [shlex.split(line[2:]) for line in lines if line.startswith("+ ")]


def fake_tool(tmp_path, name, body):
    """An executable ``name`` on a PATH folder that logs its arguments to ``calls.txt``."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    tool = bin_dir / name
    tool.write_text(f'#!/usr/bin/env bash\necho "{name} $*" >> "{tmp_path}/calls.txt"\n{body}\n')
    tool.chmod(0o755)
    return bin_dir


# ----------------------------------------------------------------------------- launch/tpu_vm.sh


def test_tpu_vm_dry_run_prints_create_copy_setup_and_run_on_all_workers(tmp_path):
    bin_dir = fake_tool(tmp_path, "gcloud", "exit 1")
    out = sh(TPU_VM, "--dry-run", *TPU_ARGS, "--config.train.steps=10", path_dir=bin_dir)
    assert out.returncode == 0, out.stderr
    assert not (tmp_path / "calls.txt").exists()  # a dry run never calls gcloud
    cmds = commands(out)
    common = ["--zone=us-central2-b", "--project=my-proj"]
    describe, create, tar, scp, unpack, setup, run = cmds
    assert describe[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "describe", "jaxcf-pod"]
    assert create == ["gcloud", "compute", "tpus", "tpu-vm", "create", "jaxcf-pod", *common,
                      "--accelerator-type=v5litepod-16", "--version=v2-alpha-tpuv5-lite"]
    assert tar[:2] == ["tar", "-czf"] and tar[3:5] == ["-C", ROOT]
    assert scp == ["gcloud", "compute", "tpus", "tpu-vm", "scp", tar[2], "jaxcf-pod:~/jaxcf.tar.gz", *common,
                   "--worker=all"]
    for c in (unpack, setup, run):
        assert c[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "jaxcf-pod"]
        assert c[6:10] == [*common, "--worker=all", "--command"] and len(c) == 11
    assert "tar -xzf ~/jaxcf.tar.gz -C ~/jaxcf" in unpack[10]
    assert setup[10].startswith("test -f ~/jaxcf-venv/.jaxcf-installed || (python3 -m venv ~/jaxcf-venv")
    assert '-e ".[tpu]"' in setup[10] and setup[10].endswith("touch ~/jaxcf-venv/.jaxcf-installed)")
    assert run[10] == f"cd ~/jaxcf && . ~/jaxcf-venv/bin/activate && {MAIN} --config.train.steps=10"


def test_tpu_vm_env_vars_repo_clone_and_quoted_pass_through():
    env = clean_env(JAXCF_TPU_NAME="t1", JAXCF_TPU_ZONE="europe-west4-a", JAXCF_TPU_TYPE="v4-8",
                    JAXCF_TPU_VERSION="tpu-ubuntu2204-base", JAXCF_CONFIG="configs/diffusion.py:square",
                    JAXCF_WORKDIR="gs://b/sq", JAXCF_REPO="https://github.com/me/jaxcf.git")
    extra = "--config.mesh=[('data', -1)]"
    out = sh(TPU_VM, "--dry-run", "--spot", "--ref=v0.1", "--", extra, env=env)
    assert out.returncode == 0, out.stderr
    cmds = commands(out)
    assert cmds[1][-1] == "--spot" and "--accelerator-type=v4-8" in cmds[1] and "--zone=europe-west4-a" in cmds[1]
    assert not any("--project" in w for c in cmds for w in c)
    assert not any(c[0] == "tar" or c[4] == "scp" for c in cmds)  # cloned, not copied
    assert "git clone --depth=1 --branch v0.1 https://github.com/me/jaxcf.git ~/jaxcf" in cmds[2][-1]
    remote = shlex.split(cmds[-1][-1])  # what the worker's shell runs
    i = remote.index("python")
    assert remote[i:] == ["python", "-m", "jaxcf.main", "--config=configs/diffusion.py:square", "--workdir=gs://b/sq",
                          "--distributed=on", extra]


def test_tpu_vm_runs_gcloud_and_creates_only_a_missing_vm(tmp_path):
    # describe fails the first time (no VM): create; then it reports READY: no create
    bin_dir = fake_tool(tmp_path, "gcloud", f'[ "$4" = describe ] && [ -f "{tmp_path}/made" ] && echo READY && exit 0\n'
                                           f'[ "$4" = describe ] && exit 1\n[ "$4" = create ] && touch "{tmp_path}/made"\n'
                                           'exit 0')
    env = clean_env(TMPDIR=str(tmp_path))
    for _ in range(2):
        out = sh(TPU_VM, *TPU_ARGS, env=env, path_dir=bin_dir)
        assert out.returncode == 0, out.stderr
    calls = [c.split()[4] for c in (tmp_path / "calls.txt").read_text().splitlines()]
    assert calls == ["describe", "create", "scp", "ssh", "ssh", "ssh", "describe", "scp", "ssh", "ssh", "ssh"]
    assert (tmp_path / "jaxcf-jaxcf-pod.tar.gz").stat().st_size > 0


def test_tpu_vm_missing_arguments_are_named():
    out = sh(TPU_VM, "--dry-run", "--zone=z", "--config=c")
    assert out.returncode == 2
    for name, var in (("--name", "JAXCF_TPU_NAME"), ("--accelerator-type", "JAXCF_TPU_TYPE"),
                      ("--version", "JAXCF_TPU_VERSION"), ("--workdir", "JAXCF_WORKDIR")):
        assert f"missing {name} (or {var})" in out.stderr
    assert "--zone" not in out.stderr and "missing --config" not in out.stderr
    out = sh(TPU_VM, "--name")
    assert out.returncode == 2 and "--name needs a value" in out.stderr
    out = sh(TPU_VM, "--help")
    assert out.returncode == 0 and out.stdout.startswith("Usage: launch/tpu_vm.sh") and "--worker=all" in out.stdout


# ----------------------------------------------------------------------------- launch/gpu.sh


def test_gpu_one_host_just_runs_main():
    out = sh(GPU, "--dry-run", "--config=configs/dicap.py:toy", "--workdir=/runs/toy", "--config.seed=3")
    assert out.returncode == 0, out.stderr
    assert commands(out) == [["python", "-m", "jaxcf.main", "--config=configs/dicap.py:toy", "--workdir=/runs/toy",
                              "--config.seed=3"]]
    out = sh(GPU, "--help")
    assert out.returncode == 0 and "SLURM" in out.stdout


def exports(out):
    cmds = commands(out)
    env = dict(c[1].split("=", 1) for c in cmds if c[0] == "export")
    return env, cmds[-1]


def test_gpu_multi_node_from_flags_and_env_vars():
    out = sh(GPU, "--dry-run", "--coordinator", "node0:12355", "--num-processes=2", "--process-id=1",
             "--config=c.py", "--workdir=/shared/run")
    assert out.returncode == 0, out.stderr
    env, cmd = exports(out)
    assert env == {"JAXCF_COORDINATOR_ADDRESS": "node0:12355", "JAXCF_NUM_PROCESSES": "2", "JAXCF_PROCESS_ID": "1"}
    assert cmd == ["python", "-m", "jaxcf.main", "--config=c.py", "--workdir=/shared/run", "--distributed=on"]
    assert plan(environ=env) == Plan("env", "node0:12355", 2, 1, None)  # what jaxcf.main will do with them
    out = sh(GPU, "--dry-run", env=clean_env(JAXCF_COORDINATOR_ADDRESS="node0:1", JAXCF_NUM_PROCESSES=3,
                                              JAXCF_PROCESS_ID=2, JAXCF_LOCAL_DEVICE_IDS="0,1",
                                              JAXCF_CONFIG="c.py", JAXCF_WORKDIR="/w"))
    env, cmd = exports(out)
    assert env["JAXCF_LOCAL_DEVICE_IDS"] == "0,1" and env["JAXCF_PROCESS_ID"] == "2"
    assert plan(environ=env) == Plan("env", "node0:1", 3, 2, (0, 1))


SLURM = dict(SLURM_JOB_ID=1234, SLURM_NTASKS=4, SLURM_PROCID=2, SLURM_LOCALID=0, SLURM_JOB_NUM_NODES=2,
             SLURM_JOB_NODELIST="gpu[012-013]", SLURM_STEP_NODELIST="gpu[012-013]")


def test_gpu_multi_node_from_slurm(tmp_path):
    bin_dir = fake_tool(tmp_path, "scontrol", 'echo gpu012; echo gpu013')
    out = sh(GPU, "--dry-run", "--config=c.py", "--workdir=/w", env=clean_env(**SLURM), path_dir=bin_dir)
    assert out.returncode == 0, out.stderr
    env, cmd = exports(out)
    # 4 tasks on 2 nodes: one GPU per task; the port is derived from the job id (61440 + 1234 % 4096)
    assert env == {"JAXCF_COORDINATOR_ADDRESS": "gpu012:62674", "JAXCF_NUM_PROCESSES": "4",
                   "JAXCF_PROCESS_ID": "2", "JAXCF_LOCAL_DEVICE_IDS": "0"}
    assert cmd[-1] == "--distributed=on"
    assert (tmp_path / "calls.txt").read_text().split() == ["scontrol", "show", "hostnames", "gpu[012-013]"]
    # one task per node keeps every local GPU; flags win over SLURM's values
    out = sh(GPU, "--dry-run", "--port=7000", "--config=c.py", "--workdir=/w",
             env=clean_env(**dict(SLURM, SLURM_NTASKS=2, SLURM_PROCID=1)), path_dir=bin_dir)
    env, _ = exports(out)
    assert env == {"JAXCF_COORDINATOR_ADDRESS": "gpu012:7000", "JAXCF_NUM_PROCESSES": "2", "JAXCF_PROCESS_ID": "1"}
    # without scontrol a plain host list still works
    out = sh(GPU, "--dry-run", "--config=c.py", "--workdir=/w",
             env=clean_env(**dict(SLURM, SLURM_JOB_NODELIST="a1,a2", SLURM_STEP_NODELIST="a1,a2")))
    assert exports(out)[0]["JAXCF_COORDINATOR_ADDRESS"] == "a1:62674"


@pytest.mark.parametrize("args,env,message", [
    ((), {}, "missing --config (or JAXCF_CONFIG)"),
    (("--config=c",), {}, "missing --workdir (or JAXCF_WORKDIR)"),
    (("--num-processes=2", "--process-id=0"), {}, "missing --coordinator=HOST:PORT (or JAXCF_COORDINATOR_ADDRESS)"),
    (("--num-processes=2", "--coordinator=h:1"), {}, "missing --process-id (or JAXCF_PROCESS_ID)"),
    (("--coordinator=h:1", "--process-id=0"), {}, "missing --num-processes (or JAXCF_NUM_PROCESSES)"),
    (("--num-processes=2", "--process-id=2", "--coordinator=h:1"), {}, "--process-id (JAXCF_PROCESS_ID)=2 must be in 0..1"),
    (("--num-processes=two",), {}, "--num-processes (JAXCF_NUM_PROCESSES)=two must be an integer"),
    ((), {"SLURM_JOB_ID": 1, "SLURM_NTASKS": 4}, "not an srun step"),
    (("--config",), {}, "--config needs a value"),
])
def test_gpu_bad_arguments_are_named(args, env, message):
    base = () if message.startswith(("missing --config", "missing --workdir")) else ("--config=c", "--workdir=/w")
    out = sh(GPU, "--dry-run", *base, *args, env=clean_env(**env))
    assert out.returncode == 2 and message in out.stderr, out.stderr


# ----------------------------------------------------------------------------- jaxcf/train/distributed.py

EXPLICIT = {"JAXCF_COORDINATOR_ADDRESS": "10.0.0.2:12355", "JAXCF_NUM_PROCESSES": "4", "JAXCF_PROCESS_ID": "3"}
SLURM_STEP = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_NTASKS": "2", "SLURM_PROCID": "0",
              "SLURM_LOCALID": "0"}


def test_plan_single_process_by_default_and_explicit_values():
    assert plan(environ={}) is None
    assert plan(environ={"JAXCF_NUM_PROCESSES": "1"}) is None
    assert plan("on", environ={"JAXCF_NUM_PROCESSES": "1"}) is None
    assert plan("on", environ={}) == Plan("detect")
    assert plan("off", environ=EXPLICIT) is None
    assert plan(environ={**EXPLICIT, "JAXCF_DISTRIBUTED": "off"}) is None
    p = plan(environ={**EXPLICIT, "JAXCF_LOCAL_DEVICE_IDS": "0, 1"})
    assert p == Plan("env", "10.0.0.2:12355", 4, 3, (0, 1))
    # explicit values are used as given: JAX's SLURM detection must not replace them
    assert p.kwargs() == dict(coordinator_address="10.0.0.2:12355", num_processes=4, process_id=3,
                              local_device_ids=[0, 1], cluster_detection_method="deactivate")
    assert plan(environ={**EXPLICIT, **SLURM_STEP}).source == "env"


def test_plan_slurm_and_tpu_use_jax_detection():
    assert plan(environ=SLURM_STEP) == Plan("slurm") and Plan("slurm").kwargs() == {}
    assert plan(environ={**SLURM_STEP, "SLURM_NTASKS": "1"}) is None
    batch_script = {k: v for k, v in SLURM_STEP.items() if k != "SLURM_STEP_NODELIST"}
    assert plan(environ=batch_script) is None  # the batch script of a 2-task job is one process
    assert plan(environ={"TPU_WORKER_HOSTNAMES": "t-w-0,t-w-1"}) == Plan("tpu")
    assert plan(environ={"TPU_WORKER_HOSTNAMES": "localhost"}) is None


@pytest.mark.parametrize("env,message", [
    ({"JAXCF_NUM_PROCESSES": "two"}, "JAXCF_NUM_PROCESSES='two' must be an integer >= 1"),
    ({"JAXCF_NUM_PROCESSES": "0"}, "JAXCF_NUM_PROCESSES='0' must be an integer >= 1"),
    ({**EXPLICIT, "JAXCF_PROCESS_ID": "4"}, "JAXCF_PROCESS_ID=4 must be in 0..3"),
    ({**EXPLICIT, "JAXCF_PROCESS_ID": "-1"}, "JAXCF_PROCESS_ID='-1' must be an integer >= 0"),
    ({**EXPLICIT, "JAXCF_COORDINATOR_ADDRESS": "10.0.0.2"}, "JAXCF_COORDINATOR_ADDRESS='10.0.0.2' must be host:port"),
    ({**EXPLICIT, "JAXCF_COORDINATOR_ADDRESS": "h:70000"}, "JAXCF_COORDINATOR_ADDRESS='h:70000' must be host:port"),
    ({**EXPLICIT, "JAXCF_LOCAL_DEVICE_IDS": "0;1"}, "JAXCF_LOCAL_DEVICE_IDS='0;1' must be comma-separated"),
    ({"JAXCF_NUM_PROCESSES": "2", "JAXCF_PROCESS_ID": "0"}, "JAXCF_NUM_PROCESSES=2 needs JAXCF_COORDINATOR_ADDRESS"),
    ({"JAXCF_COORDINATOR_ADDRESS": "h:1"}, "JAXCF_COORDINATOR_ADDRESS is set but JAXCF_NUM_PROCESSES is not"),
    ({"JAXCF_LOCAL_DEVICE_IDS": "0"}, "JAXCF_LOCAL_DEVICE_IDS is set but"),
    ({**SLURM_STEP, "SLURM_NTASKS": "2x"}, "SLURM_NTASKS='2x' must be an integer >= 1"),
    ({"JAXCF_DISTRIBUTED": "yes"}, "JAXCF_DISTRIBUTED='yes' is not allowed; allowed: auto, on, off"),
])
def test_plan_malformed_values_name_the_variable(env, message):
    with pytest.raises(DistributedError, match=__import__("re").escape(message)):
        plan(environ=env)
    with pytest.raises(DistributedError, match="--distributed='maybe' is not allowed"):
        plan("maybe", environ={})


def test_single_process_initialize_costs_nothing():
    import jax

    t0 = time.perf_counter()
    assert distributed.initialize(environ={}) is None
    assert time.perf_counter() - t0 < 0.01
    assert not jax.distributed.is_initialized()


def test_main_reports_a_malformed_variable_in_one_line(tmp_path):
    env = clean_env(JAX_PLATFORMS="cpu", JAXCF_NUM_PROCESSES="2", JAXCF_PROCESS_ID="0")
    out = subprocess.run([sys.executable, "-m", "jaxcf.main", "--config=configs/diffusion.py:test",
                          f"--workdir={tmp_path}/w"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1] == ("jaxcf: error: JAXCF_NUM_PROCESSES=2 needs JAXCF_COORDINATOR_ADDRESS "
                                                   "as well (host:port of process 0, and this process's number in 0..1)")
    assert not (tmp_path / "w").exists()

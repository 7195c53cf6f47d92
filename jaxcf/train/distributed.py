"""Multi-process setup: one call to :func:`initialize` before any other JAX use.

What runs is decided by the environment (``mode="auto"``), so one command line serves every
launcher (``launch/tpu_vm.sh``, ``launch/gpu.sh``, a SLURM ``srun``):

- ``JAXCF_COORDINATOR_ADDRESS`` (host:port of process 0), ``JAXCF_NUM_PROCESSES``,
  ``JAXCF_PROCESS_ID`` and optionally ``JAXCF_LOCAL_DEVICE_IDS`` (e.g. ``0,1``): explicit, used
  as given (JAX's own cluster detection is switched off, so SLURM cannot override them);
- inside a SLURM step with ``SLURM_NTASKS`` > 1: JAX's SLURM detection (one device per task);
- a multi-host Cloud TPU slice (``TPU_WORKER_HOSTNAMES`` / ``TPU_PROCESS_ADDRESSES`` name more
  than one host): JAX's TPU detection;
- otherwise one process, and nothing is called (a single-process run pays nothing).

``mode="on"`` always initialises (explicit values if set, else JAX's detection: a GCE TPU VM
slice whose hosts are known only from the metadata server, Open MPI); ``mode="off"`` never does.
On CPU the cross-process collectives use gloo, so a multi-process CPU run (the tests) works.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Mapping, Optional

from absl import logging

MODES = ("auto", "on", "off")
ENV_MODE = "JAXCF_DISTRIBUTED"
ENV_ADDRESS = "JAXCF_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAXCF_NUM_PROCESSES"
ENV_PROCESS_ID = "JAXCF_PROCESS_ID"
ENV_LOCAL_DEVICE_IDS = "JAXCF_LOCAL_DEVICE_IDS"
# present in every task of a SLURM job step (srun), as JAX's SLURM detection needs them
SLURM_STEP_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")


class DistributedError(ValueError):
    """A malformed JAXCF_* / SLURM variable or ``--distributed`` value; the message names it."""


@dataclasses.dataclass(frozen=True)
class Plan:
    """What :func:`initialize` will do. ``source``: "env" (JAXCF_* variables, passed as given),
    "slurm", "tpu" or "detect" (JAX's cluster detection fills what is None); internally "single"
    (JAXCF_NUM_PROCESSES=1)."""

    source: str
    coordinator_address: Optional[str] = None
    num_processes: Optional[int] = None
    process_id: Optional[int] = None
    local_device_ids: Optional[tuple[int, ...]] = None

    def kwargs(self) -> dict:
        """Arguments for ``jax.distributed.initialize``."""
        if self.source != "env":
            return {}
        return dict(coordinator_address=self.coordinator_address, num_processes=self.num_processes,
                    process_id=self.process_id,
                    local_device_ids=list(self.local_device_ids) if self.local_device_ids else None,
                    cluster_detection_method="deactivate")


def _int(env: Mapping[str, str], name: str, low: int) -> int:
    value = env[name].strip()
    if not re.fullmatch(r"\d+", value) or int(value) < low:
        raise DistributedError(f"{name}={env[name]!r} must be an integer >= {low}")
    return int(value)


def _address(env: Mapping[str, str]) -> str:
    value = env[ENV_ADDRESS].strip()
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise DistributedError(f"{ENV_ADDRESS}={env[ENV_ADDRESS]!r} must be host:port of process 0, "
                               "e.g. 10.0.0.2:12355 (port 1-65535)")
    return value


def _device_ids(env: Mapping[str, str]) -> Optional[tuple[int, ...]]:
    value = env.get(ENV_LOCAL_DEVICE_IDS, "").strip()
    if not value:
        return None
    if not re.fullmatch(r"\d+(,\d+)*", value.replace(" ", "")):
        raise DistributedError(f"{ENV_LOCAL_DEVICE_IDS}={value!r} must be comma-separated device numbers, e.g. 0,1")
    return tuple(int(v) for v in value.replace(" ", "").split(","))


def _explicit(env: Mapping[str, str]) -> Optional[Plan]:
    """The JAXCF_* variables, checked; None if none is set, Plan("single") for JAXCF_NUM_PROCESSES=1."""
    names = (ENV_ADDRESS, ENV_NUM_PROCESSES, ENV_PROCESS_ID)
    given = [n for n in names if env.get(n, "").strip()]
    if not given:
        if env.get(ENV_LOCAL_DEVICE_IDS, "").strip():
            raise DistributedError(f"{ENV_LOCAL_DEVICE_IDS} is set but {ENV_NUM_PROCESSES}, {ENV_PROCESS_ID} and "
                                   f"{ENV_ADDRESS} are not; set all three for a multi-process run")
        return None
    if ENV_NUM_PROCESSES not in given:
        raise DistributedError(f"{', '.join(given)} is set but {ENV_NUM_PROCESSES} is not; set {ENV_ADDRESS}, "
                               f"{ENV_NUM_PROCESSES} and {ENV_PROCESS_ID} together")
    num = _int(env, ENV_NUM_PROCESSES, 1)
    if num == 1 and given == [ENV_NUM_PROCESSES]:
        return Plan("single")
    missing = [n for n in names if n not in given]
    if missing:
        raise DistributedError(f"{ENV_NUM_PROCESSES}={num} needs {' and '.join(missing)} as well "
                               f"(host:port of process 0, and this process's number in 0..{num - 1})")
    pid = _int(env, ENV_PROCESS_ID, 0)
    if pid >= num:
        raise DistributedError(f"{ENV_PROCESS_ID}={pid} must be in 0..{num - 1} ({ENV_NUM_PROCESSES}={num})")
    return Plan("env", _address(env), num, pid, _device_ids(env))


def _slurm(env: Mapping[str, str]) -> bool:
    """Inside a multi-task SLURM step. A batch script of a multi-task job has SLURM_NTASKS but is
    one process (no SLURM_STEP_NODELIST): that stays single-process, with a warning."""
    if "SLURM_NTASKS" not in env or "SLURM_JOB_ID" not in env:
        return False
    if _int(env, "SLURM_NTASKS", 1) == 1:
        return False
    missing = [n for n in SLURM_STEP_VARS if n not in env]
    if missing:
        logging.warning("SLURM_NTASKS=%s but %s unset: not inside an srun step, so this is one process; "
                        "launch with srun (or launch/gpu.sh) to use every task", env["SLURM_NTASKS"],
                        ", ".join(missing))
        return False
    return True


def _tpu_hosts(env: Mapping[str, str]) -> int:
    for name in ("TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES"):
        value = env.get(name, "").strip()
        if value:
            return len([h for h in value.split(",") if h.strip()])
    return 0


def plan(mode: str = "auto", environ: Optional[Mapping[str, str]] = None) -> Optional[Plan]:
    """What :func:`initialize` would do in this environment; None for a single process.

    A pure function of ``environ`` (default ``os.environ``), so it is tested without starting
    anything. ``mode`` may also come from ``JAXCF_DISTRIBUTED`` when it is "auto".
    """
    env = os.environ if environ is None else environ
    if mode == "auto" and env.get(ENV_MODE, "").strip():
        mode = env[ENV_MODE].strip()
        if mode not in MODES:
            raise DistributedError(f"{ENV_MODE}={mode!r} is not allowed; allowed: {', '.join(MODES)}")
    if mode not in MODES:
        raise DistributedError(f"--distributed={mode!r} is not allowed; allowed: {', '.join(MODES)}")
    if mode == "off":
        return None
    explicit = _explicit(env)
    if explicit is not None:
        return None if explicit.source == "single" else explicit
    if _slurm(env):
        return Plan("slurm")
    if _tpu_hosts(env) > 1:
        return Plan("tpu")
    return Plan("detect") if mode == "on" else None


def initialize(mode: str = "auto", environ: Optional[Mapping[str, str]] = None,
               initialization_timeout: int = 300) -> Optional[Plan]:
    """Calls ``jax.distributed.initialize`` if :func:`plan` says this is a multi-process run.

    Must run before anything touches a JAX device. Returns the plan (None: single process).
    """
    p = plan(mode, environ)
    if p is None:
        return None
    import jax

    if jax.distributed.is_initialized():
        return p
    # Cross-process collectives on the CPU backend (a no-op for GPU and TPU); gloo is JAX's default
    # in recent releases, set here so older ones and an inherited "none" do not break CPU runs.
    if os.environ.get("JAX_CPU_COLLECTIVES_IMPLEMENTATION") is None:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    logging.info("jax.distributed.initialize from %s: %s", p.source, p)
    jax.distributed.initialize(**p.kwargs(), initialization_timeout=initialization_timeout)
    return p


def describe() -> str:
    """One line: this process, the process count and the devices (call after :func:`initialize`)."""
    import jax

    return (f"process {jax.process_index()} of {jax.process_count()}, {jax.local_device_count()} local of "
            f"{jax.device_count()} {jax.default_backend()} devices")

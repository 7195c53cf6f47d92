"""jaxcf.train.cpu_devices: how many JAX devices a CPU process is split into, and that it happens."""

import json
import os
import subprocess
import sys

import pytest

from jaxcf.train import cpu_devices

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_fresh_cpu_process(code: str) -> str:
    """Runs ``python -c code`` on the CPU in a process of its own, without this one's device-count
    settings (XLA_FLAGS, JAX_NUM_CPU_DEVICES, JAXCF_CPU_DEVICES); asserts it succeeded, returns its stdout."""
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES", "JAXCF_CPU_DEVICES")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT,
                         env=dict(env, JAX_PLATFORMS="cpu"))
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


@pytest.mark.parametrize("value,env,cores,multi,want", [
    ("auto", {}, 2, False, 2),
    ("auto", {}, 16, False, 2),  # auto asks for at most AUTO_MAX (the measured count)
    ("auto", {}, 1, False, None),  # one core: nothing to fill
    ("auto", {}, 8, True, None),  # a multi-process run keeps JAX's layout
    ("auto", {"JAX_NUM_CPU_DEVICES": "4"}, 8, False, None),  # the user's own setting wins
    ("auto", {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}, 8, False, None),
    ("auto", {"JAXCF_CPU_DEVICES": "3"}, 2, False, 3),
    ("auto", {"JAXCF_CPU_DEVICES": "auto"}, 2, False, 2),
    ("4", {"JAXCF_CPU_DEVICES": "3"}, 2, False, 4),  # the flag beats the variable
    ("1", {}, 2, False, 1),
    (" 6 ", {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}, 2, True, 6),  # explicit: as given
])
def test_plan(value, env, cores, multi, want):
    assert cpu_devices.plan(value, multi_process=multi, environ=env, cores=cores) == want


@pytest.mark.parametrize("value,env,message", [
    ("0", {}, "--cpu_devices='0' is not allowed; allowed: auto or a positive integer"),
    ("two", {}, "--cpu_devices='two' is not allowed"),
    ("-2", {}, "--cpu_devices='-2' is not allowed"),
    ("auto", {"JAXCF_CPU_DEVICES": "many"}, "JAXCF_CPU_DEVICES='many' is not allowed"),
])
def test_bad_values_name_their_source(value, env, message):
    with pytest.raises(cpu_devices.CpuDevicesError, match=message.replace("(", r"\(")):
        cpu_devices.plan(value, environ=env, cores=2)


def test_apply_splits_the_cpu_before_the_backend_starts():
    code = ("import json, jax; from jaxcf.train import cpu_devices; n = cpu_devices.apply('3'); "
            "print(json.dumps([n, jax.device_count(), jax.default_backend()]))")
    assert json.loads(run_fresh_cpu_process(code).splitlines()[-1]) == [3, 3, "cpu"]


def test_after_the_backend_started_auto_keeps_it_and_a_number_is_an_error():
    code = ("import json, jax; jax.devices(); from jaxcf.train import cpu_devices\n"
            "auto = cpu_devices.apply('auto')\n"
            "try:\n    cpu_devices.apply('2'); err = ''\n"
            "except cpu_devices.CpuDevicesError as e:\n    err = str(e)\n"
            "print(json.dumps([auto, jax.device_count(), err]))")
    auto, count, err = json.loads(run_fresh_cpu_process(code).splitlines()[-1])
    assert auto is None and count == 1
    assert "--cpu_devices=2: JAX has already started its backends" in err

"""jaxcf.utils.cpu_malloc: when a command restarts itself with glibc's huge-page tunable, and that the
tunable takes XLA:CPU's per-execution page faults away."""

import json
import os
import subprocess
import sys

import pytest

from jaxcf.utils import cpu_malloc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NEW = (2, 36)


@pytest.mark.parametrize("value,env,glibc,thp,plugins,want", [
    ("auto", {}, NEW, "madvise", [], True),  # CPU-only JAX: the CPU runs the models
    ("auto", {}, NEW, "always", [], True),
    ("auto", {}, NEW, "never", [], False),  # no huge pages to ask for
    ("auto", {}, (2, 34), "madvise", [], False),  # no glibc.malloc.hugetlb before 2.35
    ("auto", {}, (), "madvise", [], False),  # not glibc
    ("auto", {}, NEW, "madvise", ["xla_cuda12"], False),  # an accelerator would: unmeasured there, left alone
    ("auto", {"JAX_PLATFORMS": "cpu"}, NEW, "madvise", ["xla_cuda12"], True),
    ("auto", {"JAX_PLATFORMS": "cuda,cpu"}, NEW, "madvise", [], False),
    ("auto", {"MALLOC_ARENA_MAX": "4"}, NEW, "madvise", [], False),  # the user's own settings win
    ("auto", {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=4096"}, NEW, "madvise", [], False),
    ("auto", {"LD_PRELOAD": "/usr/lib/libjemalloc.so"}, NEW, "madvise", [], False),  # another allocator
    ("auto", {"JAXCF_CPU_MALLOC": "off"}, NEW, "madvise", [], False),
    ("auto", {"JAXCF_CPU_MALLOC": "on"}, NEW, "never", ["xla_cuda12"], True),
    ("off", {"JAXCF_CPU_MALLOC": "on"}, NEW, "madvise", [], False),  # the flag beats the variable
    ("on", {"MALLOC_ARENA_MAX": "4"}, NEW, "madvise", ["libtpu"], True),
    ("on", {}, (2, 31), "madvise", [], False),  # even on: an older glibc has no such tunable
    (" OFF ", {}, NEW, "madvise", [], False),
])
def test_plan(value, env, glibc, thp, plugins, want):
    assert cpu_malloc.plan(value, environ=env, glibc=glibc, thp=thp, plugins=plugins) is want


@pytest.mark.parametrize("value,env,message", [
    ("yes", {}, "--cpu_malloc='yes' is not allowed; allowed: auto, on, off"),
    ("auto", {"JAXCF_CPU_MALLOC": "1"}, "JAXCF_CPU_MALLOC='1' is not allowed; allowed: auto, on, off"),
])
def test_bad_values_name_their_source(value, env, message):
    with pytest.raises(cpu_malloc.CpuMallocError, match=message):
        cpu_malloc.plan(value, environ=env, glibc=NEW, thp="madvise", plugins=[])


def test_tunables_keep_the_users_others():
    assert cpu_malloc.with_tunable("") == "glibc.malloc.hugetlb=1"
    assert cpu_malloc.with_tunable("glibc.rtld.optional_static_tls=512") == \
        "glibc.rtld.optional_static_tls=512:glibc.malloc.hugetlb=1"
    assert cpu_malloc.active({"GLIBC_TUNABLES": "a.b=1:glibc.malloc.hugetlb=1"})
    assert not cpu_malloc.active({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"})
    assert not cpu_malloc.active({})


@pytest.mark.parametrize("argv,orig,main,want", [
    (["/r/jaxcf/main.py", "--config=c.py"], ["py", "-m", "jaxcf.main", "--config=c.py"], "jaxcf.main", True),
    (["/r/jaxcf/main.py"], ["py", "-X", "faulthandler", "-m", "jaxcf.main"], "jaxcf.main", True),
    (["benchmarks/train.py", "--only=unet"], ["py", "benchmarks/train.py", "--only=unet"], None, True),
    (["-c", "on"], ["py", "-c", "print(1)", "on"], None, True),
    # jaxcf.main run in-process by a harness (runpy): restarting would rerun the harness
    (["jaxcf.main", "--config=c.py"], ["py", "-m", "tests.cli_cases"], "jaxcf.main", False),
    (["/r/jaxcf/main.py", "--x=1"], ["py", "-m", "tests.cli_cases", "--x=1"], "jaxcf.main", False),
    (["/r/jaxcf/main.py", "--x=1"], ["py", "-m", "pytest", "-q"], "pytest", False),
    (["a.py", "--x=1"], ["py", "b.py", "--x=1"], None, False),
])
def test_restart_only_its_own_command_line(argv, orig, main, want):
    assert cpu_malloc.own_command_line(argv, orig, main) is want


def test_thp_mode_reads_the_bracketed_choice(tmp_path):
    p = tmp_path / "enabled"
    p.write_text("always [madvise] never\n")
    assert cpu_malloc.thp_mode(str(p)) == "madvise"
    assert cpu_malloc.thp_mode(str(tmp_path / "missing")) == ""


def test_this_installation_has_no_accelerator_plugin():
    # the CPU-only test environment: auto applies here (the README's speed rows rely on it)
    assert cpu_malloc.accelerator_plugins() == []


# A program whose temporary buffer is far above glibc's largest mmap threshold (32 MB); its
# executions' minor page faults after two warm-up calls, per call. ensure() restarts this very
# command line (python -c CODE VALUE) when it applies the tunable.
_FAULTS = """
import json, os, resource, sys
from jaxcf.utils import cpu_malloc
cpu_malloc.ensure(sys.argv[1])
import jax, jax.numpy as jnp
f = jax.jit(lambda x, w: jnp.sum(jnp.sin(x)[::-1] @ w) + jnp.sum(jnp.cos(x)[:, ::-1] @ w))
x = jnp.full((4096, 4096), 1e-3, jnp.float32)
w = jnp.ones((4096, 8), jnp.float32)
for _ in range(2):
    f(x, w).block_until_ready()
r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    f(x, w).block_until_ready()
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0) / 4
print(json.dumps({"faults": faults, "active": cpu_malloc.active(), "tunables": os.environ.get("GLIBC_TUNABLES", "")}))
"""


def _faults(value):
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "JAXCF_CPU_MALLOC", "XLA_FLAGS")}
    out = subprocess.run([sys.executable, "-c", _FAULTS, value], capture_output=True, text=True, timeout=120,
                         cwd=ROOT, env=dict(env, JAX_PLATFORMS="cpu"))
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.splitlines()[-1])


@pytest.mark.skipif(not cpu_malloc.plan("on", environ={}) or cpu_malloc.thp_mode() not in ("always", "madvise"),
                    reason="needs glibc 2.35+ and transparent huge pages")
def test_the_tunable_takes_the_page_faults_away():
    off, on = _faults("off"), _faults("on")
    assert not off["active"] and off["tunables"] == ""
    assert on["active"] and on["tunables"] == "glibc.malloc.hugetlb=1"  # restarted with it, once
    # without it each call maps its 64+ MB of temporaries afresh in 4 KB pages (16,384+ faults)
    assert off["faults"] > 8000, off
    assert on["faults"] < 0.05 * off["faults"], (on, off)

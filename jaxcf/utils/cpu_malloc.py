"""Back XLA:CPU's per-execution buffers with transparent huge pages, so that a step does not fault
its memory in 4 KB at a time.

Each execution of a compiled XLA:CPU program allocates its temporary buffer with ``malloc`` (the
`small` UNet2DModel's training step: 147 MB per device) and frees it at the end. glibc serves an
allocation above its mmap threshold (at most 32 MB) with a fresh ``mmap`` and unmaps it at ``free``
(a thread's own arena cannot hold it: its heaps are at most 64 MB), so every step faults its whole
temporary buffer in again: on a 2-core CPU about 109,000 minor page faults and 0.25 s of system
time per 0.84-0.85 s step, charged to whichever kernel touches a page first. glibc's tunable
``glibc.malloc.hugetlb=1`` (glibc 2.35+) asks the kernel for transparent huge pages for those
maps (``madvise``): about 850 faults and 0.04 s of system time, 0.69-0.70 s per step (README Speed).

Tunables are read when a process starts, so :func:`ensure` restarts the entry point's own command
line (``exec``, same process id) with the tunable added to ``GLIBC_TUNABLES``, before JAX or
anything else has started. Measured and rejected: keeping the buffers in the heap with
``mallopt`` (one arena, no mmap): no page faults and 0.68-0.77 s per step while the programs came from
the compilation cache, but after a compilation in the same process ``malloc`` itself took 14% of
the step's CPU time (LLVM's freed memory fragments the one shared heap) and the step was slower
than glibc's default.

``auto`` (the default of ``python -m jaxcf.main --cpu_malloc`` and of ``benchmarks/train.py``)
applies it where it was measured: Linux with glibc 2.35+, transparent huge pages not ``never``,
no accelerator plugin installed or ``JAX_PLATFORMS=cpu`` (so the CPU backend runs the models), and
no malloc setting of the user's own (``MALLOC_*``, ``glibc.malloc`` tunables, ``LD_PRELOAD``).
``on`` applies it wherever glibc 2.35+ is found, ``off`` never. ``JAXCF_CPU_MALLOC`` overrides ``auto``.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import pkgutil
import platform
import sys
from typing import Mapping, Optional, Sequence

ENV = "JAXCF_CPU_MALLOC"
VALUES = ("auto", "on", "off")
TUNABLE = "glibc.malloc.hugetlb=1"
MIN_GLIBC = (2, 35)  # the first glibc with glibc.malloc.hugetlb
THP = "/sys/kernel/mm/transparent_hugepage/enabled"
_USER_VARS = ("MALLOC_ARENA_MAX", "MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_",
              "MALLOC_TOP_PAD_", "LD_PRELOAD")


class CpuMallocError(ValueError):
    """A malformed ``--cpu_malloc`` / JAXCF_CPU_MALLOC value; the message names it."""


def accelerator_plugins() -> list:
    """Names of the installed JAX accelerator plugins (PJRT plugins under ``jax_plugins`` or its entry
    points, and ``libtpu``); empty on a CPU-only installation. Nothing is imported or started."""
    names = []
    try:
        import jax_plugins  # a namespace package, present only when a plugin is installed

        names += [m.name for m in pkgutil.iter_modules(jax_plugins.__path__)]
    except ImportError:
        pass
    try:
        names += [e.name for e in importlib.metadata.entry_points(group="jax_plugins")]
    except Exception:  # noqa: BLE001 - broken package metadata must not stop a run
        pass
    if importlib.util.find_spec("libtpu") is not None:
        names.append("libtpu")
    return sorted(set(names))


def user_set(environ: Mapping[str, str]) -> list:
    """The user's own malloc settings in ``environ`` (these win: ``auto`` then changes nothing)."""
    found = [v for v in _USER_VARS if environ.get(v, "").strip()]
    if "glibc.malloc" in environ.get("GLIBC_TUNABLES", ""):
        found.append("GLIBC_TUNABLES")
    return found


def glibc_version() -> Optional[tuple]:
    """(major, minor) of the C library when it is glibc on Linux, else None."""
    if platform.system() != "Linux":
        return None
    name, version = platform.libc_ver()
    try:
        return tuple(int(p) for p in version.split(".")[:2]) if name == "glibc" else None
    except ValueError:
        return None


def thp_mode(path: str = THP) -> str:
    """The kernel's transparent huge page mode (always / madvise / never; "" when unknown)."""
    try:
        text = open(path).read()
    except OSError:
        return ""
    return text[text.find("[") + 1:text.find("]")] if "[" in text else text.strip()


def plan(value: str = "auto", *, environ: Optional[Mapping[str, str]] = None, glibc: Optional[tuple] = None,
         thp: Optional[str] = None, plugins: Optional[Sequence[str]] = None) -> bool:
    """Whether the process should run with :data:`TUNABLE`. ``value``: auto, on or off (``--cpu_malloc``;
    JAXCF_CPU_MALLOC when the flag is auto). A pure function of its arguments when ``glibc``, ``thp``
    and ``plugins`` are given."""
    env = os.environ if environ is None else environ
    source = "--cpu_malloc"
    if str(value).strip() == "auto" and env.get(ENV, "").strip():
        value, source = env[ENV].strip(), ENV
    text = str(value).strip().lower()
    if text not in VALUES:
        raise CpuMallocError(f"{source}={value!r} is not allowed; allowed: {', '.join(VALUES)} (whether jaxcf runs "
                             f"with GLIBC_TUNABLES={TUNABLE}: jaxcf.utils.cpu_malloc)")
    glibc = glibc_version() if glibc is None else glibc
    if text == "off" or not glibc or tuple(glibc) < MIN_GLIBC:
        return False
    if text == "on":
        return True
    if user_set(env) or (thp_mode() if thp is None else thp) not in ("always", "madvise"):
        return False
    platforms = env.get("JAX_PLATFORMS", "").strip().lower()
    if platforms:
        return platforms.split(",")[0].strip() == "cpu"
    return not (accelerator_plugins() if plugins is None else plugins)


def active(environ: Optional[Mapping[str, str]] = None) -> bool:
    """True when this process runs with :data:`TUNABLE` (read from GLIBC_TUNABLES, which glibc read at
    the start)."""
    env = os.environ if environ is None else environ
    return TUNABLE in env.get("GLIBC_TUNABLES", "").split(":")


def with_tunable(tunables: str) -> str:
    """GLIBC_TUNABLES with :data:`TUNABLE` added to the user's other tunables."""
    return ":".join([t for t in tunables.split(":") if t] + [TUNABLE])


def own_command_line(argv: Optional[Sequence[str]] = None, orig_argv: Optional[Sequence[str]] = None,
                     main_module: Optional[str] = None) -> bool:
    """True when ``sys.orig_argv`` (the interpreter's command line) is this program's own: ``python -m
    MODULE ARGS`` with MODULE the running ``__main__``, ``python SCRIPT ARGS`` or ``python -c CODE ARGS``,
    with ``sys.argv[1:]`` as ARGS. Not so when another program runs this one in-process (runpy, a
    test harness): restarting would run that program instead."""
    argv = list(sys.argv if argv is None else argv)
    orig = list(getattr(sys, "orig_argv", []) if orig_argv is None else orig_argv)
    if main_module is None:
        spec = getattr(sys.modules.get("__main__"), "__spec__", None)
        main_module = getattr(spec, "name", None)
    rest = argv[1:]
    if not argv or len(orig) < 2 + len(rest) or (rest and orig[len(orig) - len(rest):] != rest):
        return False
    head = orig[1:len(orig) - len(rest)]  # the interpreter's options and the program
    if argv[0] == "-c":
        return "-c" in head
    if "-m" in head:
        i = head.index("-m")
        return i + 2 == len(head) and head[i + 1] == main_module
    return bool(head) and os.path.abspath(head[-1]) == os.path.abspath(argv[0])


def ensure(value: str = "auto") -> bool:
    """Makes this process run with :data:`TUNABLE` when :func:`plan` says so: if it is not already set
    and the interpreter's command line is this program's own (:func:`own_command_line`), restarts it
    (``exec``, so nothing after this call runs twice and the process id stays) with the tunable added
    to GLIBC_TUNABLES. Call it first thing in an entry point, before JAX or any thread has started.
    Returns :func:`active`. A bad ``value`` raises :class:`CpuMallocError` in either case."""
    wanted = plan(value)
    if active() or not wanted or not own_command_line():
        return active()
    env = dict(os.environ, GLIBC_TUNABLES=with_tunable(os.environ.get("GLIBC_TUNABLES", "")))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
    return False  # not reached


def describe() -> str:
    """What results.json records: the tunable when active, else "default"."""
    return TUNABLE if active() else "default"

"""JAX's persistent compilation cache, on by default, and how much of a run was compilation.

A second run of the same command (a rerun after a crash, the next seed, a test) loads every
compiled program from disk instead of compiling it again. The folder is
``$JAXCF_COMPILATION_CACHE`` when set (``""`` or ``off`` disables the cache), otherwise JAX's own
``JAX_COMPILATION_CACHE_DIR`` / ``jax_compilation_cache_dir`` when the user set one, otherwise
``~/.cache/jaxcf/xla``. The thresholds are lowered so that CPU programs, which compile in well
under JAX's default one second, are cached too.

Compile-time accounting: a JAX monitoring listener sums the backend compile durations (a cache
hit counts its load time) and counts cache hits and misses; :func:`timings` reports them, with
the wall time since :func:`start`, for a pipeline's ``results.json``.
"""

from __future__ import annotations

import os
import threading
import time

import jax

from jaxcf.utils import cpu_malloc

ENV = "JAXCF_COMPILATION_CACHE"
DEFAULT_DIR = os.path.join("~", ".cache", "jaxcf", "xla")
OFF = ("", "off", "none", "0", "false")
# Programs that compile faster than this are not written (their file I/O would cost about as much).
MIN_COMPILE_SECONDS = 0.05

_BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"
_HIT = "/jax/compilation_cache/cache_hits"
_MISS = "/jax/compilation_cache/cache_misses"

_lock = threading.Lock()
_stats = {"compile_seconds": 0.0, "compilations": 0, "cache_hits": 0, "cache_misses": 0}
_start = [time.perf_counter()]
_listening = [False]


def cache_dir() -> str | None:
    """The folder the cache uses (None: disabled), from the environment as described above."""
    value = os.environ.get(ENV)
    if value is not None:
        return None if value.strip().lower() in OFF else os.path.expanduser(value)
    user = os.environ.get("JAX_COMPILATION_CACHE_DIR") or jax.config.jax_compilation_cache_dir
    return user or os.path.expanduser(DEFAULT_DIR)


def enable(path: str | None = None) -> str | None:
    """Turns the persistent cache on (at ``path``, or :func:`cache_dir`) and starts the accounting.

    Call it before the first compilation. Returns the folder, or None when the cache is off.
    """
    listen()
    path = cache_dir() if path is None else path
    if not path:
        return None
    if "://" not in path:
        os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)  # no size floor: small CPU programs too
    return path


def _on_duration(event: str, duration_secs: float, **kwargs) -> None:
    if event == _BACKEND_COMPILE:
        with _lock:
            _stats["compile_seconds"] += duration_secs
            _stats["compilations"] += 1


def _on_event(event: str, **kwargs) -> None:
    if event in (_HIT, _MISS):
        with _lock:
            _stats["cache_hits" if event == _HIT else "cache_misses"] += 1


def listen() -> None:
    """Registers the accounting listeners once per process (idempotent)."""
    with _lock:
        if _listening[0]:
            return
        _listening[0] = True
    jax.monitoring.register_event_duration_secs_listener(_on_duration)
    jax.monitoring.register_event_listener(_on_event)


def start() -> None:
    """Starts a new accounting period (a pipeline run): zeroes the sums and the wall clock."""
    listen()
    with _lock:
        for k in _stats:
            _stats[k] = 0.0 if k == "compile_seconds" else 0
        _start[0] = time.perf_counter()


def stats() -> dict:
    """The raw sums since :func:`start` (or the import)."""
    with _lock:
        return dict(_stats)


def timings() -> dict:
    """``compile_seconds`` (XLA compilation, or loading from the cache), ``run_seconds`` (the rest of
    the wall time since :func:`start`), the number of compilations and of cache hits / misses, and the
    devices the run used (``"2 cpu"``: see :mod:`jaxcf.train.cpu_devices`) and the malloc tunable
    (:mod:`jaxcf.utils.cpu_malloc`; "default" without it)."""
    s = stats()
    wall = time.perf_counter() - _start[0]
    return {"compile_seconds": round(s["compile_seconds"], 2), "run_seconds": round(wall - s["compile_seconds"], 2),
            "compilations": s["compilations"], "cache_hits": s["cache_hits"], "cache_misses": s["cache_misses"],
            "compilation_cache": jax.config.jax_compilation_cache_dir or "off",
            "devices": f"{jax.device_count()} {jax.default_backend()}",
            "cpu_malloc": cpu_malloc.describe()}

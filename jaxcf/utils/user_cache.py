"""A per-user cache for results that are pure functions of their inputs (default ``~/.cache/jaxcf``).

A run keeps everything it computes in its workdir; results whose file name is a digest of every
input that shapes them (DiCap's counterfactuals: :func:`jaxcf.dicap.runs.counterfactual_key`) are
also kept here, so a second run in a fresh workdir (another prompt-learning setting, a rerun after
deleting the workdir) loads them instead of computing them again. ``$JAXCF_CACHE`` moves the folder;
``off`` (or ``""``) disables it. Multi-process runs never use it: each host would see its own
folder, and the processes must agree on whether to compute (a sharded computation runs on all or
none); they share the workdir instead.
"""

from __future__ import annotations

import os

import jax

ENV = "JAXCF_CACHE"
DEFAULT_DIR = os.path.join("~", ".cache", "jaxcf")
OFF = ("", "off", "none", "0", "false")


def path(kind: str, name: str) -> str | None:
    """``<cache>/<kind>/<name>``, or None when the cache is off or the run has several processes."""
    value = os.environ.get(ENV, DEFAULT_DIR)
    if value.strip().lower() in OFF or jax.process_count() > 1:
        return None
    return os.path.join(os.path.expanduser(value), kind, name)

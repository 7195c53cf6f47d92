"""Exported weights: ``<name>.msgpack`` (params) + ``<name>.json`` (the config that made them),
shipped in ``jaxcf/assets/<folder>`` or cached in a workdir, and the one load-or-train rule."""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Sequence

import jax
from absl import logging
from flax import serialization

from jaxcf.utils import io

ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets")


def assets_dir(name: str) -> str | None:
    """``jaxcf/assets/<name>``, or None for '' (nothing shipped: train in the workdir)."""
    return os.path.join(ASSETS, name) if name else None


def export_params(path: str, params, meta: dict) -> None:
    """``path.msgpack`` (params) and ``path.json`` (the config that made them); local or ``gs://``."""
    io.write_bytes(path + ".msgpack", serialization.to_bytes(jax.device_get(params)))
    io.write_text(path + ".json", json.dumps(meta, indent=1, sort_keys=True))


def import_params(path: str, template, meta: dict):
    """Params from ``path.msgpack`` when ``path.json`` equals ``meta``; else None."""
    if not (io.exists(path + ".msgpack") and io.exists(path + ".json")):
        return None
    if io.read_json(path + ".json") != json.loads(json.dumps(meta, sort_keys=True)):
        logging.warning("%s was made with another config; training instead", path)
        return None
    return serialization.from_bytes(template, io.read_bytes(path + ".msgpack"))


def load_or_train(name: str, template: Any, meta: dict, folders: Sequence[str | None], export_dir: str,
                  train_fn: Callable[[], Any], log_prefix: str = "foundation"):
    """Params ``name`` from the first of ``folders`` holding an export made with ``meta``; else
    ``train_fn()``, exported to ``export_dir`` (process 0). ``template``: a params pytree of the
    right shapes, or a function returning one (called only when an export is read)."""
    for folder in filter(None, folders):
        params = import_params(io.join(folder, name), template() if callable(template) else template, meta)
        if params is not None:
            logging.info("%s: %s from %s", log_prefix, name, folder)
            return params
    params = train_fn()
    if io.is_writer():
        export_params(io.join(export_dir, name), params, meta)
    return params

"""Config helpers shared by every ``configs/*.py``: the common fields, variants and validation.

Validation runs before anything is built or compiled and raises :class:`ConfigError` with one
line that names the field and the allowed values.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping

import ml_collections


class ConfigError(ValueError):
    """A user-fixable problem with the config, the flags or the workdir."""


def base_config(pipeline: str) -> ml_collections.ConfigDict:
    """Fields every pipeline has."""
    c = ml_collections.ConfigDict()
    c.pipeline = pipeline
    c.variant = ""
    c.seed = 0
    c.mesh = [("data", -1)]  # (axis, size) pairs; -1 takes the remaining devices
    c.param_sharding = "replicated"  # or "fsdp": shard the big frozen models over a "model" axis
    c.dtype = "float32"  # activations/params of the frozen models: float32 or bfloat16
    c.checkpoint_every = 200
    c.keep_checkpoints = 2
    c.log_every = 20
    c.tensorboard = False
    return c


def select_variant(arg: str | None, variants: Mapping[str, Callable[[ml_collections.ConfigDict], None]],
                   config: ml_collections.ConfigDict, default: str) -> ml_collections.ConfigDict:
    """Applies the variant named after the colon in ``--config=configs/x.py:NAME``."""
    name = (arg or default).strip()
    if name not in variants:
        raise ConfigError(f"unknown variant {name!r} for pipeline {config.pipeline!r}; allowed: {', '.join(variants)}")
    variants[name](config)
    config.variant = name
    return config


def config_file(path: str, arg: str | None = None) -> ml_collections.ConfigDict:
    """``get_config(arg)`` of the config file at ``path`` (a config built on another: retrieval and
    VQA start from ``configs/dicap.py``)."""
    import importlib.util
    import os

    name = "_config_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def get(config: ml_collections.ConfigDict, field: str) -> Any:
    node = config
    for part in field.split("."):
        if part not in node:
            raise ConfigError(f"config has no field {field!r}")
        node = node[part]
    return node


def check_value(name: str, value: Any, allowed: Iterable[Any]) -> None:
    """The one choice check: raises ConfigError (a ValueError) ``name=value is not allowed; allowed: ...``."""
    allowed = list(allowed)
    if value not in allowed:
        shown = ", ".join(map(repr, allowed[:40])) + (f", ... ({len(allowed)} in all)" if len(allowed) > 40 else "")
        raise ConfigError(f"{name}={value!r} is not allowed; allowed: {shown}")


def check_choice(config, field: str, allowed: Iterable[Any]) -> None:
    """:func:`check_value` of ``config.<field>``."""
    check_value(f"config.{field}", get(config, field), allowed)


def check_int(config, field: str, minimum: int = 1) -> None:
    value = get(config, field)
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"config.{field}={value!r} must be an integer >= {minimum}")


def check_range(config, field: str, low: float, high: float, low_open: bool = False, high_open: bool = False) -> None:
    value = get(config, field)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok:
        ok = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        lb, rb = ("(" if low_open else "["), (")" if high_open else "]")
        raise ConfigError(f"config.{field}={value!r} must be in {lb}{low}, {high}{rb}")


def parse_mesh(text: str) -> list[tuple[str, int]]:
    """``--config.mesh`` from the command line: ``data:-1,model:2`` or a Python literal
    (``"[('data', -1), ('model', 2)]"``) -> ``[("data", -1), ("model", 2)]``."""
    import ast

    bad = ConfigError(f"--config.mesh={text!r} must be axis:size pairs such as 'data:-1' or 'data:4,model:2' "
                      "(one size may be -1: the remaining devices)")
    text = text.strip()
    if text[:1] in "[(":
        try:
            value = ast.literal_eval(text)
        except (SyntaxError, ValueError):
            raise bad from None
    else:
        value = []
        for part in filter(None, (p.strip() for p in text.split(","))):
            name, sep, size = part.partition(":")
            try:
                value.append((name.strip(), int(size)))
            except ValueError:
                raise bad from None
            if not sep or not name.strip():
                raise bad
    if not isinstance(value, (list, tuple)) or not value or not all(
            isinstance(a, (list, tuple)) and len(a) == 2 and isinstance(a[0], str) and type(a[1]) is int
            for a in value):
        raise bad
    return [(str(a[0]), int(a[1])) for a in value]


def validate_common(config) -> None:
    from jaxcf.train.mesh import PARAM_SHARDINGS

    check_int(config, "seed", 0)
    check_int(config, "checkpoint_every", 1)
    check_int(config, "keep_checkpoints", 1)
    check_int(config, "log_every", 1)
    check_choice(config, "param_sharding", PARAM_SHARDINGS)
    check_choice(config, "dtype", ("float32", "bfloat16"))
    mesh = config.mesh
    if not mesh or not all(len(a) == 2 and isinstance(a[0], str) and isinstance(a[1], int) for a in mesh):
        raise ConfigError(f"config.mesh={mesh!r} must be a list of (axis_name, size) pairs, e.g. [('data', -1)]")
    if "data" not in [a[0] for a in mesh]:
        raise ConfigError(f"config.mesh={mesh!r} needs a 'data' axis")

"""Device mesh and shardings from config fields; nothing here is pmap.

``config.mesh`` is a list of ``(axis_name, size)`` pairs, one size may be -1 ("the rest"), e.g.
``[("data", -1)]`` for data parallelism or ``[("data", -1), ("model", 2)]`` to also shard the big
frozen models. Batches are sharded along ``data``; parameters are replicated, or sharded over
``model`` with ``param_sharding = "fsdp"``.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

PARAM_SHARDINGS = ("replicated", "fsdp")


def make_mesh(axes: Sequence[Sequence[Any]] = (("data", -1),), devices=None) -> Mesh:
    """Builds a Mesh from ``[(name, size), ...]`` (at most one size -1) over all devices."""
    devices = jax.devices() if devices is None else devices
    names = [str(a[0]) for a in axes]
    sizes = [int(a[1]) for a in axes]
    if len(set(names)) != len(names):
        raise ValueError(f"config.mesh has repeated axis names: {names}")
    if sizes.count(-1) > 1:
        raise ValueError(f"config.mesh: at most one axis may have size -1, got {list(zip(names, sizes))}")
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"config.mesh: sizes must be positive or -1, got {list(zip(names, sizes))}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"config.mesh {list(zip(names, sizes))}: {len(devices)} devices are not divisible by {known}")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ValueError(
            f"config.mesh {list(zip(names, sizes))} needs {math.prod(sizes)} devices, but {len(devices)} are present"
        )
    return Mesh(np.asarray(devices).reshape(sizes), tuple(names))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def data_sharding(mesh: Mesh, axis: str = "data") -> NamedSharding:
    """Leading (batch) dimension split over the data axis."""
    return NamedSharding(mesh, P(axis))


def param_shardings(shapes: Any, mesh: Mesh, strategy: str = "replicated", axis: str = "model",
                    min_size: int = 2**14) -> Any:
    """A tree of NamedShardings for a tree of shapes (e.g. from ``jax.eval_shape``).

    ``replicated``: every device holds everything (data parallelism).
    ``fsdp``: each array of at least ``min_size`` elements is split over ``axis`` along its largest
    dimension that the axis size divides; the others are replicated.
    """
    if strategy not in PARAM_SHARDINGS:
        raise ValueError(f"config.param_sharding must be one of {PARAM_SHARDINGS}, got {strategy!r}")
    if strategy == "replicated" or axis not in mesh.shape or mesh.shape[axis] == 1:
        return jax.tree_util.tree_map(lambda _: replicated(mesh), shapes)
    n = mesh.shape[axis]

    def rule(x):
        shape = tuple(x.shape)
        if math.prod(shape) < min_size:
            return replicated(mesh)
        for d in sorted(range(len(shape)), key=lambda i: -shape[i]):
            if shape[d] % n == 0:
                spec = [None] * len(shape)
                spec[d] = axis
                return NamedSharding(mesh, P(*spec))
        return replicated(mesh)

    return jax.tree_util.tree_map(rule, shapes)


def shard_batch(batch: Any, mesh: Mesh, axis: str = "data") -> Any:
    """Places a process-local numpy batch on the mesh, split along ``axis``.

    In a multi-host run each process passes only its own rows; the global batch is their
    concatenation in process order.
    """
    sharding = data_sharding(mesh, axis)

    def put(x):
        x = np.asarray(x)
        return jax.make_array_from_process_local_data(sharding, x)

    return jax.tree_util.tree_map(put, batch)


def check_batch_divisible(global_batch: int, mesh: Mesh, field: str, axis: str = "data") -> None:
    """Raises :class:`jaxcf.configs.ConfigError` (a ValueError; ``jaxcf.main`` prints it as one line)
    naming ``field`` when the batch does not split evenly over the devices and processes."""
    from jaxcf.configs import ConfigError

    n = mesh.shape.get(axis, 1) if hasattr(mesh.shape, "get") else dict(mesh.shape).get(axis, 1)
    if global_batch % n:
        hint = ""
        if jax.default_backend() == "cpu" and jax.process_count() == 1:  # jaxcf.train.cpu_devices split the host
            hint = " (this CPU is split into that many devices; --cpu_devices=1 or a divisor of the batch)"
        raise ConfigError(f"{field}={global_batch} must be divisible by the {n} devices of the mesh axis {axis!r}{hint}")
    if global_batch % jax.process_count():
        raise ConfigError(f"{field}={global_batch} must be divisible by the {jax.process_count()} processes")


def to_host(tree: Any) -> Any:
    """Fully replicated copy as numpy (works for sharded arrays on any number of hosts)."""
    from jax.experimental import multihost_utils

    if jax.process_count() > 1:
        tree = multihost_utils.process_allgather(tree, tiled=True)
    return jax.tree_util.tree_map(lambda x: np.asarray(x), tree)


def cast_floating(tree: Any, dtype) -> Any:
    """Casts the floating-point leaves of a tree (e.g. frozen params to bfloat16).

    numpy leaves are cast on the host (no device copy); jax arrays keep their sharding.
    """

    def cast(x):
        if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
            return x
        return x.astype(dtype) if hasattr(x, "astype") else jnp.asarray(x, dtype)

    return jax.tree_util.tree_map(cast, tree)

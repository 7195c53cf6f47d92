"""Fast random initialisation for any linen module: one normal draw sliced over all weights.

``module.init`` draws every parameter with its own key; on a CPU that compiles one threefry
pipeline per parameter and takes minutes for a UNet. :func:`fast_init` takes the variable shapes
from ``jax.eval_shape(module.init, ...)`` and fills them from a single draw, so the result has
the tree, shapes and dtypes of ``module.init`` and the same distribution for flax's defaults:

- ``kernel``: truncated normal (+-2 sigma) with variance 1 / fan_in (``lecun_normal``), fan_in
  the product of all but the last axis (Dense [in, out], Conv [kh, kw, in, out]);
- ``embedding`` [N, F]: variance 1 / F (flax's ``default_embed_init``; truncated here too);
- ``bias`` and BatchNorm ``mean``: 0; ``scale`` and BatchNorm ``var``: 1.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable

import numpy as np

import jax
import jax.numpy as jnp
import flax.linen as nn
from flax import traverse_util

Path = tuple[str, ...]
# (path, shape) -> std of that weight, or None to keep the default.
StdFn = Callable[[Path, tuple[int, ...]], "float | None"]

_CONSTANTS = {"bias": 0.0, "scale": 1.0, "mean": 0.0, "var": 1.0}
_TRUNC_STD = 0.87962566103423978  # std of a standard normal truncated to [-2, 2]


def default_std(path: Path, shape: tuple[int, ...]) -> float:
    """flax's default std for a ``kernel`` or ``embedding`` leaf."""
    if path[-1] == "embedding":
        return 1.0 / math.sqrt(shape[-1])
    return 1.0 / math.sqrt(max(1, math.prod(shape[:-1])))


def variable_shapes(module: nn.Module, *example_inputs: Any, **kwargs: Any) -> dict:
    """``jax.ShapeDtypeStruct`` tree of every collection ``module.init`` creates, computing nothing.

    example_inputs: arrays or ``jax.ShapeDtypeStruct``s; kwargs are static (e.g. ``train=False``).
    """
    init = functools.partial(module.init, **kwargs)
    return jax.eval_shape(init, jax.random.key(0), *example_inputs)


def fast_init(module: nn.Module, *example_inputs: Any, rng: jax.Array, std_fn: StdFn | None = None,
              **kwargs: Any) -> dict:
    """Variables of ``module.init(rng, *example_inputs, **kwargs)`` (all collections) in one draw.

    std_fn(path, shape) may override the std of any ``kernel``/``embedding`` leaf (0.0 zero-inits
    it). Any other leaf name raises ValueError (it would need its own rule).
    """
    shapes = traverse_util.flatten_dict(variable_shapes(module, *example_inputs, **kwargs))
    random, constant = [], {}
    for path, s in shapes.items():
        if path[-1] in ("kernel", "embedding"):
            random.append(path)
        elif path[-1] in _CONSTANTS:
            constant[path] = _CONSTANTS[path[-1]]
        else:
            raise ValueError(f"fast_init: no rule for variable {'/'.join(path)} {s.shape}; "
                             "known leaves: kernel, embedding, bias, scale, mean, var")

    stds = []
    for path in random:
        shape = shapes[path].shape
        std = std_fn(path[1:], shape) if std_fn is not None else None  # path[1:]: without the collection
        stds.append(default_std(path, shape) if std is None else float(std))
    sizes = [math.prod(shapes[p].shape) for p in random]

    # One draw on the device; slicing it into leaves happens in numpy: a jitted split into
    # hundreds of pieces compiles for longer than flax's own init.
    z = np.asarray(jax.random.truncated_normal(rng, -2.0, 2.0, (sum(sizes),), jnp.float32)) / _TRUNC_STD
    out, start = {}, 0
    for path, std, size in zip(random, stds, sizes):
        s = shapes[path]
        out[path] = (std * z[start:start + size]).reshape(s.shape).astype(s.dtype)
        start += size
    out.update({p: np.full(shapes[p].shape, v, shapes[p].dtype) for p, v in constant.items()})
    return jax.device_put(traverse_util.unflatten_dict(out))


def num_params(tree: Any) -> int:
    """Number of scalars in a (shape) tree."""
    return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))

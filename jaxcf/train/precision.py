"""Mixed precision: what ``config.dtype`` switches, and what stays float32 whatever it is.

``config.dtype = "bfloat16"`` runs the frozen models (CLIP, the diffusion UNet, the VAE) with
bfloat16 parameters and activations: half their memory and bandwidth, and the bfloat16 rate of
TPU MXUs and GPU tensor cores. Kept in float32:

- trainable parameters, their gradients and the optimizer state (a trained model keeps
  ``param_dtype=float32``; only its activations follow ``config.dtype``);
- losses (model outputs are upcast before the reduction);
- the DDIM schedule (abar_t) and the DDIM state: :func:`jaxcf.diffusion.ddim_step` upcasts
  x_t and eps and returns x_t's own dtype, so a float32 x_0 (or latent) keeps the whole
  ``lax.scan`` carry float32 while the noise model runs in bfloat16;
- LayerNorm / GroupNorm statistics and attention softmax inside the models;
- the CLIP features a foundation hands out (cosines and prompt learning run on them).
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from jaxcf.train.mesh import cast_floating


def compute_dtype(name: str) -> jnp.dtype:
    """``config.dtype`` ("float32" or "bfloat16") as a numpy dtype."""
    from jaxcf.configs import check_value
    from jaxcf.models.registry import DTYPES

    check_value("config.dtype", name, DTYPES)
    return jnp.dtype(DTYPES[name])


def frozen_params(params: Any, dtype) -> Any:
    """Frozen (never trained) parameters in the run's compute dtype; float32 returns ``params`` as is."""
    dtype = jnp.dtype(dtype)
    return params if dtype == jnp.float32 else cast_floating(params, dtype)

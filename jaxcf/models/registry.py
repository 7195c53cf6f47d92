"""The one place that maps a config's model name to a Flax module."""

from __future__ import annotations

import jax.numpy as jnp

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def _unet2d(cfg: dict, dtype):
    from jaxcf.models.unet2d import UNet2DConfig, UNet2DModel

    return UNet2DModel(UNet2DConfig(**cfg), dtype=dtype)


def _diffae_unet(cfg: dict, dtype):
    """Fields of DiffAEConfig; ``preset`` ("square", "square_tiny", "tiny") supplies the defaults."""
    from jaxcf.models.diffae_unet import DiffAEConfig, DiffAEUNet

    return DiffAEUNet(DiffAEConfig.preset(cfg.pop("preset", "square"), **cfg), dtype=dtype)


def _resnet(cfg: dict, dtype):
    from jaxcf.models.resnet import ResNet, ResNetConfig

    return ResNet(ResNetConfig(**cfg), dtype=dtype)


def _square_encoder(cfg: dict, dtype):
    from jaxcf.models.encoders import SquareEncoder

    return SquareEncoder(**cfg, dtype=dtype)


MODELS = {
    "unet2d": _unet2d,
    "diffae_unet": _diffae_unet,
    "resnet": _resnet,
    "square_encoder": _square_encoder,
}


def build_model(name: str, cfg: dict, dtype: str = "float32"):
    """Builds the module called ``name`` from its config dict (field names as in the model's config)."""
    from jaxcf.configs import ConfigError

    if name not in MODELS:
        raise ConfigError(f"config.model.name={name!r} is unknown; allowed: {', '.join(MODELS)}")
    if dtype not in DTYPES:
        raise ConfigError(f"config.dtype={dtype!r} is not allowed; allowed: {', '.join(DTYPES)}")
    try:
        return MODELS[name](dict(cfg), DTYPES[dtype])
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config.model ({name}): {e}") from e

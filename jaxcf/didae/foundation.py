"""DiDAE's frozen pieces (METHODS.md §2.1-2.3): the encoder Phi (a Square CNN trained on the 8
attributes, or CLIP's image tower) and the DiffAE decoder trained with Phi frozen, read from the
shipped assets or the workdir when they were made with the same config, else trained here."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from jaxcf import configs as cfgs
from jaxcf.data.confounded import ConfoundedData, images_of
from jaxcf.didae.autoencoder import (DiffusionAutoencoder, clip_encode_fn, code_statistics, semantic_cond,
                                     square_encode_fn, standardized)
from jaxcf.diffusion import make_schedule
from jaxcf.foundation.weights import assets_dir, load_or_train
from jaxcf.models.init import num_params
from jaxcf.models.registry import build_model
from jaxcf.train.precision import compute_dtype
from jaxcf.utils import io

# decoder fields that are not UNet hyper-parameters
DECODER_SETTINGS = ("train", "standardize_z", "clip_x0")
DECODER_INIT_SEED_OFFSET = 1  # the decoder's init draws from foundation.seed + 1 (the encoder's from foundation.seed)


def embed_dim(c) -> int | None:
    """D, the size of z = Phi(x) (None for CLIP until its config is read)."""
    return c.encoder.embed_dim if c.encoder.kind == "square" else None


def decoder_model(c, semantic_dim: int):
    """The DiffAE UNet of ``config.decoder`` conditioned on a code of ``semantic_dim``."""
    cfg = {k: v for k, v in c.decoder.to_dict().items() if k not in DECODER_SETTINGS}
    cfg.setdefault("resolution", c.data.resolution)
    cfg["semantic_dim"] = semantic_dim
    try:
        return build_model("diffae_unet", cfg, c.dtype)
    except cfgs.ConfigError as e:
        raise cfgs.ConfigError(str(e).replace("config.model (diffae_unet)", "config.decoder")) from e


def foundation_meta(config, name: str, semantic_dim: int | None = None) -> dict:
    """Everything the encoder or decoder weights depend on; shipped or cached weights are used only
    while it matches the config asked for."""
    d = config.data
    data = dict(name=d.name, resolution=d.resolution, unbiased_samples=d.unbiased_samples, seed=d.seed,
                tfds_name=d.get("tfds_name", ""))
    if name == "encoder":
        return dict(model=dict(config.encoder.to_dict(), resolution=d.resolution), data=data,
                    seed=config.foundation.seed)
    return dict(model=config.decoder.to_dict(), semantic_dim=semantic_dim or config.encoder.embed_dim,
                schedule=config.schedule.to_dict(), data=data, encoder=config.encoder.to_dict(),
                seed=config.foundation.seed)


def _load_or_train(name, template, meta, config, workdir, train_fn):
    folders = (assets_dir(config.foundation.assets), io.join(workdir, "foundation"))
    return load_or_train(name, template, meta, folders, io.join(workdir, "foundation"), train_fn, log_prefix="didae")


def square_encoder(config, data: ConfoundedData, workdir: str, mesh):
    """Phi for Square: a CNN trained (BCE) on the 8 binary attributes of unbiased Square."""
    from jaxcf.didae.classifiers import train_classifier
    from jaxcf.models.encoders import init_params

    e = config.encoder
    enc = build_model("square_encoder", dict(embed_dim=e.embed_dim, num_attributes=8, width=e.width,
                                             num_stages=e.num_stages, resolution=config.data.resolution), config.dtype)

    def loss_fn(params, batch, rng):
        _, logits = enc.apply({"params": params}, batch["image"])
        loss = jnp.mean(optax.sigmoid_binary_cross_entropy(logits.astype(jnp.float32), batch["attributes"]))
        acc = jnp.mean((logits > 0) == (batch["attributes"] > 0.5))
        return loss, {"attribute_accuracy": acc}

    def train():
        return train_classifier(init_params(enc, jax.random.key(config.foundation.seed)), loss_fn, e,
                                io.join(workdir, "foundation", "encoder_run"), mesh, config, "foundation: encoder",
                                section="encoder", dataset=data.pool, keys=("image", "attributes"),
                                seed=config.foundation.seed)

    params = _load_or_train("encoder", jax.device_get(init_params(enc, jax.random.key(0))),
                            foundation_meta(config, "encoder"), config, workdir, train)
    return square_encode_fn(enc), params, e.embed_dim


def clip_encoder(config):
    from jaxcf.models.clip import load_clip

    clip, params = load_clip(config.encoder.checkpoint, dtype=compute_dtype(config.dtype))
    return clip_encode_fn(clip), params, clip.config.projection_dim


def build_autoencoder(config, data: ConfoundedData, workdir: str, mesh):
    """(DiffusionAutoencoder, enc_params, dec_params): Phi and the decoder trained with Phi frozen.

    With ``decoder.standardize_z`` the autoencoder's code is Phi standardised by the pool's
    per-dimension mean and std (stored beside the decoder weights as ``decoder_code``); the
    decoder is conditioned on it and the dictionaries and edits live in that space.
    """
    from jaxcf.diffusion.train import train_eps_model
    from jaxcf.models.diffae_unet import init_params
    from jaxcf.train.batched import batched

    if config.encoder.kind == "square":
        encode, enc_params, D = square_encoder(config, data, workdir, mesh)
    else:
        encode, enc_params, D = clip_encoder(config)
    dc = config.decoder
    meta = foundation_meta(config, "decoder", D)
    if dc.standardize_z:
        def statistics():
            codes = batched(encode, mesh, config.eval.batch_size)(enc_params, images_of(data.pool))
            return {k: jnp.asarray(v) for k, v in code_statistics(codes).items()}

        template = {"mean": np.zeros(D, np.float32), "std": np.ones(D, np.float32)}
        stats = _load_or_train("decoder_code", template, meta, config, workdir, statistics)
        encode = standardized(encode, np.asarray(stats["mean"]), np.asarray(stats["std"]))
    decoder = decoder_model(config, D)
    sc = config.schedule
    schedule = make_schedule(sc.name, sc.num_train_timesteps, sc.beta_start, sc.beta_end)

    def train():
        init = init_params(decoder, jax.random.key(config.foundation.seed + DECODER_INIT_SEED_OFFSET),
                           zero_cond=dc.train.zero_cond)
        return train_eps_model(decoder, schedule, data.pool, dc.train, io.join(workdir, "foundation", "decoder_run"),
                               mesh, config, seed=config.foundation.seed, desc="foundation: decoder",
                               init_params=init, cond_fn=semantic_cond(encode), frozen=enc_params)

    dec_params = _load_or_train("decoder", jax.device_get(init_params(decoder, jax.random.key(0))), meta, config,
                                workdir, train)
    logging.info("didae: decoder %d parameters", num_params(dec_params))
    ae = DiffusionAutoencoder(decoder, encode, schedule, config.ddim_steps, prediction=dc.train.prediction,
                              clip_x0=dc.clip_x0)
    return ae, enc_params, dec_params

"""The frozen "foundation models" a counterfactual pipeline stands on.

For the shapes world (``foundation.kind = "toy"``) jaxcf pretrains them itself: a tiny CLIP on the
world's captions and a tiny pixel diffusion model on its images. Each is trained once per
workdir (resumable) and exported as ``<name>.msgpack`` + ``<name>.json`` (its config); a folder
of such exports shipped in ``jaxcf/assets/`` is used instead of training when its config
matches the one asked for.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import serialization

from jaxcf.data.shapes import COLOR_NAMES, SHAPE_NAMES, shapes_dataset
from jaxcf.diffusion import NoiseSchedule, make_schedule
from jaxcf.models.clip import CLIP, CLIPConfig, WordTokenizer, contrastive_loss, to_clip_input
from jaxcf.models.registry import build_model
from jaxcf.pipelines.diffusion import train_eps_model
from jaxcf.train import (
    Checkpointer,
    MetricWriter,
    check_batch_divisible,
    create_train_state,
    jit_update,
    make_update_fn,
    stream_indices,
    train_loop,
    tree_digest,
    warmup_cosine,
)
from jaxcf.train.precision import compute_dtype, frozen_params
from jaxcf.utils import io

ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets")


@dataclasses.dataclass
class Foundation:
    """Frozen CLIP + diffusion model, with the functions the counterfactual code needs.

    ``eps_apply(diffusion_params, x_t, t) -> eps``; for a latent model ``encode(diffusion_params, x)``
    and ``decode(diffusion_params, z)`` map images in [-1, 1] to scaled latents and back. The
    parameters are passed in (never closed over), so jitted code takes them as arguments.
    With ``config.dtype = "bfloat16"`` the models and their parameters are bfloat16; the CLIP
    features, latents and decoded images they hand out are float32 (:mod:`jaxcf.train.precision`).
    """

    clip: CLIP
    clip_params: Any
    tokenizer: Any
    diffusion_params: Any
    eps_apply: Callable
    schedule: NoiseSchedule
    clip_image_size: int
    encode: Optional[Callable] = None
    decode: Optional[Callable] = None
    _image_features: Optional[Callable] = dataclasses.field(default=None, init=False, repr=False)

    def image_features_fn(self) -> Callable:
        """``jit((clip_params, images in [-1, 1]) -> features)``, built once per foundation."""
        if self._image_features is None:
            self._image_features = jax.jit(
                lambda p, x: self.clip.encode_image(p, self.to_clip(x)).astype(jnp.float32))
        return self._image_features

    def to_clip(self, images):
        """[B, H, W, 3] in [-1, 1] -> CLIP input (differentiable)."""
        return to_clip_input(images, self.clip_image_size)

    def eps_fn(self, diffusion_params):
        return lambda x, t, cond: self.eps_apply(diffusion_params, x, t)


def world_tokenizer() -> WordTokenizer:
    """Every word of the shapes world's captions and prompts."""
    words = ["a", "photo", "of", "an", "on", "background", ".", "small", "large", "at", "the", "top", "bottom",
             "left", "right", "center", "in", "middle"]
    return WordTokenizer(words + list(COLOR_NAMES) + list(SHAPE_NAMES))


def _export(path: str, params, meta: dict) -> None:
    """``path.msgpack`` (params) and ``path.json`` (the config that made them); local or ``gs://``."""
    io.write_bytes(path + ".msgpack", serialization.to_bytes(jax.device_get(params)))
    io.write_text(path + ".json", json.dumps(meta, indent=1, sort_keys=True))


def _import(path: str, template, meta: dict):
    """Params from ``path.msgpack`` when ``path.json`` equals ``meta``; else None."""
    if not (io.exists(path + ".msgpack") and io.exists(path + ".json")):
        return None
    if io.read_json(path + ".json") != json.loads(json.dumps(meta, sort_keys=True)):
        logging.warning("%s was made with another config; training instead", path)
        return None
    return serialization.from_bytes(template, io.read_bytes(path + ".msgpack"))


CAPTION_TEMPLATES = (
    "a {color} {shape} on a {background} background",
    "a photo of a {shape}.",
    "a {shape}.",
    "a photo of a {color} {shape}.",
    "a {shape} on a {background} background.",
)


def caption_variants(factors: np.ndarray) -> list[list[str]]:
    """Every CAPTION_TEMPLATES caption of each image (factors [N, 6] of the shapes world).

    Web captions name an object in many ways; giving the shape alone in some of them makes a
    contrastive model encode shape, not only the easier colours (the world's spurious features).
    """
    out = []
    for shape, color, bg, *_ in np.asarray(factors):
        words = dict(shape=SHAPE_NAMES[shape], color=COLOR_NAMES[color], background=COLOR_NAMES[bg])
        out.append([t.format(**words) for t in CAPTION_TEMPLATES])
    return out


def train_clip(clip: CLIP, dataset, tokenizer, cfg, workdir: str, mesh, *, seed: int, log_every: int,
               checkpoint_every: int, keep: int, max_len: int):
    """Contrastive (InfoNCE) pretraining of ``clip`` on the world's images and varied captions."""
    check_batch_divisible(cfg.batch_size, mesh, "config.foundation.clip_train.batch_size")
    size = clip.config.vision.image_size
    variants = caption_variants(dataset.arrays["factors"])
    n_var = len(CAPTION_TEMPLATES)
    tokens = tokenizer([c for v in variants for c in v], max_length=max_len).reshape(len(variants), n_var, max_len)
    lr = warmup_cosine(cfg.learning_rate, cfg.warmup_steps, cfg.steps)
    tx = optax.adamw(lr, weight_decay=cfg.weight_decay)

    def loss_fn(params, batch, rng):
        f = clip.encode_image(params, to_clip_input(batch["image"], size))
        t = clip.encode_text(params, batch["tokens"])
        return contrastive_loss(f, t, clip.logit_scale(params)), {}

    state, shardings = create_train_state(clip.init, tx, seed, mesh)
    update = jit_update(make_update_fn(loss_fn, tx), shardings, mesh)

    def batch_fn(step):
        idx = stream_indices(len(dataset), cfg.batch_size, step, seed)
        pick = np.random.default_rng((seed, step)).integers(0, n_var, len(idx))  # a caption variant per image
        return {"image": dataset.get(idx, keys=("image",))["image"], "tokens": tokens[idx, pick]}

    ckpt = Checkpointer(workdir, every=checkpoint_every, keep=keep)
    state = train_loop(state, update, batch_fn, cfg.steps, mesh, ckpt, MetricWriter(workdir), log_every=log_every,
                       desc="foundation: clip", key=dict(train=cfg.to_dict(), captions=CAPTION_TEMPLATES,
                                                         tokens=tree_digest(tokens)))
    ckpt.close()
    return state.params


def toy_foundation(config, workdir: str, mesh) -> Foundation:
    """Tiny CLIP + tiny pixel diffusion model for the shapes world: shipped, cached, or trained here.

    They are trained (and exported) in float32; ``config.dtype`` sets the dtype they are used in.
    """
    fc = config.foundation
    res = config.data.resolution
    dtype = compute_dtype(config.dtype)
    tokenizer = world_tokenizer()
    clip_cfg = dict(fc.clip.to_dict(), vocab_size=tokenizer.vocab_size, eos_token_id=tokenizer.eos_id, image_size=res)
    clip = CLIP(CLIPConfig.tiny(**clip_cfg))
    unet = build_model("unet2d", fc.unet.to_dict())
    sc = fc.schedule
    schedule = make_schedule(sc.name, sc.num_train_timesteps, sc.beta_start, sc.beta_end)
    pool = None
    common = dict(seed=config.seed + 1000, log_every=config.log_every, checkpoint_every=config.checkpoint_every,
                  keep=config.keep_checkpoints)
    data_meta = dict(pretrain_examples=fc.pretrain_examples, resolution=res, world_seed=1000)

    def get(name, template_fn, meta, train_fn):
        """Params from an export whose config matches (``template_fn()``: their shapes), else trained."""
        nonlocal pool
        for folder in ([os.path.join(ASSETS, fc.assets)] if fc.assets else []) + [io.join(workdir, "foundation")]:
            params = _import(io.join(folder, name), template_fn(), meta)
            if params is not None:
                logging.info("foundation: %s from %s", name, folder)
                return params
        if pool is None:
            pool = shapes_dataset("pretrain", num_examples=fc.pretrain_examples, resolution=res, seed=1000)
        params = train_fn(pool)
        if io.is_writer():
            _export(io.join(workdir, "foundation", name), params, meta)
        return params

    clip_meta = dict(model=clip_cfg, train=fc.clip_train.to_dict(), data=data_meta, text_max_len=fc.text_max_len)
    clip_params = get(
        "clip", clip.param_shapes, clip_meta,
        lambda pool: train_clip(clip, pool, tokenizer, fc.clip_train, io.join(workdir, "foundation", "clip_run"),
                                mesh, max_len=fc.text_max_len, **common))
    unet_meta = dict(model=fc.unet.to_dict(), train=fc.unet_train.to_dict(), schedule=sc.to_dict(), data=data_meta)
    unet_params = get(
        "unet", lambda: jax.eval_shape(unet.init, jax.random.key(0), jnp.zeros((1, res, res, 3)),
                                       jnp.zeros((1,), jnp.int32))["params"], unet_meta,
        lambda pool: train_eps_model(unet, schedule, pool, fc.unet_train,
                                     io.join(workdir, "foundation", "unet_run"), mesh,
                                     desc="foundation: diffusion", **common))
    frozen_clip = CLIP(CLIPConfig.tiny(**clip_cfg, dtype=dtype, param_dtype=dtype))
    frozen_unet = build_model("unet2d", fc.unet.to_dict(), config.dtype)
    return Foundation(clip=frozen_clip, clip_params=frozen_params(clip_params, dtype), tokenizer=tokenizer,
                      diffusion_params=frozen_params(unet_params, dtype),
                      eps_apply=lambda p, x, t: frozen_unet.apply({"params": p}, x, t), schedule=schedule,
                      clip_image_size=res)


def pretrained_foundation(config) -> Foundation:
    """CLIP (HF layout) + Stable Diffusion (diffusers layout), by hub id or local folder.

    The diffusion model is used unconditionally (the empty prompt); inversion and guidance run on
    VAE latents and the guidance gradient flows through the VAE decoder.
    """
    from jaxcf.diffusion import eps_from_v
    from jaxcf.models.clip import load_clip, load_tokenizer
    from jaxcf.models.stable_diffusion import load_stable_diffusion
    from jaxcf.models.vae import image_to_latent, latent_to_image

    fc = config.foundation
    dtype = compute_dtype(config.dtype)  # params are loaded (cast) in it
    clip, clip_params = load_clip(fc.clip_checkpoint, dtype=dtype)
    tokenizer = load_tokenizer(fc.clip_checkpoint)
    sd = load_stable_diffusion(fc.diffusion_checkpoint, dtype=dtype)
    sc = sd.scheduler
    schedule = make_schedule(sc["schedule"], sc["num_train_timesteps"], sc["beta_start"], sc["beta_end"])
    if sc["prediction_type"] not in ("epsilon", "v_prediction"):
        raise ValueError(f"{fc.diffusion_checkpoint}: prediction_type {sc['prediction_type']!r} is not supported; "
                         "allowed: epsilon, v_prediction")
    params = {"unet": sd.unet_params, "vae": sd.vae_params, "empty": sd.encode_prompts([""])}

    def unet_eps(p, x, t):
        ctx = jnp.broadcast_to(p["empty"], (x.shape[0],) + p["empty"].shape[1:])
        return sd.unet.apply({"params": p["unet"]}, x, t, ctx)

    def eps_apply(p, x, t):
        if sc["prediction_type"] == "v_prediction":
            return eps_from_v(lambda xx, tt, c: unet_eps(p, xx, tt), schedule)(x, t, None)
        return unet_eps(p, x, t)

    return Foundation(clip=clip, clip_params=clip_params, tokenizer=tokenizer, diffusion_params=params,
                      eps_apply=eps_apply, schedule=schedule, clip_image_size=clip.config.vision.image_size,
                      # float32 latents keep the DDIM carry float32 under a bfloat16 VAE and UNet
                      encode=lambda p, x: image_to_latent(sd.vae, p["vae"], x).astype(jnp.float32),
                      decode=lambda p, z: latent_to_image(sd.vae, p["vae"], z).astype(jnp.float32))


def build_foundation(config, workdir: str, mesh) -> Foundation:
    """The foundation named by ``config.foundation.kind``."""
    if config.foundation.kind == "toy":
        return toy_foundation(config, workdir, mesh)
    return pretrained_foundation(config)


def template_text_features(found: Foundation, class_names, template: str, max_len: int):
    """Zero-shot class embeddings from a hand-written template ("a photo of a {}.") -> [C, P]."""
    ids = found.tokenizer([template.format(c) for c in class_names], max_length=max_len)
    return found.clip.encode_text(found.clip_params, jnp.asarray(ids)).astype(jnp.float32)


def encode_images(found: Foundation, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """CLIP image features [N, P] of images [N, H, W, 3] in [-1, 1], in batches.

    Every batch is padded to ``batch_size`` rows, so the image tower compiles once per image shape
    however many sets (tests, shots, counterfactuals) are encoded.
    """
    fn = found.image_features_fn()
    from jaxcf.data.common import padded_batches

    out = [np.asarray(fn(found.clip_params, chunk))[:n] for chunk, n in padded_batches(images, batch_size)]
    return np.concatenate(out) if out else np.zeros((0, found.clip.config.projection_dim), np.float32)

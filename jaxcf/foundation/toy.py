"""The toy foundation of the shapes world: a tiny CLIP pretrained contrastively on the world's
captions and a tiny pixel diffusion model on its images, each trained once per workdir
(resumable) and exported, or read from ``jaxcf/assets/<foundation.assets>`` when its config
matches the one asked for."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxcf.data.shapes import COLOR_NAMES, SHAPE_NAMES, shapes_dataset
from jaxcf.diffusion import make_schedule
from jaxcf.diffusion.train import train_eps_model
from jaxcf.foundation.core import Foundation
from jaxcf.foundation.weights import assets_dir, load_or_train
from jaxcf.models.clip import CLIP, CLIPConfig, WordTokenizer, contrastive_loss, to_clip_input
from jaxcf.models.registry import build_model
from jaxcf.train import stream_indices, tree_digest, warmup_cosine
from jaxcf.train.fit import fit
from jaxcf.train.precision import compute_dtype, frozen_params
from jaxcf.utils import io

# the pretraining pool is the shapes world drawn with this seed (its own images, not the tasks'),
# and the foundation models train with config.seed + SEED_OFFSET
WORLD_SEED = 1000
SEED_OFFSET = 1000


def world_tokenizer() -> WordTokenizer:
    """Every word of the shapes world's captions and prompts."""
    words = ["a", "photo", "of", "an", "on", "background", ".", "small", "large", "at", "the", "top", "bottom",
             "left", "right", "center", "in", "middle"]
    return WordTokenizer(words + list(COLOR_NAMES) + list(SHAPE_NAMES))


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


def train_clip(clip: CLIP, dataset, tokenizer, cfg, workdir: str, mesh, config, *, seed: int, max_len: int):
    """Contrastive (InfoNCE) pretraining of ``clip`` on the world's images and varied captions."""
    size = clip.config.vision.image_size
    variants = caption_variants(dataset.arrays["factors"])
    n_var = len(CAPTION_TEMPLATES)
    tokens = tokenizer([c for v in variants for c in v], max_length=max_len).reshape(len(variants), n_var, max_len)
    tx = optax.adamw(warmup_cosine(cfg.learning_rate, cfg.warmup_steps, cfg.steps), weight_decay=cfg.weight_decay)

    def loss_fn(params, batch, rng):
        f = clip.encode_image(params, to_clip_input(batch["image"], size))
        t = clip.encode_text(params, batch["tokens"])
        return contrastive_loss(f, t, clip.logit_scale(params)), {}

    def batch_fn(step):
        idx = stream_indices(len(dataset), cfg.batch_size, step, seed)
        pick = np.random.default_rng((seed, step)).integers(0, n_var, len(idx))  # a caption variant per image
        return {"image": dataset.get(idx, keys=("image",))["image"], "tokens": tokens[idx, pick]}

    key = dict(train=cfg.to_dict(), captions=CAPTION_TEMPLATES, tokens=tree_digest(tokens))
    return fit(clip.init, tx, loss_fn, batch_fn, steps=cfg.steps, batch_size=cfg.batch_size, workdir=workdir,
               mesh=mesh, config=config, seed=seed, desc="foundation: clip", key=key,
               batch_field="foundation.clip_train.batch_size").params


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
    seed = config.seed + SEED_OFFSET
    data_meta = dict(pretrain_examples=fc.pretrain_examples, resolution=res, world_seed=WORLD_SEED)
    folders = (assets_dir(fc.assets), io.join(workdir, "foundation"))
    pool = []  # drawn once, only when something is trained

    def world():
        if not pool:
            pool.append(shapes_dataset("pretrain", num_examples=fc.pretrain_examples, resolution=res, seed=WORLD_SEED))
        return pool[0]

    clip_meta = dict(model=clip_cfg, train=fc.clip_train.to_dict(), data=data_meta, text_max_len=fc.text_max_len)
    clip_params = load_or_train(
        "clip", clip.param_shapes, clip_meta, folders, io.join(workdir, "foundation"),
        lambda: train_clip(clip, world(), tokenizer, fc.clip_train, io.join(workdir, "foundation", "clip_run"),
                           mesh, config, seed=seed, max_len=fc.text_max_len))
    unet_meta = dict(model=fc.unet.to_dict(), train=fc.unet_train.to_dict(), schedule=sc.to_dict(), data=data_meta)
    unet_params = load_or_train(
        "unet", lambda: jax.eval_shape(unet.init, jax.random.key(0), jnp.zeros((1, res, res, 3)),
                                       jnp.zeros((1,), jnp.int32))["params"], unet_meta, folders,
        io.join(workdir, "foundation"),
        lambda: train_eps_model(unet, schedule, world(), fc.unet_train, io.join(workdir, "foundation", "unet_run"),
                                mesh, config, seed=seed, desc="foundation: diffusion"))
    frozen_clip = CLIP(CLIPConfig.tiny(**clip_cfg, dtype=dtype, param_dtype=dtype))
    frozen_unet = build_model("unet2d", fc.unet.to_dict(), config.dtype)
    return Foundation(clip=frozen_clip, clip_params=frozen_params(clip_params, dtype), tokenizer=tokenizer,
                      diffusion_params=frozen_params(unet_params, dtype),
                      eps_apply=lambda p, x, t: frozen_unet.apply({"params": p}, x, t), schedule=schedule,
                      clip_image_size=res)

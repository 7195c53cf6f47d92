"""The toy foundation of the shapes world: a tiny CLIP pretrained contrastively on the world's
captions and a tiny pixel diffusion model on its images, each trained once per workdir
(resumable) and exported, or read from ``jaxcf/assets/<foundation.assets>`` when its config
matches the one asked for."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxcf.data.shapes import COLOR_NAMES, SHAPE_NAMES, photo_pool, shapes_dataset
from jaxcf.dicap.noise_aware import CONTEXT_CHANNELS, NoiseAwareClassifier, noisy_classification_loss
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
COND_WORLD_SEED = WORLD_SEED + 2  # the pool of a class-conditional UNet trained from scratch
SEED_OFFSET = 1000


def world_tokenizer() -> WordTokenizer:
    """Every word of the shapes world's captions and prompts."""
    words = ["a", "photo", "of", "an", "on", "background", ".", "small", "large", "at", "the", "top", "bottom",
             "left", "right", "center", "in", "middle", "drawing"]
    return WordTokenizer(words + list(COLOR_NAMES) + list(SHAPE_NAMES))


CAPTION_TEMPLATES = (
    "a {color} {shape} on a {background} background",
    "a photo of a {shape}.",
    "a {shape}.",
    "a photo of a {color} {shape}.",
    "a {shape} on a {background} background.",
)


# the confounded corpus's captions name the picture's style: photos show objects in their usual
# setting (jaxcf.data.shapes.photo_pool), drawings on any background
PHOTO_TEMPLATES = (
    "a photo of a {shape}.",
    "a photo of a {color} {shape}.",
    "a {shape} on a {background} background.",
)
DRAWING_TEMPLATES = (
    "a drawing of a {shape}.",
    "a drawing of a {color} {shape}.",
    "a {shape} on a {background} background.",
)


def caption_variants(factors: np.ndarray, templates=CAPTION_TEMPLATES) -> list[list[str]]:
    """Every caption of ``templates`` for each image (factors [N, 6] of the shapes world).

    Web captions name an object in many ways; giving the shape alone in some of them makes a
    contrastive model encode shape, not only the easier colours (the world's spurious features).
    """
    out = []
    for shape, color, bg, *_ in np.asarray(factors):
        words = dict(shape=SHAPE_NAMES[shape], color=COLOR_NAMES[color], background=COLOR_NAMES[bg])
        out.append([t.format(**words) for t in templates])
    return out


def _caption_tokens(dataset, tokenizer, max_len: int) -> np.ndarray:
    """Token ids [N, variants, max_len] of every caption variant of every image: CAPTION_TEMPLATES,
    or for a pool with a ``style`` array (photo_pool) PHOTO_ / DRAWING_TEMPLATES by style."""
    factors = dataset.arrays["factors"]
    if "style" in dataset.arrays:
        photo, drawing = caption_variants(factors, PHOTO_TEMPLATES), caption_variants(factors, DRAWING_TEMPLATES)
        variants = [p if s else d for p, d, s in zip(photo, drawing, dataset.arrays["style"])]
    else:
        variants = caption_variants(factors)
    n_var = len(variants[0])
    ids = tokenizer([c for v in variants for c in v], max_length=max_len)
    return ids.reshape(len(variants), n_var, max_len)


def train_clip(clip: CLIP, dataset, tokenizer, cfg, workdir: str, mesh, config, *, seed: int, max_len: int,
               confounded=None):
    """Contrastive (InfoNCE) pretraining of ``clip`` on the world's images and varied captions.

    ``confounded``: a second pool (``photo_pool``: photos of objects on their shape's usual
    background with probability ``cfg.confound``, drawings on any background) that replaces
    ``dataset`` from step ``cfg.confound_from`` on: continued pretraining on a confounded corpus,
    so that CLIP's own features carry the spurious background, and its language has words for
    "in the usual setting" (photo) and "on any background" (drawing), as web-scale CLIP's do.
    """
    size = clip.config.vision.image_size
    pools = [(dataset, _caption_tokens(dataset, tokenizer, max_len), seed)]
    if confounded is not None:
        pools.append((confounded, _caption_tokens(confounded, tokenizer, max_len), seed + 1))
    tokens = pools[0][1]
    tx = optax.adamw(warmup_cosine(cfg.learning_rate, cfg.warmup_steps, cfg.steps), weight_decay=cfg.weight_decay)

    def loss_fn(params, batch, rng):
        f = clip.encode_image(params, to_clip_input(batch["image"], size))
        t = clip.encode_text(params, batch["tokens"])
        return contrastive_loss(f, t, clip.logit_scale(params)), {}

    def batch_fn(step):
        pool, toks, s = pools[1] if len(pools) > 1 and step >= cfg.confound_from else pools[0]
        idx = stream_indices(len(pool), cfg.batch_size, step, s)
        pick = np.random.default_rng((s, step)).integers(0, toks.shape[1], len(idx))  # a caption variant per image
        return {"image": pool.get(idx, keys=("image",))["image"], "tokens": toks[idx, pick]}

    key = dict(train=cfg.to_dict(), captions=CAPTION_TEMPLATES, tokens=tree_digest(tokens),
               styles=(PHOTO_TEMPLATES, DRAWING_TEMPLATES))
    if len(pools) > 1:
        key["confounded_tokens"] = tree_digest(pools[1][1])
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
    export_dir = io.join(workdir, "foundation")
    gen_size = tuple(fc.generator_object_size) or None
    pools = {}  # drawn once, only when something is trained

    def world(kind):
        """The pretraining pools: "clip" (objects of the default sizes), "confounded" (photos and
        drawings of the same world, ``photo_pool``: a fraction clip_train.photo_fraction are photos,
        on their shape's usual background with probability clip_train.confound), "generator"
        (objects of generator_object_size) and "cond_generator" (cond_unet.pool_examples objects of
        cond_unet.object_size, for a class-conditional UNet trained from scratch)."""
        if kind not in pools:
            n, ct, cu = fc.pretrain_examples, fc.clip_train, fc.cond_unet
            make = dict(
                clip=lambda: shapes_dataset("pretrain", num_examples=n, resolution=res, seed=WORLD_SEED),
                confounded=lambda: photo_pool(n, photo_fraction=ct.photo_fraction, confound=ct.confound,
                                              resolution=res, seed=WORLD_SEED + 1),
                generator=lambda: shapes_dataset("pretrain", num_examples=n, resolution=res, seed=WORLD_SEED,
                                                 object_size=gen_size),
                cond_generator=lambda: shapes_dataset("pretrain", num_examples=cu.pool_examples, resolution=res,
                                                      seed=COND_WORLD_SEED, object_size=tuple(cu.object_size) or None))
            pools[kind] = make[kind]()
        return pools[kind]

    clip_meta = dict(model=clip_cfg, train=fc.clip_train.to_dict(), data=data_meta, text_max_len=fc.text_max_len)
    clip_params = load_or_train(
        "clip", clip.param_shapes, clip_meta, folders, export_dir,
        lambda: train_clip(clip, world("clip"), tokenizer, fc.clip_train, io.join(export_dir, "clip_run"), mesh,
                           config, seed=seed, max_len=fc.text_max_len,
                           confounded=world("confounded") if fc.clip_train.confound > 0 else None))
    gen_meta = dict(data_meta, object_size=list(gen_size)) if gen_size else data_meta
    unet_meta = dict(model=fc.unet.to_dict(), train=fc.unet_train.to_dict(), schedule=sc.to_dict(), data=gen_meta)
    unet_params = load_or_train(
        "unet", lambda: jax.eval_shape(unet.init, jax.random.key(0), jnp.zeros((1, res, res, 3)),
                                       jnp.zeros((1,), jnp.int32))["params"], unet_meta, folders, export_dir,
        lambda: train_eps_model(unet, schedule, world("generator"), fc.unet_train, io.join(export_dir, "unet_run"),
                                mesh, config, seed=seed, desc="foundation: diffusion"))
    noise_classifier = nac_params = None
    if config.counterfactual.guide_on == "xt":  # only the runs that guide on x_t need it
        nc = fc.noise_classifier
        context = bool(nc.get("context", False))
        noise_classifier = NoiseAwareClassifier(num_classes=len(SHAPE_NAMES), channels=tuple(nc.channels),
                                                context=context)
        model_meta = dict(channels=list(nc.channels), num_classes=len(SHAPE_NAMES), **({"context": True} if context else {}))
        nac_meta = dict(model=model_meta, train={k: v for k, v in nc.to_dict().items() if k != "context"},
                        schedule=sc.to_dict(), data=gen_meta)
        nac_params = load_or_train(
            "noise_classifier", lambda: jax.eval_shape(noise_classifier.init, jax.random.key(0),
                                                       jnp.zeros((1, res, res, 3)), jnp.zeros((1,), jnp.int32),
                                                       jnp.zeros((1, res, res, CONTEXT_CHANNELS)))["params"],
            nac_meta, folders, export_dir,
            lambda: train_noise_classifier(noise_classifier, schedule, world("generator"), nc,
                                           io.join(export_dir, "noise_classifier_run"), mesh, config, seed=seed))
    frozen_clip = CLIP(CLIPConfig.tiny(**clip_cfg, dtype=dtype, param_dtype=dtype))
    null_class = None
    if config.counterfactual.guide_on == "implicit":  # the generator is the class-conditional UNet
        null_class = len(SHAPE_NAMES)
        cu = fc.cond_unet
        scratch = cu.init == "scratch"
        unet_cfg = dict(fc.unet.to_dict(), **(cu.model.to_dict() if scratch else {}), num_class_embeds=null_class + 1)
        cond_unet = build_model("unet2d", unet_cfg)
        own = ("init", "model", "object_size", "pool_examples")  # the fields only a scratch run reads
        cond_meta = dict(unet_meta, train=cu.to_dict() if scratch else {k: v for k, v in cu.items() if k not in own},
                         classes=list(SHAPE_NAMES))
        if scratch:  # its own architecture and pool
            cond_meta.update(model={k: v for k, v in unet_cfg.items() if k != "num_class_embeds"},
                             data=dict(data_meta, pretrain_examples=cu.pool_examples, object_size=list(cu.object_size),
                                       world_seed=COND_WORLD_SEED))
        else:
            cond_meta["from_unconditional"] = unet_meta["train"]

        def from_unconditional():  # the unconditional model plus a zero class embedding: it starts where that one is
            dim = cond_unet.config.time_embed_dim
            p = jax.tree.map(jnp.asarray, dict(unet_params))
            p["class_embedding"] = {"embedding": jnp.zeros((null_class + 1, dim), jnp.float32)}
            return p

        unet_params = load_or_train(
            "cond_unet", lambda: jax.eval_shape(cond_unet.init, jax.random.key(0), jnp.zeros((1, res, res, 3)),
                                                jnp.zeros((1,), jnp.int32), jnp.zeros((1,), jnp.int32))["params"],
            cond_meta, folders, export_dir,
            lambda: train_eps_model(cond_unet, schedule, world("cond_generator" if scratch else "generator"), cu,
                                    io.join(export_dir, "cond_unet_run"), mesh, config, seed=seed,
                                    desc="foundation: class-conditional diffusion",
                                    init_params=None if scratch else from_unconditional(),
                                    label_dropout=(cu.label_dropout, null_class)))
    else:
        unet_cfg = fc.unet.to_dict()
    frozen_unet = build_model("unet2d", unet_cfg, config.dtype)
    eps_apply = (lambda p, x, t: frozen_unet.apply({"params": p}, x, t)) if null_class is None else \
        (lambda p, x, t, labels: frozen_unet.apply({"params": p}, x, t, labels))
    return Foundation(clip=frozen_clip, clip_params=frozen_params(clip_params, dtype), tokenizer=tokenizer,
                      diffusion_params=frozen_params(unet_params, dtype), eps_apply=eps_apply, schedule=schedule,
                      clip_image_size=res, noise_classifier=noise_classifier, noise_classifier_params=nac_params,
                      class_index=SHAPE_NAMES.index, null_class=null_class)


def train_noise_classifier(model: NoiseAwareClassifier, schedule, dataset, cfg, workdir: str, mesh, config, *,
                           seed: int):
    """p(shape | x_t, t) on the world's images noised to t < cfg.max_t (the guidance of guide_on="xt")."""
    tx = optax.adamw(warmup_cosine(cfg.learning_rate, cfg.warmup_steps, cfg.steps), weight_decay=cfg.weight_decay)
    res = dataset.get([0])["image"].shape[1:]

    def init(rng):
        return model.init(rng, jnp.zeros((1,) + res), jnp.zeros((1,), jnp.int32),
                          jnp.zeros((1,) + res[:-1] + (CONTEXT_CHANNELS,)))["params"]

    def batch_fn(step):
        idx = stream_indices(len(dataset), cfg.batch_size, step, seed)
        b = dataset.get(idx, keys=("image", "label"))
        return {"image": b["image"], "label": b["label"].astype(np.int32)}

    return fit(init, tx, noisy_classification_loss(model, schedule, cfg.max_t), batch_fn, steps=cfg.steps,
               batch_size=cfg.batch_size, workdir=workdir, mesh=mesh, config=config, seed=seed,
               desc="foundation: noise-aware classifier", key=dict(train=cfg.to_dict()),
               batch_field="foundation.noise_classifier.batch_size").params

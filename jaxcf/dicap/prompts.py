"""CoOp-style prompt learner: M learned context vectors in place of word embeddings.

The prompt for class c is ``[SOS][ctx_1..ctx_M][tokens of name_c][.][EOS]``; the frozen CLIP text
tower encodes it from embeddings (``CLIP.encode_text_embeddings``) and the feature is taken at
EOS. All classes are assembled with array ops: no Python loop over classes inside jit.
Modes: ``unified`` (one context shared by all classes, the default), ``class_specific``
(a context per class) and ``cocoop`` (shared context plus a meta-net bias from the image feature).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

PROMPT_MODES = ("unified", "class_specific", "cocoop")


@dataclasses.dataclass(frozen=True)
class PromptTemplate:
    """Token ids of every class prompt with M placeholder slots after SOS (numpy, static)."""

    token_ids: np.ndarray  # int32 [C, L]
    eot_index: np.ndarray  # int32 [C]
    n_ctx: int


def build_prompt_tokens(tokenizer, class_names: Sequence[str], n_ctx: int, max_length: int) -> PromptTemplate:
    """``[SOS] [PAD]*n_ctx ids(name + ".") [EOS] [PAD]...`` for each class; the pads get replaced."""
    if n_ctx < 1:
        raise ValueError(f"prompt.n_ctx must be >= 1, got {n_ctx}")
    rows = []
    for name in class_names:
        ids = [tokenizer.sos_id] + [tokenizer.pad_id] * n_ctx + list(tokenizer.encode(f"{name}.")) + [tokenizer.eos_id]
        if len(ids) > max_length:
            raise ValueError(f"the prompt for class {name!r} needs {len(ids)} tokens with n_ctx={n_ctx}, more than "
                             f"the text tower's {max_length}")
        rows.append(ids + [tokenizer.pad_id] * (max_length - len(ids)))
    ids = np.asarray(rows, np.int32)
    eot = np.asarray([np.flatnonzero(r == tokenizer.eos_id)[-1] for r in ids], np.int32)
    return PromptTemplate(ids, eot, n_ctx)


def init_prompt_params(key, clip, clip_params, tokenizer, num_classes: int, n_ctx: int,
                       init_text: str | None = "a photo of a", mode: str = "unified") -> dict:
    """Context vectors from the embedding of ``init_text`` (needs exactly n_ctx tokens) or N(0, 0.02^2).

    Returns ``{"ctx": [M, D] or [C, M, D]}`` plus ``"meta"`` (Linear-ReLU-Linear, P -> P/16 -> D)
    for ``cocoop``.
    """
    from jaxcf.configs import check_value

    check_value("prompt.mode", mode, PROMPT_MODES)
    D = clip.config.text.hidden_size
    k_ctx, k1, k2 = jax.random.split(key, 3)
    if init_text:
        ids = list(tokenizer.encode(init_text))
        if len(ids) != n_ctx:
            raise ValueError(f"prompt.init_text {init_text!r} has {len(ids)} tokens but prompt.n_ctx={n_ctx}; "
                             "make them agree or set prompt.init_text='' for a random init")
        ctx = clip.token_embedding(clip_params, jnp.asarray([ids], jnp.int32))[0].astype(jnp.float32)
    else:
        ctx = 0.02 * jax.random.normal(k_ctx, (n_ctx, D))
    params = {"ctx": jnp.tile(ctx[None], (num_classes, 1, 1)) if mode == "class_specific" else ctx}
    if mode == "cocoop":
        P = clip.config.projection_dim
        H = max(P // 16, 4)
        params["meta"] = {
            "w1": jax.random.normal(k1, (P, H)) * P**-0.5, "b1": jnp.zeros(H),
            "w2": jax.random.normal(k2, (H, D)) * 0.02 * H**-0.5, "b2": jnp.zeros(D),
        }
    return params


def for_unseen_classes(prompt_params: dict) -> dict:
    """The prompt parameters for classes the prompts never saw (base-to-novel's novel classes):
    class-specific contexts (one per base class, nothing learned for the others) become their
    mean; shared contexts (unified, cocoop) are used as they are."""
    ctx = prompt_params["ctx"]
    return dict(prompt_params, ctx=ctx.mean(axis=0)) if ctx.ndim == 3 else prompt_params


def _meta_net(meta, image_feats):
    """CoCoOp's meta-net: normalised image feature [B, P] -> context bias [B, D]."""
    f = image_feats / jnp.linalg.norm(image_feats, axis=-1, keepdims=True)
    return jax.nn.relu(f @ meta["w1"] + meta["b1"]) @ meta["w2"] + meta["b2"]


def prompt_embeddings(prompt_params: dict, base_embeds, n_ctx: int, image_feats=None):
    """Puts the context into slots 1..M of the class prompts' word embeddings.

    base_embeds: [C, L, D] (frozen word embeddings of the template). Returns [C, L, D], or
    [B, C, L, D] for cocoop (``image_feats`` [B, P] required).
    """
    C, L, D = base_embeds.shape
    ctx = prompt_params["ctx"].astype(base_embeds.dtype)
    if ctx.ndim == 3 and ctx.shape[0] != C:
        raise ValueError(f"class-specific contexts for {ctx.shape[0]} classes cannot prompt {C} classes; "
                         "for classes without shots use for_unseen_classes(prompt_params)")
    ctx = jnp.broadcast_to(ctx, (C, n_ctx, D)) if ctx.ndim == 2 else ctx  # [C, M, D]
    if "meta" not in prompt_params:
        return base_embeds.at[:, 1:1 + n_ctx, :].set(ctx)
    if image_feats is None:
        raise ValueError("cocoop prompts depend on the image: pass image_feats")
    bias = _meta_net(prompt_params["meta"], image_feats).astype(base_embeds.dtype)  # [B, D]
    ctx = ctx[None] + bias[:, None, None, :]  # [B, C, M, D]
    B = bias.shape[0]
    return jnp.broadcast_to(base_embeds, (B, C, L, D)).at[:, :, 1:1 + n_ctx, :].set(ctx)


def prompt_text_features(clip, clip_params, prompt_params: dict, base_embeds, template: PromptTemplate,
                         image_feats=None):
    """Text features of every class prompt: [C, P] (or [B, C, P] for cocoop)."""
    emb = prompt_embeddings(prompt_params, base_embeds, template.n_ctx, image_feats)
    lead = emb.shape[:-2]
    L, D = emb.shape[-2:]
    eot = jnp.broadcast_to(jnp.asarray(template.eot_index), lead).reshape(-1)
    feats = clip.encode_text_embeddings(clip_params, emb.reshape(-1, L, D), eot)
    return feats.reshape(lead + feats.shape[-1:])

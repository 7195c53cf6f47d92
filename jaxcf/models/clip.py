"""CLIP in Flax linen: ViT image tower, causal text tower, checkpoint loading and preprocessing.

Design: :class:`CLIP` is a frozen, hashable dataclass that holds a :class:`CLIPConfig`; its methods
take the parameter tree explicitly (``clip.encode_image(params, pixels)``) and are pure, so
``jax.jit(clip.encode_image)`` works and ``clip`` may also be a static argument of a jitted
function. The linen modules below carry the Hugging Face module names (``text_model``,
``encoder.layers_3.self_attn.q_proj``, ``pre_layrnorm``...), so a ``CLIPModel`` /
``CLIPTextModel`` state dict maps onto them one to one (:func:`convert_state_dict`).

Numerics follow transformers 5 ``CLIPModel``: pre-LN residual blocks, attention scaled by
``head_dim ** -0.5``, the text feature taken at the EOS token, features unnormalised.
Images are NHWC. LayerNorm statistics and the attention softmax are computed in float32 whatever
``dtype`` is.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Any, Sequence

import numpy as np

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import traverse_util

from jaxcf.models.loading import CheckpointError, finalize, read_json, read_state_dict, resolve_checkpoint_dir
from jaxcf.models.tokenizers import CLIPBPETokenizer, Tokenizer, WordTokenizer, load_tokenizer

__all__ = [
    "ACTIVATIONS", "CLIP", "CLIPConfig", "CLIPModule", "CLIPBPETokenizer", "CLIP_MEAN", "CLIP_STD",
    "TextConfig", "Tokenizer", "VisionConfig", "WordTokenizer", "clip_logits", "contrastive_loss",
    "convert_state_dict", "load_clip", "load_clip_text", "load_tokenizer", "preprocess_images",
    "to_clip_input",
]

Params = Any

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def quick_gelu(x):
    return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS = {
    "quick_gelu": quick_gelu,
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "relu": jax.nn.relu,
}


# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------

def _check_tower(cfg, kind: str):
    if cfg.hidden_size % cfg.num_attention_heads:
        raise ValueError(f"{kind}.hidden_size ({cfg.hidden_size}) must be divisible by "
                         f"{kind}.num_attention_heads ({cfg.num_attention_heads})")
    if cfg.hidden_act not in ACTIVATIONS:
        raise ValueError(f"{kind}.hidden_act is {cfg.hidden_act!r}; allowed: {sorted(ACTIVATIONS)}")


def _fields_from(cls, d: dict) -> dict:
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in d.items() if k in names and v is not None}


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """Causal text transformer (field names and defaults as HF ``CLIPTextConfig``)."""

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 49407  # 2 in legacy configs: EOS is then found as argmax(token_ids)

    def __post_init__(self):
        _check_tower(self, "text_config")


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """ViT image tower (field names and defaults as HF ``CLIPVisionConfig``)."""

    image_size: int = 224
    patch_size: int = 32
    num_channels: int = 3
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    def __post_init__(self):
        _check_tower(self, "vision_config")
        if self.patch_size > self.image_size:
            raise ValueError(f"vision_config.patch_size ({self.patch_size}) exceeds image_size ({self.image_size})")

    @property
    def num_positions(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
    """A CLIP model: text tower, optional image tower, optional projections.

    ``vision=None`` is a text-only model (HF ``CLIPTextModel``, e.g. Stable Diffusion's text
    encoder); with ``projection_dim`` set as well it is ``CLIPTextModelWithProjection``.
    ``dtype`` is the activation dtype, ``param_dtype`` the dtype of parameters made by ``init``.
    """

    text: TextConfig = TextConfig()
    vision: VisionConfig | None = VisionConfig()
    projection_dim: int | None = 512
    logit_scale_init_value: float = 2.6592  # log(1 / 0.07)
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        object.__setattr__(self, "dtype", jnp.dtype(self.dtype))
        object.__setattr__(self, "param_dtype", jnp.dtype(self.param_dtype))
        if self.vision is not None and self.projection_dim is None:
            raise ValueError("a CLIP model with an image tower needs projection_dim")

    @classmethod
    def from_hf(cls, config: dict, **overrides) -> "CLIPConfig":
        """From a HF ``config.json`` dict: ``CLIPModel`` (``text_config``/``vision_config``) or a
        text-only ``CLIPTextModel[WithProjection]`` config."""
        if "text_config" in config or "vision_config" in config or config.get("model_type") == "clip":
            text = dict(config.get("text_config") or {})
            text.update(config.get("text_config_dict") or {})  # configs written before transformers 4.26
            vision = dict(config.get("vision_config") or {})
            vision.update(config.get("vision_config_dict") or {})
            kw = dict(text=TextConfig(**_fields_from(TextConfig, text)),
                      vision=VisionConfig(**_fields_from(VisionConfig, vision)),
                      projection_dim=config.get("projection_dim", 512),
                      logit_scale_init_value=config.get("logit_scale_init_value", 2.6592))
        else:
            with_projection = any("WithProjection" in a for a in config.get("architectures") or ())
            kw = dict(text=TextConfig(**_fields_from(TextConfig, config)), vision=None,
                      projection_dim=config.get("projection_dim", 512) if with_projection else None)
        kw.update(overrides)
        return cls(**kw)

    @classmethod
    def tiny(cls, vocab_size: int = 64, width: int = 32, depth: int = 2, heads: int = 4,
             image_size: int = 32, patch_size: int = 8, projection_dim: int = 16, max_len: int = 16,
             eos_token_id: int | None = None, hidden_act: str = "quick_gelu", **overrides) -> "CLIPConfig":
        """A small model for tests and synthetic worlds; EOS defaults to the last id (as in
        :class:`WordTokenizer`)."""
        text = TextConfig(vocab_size=vocab_size, hidden_size=width, intermediate_size=4 * width,
                          num_hidden_layers=depth, num_attention_heads=heads, max_position_embeddings=max_len,
                          hidden_act=hidden_act,
                          eos_token_id=vocab_size - 1 if eos_token_id is None else eos_token_id)
        vision = VisionConfig(image_size=image_size, patch_size=patch_size, hidden_size=width,
                              intermediate_size=4 * width, num_hidden_layers=depth, num_attention_heads=heads,
                              hidden_act=hidden_act)
        return cls(**{"text": text, "vision": vision, "projection_dim": projection_dim, **overrides})


# ---------------------------------------------------------------------------------------------
# Modules (names mirror transformers' CLIP so checkpoints map one to one)
# ---------------------------------------------------------------------------------------------

class Attention(nn.Module):
    tower: TextConfig | VisionConfig
    causal: bool
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x):  # x: [B, L, D]
        b, length, d = x.shape
        h = self.tower.num_attention_heads
        dense = functools.partial(nn.Dense, d, dtype=self.dtype, param_dtype=self.param_dtype)
        q, k, v = (dense(name=n)(x).reshape(b, length, h, d // h) for n in ("q_proj", "k_proj", "v_proj"))
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * (d // h) ** -0.5
        if self.causal:
            mask = jnp.tril(jnp.ones((length, length), bool))
            logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
        weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, length, d)
        return dense(name="out_proj")(out)


class MLP(nn.Module):
    tower: TextConfig | VisionConfig
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x):
        dense = functools.partial(nn.Dense, dtype=self.dtype, param_dtype=self.param_dtype)
        x = dense(self.tower.intermediate_size, name="fc1")(x)
        x = ACTIVATIONS[self.tower.hidden_act](x)
        return dense(self.tower.hidden_size, name="fc2")(x)


def _layer_norm(tower, dtype, param_dtype, name):
    return nn.LayerNorm(epsilon=tower.layer_norm_eps, dtype=dtype, param_dtype=param_dtype, name=name)


class EncoderLayer(nn.Module):
    """Pre-LN block: ``x += attn(ln1(x)); x += mlp(ln2(x))``."""

    tower: TextConfig | VisionConfig
    causal: bool
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x):  # x: [B, L, D]
        t, dt, pdt = self.tower, self.dtype, self.param_dtype
        x = x + Attention(t, self.causal, dt, pdt, name="self_attn")(_layer_norm(t, dt, pdt, "layer_norm1")(x))
        return x + MLP(t, dt, pdt, name="mlp")(_layer_norm(t, dt, pdt, "layer_norm2")(x))


class Encoder(nn.Module):
    tower: TextConfig | VisionConfig
    causal: bool
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x):  # x: [B, L, D]
        for i in range(self.tower.num_hidden_layers):
            x = EncoderLayer(self.tower, self.causal, self.dtype, self.param_dtype, name=f"layers_{i}")(x)
        return x


class TextEmbeddings(nn.Module):
    tower: TextConfig
    dtype: Any
    param_dtype: Any

    def setup(self):
        t = self.tower
        embed = functools.partial(nn.Embed, features=t.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype)
        self.token_embedding = embed(t.vocab_size)
        self.position_embedding = embed(t.max_position_embeddings)

    def tokens(self, token_ids):  # [B, L] -> [B, L, D]
        return self.token_embedding(token_ids)

    def __call__(self, token_embeddings):  # [B, L, D] -> [B, L, D], positions added
        length = token_embeddings.shape[1]
        return token_embeddings.astype(self.dtype) + self.position_embedding(jnp.arange(length))


class TextTransformer(nn.Module):
    tower: TextConfig
    dtype: Any
    param_dtype: Any

    def setup(self):
        self.embeddings = TextEmbeddings(self.tower, self.dtype, self.param_dtype)
        self.encoder = Encoder(self.tower, True, self.dtype, self.param_dtype)
        self.final_layer_norm = _layer_norm(self.tower, self.dtype, self.param_dtype, None)

    def embed_tokens(self, token_ids):  # [B, L] -> [B, L, D]
        return self.embeddings.tokens(token_ids)

    def __call__(self, token_embeddings):  # [B, L, D] word embeddings -> [B, L, D] last hidden state
        return self.final_layer_norm(self.encoder(self.embeddings(token_embeddings)))


class VisionEmbeddings(nn.Module):
    tower: VisionConfig
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, pixels):  # [B, H, W, C] -> [B, 1 + N, D], N = (H / patch) * (W / patch)
        t, d = self.tower, self.tower.hidden_size
        class_embedding = self.param("class_embedding", nn.initializers.zeros, (d,), self.param_dtype)
        patches = nn.Conv(d, (t.patch_size, t.patch_size), strides=t.patch_size, padding="VALID", use_bias=False,
                          dtype=self.dtype, param_dtype=self.param_dtype, name="patch_embedding")(pixels)
        b = patches.shape[0]
        patches = patches.reshape(b, -1, d)  # [B, gh, gw, D] -> [B, N, D], row-major like torch's flatten(2)
        cls = jnp.broadcast_to(class_embedding.astype(self.dtype), (b, 1, d))
        positions = nn.Embed(t.num_positions, d, dtype=self.dtype, param_dtype=self.param_dtype,
                             name="position_embedding")
        return jnp.concatenate([cls, patches], axis=1) + positions(jnp.arange(t.num_positions))


class VisionTransformer(nn.Module):
    tower: VisionConfig
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, pixels):  # [B, H, W, C] -> [B, D] pooled: post-LN of the class token
        t, dt, pdt = self.tower, self.dtype, self.param_dtype
        x = VisionEmbeddings(t, dt, pdt, name="embeddings")(pixels.astype(dt))
        x = _layer_norm(t, dt, pdt, "pre_layrnorm")(x)  # sic: HF's spelling
        x = Encoder(t, False, dt, pdt, name="encoder")(x)
        return _layer_norm(t, dt, pdt, "post_layernorm")(x[:, 0])


class CLIPModule(nn.Module):
    """Parameter tree ``{text_model, text_projection?, vision_model?, visual_projection?, logit_scale?}``.

    Make parameters with :meth:`CLIP.init` (CLIP's initialisation) or a loader, not ``module.init``
    (the linen initializers here are flax defaults, used for shapes only).
    """

    config: CLIPConfig

    def setup(self):
        c = self.config
        dense = functools.partial(nn.Dense, use_bias=False, dtype=c.dtype, param_dtype=c.param_dtype)
        self.text_model = TextTransformer(c.text, c.dtype, c.param_dtype)
        if c.projection_dim is not None:
            self.text_projection = dense(c.projection_dim)
        if c.vision is not None:
            self.vision_model = VisionTransformer(c.vision, c.dtype, c.param_dtype)
            self.visual_projection = dense(c.projection_dim)
            self.logit_scale = self.param("logit_scale", nn.initializers.constant(c.logit_scale_init_value), (),
                                          c.param_dtype)

    def token_embedding(self, token_ids):  # [B, L] -> [B, L, D]
        return self.text_model.embed_tokens(token_ids)

    def text_hidden_states(self, token_ids):  # [B, L] -> [B, L, D]
        return self.text_model(self.token_embedding(token_ids))

    def encode_text_embeddings(self, token_embeddings, eot_index):  # [B, L, D], [B] -> [B, P]
        h = self.text_model(token_embeddings)
        pooled = jnp.take_along_axis(h, eot_index.astype(jnp.int32)[:, None, None], axis=1)[:, 0]  # [B, D]
        return self.text_projection(pooled)

    def encode_image(self, pixels):  # [B, H, W, C] -> [B, P]
        return self.visual_projection(self.vision_model(pixels))

    def __call__(self, token_ids, pixels=None):
        """Touches every parameter (for :meth:`CLIP.param_shapes`)."""
        h = self.text_hidden_states(token_ids)
        if self.config.projection_dim is not None:
            h = self.text_projection(h)
        if self.config.vision is None:
            return h
        return h, self.encode_image(pixels), self.logit_scale


# ---------------------------------------------------------------------------------------------
# Functional API
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class CLIP:
    """A CLIP model's static half (config); every method takes the parameter tree ``params``.

    Pure and hashable: ``jax.jit(clip.encode_image)`` or ``jax.jit(f, static_argnums=...)`` with
    ``clip`` static.
    """

    config: CLIPConfig

    @property
    def module(self) -> CLIPModule:
        return CLIPModule(self.config)

    def _apply(self, params: Params, method, *args):
        return self.module.apply({"params": params}, *args, method=method)

    def init(self, rng: jax.Array) -> Params:
        """Random parameters (``param_dtype``) with CLIP's initialisation, as transformers'
        ``_init_weights``: weights ``N(0, std)`` with the std by role (:func:`_init_std`),
        LayerNorm scale 1, biases 0, ``logit_scale = logit_scale_init_value``.

        One normal draw is sliced over all weights: it compiles in a fraction of the time that
        flax's per-parameter keys take (one threefry pipeline per parameter).
        """
        shapes = traverse_util.flatten_dict(self.param_shapes())  # {path: ShapeDtypeStruct}
        weights = [p for p in shapes if p[-1] in ("kernel", "embedding", "class_embedding")]
        constants = {"scale": 1.0, "bias": 0.0, "logit_scale": self.config.logit_scale_init_value}

        def draw(rng):
            sizes = [math.prod(shapes[p].shape) for p in weights]
            chunks = jnp.split(jax.random.normal(rng, (sum(sizes),)), np.cumsum(sizes)[:-1])
            out = {p: (_init_std(self.config, p) * z.reshape(shapes[p].shape)).astype(shapes[p].dtype)
                   for p, z in zip(weights, chunks)}
            out.update({p: jnp.full(s.shape, constants[p[-1]], s.dtype) for p, s in shapes.items() if p not in out})
            return traverse_util.unflatten_dict(out)

        return jax.jit(draw)(rng)

    def param_shapes(self) -> Params:
        """``jax.ShapeDtypeStruct`` tree of the parameters, without computing them."""
        c = self.config
        ids = jax.ShapeDtypeStruct((1, c.text.max_position_embeddings), jnp.int32)
        pixels = None
        if c.vision is not None:
            pixels = jax.ShapeDtypeStruct((1, c.vision.image_size, c.vision.image_size, c.vision.num_channels),
                                          c.dtype)
        return jax.eval_shape(self.module.init, jax.random.key(0), ids, pixels)["params"]

    def _check_ids(self, token_ids):
        token_ids = jnp.asarray(token_ids)
        if token_ids.ndim != 2 or not jnp.issubdtype(token_ids.dtype, jnp.integer):
            raise ValueError(f"token_ids must be integers [B, L], got {token_ids.dtype} {token_ids.shape}")
        self._check_length(token_ids.shape[1])
        return token_ids

    def _check_length(self, length: int):
        if length > self.config.text.max_position_embeddings:
            raise ValueError(f"text length {length} exceeds text_config.max_position_embeddings "
                             f"({self.config.text.max_position_embeddings})")

    def _need(self, part: str):
        c = self.config
        if part == "projection" and c.projection_dim is None:
            raise ValueError("this text-only CLIP has no text_projection; use text_hidden_states")
        if part == "vision" and c.vision is None:
            raise ValueError("this CLIP is text-only; it has no image tower or logit_scale")

    def eos_index(self, token_ids: jax.Array) -> jax.Array:
        """``[B, L] -> [B]`` position of EOS as transformers 5 finds it: ``argmax(token_ids)`` when
        ``eos_token_id == 2`` (legacy configs), else the first ``token_ids == eos_token_id``."""
        eos = self.config.text.eos_token_id
        if eos == 2:
            return jnp.argmax(token_ids, axis=-1)
        return jnp.argmax(token_ids == eos, axis=-1)

    def token_embedding(self, params: Params, token_ids: jax.Array) -> jax.Array:
        """``[B, L]`` ids -> ``[B, L, D]`` word embeddings (no positions)."""
        return self._apply(params, CLIPModule.token_embedding, self._check_ids(token_ids))

    def text_hidden_states(self, params: Params, token_ids: jax.Array) -> jax.Array:
        """``[B, L]`` -> ``[B, L, D]`` last hidden state after ``final_layer_norm`` (what Stable
        Diffusion conditions on)."""
        return self._apply(params, CLIPModule.text_hidden_states, self._check_ids(token_ids))

    def encode_text_embeddings(self, params: Params, token_embeddings: jax.Array, eot_index: jax.Array) -> jax.Array:
        """``[B, L, D]`` word embeddings (e.g. learned prompt context), ``[B]`` EOS positions -> ``[B, P]``.

        Position embeddings are added here; ``token_embeddings`` must not include them.
        """
        self._need("projection")
        if token_embeddings.ndim != 3 or token_embeddings.shape[-1] != self.config.text.hidden_size:
            raise ValueError(f"token_embeddings must be [B, L, {self.config.text.hidden_size}], "
                             f"got {token_embeddings.shape}")
        self._check_length(token_embeddings.shape[1])
        eot_index = jnp.asarray(eot_index)
        if eot_index.shape != token_embeddings.shape[:1]:
            raise ValueError(f"eot_index must be [B] = {token_embeddings.shape[:1]}, got {eot_index.shape}")
        return self._apply(params, CLIPModule.encode_text_embeddings, token_embeddings, eot_index)

    def encode_text(self, params: Params, token_ids: jax.Array) -> jax.Array:
        """``[B, L]`` ids -> ``[B, P]`` projected feature at EOS (unnormalised, as HF ``get_text_features``)."""
        self._need("projection")
        token_ids = self._check_ids(token_ids)
        return self._apply(params, CLIPModule.encode_text_embeddings,
                           self._apply(params, CLIPModule.token_embedding, token_ids), self.eos_index(token_ids))

    def encode_image(self, params: Params, pixels: jax.Array) -> jax.Array:
        """``[B, H, W, 3]`` CLIP-normalised pixels -> ``[B, P]`` (unnormalised, as HF ``get_image_features``)."""
        self._need("vision")
        v = self.config.vision
        want = (v.image_size, v.image_size, v.num_channels)
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != want:
            raise ValueError(f"pixels must be [B, {want[0]}, {want[1]}, {want[2]}] (NHWC, vision_config.image_size "
                             f"{v.image_size}), got {tuple(pixels.shape)}")
        return self._apply(params, CLIPModule.encode_image, pixels)

    def logit_scale(self, params: Params) -> jax.Array:
        """``exp(logit_scale)``, the scalar multiplying cosine similarities (100 for OpenAI CLIP)."""
        self._need("vision")
        return jnp.exp(params["logit_scale"].astype(jnp.float32))


def _init_std(c: CLIPConfig, path: tuple[str, ...]) -> float:
    """Std of weight ``path`` at init (transformers' CLIP ``_init_weights``, ``initializer_factor`` 1)."""
    if path[-1] == "class_embedding" or path[0] == "visual_projection":
        return c.vision.hidden_size ** -0.5
    if path[0] == "text_projection":
        return c.text.hidden_size ** -0.5
    tower = c.text if path[0] == "text_model" else c.vision
    d = tower.hidden_size
    deep = d ** -0.5 * (2 * tower.num_hidden_layers) ** -0.5
    # path[-2] is the module: attention and MLP by role; embeddings and the patch conv 0.02.
    return {"q_proj": deep, "k_proj": deep, "v_proj": deep, "out_proj": d ** -0.5,
            "fc1": (2 * d) ** -0.5, "fc2": deep}.get(path[-2], 0.02)


def _l2_normalize(x):
    x = x.astype(jnp.float32)
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def clip_logits(image_feats: jax.Array, text_feats: jax.Array, scale: jax.Array | float) -> jax.Array:
    """``[Bi, P], [Bt, P] -> [Bi, Bt]``: ``scale * cos(image, text)`` (float32)."""
    return scale * _l2_normalize(image_feats) @ _l2_normalize(text_feats).T


def contrastive_loss(image_feats: jax.Array, text_feats: jax.Array, logit_scale: jax.Array | float) -> jax.Array:
    """Symmetric InfoNCE over a batch of matching pairs ``[B, P], [B, P]``; ``logit_scale`` is the
    exp'd scale (:meth:`CLIP.logit_scale`). Equals HF ``CLIPModel(return_loss=True).loss``."""
    logits = clip_logits(image_feats, text_feats, logit_scale)  # [B, B]: row i = image i vs all texts
    image_to_text = -jnp.mean(jnp.diagonal(jax.nn.log_softmax(logits, axis=1)))
    text_to_image = -jnp.mean(jnp.diagonal(jax.nn.log_softmax(logits, axis=0)))
    return (image_to_text + text_to_image) / 2


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------

_IGNORED = (r"(^|\.)position_ids$",)


def _convert_encoder(sd, prefix: str, depth: int) -> dict:
    layers = {}
    for i in range(depth):
        p = f"{prefix}.layers.{i}"
        layers[f"layers_{i}"] = {
            "self_attn": {n: sd.linear(f"{p}.self_attn.{n}") for n in ("q_proj", "k_proj", "v_proj", "out_proj")},
            "layer_norm1": sd.norm(f"{p}.layer_norm1"),
            "mlp": {n: sd.linear(f"{p}.mlp.{n}") for n in ("fc1", "fc2")},
            "layer_norm2": sd.norm(f"{p}.layer_norm2"),
        }
    return layers


def convert_state_dict(sd, config: CLIPConfig, text_prefix: str = "text_model.") -> dict:
    """A transformers ``CLIPModel``/``CLIPTextModel[WithProjection]`` :class:`StateDict` -> params.

    ``text_prefix`` is where the text tower's tensors live: ``"text_model."``, or ``""`` for a
    ``CLIPTextModel`` saved by transformers 5 (earlier versions wrote the prefix).
    """
    t = text_prefix
    out = {"text_model": {
        "embeddings": {"token_embedding": sd.embedding(f"{t}embeddings.token_embedding"),
                       "position_embedding": sd.embedding(f"{t}embeddings.position_embedding")},
        "encoder": _convert_encoder(sd, f"{t}encoder", config.text.num_hidden_layers),
        "final_layer_norm": sd.norm(f"{t}final_layer_norm"),
    }}
    if config.projection_dim is not None:
        out["text_projection"] = sd.linear("text_projection", bias=False)
    if config.vision is not None:
        out["vision_model"] = {
            "embeddings": {"class_embedding": sd.take("vision_model.embeddings.class_embedding"),
                           "patch_embedding": sd.conv("vision_model.embeddings.patch_embedding", bias=False),
                           "position_embedding": sd.embedding("vision_model.embeddings.position_embedding")},
            "pre_layrnorm": sd.norm("vision_model.pre_layrnorm"),
            "encoder": _convert_encoder(sd, "vision_model.encoder", config.vision.num_hidden_layers),
            "post_layernorm": sd.norm("vision_model.post_layernorm"),
        }
        out["visual_projection"] = sd.linear("visual_projection", bias=False)
        out["logit_scale"] = sd.take("logit_scale")
    return out


def _load(folder, config: CLIPConfig, ignore=()) -> tuple[CLIP, Params]:
    sd = read_state_dict(folder)
    clip = CLIP(config)
    params = finalize(convert_state_dict(sd, config), clip.param_shapes(), sd,
                      ignore_unused=_IGNORED + tuple(ignore), dtype=config.param_dtype)
    return clip, params


def load_clip(name_or_path: str | os.PathLike, dtype: Any = jnp.float32, *, param_dtype: Any = None,
              subfolder: str | None = None) -> tuple[CLIP, Params]:
    """A transformers ``CLIPModel`` checkpoint (local folder or hub id) -> ``(CLIP, params)``.

    ``dtype`` is the activation dtype, ``param_dtype`` (default: ``dtype``) that of the params.
    """
    folder = resolve_checkpoint_dir(name_or_path, subfolder)
    hf = read_json(folder)
    if "text_config" not in hf and "vision_config" not in hf:
        raise CheckpointError(f"{str(folder)!r} holds a text-only CLIP ({hf.get('architectures')}); "
                              f"load it with load_clip_text")
    config = CLIPConfig.from_hf(hf, dtype=dtype, param_dtype=dtype if param_dtype is None else param_dtype)
    return _load(folder, config)


def load_clip_text(name_or_path: str | os.PathLike, dtype: Any = jnp.float32, *, param_dtype: Any = None,
                   subfolder: str | None = None) -> tuple[CLIP, Params]:
    """The text tower of a checkpoint -> ``(CLIP, params)`` with ``config.vision = None``.

    Reads ``CLIPTextModel`` (Stable Diffusion's ``text_encoder/``; tensor names with or without
    the ``text_model.`` prefix), ``CLIPTextModelWithProjection`` (``text_projection`` kept) or a
    full ``CLIPModel`` (its image tower is skipped).
    """
    folder = resolve_checkpoint_dir(name_or_path, subfolder)
    full = CLIPConfig.from_hf(read_json(folder))
    sd = read_state_dict(folder)
    projection_dim = None
    if "text_projection.weight" in sd:
        projection_dim = int(sd.take("text_projection.weight").shape[0])
    config = CLIPConfig(text=full.text, vision=None, projection_dim=projection_dim, dtype=dtype,
                        param_dtype=dtype if param_dtype is None else param_dtype)
    clip = CLIP(config)
    text_prefix = "text_model." if sd.has_prefix("text_model.") else ""
    params = finalize(convert_state_dict(sd, config, text_prefix), clip.param_shapes(), sd,
                      ignore_unused=_IGNORED + (r"^vision_model\.", r"^visual_projection\.", r"^logit_scale$"),
                      dtype=config.param_dtype)
    return clip, params


# ---------------------------------------------------------------------------------------------
# Preprocessing
# ---------------------------------------------------------------------------------------------

def _shortest_side_size(h: int, w: int, size: int) -> tuple[int, int]:
    """(h, w) with the shorter side resized to ``size`` (the longer one rounded down, as HF does)."""
    if h <= w:
        return size, int(size * w / h)
    return int(size * h / w), size


def preprocess_images(images, image_size: int = 224, mean: Sequence[float] = CLIP_MEAN,
                      std: Sequence[float] = CLIP_STD) -> np.ndarray:
    """uint8 images (``[B, H, W, 3]`` array, or a list of ``[H, W, 3]`` arrays / PIL images) ->
    float32 ``[B, S, S, 3]``: shortest side bicubic-resized to ``S``, centre crop, CLIP mean/std.

    Matches transformers' ``CLIPImageProcessor`` (PIL backend).
    """
    from PIL import Image

    if isinstance(images, np.ndarray) and images.ndim == 3:
        images = images[None]
    out = []
    for im in images:
        if not isinstance(im, Image.Image):
            im = np.asarray(im)
            if im.dtype != np.uint8 or im.ndim != 3 or im.shape[-1] != 3:
                raise ValueError(f"preprocess_images expects uint8 [H, W, 3] images, got {im.dtype} {im.shape}; "
                                 f"for float images in [-1, 1] use to_clip_input")
            im = Image.fromarray(im)
        im = im.convert("RGB")
        h, w = _shortest_side_size(im.height, im.width, image_size)
        arr = np.asarray(im.resize((w, h), Image.BICUBIC))
        top, left = (h - image_size) // 2, (w - image_size) // 2
        out.append(arr[top:top + image_size, left:left + image_size])
    x = np.stack(out).astype(np.float32) / 255.0
    return ((x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)).astype(np.float32)


def to_clip_input(images: jax.Array, image_size: int, mean: Sequence[float] = CLIP_MEAN,
                  std: Sequence[float] = CLIP_STD) -> jax.Array:
    """Differentiable ``[B, H, W, 3]`` images in ``[-1, 1]`` -> ``[B, S, S, 3]`` CLIP input (float32):
    shortest side bicubic-resized to ``S`` (``jax.image.resize``, antialiased), centre crop, mean/std.
    For guidance gradients through CLIP."""
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"to_clip_input expects [B, H, W, 3] images, got {tuple(images.shape)}")
    b, h, w, c = images.shape
    nh, nw = _shortest_side_size(h, w, image_size)
    x = (images.astype(jnp.float32) + 1.0) / 2.0
    if (nh, nw) != (h, w):
        x = jax.image.resize(x, (b, nh, nw, c), method="bicubic")
    top, left = (nh - image_size) // 2, (nw - image_size) // 2
    x = x[:, top:top + image_size, left:left + image_size]
    return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)

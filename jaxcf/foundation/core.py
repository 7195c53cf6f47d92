"""The frozen "foundation models" a counterfactual pipeline stands on: CLIP + a diffusion model."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import jax.numpy as jnp
import numpy as np

from jaxcf.diffusion import NoiseSchedule
from jaxcf.models.clip import CLIP, to_clip_input


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
    # p(y | x_t, t) for guide_on="xt" (jaxcf.dicap.noise_aware), over the classes named by
    # class_index(name) -> output index; None where the foundation has none
    noise_classifier: Optional[Any] = None
    noise_classifier_params: Any = None
    class_index: Optional[Callable] = None
    # a class-conditional diffusion model (guide_on="implicit"): eps_apply(params, x_t, t, labels)
    # with labels indexed like class_index; null_class is the label of its unconditional mode
    null_class: Optional[int] = None
    _encoders: dict = dataclasses.field(default_factory=dict, init=False, repr=False)

    def image_features(self, clip_params, images):
        """CLIP image features of images [B, H, W, 3] in [-1, 1] -> [B, P] float32 (traceable)."""
        return self.clip.encode_image(clip_params, self.to_clip(images)).astype(jnp.float32)

    def to_clip(self, images):
        """[B, H, W, 3] in [-1, 1] -> CLIP input (differentiable)."""
        return to_clip_input(images, self.clip_image_size)

    def eps_fn(self, diffusion_params):
        """eps(x_t, t, cond). A class-conditional model reads ``cond`` as labels [B] (None: the null
        class, its unconditional mode); an unconditional one ignores it."""
        if self.null_class is None:
            return lambda x, t, cond: self.eps_apply(diffusion_params, x, t)

        def eps(x, t, cond):
            labels = jnp.full((x.shape[0],), self.null_class, jnp.int32) if cond is None else cond
            return self.eps_apply(diffusion_params, x, t, labels)

        return eps


def build_foundation(config, workdir: str, mesh) -> Foundation:
    """The foundation named by ``config.foundation.kind``: "toy" (pretrained here) or "pretrained"."""
    if config.foundation.kind == "toy":
        from jaxcf.foundation.toy import toy_foundation

        return toy_foundation(config, workdir, mesh)
    from jaxcf.foundation.pretrained import pretrained_foundation

    return pretrained_foundation(config)


def template_text_features(found: Foundation, class_names, template: str, max_len: int):
    """Zero-shot class embeddings from a hand-written template ("a photo of a {}.") -> [C, P]."""
    ids = found.tokenizer([template.format(c) for c in class_names], max_length=max_len)
    return found.clip.encode_text(found.clip_params, jnp.asarray(ids)).astype(jnp.float32)


def encode_images(found: Foundation, images: np.ndarray, batch_size: int = 256, mesh=None) -> np.ndarray:
    """CLIP image features [N, P] of images [N, H, W, 3] in [-1, 1], in padded batches of
    ``batch_size`` rows (the image tower compiles once per image shape however many sets are
    encoded), split over the mesh's data axis (default: every device on one axis)."""
    from jaxcf.train.batched import batched
    from jaxcf.train.mesh import make_mesh

    if not len(images):
        return np.zeros((0, found.clip.config.projection_dim), np.float32)
    mesh = mesh if mesh is not None else make_mesh()
    key = (batch_size, mesh)
    if key not in found._encoders:  # one compiled program per foundation, batch size and mesh
        found._encoders[key] = batched(found.image_features, mesh, batch_size)
    return found._encoders[key](found.clip_params, images)

"""DiCap's abduction and action: DDIM-invert a factual image, then guide it toward y_cf.

The anti-causal predictor p_phi(y | x) is frozen CLIP zero-shot with a hand-written template,
applied to the predicted clean image x0_hat(x_t) (decoded through the VAE first for a latent
model). Counterfactuals do not depend on the learned prompt, so they are generated once and cached.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

from jaxcf.diffusion import ddim_invert, guided_denoise
from jaxcf.dicap.losses import class_cosines

CF_TARGETS = ("similarity", "random")
CF_MASKS = ("none", "edit")  # counterfactual.mask: the masked action of guided_denoise, or none


def sample_target_classes(labels, class_text_feats, method: str = "similarity", key: Optional[jax.Array] = None):
    """y_cf for each label [B]: the most text-similar other class, or a uniformly random other class."""
    C = class_text_feats.shape[0]
    if method == "similarity":
        sim = class_cosines(class_text_feats, class_text_feats)  # [C, C]
        nearest = jnp.argmax(jnp.where(jnp.eye(C, dtype=bool), -jnp.inf, sim), axis=1)
        return nearest[labels]
    if method == "random":
        if key is None:
            raise ValueError("random y_cf sampling needs a PRNG key")
        return (labels + jax.random.randint(key, labels.shape, 1, C)) % C
    from jaxcf.configs import check_value

    check_value("dicap.cf_target", method, CF_TARGETS)


def clip_zero_shot_log_prob(clip, clip_params, class_text_feats, to_clip: Callable, logit_scale: float = 100.0):
    """log p_phi(y | x) = log_softmax(logit_scale * cos(f(x), t_c))[y] for images x in [-1, 1].

    ``to_clip`` maps model-range images to CLIP input (resize + normalise, differentiable);
    ``class_text_feats`` [C, P] come from the fixed template ("a photo of a {}.").
    """

    def log_prob(x, t, y):
        f = clip.encode_image(clip_params, to_clip(x))
        logits = logit_scale * class_cosines(f, class_text_feats)
        return jnp.take_along_axis(jax.nn.log_softmax(logits, -1), y[:, None], 1)[:, 0]

    return log_prob


def generate_counterfactuals(eps_fn, log_prob_fn, x, y_cf, scale, schedule, num_steps: int, depth: float, *,
                             cond: Any = None, encode: Optional[Callable] = None, decode: Optional[Callable] = None,
                             guide_on: str = "x0", grad_through_eps: bool = False,
                             mask_threshold: Optional[float] = None, mask_dilation: int = 1,
                             normalize_gradient: bool = False):
    """x [B, H, W, C] in [-1, 1] -> counterfactual x_cf toward y_cf [B].

    Abduction: x_t0 = DDIM-invert(x) to ``depth``; action: guided DDIM back to clean with
    classifier guidance of scale ``scale``. For a latent model pass ``encode``/``decode`` (VAE,
    scaling factor included): inversion runs on latents and the classifier sees decoded x0_hat.
    ``mask_threshold`` (None = off) runs the masked action of :func:`jaxcf.diffusion.guided_denoise`:
    outside the region the guidance edits, every step takes the source's own inversion trajectory.
    ``normalize_gradient``: each example's classifier gradient at unit RMS (an option, not the paper's formula).
    """
    z = x if encode is None else encode(x)
    lp = log_prob_fn if decode is None else (lambda zz, t, y: log_prob_fn(decode(zz), t, y))
    if mask_threshold is None:
        z_t, masking = ddim_invert(eps_fn, z, cond, schedule, num_steps, depth), {}
    else:
        z_t, traj = ddim_invert(eps_fn, z, cond, schedule, num_steps, depth, return_trajectory=True)
        masking = dict(source_trajectory=traj, mask_threshold=mask_threshold, mask_dilation=mask_dilation)
    z_cf = guided_denoise(eps_fn, lp, z_t, cond, y_cf, scale, schedule, num_steps, depth,
                          guide_on=guide_on, grad_through_eps=grad_through_eps,
                          normalize_gradient=normalize_gradient, **masking)
    return z_cf if decode is None else decode(z_cf)
